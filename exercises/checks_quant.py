"""Checkers for quantization: 9.12 QLoRA basics, 9.18 4-bit LoRA on the mini GPT,
9.21 NF4 blockwise quantization. References: ``quantization.py`` (affine 4-bit,
``QuantizedLinear``, ``quantize_model``) and ``nf4.py`` (``quantize_nf4``, packing).
"""
from __future__ import annotations

import numpy as np

from checking import (expect, expect_close, expect_equal, expect_grad, expect_number,
                      expect_shape, expect_unchanged, randn, rng_for)
from checks_lora import lib_lora
from registry import exercise

import quantization


# ------------------------------------------------------------------ 9.12
def _expect_quantized(label, mod, tensor):
    q, scale, zp = mod.quantize_to_4bit(tensor.copy())
    q_ref, scale_ref, zp_ref = quantization.quantize_to_4bit(tensor)
    q = np.asarray(q)
    expect(np.issubdtype(q.dtype, np.integer), f"{label}: the codes should be integers "
           f"(uint8), got dtype {q.dtype}")
    expect_number(f"{label}: scale", scale, float(scale_ref),
                  context=" (scale = (hi - lo) / 15 with lo = min(x.min(), 0), hi = max(x.max(), 0))")
    expect_number(f"{label}: zero_point", zp, float(zp_ref), context=" (zero_point = round(-lo / scale))")
    expect(q.min() >= 0 and q.max() <= 15, f"{label}: codes must lie in 0..15, yours span "
           f"{q.min()}..{q.max()} (clip them)")
    expect_close(f"{label}: codes", q, q_ref)
    back = np.asarray(mod.dequantize_4bit(q_ref, scale_ref, zp_ref), dtype=float)
    expect_close(f"{label}: dequantize_4bit", back, quantization.dequantize_4bit(q_ref, scale_ref, zp_ref),
                 mistakes=[(float(scale_ref) * (q_ref - np.uint8(zp_ref)).astype(float),
                            "uint8 arithmetic wrapped around: convert q to float before "
                            "subtracting the zero point")])
    err = np.abs(back - tensor).max()
    expect(err <= float(scale_ref) / 2 + 1e-12, f"{label}: round-trip error {err:.3g} exceeds scale / 2")


@exercise("9.12", "ex9_12_qlora_basics", "QLoRA basics: 4-bit quantization, a dequantizing layer",
          "course")
def check_qlora_basics(mod, t):
    rng = rng_for(912)
    for label, tensor in [("a random (6, 5) tensor", randn(rng, 6, 5)),
                          ("an all-positive tensor", np.abs(randn(rng, 4, 4)) + 0.5),
                          ("an all-negative tensor", -np.abs(randn(rng, 7)) - 0.1),
                          ("an all-zero tensor", np.zeros((3, 3)))]:
        _expect_quantized(label, mod, tensor)
    t.ok("quantize_to_4bit / dequantize_4bit match quantization.py; error <= scale / 2")

    d_in, d_out, r, alpha = 8, 6, 3, 6.0
    W, bias = randn(rng, d_out, d_in, scale=0.4), randn(rng, d_out)
    layer = mod.QLoRALinear(W.copy(), bias.copy(), rank=r, alpha=alpha)
    for name, value in vars(layer).items():
        if isinstance(value, np.ndarray) and value.shape == W.shape and np.issubdtype(value.dtype, np.floating):
            expect(False, f"self.{name} holds a float ({d_out}, {d_in}) array: QLoRA keeps only the "
                   f"4-bit codes of the frozen weight and dequantizes them in forward")
    q_ref, s_ref, z_ref = quantization.quantize_to_4bit(W)
    expect_close("qweight", layer.qweight, q_ref)
    W_deq = quantization.dequantize_4bit(q_ref, s_ref, z_ref)
    expect_close("dequantized_weight()", layer.dequantized_weight(), W_deq)
    expect_shape("A", layer.A, (r, d_in))
    expect(not np.any(layer.B), "B must start at zero")
    t.ok("QLoRALinear stores only the 4-bit codes (no float weight); LoRA factors initialised")

    layer.A, layer.B = randn(rng, r, d_in, scale=0.5), randn(rng, d_out, r, scale=0.5)
    ref = lib_lora(layer.A, layer.B, alpha)
    x = randn(rng, 2, 4, d_in)
    float_weight = ref.forward(x, W) + bias
    expected = ref.forward(x, W_deq) + bias                 # (ref keeps W_deq for backward)
    expect_close("forward(x)", layer.forward(x.copy()), expected, mistakes=[
        (float_weight, "it matches the float weight, not the dequantized 4-bit one"),
        (expected - bias, "the bias is missing")])
    G = randn(rng, 2, 4, d_out)
    dx_ref = ref.backward(G)
    expect_close("backward's return value dL/dx", layer.backward(G.copy()), dx_ref,
                 mistakes=[(dx_ref - G @ W_deq, "dL/dx misses the frozen path grad_output @ W_deq")])
    expect_close("A_grad", layer.A_grad, ref.A_grad)
    expect_close("B_grad", layer.B_grad, ref.B_grad)
    loss = lambda: float(np.sum(layer.forward(x) * G))  # noqa: E731
    for name, arr in [("A_grad", layer.A), ("B_grad", layer.B)]:
        layer.forward(x)
        layer.backward(G)
        expect_grad(name, getattr(layer, name), loss, arr)
    layer.forward(x)
    expect_grad("dL/dx", layer.backward(G), loss, x)
    t.ok("forward and backward through the dequantized weight match the library and central "
         "differences")
