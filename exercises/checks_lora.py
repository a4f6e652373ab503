"""Checkers for the LoRA exercises: 9.5 layer, 9.6 backward, 9.9 attention,
9.13 feed-forward, 9.14 dropout. The reference is the library's ``peft.LoRALayer``
/ ``LoRALinear`` and ``minigpt`` modules, run in float64 on the learner's factors.
"""
from __future__ import annotations

import re

import numpy as np

from checking import (ExerciseFailure, expect, expect_close, expect_equal, expect_grad,
                      expect_raises, expect_shape, expect_tuple, expect_unchanged, randn, rng_for)
from registry import exercise

import peft
from minigpt import CausalSelfAttention, GPTConfig


def lib_lora(A, B, alpha):
    """The library's LoRA layer holding copies of the learner's factors."""
    r, d_in = np.shape(A)
    ref = peft.LoRALayer(d_in, np.shape(B)[0], rank=r, alpha=alpha, dtype=np.float64)
    ref.A, ref.B = np.array(A, dtype=np.float64), np.array(B, dtype=np.float64)
    return ref


def branch_forward(ref, x):
    """The LoRA branch alone, through the course API: ``forward(x, W)`` with ``W = 0``."""
    return ref.forward(x, np.zeros((ref.out_features, ref.in_features)))


def scaling_factors(s):
    return [(1.0 / s, "1/(alpha/r)", "did you forget the scaling alpha / r?"),
            (s, "alpha/r", "the scaling alpha / r is applied twice")]


# ------------------------------------------------------------------ 9.5
@exercise("9.5", "ex9_5_lora_layer", "LoRA layer: init, forward, merge", "course")
def check_lora_layer(mod, t):
    rng = rng_for(95)
    for d_in, d_out, r, alpha in [(8, 6, 3, 12.0), (5, 7, 4, 2.0)]:
        lora = mod.LoRALayer(d_in, d_out, rank=r, alpha=alpha, rng=np.random.default_rng(1))
        for name, want in [("in_features", d_in), ("out_features", d_out), ("rank", r)]:
            expect_equal(name, getattr(lora, name, None), want)
        s = getattr(lora, "scaling", None)
        expect(s is not None and np.isclose(s, alpha / r),
               f"scaling is {s!r}, expected alpha / rank = {alpha} / {r} = {alpha / r:.4g}"
               + (" (you computed rank / alpha)" if s is not None and np.isclose(s, r / alpha) else ""))
        A = expect_shape("A", lora.A, (r, d_in), " = (rank, in_features): A reads the input")
        B = expect_shape("B", lora.B, (d_out, r), " = (out_features, rank): B writes the output")
        expect(not B.any(), f"B must start at zero (yours has max |B| = {np.abs(B).max():.3g}): "
               "then B @ A = 0 and the layer starts exactly at the pretrained model")
        expect(np.unique(A).size > 1, "A must be random: with A and B both constant "
               "the two factors get identical or zero gradients and never learn")
        bound = 1 / np.sqrt(d_in)
        expect(np.abs(A).max() <= bound + 1e-12, f"A should be small: uniform in "
               f"[-1/sqrt(in), 1/sqrt(in)] = +-{bound:.3g}, yours reaches {np.abs(A).max():.3g}")
    t.ok("__init__: attributes, A (r, in) small and random, B (out, r) zero, scaling alpha/r")

    W = randn(rng, d_out, d_in)
    x2, x3 = randn(rng, 5, d_in), randn(rng, 2, 5, d_in)
    expect_close("forward(x, W) at initialisation", lora.forward(x3.copy(), W.copy()), x3 @ W.T,
                 context=" (at initialisation B = 0, so the output is x @ W.T)",
                 mistakes=[(np.zeros((2, 5, d_out)), "it is zero: the frozen path x @ W.T is "
                            "missing (at initialisation B = 0, so the LoRA branch alone is zero)")])
    t.ok("forward at initialisation equals the frozen layer x @ W.T")

    lora.A, lora.B = randn(rng, r, d_in, scale=0.5), randn(rng, d_out, r)
    ref = lib_lora(lora.A, lora.B, alpha)
    for x in (x2, x3):
        expected = ref.forward(x, W)
        frozen, branch = x @ W.T, expected - x @ W.T
        yours = lora.forward(x.copy(), W.copy())
        expect_close(f"forward(x, W) for x of shape {x.shape}", yours, expected, mistakes=[
            (frozen + branch / s, "the LoRA branch is missing the scaling alpha / r"),
            (frozen + branch * s, "the scaling alpha / r is applied twice"),
            (branch, "the frozen path x @ W.T is missing"),
            (frozen, "the LoRA branch is missing (or it does not use the current self.B)")])
    t.ok("forward with a random B matches the library, for (seq, in) and (batch, seq, in)")

    W_before = W.copy()
    merged = lora.merge_weights(W)
    expect_unchanged("W (the pretrained weight) in merge_weights", W_before, W)
    expected = ref.merge_weights(W)
    expect_close("merge_weights(W)", merged, expected, mistakes=[
        (W + lora.B @ lora.A, "the update is missing the scaling alpha / r"),
        (expected - W, "W itself is missing: merged = W + scaling * B @ A")])
    expect_close("x @ merge_weights(W).T", x3 @ np.asarray(merged).T, lora.forward(x3, W),
                 context=" (the merged layer must give the forward's output)")
    t.ok("merge_weights: W + scaling * B @ A, and the merged layer gives the same output")

    expect_equal("num_parameters()", lora.num_parameters(), r * (d_in + d_out),
                 f" = rank * (in + out) = {r} * ({d_in} + {d_out})")
    ratio = lora.compression_ratio()
    expect(np.isclose(ratio, r * (d_in + d_out) / (d_in * d_out)),
           f"compression_ratio() is {ratio!r}, expected num_parameters() / (in * out) = "
           f"{r * (d_in + d_out) / (d_in * d_out):.4g}")
    t.ok("num_parameters and compression_ratio")


