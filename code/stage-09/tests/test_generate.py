"""generate.py: token-by-token generation (cached or not) picks exactly the tokens that a
full forward pass picks greedily, for the base and for every PEFT method; sampling settings."""
import numpy as np
import pytest

from generate import generate, pick, window_layout
from minigpt import GPT, GPTConfig
from peft_model import (BitFitConfig, BottleneckConfig, FullFineTuningConfig, IA3Config, LoraConfig,
                        PrefixTuningConfig, PromptTuningConfig, get_peft_model)
from quantization import quantize_model

CFG = GPTConfig(vocab_size=256, context_length=16, d_model=32, n_layers=2, n_heads=4)
P = 4                                             # virtual tokens of prefix / prompt tuning
ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
METHODS = {   # name -> (config, positions the virtual tokens take from the context)
    "lora": (LoraConfig(r=4, target_modules=ALL), 0),
    "lora_qv": (LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), 0),
    "dora": (LoraConfig(r=4, target_modules=ALL, use_dora=True), 0),
    "ia3": (IA3Config(), 0),
    "houlsby": (BottleneckConfig(placement="houlsby"), 0),
    "pfeiffer": (BottleneckConfig(placement="pfeiffer"), 0),
    "parallel": (BottleneckConfig(placement="parallel"), 0),
    "prefix": (PrefixTuningConfig(num_virtual_tokens=P), 0),
    "prefix_mlp": (PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True), 0),
    "prefix_shift": (PrefixTuningConfig(num_virtual_tokens=P, position_convention="shift"), P),
    "prompt": (PromptTuningConfig(num_virtual_tokens=P), P),
    "prompt_shift": (PromptTuningConfig(num_virtual_tokens=P, position_convention="shift"), P),
    "bitfit": (BitFitConfig(), 0),
    "full": (FullFineTuningConfig(), 0),
}


