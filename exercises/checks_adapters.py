"""Checkers for adapters and soft prompts: 9.7 adapter, 9.8 prompt tuning,
9.15 parallel adapter, 9.16 prefix MLP, 9.17 LoRA + prompt tuning, 9.19 the
attention backward with a prefix. References: ``peft.Adapter``,
``peft.PromptTuning``, ``bottleneck.BottleneckWrapper``,
``peft_methods.PrefixEncoder``, ``peft_model.get_peft_model`` and
``minigpt.CausalSelfAttention``.
"""
from __future__ import annotations

import math

import numpy as np

from checking import (expect, expect_close, expect_equal, expect_grad, expect_raises,
                      expect_shape, expect_tuple, expect_unchanged, randn, rng_for)
from registry import exercise

import peft

_erf = np.vectorize(math.erf)


def exact_gelu(z):
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


def lib_adapter(W_down, W_up, activation):
    d, b = W_down.shape
    ref = peft.Adapter(d, b, activation=activation, dtype=np.float64)
    ref.W_down, ref.W_up = np.array(W_down, dtype=float), np.array(W_up, dtype=float)
    return ref


def adapter_mistakes(x, W_down, W_up, expected, activation):
    z = x @ W_down
    wrong = [(expected - x, "the residual is missing: the adapter returns x + branch(x)"),
             (x + z @ W_up, "the activation between the two projections is missing")]
    if activation == "gelu":
        wrong.append((x + exact_gelu(z) @ W_up, "that is the exact (erf) GELU; use the tanh "
                      "approximation (the given gelu), as GPT-2 and the library do"))
    return wrong


# ------------------------------------------------------------------ 9.7
@exercise("9.7", "ex9_7_adapter", "Bottleneck adapter: forward and backward", "course")
def check_adapter(mod, t):
    rng = rng_for(97)
    d, b = 8, 3
    expect_raises(ValueError, lambda: mod.Adapter(d, b, activation="tanh"),
                  "Adapter(d, b, activation='tanh') should raise ValueError")
    ad = mod.Adapter(d, b, rng=np.random.default_rng(1))
    expect_shape("W_down", ad.W_down, (d, b), " = (d_model, bottleneck_dim)")
    expect_shape("W_up", ad.W_up, (b, d), " = (bottleneck_dim, d_model)")
    expect(np.unique(ad.W_down).size > 1, "W_down must be random (W_up is the one that starts at 0)")
    x = randn(rng, 2, 5, d)
    y0 = np.asarray(ad.forward(x.copy()), dtype=float)
    expect(np.abs(y0).max() > 0, "at initialisation your adapter outputs zeros: the residual "
           "is missing (y = x + f(x W_down) W_up, and W_up starts at zero)")
    gap = np.abs(y0 - x).max()
    expect(gap <= 0.1, f"at initialisation the adapter must be (nearly) the identity; "
           f"|y - x| reaches {gap:.3g}. Start W_up at zero")
    expect_equal("num_parameters()", ad.num_parameters(), 2 * d * b, " = 2 * d_model * bottleneck_dim")
    t.ok("__init__: shapes, starts as the identity, num_parameters, rejects unknown activations")

    for activation in ("relu", "gelu"):
        ad = mod.Adapter(d, b, activation=activation, rng=np.random.default_rng(2))
        ad.W_down, ad.W_up = randn(rng, d, b), randn(rng, b, d, scale=0.5)
        ref = lib_adapter(ad.W_down, ad.W_up, activation)
        expected = ref.forward(x)
        expect_close(f"forward ({activation})", ad.forward(x.copy()), expected,
                     mistakes=adapter_mistakes(x, ad.W_down, ad.W_up, expected, activation))
        G = randn(rng, *x.shape)
        dx_ref = ref.backward(G)
        G_before = G.copy()
        dx = ad.backward(G)
        expect_unchanged("grad_output", G_before, G)
        expect_close(f"backward's return value dL/dx ({activation})", dx, dx_ref, mistakes=[
            (dx_ref - G, "dL/dx misses the residual path: add grad_output itself"),
            (G, "dL/dx has only the residual path: add the bottleneck's share")])
        expect_close(f"W_up_grad ({activation})", ad.W_up_grad, ref.W_up_grad)
        expect_close(f"W_down_grad ({activation})", ad.W_down_grad, ref.W_down_grad)
        t.ok(f"{activation}: forward and backward match the library's Adapter")

    loss = lambda: float(np.sum(ad.forward(x) * G))  # noqa: E731
    ad.forward(x)
    grads = {"dL/dx": ad.backward(G), "W_down_grad": ad.W_down_grad, "W_up_grad": ad.W_up_grad}
    for name, arr in [("dL/dx", x), ("W_down_grad", ad.W_down), ("W_up_grad", ad.W_up)]:
        expect_grad(name, grads[name], loss, arr)
    t.ok("gradients agree with central differences (float64, random upstream gradient)")


