"""The NF4 embedding table: the rows it decodes are the full table's, and a model whose
embeddings and linears are all 4-bit computes what the same model with those dequantized
weights in float computes -- forward, and the LoRA gradients through the tied head."""
import copy

import numpy as np
import pytest

from gpt2 import GPT2LMHeadModel
from minigpt import GPTConfig
from nn import cross_entropy
from peft_model import LoraConfig, get_peft_model
from quantization import quantize_model
from quantized_embedding import QuantizedEmbedding, quantize_embeddings

CONFIG = GPTConfig(vocab_size=50, context_length=16, d_model=64, n_layers=2, n_heads=4)


def test_rows_equal_the_dequantized_table():
    model = GPT2LMHeadModel(CONFIG, seed=1)
    q = QuantizedEmbedding(model.transformer.wte)
    ids = np.random.default_rng(0).integers(0, 50, (3, 7))
    np.testing.assert_array_equal(q(ids), q.weight[ids])
    assert q.quant_state.bits_per_parameter() < 4.2
    assert np.abs(q.weight - model.transformer.wte.weight).max() < 0.25 * np.abs(model.transformer.wte.weight).max()
    with pytest.raises(ValueError, match="index 50 out of range"):
        q(np.array([[50]]))


def test_all_4bit_base_equals_its_dequantized_float_twin():
    model = GPT2LMHeadModel(CONFIG, seed=2)
    quantize_model(model, target_modules=["c_attn", "c_proj", "c_fc"])
    assert quantize_embeddings(model) == ["transformer.wte", "transformer.wpe"]
    twin = GPT2LMHeadModel(CONFIG, seed=2)
    for name, _ in twin.named_parameters():
        module, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(module), attr, np.array(getattr(model.get_submodule(module), attr)))
    config = LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
    pq, pf = get_peft_model(model, config), get_peft_model(twin, copy.deepcopy(config))
    for (_, a), (_, b) in zip(pq.named_parameters(trainable_only=True), pf.named_parameters(trainable_only=True)):
        b[...] = a
    ids = np.random.default_rng(3).integers(0, 50, (2, 9))
    np.testing.assert_allclose(pq(ids), pf(ids), atol=1e-5)
    grads = []
    for pm in (pq, pf):
        _, d = cross_entropy(pm(ids), np.roll(ids, -1, 1))
        pm.zero_grad()
        pm.backward(d)
        grads.append({n: pm.get_grad(n) for n, _ in pm.named_parameters(trainable_only=True)})
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) == 4
    for n in grads[0]:
        np.testing.assert_allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)
