# Exercise 9.7: your file to edit. Generated from solutions/ex9_7_adapter.py by make_stubs.py (body sha256 f4d283ead30a).
"""Exercise 9.7 -- a bottleneck adapter (Houlsby et al. 2019), forward and backward.

An adapter is a small residual MLP inserted after a frozen sublayer::

    x ──┬──────────────────────────────────────────────┐
        └── x @ W_down ──> f ──> @ W_up ────────────── (+)──> y = x + f(x W_down) W_up
            (d, b)                (b, d)          b = bottleneck_dim << d = d_model

Only ``W_down`` and ``W_up`` are trained: ``2 * d * b`` numbers. Note the weights
are ``(in, out)`` here, applied as ``x @ W`` (the course writes adapters this way).

Your tasks: ``__init__``, ``forward``, ``backward``, ``num_parameters``.
The activations and their derivatives are given below (GELU in its tanh form,
as GPT-2 and the library use).

Check your work:  ``python exercises/check.py 9.7``
"""
import numpy as np


def relu(z):
    return np.maximum(z, 0.0)


def relu_grad(z):
    """d relu / dz (taken as 0 at z = 0)."""
    return (z > 0).astype(z.dtype)


def gelu(z):
    """GELU, tanh approximation: ``0.5 z (1 + tanh(c (z + 0.044715 z^3)))``."""
    return 0.5 * z * (1.0 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z * z * z)))


def gelu_grad(z):
    """d gelu / dz for the tanh form."""
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (z + 0.044715 * z * z * z))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * z * z)


ACTIVATIONS = {"relu": (relu, relu_grad), "gelu": (gelu, gelu_grad)}


class Adapter:
    """``y = x + f(x @ W_down) @ W_up`` for ``x`` of shape ``(..., d_model)``."""

    def __init__(self, d_model, bottleneck_dim=64, activation="relu", rng=None):
        """Attributes to set:

            d_model, bottleneck_dim, activation     the arguments
            W_down  ``(d_model, bottleneck_dim)``, uniform in +-1/sqrt(d_model)
            W_up    ``(bottleneck_dim, d_model)``, zeros: the adapter then starts as
                    the identity, so the adapted model starts exactly at the
                    pretrained one (Houlsby et al. 2019, §2.1, use a near-zero init
                    for this reason).

        Raise ``ValueError`` for an activation other than ``"relu"`` or ``"gelu"``.
        """
        rng = rng if rng is not None else np.random.default_rng(0)
        raise NotImplementedError("Exercise 9.7: validate the activation, then create W_down (random) and W_up (zeros)")

    def forward(self, x):
        """``x (..., d)`` -> ``x + f(x @ W_down) @ W_up`` ``(..., d)``.

        Keep on ``self`` what ``backward`` needs (the input, the pre-activation).
        """
        raise NotImplementedError("Exercise 9.7: down-project, activate, up-project, add the residual; cache x and z")

    def backward(self, grad_output):
        """Given ``dL/dy (..., d)``: set ``self.W_down_grad`` ``(d, b)`` and
        ``self.W_up_grad`` ``(b, d)`` (sums over all positions), return ``dL/dx (..., d)``.

        ``dL/dx`` has two parts: the residual path passes ``grad_output`` through
        unchanged, and the bottleneck path adds its own share.
        """
        raise NotImplementedError("Exercise 9.7: walk y = x + f(z) @ W_up, z = x @ W_down backwards; remember the residual")

    def num_parameters(self):
        """``W_down.size + W_up.size``."""
        raise NotImplementedError("Exercise 9.7: count the elements of both projections")