# ------------------------------------------------------------------ 9.8
@exercise("9.8", "ex9_8_prompt_tuning", "Prompt tuning: a soft prompt, forward and backward",
          "course")
def check_prompt_tuning(mod, t):
    rng = rng_for(98)
    d, P = 6, 3
    pt = mod.PromptTuning(d, P, rng=np.random.default_rng(1))
    expect_equal("prompt_length", pt.prompt_length, P)
    prompt = expect_shape("prompt", pt.prompt, (P, d), " = (prompt_length, d_model)")
    expect(np.unique(prompt).size > 1, "the prompt must start random, not constant")
    big = np.asarray(mod.PromptTuning(64, 50, rng=np.random.default_rng(2)).prompt, dtype=float)
    mean, std = float(big.mean()), float(big.std())
    expect(abs(std - 0.5) < 0.05 and abs(mean) < 0.05,
           f"the random prompt should be rng.standard_normal((prompt_length, d_model)) * 0.5 "
           f"(mean 0, standard deviation 0.5); a (50, 64) prompt of yours has mean {mean:.3g} "
           f"and standard deviation {std:.3g}"
           + (": did you forget the * 0.5?" if abs(std - 1) < 0.05 else ""))
    vocab = randn(rng, 10, d)
    vocab_before = vocab.copy()
    pv = mod.PromptTuning(d, P, init_from_vocab=vocab, rng=np.random.default_rng(1))
    rows = expect_shape("prompt (from the vocabulary)", pv.prompt, (P, d))
    for i, row in enumerate(rows):
        expect(np.any(np.all(vocab == row, axis=1)),
               f"with init_from_vocab, prompt row {i} must be a copy of a vocabulary row")
    rows = np.array(rows)
    pv.prompt[...] += 1.0
    expect_unchanged("the vocabulary (your prompt is a view of it: copy the rows)", vocab_before, vocab)
    chosen = np.random.default_rng(1).integers(0, vocab.shape[0], P)
    expect_close("prompt (from the vocabulary)", rows, vocab[chosen],
                 context=f" (rows rng.integers(0, vocab, prompt_length) = {chosen.tolist()})",
                 mistakes=[(vocab[:P], "those are the first prompt_length rows; choose the rows "
                            "with rng.integers(0, vocab_size, prompt_length), as the docstring says")])
    expect_raises(ValueError, lambda: mod.PromptTuning(d, P, init_from_vocab=randn(rng, 10, d + 1)),
                  "init_from_vocab of the wrong width should raise ValueError")
    expect_equal("num_parameters()", pt.num_parameters(), P * d, " = prompt_length * d_model")
    t.ok("__init__: random prompt, or copies of vocabulary rows; num_parameters")

    x = randn(rng, 2, 4, d)
    ref = peft.PromptTuning(d, P, dtype=np.float64)
    ref.prompt = np.array(pt.prompt, dtype=float)
    expected = ref.forward(x)
    expect_close("forward(input_embeds)", pt.forward(x.copy()), expected, mistakes=[
        (np.concatenate([x, expected[:, :P]], axis=1), "the prompt goes first, before the tokens")])
    expect_raises(ValueError, lambda: pt.forward(x[0]),
                  "forward of a 2-D input (seq, d) should raise ValueError (expects (batch, seq, d))")
    expect_raises(ValueError, lambda: pt.forward(randn(rng, 2, 4, d + 1)),
                  f"forward of a (2, 4, {d + 1}) input should raise ValueError: its last axis is "
                  f"not d_model = {d}")
    t.ok("forward: (batch, P + seq, d), prompt first; rejects a 2-D input and a wrong width")

    G = randn(rng, 2, P + 4, d)
    dx = pt.backward(G.copy())
    expect_close("backward's return value", dx, G[:, P:],
                 context=" (the gradient for the original input: drop the prompt positions)")
    expect_close("prompt_grad", pt.prompt_grad, G[:, :P].sum(0), factors=[
        (1 / 2, "you averaged over the batch; sum instead: every sequence uses the same prompt")])
    expect_grad("prompt_grad", pt.prompt_grad, lambda: float(np.sum(pt.forward(x) * G)), pt.prompt)
    t.ok("backward: input gradient without the prompt positions, prompt_grad summed over the batch")

    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.int64)
    ext = mod.extend_attention_mask(mask, P)
    expect_close("extend_attention_mask(mask, P)", ext,
                 np.concatenate([np.ones((2, P), dtype=np.int64), mask], axis=1))
    expect(np.asarray(ext).dtype == mask.dtype,
           f"extend_attention_mask must keep the mask's dtype {mask.dtype}, got {np.asarray(ext).dtype}")
    t.ok("extend_attention_mask: the prompt positions are always visible")


