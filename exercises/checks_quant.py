"""Checkers for quantization: 9.12 QLoRA basics, 9.18 4-bit LoRA on the mini GPT,
9.21 NF4 blockwise quantization. References: ``quantization.py`` (affine 4-bit,
``QuantizedLinear``, ``quantize_model``) and ``nf4.py`` (``quantize_nf4``, packing).
"""
from __future__ import annotations

import numpy as np

from checking import (ExerciseFailure, expect, expect_close, expect_equal, expect_grad, expect_number,
                      expect_raises, expect_shape, expect_tuple, expect_unchanged, randn, rng_for)
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
            codes = np.all(value == np.round(value)) and value.min() >= 0 and value.max() <= 15
            expect(codes, f"self.{name} holds a float ({d_out}, {d_in}) array: QLoRA keeps only the "
                   f"4-bit codes of the frozen weight and dequantizes them in forward")
            expect(False, f"self.{name} holds the codes as floats ({value.dtype}): store them as "
                   f"uint8, or the 4-bit layer takes more memory than the float one")
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


# ------------------------------------------------------------------ 9.18
@exercise("9.18", "ex9_18_lora_4bit", "4-bit LoRA (QLoRA) on the whole mini GPT", "suggested")
def check_lora_4bit(mod, t):
    from checking import tiny_gpt
    from nf4 import quantize_nf4
    from peft_methods import LoraMethod
    from peft_model import LoraConfig, get_peft_model
    from quantization import QuantizedLinear, quantize_model
    rng = rng_for(918)
    r, alpha, targets = 2, 4.0, ("q_proj", "v_proj", "fc2")
    model = tiny_gpt(6, well_scaled=True)
    layers = mod.prepare_4bit_lora(model, targets, rank=r, alpha=alpha, rng=np.random.default_rng(1))
    paths = [f"layers.{i}.{'mlp' if n == 'fc2' else 'self_attn'}.{n}" for i in range(2) for n in targets]
    expect_equal("sorted(prepare_4bit_lora(...))", sorted(layers), sorted(paths))
    for i in range(2):
        for sub, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")), ("mlp", ("fc1", "fc2"))):
            for n in names:
                m = model.get_submodule(f"layers.{i}.{sub}.{n}")
                base = getattr(m, "base_layer", m)
                expect(isinstance(base, QuantizedLinear), f"layers.{i}.{sub}.{n} should be (or wrap) a "
                       f"QuantizedLinear, found {type(base).__name__}: quantize every block linear")
                expect((m is layers.get(f"layers.{i}.{sub}.{n}")) == (n in targets),
                       f"layers.{i}.{sub}.{n}: {'wrap it with LoRA' if n in targets else 'not a target'}")
    trainable = [n for n, _ in model.named_parameters(trainable_only=True)]
    expect(all(".lora." in n for n in trainable), "only the LoRA factors may train; also trainable: "
           + ", ".join(n for n in trainable if ".lora." not in n)[:200])
    t.ok("every block linear is 4-bit; the targets are wrapped with LoRA; only A and B train")

    ref = get_peft_model(quantize_model(tiny_gpt(6, well_scaled=True), blocksize=64),
                         LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets)))
    for p in paths:
        mine, theirs = layers[p].lora, ref.base_model.get_submodule(p).lora
        mine.B[...] = randn(rng, *mine.B.shape, scale=0.5)
        theirs.A[...], theirs.B[...] = mine.A, mine.B
    tokens = rng.integers(0, 11, (2, 5))
    expected = ref(tokens)
    expect_close("the model's logits", model(tokens), expected,
                 context=" (compared with quantize_model + get_peft_model)")
    dlogits = randn(rng, *expected.shape)
    ref.zero_grad()
    ref.backward(dlogits)
    model.zero_grad()
    model(tokens)
    model.backward(dlogits)
    for p in paths:
        expect_close(f"{p}.lora.A_grad", layers[p].lora.A_grad, ref.base_model.get_submodule(p).lora.A_grad)
    t.ok("logits and LoRA gradients match the library's QLoRA model")

    codes = {p: layers[p].base_layer.quant_state.packed.copy() for p in paths}
    before = {p: (layers[p].lora.A.copy(), layers[p].lora.B.copy()) for p in paths}
    mod.sgd_step(layers, 0.1)
    for p in paths:
        lora = layers[p].lora
        expect_close(f"{p}.lora.A after sgd_step", lora.A, before[p][0] - 0.1 * lora.A_grad)
        expect_close(f"{p}.lora.B after sgd_step", lora.B, before[p][1] - 0.1 * lora.B_grad)
        expect_unchanged(f"the 4-bit codes of {p}", codes[p], layers[p].base_layer.quant_state.packed)
    t.ok("sgd_step updates A and B only; the 4-bit codes are unchanged")

    for p in paths:
        w = layers[p]
        expect_close(f"merge_to_float({p})", mod.merge_to_float(w),
                     LoraMethod().merge_and_unload_module(w).weight)
    w = layers[paths[0]]
    w.lora.B[...] *= 0.01                                   # a small update, as after short training
    merged = w.weight + w.lora.delta_weight()
    err = np.linalg.norm(quantize_nf4(merged, blocksize=64).dequantize(np.float64) - merged)
    got = mod.requantization_error(w, blocksize=64)
    expect(isinstance(got, tuple) and len(got) == 2, "requantization_error must return "
           "(update_norm, error_norm)")
    expect_number("update_norm", got[0], float(np.linalg.norm(w.lora.delta_weight())))
    expect_number("error_norm", got[1], float(err), rtol=1e-6)
    t.ok(f"merge_to_float; requantization_error (NF4 round-trip error {err:.3g} against an "
         f"update of norm {got[0]:.3g}: merging into 4 bits can erase what was learned)")