# ------------------------------------------------------------------ 9.6
def _call_backward(mod, G, x, A, B, s):
    args = [a.copy() for a in (G, x, A, B)]
    out = mod.lora_backward(*args, s)
    for name, before, after in zip(("grad_output", "x", "A", "B"), (G, x, A, B), args):
        expect_unchanged(name, before, after)
    expect_tuple("lora_backward", out, "grad_A, grad_B, grad_x")
    return out


@exercise("9.6", "ex9_6_lora_backward", "LoRA backward: grad_A, grad_B, grad_x", "course")
def check_lora_backward(mod, t):
    rng = rng_for(96)
    d_in, d_out, r, alpha = 8, 6, 3, 12.0
    s = alpha / r
    A, B = randn(rng, r, d_in, scale=0.5), randn(rng, d_out, r)
    cases = []
    for x_shape in [(5, d_in), (2, 4, d_in)]:
        x = randn(rng, *x_shape)
        G = randn(rng, *x_shape[:-1], d_out)
        grad_A, grad_B, grad_x = _call_backward(mod, G, x, A, B, s)
        where = f" (for x of shape {x_shape})"
        expect_shape("grad_A", grad_A, A.shape, f" (the shape of A){where}")
        expect_shape("grad_B", grad_B, B.shape, f" (the shape of B){where}")
        expect_shape("grad_x", grad_x, x.shape, f" (the shape of x){where}")
        cases.append((x, G, grad_A, grad_B, grad_x))
    t.ok("shapes for x of shape (seq, in) and (batch, seq, in)")

    zero_hint = ("; B is random here, so it should not be: grad_A flows through B "
                 "(dh = scaling * grad_output @ B). At initialisation B = 0 and grad_A is "
                 "truly zero -- which is why gradient checks need a random B")
    for x, G, grad_A, grad_B, grad_x in cases:
        ref = lib_lora(A, B, alpha)
        branch_forward(ref, x)
        dx_ref = ref.backward(G)
        n = int(np.prod(x.shape[:-1]))
        averaged = [(1.0 / n, f"1/{n}", f"did you average over batch and sequence? A and B are "
                     f"shared by all {n} positions of x, so their gradients are sums over them, "
                     f"not means")]
        if x.ndim == 3:
            averaged.append((1.0 / x.shape[0], f"1/{x.shape[0]}", "did you average over the "
                             "batch? A and B are shared by every sequence: sum, not mean"))
        label = f" for x of shape {x.shape}"
        if not np.any(grad_A):
            raise ExerciseFailure(f"grad_A{label} is zero everywhere" + zero_hint)
        factors = scaling_factors(s) + averaged
        expect_close(f"grad_B{label}", grad_B, ref.B_grad, factors=factors)
        expect_close(f"grad_A{label}", grad_A, ref.A_grad, factors=factors)
        expect_close(f"grad_x{label}", grad_x, dx_ref, factors=scaling_factors(s),
                     mistakes=[(G @ B @ A, "grad_x is missing the scaling alpha / r")])
    t.ok("values match the library's LoRALayer backward for both input shapes (random B, random "
         "upstream gradient)")

    for name, idx, arr in [("grad_A", 0, A), ("grad_B", 1, B), ("grad_x", 2, x)]:
        loss = lambda: float(np.sum(mod.lora_forward(x, A, B, s) * G))  # noqa: E731
        expect_grad(name, _call_backward(mod, G, x, A, B, s)[idx], loss, arr)
    t.ok("gradients agree with central differences (float64)")

    sq = randn(rng, 4, 4)                                   # square A and B: transposes show
    xs, Gs = randn(rng, 3, 4), randn(rng, 3, 4)
    ref = lib_lora(sq, sq.T.copy() + 1.0, 4.0)
    branch_forward(ref, xs)
    ref.backward(Gs)
    gA, gB, _ = _call_backward(mod, Gs, xs, ref.A, ref.B, ref.scaling)
    expect_close("grad_A (square case)", gA, ref.A_grad)
    expect_close("grad_B (square case)", gB, ref.B_grad)
    t.ok("square factors: no transposed gradient")


