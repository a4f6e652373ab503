"""Checkers for prompts and prefixes: 9.16 prefix MLP, 9.17 LoRA + prompt tuning on the
mini GPT, 9.19 the attention backward with a prefix. References:
``peft_methods.PrefixEncoder``, ``get_peft_model`` with two adapters active, and
``minigpt.CausalSelfAttention``.
"""
from __future__ import annotations

import numpy as np

from checking import (expect, expect_close, expect_equal, expect_grad, expect_raises,
                      expect_shape, expect_unchanged, randn, rng_for)
from registry import exercise


# ------------------------------------------------------------------ 9.16
@exercise("9.16", "ex9_16_prefix_mlp", "Prefix tuning through an MLP (reparameterisation)",
          "suggested")
def check_prefix_mlp(mod, t):
    from types import SimpleNamespace

    from minigpt import GPTConfig
    from peft_config import PrefixTuningConfig
    from peft_methods import PrefixEncoder
    rng = rng_for(916)
    L, H, dh, P, hidden = 2, 2, 3, 4, 5
    D = H * dh
    pm = mod.PrefixMLP(L, H, dh, P, hidden, rng=np.random.default_rng(1))
    pm.b1, pm.b2 = randn(rng, hidden, scale=0.1), randn(rng, L * 2 * D, scale=0.1)
    cfg = GPTConfig(vocab_size=4, context_length=8, d_model=D, n_layers=L, n_heads=H, dtype=np.float64)
    ref = PrefixEncoder(cfg, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True,
                                                encoder_hidden_size=hidden), np.random.default_rng(0))
    ref.embedding = pm.embedding.copy()
    ref.mlp_in.weight, ref.mlp_in.bias = pm.W1.copy(), pm.b1.copy()
    ref.mlp_out.weight, ref.mlp_out.bias = pm.W2.copy(), pm.b2.copy()
    expected = ref.table()
    flat = np.tanh(pm.embedding @ pm.W1.T + pm.b1) @ pm.W2.T + pm.b2
    expect_close("table()", pm.table(), expected, mistakes=[
        (flat.reshape(L, 2, P, H, dh), "right shape, wrong layout: row p of the MLP output holds "
         "prefix position p of every layer; reshape to (P, L, 2, H, d_head), then move P to axis 2"),
        (np.tanh(pm.embedding @ pm.W1.T) @ pm.W2.T, "the biases b1 / b2 are missing")])
    t.ok("table() matches the library's PrefixEncoder (prefix_projection=True)")

    grad = randn(rng, L, 2, P, H, dh)
    ref.layer_prefixes()
    ref.backward_from_layers([SimpleNamespace(self_attn=SimpleNamespace(prefix_grad=(grad[i, 0], grad[i, 1])))
                              for i in range(L)])
    pm.table()
    pm.backward(grad.copy())
    for name, want in [("W2_grad", ref.mlp_out.weight_grad), ("b2_grad", ref.mlp_out.bias_grad),
                       ("W1_grad", ref.mlp_in.weight_grad), ("b1_grad", ref.mlp_in.bias_grad),
                       ("embedding_grad", ref.embedding_grad)]:
        expect_close(name, getattr(pm, name, None), want)
    t.ok("backward: every MLP gradient matches the library")

    loss = lambda: float(np.sum(pm.table() * grad))  # noqa: E731
    for name, arr in [("W1_grad", pm.W1), ("b1_grad", pm.b1), ("embedding_grad", pm.embedding),
                      ("b2_grad", pm.b2)]:
        pm.table()
        pm.backward(grad)
        expect_grad(name, getattr(pm, name), loss, arr)
    t.ok("gradients agree with central differences (float64)")

    table = pm.collapse()
    expect_close("collapse()", table, expected)
    pm.W1 = pm.W1 + 1.0
    expect_close("collapse()'s array after the MLP changed", table, expected,
                 context=" (collapse must return a copy that no longer depends on the MLP)")
    expect_equal("the collapsed table's size", np.asarray(table).size, L * 2 * P * D,
                 " = L * 2 * P * d_model (what inference keeps)")
    t.ok("collapse(): the table to keep after training")


# ------------------------------------------------------------------ 9.17
@exercise("9.17", "ex9_17_lora_prompt", "LoRA and prompt tuning together on the mini GPT",
          "suggested")
