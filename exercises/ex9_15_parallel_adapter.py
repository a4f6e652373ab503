# Exercise 9.15: your file to edit. Generated from solutions/ex9_15_parallel_adapter.py by make_stubs.py (body sha256 943185187149).
"""Exercise 9.15 (suggested) -- a parallel adapter (He et al. 2022).

A serial adapter (exercise 9.7) reads the sublayer's *output*; a parallel one
sits *beside* the sublayer, reads the same input, and its output is added::

    serial:    y = adapter(sublayer(x))          = s + f(s W_down) W_up,  s = sublayer(x)
    parallel:  y = sublayer(x) + scale * f(x W_down) W_up

He et al. (2022, §4) found the parallel form (with a scale such as 4) works
better, and it does not lengthen the chain of sequential operations. With
``W_up = 0`` it starts exactly at the frozen sublayer, like the serial one.

Here the adapter does not own the sublayer: ``forward(x, sublayer_out)`` is
given both, and ``backward`` returns the two gradients the caller needs::

    x ──┬── sublayer (frozen, the caller's) ──> sublayer_out ──┐
        └── W_down ─> f ─> W_up ─> * scale ────────────────── (+)──> y

Your tasks: ``__init__``, ``forward``, ``backward``. Activations are given.

Check your work:  ``python exercises/check.py 9.15``
"""
import numpy as np

ACTIVATIONS = {
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(z.dtype)),
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
}


class ParallelAdapter:
    def __init__(self, d_model, bottleneck_dim, activation="relu", scale=1.0, rng=None):
        """Attributes: ``d_model``, ``bottleneck_dim``, ``scale``, ``activation`` and
        ``W_down (d, b)`` uniform in +-1/sqrt(d), ``W_up (b, d)`` zeros."""
        rng = rng if rng is not None else np.random.default_rng(0)
        raise NotImplementedError("Exercise 9.15: the sizes, a random down-projection and a zero up-projection")

    def forward(self, x, sublayer_out):
        """``sublayer_out + scale * f(x @ W_down) @ W_up``; both inputs ``(..., d)``."""
        raise NotImplementedError("Exercise 9.15: the branch reads x (not sublayer_out); cache x and the pre-activation")

    def backward(self, grad_output):
        """Return ``(grad_x_branch, grad_sublayer_out)`` and set ``W_down_grad``, ``W_up_grad``.

        ``grad_x_branch`` is the branch's share of dL/dx only; the caller adds the
        sublayer's own share (``sublayer.backward(grad_sublayer_out)``).
        """
        raise NotImplementedError("Exercise 9.15: the sublayer output passes the gradient through; walk the branch back")


def parallel_block(sublayer, adapter, x):
    """Given: how a block uses it (``sublayer`` is any module with forward/backward)."""
    return adapter.forward(x, sublayer.forward(x))


def parallel_block_backward(sublayer, adapter, grad_output):
    """Given: dL/dx through both paths."""
    grad_x_branch, grad_sub = adapter.backward(grad_output)
    return sublayer.backward(grad_sub) + grad_x_branch
