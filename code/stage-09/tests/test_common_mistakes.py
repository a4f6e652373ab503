"""Common PEFT mistakes, each reproduced: the wrong version shows its symptom, the right one does not.

Every test here is linked from ``common_mistakes.md`` (same numbering). A test
runs the mistaken code and ASSERTS the symptom a learner would see, then runs the
fix and asserts the symptom is gone -- so each test fails if either half stops
being true. Symptoms are measured in things that do not flicker: exact outputs,
ratios, parameter and byte counts, and matmul FLOPs counted by ``Counting`` (an
``ndarray`` subclass that intercepts ``np.matmul``), never wall time.
"""
import copy

import numpy as np
import pytest
from gradcheck import well_scaled

from checkpoint import copy_into, save_model
from gradcheck import GradientMismatch, check_module, compare, numerical_gradient
from minigpt import GPT, CausalSelfAttention, GPTConfig
from nf4 import quantize_nf4
from nn import Linear, cross_entropy, softmax
from optim import AdamW
from peft import Adapter, LoRALayer, LoRALinear, PromptTuning
from peft_config import PrefixTuningConfig, PromptTuningConfig
from peft_model import LoraConfig, get_peft_model
from quantization import QuantizedLinear

CFG = GPTConfig(vocab_size=16, context_length=12, d_model=16, n_layers=2, n_heads=2,
                dtype=np.float64)


def base_model(seed=0, cfg=CFG):
    """A small float64 GPT with well-scaled weights (stands in for a pretrained model)."""
    return well_scaled(GPT(cfg, seed=seed), seed=seed)


def batch(B=3, T=6, seed=0, cfg=CFG):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