def check_lora_prompt(mod, t):
    from checking import tiny_gpt
    from peft_model import LoraConfig, PromptTuningConfig, get_peft_model
    rng = rng_for(917)
    P, r, alpha, targets = 3, 2, 4.0, ["q_proj", "v_proj", "fc1"]
    expect_raises(ValueError, lambda: mod.LoRAPromptModel(tiny_gpt(5), P, r, alpha, ["c_attn"]),
                  "target_modules=['c_attn'] should raise ValueError (the mini GPT has no c_attn)")
    model = tiny_gpt(5, well_scaled=True)
    table = model.embed_tokens.weight.copy()
    lm = mod.LoRAPromptModel(model, P, r, alpha, targets, rng=np.random.default_rng(1))
    paths = sorted(f"layers.{i}.{'mlp' if n == 'fc1' else 'self_attn'}.{n}" for i in range(2) for n in targets)
    expect_equal("sorted(lora_layers)", sorted(lm.lora_layers), paths)
    for p in paths:
        expect(model.get_submodule(p) is lm.lora_layers[p], f"{p} in the model is not your "
               "LoRALinear: replace the module in its parent (setattr(block.self_attn, name, wrapper))")
    trainable = [n for n, _ in model.named_parameters(trainable_only=True)]
    expect(all(".lora." in n for n in trainable), "the base model must be frozen; trainable: "
           + ", ".join(n for n in trainable if ".lora." not in n)[:200])
    prompt = expect_shape("prompt", lm.prompt, (P, 8))
    for i, row in enumerate(prompt):
        expect(np.any(np.all(table == row, axis=1)), f"prompt row {i} must be a copy of a row of "
               "model.embed_tokens.weight")
    params = lm.trainable_parameters()
    n_expected = P * 8 + 2 * (2 * r * 16 + r * (8 + 32))      # d_model 8, fc1 8 -> 32, 2 blocks
    expect_equal("the number of trainable numbers", sum(np.size(a) for a in params.values()), n_expected,
                 " = P * d_model + per block r * (in + out) for each target")
    t.ok("LoRA wraps the targets inside the (frozen) model; the prompt starts from vocabulary rows")

    ref = get_peft_model(tiny_gpt(5, well_scaled=True), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    ref.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=P))
    ref.set_adapter(["default", "prompt"])
    tokens = rng.integers(0, 11, (2, 5))
    for p in paths:
        layer = lm.lora_layers[p].lora
        layer.A[...] = randn(rng, *layer.A.shape, scale=0.5)
        layer.B[...] = randn(rng, *layer.B.shape, scale=0.5)
        ref_layer = ref.base_model.get_submodule(p).lora
        ref_layer.A[...], ref_layer.B[...] = layer.A, layer.B
    ref.prompt_encoder.prompt[...] = lm.prompt
    expected = ref(tokens)
    expect_close("forward(tokens)", lm.forward(tokens), expected, context=" (logits of the real tokens only)")
    t.ok("forward matches get_peft_model with a LoRA and a prompt-tuning adapter active together")

    dlogits = randn(rng, *expected.shape)
    ref.zero_grad()
    ref.backward(dlogits)
    for _ in range(2):                                      # twice: gradients must not pile up
        lm.forward(tokens)
        lm.backward(dlogits)
    expect_close("prompt_grad", lm.prompt_grad, ref.prompt_encoder.prompt_grad,
                 factors=[(2.0, "gradients piled up over two backward calls: zero them first")])
    for p in paths:
        mine, theirs = lm.lora_layers[p].lora, ref.base_model.get_submodule(p).lora
        expect_close(f"{p}.lora.A_grad", mine.A_grad, theirs.A_grad,
                     factors=[(2.0, "gradients piled up over two backward calls: start backward "
                               "with self.model.zero_grad()")])
        expect_close(f"{p}.lora.B_grad", mine.B_grad, theirs.B_grad)
    t.ok("backward: prompt and LoRA gradients match the library (and do not pile up)")

    loss = lambda: float(np.sum(lm.forward(tokens) * dlogits))  # noqa: E731
    A = lm.lora_layers[paths[0]].lora
    lm.forward(tokens)
    lm.backward(dlogits)
    expect_grad("prompt_grad", lm.prompt_grad, loss, lm.prompt, tol=1e-6)
    expect_grad(f"{paths[0]}.lora.A_grad", A.A_grad, loss, A.A, tol=1e-6)
    t.ok("gradients agree with central differences through the whole model")


