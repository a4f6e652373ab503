"""The calculators reproduce the course's numbers; memory_report counts real bytes."""
import numpy as np
import pytest

from accounting import estimate_finetune_memory, memory_report
from minigpt import GPT, GPTConfig
from nn import cross_entropy
from optim import AdamW
from peft_model import LoraConfig, get_peft_model


def test_7b_fp32_weights_28_gb():
    est = estimate_finetune_memory(7e9, "full", "fp32")
    assert est["weights"] == pytest.approx(28e9)


def test_mixed_precision_adam_16_bytes_per_param():
    est = estimate_finetune_memory(7e9, "full", "fp16", "adamw", mixed_precision=True)
    assert est["bytes_per_param"] == pytest.approx(16)
    assert est["total_gb"] == pytest.approx(112)


def test_175b_quick_math_challenge():
    est = estimate_finetune_memory(175e9, "full", "fp16", "adamw")
    assert est["weights"] == pytest.approx(350e9)
    assert est["gradients"] == pytest.approx(350e9)
    assert est["optimizer_states"] == pytest.approx(1.4e12)
    assert est["total"] == pytest.approx(2.1e12)


def test_lora_estimate_and_precision_table():
    lora = estimate_finetune_memory(7e9, "lora", "fp16", trainable_params=4_194_304)
    assert lora["weights"] == pytest.approx(14e9 + 4 * 4_194_304)
    assert lora["optimizer_states"] == 8 * 4_194_304
    for dtype, gb in (("fp32", 4), ("fp16", 2), ("int8", 1), ("nf4", 0.5)):
        assert estimate_finetune_memory(1e9, "full", dtype, "sgd")["weights"] == gb * 1e9
    with pytest.raises(ValueError, match="trainable_params"):
        estimate_finetune_memory(7e9, "lora")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        estimate_finetune_memory(7e9, "full", "fp8")


def test_memory_report_counts_real_bytes():
    cfg = GPTConfig(vocab_size=16, context_length=8, d_model=16, n_layers=2, n_heads=2)
    base = GPT(cfg)
    n_base = sum(p.size for _, p in base.named_parameters())
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    n_lora = model.get_nb_trainable_parameters()[0]
    opt = AdamW(model, lr=1e-2)
    report = memory_report(model, opt)
    assert report["frozen_weights"] == 4 * n_base
    assert report["trainable_weights"] == 4 * n_lora
    assert report["gradients"] == 0
    assert report["optimizer_state"] in (0, 2 * 4 * n_lora)      # moments: lazy or eager
    tokens = np.random.default_rng(0).integers(0, 16, (2, 8))
    model.zero_grad()
    _, d = cross_entropy(model(tokens), tokens)
    model.backward(d)
    opt.step()
    report = memory_report(model, opt)
    assert report["gradients"] == 4 * n_lora
    assert report["optimizer_state"] == 2 * 4 * n_lora
    assert report["trainable_state"] == 4 * 4 * n_lora


def test_memory_report_counts_packed_nf4_bytes():
    from quantization import quantize_model
    cfg = GPTConfig(vocab_size=64, context_length=64, d_model=256, n_layers=4, n_heads=8)
    model = GPT(cfg)
    linears = [p for n, p in model.named_parameters() if n.endswith("weight") and "proj" in n
               or "fc" in n and n.endswith("weight")]
    float_bytes = sum(p.nbytes for p in linears)
    before = memory_report(model)["frozen_weights"] + memory_report(model)["trainable_weights"]
    quantize_model(model)
    peft = get_peft_model(model, LoraConfig(r=8))
    after = memory_report(peft)["frozen_weights"]
    quantized_bytes = after - (before - float_bytes)        # everything else is unchanged
    assert quantized_bytes <= 0.15 * float_bytes
    assert peft.get_nb_trainable_parameters()[1] == sum(
        p.size for _, p in GPT(cfg).named_parameters()) + peft.get_nb_trainable_parameters()[0]


def test_llama_parameter_counts_match_the_published_models():
    """LLaMA-7B and -65B as released: 6,738,415,616 and 65,285,660,672 parameters."""
    from accounting import llama_parameter_count
    assert llama_parameter_count()["total"] == 6_738_415_616
    assert llama_parameter_count(d_model=8192, num_layers=80, d_ff=22016)["total"] == 65_285_660_672


def test_course_table_full_row_is_labelled_attention_only():
    """The course's 2,147,483,648 'full fine-tuning' row is the 7B model's attention weights."""
    from accounting import compare_peft_methods, llama_parameter_count
    full = compare_peft_methods()["full_fine_tuning"]
    assert full["params"] == llama_parameter_count()["attention"]
    assert "attention weights only" in full["description"]
