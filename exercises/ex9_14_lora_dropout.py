# Exercise 9.14: your file to edit. Generated from solutions/ex9_14_lora_dropout.py by make_stubs.py (body sha256 ea526352cbef).
"""Exercise 9.14 (suggested) -- LoRA dropout.

LoRA's dropout regularises the *update only*: it drops entries of the input of
the low-rank branch, never of the frozen path (Hu et al. 2021 use it in their
GPT-2 experiments; Hugging Face's ``lora_dropout``)::

    h = x @ W.T + scaling * (dropout(x) @ A.T) @ B.T

Inverted dropout: in training, each entry is kept with probability ``1 - p`` and
the kept ones are multiplied by ``1 / (1 - p)``, so the expected value is
unchanged and evaluation needs no rescaling::

    mask = (rng.random(x.shape) >= p) / (1 - p)      values 0 or 1/(1-p)

In ``eval()`` mode (or with ``p = 0``) dropout is the identity.

The backward pass must use the *same* mask as the forward pass: the gradient
flows only through the entries that were kept.

Your tasks: ``forward`` and ``backward``. ``__init__``, ``train`` and ``eval`` are given.

Check your work:  ``python exercises/check.py 9.14``
"""
import numpy as np


class LoRADropoutLayer:
    """A LoRA update with dropout on its input; the frozen ``W`` is passed to forward."""

    def __init__(self, in_features, out_features, rank=8, alpha=16.0, dropout=0.1, rng=None):
        """Given. ``self.rng`` draws the dropout masks: use ``self.rng.random(x.shape)``."""
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.scaling, self.p = rank, alpha / rank, dropout
        bound = 1.0 / np.sqrt(in_features)
        self.A = self.rng.uniform(-bound, bound, (rank, in_features))      # (r, in)
        self.B = np.zeros((out_features, rank))                             # (out, r)
        self.training = True
        self.mask = None

    def train(self):
        self.training = True
        return self

    def eval(self):
        self.training = False
        return self

    def forward(self, x, W):
        """``x (..., in)``, frozen ``W (out, in)`` -> ``(..., out)``.

        In training with ``p > 0``: draw ``self.mask`` (shape of ``x``, values 0 or
        ``1/(1-p)``) with ``self.rng`` and apply it to the LoRA branch's input only.
        Otherwise set ``self.mask = None``. Cache what backward needs.
        """
        raise NotImplementedError("Exercise 9.14: draw the mask (training only), drop the branch input, add both paths")

    def backward(self, grad_output):
        """Set ``A_grad``, ``B_grad``; return ``dL/dx`` (frozen path + LoRA path, the
        LoRA part multiplied by the forward's mask)."""
        raise NotImplementedError("Exercise 9.14: the LoRA backward on the dropped input, then through the mask")
