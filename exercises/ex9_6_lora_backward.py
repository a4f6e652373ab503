# Exercise 9.6: your file to edit. Generated from solutions/ex9_6_lora_backward.py by make_stubs.py (body sha256 f46693518b3d).
"""Exercise 9.6 -- the backward pass of LoRA.

The LoRA branch of a layer computes, for an input ``x`` of shape ``(..., in)``::

    h = x @ A.T                  (..., r)      A: (r, in)
    y = scaling * h @ B.T        (..., out)    B: (out, r)

Given ``grad_output = dL/dy`` you compute ``dL/dA``, ``dL/dB`` and ``dL/dx``.
The frozen path ``x @ W.T`` is not your concern here: it has no trainable
parameter, and its share of ``dL/dx`` (``grad_output @ W``) is added by the layer.

A trap worth knowing before you write your own gradient check: at
initialisation ``B = 0``, so ``dL/dA = 0`` whatever your formula says -- a wrong
backward passes a check done at ``B = 0``. Always check with a random ``B``
(the checker does, with a random upstream gradient, in float64).

Check your work:  ``python exercises/check.py 9.6``
"""
import numpy as np


def lora_forward(x, A, B, scaling):
    """The LoRA branch ``scaling * (x @ A.T) @ B.T`` (given, to test your backward)."""
    return scaling * (x @ A.T) @ B.T


def lora_backward(grad_output, x, A, B, scaling):
    """Gradients of the LoRA branch ``y = scaling * (x @ A.T) @ B.T``.

    Args:
        grad_output: ``(..., out)``, dL/dy; e.g. ``(batch, seq, out)`` or ``(seq, out)``.
        x:           ``(..., in)``, the input the forward pass saw.
        A:           ``(r, in)``.
        B:           ``(out, r)``.
        scaling:     ``alpha / r``.

    Returns:
        ``(grad_A, grad_B, grad_x)`` with shapes ``(r, in)``, ``(out, r)`` and
        ``x.shape``. ``A`` and ``B`` are shared by every position of every
        sequence, so their gradients are *sums* over all leading axes.

    Hints (walk the forward backwards, one named intermediate at a time):
        * recompute ``h = x @ A.T``;
        * ``y = scaling * h @ B.T``  gives  ``grad_B = scaling * dy^T h`` and
          ``dh = scaling * dy @ B``;
        * ``h = x @ A.T``  gives  ``grad_A = dh^T x``  and  ``grad_x = dh @ A``;
        * ``t.reshape(-1, t.shape[-1])`` flattens the leading axes, so one
          matrix product sums over batch and sequence at once.
    Do not modify ``grad_output`` or ``x`` in place.
    """
    raise NotImplementedError("Exercise 9.6: recompute h = x @ A.T, then walk y = scaling * h @ B.T backwards (see the hints)")


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    x, A, B = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4)), rng.standard_normal((5, 2))
    grad_A, grad_B, grad_x = lora_backward(rng.standard_normal((2, 3, 5)), x, A, B, 2.0)
    print("shapes:", grad_A.shape, grad_B.shape, grad_x.shape)
