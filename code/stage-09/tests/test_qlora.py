"""QLoRA end to end: LoRA in float over a packed NF4 base."""
import numpy as np
import pytest

from checkpoint import load_model
from gradcheck import check_model_loss, well_scaled
from minigpt import GPT, GPTConfig
from nn import Linear, cross_entropy
from peft import LoRALinear
from peft_config import ALL_LINEARS
from peft_model import LoraConfig, get_peft_model
from pretrain import PRETRAINED_DIR
from quantization import QuantizedLinear, quantize_model
from tasks import make_examples
from train import train


def qlora(model, r=2):
    return get_peft_model(quantize_model(model, "nf4", ALL_LINEARS, blocksize=8),
                          LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL_LINEARS))


def test_whole_model_gradcheck_float64_compute():
    cfg = GPTConfig(vocab_size=11, context_length=8, d_model=8, n_layers=2, n_heads=2,
                    dtype=np.float64)
    model = qlora(well_scaled(GPT(cfg, seed=3)))
    assert all(isinstance(model.get_submodule(f"layers.0.self_attn.{p}").base_layer, QuantizedLinear)
               for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    rng = np.random.default_rng(0)
    for name, p in model.named_parameters(trainable_only=True):
        if name.endswith("lora.B"):
            p[...] = rng.standard_normal(p.shape) * 0.5
    tokens, targets = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))

    def loss_and_backward():
        model.zero_grad()
        loss, d = cross_entropy(model(tokens), targets)
        model.backward(d)
        return {n: model.get_grad(n) for n, _ in model.named_parameters(trainable_only=True)}

    arrays = dict(model.named_parameters(trainable_only=True))
    errors = check_model_loss(loss_and_backward, lambda: cross_entropy(model(tokens), targets)[0],
                              arrays, tol=1e-6)
    assert len(errors) == 2 * 6 * 2 and max(errors.values()) <= 1e-6


def test_qlora_trains_and_stored_bytes_do_not_change():
    model = get_peft_model(quantize_model(load_model(PRETRAINED_DIR)), LoraConfig(r=8, lora_alpha=16,
                                                                               target_modules=ALL_LINEARS))
    quantized = [m for _, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    stored = [{k: v.copy() for k, v in m.quant_state.stored_arrays().items()} for m in quantized]
    history = train(model, make_examples("add3", 500, seed=0), steps=40, lr=3e-3, batch_size=32,
                    progress=False)
    first, last = np.mean(history["losses"][:5]), np.mean(history["losses"][-5:])
    assert last < 0.7 * first, (first, last)
    for m, before in zip(quantized, stored):
        after = m.quant_state.stored_arrays()
        assert before.keys() == after.keys()
        assert all(np.array_equal(before[k], after[k]) for k in before)


def test_merge_returns_a_float_model_close_to_the_adapted_one():
    cfg = GPTConfig(vocab_size=13, context_length=10, d_model=16, n_layers=2, n_heads=2)
    model = qlora(GPT(cfg, seed=1), r=4)
    rng = np.random.default_rng(2)
    for name, p in model.named_parameters(trainable_only=True):
        if name.endswith("lora.B"):
            p[...] = rng.standard_normal(p.shape).astype(np.float32) * 0.1
    tokens = rng.integers(0, 13, (2, 7))
    adapted = model(tokens)
    with pytest.raises(ValueError, match="quantized|merge_and_unload"):
        model.merge_adapter()                         # cannot fold into 4-bit codes in place
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (QuantizedLinear, LoRALinear)) for _, m in plain.named_modules())
    assert isinstance(plain.get_submodule("layers.1.mlp.fc2"), Linear)
    assert plain.get_submodule("layers.1.mlp.fc2").weight.dtype == np.float32
    np.testing.assert_allclose(plain(tokens), adapted, rtol=1e-4, atol=1e-5)
