r"""Quantization-aware training (QAT): fake quantization with a straight-through estimator.

Two ways to end up with a model whose linear weights are stored in ``bits`` bits:

* **post-training quantization (PTQ)**: train in float, then round every weight
  (``quantize_weights``). The network never saw the rounding; at few bits the
  errors of many weights add up and the accuracy drops.
* **quantization-aware training (QAT)**: train *through* the rounding. Each
  ``FakeQuantLinear`` keeps a float "latent" weight ``W``, and its forward uses the
  rounded ``W_hat = fake_quantize(W)``, the very numbers the stored model will hold;
  the loss therefore measures the quantized model, and training moves ``W`` until the
  rounded model works (``convert`` then stores ``W_hat``).

The catch is the backward: rounding is a staircase, its derivative is 0 almost
everywhere, so the true gradient of the loss w.r.t. ``W`` is zero (except, through
the scale, at each row's largest entry) and almost nothing would train. The straight-through estimator (Bengio et al. 2013; the form used by
Jacob et al. 2018 for integer-only inference) pretends the rounding was the identity
on the way back::

    forward:   W_hat = s * round(W / s)        s = max_j |W_ij| / (2^(bits-1) - 1), per row
               y     = x @ W_hat.T + b
    backward:  dx    = dy @ W_hat              exact: the forward used W_hat
               dW    = dy^T x                  STE: dW_hat passed straight to W
               db    = sum(dy)                 exact

With absmax scales no weight is ever clipped (the largest maps to the top code), so
the usual STE mask for clipped values is all ones here; the scale ``s`` is treated
as a constant on the way back. ``tests/test_qat.py`` checks ``dx`` and ``db`` against
central differences of the fake-quantized layer, and ``dW`` against central differences
of the same layer with the rounding removed -- the surrogate the STE differentiates.
``qat_demo.py`` compares PTQ and QAT on the mini GPT.

The course text shows PyTorch's ``quantize_dynamic`` (PTQ) and ``prepare_qat`` (QAT);
``quantize_weights`` and ``prepare_qat`` / ``convert`` here are the same two steps,
with weights only (activations stay in float).
"""
from __future__ import annotations

import numpy as np

from nn import Linear, Module, set_submodule
from quantization import DEFAULT_TARGET_MODULES, _check_bits, dequantize_absmax, quantize_absmax
from targets import find_targets


def fake_quantize(weight, bits: int) -> np.ndarray:
    """Round ``weight (out, in)`` to ``bits``-bit symmetric codes, one absmax scale per
    output row, and return the dequantized floats (same shape and dtype)."""
    q, scale = quantize_absmax(weight, bits=bits, axis=0)  # codes (out, in), scale (out, 1)
    return dequantize_absmax(q, scale).astype(np.asarray(weight).dtype)


class FakeQuantLinear(Module):
    """A ``Linear`` that trains a float weight but computes with its ``bits``-bit rounding.

    ``weight`` ``(out, in)`` and ``bias`` ``(out,)`` are ordinary trainable parameters
    (the latent weights); ``forward`` rounds ``weight`` afresh every call.
    """

    param_names = ("weight", "bias")

    def __init__(self, weight, bias, bits: int):
        super().__init__()
        self.bits = _check_bits(bits)
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: Linear, bits: int) -> "FakeQuantLinear":
        """Share the ``Linear``'s arrays (no copy): QAT goes on from its current weights."""
        if not isinstance(linear, Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, bits)

    def forward(self, x):
        self.x = x                                          # (..., in)
        self.w_hat = fake_quantize(self.weight, self.bits)  # (out, in), what is stored later
        y = x.reshape(-1, self.in_features) @ self.w_hat.T  # (N, out)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features)  # (..., out)

    def backward(self, dout):
        d2 = dout.reshape(-1, self.out_features)            # (N, out)
        if self.wants_grad("weight"):                       # STE: d(W_hat)/dW taken as 1
            self._accumulate("weight", d2.T @ self.x.reshape(-1, self.in_features))  # (out, in)
        if self.wants_grad("bias"):
            self._accumulate("bias", d2.sum(0))             # (out,)
        return (d2 @ self.w_hat).reshape(*dout.shape[:-1], self.in_features)  # (..., in)

    def to_linear(self) -> Linear:
        """A plain ``Linear`` holding the rounded weight: the deployed layer."""
        layer = Linear(self.in_features, self.out_features, bias=self.bias is not None,
                       dtype=self.weight.dtype)
        layer.weight = fake_quantize(self.weight, self.bits)
        layer.bias = None if self.bias is None else self.bias.copy()
        return layer


def _linear_targets(model, target_modules):
    targets = DEFAULT_TARGET_MODULES if target_modules is None else target_modules
    return find_targets(model, targets, layer_types=(Linear,))


def prepare_qat(model, bits: int, target_modules=None):
    """Swap the targeted ``Linear`` modules (default: every linear of the blocks) for
    ``FakeQuantLinear`` in place and return the model. Embeddings and the tied head stay
    float, as in QLoRA. ``bits`` is checked before anything changes."""
    _check_bits(bits)
    for name in _linear_targets(model, target_modules):
        set_submodule(model, name, FakeQuantLinear.from_linear(model.get_submodule(name), bits))
    return model


def convert(model):
    """After QAT: every ``FakeQuantLinear`` becomes a ``Linear`` holding its rounded weight."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not names:
        raise ValueError("convert found no FakeQuantLinear: call prepare_qat(model, bits) first")
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_linear())
    return model


def quantize_weights(model, bits: int, target_modules=None):
    """Post-training quantization: round the targeted ``Linear`` weights in place, the same
    rounding ``convert`` stores, so PTQ and QAT models differ only in how they were trained."""
    _check_bits(bits)
    for name in _linear_targets(model, target_modules):
        layer = model.get_submodule(name)
        layer.weight = fake_quantize(layer.weight, bits)
    return model
