"""Adapter files are read strictly and written all at once.

A hostile or careless file must not load: a NaN or int8 tensor, a JSON ``"false"``
that Python would read as true, a misspelt key silently dropped, an adapter trained
on another base. And a ``save_pretrained`` that fails half-way leaves the previous
save whole. Every refusal leaves the model as it was.
"""
import glob
import json
import os

import numpy as np
import pytest

from checkpoint import load_metadata, load_tensors, save_tensors
from minigpt import GPT, GPTConfig
from peft_model import (BottleneckConfig, LoraConfig, PeftModel, PrefixTuningConfig,
                        PromptTuningConfig, get_peft_model)

CFG = GPTConfig(vocab_size=16, context_length=8, d_model=16, n_layers=2, n_heads=2)


def saved(tmp_path, config=None, seed=1):
    model = get_peft_model(GPT(CFG, seed=seed), config or LoraConfig(r=2, lora_alpha=4,
                                                                     target_modules=["q_proj"]))
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters(trainable_only=True):
        p[...] = rng.standard_normal(p.shape)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def weights_file(directory):
    (path,) = glob.glob(os.path.join(directory, "*.safetensors"))
    return path


def edit_tensors(directory, change):
    path = weights_file(directory)
    tensors = load_tensors(path)
    change(tensors)
    save_tensors(path, tensors, metadata=load_metadata(path))


def edit_config(directory, change):
    path = os.path.join(directory, "adapter_config.json")
    raw = json.loads(open(path).read())
    change(raw)
    with open(path, "w") as f:
        json.dump(raw, f)


def refused(directory, match, base=None):
    base = base or GPT(CFG, seed=1)
    before = ([(n, type(m).__name__) for n, m in base.named_modules()],
              {n: p.copy() for n, p in base.named_parameters()})
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, directory)
    assert [(n, type(m).__name__) for n, m in base.named_modules()] == before[0]
    assert all(np.array_equal(p, before[1][n]) for n, p in base.named_parameters())


def first(tensors):
    return next(iter(sorted(tensors)))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_tensor_is_refused(tmp_path, value):
    _, directory = saved(tmp_path)

    def poison(tensors):
        tensors[first(tensors)][0, 0] = value
    edit_tensors(directory, poison)
    refused(directory, r"holds 1 non-finite values")


def test_an_int8_tensor_is_refused(tmp_path):
    _, directory = saved(tmp_path)

    def to_int8(tensors):
        name = first(tensors)
        tensors[name] = tensors[name].astype(np.int8)
    edit_tensors(directory, to_int8)
    refused(directory, r"dtype int8")


@pytest.mark.parametrize("key, value, match", [
    ("use_rslora", "false", r"use_rslora must be bool, got use_rslora='false' \(str\)"),
    ("use_dora", 1, r"use_dora must be bool, got use_dora=1 \(int\)"),
    ("r", "2", r"r must be int, got r='2' \(str\)"),
    ("lora_alpha", "4", r"lora_alpha must be float, got lora_alpha='4' \(str\)"),
    ("lora_alhpa", 8, r"unknown key 'lora_alhpa' for LoraConfig; did you mean 'lora_alpha'\?"),
    ("target_module", ["q_proj"], r"unknown key 'target_module' .*did you mean 'target_modules'\?"),
    ("peft_type", "LORAX", r"unknown peft_type 'LORAX'"),
    ("peft_type", ["LORA"], r"unknown peft_type \['LORA'\]"),
])
def test_config_json_is_read_strictly(tmp_path, key, value, match):
    _, directory = saved(tmp_path)
    edit_config(directory, lambda raw: raw.__setitem__(key, value))
    refused(directory, match)


def test_our_own_layout_is_read_strictly_too(tmp_path):
    """Methods peft has no layout for (bottleneck adapters) use ``PeftConfig.from_dict``."""
    _, directory = saved(tmp_path, BottleneckConfig(bottleneck_size=4))
    edit_config(directory, lambda raw: raw.__setitem__("bottleneck_szie", 8))
    refused(directory, r"unknown key 'bottleneck_szie' .*did you mean 'bottleneck_size'\?")


