# Exercise 9.20: your file to edit. Generated from solutions/ex9_20_dora_magnitude.py by make_stubs.py (body sha256 10ca74d538da).
"""Exercise 9.20 (ours) -- DoRA's magnitude and direction gradients.

DoRA (Liu et al. 2024) writes each output row of a weight as a length times a
unit direction, and lets LoRA move only the direction while a learned vector
``m (out,)`` sets the lengths::

    V      = W0 + scaling * B @ A          (out, in)   LoRA's adapted weight
    norm   = ||V[i, :]|| for each row i    (out,)
    W_dora = (m / norm)[:, None] * V       (out, in)   row i has length m[i]
    y      = x @ W_dora.T                  (..., out)

With ``m = ||W0[i, :]||`` and ``B = 0`` the layer starts exactly at ``W0``.

The backward pass, one named intermediate at a time (makemore style). Let
``G = dL/dW_dora = sum over positions of grad_output^T x`` ``(out, in)``. Then

* the magnitude:  ``W_dora[i] = m[i] * V_hat[i]`` with ``V_hat = V / norm``, so
  ``grad_m[i] = sum_j G[i, j] * V_hat[i, j]``  -- the component of ``G`` along
  the direction;
* the direction (exact): ``dV[i] = (m[i] / norm[i]) * (G[i] - grad_m[i] * V_hat[i])``
  -- only the part of ``G`` *perpendicular* to the direction moves it (changing
  the length of ``V`` does not change ``V_hat``);
* then ``V = W0 + s B A`` gives ``grad_B = s dV A^T`` and ``grad_A = s B^T dV``;
* ``grad_x = grad_output @ W_dora``.

The DoRA paper (§4.3) saves memory by treating ``norm`` as a constant in
backward ("detached"): then ``dV = (m / norm)[:, None] * G``. Implement both; the
checker compares each with the library's ``DoRALayer`` and with central differences.

Check your work:  ``python exercises/check.py 9.20``
"""
import numpy as np


def init_magnitude(W0):
    """``m (out,)``: the length of each row of the frozen ``W0 (out, in)``."""
    raise NotImplementedError("Exercise 9.20: the L2 norm of every row")


def dora_forward(x, W0, A, B, m, scaling):
    """``x (..., in)`` -> ``(y (..., out), cache)``; ``cache`` is a dict holding at
    least ``"V"``, ``"norm"`` and ``"W_dora"`` (the checker compares them) plus
    whatever your backward needs."""
    raise NotImplementedError("Exercise 9.20: V, its row norms, the rescaled weight, the output; keep them in cache")


def dora_backward(grad_output, cache, detach_norm=False):
    """Returns ``(grad_m (out,), grad_A (r, in), grad_B (out, r), grad_x (..., in))``.

    ``detach_norm=False``: the exact gradient. ``True``: ``norm`` treated as a
    constant (the paper's memory-saving approximation; only grad_A and grad_B change).
    """
    raise NotImplementedError("Exercise 9.20: G = dy^T x; grad_m along V_hat; dV (exact or detached); then A, B, x")
