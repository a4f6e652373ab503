"""PeftModel operations are all or nothing, and the review's three bugs stay fixed.

* ``get_peft_model`` / ``add_adapter`` with a bad config leave the base model as it
  was (modules, trainable flags), not frozen with 0 trainable parameters;
* ``merge_adapter`` asks every target before merging one;
* deleting an adapter while one is merged is refused (its update would stay baked in);
* ``disable_adapter`` gives the base outputs also when merged, and nests;
* adapter names cannot leave the save directory;
* DoRA's pure functions are pure; ``generate`` under a shifted prefix; ``LoRALinear(W)``
  copies ``W``.
"""
import os

import numpy as np
import pytest

from dora import DoRALayer
from minigpt import GPT, GPTConfig
from peft import LoRALinear
from peft_model import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from quantization import quantize_model

CFG = GPTConfig(vocab_size=16, context_length=8, d_model=16, n_layers=2, n_heads=2, dtype=np.float64)
TOKENS = np.random.default_rng(0).integers(0, 16, (2, 5))


def state(model):
    return ([(n, id(m), tuple(sorted(m.frozen))) for n, m in model.named_modules()],
            {n: p.copy() for n, p in model.named_parameters()})


def assert_same(model, before):
    now = state(model)
    assert now[0] == before[0], "modules or trainable flags changed"
    assert now[1].keys() == before[1].keys()
    for name in before[1]:
        assert np.array_equal(now[1][name], before[1][name]), f"{name} changed"


def lora_model(seed=0, **config):
    model = get_peft_model(GPT(CFG, seed=seed), LoraConfig(**{"r": 2, "lora_alpha": 4,
                                                              "target_modules": ["q_proj", "v_proj"],
                                                              **config}))
    rng = np.random.default_rng(seed + 1)
    for _, p in model.named_parameters(trainable_only=True):
        p[...] = rng.standard_normal(p.shape) * 0.3
    return model


@pytest.mark.parametrize("config", [
    LoraConfig(target_modules=["q_prj"]),                               # misspelt
    LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]),     # no such layer
    PromptTuningConfig(num_virtual_tokens=20),                          # longer than the context
])
def test_get_peft_model_with_a_bad_config_leaves_the_base_as_it_was(config):
    base = GPT(CFG)
    before = state(base)
    with pytest.raises(ValueError):
        get_peft_model(base, config)
    assert_same(base, before)
    assert sum(p.size for _, p in base.named_parameters(trainable_only=True)) > 0


def test_add_adapter_with_a_bad_config_changes_nothing():
    model = lora_model()
    before = state(model)
    with pytest.raises(ValueError, match="matched no module"):
        model.add_adapter("second", LoraConfig(r=2, target_modules=["fc3"]))
    assert_same(model, before)
    assert sorted(model.peft_config) == ["default"]


def test_merge_adapter_with_one_target_that_cannot_merge_merges_nothing():
    base = GPT(CFG, seed=0)
    quantize_model(base, target_modules=["layers.1.self_attn.q_proj"], blocksize=8)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    for _, p in model.named_parameters(trainable_only=True):
        p[...] = 0.3
    before = state(model)
    with pytest.raises(ValueError, match="cannot merge into a QuantizedLinear"):
        model.merge_adapter()
    assert_same(model, before)
    assert not any(getattr(m, "merged", False) for _, m in model.named_modules())


def test_deleting_while_merged_is_refused_and_the_base_stays_clean():
    model = lora_model()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.merge_adapter()
    with pytest.raises(ValueError, match="cannot delete adapter 'default' while an adapter is merged"):
        model.delete_adapter("default")
    model.unmerge_adapter()
    with model.disable_adapter():
        reference = model(TOKENS)
    model.delete_adapter("default")
    with model.disable_adapter():
        np.testing.assert_allclose(model(TOKENS), reference, rtol=1e-12, atol=1e-12)