@pytest.mark.parametrize("other", [
    dict(vocab_size=17), dict(n_layers=3), dict(context_length=16), dict(d_model=32),
])
def test_an_adapter_from_another_base_is_refused(tmp_path, other):
    _, directory = saved(tmp_path)
    field, value = next(iter(other.items()))
    config = {**CFG.to_dict(), **other}
    base = GPT(GPTConfig.from_dict(config), seed=1)
    refused(directory, rf"saved from another base model: {field}: {getattr(CFG, field)} in the "
                       rf"file, {value} in the model", base=base)


def test_a_save_pretrained_that_fails_half_way_keeps_the_previous_save(tmp_path, monkeypatch):
    old, directory = saved(tmp_path, seed=1)
    new = get_peft_model(GPT(CFG, seed=1), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    new.add_adapter("second", PrefixTuningConfig(num_virtual_tokens=2))

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("peft_io.save_json", fail)       # the weights are written, the config is not
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(directory)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    loaded = PeftModel.from_pretrained(GPT(CFG, seed=1), directory)
    for name, value in old.adapter_state_dict().items():
        np.testing.assert_array_equal(loaded.adapter_state_dict()[name], value)


def test_save_pretrained_files_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        _, directory = saved(tmp_path)
    finally:
        os.umask(previous)
    for name in os.listdir(directory):
        assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o644, name
    assert os.stat(directory).st_mode & 0o777 == 0o755


def test_save_pretrained_of_an_unknown_adapter_is_refused(tmp_path):
    model, _ = saved(tmp_path)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.save_pretrained(tmp_path / "x", adapter_name="nope")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("config, match", [
    (LoraConfig(r=17, target_modules=["q_proj"]), r"LoraConfig.r=17 is larger than the layer.*r must be <= 16"),
    (LoraConfig(r=2, target_modules="q_proj["), r"does not compile"),
    (LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0, 2]),
     r"layers_to_transform=\[0, 2\]: layer\(s\) \[2\] out of range; the model has layers 0..1"),
    (BottleneckConfig(bottleneck_size=17), r"bottleneck_size=17 is wider than the model \(d_model=16\)"),
])
def test_configs_that_do_not_fit_the_model_are_refused_before_anything_changes(config, match):
    base = GPT(CFG, seed=1)
    flags = [(n, tuple(sorted(m.frozen))) for n, m in base.named_modules()]
    with pytest.raises(ValueError, match=match):
        get_peft_model(base, config)
    assert [(n, tuple(sorted(m.frozen))) for n, m in base.named_modules()] == flags


@pytest.mark.parametrize("kwargs, match", [
    ({"use_dora": "no"}, r"LoraConfig.use_dora must be bool, got use_dora='no'"),
    ({"use_rslora": "false"}, r"LoraConfig.use_rslora must be bool"),
    ({"r": True}, r"LoraConfig.r must be int, got r=True"),
    ({"lora_alpha": float("nan")}, r"LoraConfig.lora_alpha must be a finite number > 0"),
    ({"lora_alpha": float("inf")}, r"LoraConfig.lora_alpha must be a finite number > 0"),
    ({"bias": 0}, r"LoraConfig.bias must be str, got bias=0"),
])
def test_lora_config_checks_types(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_a_prompt_saved_with_peft_text_init_loads(tmp_path):
    """peft writes a TEXT-started prompt's config with the text and a tokenizer's name, no
    ids: the saved prompt is what counts, so it loads and gives the same logits."""
    model, directory = saved(tmp_path, PromptTuningConfig(num_virtual_tokens=3))
    edit_config(directory, lambda raw: raw.update(prompt_tuning_init="TEXT",
                                                  prompt_tuning_init_text="said Alice",
                                                  tokenizer_name_or_path="gpt2"))
    loaded = PeftModel.from_pretrained(GPT(CFG, seed=1), directory)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 4))
    np.testing.assert_array_equal(loaded.forward(tokens), model.forward(tokens))