# ------------------------------------------------------------------ 9.9
PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}


def lib_attention(weights, n_heads, alpha=1.0, A=None, B=None):
    """The library's attention with the learner's frozen weights (zero biases) and,
    for every key of ``A``, a ``LoRALinear`` holding the learner's factors."""
    D = weights["q"].shape[0]
    cfg = GPTConfig(vocab_size=4, context_length=16, d_model=D, n_layers=1, n_heads=n_heads,
                    dtype=np.float64)
    attn = CausalSelfAttention(cfg, np.random.default_rng(0))
    for key, attr in PROJ.items():
        lin = getattr(attn, attr)
        lin.weight, lin.bias = np.array(weights[key], dtype=float), np.zeros(D)
        if A is not None and key in A:
            wrapper = peft.LoRALinear(lin, lora_rank=np.shape(A[key])[0], lora_alpha=alpha)
            wrapper.lora.A = np.array(A[key], dtype=float)
            wrapper.lora.B = np.array(B[key], dtype=float)
            setattr(attn, attr, wrapper)
    return attn


@exercise("9.9", "ex9_9_lora_attention", "LoRA on multi-head attention: targets, merge, count",
          "course")
def check_lora_attention(mod, t):
    rng = rng_for(99)
    D, H, r, alpha = 8, 2, 2, 6.0
    weights = {k: randn(rng, D, D, scale=D ** -0.5) for k in "qkvo"}
    originals = {k: w.copy() for k, w in weights.items()}
    make = lambda targets: mod.LoRAAttention(*(weights[k] for k in "qkvo"), n_heads=H, rank=r,  # noqa: E731
                                             alpha=alpha, target_modules=targets)
    err = expect_raises(ValueError, lambda: make(["q", "x"]), "target_modules=['q', 'x'] should "
                        "raise ValueError (valid targets: q, k, v, o)")
    named = set(re.findall(r"\b[qkvo]\b", str(err)))
    expect(named == set("qkvo"), f"the ValueError for target_modules=['q', 'x'] should name the "
           f"valid choices q, k, v and o (the docstring asks for it); yours says: {str(err)[:200]!r}")
    default = mod.LoRAAttention(*(weights[k] for k in "qkvo"), n_heads=H)
    expect_equal("the default target_modules", sorted(default.lora_A), ["q", "v"])
    t.ok("validates target_modules; the default targets are q and v")

    x = randn(rng, 2, 5, D)
    base = lib_attention(weights, H).forward(x)
    for targets in (["q", "v"], ["q", "k", "v", "o"], ["o"], []):
        att = make(targets)
        expect_equal(f"sorted(lora_A) for targets {targets}", sorted(att.lora_A), sorted(targets))
        for k in targets:
            expect_shape(f"lora_A[{k!r}]", att.lora_A[k], (r, D), " = (rank, d_model)")
            expect_shape(f"lora_B[{k!r}]", att.lora_B[k], (D, r), " = (d_model, rank)")
            expect(not np.any(att.lora_B[k]), f"lora_B[{k!r}] must start at zero")
        n = len(targets) * r * 2 * D
        expect_equal(f"num_trainable_parameters() for targets {targets}", att.num_trainable_parameters(),
                     n, f" = {len(targets)} targets * rank * 2 * d_model")
        expect_close(f"forward at initialisation (targets {targets})", att.forward(x.copy()), base,
                     context=" (B = 0: the output equals the frozen attention's)")
        for k in targets:
            att.lora_A[k], att.lora_B[k] = randn(rng, r, D, scale=0.5), randn(rng, D, r, scale=0.5)
        ref = lib_attention(weights, H, alpha, att.lora_A, att.lora_B).forward(x)
        expect_close(f"forward with trained factors (targets {targets})", att.forward(x.copy()), ref,
                     mistakes=[(base, "the LoRA terms are missing from the projections")])
        merged = att.merge()
        expect_equal("sorted(merge())", sorted(merged), ["k", "o", "q", "v"])
        for k in "qkvo":
            expect_unchanged(f"weights[{k!r}]", originals[k], weights[k])
            if k in targets:
                expect_close(f"merge()[{k!r}]", merged[k], weights[k] + att.scaling * att.lora_B[k]
                             @ att.lora_A[k])
            else:
                expect(merged[k] is weights[k], f"merge()[{k!r}] (not a target) must be the "
                       "original array itself, unchanged")
        plain = lib_attention(merged, H).forward(x)
        expect_close("the merged attention's output", plain, ref)
        expect(np.allclose(att.forward(x.copy()), ref), "forward(x) changed after merge(): "
               "merge() must return new arrays and leave the layer itself unchanged")
    t.ok("targets q,v / q,k,v,o / o / none: counts, output at init, forward vs the library, merge")