# ------------------------------------------------------------------ 9.21
def nf4_vs_int4_error(nf4_roundtrip=None):
    """Mean |error| of NF4 and of uniform symmetric int4, blocks of 64, on 256 x 256 N(0, 1)
    weights (the numbers ``answers.md`` quotes and the 9.21 checker prints)."""
    import nf4
    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    if nf4_roundtrip is None:
        nf4_roundtrip = lambda v: nf4.quantize_nf4(v, 64, double_quant=False).dequantize()  # noqa: E731
    err_nf4 = float(np.abs(np.asarray(nf4_roundtrip(w.copy()), dtype=np.float64) - w).mean())
    err_int4 = float(np.abs(quantization.blockwise_absmax_roundtrip(w, 4, 64) - w).mean())
    return err_nf4, err_int4


def _expect_blocks(W, bs, codes, absmax, codes_ref, absmax_ref):
    """Compare block by block; the first wrong block gets the most specific hint."""
    import nf4
    flat = W.reshape(-1)
    mid = (nf4.NF4_CODEBOOK[:-1] + nf4.NF4_CODEBOOK[1:]) / 2
    by_columns = np.abs(W.T).reshape(-1, bs).max(1)
    for b in range(absmax_ref.size):
        block = slice(b * bs, (b + 1) * bs)
        where = f"block {b} (flat values {b * bs}..{(b + 1) * bs - 1})"
        if not np.allclose(absmax[b], absmax_ref[b], rtol=1e-6, atol=0):
            if np.allclose(absmax, np.abs(W).max()):
                raise ExerciseFailure(
                    f"absmax of {where} is {absmax[b]:.6g}, expected {absmax_ref[b]:.6g}: every "
                    f"block got {np.abs(W).max():.6g}, the largest |value| of the whole tensor. "
                    "One absmax for the whole tensor lets one outlier squeeze every other block "
                    f"into the levels near 0: give each block of {bs} its own absmax, "
                    f"np.abs(weight.reshape(-1, {bs})).max(axis=1)")
            if np.allclose(absmax, by_columns):
                raise ExerciseFailure(
                    f"absmax of {where} is wrong: blocks are consecutive values of the row-major "
                    f"flattened weight (weight.reshape(-1, blocksize)), not of its columns")
            raise ExerciseFailure(f"absmax of {where} is {absmax[b]:.6g}, expected "
                                  f"{absmax_ref[b]:.6g} (the largest |value| in the block)")
    columns = nf4.unpack_4bit(nf4.quantize_nf4(np.ascontiguousarray(W.T), bs, False).packed, W.size)
    for b in range(absmax_ref.size):
        block = slice(b * bs, (b + 1) * bs)
        where = f"block {b} (flat values {b * bs}..{(b + 1) * bs - 1})"
        if not np.array_equal(codes[block], codes_ref[block]):
            if np.array_equal(codes, columns):
                raise ExerciseFailure(f"codes of {where} are wrong: blocks are consecutive values "
                                      "of the row-major flattened weight (weight.reshape(-1, "
                                      "blocksize)), not of its columns")
            normed_global = flat[block] / np.abs(W).max()
            uniform = np.clip(np.round((flat[block] / absmax_ref[b] + 1) * 7.5), 0, 15)
            i = int(np.argmax(codes[block] != codes_ref[block]))
            detail = (f"codes of {where} differ at flat index {b * bs + i} (value "
                      f"{flat[b * bs + i]:.6g}): yours {codes[b * bs + i]:g}, expected "
                      f"{codes_ref[b * bs + i]:g}")
            if np.array_equal(codes[block], np.searchsorted(mid, normed_global)):
                raise ExerciseFailure(detail + ": these are the codes of one absmax for the whole "
                                      "tensor; divide each block by its own absmax")
            if np.array_equal(codes[block], uniform):
                raise ExerciseFailure(detail + ": that is a uniform grid; map each value to the "
                                      "nearest NF4 level (searchsorted on the midpoints)")
            raise ExerciseFailure(detail + " (the nearest NF4 level to value / absmax of its "
                                  "block)")


