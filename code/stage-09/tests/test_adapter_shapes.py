"""An adapter file whose tensor has the right size but the wrong shape is refused.

A transposed ``lora.A`` (``(in, r)`` instead of ``(r, in)``) holds exactly as many
numbers as the right one, so a loader that copied by size, or reshaped, would
accept it and silently scramble the adapter. Written against the public API only
(``save_pretrained``, ``PeftModel.from_pretrained``, ``load_adapter``).
"""
import glob
import os

import numpy as np
import pytest

from checkpoint import load_metadata, load_tensors, save_tensors
from minigpt import GPT, GPTConfig
from peft_model import LoraConfig, PeftModel, get_peft_model

CFG = GPTConfig(vocab_size=16, context_length=8, d_model=16, n_layers=2, n_heads=2)


def saved_adapter(tmp_path):
    model = get_peft_model(GPT(CFG, seed=1), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    rng = np.random.default_rng(0)
    for _, p in model.named_parameters(trainable_only=True):
        p[...] = rng.standard_normal(p.shape)
    model.save_pretrained(tmp_path / "adapter")
    (weights,) = glob.glob(os.path.join(tmp_path / "adapter", "*.safetensors"))
    return weights


def transpose_one(weights):
    tensors = load_tensors(weights)
    (name,) = [n for n in tensors if ".1." in n and (n.endswith("lora.A")         # our names
                                                     or n.endswith("lora_A.weight"))]   # peft's
    assert tensors[name].shape == (2, 16)
    tensors[name] = np.ascontiguousarray(tensors[name].T)          # (16, 2): same 32 numbers
    save_tensors(weights, tensors, metadata=load_metadata(weights))
    return name


def state(model):
    return ({n: p.copy() for n, p in model.named_parameters()},
            {n: type(m).__name__ for n, m in model.named_modules()})


def assert_same_state(model, before):
    params, types = state(model)
    assert types == before[1], "modules were wrapped or replaced"
    assert params.keys() == before[0].keys()
    for name, value in before[0].items():
        assert np.array_equal(params[name], value), f"{name} changed"


def test_from_pretrained_refuses_a_transposed_lora_A(tmp_path):
    name = transpose_one(saved_adapter(tmp_path))
    base = GPT(CFG, seed=1)
    before = state(base)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(base, tmp_path / "adapter")
    message = str(info.value)
    assert "layers.1.self_attn.q_proj" in message and "(16, 2)" in message and "(2, 16)" in message
    assert_same_state(base, before)


def test_load_adapter_refuses_a_transposed_lora_A_and_keeps_the_model(tmp_path):
    transpose_one(saved_adapter(tmp_path))
    model = get_peft_model(GPT(CFG, seed=1), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    before, adapters = state(model), sorted(model.peft_config)
    with pytest.raises(ValueError, match=r"\(16, 2\)"):
        model.load_adapter(tmp_path / "adapter", "second")
    assert sorted(model.peft_config) == adapters
    assert_same_state(model, before)
