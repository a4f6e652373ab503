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
    # BEGIN SOLUTION the L2 norm of every row
    return np.linalg.norm(W0, axis=1)
    # END SOLUTION


def dora_forward(x, W0, A, B, m, scaling):
    """``x (..., in)`` -> ``(y (..., out), cache)``; ``cache`` is a dict holding at
    least ``"V"``, ``"norm"`` and ``"W_dora"`` (the checker compares them) plus
    whatever your backward needs."""
    # BEGIN SOLUTION V, its row norms, the rescaled weight, the output; keep them in cache
    V = W0 + scaling * B @ A                                # (out, in)
    norm = np.linalg.norm(V, axis=1)                        # (out,)
    W_dora = (m / norm)[:, None] * V                        # (out, in)
    y = x @ W_dora.T                                        # (..., out)
    cache = {"x": x, "A": A, "B": B, "m": m, "scaling": scaling,
             "V": V, "norm": norm, "W_dora": W_dora}
    return y, cache
    # END SOLUTION


def dora_backward(grad_output, cache, detach_norm=False):
    """Returns ``(grad_m (out,), grad_A (r, in), grad_B (out, r), grad_x (..., in))``.

    ``detach_norm=False``: the exact gradient. ``True``: ``norm`` treated as a
    constant (the paper's memory-saving approximation; only grad_A and grad_B change).
    """
    # BEGIN SOLUTION G = dy^T x; grad_m along V_hat; dV (exact or detached); then A, B, x
    x, A, B, m, s = cache["x"], cache["A"], cache["B"], cache["m"], cache["scaling"]
    V, norm, W_dora = cache["V"], cache["norm"], cache["W_dora"]
    d_out, d_in = V.shape
    G = grad_output.reshape(-1, d_out).T @ x.reshape(-1, d_in)     # (out, in)  dL/dW_dora
    V_hat = V / norm[:, None]                                      # (out, in)
    grad_m = np.sum(G * V_hat, axis=1)                             # (out,)
    if detach_norm:
        dV = (m / norm)[:, None] * G                               # (out, in)
    else:
        dV = (m / norm)[:, None] * (G - grad_m[:, None] * V_hat)   # (out, in)
    grad_B = s * dV @ A.T                                          # (out, r)
    grad_A = s * B.T @ dV                                          # (r, in)
    grad_x = grad_output @ W_dora                                  # (..., in)
    return grad_m, grad_A, grad_B, grad_x
    # END SOLUTION