# ------------------------------------------------------------------ 9.15
def _frozen_mlp(weights):
    """A frozen library MLP (fc1 -> GELU -> fc2) as the sublayer beside the adapter."""
    from checks_lora_variants import lib_mlp
    return lib_mlp(weights).freeze()


@exercise("9.15", "ex9_15_parallel_adapter", "Parallel adapter: beside the sublayer, not after it",
          "suggested")
def check_parallel_adapter(mod, t):
    from bottleneck import BottleneckWrapper
    rng = rng_for(915)
    d, b = 6, 2
    weights = {"fc1": (randn(rng, 4 * d, d, scale=d ** -0.5), randn(rng, 4 * d, scale=0.1)),
               "fc2": (randn(rng, d, 4 * d, scale=(4 * d) ** -0.5), randn(rng, d, scale=0.1))}
    x = randn(rng, 2, 3, d)
    s_out = _frozen_mlp(weights).forward(x)
    ad = mod.ParallelAdapter(d, b, rng=np.random.default_rng(1))
    expect_shape("W_down", ad.W_down, (d, b))
    expect_shape("W_up", ad.W_up, (b, d))
    expect_close("the block's output at initialisation", mod.parallel_block(_frozen_mlp(weights), ad, x),
                 s_out, context=" (W_up = 0: the block equals its frozen sublayer)")
    t.ok("__init__: shapes; the block starts as its frozen sublayer")

    ad.W_down, ad.W_up = randn(rng, d, b), randn(rng, b, d, scale=0.5)
    wrapper = BottleneckWrapper(_frozen_mlp(weights))
    wrapper.adapter = lib_adapter(ad.W_down, ad.W_up, "relu")
    wrapper.adapter.parallel = True
    expected = wrapper.forward(x)
    serial = s_out + np.maximum(s_out @ ad.W_down, 0) @ ad.W_up
    expect_close("forward(x, sublayer_out)", ad.forward(x.copy(), s_out.copy()), expected, mistakes=[
        (serial, "the branch must read x (the sublayer's input), not sublayer_out: that is a "
         "serial adapter"),
        (expected - s_out, "sublayer_out is missing: add the branch to it")])
    G = randn(rng, 2, 3, d)
    dx_ref = wrapper.backward(G)
    out = ad.backward(G.copy())
    expect_tuple("backward", out, "grad_x_branch, grad_sublayer_out")
    expect_close("grad_sublayer_out", out[1], G, context=" (y = sublayer_out + branch: the "
                 "gradient passes through unchanged)")
    sub = _frozen_mlp(weights)
    sub.forward(x)
    expect_close("dL/dx of the block (grad_x_branch + sublayer.backward(grad_sublayer_out))",
                 sub.backward(np.asarray(out[1])) + np.asarray(out[0]), dx_ref)
    expect_close("W_up_grad", ad.W_up_grad, wrapper.adapter.W_up_grad)
    expect_close("W_down_grad", ad.W_down_grad, wrapper.adapter.W_down_grad)
    t.ok("forward and backward match the library's parallel BottleneckWrapper")

    ad = mod.ParallelAdapter(d, b, activation="tanh", scale=4.0, rng=np.random.default_rng(2))
    ad.W_up = randn(rng, b, d, scale=0.5)
    sub = _frozen_mlp(weights)
    loss = lambda: float(np.sum(mod.parallel_block(sub, ad, x) * G))  # noqa: E731
    mod.parallel_block(sub, ad, x)
    dx = mod.parallel_block_backward(sub, ad, G)
    grads = {"dL/dx": dx, "W_down_grad": ad.W_down_grad, "W_up_grad": ad.W_up_grad}
    for name, arr in [("dL/dx", x), ("W_down_grad", ad.W_down), ("W_up_grad", ad.W_up)]:
        expect_grad(f"{name} (tanh, scale 4)", grads[name], loss, arr)
    t.ok("with tanh and scale = 4: gradients agree with central differences")