# ------------------------------------------------------------------ 9.19
def _softmax_masked(scores, allowed):
    s = np.where(allowed, scores, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@exercise("9.19", "ex9_19_prefix_attention_backward", "Attention backward with a key/value prefix",
          "ours")
def check_prefix_attention(mod, t):
    from minigpt import CausalSelfAttention, GPTConfig
    rng = rng_for(919)
    B, T, H, dh, P = 2, 4, 2, 4, 3
    D = H * dh
    attn = CausalSelfAttention(GPTConfig(d_model=D, n_heads=H, n_layers=1, dtype=np.float64),
                               np.random.default_rng(0))
    for _, p in attn.named_parameters():
        p[...] = rng.standard_normal(p.shape) / np.sqrt(p.shape[-1])
    x, pk, pv = randn(rng, B, T, D), randn(rng, P, H, dh), randn(rng, P, H, dh)
    final = attn.forward(x, prefix=(pk, pv))                # the library's whole attention
    split = lambda z: z.reshape(B, T, H, dh).transpose(0, 2, 1, 3)  # noqa: E731  (B, H, T, dh)
    q, k, v = (split(x @ lin.weight.T + lin.bias) for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
    k_all = np.concatenate([np.broadcast_to(pk.swapaxes(0, 1), (B, H, P, dh)), k], axis=2)
    v_all = np.concatenate([np.broadcast_to(pv.swapaxes(0, 1), (B, H, P, dh)), v], axis=2)
    res = mod.prefix_attention_forward(q.copy(), k.copy(), v.copy(), pk.copy(), pv.copy())
    expect(isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], dict),
           "prefix_attention_forward must return (out, cache) with cache a dict")
    out, cache = res
    expect_close("cache['k_all']", cache.get("k_all"), k_all, context=" (prefix keys first)")
    expect_close("cache['v_all']", cache.get("v_all"), v_all)
    allowed = np.concatenate([np.ones((T, P), bool), np.tril(np.ones((T, T), bool))], axis=1)
    raw = q @ k_all.swapaxes(-1, -2) / np.sqrt(dh)
    att = _softmax_masked(raw, allowed)
    expect_close("cache['att']", cache.get("att"), att, mistakes=[
        (_softmax_masked(raw, np.tril(np.ones((T, P + T), bool))), "the prefix must be visible to "
         "every query: the causal mask applies among the real tokens only"),
        (_softmax_masked(raw, np.ones((T, P + T), bool)), "the causal mask among the real tokens "
         "is missing")])
    scores = expect_shape("cache['scores']", cache.get("scores"), (B, H, T, P + T))
    expect_close("cache['scores'] where a query may look", scores[..., allowed], raw[..., allowed],
                 factors=[(np.sqrt(dh), "divide the scores by sqrt(d_head)")])
    expect_close("out", out, att @ v_all)
    merged = np.asarray(out).transpose(0, 2, 1, 3).reshape(B, T, D)
    expect_close("out_proj(your out, heads merged)", merged @ attn.out_proj.weight.T + attn.out_proj.bias,
                 final, context=" (the library's CausalSelfAttention with the same prefix)")
    t.ok("forward intermediates k_all, v_all, scores, att and out; the whole matches the "
         "library's attention")

    G = randn(rng, B, T, D)
    attn.backward(G)
    dout = split(G @ attn.out_proj.weight)                  # dL/d(attention output), (B, H, T, dh)
    dout_before = dout.copy()
    grads = mod.prefix_attention_backward(dout, cache)
    expect_unchanged("dout", dout_before, dout)
    expect(isinstance(grads, dict), "prefix_attention_backward must return a dict")
    datt = dout @ v_all.swapaxes(-1, -2)
    expect_close("datt", grads.get("datt"), datt)
    dscores = att * (datt - np.sum(datt * att, -1, keepdims=True))
    expect_close("dscores", grads.get("dscores"), dscores, mistakes=[
        (att * datt, "the softmax backward misses the subtraction: "
         "dscores = att * (datt - sum(datt * att, axis=-1))")])
    dk_all = dscores.swapaxes(-1, -2) @ q / np.sqrt(dh)
    dv_all = att.swapaxes(-1, -2) @ dout
    scale = [(np.sqrt(dh), "the backward of the 1/sqrt(d_head) scaling is missing")]
    expect_close("dq", grads.get("dq"), dscores @ k_all / np.sqrt(dh), factors=scale)
    expect_close("dk", grads.get("dk"), dk_all[:, :, P:], factors=scale)
    expect_close("dv", grads.get("dv"), dv_all[:, :, P:])
    for name, lib in (("dprefix_k", attn.prefix_grad[0]), ("dprefix_v", attn.prefix_grad[1])):
        expect_close(name, grads.get(name), lib, context=" = (P, H, d_head): summed over the batch",
                     factors=[(1 / B, "you averaged over the batch; sum instead")])
    t.ok("backward, one named intermediate at a time: datt, dscores, dq, dk, dv, and the "
         "prefix gradients match the library")

    loss = lambda: float(np.sum(mod.prefix_attention_forward(q, k, v, pk, pv)[0] * dout))  # noqa: E731
    for name, arr in [("dq", q), ("dk", k), ("dv", v), ("dprefix_k", pk), ("dprefix_v", pv)]:
        expect_grad(name, grads[name], loss, arr)
    t.ok("gradients agree with central differences (float64)")
