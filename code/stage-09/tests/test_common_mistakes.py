"""Common PEFT mistakes 1-12 (the course's), each reproduced: the wrong version shows its
symptom, the right one does not. Mistakes 13-23 are in ``test_common_mistakes_more.py``.

Every test here is linked from ``common_mistakes.md`` (same numbering). A test
runs the mistaken code and ASSERTS the symptom a learner would see, then runs the
fix and asserts the symptom is gone -- so each test fails if either half stops
being true. Symptoms are measured in things that do not flicker: exact outputs,
ratios, parameter and byte counts, losses of seeded runs, and matmul FLOPs counted
by ``Counting`` (an ``ndarray`` subclass that intercepts ``np.matmul``), never wall
time. The numbers the guide quotes are left in ``MEASURED``.
"""
import functools

import numpy as np
import pytest
from gradcheck import well_scaled
from mistakes_support import (CFG, MEASURED, Counting, base_model, batch, meter, plain,
                              randomise_lora_B)

from checkpoint import save_model
from minigpt import CausalSelfAttention, GPTConfig, GPT
from nn import Linear, cross_entropy
from optim import AdamW
from peft import Adapter, LoRALayer, LoRALinear, PromptTuning
from peft_model import LoraConfig, get_peft_model

# ==== 1. training the base weights along with LoRA ===================================
def test_01_unfrozen_base_drifts_from_pretrained():
    tokens, targets = batch()
    pretrained = base_model()
    reference = pretrained.forward(tokens)                  # the pretrained model's logits

    def one_step(unfreeze_base):
        model = get_peft_model(base_model(), LoraConfig(r=2, lora_alpha=4))
        if unfreeze_base:                                   # the mistake
            model.base_model.unfreeze()
        before = {n: p.copy() for n, p in model.base_model.named_parameters()
                  if ".lora." not in n}
        opt = AdamW(model, lr=1e-2)
        model.zero_grad()
        loss, d = cross_entropy(model.forward(tokens), targets)
        model.backward(d)
        opt.step()
        changed = [n for n, p in before.items() if not np.array_equal(p, model.get_parameter(n))]
        trainable, total = model.get_nb_trainable_parameters()
        with model.disable_adapter():
            disabled = model.forward(tokens)
        return changed, trainable, total, disabled

    changed, trainable, total, disabled = one_step(unfreeze_base=True)
    assert len(changed) > 10 and trainable == total         # every weight trains
    assert np.abs(disabled - reference).max() > 1e-3        # "base" is no longer the base

    changed, trainable, total, disabled = one_step(unfreeze_base=False)
    assert changed == []                                    # bit-for-bit unchanged
    assert trainable == 2 * 2 * 2 * (2 * CFG.d_model)       # layers x targets x r x (in+out)
    assert np.array_equal(disabled, reference)


# ==== 2. B not zero at initialisation ================================================
def test_02_random_B_moves_output_at_step_zero():
    tokens, targets = batch()
    reference = base_model().forward(tokens)
    wrong = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    right = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8))
    assert np.abs(wrong.forward(tokens) - reference).max() > 1e-2
    assert cross_entropy(wrong.forward(tokens), targets)[0] != cross_entropy(reference, targets)[0]
    assert np.array_equal(right.forward(tokens), reference)  # starts exactly at the base model


# ==== 3. missing alpha / r scaling ====================================================
def lora_regression(seed=0, d=32, task_rank=4, n=64, noise=0.0):
    """A layer ``W0`` and data whose targets need a rank-``task_rank`` change of it."""
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((d, d)) / np.sqrt(d)
    shift = rng.standard_normal((d, task_rank)) @ rng.standard_normal((task_rank, d))
    W = W0 + shift / np.sqrt(task_rank * d)
    X, X_test = rng.standard_normal((n, d)), rng.standard_normal((256, d))
    Y = X @ W.T + noise * rng.standard_normal((n, d))
    return W0, X, Y, X_test, X_test @ W.T


