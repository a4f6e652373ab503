# Exercise 9.13: your file to edit. Generated from solutions/ex9_13_lora_ffn.py by make_stubs.py (body sha256 aa60befbf8ba).
"""Exercise 9.13 (suggested) -- LoRA on the feed-forward layers.

The transformer's MLP is ``fc1 -> GELU -> fc2`` with ``fc1: (4D, D)`` and
``fc2: (D, 4D)``: two thirds of a block's weights live here, and adapting them
often helps more than adapting attention alone (QLoRA §4 applies LoRA to every
linear layer). Here both projections are frozen and each targeted one gets a
LoRA update::

    x (..., D) ── fc1 (+ LoRA) ──> h (..., 4D) ── GELU ──> a ── fc2 (+ LoRA) ──> y (..., D)

Notice the factors are *not square*: for ``fc1``, ``A`` is ``(r, D)`` and ``B``
``(4D, r)``; for ``fc2``, ``A`` is ``(r, 4D)`` and ``B`` ``(D, r)``.

Your tasks: ``__init__``, ``forward``, ``backward`` (gradients of every ``A``
and ``B``, and ``dL/dx``), ``merge`` and ``num_trainable_parameters``. GELU and
its derivative are given.

Check your work:  ``python exercises/check.py 9.13``
"""
import numpy as np

_C = np.sqrt(2 / np.pi)


def gelu(z):
    """Given: GELU, tanh form (as GPT-2 and the library)."""
    return 0.5 * z * (1.0 + np.tanh(_C * (z + 0.044715 * z * z * z)))


def gelu_grad(z):
    """Given: d gelu / dz."""
    t = np.tanh(_C * (z + 0.044715 * z * z * z))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _C * (1.0 + 3 * 0.044715 * z * z)


class LoRAMLP:
    """``y = fc2(gelu(fc1(x)))`` with frozen weights and LoRA on ``target_modules``."""

    def __init__(self, fc1_weight, fc1_bias, fc2_weight, fc2_bias, rank=8, alpha=16.0,
                 target_modules=("fc1", "fc2"), rng=None):
        """Attributes to set:

            weights   ``{"fc1": (W, b), "fc2": (W, b)}``, frozen (never modified)
            rank, scaling (= alpha / rank), target_modules (a list)
            lora_A    ``{name: (rank, in_features)}`` uniform in +-1/sqrt(in_features)
            lora_B    ``{name: (out_features, rank)}`` zeros
        for each name in ``target_modules`` (``ValueError`` for a name other than
        ``"fc1"`` / ``"fc2"``).
        """
        rng = rng if rng is not None else np.random.default_rng(0)
        raise NotImplementedError("Exercise 9.13: validate the targets; store the frozen weights; one (A, B) per target")

    def _linear(self, name, x):
        """One projection with its LoRA update (a helper you may use)."""
        W, b = self.weights[name]
        out = x @ W.T + b
        if name in self.lora_A:
            out = out + self.scaling * (x @ self.lora_A[name].T) @ self.lora_B[name].T
        return out

    def forward(self, x):
        """``x (..., D)`` -> ``(..., D)``. Cache what backward needs."""
        raise NotImplementedError("Exercise 9.13: fc1 (with LoRA), GELU, fc2 (with LoRA); cache x, h and a")

    def _linear_backward(self, name, x, dout):
        """dL/d(input) of one projection; stores its LoRA gradients if targeted."""
        raise NotImplementedError("Exercise 9.13: frozen path dout @ W, plus the LoRA backward of exercise 9.6 if targeted")

    def backward(self, grad_output):
        """Set ``self.lora_A_grad`` and ``self.lora_B_grad`` (dicts keyed like
        ``lora_A``) and return ``dL/dx (..., D)``. Walk the forward in reverse."""
        self.lora_A_grad, self.lora_B_grad = {}, {}
        raise NotImplementedError("Exercise 9.13: fc2 backward, GELU backward (gelu_grad at h), fc1 backward")

    def merge(self):
        """``{"fc1": (W', b), "fc2": (W', b)}`` with ``W' = W + scaling * B @ A`` for
        targets (new arrays) and the original ``W`` otherwise."""
        raise NotImplementedError("Exercise 9.13: fold each target's update into a new weight; biases unchanged")

    def num_trainable_parameters(self):
        """Total size of the ``A`` and ``B`` arrays: ``r * (D + 4D)`` per target here."""
        raise NotImplementedError("Exercise 9.13: sum over the targets")