def base_model(seed=0):
    model = GPT(CFG, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for _, p in model.named_parameters():          # larger weights: sharper, varied predictions
        p += (rng.standard_normal(p.shape) * 0.3).astype(p.dtype)
    return model


def adapted(config, seed=0, qlora=False):
    base = base_model(seed)
    model = get_peft_model(quantize_model(base, "nf4") if qlora else base, config)
    rng = np.random.default_rng(seed + 1)
    for _, p in model.named_parameters(trainable_only=True):   # move off the (identity) init
        p += (rng.standard_normal(p.shape) * 0.3).astype(p.dtype)
    return model


def forward_greedy(model, prompt, n, limit):
    """The reference: a full forward of the (last ``limit`` tokens of the) sequence per token."""
    seq = np.array(prompt)[None]
    model.eval()
    for _ in range(n):
        nxt = model.forward(seq[:, -limit:])[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    return seq[0, len(prompt):]


PROMPT = [72, 101, 108, 108, 111]                # "Hello"; 30 new tokens pass the context of 16


def check_method(model, virtual):
    limit = CFG.context_length - virtual
    assert window_layout(model)[0] == limit
    expected = forward_greedy(model, PROMPT, 30, limit)
    for use_cache in (True, False):
        got = generate(model, PROMPT, 30, use_cache=use_cache)[0]
        assert got.tolist() == expected.tolist(), f"use_cache={use_cache}"
    return expected


def test_base_generation_equals_forward_greedy():
    check_method(base_model(), 0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_generation_equals_forward_greedy(name):
    config, virtual = METHODS[name]
    model = adapted(config)
    tokens = check_method(model, virtual)
    base_tokens = forward_greedy(base_model(), PROMPT, 30, CFG.context_length).tolist()
    assert tokens.tolist() != base_tokens, "the adapter changed nothing"
    with model.disable_adapter():                 # adapter off: the base's tokens
        disabled = check_method(model, 0).tolist()
    if name not in ("bitfit", "full"):            # these two train the base's own weights
        assert disabled == base_tokens


@pytest.mark.parametrize("name", ["lora", "dora", "ia3"])
def test_merged_adapter_generates_like_unmerged(name):
    model = adapted(METHODS[name][0])
    unmerged = check_method(model, 0)
    model.merge_adapter()
    assert check_method(model, 0).tolist() == unmerged.tolist()
    model.unmerge_adapter()
    assert check_method(model, 0).tolist() == unmerged.tolist()


@pytest.mark.parametrize("prompt_convention", ["keep", "shift"])
@pytest.mark.parametrize("prefix_convention", ["keep", "shift"])
def test_the_window_and_the_forward_check_follow_one_rule(prompt_convention, prefix_convention):
    """A soft prompt and a prefix active together (different touch points): generate's
    probed window and PeftModel's own budget are one rule (generate.window_limit), so the
    longest sequence forward accepts is the window generate slides; one more is refused."""
    model = get_peft_model(base_model(), PromptTuningConfig(num_virtual_tokens=3,
                                                            position_convention=prompt_convention))
    model.add_adapter("prefix", PrefixTuningConfig(num_virtual_tokens=5,
                                                   position_convention=prefix_convention))
    model.set_adapter(["default", "prefix"])
    limit = window_layout(model)[0]
    assert model.position_budget() == limit == CFG.context_length - 3
    assert model(np.zeros((1, limit), int)).shape == (1, limit, CFG.vocab_size)
    with pytest.raises(ValueError, match=f"3 virtual tokens \\+ sequence length {limit + 1} "):
        model(np.zeros((1, limit + 1), int))
    assert generate(model, PROMPT, 30)[0].tolist() == forward_greedy(model, PROMPT, 30, limit).tolist()


def test_qlora_generation_equals_forward_greedy():
    check_method(adapted(LoraConfig(r=4, target_modules=ALL), qlora=True), 0)


def test_cached_step_logits_match_the_full_forward():
    from generate import cached_step, read_cache
    model = adapted(METHODS["prefix_shift"][0])
    model.eval()
    seq = np.array([PROMPT + [10, 20, 30]])
    full = model.forward(seq)                      # (1, 8, V)
    model.forward(seq[:, :-1])
    logits, cache = cached_step(model, seq[:, -1], P + seq.shape[1] - 1, read_cache(model))
    assert np.abs(logits - full[:, -1]).max() <= 1e-5 * np.abs(full).max()
    assert cache[0][0].shape == (1, P + seq.shape[1], CFG.n_heads, CFG.d_head)


def test_sampling_is_seeded_and_the_same_with_or_without_cache():
    model = base_model()
    a = generate(model, PROMPT, 40, temperature=1.0, top_k=10, seed=3)
    b = generate(model, PROMPT, 40, temperature=1.0, top_k=10, seed=3, use_cache=False)
    c = generate(model, PROMPT, 40, temperature=1.0, top_k=10, seed=4)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_top_k_and_temperature():
    rng = np.random.default_rng(0)
    logits = np.array([[0.0, 3.0, 2.0, 1.0, -1.0]] * 4000)
    top2 = pick(logits, 1.0, 2, rng)
    assert set(top2.tolist()) == {1, 2}
    share = (top2 == 1).mean()                     # softmax of (3, 2): 0.731
    assert abs(share - 1 / (1 + np.exp(-1))) < 0.03
    cold = pick(logits, 0.05, None, rng)
    assert (cold == 1).all()
    hot = pick(logits, 100.0, None, rng)           # almost uniform over all 5
    assert np.bincount(hot, minlength=5).min() > 600
    assert (pick(logits[:3], 0, None, rng) == 1).all()


def test_eos_stops_and_repeats():
    model = base_model()
    free = generate(model, PROMPT, 20)[0]
    eos = int(free[3])
    out = generate(model, PROMPT, 20, eos_id=eos)[0]
    first = out.tolist().index(eos)
    assert out[:first].tolist() == free[:first].tolist() and len(out) == first + 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=257), "top_k"),
])
def test_bad_settings_are_refused(kwargs, message):
    settings = dict(max_new_tokens=5, **{k: v for k, v in kwargs.items() if k != "max_new_tokens"})
    settings["max_new_tokens"] = kwargs.get("max_new_tokens", 5)
    with pytest.raises(ValueError, match=message):
        generate(base_model(), PROMPT, **settings)


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        generate(base_model(), np.zeros((1, 0), dtype=np.int64), 5)
