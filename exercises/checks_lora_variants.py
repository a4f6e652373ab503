"""Checkers for the LoRA variants: 9.13 LoRA on the feed-forward layers, 9.14 LoRA
dropout, 9.20 DoRA's gradients. References: the library's ``MLP`` wrapped with
``peft.LoRALinear``, ``peft.LoRALayer`` and ``dora.DoRALayer``, in float64.
"""
from __future__ import annotations

import numpy as np

from checking import (expect, expect_close, expect_equal, expect_grad, expect_raises,
                      expect_shape, expect_tuple, expect_unchanged, randn, rng_for)
from checks_lora import branch_forward, lib_lora, scaling_factors
from registry import exercise

import peft
from minigpt import MLP, GPTConfig


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
    expect_tuple("dora_backward", out, "grad_m, grad_A, grad_B, grad_x")
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
        expect_tuple("dora_forward", out, "y, cache")
        expect(isinstance(out[1], dict), "dora_forward's cache must be a dict")
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