def randomise_lora_B(model, seed=1, std=0.5):
    """Pretend the adapter has trained: give every ``lora.B`` random values."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith("lora.B"):
            p[...] = rng.standard_normal(p.shape) * std


# ---- a FLOP meter: counts every matmul that touches a Counting array ----------------
class Counting(np.ndarray):
    """An ``ndarray`` that counts matmuls (calls and FLOPs) and stays ``Counting``
    through every ufunc, so all arrays computed from it are metered too."""

    calls = 0
    flops = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = [i.view(np.ndarray) if isinstance(i, np.ndarray) else i for i in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) for o in kwargs["out"])
        if ufunc is np.matmul and method == "__call__":
            a, b = (np.atleast_2d(p) for p in plain)
            batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
            Counting.calls += 1
            Counting.flops += 2 * int(np.prod(batch)) * a.shape[-2] * a.shape[-1] * b.shape[-1]
        result = getattr(ufunc, method)(*plain, **kwargs)
        return result.view(Counting) if isinstance(result, np.ndarray) else result

    @classmethod
    def reset(cls):
        cls.calls = cls.flops = 0


def meter(model):
    """Make every parameter of ``model`` a Counting view (same memory, same values)."""
    for _, module in model.named_modules():
        for name, value in module.own_parameters():
            setattr(module, name, value.view(Counting))
    return model


def plain(a):
    return np.asarray(a).view(np.ndarray)


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
def test_03_missing_scaling_changes_update_by_r_over_alpha():
    rng = np.random.default_rng(0)
    r, alpha, d_in, d_out = 4, 16.0, 12, 10
    W = rng.standard_normal((d_out, d_in))
    lora = LoRALayer(d_in, d_out, rank=r, alpha=alpha, rng=rng, dtype=np.float64)
    lora.B = rng.standard_normal((d_out, r))                # a trained adapter
    x = rng.standard_normal((5, d_in))

    unscaled = x @ W.T + (x @ lora.A.T) @ lora.B.T          # the mistake
    right = lora.forward(x, W)
    base = x @ W.T
    np.testing.assert_allclose(unscaled - base, (right - base) * r / alpha, rtol=1e-12)
    assert r / alpha == 0.25                                 # the update is 4x too small

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
def test_05_rank_too_high_costs_params_but_not_rank():
    d = 16
    counts = {r: LoRALayer(d, d, rank=r).num_parameters() for r in (1, 2, 4, 8, 16, 32)}
    assert all(counts[r] == r * 2 * d for r in counts)      # linear in r
    assert LoRALayer(d, d, rank=d // 2).compression_ratio() == 1.0   # break-even: no saving

    def update_rank(r):
        lora = LoRALayer(d, d, rank=r, init_lora_weights=False, rng=np.random.default_rng(r),
                         dtype=np.float64)
        return np.linalg.matrix_rank(lora.delta_weight()), lora.compression_ratio()

    rank, ratio = update_rank(2 * d)                        # the mistake: r = 2 d
    assert rank == d and ratio == 4.0                       # 4x the full matrix for rank d
    rank, ratio = update_rank(4)                            # the fix: r << d
    assert rank == 4 and ratio == 0.5


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
    assert wrong_flops - right_flops == weight_grad_flops + 2 * N * V * D   # + the tied head
    assert wrong_flops > 1.5 * right_flops
    assert wrong_bytes == sum(p.nbytes for p in model.parameters())         # a gradient per weight
    assert right_bytes == sum(p.nbytes for n, p in model.named_parameters() if ".lora." in n)
    assert wrong_bytes > 20 * right_bytes


# ==== 13. merging twice ===============================================================
def test_13_merging_twice_doubles_the_update():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 8))
    layer = LoRALinear(W.copy(), lora_rank=2, lora_alpha=4, rng=rng)
    layer.lora.B = rng.standard_normal((6, 2))
    x = rng.standard_normal((3, 8))
    base, unmerged = x @ W.T, layer.forward(x)

    naive = W.copy()
    for _ in range(2):                                      # the mistake: merge in a loop, twice
        naive += layer.lora.delta_weight()
    np.testing.assert_allclose(x @ naive.T - base, 2 * (unmerged - base), rtol=1e-12)

    layer.merge_in_place()                                  # the fix: merge once, flag it
    np.testing.assert_allclose(layer.forward(x), unmerged, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge_in_place()
    model = get_peft_model(base_model(), LoraConfig(r=2))
    model.merge_adapter()
    with pytest.raises(ValueError, match="already merged"):
        model.merge_adapter()


# ==== 14. dropout left on at evaluation ===============================================
def test_14_dropout_left_on_at_evaluation():
    tokens, _ = batch()
    model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5))
    randomise_lora_B(model)
    model.train()                                           # the mistake: evaluate in train mode
    assert np.abs(model.forward(tokens) - model.forward(tokens)).max() > 1e-3
    model.eval()                                            # the fix
    first = model.forward(tokens)
    assert np.array_equal(first, model.forward(tokens))


# ==== 15. gradient checks with an all-ones upstream gradient ==========================
def _check(f, backward, x, G):
    """Gradient check of ``L = sum(f(x) * G)``: analytic ``backward(G)`` vs central differences."""
    numeric = numerical_gradient(lambda: float(np.sum(f(x) * G)), x)
    return compare("dx", backward(G), numeric, tol=1e-7)


def test_15_all_ones_upstream_gradient_hides_wrong_backward():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5))
    s = softmax(x)
    right_softmax = lambda g: s * (g - (g * s).sum(-1, keepdims=True))   # noqa: E731
    wrong_softmax = lambda g: s * (g - g.mean(-1, keepdims=True))        # mean, not s-weighted
    W = rng.standard_normal((4, 6))
    h = rng.standard_normal((2, 5, 6))
    right_linear = lambda g: g @ W                                       # noqa: E731
    wrong_linear = lambda g: (g @ W)[:, ::-1]                            # positions swapped

    for f, x_, right, wrong in [(softmax, x, right_softmax, wrong_softmax),
                                (lambda t: t @ W.T, h, right_linear, wrong_linear)]:
        out_shape = f(x_).shape
        ones, G = np.ones(out_shape), rng.standard_normal(out_shape)
        assert _check(f, wrong, x_, ones) < 1e-7             # the mistake: the bug passes
        with pytest.raises(GradientMismatch):               # the fix: a random G catches it
            _check(f, wrong, x_, G)
        assert _check(f, right, x_, G) < 1e-7


# ==== 16. gradient checks with B = 0 ==================================================
class WrongAGradient(LoRALayer):
    """A LoRA layer whose ``A`` gradient forgets the scaling (dx and dB are right)."""

    def delta_backward(self, dout):
        r = self.rank
        x_drop, ax = self.cache[:2]                                        # lora_forward's cache
        self._accumulate("B", (dout.reshape(-1, self.out_features).T @ ax.reshape(-1, r))
                         * self.scaling)
        self._accumulate("A", (dout @ self.B).reshape(-1, r).T            # bug: no * scaling
                         @ x_drop.reshape(-1, self.in_features))
        return (dout @ self.B) * self.scaling @ self.A


def test_16_gradient_check_with_B_zero_hides_wrong_A_gradient():
    rng = np.random.default_rng(0)
    W, x = rng.standard_normal((5, 4)), rng.standard_normal((3, 4))

    def gradcheck(layer_cls, B):
        layer = layer_cls(4, 5, rank=2, alpha=6.0, rng=np.random.default_rng(1), dtype=np.float64)
        if B is not None:
            layer.B = B
        return check_module(layer, x, forward_kwargs={"W": W})

    assert max(gradcheck(WrongAGradient, None).values()) < 1e-7   # the mistake: B = 0, passes
    B = rng.standard_normal((5, 2))
    with pytest.raises(GradientMismatch, match="^A: "):          # the fix: randomise B first
        gradcheck(WrongAGradient, B)
    assert max(gradcheck(LoRALayer, B).values()) < 1e-7


# ==== 17. causal mask applied to the prefix ===========================================
def test_17_causal_mask_on_the_prefix(monkeypatch):
    rng = np.random.default_rng(0)
    attn = CausalSelfAttention(CFG, rng)
    well_scaled(attn)
    T, P = 4, 3
    x = rng.standard_normal((1, T, CFG.d_model))
    prefix = tuple(rng.standard_normal((P, CFG.n_heads, CFG.d_head)) for _ in range(2))

    def causal_over_everything(T, P, attention_mask=None):  # the mistake: tril over P+T keys
        return np.tril(np.ones((T, P + T), dtype=bool))[None, None]

    with monkeypatch.context() as m:
        m.setattr(CausalSelfAttention, "build_mask", staticmethod(causal_over_everything))
        attn.forward(x, prefix=prefix)
        wrong = attn.att.copy()                             # (1, H, T, P+T)
    assert not wrong[:, :, 0, 1:P].any()                    # query 0 sees only prefix slot 0
    assert not wrong[:, :, 0, P].any()                      # and not even its own token

    attn.forward(x, prefix=prefix)                          # the fix: causal among tokens only
    right = attn.att
    assert right[:, :, 0, :P].min() > 1e-3 and right[:, :, 0, P].min() > 1e-3
    expected = np.tril(np.ones((T, P + T), dtype=bool), k=P)  # = ones for the prefix + tril
    assert np.array_equal(CausalSelfAttention.build_mask(T, P)[0, 0], expected)


# ==== 18. prompt tuning: train and evaluate with different position conventions ======
def test_18_prompt_position_convention_mismatch():
    tokens, _ = batch()
    trained = get_peft_model(base_model(), PromptTuningConfig(num_virtual_tokens=3,
                                                             position_convention="keep"))
    logits = trained.forward(tokens)
    prompt = trained.prompt_encoder.prompt.copy()

    def evaluate_with(convention):
        model = get_peft_model(base_model(), PromptTuningConfig(num_virtual_tokens=3,
                                                               position_convention=convention))
        model.prompt_encoder.prompt[...] = prompt           # the same trained prompt
        return model.forward(tokens)

    assert np.abs(evaluate_with("shift") - logits).max() > 1e-2    # the mistake
    assert np.array_equal(evaluate_with("keep"), logits)           # the fix: same convention
    assert trained.peft_config["default"].to_dict()["position_convention"] == "keep"


# ==== 19. quantizing the LoRA weights instead of the base =============================
def test_19_quantizing_lora_weights_instead_of_base():
    rng = np.random.default_rng(0)
    d, r = 128, 8
    base = Linear(d, d, rng=rng)                            # float32 frozen base, 64 KiB
    A = (rng.standard_normal((r, d)) / np.sqrt(d)).astype(np.float32)
    B = (rng.standard_normal((d, r)) * 0.1).astype(np.float32)    # a trained adapter
    delta = B @ A

    # the mistake: the base stays float, A and B go to NF4
    wrong_base_bytes = base.weight.nbytes
    qA, qB = quantize_nf4(A), quantize_nf4(B)
    wrong_delta = qB.dequantize() @ qA.dequantize()
    wrong_error = np.abs(wrong_delta - delta).max() / np.abs(delta).max()

    # the fix: the base goes to NF4, LoRA stays in float
    qbase = QuantizedLinear.from_linear(base)
    layer = LoRALinear(qbase, lora_rank=r, lora_alpha=r)
    layer.lora.A, layer.lora.B = A.copy(), B.copy()
    right_error = np.abs(layer.lora.delta_weight() - delta).max()

    wrong_saving = (A.nbytes + B.nbytes) - (qA.nbytes + qB.nbytes)
    right_saving = base.weight.nbytes - qbase.nbytes_weight
    assert wrong_base_bytes == 4 * d * d                    # the base stays at 32 bits
    assert wrong_base_bytes > 7 * qbase.nbytes_weight       # instead of ~4.1 bits
    assert right_saving > 5 * wrong_saving                  # the bytes are in the base
    assert wrong_error > 0.02 and right_error == 0.0        # the trained update is distorted


# ==== 20. NF4 with one scale for the whole tensor =====================================
def test_20_nf4_without_blockwise_scales():
    rng = np.random.default_rng(0)
    w = rng.normal(0.0, 0.02, 4096).astype(np.float32)
    w[100] = 2.0                                            # one outlier, 100 standard deviations

    def mse_and_zeros(blocksize):
        q = quantize_nf4(w, blocksize=blocksize, double_quant=False).dequantize()
        return float(np.mean((q - w) ** 2)), float(np.mean(q == 0))

    wrong_mse, wrong_zeros = mse_and_zeros(w.size)          # the mistake: one absmax
    right_mse, right_zeros = mse_and_zeros(64)              # the fix: one absmax per 64
    assert wrong_mse > 10 * right_mse
    assert wrong_zeros > 0.99 and right_zeros < 0.2         # almost every weight became 0
    clean = rng.normal(0.0, 0.02, 4096).astype(np.float32)  # without outliers the gap is small
    one = np.mean((quantize_nf4(clean, clean.size, False).dequantize() - clean) ** 2)
    blocks = np.mean((quantize_nf4(clean, 64, False).dequantize() - clean) ** 2)
    assert one < 2 * blocks


# ==== 21. fan-in / fan-out transposition when loading weights =========================
def test_21_fan_in_fan_out_transposition():
    rng = np.random.default_rng(0)
    D = CFG.d_model
    x = rng.standard_normal((2, 3, D))
    conv1d_q = rng.standard_normal((D, D))                  # Hugging Face GPT-2 Conv1D: (in, out)
    conv1d_fc = rng.standard_normal((D, 4 * D))             # y = x @ W, no transpose
    model = base_model()
    q = model.get_submodule("layers.0.self_attn.q_proj")

    copy_into(model, {"layers.0.self_attn.q_proj.weight": conv1d_q})    # the mistake (square)
    assert np.abs(q(x) - (x @ conv1d_q + q.bias)).max() > 1e-2          # silently wrong
    with pytest.raises(ValueError, match=r"fc1.weight: shape \(16, 64\)"):  # non-square: caught
        copy_into(model, {"layers.0.mlp.fc1.weight": conv1d_fc})

    copy_into(model, {"layers.0.self_attn.q_proj.weight": conv1d_q.T,   # the fix: transpose
                      "layers.0.mlp.fc1.weight": conv1d_fc.T})
    np.testing.assert_allclose(q(x), x @ conv1d_q + q.bias, rtol=1e-12)

    # the same trap when merging LoRA into an (in, out) weight (peft's fan_in_fan_out=True)
    lora = LoRALayer(D, D, rank=2, alpha=4, init_lora_weights=False, dtype=np.float64)
    trained = x @ conv1d_q + lora.delta(x)
    wrong_merge, right_merge = conv1d_q + lora.delta_weight(), conv1d_q + lora.delta_weight().T
    assert np.abs(x @ wrong_merge - trained).max() > 1e-2
    np.testing.assert_allclose(x @ right_merge, trained, rtol=1e-12, atol=1e-12)


# ==== 22. forgetting zero_grad between steps ==========================================
def test_22_forgetting_zero_grad_accumulates():
    tokens, targets = batch()
    model = get_peft_model(base_model(), LoraConfig(r=2, lora_alpha=4))
    randomise_lora_B(model)
    name = "layers.0.self_attn.q_proj.lora.A"

    def grad_after(steps, zero_each_time):
        model.zero_grad()
        for _ in range(steps):
            if zero_each_time:
                model.zero_grad()
            _, d = cross_entropy(model.forward(tokens), targets)
            model.backward(d)
        return model.get_grad(name).copy()

    once = grad_after(1, True)
    np.testing.assert_allclose(grad_after(3, False), 3 * once, rtol=1e-12)   # the mistake
    np.testing.assert_allclose(grad_after(3, True), once, rtol=1e-12)        # the fix
    assert np.abs(once).max() > 1e-6


# ==== 23. data-parallel training in a script without a main guard ======================
def test_23_data_parallel_script_needs_a_main_guard(tmp_path):
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # code/stage-09
    body = """
import numpy as np
from minigpt import GPT, GPTConfig
from tasks import VOCAB_SIZE, make_examples
from train import train
{guard}
    cfg = GPTConfig(vocab_size=VOCAB_SIZE, context_length=12, d_model=16, n_layers=1, n_heads=2)
    data = make_examples("copy", 32, seed=0, max_len=4)
    losses = [train(GPT(cfg), data, steps=2, batch_size=8, progress=False, processes=p)["losses"][-1]
              for p in (1, 2)]
    print("losses", *losses)
"""

    def run(guard):
        script = tmp_path / ("guarded.py" if guard else "unguarded.py")
        script.write_text(body.format(guard='if __name__ == "__main__":' if guard else "if True:"))
        env = {**os.environ, "PYTHONPATH": here}
        return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              env=env, timeout=120)

    wrong = run(guard=False)                                # the mistake
    assert wrong.returncode != 0
    assert "exited with code 1 before it started" in wrong.stderr
    assert "if __name__ == '__main__':" in wrong.stderr
    right = run(guard=True)                                 # the fix
    assert right.returncode == 0, right.stderr
    one, two = (float(v) for v in right.stdout.split()[1:3])
    assert abs(one - two) <= 1e-5 * one
