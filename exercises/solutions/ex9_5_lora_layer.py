"""Exercise 9.5 -- a LoRA layer: initialisation, forward pass, merge.

LoRA (Hu et al. 2021) keeps a pretrained weight ``W`` of shape ``(out, in)``
frozen and learns a low-rank update beside it::

    x ──┬──────── W (frozen, out x in) ─────────────────┐
        │                                               (+)──> h = x W^T + s (x A^T) B^T
        └── A (r x in) ──> B (out x r) ──> * s ─────────┘       with s = alpha / r

Only ``A`` and ``B`` are trained: ``r * (in + out)`` numbers instead of ``in * out``.

Your tasks, in order (the checker tests them in this order):

1. ``__init__``: create ``A``, ``B`` and ``scaling``.
2. ``forward(x, W)``: the frozen path plus the low-rank path.
3. ``merge_weights(W)``: one dense weight that gives the same output.
4. ``num_parameters()`` and ``compression_ratio()``.

Check your work:  ``python exercises/check.py 9.5``
"""
import numpy as np


class LoRALayer:
    """The LoRA update for one frozen linear layer (the frozen ``W`` is passed in)."""

    def __init__(self, in_features, out_features, rank=8, alpha=16.0, rng=None):
        """Create the trainable factors.

        Attributes to set:
            in_features, out_features, rank, alpha   the arguments, as given
            scaling   ``alpha / rank``. Why divide by ``rank``: the update's size then
                      does not change when you try another rank, so the learning
                      rate can stay (Hu et al. 2021, §4.1).
            A         ``(rank, in_features)``, uniform in ``[-1/sqrt(in_features),
                      1/sqrt(in_features)]``: random, so that B's gradient is not
                      zero at the first step.
            B         ``(out_features, rank)``, all zeros: the update ``B @ A`` starts
                      at zero, so training starts exactly at the pretrained model.

        Use ``rng`` (a ``np.random.Generator``) for the random numbers.
        """
        rng = rng if rng is not None else np.random.default_rng(0)
        # BEGIN SOLUTION set in_features, out_features, rank, alpha, scaling, A (random) and B (zeros)
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        bound = 1.0 / np.sqrt(in_features)
        self.A = rng.uniform(-bound, bound, (rank, in_features))      # (r, in)
        self.B = np.zeros((out_features, rank))                        # (out, r)
        # END SOLUTION

    def forward(self, x, W):
        """``h = x @ W.T + scaling * (x @ A.T) @ B.T``.

        x: ``(seq, in)`` or ``(batch, seq, in)``; W: the frozen ``(out, in)`` weight.
        Returns ``(..., out)``. Use the *current* ``self.A`` and ``self.B`` (a test
        may assign a new ``B`` between calls).

        Hint: ``x @ A.T`` first gives ``(..., r)``: never build the ``(out, in)``
        matrix ``B @ A`` here, it costs ``out * in`` memory per call.
        """
        # BEGIN SOLUTION frozen path x @ W.T, plus scaling * (x @ A.T) @ B.T
        frozen = x @ W.T                                   # (..., out)
        h = x @ self.A.T                                   # (..., r)
        return frozen + self.scaling * (h @ self.B.T)      # (..., out)
        # END SOLUTION

    def merge_weights(self, W):
        """The merged weight ``W + scaling * B @ A`` ``(out, in)``.

        ``x @ merge_weights(W).T`` equals ``forward(x, W)``: after training, the
        update is folded in and inference costs nothing extra. Return a new
        array; do not modify ``W`` (it is the pretrained weight).
        """
        # BEGIN SOLUTION W plus the scaled product of the factors (a new array)
        return W + self.scaling * (self.B @ self.A)        # (out, in)
        # END SOLUTION

    def num_parameters(self):
        """Number of trainable numbers: ``A.size + B.size``."""
        # BEGIN SOLUTION count the elements of A and B
        return self.A.size + self.B.size
        # END SOLUTION

    def compression_ratio(self):
        """``num_parameters() / (in_features * out_features)``: LoRA's size relative to W."""
        # BEGIN SOLUTION trainable numbers divided by the size of W
        return self.num_parameters() / (self.in_features * self.out_features)
        # END SOLUTION


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 4))
    lora = LoRALayer(4, 6, rank=2, alpha=4.0)
    x = rng.standard_normal((3, 4))
    print("starts at the frozen layer:", np.allclose(lora.forward(x, W), x @ W.T))
    print("parameters:", lora.num_parameters(), "compression:", lora.compression_ratio())
