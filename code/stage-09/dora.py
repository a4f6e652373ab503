"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024).

DoRA splits a weight into a magnitude and a direction (§3) and lets LoRA
move only the direction, while a learned per-row magnitude ``m`` rescales it::

    V  = W + s B A                          (out, in)   LoRA's adapted weight
    W' = (m / ||V||_row)[:, None] * V       (out, in)   each output row gets length m_i
    y  = x W'^T + b

``m`` starts at the row norms of the pretrained weight, ``||W[i, :]||``, and ``B``
at zero, so ``W' = W`` and the model starts exactly at the base model.

Written through the ``LoRALayer`` hooks a ``LoRALinear`` calls, with
``g = m / ||V||`` and ``base_out = x W^T + b`` from the frozen layer::

    y = base_out + (g - 1) * (base_out - b) + g * delta(x)        delta = s x A^T B^T

(at the start ``g - 1 = 0`` and ``delta = 0`` exactly, so ``y == base_out`` bit for bit).

The norm is *detached* in backward (§4.3): ``||V||`` is treated as a constant, so
the gradient flows to ``A`` and ``B`` only through ``g * delta`` and to ``m``
through ``g``. This saves the ``(out, in)`` gradient of the norm (memory on big
layers) at a negligible cost in accuracy. ``detach_norm=False`` computes the exact
gradient instead; the tests check both against central differences (the
detached one against a loss whose norm is held fixed, via ``fixed_norm``).
"""
from __future__ import annotations

import numpy as np

from lora import LoRALayer


def row_norm(W):
    """``||W[i, :]||`` for each output row: ``(out, in)`` -> ``(out,)``."""
    return np.linalg.norm(W, axis=1)


class DoRALayer(LoRALayer):
    """``LoRALayer`` plus a trainable magnitude ``magnitude (out,)``.

    Constructed with ``LoRALayer``'s arguments, then ``init_magnitude(W)`` with the
    frozen weight (``peft_methods.new_lora_layer`` does both for
    ``LoraConfig(use_dora=True)``). ``fixed_norm`` (``None`` normally) replaces
    ``||V||`` by a given constant; it exists so a test can build the loss whose
    exact gradient is the detached one.
    """

    param_names = ("A", "B", "magnitude")

    def __init__(self, *args, detach_norm=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.magnitude = None
        self.detach_norm = detach_norm
        self.fixed_norm = None
        self._layer = None

    def init_magnitude(self, W):
        """``m = ||W[i, :]||``: the adapted weight starts equal to ``W``."""
        W = np.asarray(W)
        if W.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {W.shape} must be (out, in) = "
                             f"{(self.out_features, self.in_features)}")
        self.magnitude = row_norm(W).astype(self.A.dtype)  # (out,)

    def direction(self, W):
        """``(V, ||V||_row)`` with ``V = W + s B A``: ``(out, in)``, ``(out,)``."""
        V = W + self.delta_weight().astype(W.dtype)         # (out, in)
        norm = row_norm(V) if self.fixed_norm is None else self.fixed_norm
        return V, norm

    # ---- the hooks LoRALinear calls ----------------------------------------
    def adapt(self, x, base_out, layer):
        """``g * (x V^T) + b`` with ``V = W + s B A``, ``g = m / ||V||`` (= ``base_out +
        (g - 1) (base_out - b) + g delta(x)``, computed as ``x V^T = (base_out - b) + delta``)."""
        self._layer = layer
        return self._forward(x, base_out, layer.weight, layer.bias)

    def _forward(self, x, base_out, W, b):
        if self.magnitude is None:
            raise ValueError("DoRALayer.magnitude is not set: call init_magnitude(W) with the "
                             "frozen weight before the first forward")
        self.V, self.norm = self.direction(W)               # (out, in), (out,)
        self.g = self.magnitude / self.norm                 # (out,)
        delta = self.delta(x)                               # (..., out)
        z = base_out + delta if b is None else base_out - b  # x W^T (a fresh array either way)
        if b is not None:
            z += delta                                      # x W^T + x (s B A)^T
        self.z = z                                          # (..., out)  x V^T
        y = z * self.g                                      # g * x V^T ...
        if b is not None:
            y += b                                          # ... + b
        return y

    def adapt_backward(self, dout):
        """``(dL/d base_out, dx through the LoRA path)``; fills ``A/B/magnitude`` grads.

        Forward was ``y = g * z + b`` with ``z = x V^T``: ``dz = g * dout``;
        ``dm = sum(dout * z) / ||V||``; the base layer's bias gets ``dout`` in total,
        of which ``g * dout`` arrives through the base layer -- the rest is added here.
        """
        out = self.out_features
        g, d2 = self.g, dout.reshape(-1, out)                # (out,), (N, out)
        dg = np.einsum("no,no->o", d2, self.z.reshape(-1, out))   # (out,)  dL/dg
        if self.wants_grad("magnitude"):
            self._accumulate("magnitude", dg / self.norm)
        base = getattr(self._layer, "base_layer", None)
        if base is not None and base.wants_grad("bias"):   # bias trains (LoRA bias="all")
            base._accumulate("bias", d2.sum(0) * (1.0 - g))
        dz = dout * g                                       # (..., out)
        dx = self.delta_backward(dz)                        # A_grad, B_grad through g * delta
        if not self.detach_norm:
            self._norm_backward(-dg * self.magnitude / self.norm**2)
        return dz, dx

    def _norm_backward(self, dnorm):
        """Exact mode: ``d||V_i|| / dV_i = V_i / ||V_i||``, then ``V = W + s B A`` into A, B."""
        dV = (dnorm / self.norm)[:, None] * self.V          # (out, in)
        if self.wants_grad("B"):
            self._accumulate("B", self.scaling * (dV @ self.A.T))   # (out, r)
        if self.wants_grad("A"):
            self._accumulate("A", self.scaling * (self.B.T @ dV))   # (r, in)

    # ---- the course's standalone form ----------------------------------------
    def forward(self, x, W):
        """``x W'^T`` for a frozen ``(out, in)`` weight ``W`` passed in (no bias)."""
        self.W, self._layer = W, None
        return self._forward(x, x @ W.T, W, None)

    def backward(self, grad_output):
        """dx; *sets* the gradients of ``A``, ``B`` and ``magnitude`` (as ``LoRALayer.backward``)."""
        self.clear_grads()
        d_base, dx = self.adapt_backward(grad_output)
        return d_base @ self.W + dx

    # ---- merging ---------------------------------------------------------
    def merge_scale(self, W):
        """Pure: the row scale ``g = m / ||W + s B A||`` (out,) a merge of ``W`` applies."""
        _, norm = self.direction(W)
        return (self.magnitude / norm).astype(W.dtype)

    def merge_weights(self, W):
        """Pure: ``W' = (m / ||W + s B A||)[:, None] * (W + s B A)``; ``W`` is not changed.

        Unlike LoRA's, this merge cannot be undone from ``W'`` alone (every row of
        ``W'`` has length ``m``, whatever ``||V||`` was): keep ``merge_scale(W)`` and
        pass it to ``unmerge_weights``. Nothing is stored here, so merging twice (or
        merging another weight in between) cannot corrupt a later unmerge."""
        V, norm = self.direction(W)
        return (self.magnitude / norm).astype(W.dtype)[:, None] * V

    def unmerge_weights(self, W_merged, scale=None):
        """Pure: ``W = W' / g - s B A``, with ``g = merge_scale(W)`` kept from the merge."""
        if scale is None:
            raise ValueError("DoRA's unmerge_weights needs the scale of the merge: pass "
                             "scale=merge_scale(W) computed on the weight before the previous "
                             "merge_weights call")
        return W_merged / scale[:, None] - self.delta_weight().astype(W_merged.dtype)