def _expect_midpoints_round_down(mod):
    """The docstring's contract: a value exactly on a midpoint goes to the lower level."""
    import nf4
    cb = nf4.NF4_CODEBOOK.astype(np.float64)
    mids = (cb[:-1] + cb[1:]) / 2
    exact = mids[mids.astype(np.float32) == mids].astype(np.float32)  # representable in fp32
    w = np.concatenate([[1.0], exact, np.zeros(64 - 1 - exact.size)]).astype(np.float32)
    codes = np.asarray(mod.nf4_quantize(w.copy(), blocksize=64)[0]).reshape(-1)
    expected = nf4.unpack_4bit(nf4.quantize_nf4(w, 64, double_quant=False).packed, w.size)
    wrong = np.flatnonzero(codes != expected)
    if wrong.size:
        i = int(wrong[0])
        raise ExerciseFailure(
            f"a value exactly halfway between two NF4 levels must go to the lower level "
            f"(np.searchsorted(midpoints, value), whose default side='left' does that): value "
            f"{w[i]:.8g} (block absmax 1.0) got code {codes[i]:g}, expected {expected[i]:g}")


@exercise("9.21", "ex9_21_nf4_blockwise", "NF4: blockwise 4-bit NormalFloat, packing, bits per weight",
          "ours")
def check_nf4(mod, t):
    import nf4
    rng = rng_for(921)
    W = randn(rng, 8, 16, scale=0.05).astype(np.float32)
    W[1, 3] = 0.9                                           # an outlier in block 0
    W[6:, :] = 0.0                                          # block 3 is all zeros
    bs = 32
    state = nf4.quantize_nf4(W, blocksize=bs, double_quant=False)
    codes_ref = nf4.unpack_4bit(state.packed, W.size)
    out = mod.nf4_quantize(W.copy(), blocksize=bs)
    expect_tuple("nf4_quantize", out, "codes, absmax")
    codes = expect_shape("codes", out[0], (W.size,), " (one code per weight, flattened)")
    absmax = expect_shape("absmax", out[1], state.absmax.shape, f" (one per block of {bs})")
    for name, value, dtype, why in [("codes", out[0], np.uint8, "a code 0..15 fits in one byte"),
                                    ("absmax", out[1], np.float32, "the block constants are fp32")]:
        got = np.asarray(value).dtype
        expect(got == dtype, f"{name} should have dtype {np.dtype(dtype).name} ({why}), got {got}")
    _expect_blocks(W, bs, codes, absmax, codes_ref, state.absmax)
    _expect_midpoints_round_down(mod)
    t.ok("nf4_quantize: uint8 codes and float32 absmax, block by block as nf4.quantize_nf4; "
         "a value exactly on a midpoint goes down")
    back = mod.nf4_dequantize(codes_ref, state.absmax, W.shape, blocksize=bs)
    expect_close("nf4_dequantize", back, state.dequantize(np.float32), atol=1e-7, rtol=1e-6)
    expect(not np.any(np.asarray(back)[6:]), "the all-zero block must dequantize to zeros")
    expect_raises(ValueError, lambda: mod.nf4_quantize(W, blocksize=48),
                  "nf4_quantize with a blocksize that does not divide the size should raise ValueError")
    err_nf4, err_int4 = nf4_vs_int4_error(lambda w: mod.nf4_dequantize(*mod.nf4_quantize(w, 64),
                                                                       w.shape, 64))
    t.ok(f"nf4_quantize / nf4_dequantize match nf4.quantize_nf4 (on normal weights: mean error "
         f"{err_nf4:.4f} vs {err_int4:.4f} for uniform int4 with the same blocks)")

    for n in (10, 7):
        raw = rng.integers(0, 16, n)
        swapped = np.append(raw, np.zeros(n % 2, dtype=raw.dtype)).reshape(-1, 2)[:, ::-1].reshape(-1)
        packed = mod.pack_4bit(raw.copy())
        expect_close(f"pack_4bit of {n} codes", np.asarray(packed), nf4.pack_4bit(raw), mistakes=[
            (nf4.pack_4bit(swapped), "the nibbles are swapped: code 2i goes to the HIGH nibble")])
        expect(np.asarray(packed).dtype == np.uint8, "pack_4bit must return uint8")
        expect_close(f"unpack_4bit(packed, {n})", mod.unpack_4bit(nf4.pack_4bit(raw), n), raw)
    t.ok("pack_4bit / unpack_4bit: two codes per byte, high nibble first")

    expect_number("nf4_bits_per_parameter(64)", mod.nf4_bits_per_parameter(64), 4.5)
    expect_number("nf4_bits_per_parameter(64, double_quant=True)",
                  mod.nf4_bits_per_parameter(64, double_quant=True), 4 + 8 / 64 + 32 / (64 * 256))
    big = randn(rng, 128, 256).astype(np.float32)
    measured = nf4.quantize_nf4(big, blocksize=64, double_quant=True).bits_per_parameter()
    mine = mod.nf4_bits_per_parameter(64, double_quant=True)
    expect(abs(measured - mine) < 1e-3, f"nf4_bits_per_parameter(64, double_quant=True) = {mine:.4f}, "
           f"but the library's stored bytes give {measured:.4f} bits per weight")
    t.ok(f"bits per weight: 4.5 with fp32 block constants, {mine:.4f} with double quantization")
