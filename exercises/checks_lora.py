"""Checkers for the LoRA exercises: 9.5 layer, 9.6 backward, 9.9 attention,
9.13 feed-forward, 9.14 dropout. The reference is the library's ``peft.LoRALayer``
/ ``LoRALinear`` and ``minigpt`` modules, run in float64 on the learner's factors.
"""
from __future__ import annotations

import numpy as np

from checking import (ExerciseFailure, expect, expect_close, expect_equal, expect_grad,
                      expect_raises, expect_shape, expect_unchanged, randn, rng_for)
from registry import exercise

import peft
from minigpt import MLP, CausalSelfAttention, GPTConfig


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
    return [(1.0 / s, "did you forget the scaling alpha / r?"),
            (s, "the scaling alpha / r is applied twice")]


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
    expect(isinstance(out, tuple) and len(out) == 3,
           f"lora_backward must return a tuple (grad_A, grad_B, grad_x), got {type(out).__name__}"
           + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    return out


@exercise("9.6", "ex9_6_lora_backward", "LoRA backward: grad_A, grad_B, grad_x", "course")
def check_lora_backward(mod, t):
    rng = rng_for(96)
    d_in, d_out, r, alpha = 8, 6, 3, 12.0
    s = alpha / r
    A, B = randn(rng, r, d_in, scale=0.5), randn(rng, d_out, r)
    for x_shape in [(5, d_in), (2, 4, d_in)]:
        x = randn(rng, *x_shape)
        G = randn(rng, *x_shape[:-1], d_out)
        grad_A, grad_B, grad_x = _call_backward(mod, G, x, A, B, s)
        expect_shape("grad_A", grad_A, A.shape, " (the shape of A)")
        expect_shape("grad_B", grad_B, B.shape, " (the shape of B)")
        expect_shape("grad_x", grad_x, x.shape, " (the shape of x)")
    t.ok("shapes for x of shape (seq, in) and (batch, seq, in)")

    ref = lib_lora(A, B, alpha)
    branch_forward(ref, x)
    dx_ref = ref.backward(G)
    zero_hint = ("; B is random here, so it should not be: grad_A flows through B "
                 "(dh = scaling * grad_output @ B). At initialisation B = 0 and grad_A is "
                 "truly zero -- which is why gradient checks need a random B")
    if not np.any(grad_A):
        raise ExerciseFailure("grad_A is zero everywhere" + zero_hint)
    expect_close("grad_B", grad_B, ref.B_grad, factors=scaling_factors(s))
    expect_close("grad_A", grad_A, ref.A_grad, factors=scaling_factors(s))
    expect_close("grad_x", grad_x, dx_ref, factors=scaling_factors(s),
                 mistakes=[(G @ B @ A, "grad_x is missing the scaling alpha / r")])
    t.ok("values match the library's LoRALayer backward (random B, random upstream gradient)")

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
    expect_raises(ValueError, lambda: make(["q", "x"]), "target_modules=['q', 'x'] should raise "
                  "ValueError (valid targets: q, k, v, o)")
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
    t.ok("targets q,v / q,k,v,o / o / none: counts, output at init, forward vs the library, merge")


# ------------------------------------------------------------------ 9.13
def lib_mlp(weights, alpha=1.0, A=None, B=None):
    """The library's MLP with the learner's frozen weights and LoRA factors."""
    D = weights["fc1"][0].shape[1]
    cfg = GPTConfig(vocab_size=4, context_length=8, d_model=D, n_layers=1, n_heads=1,
                    dtype=np.float64)
    mlp = MLP(cfg, np.random.default_rng(0))
    for name in ("fc1", "fc2"):
        lin = getattr(mlp, name)
        lin.weight, lin.bias = (np.array(a, dtype=float) for a in weights[name])
        if A is not None and name in A:
            wrapper = peft.LoRALinear(lin, lora_rank=np.shape(A[name])[0], lora_alpha=alpha)
            wrapper.lora.A, wrapper.lora.B = np.array(A[name], float), np.array(B[name], float)
            setattr(mlp, name, wrapper)
    return mlp


@exercise("9.13", "ex9_13_lora_ffn", "LoRA on the feed-forward layers (fc1, fc2)", "suggested")
def check_lora_ffn(mod, t):
    rng = rng_for(913)
    D, r, alpha = 6, 2, 4.0
    weights = {"fc1": (randn(rng, 4 * D, D, scale=D ** -0.5), randn(rng, 4 * D, scale=0.1)),
               "fc2": (randn(rng, D, 4 * D, scale=(4 * D) ** -0.5), randn(rng, D, scale=0.1))}
    make = lambda targets: mod.LoRAMLP(*weights["fc1"], *weights["fc2"], rank=r, alpha=alpha,  # noqa: E731
                                       target_modules=targets)
    expect_raises(ValueError, lambda: make(["fc1", "fc3"]), "target_modules=['fc1', 'fc3'] should "
                  "raise ValueError")
    x = randn(rng, 2, 3, D)
    base = lib_mlp(weights).forward(x)
    for targets in (["fc1", "fc2"], ["fc2"], ["fc1"]):
        mlp = make(targets)
        expect_equal(f"sorted(lora_A) for targets {targets}", sorted(mlp.lora_A), sorted(targets))
        for name in targets:
            d_out, d_in = weights[name][0].shape
            expect_shape(f"lora_A[{name!r}]", mlp.lora_A[name], (r, d_in), f" = (rank, in_features of {name})")
            expect_shape(f"lora_B[{name!r}]", mlp.lora_B[name], (d_out, r), f" = (out_features of {name}, rank)")
        expect_equal(f"num_trainable_parameters() for {targets}", mlp.num_trainable_parameters(),
                     len(targets) * r * 5 * D, " = r * (D + 4D) per target")
        expect_close(f"forward at initialisation ({targets})", mlp.forward(x.copy()), base)
        for name in targets:
            mlp.lora_A[name] = randn(rng, *mlp.lora_A[name].shape, scale=0.5)
            mlp.lora_B[name] = randn(rng, *mlp.lora_B[name].shape, scale=0.5)
        ref = lib_mlp(weights, alpha, mlp.lora_A, mlp.lora_B)
        expect_close(f"forward ({targets})", mlp.forward(x.copy()), ref.forward(x))
        G = randn(rng, 2, 3, D)
        dx_ref = ref.backward(G)
        expect_close(f"backward's return value dL/dx ({targets})", mlp.backward(G.copy()), dx_ref)
        for name in targets:
            lora = getattr(ref, name).lora
            expect_close(f"lora_A_grad[{name!r}]", mlp.lora_A_grad.get(name), lora.A_grad,
                         factors=scaling_factors(alpha / r))
            expect_close(f"lora_B_grad[{name!r}]", mlp.lora_B_grad.get(name), lora.B_grad,
                         factors=scaling_factors(alpha / r))
        merged = mlp.merge()
        for name in ("fc1", "fc2"):
            expect_unchanged(f"the frozen {name} weight", weights[name][0], mlp.weights[name][0])
        expect_close(f"the merged MLP's output ({targets})", lib_mlp(merged).forward(x), ref.forward(x))
    t.ok("fc1+fc2 / fc2 / fc1: shapes, counts, forward, backward and merge match the library")

    loss = lambda: float(np.sum(mlp.forward(x) * G))  # noqa: E731
    mlp.forward(x)
    dx = mlp.backward(G)
    for name, arr in [("lora_A_grad['fc1']", mlp.lora_A["fc1"]), ("lora_B_grad['fc1']", mlp.lora_B["fc1"])]:
        grad = mlp.lora_A_grad["fc1"] if "A_grad" in name else mlp.lora_B_grad["fc1"]
        expect_grad(name, grad, loss, arr)
    expect_grad("dL/dx", dx, loss, x)
    t.ok("gradients agree with central differences (float64)")


# ------------------------------------------------------------------ 9.14
@exercise("9.14", "ex9_14_lora_dropout", "LoRA dropout: on the update's input only", "suggested")
def check_lora_dropout(mod, t):
    rng = rng_for(914)
    d_in, d_out, r, alpha, p = 8, 5, 3, 6.0, 0.25
    layer = mod.LoRADropoutLayer(d_in, d_out, r, alpha, dropout=p, rng=np.random.default_rng(1))
    layer.A, layer.B = randn(rng, r, d_in, scale=0.5), randn(rng, d_out, r, scale=0.5)
    ref = lib_lora(layer.A, layer.B, alpha)
    W, x = randn(rng, d_out, d_in), randn(rng, 2, 4, d_in)
    layer.eval()
    expect_close("forward in eval mode", layer.forward(x.copy(), W), ref.forward(x, W),
                 context=" (no dropout in evaluation)")
    expect(layer.mask is None, "in eval mode self.mask should be None (dropout is the identity)")
    t.ok("eval mode: no dropout, same output as plain LoRA")

    layer.train()
    y = layer.forward(x.copy(), W)
    mask = expect_shape("self.mask", layer.mask, x.shape, " (one entry per input entry)")
    values = set(np.round(np.unique(mask), 9))
    expect(values <= {0.0, round(1 / (1 - p), 9)},
           f"mask values should be 0 or 1/(1-p) = {1 / (1 - p):.4g} (inverted dropout), yours are "
           f"{sorted(values)[:4]}" + (": scale the kept entries by 1/(1-p)" if 1.0 in values else ""))
    x_drop = x * mask
    branch = branch_forward(ref, x_drop)
    expect_close("forward in training mode", y, x @ W.T + branch, mistakes=[
        (x_drop @ W.T + branch, "dropout must not touch the frozen path x @ W.T, only the "
         "LoRA branch's input")])
    big = np.ones((200, 50))
    small = mod.LoRADropoutLayer(50, 4, 2, 4.0, dropout=p, rng=np.random.default_rng(2))
    small.forward(big, np.zeros((4, 50)))
    first = np.array(small.mask)
    dropped = float(np.mean(first == 0))
    expect(abs(dropped - p) < 0.03, f"with p = {p}, about {p:.0%} of the entries should be dropped; "
           f"yours dropped {dropped:.1%}")
    small.forward(big, np.zeros((4, 50)))
    expect(not np.array_equal(first, small.mask), "every forward pass must draw a new mask")
    t.ok("training mode: inverted-dropout mask on the branch input only, fresh at every call")

    G = randn(rng, 2, 4, d_out)
    dx_drop = ref.backward(G)
    dx = layer.backward(G.copy())
    expect_close("backward's return value dL/dx", dx, G @ W + dx_drop * mask, mistakes=[
        (G @ W + dx_drop, "the LoRA part of dL/dx must be multiplied by the forward's mask"),
        (dx_drop * mask, "dL/dx misses the frozen path grad_output @ W")])
    expect_close("A_grad", layer.A_grad, ref.A_grad, mistakes=[
        (_undropped_A_grad(ref, x, G),
         "A_grad must use the dropped input x * mask, as the forward did")])
    expect_close("B_grad", layer.B_grad, ref.B_grad)
    t.ok("backward uses the forward's mask; matches the library's LoRALayer")

    def loss():
        layer.rng = np.random.default_rng(7)                # the same mask at every call
        return float(np.sum(layer.forward(x, W) * G))
    loss()
    grads = (layer.backward(G), layer.A_grad, layer.B_grad)
    for name, grad, arr in [("dL/dx", grads[0], x), ("A_grad", grads[1], layer.A), ("B_grad", grads[2], layer.B)]:
        expect_grad(name, grad, loss, arr)
    t.ok("gradients agree with central differences (mask held fixed)")


def _undropped_A_grad(ref, x, G):
    """A_grad computed with the input before dropout (a classic mistake)."""
    dh = ref.scaling * G @ ref.B
    return dh.reshape(-1, ref.rank).T @ x.reshape(-1, ref.in_features)


# ------------------------------------------------------------------ 9.20
def _dora_reference(A, B, m, alpha, detach_norm):
    from dora import DoRALayer
    r, d_in = A.shape
    ref = DoRALayer(d_in, B.shape[0], rank=r, alpha=alpha, detach_norm=detach_norm, dtype=np.float64)
    ref.A, ref.B, ref.magnitude = A.copy(), B.copy(), m.copy()
    return ref


def _dora_call(mod, G, cache, detach_norm):
    out = mod.dora_backward(G.copy(), cache, detach_norm=detach_norm)
    expect(isinstance(out, tuple) and len(out) == 4, "dora_backward must return a tuple "
           "(grad_m, grad_A, grad_B, grad_x)")
    return out


@exercise("9.20", "ex9_20_dora_magnitude", "DoRA: the magnitude and direction gradients", "ours")
def check_dora(mod, t):
    from dora import row_norm
    rng = rng_for(920)
    d_in, d_out, r, alpha = 7, 5, 2, 4.0
    s = alpha / r
    W0, x = randn(rng, d_out, d_in, scale=d_in ** -0.5), randn(rng, 2, 3, d_in)
    m0 = mod.init_magnitude(W0.copy())
    expect_close("init_magnitude(W0)", m0, row_norm(W0), mistakes=[
        (np.linalg.norm(W0, axis=0), "that is the norm of each column; DoRA's magnitude has one "
         "entry per output row: norm over axis 1 of the (out, in) weight")])
    A = randn(rng, r, d_in, scale=0.5)
    y0, _ = mod.dora_forward(x.copy(), W0, A, np.zeros((d_out, r)), np.array(m0), s)
    expect_close("dora_forward at initialisation (B = 0, m = row norms)", y0, x @ W0.T)
    t.ok("init_magnitude; the layer starts exactly at W0")

    B = randn(rng, d_out, r, scale=0.5)
    m = row_norm(W0) * (1 + 0.2 * randn(rng, d_out))
    G = randn(rng, 2, 3, d_out)
    for detach in (False, True):
        ref = _dora_reference(A, B, m, alpha, detach)
        y_ref = ref.forward(x, W0)
        out = mod.dora_forward(x.copy(), W0.copy(), A.copy(), B.copy(), m.copy(), s)
        expect(isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict),
               "dora_forward must return (y, cache) with cache a dict")
        y, cache = out
        V = W0 + s * B @ A
        expect_close("cache['V']", cache.get("V"), V, context=" (V = W0 + scaling * B @ A)")
        expect_close("cache['norm']", cache.get("norm"), row_norm(V), context=" (one norm per output row)")
        expect_close("cache['W_dora']", cache.get("W_dora"), ref.merge_weights(W0))
        expect_close("dora_forward's output y", y, y_ref)
        dx_ref = ref.backward(G)
        grad_m, grad_A, grad_B, grad_x = _dora_call(mod, G, cache, detach)
        Gw = G.reshape(-1, d_out).T @ x.reshape(-1, d_in)
        expect_close("grad_m", grad_m, ref.magnitude_grad, mistakes=[
            (np.sum(Gw * V, axis=1), "grad_m must use the unit direction V / norm, not V"),
            (np.sum(Gw * ref.merge_weights(W0), axis=1), "grad_m must use the unit direction "
             "V / norm, not W_dora")])
        label = "detach_norm=True" if detach else "exact, detach_norm=False"
        detached = _dora_reference(A, B, m, alpha, True)
        detached.forward(x, W0)
        detached.backward(G)
        wrong = [] if detach else [(detached.A_grad, "that is the detached approximation (norm held "
                                    "constant); the exact gradient removes the part of G along V_hat")]
        expect_close(f"grad_A ({label})", grad_A, ref.A_grad, mistakes=wrong)
        wrong = [] if detach else [(detached.B_grad, wrong[0][1])]
        expect_close(f"grad_B ({label})", grad_B, ref.B_grad, mistakes=wrong)
        expect_close("grad_x", grad_x, dx_ref)
    t.ok("forward intermediates (V, norm, W_dora) and both backward modes match the library's DoRALayer")

    arrays = {"grad_m": m, "grad_A": A, "grad_B": B, "grad_x": x}
    loss = lambda: float(np.sum(mod.dora_forward(x, W0, A, B, m, s)[0] * G))  # noqa: E731
    grads = dict(zip(arrays, _dora_call(mod, G, mod.dora_forward(x, W0, A, B, m, s)[1], False)))
    for name, arr in arrays.items():
        expect_grad(f"{name} (exact)", grads[name], loss, arr)
    t.ok("exact gradients agree with central differences (float64)")