def test_disable_adapter_gives_the_base_outputs_when_merged_and_nests():
    model = lora_model()
    with model.disable_adapter():
        base_out = model(TOKENS)
    adapted = model(TOKENS)
    assert not np.allclose(adapted, base_out)
    model.merge_adapter()
    merged_weights = {n: p.copy() for n, p in model.named_parameters()}
    with model.disable_adapter():
        np.testing.assert_allclose(model(TOKENS), base_out, rtol=1e-12, atol=1e-12)
        with model.disable_adapter():
            pass
        np.testing.assert_allclose(model(TOKENS), base_out, rtol=1e-12, atol=1e-12)  # still off
    np.testing.assert_allclose(model(TOKENS), adapted, rtol=1e-12, atol=1e-12)
    for name, value in model.named_parameters():                      # merged again, bit for bit
        assert np.array_equal(value, merged_weights[name]), name
    model.unmerge_adapter()
    with model.disable_adapter():
        with model.disable_adapter():
            pass
        np.testing.assert_allclose(model(TOKENS), base_out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, match", [
    ("../../escaped", "may not contain"), ("a/b", "may not contain"), ("a\\b", "may not contain"),
    ("..", "may not contain"), (".hidden", "start with '.'"), ("", "non-empty string"),
    (3, "non-empty string"), (None, "non-empty string"),
])
def test_adapter_names_cannot_leave_the_save_directory(tmp_path, name, match):
    model = lora_model()
    before = state(model)
    with pytest.raises(ValueError, match=match):
        model.add_adapter(name, LoraConfig(r=2, target_modules=["q_proj"]))
    assert_same(model, before)
    model.save_pretrained(tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"]


def test_dora_pure_functions_are_pure():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((3, 4))
    layer = DoRALayer(4, 3, rank=2)
    layer.init_magnitude(W)
    layer.B[...] = rng.standard_normal(layer.B.shape)
    layer.magnitude *= 1.5
    scale = layer.merge_scale(W)
    merged = layer.merge_weights(W)
    layer.merge_weights(merged)                     # merging something else in between ...
    np.testing.assert_allclose(layer.merge_weights(W), merged, rtol=0, atol=0)   # ... changes nothing
    np.testing.assert_allclose(layer.unmerge_weights(merged, scale), W, rtol=1e-12, atol=1e-12)


def test_a_dora_layer_merged_twice_is_refused_and_unmerges_exactly():
    model = get_peft_model(GPT(CFG, seed=0), LoraConfig(r=2, lora_alpha=4, use_dora=True,
                                                        target_modules=["v_proj"]))
    for _, p in model.named_parameters(trainable_only=True):
        p[...] += 0.3
    wrapper = model.get_submodule("layers.0.self_attn.v_proj")
    W0 = wrapper.weight.copy()
    model.merge_adapter()
    with pytest.raises(ValueError, match="already merged"):
        model.merge_adapter()
    wrapper.merge()                                 # the course's pure merge on a merged layer
    model.unmerge_adapter()
    np.testing.assert_allclose(wrapper.weight, W0, rtol=1e-12, atol=1e-12)


def test_generate_with_a_shifted_prefix_fits_the_context():
    model = get_peft_model(GPT(CFG, seed=0), PrefixTuningConfig(num_virtual_tokens=3,
                                                                position_convention="shift"))
    assert model.position_budget() == CFG.context_length - 3
    out = model.generate(np.full((1, 6), 3), 2)     # 6 prompt tokens + 3 prefix positions > 8
    assert out.shape == (1, 2)
    with pytest.raises(ValueError, match="3 prefix positions \\+ sequence length 6"):
        model.forward(np.full((1, 6), 3))


def test_lora_linear_copies_the_callers_weight():
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((4, 5)), rng.standard_normal(4)
    W0, b0 = W.copy(), b.copy()
    layer = LoRALinear(W, b, lora_rank=2)
    layer.lora.B[...] = 1.0
    layer.merge_in_place()
    assert np.array_equal(W, W0) and np.array_equal(b, b0)
    assert not np.array_equal(layer.weight, W0)