def train_lora(W0, X, Y, r, lr, scaling, steps):
    """AdamW on a LoRA layer with ``scaling`` (alpha / r, or 1 for "no scaling")."""
    layer = LoRALinear(W0.copy(), lora_rank=r, lora_alpha=scaling * r, rng=np.random.default_rng(1))
    opt = AdamW(layer, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        layer.zero_grad()
        diff = layer(X) - Y
        layer.backward(2 * diff / diff.size)
        opt.step()
    return layer


LR_GRID = 10.0 ** np.arange(-3, 0.01, 0.125)                # 1e-3 .. 1, eight points a decade


@functools.lru_cache(maxsize=None)
def best_learning_rates(alpha=8.0, ranks=(2, 32), steps=10):
    """``{(variant, r): best lr}`` on ``LR_GRID`` after a short AdamW run, with and without
    the ``alpha / r`` factor."""
    W0, X, Y, _, _ = lora_regression()
    best = {}
    for variant, scaling in (("none", lambda r: 1.0), ("alpha/r", lambda r: alpha / r)):
        for r in ranks:
            losses = [np.mean((train_lora(W0, X, Y, r, lr, scaling(r), steps)(X) - Y) ** 2)
                      for lr in LR_GRID]
            best[variant, r] = float(LR_GRID[int(np.nanargmin(losses))])
    return best


def test_03_missing_scaling_moves_the_best_learning_rate_with_r():
    best = best_learning_rates()
    MEASURED[3] = dict(best)
    without = best["none", 2] / best["none", 32]            # the mistake: no alpha / r
    with_scaling = best["alpha/r", 2] / best["alpha/r", 32]
    assert without >= 2.0                                   # 16x the rank: retune the rate
    assert 1 / 1.34 <= with_scaling <= 1.34                 # the fix: within one grid step

    rng = np.random.default_rng(0)                          # and the merge must scale too
    W, x = rng.standard_normal((10, 12)), rng.standard_normal((5, 12))
    lora = LoRALayer(12, 10, rank=4, alpha=16.0, rng=rng, dtype=np.float64)
    lora.B = rng.standard_normal((10, 4))                   # a trained adapter
    right = lora.forward(x, W)
    naive_merged = W + lora.B @ lora.A                      # merging without the scaling
    assert np.abs(x @ naive_merged.T - right).max() > 1e-2  # merged != what was trained
    np.testing.assert_allclose(x @ lora.merge_weights(W).T, right, rtol=1e-12, atol=1e-12)


# ==== 4. LoRA on the wrong layers =====================================================
def test_04_target_names_that_match_nothing():
    model = base_model()

    def naive_inject(model, targets):                       # the mistake: silent matching
        return [p for p, _ in model.named_modules() if p.split(".")[-1] in targets]

    assert naive_inject(model, ["c_attn"]) == []            # GPT-2 names: zero layers adapted
    with pytest.raises(ValueError, match="q_proj") as err:  # the library refuses, listing names
        get_peft_model(base_model(), LoraConfig(target_modules=["c_attn"]))
    assert "fc1" in str(err.value) and "out_proj" in str(err.value)
    with pytest.raises(ValueError, match="matched no module"):   # a bare string is a regex
        get_peft_model(base_model(), LoraConfig(target_modules="q_proj"))

    right = get_peft_model(base_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wrapped = [p for p, _ in right.wrappers()]
    assert len(wrapped) == 2 * CFG.n_layers
    assert right.get_nb_trainable_parameters()[0] == 2 * CFG.n_layers * 2 * (2 * CFG.d_model)


# ==== 5. rank too high ================================================================
@functools.lru_cache(maxsize=None)
def held_out_error_by_rank(ranks=(1, 2, 4, 8, 16, 32), task_rank=4):
    """Held-out MSE after 100 AdamW steps on 64 noisy examples whose targets need a
    rank-``task_rank`` change of a 32 x 32 layer, for each LoRA rank."""
    W0, X, Y, X_test, Y_test = lora_regression(task_rank=task_rank, noise=0.3)
    return {r: float(np.mean((train_lora(W0, X, Y, r, 0.03, 8.0 / r, 100)(X_test) - Y_test) ** 2))
            for r in ranks}


def test_05_rank_too_high_costs_params_but_not_quality():
    d = 32
    error = held_out_error_by_rank()
    MEASURED[5] = dict(error)
    assert error[4] < 0.1 * error[1]                        # rank helps up to what the task needs
    assert min(error[8], error[16], error[32]) > error[4]   # the mistake: more rank, no better
    counts = {r: LoRALayer(d, d, rank=r).num_parameters() for r in error}
    assert all(counts[r] == r * 2 * d for r in counts)      # ...at a cost linear in r
    assert LoRALayer(d, d, rank=d // 2).compression_ratio() == 1.0   # break-even: no saving

    lora = LoRALayer(d, d, rank=2 * d, init_lora_weights=False, rng=np.random.default_rng(0),
                     dtype=np.float64)                      # past the width: unusable rank
    assert np.linalg.matrix_rank(lora.delta_weight()) == d and lora.compression_ratio() == 4.0


# ==== 6. not merging for inference ====================================================
def test_06_unmerged_inference_does_extra_matmuls():
    tokens, _ = batch()
    N, D, r = tokens.size, CFG.d_model, 4
    model = get_peft_model(base_model(), LoraConfig(r=r, lora_alpha=8))
    randomise_lora_B(model)
    model.eval()
    meter(model)

    Counting.reset()
    unmerged = plain(model.forward(tokens))                 # the mistake: serve unmerged
    calls_unmerged, flops_unmerged = Counting.calls, Counting.flops
    model.merge_adapter()
    Counting.reset()
    merged = plain(model.forward(tokens))                   # the fix
    calls_merged, flops_merged = Counting.calls, Counting.flops

    targets = 2 * CFG.n_layers
    MEASURED[6] = dict(calls_unmerged=calls_unmerged, calls_merged=calls_merged)
    assert calls_unmerged - calls_merged == 2 * targets     # x @ A.T and h @ B.T per target
    assert flops_unmerged - flops_merged == targets * 2 * N * (D * r + r * D)
    np.testing.assert_allclose(merged, unmerged, rtol=1e-10, atol=1e-10)
    base = meter(base_model())
    Counting.reset()
    base.forward(tokens)
    assert (Counting.calls, Counting.flops) == (calls_merged, flops_merged)


# ==== 7. the soft prompt in the wrong place ==========================================
def test_07_prompt_after_the_input_is_never_seen():
    model = base_model()
    tokens, targets = batch()
    T, P = tokens.shape[1], 3
    prompt = PromptTuning(CFG.d_model, prompt_length=P, rng=np.random.default_rng(0),
                          dtype=np.float64)

    def real_logits_and_prompt_grad(prompt_first):
        x = model.embed(tokens)                                          # (B, T, D)
        p = np.broadcast_to(prompt.prompt, (x.shape[0], P, CFG.d_model))
        full = np.concatenate([p, x] if prompt_first else [x, p], axis=1)
        logits = model.forward_embeds(full)                              # (B, P+T, V)
        real = slice(P, P + T) if prompt_first else slice(0, T)
        loss, d_real = cross_entropy(logits[:, real], targets)
        dlogits = np.zeros_like(logits)
        dlogits[:, real] = d_real
        dx = model.backward_embeds(dlogits)
        dprompt = dx[:, :P] if prompt_first else dx[:, T:]
        return logits[:, real].copy(), dprompt.sum(0)

    nudge = np.random.default_rng(1).standard_normal(prompt.prompt.shape)
    logits, grad = real_logits_and_prompt_grad(prompt_first=False)       # the mistake
    prompt.prompt += nudge
    logits_moved, _ = real_logits_and_prompt_grad(prompt_first=False)
    assert np.array_equal(logits, logits_moved) and not grad.any()      # no effect, no gradient

    logits, grad = real_logits_and_prompt_grad(prompt_first=True)        # the fix
    prompt.prompt -= nudge
    logits_moved, _ = real_logits_and_prompt_grad(prompt_first=True)
    assert np.abs(logits - logits_moved).max() > 1e-3 and np.abs(grad).max() > 1e-6


# ==== 8. an adapter without its residual connection ==================================
def test_08_adapter_without_residual_is_not_identity():
    rng = np.random.default_rng(0)
    adapter = Adapter(16, bottleneck_dim=4, rng=rng, dtype=np.float64)
    h = rng.standard_normal((2, 5, 16))
    dout = rng.standard_normal(h.shape)

    no_residual = adapter.branch(h)                         # the mistake: f(h W_down) W_up
    assert not no_residual.any()                            # zero at init: the sublayer is erased
    assert not adapter.branch_backward(dout).any()          # and no gradient reaches below

    assert np.array_equal(adapter.forward(h), h)            # the fix: h + f(h W_down) W_up
    assert np.array_equal(adapter.backward(dout), dout)


# ==== 9. the learning rate of full fine-tuning ========================================
def test_09_full_finetuning_learning_rate_is_too_small_for_lora():
    rng = np.random.default_rng(0)
    d = 32
    W0 = rng.standard_normal((d, d)) / np.sqrt(d)
    shift = rng.standard_normal((d, 2)) @ rng.standard_normal((2, d)) / np.sqrt(2 * d)
    X = rng.standard_normal((64, d))
    Y = X @ (W0 + shift).T                                  # the task: a rank-2 change of W0

    def relative_loss_drop(lr, steps=30):
        layer = LoRALinear(W0.copy(), lora_rank=4, lora_alpha=8, rng=np.random.default_rng(1))
        opt = AdamW(layer, lr=lr)
        start = np.mean((layer(X) - Y) ** 2)
        for _ in range(steps):
            layer.zero_grad()
            diff = layer(X) - Y
            layer.backward(2 * diff / diff.size)
            opt.step()
        return (start - np.mean((layer(X) - Y) ** 2)) / start

    small, ten_x, hundred_x = (relative_loss_drop(lr) for lr in (1e-5, 1e-4, 1e-3))
    MEASURED[9] = {"1e-5": small, "1e-4": ten_x, "1e-3": hundred_x}
    assert small < 1e-3                                     # the mistake: the loss barely moves
    assert ten_x > 5 * small and hundred_x > 5 * ten_x      # each 10x of LR buys > 5x progress
    assert hundred_x > 0.05


# ==== 10. saving the whole model instead of the adapter ===============================
def test_10_saving_whole_model_instead_of_adapter(tmp_path):
    cfg = GPTConfig(vocab_size=64, context_length=32, d_model=64, n_layers=2, n_heads=4)
    model = get_peft_model(GPT(cfg), LoraConfig(r=4, lora_alpha=8))
    save_model(model.base_model, tmp_path / "whole")         # the mistake: every weight again
    model.save_pretrained(tmp_path / "adapter")             # the fix: only A and B (+ config)

    def size(directory):
        return sum(f.stat().st_size for f in directory.iterdir())

    whole, adapter = size(tmp_path / "whole"), size(tmp_path / "adapter")
    lora_bytes = 4 * model.get_nb_trainable_parameters()[0]              # float32 A and B
    MEASURED[10] = dict(whole=whole, adapter=adapter)
    assert whole > sum(p.nbytes for p in model.base_model.parameters())   # a full copy
    assert whole > 15 * adapter                             # ~46x here; ~1000x at 7B, r=8
    assert adapter < lora_bytes + 4096                      # A, B, a header and the JSON


# ==== 11. the padding mask hides the prefix ==========================================
def test_11_padding_mask_hiding_the_prefix(monkeypatch):
    rng = np.random.default_rng(0)
    attn = CausalSelfAttention(CFG, rng)
    well_scaled(attn)
    B, T, P = 2, 5, 3
    x = rng.standard_normal((B, T, CFG.d_model))
    mask = np.ones((B, T), dtype=int)
    mask[1, :2] = 0                                         # left padding in row 1
    prefix = tuple(rng.standard_normal((P, CFG.n_heads, CFG.d_head)) for _ in range(2))
    dout = rng.standard_normal((B, T, CFG.d_model))

    def run(with_prefix=True):
        y = attn.forward(x, attention_mask=mask, prefix=prefix if with_prefix else None)
        attn.backward(dout)
        return y, attn.att.copy(), attn.prefix_grad

    def zero_padded_mask(T, P, attention_mask=None):         # the mistake: np.pad fills zeros
        causal = np.concatenate([np.ones((T, P), bool), np.tril(np.ones((T, T), bool))], 1)
        keys = np.pad(attention_mask, ((0, 0), (P, 0))).astype(bool)
        return causal[None, None] & keys[:, None, None, :]

    def not_extended_mask(T, P, attention_mask=None):       # the mistake: (B, T) for P+T keys
        causal = np.concatenate([np.ones((T, P), bool), np.tril(np.ones((T, T), bool))], 1)
        return causal[None, None] & attention_mask.astype(bool)[:, None, None, :]

    right_y, right_att, right_grad = run()                  # library: prefix columns are ones
    assert right_att[..., :P].min() > 0 and np.abs(right_grad[0]).max() > 1e-6

    with monkeypatch.context() as m:
        m.setattr(CausalSelfAttention, "build_mask", staticmethod(zero_padded_mask))
        y, att, grad = run()
        assert not att[..., :P].any()                       # no query can see the prefix
        assert not grad[0].any() and not grad[1].any()      # so the prefix never learns
        no_prefix_y, _, _ = run(with_prefix=False)
        np.testing.assert_allclose(y, no_prefix_y, rtol=1e-12, atol=1e-12)
        m.setattr(CausalSelfAttention, "build_mask", staticmethod(not_extended_mask))
        with pytest.raises(ValueError, match="broadcast"):
            run()
    assert np.abs(right_y - no_prefix_y).max() > 1e-3


# ==== 12. computing gradients of frozen weights =======================================
def test_12_frozen_gradients_cost_matmuls_and_memory():
    tokens, targets = batch()
    N, V, D = tokens.size, CFG.vocab_size, CFG.d_model

    def backward_cost(compute_frozen_grads):
        model = get_peft_model(base_model(), LoraConfig(r=2, lora_alpha=4))
        if compute_frozen_grads:                            # the mistake: "freeze" by not stepping
            model.base_model.unfreeze()
        meter(model)
        model.zero_grad()
        _, d = cross_entropy(plain(model.forward(tokens)), targets)
        Counting.reset()
        model.backward(d)
        grads = [model.get_grad(n) for n, _ in model.named_parameters()]
        grad_bytes = sum(g.nbytes for g in grads if g is not None)
        linears = [m for _, m in model.named_modules() if isinstance(m, Linear)]
        return Counting.flops, grad_bytes, linears, model

    wrong_flops, wrong_bytes, linears, model = backward_cost(True)
    right_flops, right_bytes, _, _ = backward_cost(False)
    weight_grad_flops = sum(2 * N * m.in_features * m.out_features for m in linears)
    MEASURED[12] = dict(wrong_flops=wrong_flops, right_flops=right_flops,
                        wrong_bytes=wrong_bytes, right_bytes=right_bytes)
    assert wrong_flops - right_flops == weight_grad_flops + 2 * N * V * D   # + the tied head
    assert wrong_flops > 1.5 * right_flops
    assert wrong_bytes == sum(p.nbytes for p in model.parameters())         # a gradient per weight
    assert right_bytes == sum(p.nbytes for n, p in model.named_parameters() if ".lora." in n)
    assert wrong_bytes > 20 * right_bytes
