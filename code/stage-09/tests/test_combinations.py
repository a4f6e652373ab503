"""Methods together on one model, full fine-tuning through get_peft_model, and mixing rules."""
import numpy as np
import pytest
import tasks
import train
from peft_checks import (CFG64, data, frozen_snapshot, gradcheck_peft, loss_and_grads,
                         randomise_zero_inits, tiny_base, well_scaled)

from accounting import compare_peft_methods
from gradcheck import check_model_loss
from minigpt import GPT, GPTConfig
from nn import cross_entropy
from peft_model import (BitFitConfig, BottleneckConfig, FullFineTuningConfig, IA3Config, LoraConfig,
                        PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model)
from quantization import quantize_model

P, R = 3, 2


def lora_plus_prompt(base):
    """The course's suggested combination, as in Hugging Face: two named adapters, both active."""
    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=P))
    model.set_adapter(["default", "prompt"])
    return model


def test_lora_plus_prompt_gradcheck_and_count():
    model = randomise_zero_inits(lora_plus_prompt(tiny_base()))
    tokens, targets, mask = data(pad=True)
    errors = gradcheck_peft(model, tokens, targets, mask)
    assert max(errors.values()) <= 1e-6
    assert "prompt_encoder.prompt" in errors and "layers.1.self_attn.v_proj.lora.B" in errors
    d, L = CFG64.d_model, CFG64.n_layers
    assert model.get_nb_trainable_parameters()[0] == L * 2 * R * 2 * d + P * d


def test_lora_plus_prompt_trains_and_leaves_the_base_alone():
    cfg = GPTConfig(vocab_size=tasks.VOCAB_SIZE, context_length=16, d_model=16, n_layers=2, n_heads=2)
    model = lora_plus_prompt(well_scaled(GPT(cfg, seed=1), seed=1))
    before = frozen_snapshot(model)
    examples = tasks.make_examples("is_sorted", 64, seed=0, min_len=2, max_len=3)
    history = train.train(model, examples, steps=40, lr=3e-2, batch_size=16, progress=False,
                          schedule=None)
    assert np.mean(history["losses"][-5:]) < history["losses"][0] - 0.1
    for name, value in before.items():
        assert np.array_equal(model.get_parameter(name), value), name
    assert not np.any(model.get_submodule("layers.0.self_attn.q_proj").lora.B == 0)


def test_lora_plus_prompt_disable_and_save_load(tmp_path):
    base = tiny_base()
    tokens, _, _ = data()
    expected_base = base(tokens)
    model = randomise_zero_inits(lora_plus_prompt(base))
    logits = model(tokens)
    with model.disable_adapter():
        assert np.array_equal(model(tokens), expected_base)
    model.save_pretrained(str(tmp_path))                    # default -> dir, prompt -> dir/prompt
    loaded = PeftModel.from_pretrained(tiny_base(), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "prompt"), "prompt")
    loaded.set_adapter(["default", "prompt"])
    assert np.array_equal(loaded(tokens), logits)


def test_full_fine_tuning_gives_the_plain_models_gradients():
    tokens, targets, mask = data(pad=True)
    plain = tiny_base()
    plain.zero_grad()
    _, dlogits = cross_entropy(plain(tokens, mask), targets)
    plain.backward(dlogits)
    model = get_peft_model(tiny_base(), FullFineTuningConfig())
    _, grads = loss_and_grads(model, tokens, targets, mask)
    assert sorted(grads) == sorted(n for n, _ in plain.named_parameters())
    for name, g in grads.items():
        np.testing.assert_array_equal(g, plain.get_grad(name), err_msg=name)


def test_full_plus_shifted_prompt_trains_the_prompt_positions():
    """With ``shift`` the prompt reads position embeddings 0..P-1; their gradient must arrive."""
    model = get_peft_model(tiny_base(), FullFineTuningConfig())
    model.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=P, position_convention="shift"))
    model.set_adapter(["default", "prompt"])
    tokens, targets, mask = data(pad=True)
    arrays = {n: model.get_parameter(n) for n in
              ("prompt_encoder.prompt", "embed_positions.weight", "layers.0.self_attn.q_proj.bias")}
    errors = check_model_loss(
        lambda: loss_and_grads(model, tokens, targets, mask)[1],
        lambda: cross_entropy(model(tokens, mask), targets)[0], arrays, tol=1e-6)
    assert max(errors.values()) <= 1e-6
    assert np.any(model.get_grad("embed_positions.weight")[:P])


def test_bitfit_on_a_4bit_base():
    model = get_peft_model(quantize_model(tiny_base()), BitFitConfig(include_layernorm=False))
    names = [n for n, _ in model.named_parameters(trainable_only=True)]
    assert len(names) == 2 * 6 and all(n.endswith(".bias") for n in names)
    tokens, targets, mask = data(pad=True)
    assert max(gradcheck_peft(model, tokens, targets, mask).values()) <= 1e-6


def test_lora_count_agrees_with_the_course_accounting():
    c = GPTConfig(vocab_size=16, context_length=8, d_model=32, n_layers=3, n_heads=4)
    model = get_peft_model(GPT(c), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias="none"))
    course = compare_peft_methods(d_model=32, num_layers=3, num_heads=4, lora_rank=4)
    assert model.get_nb_trainable_parameters()[0] == course["lora"]["params"] == 3 * 2 * 4 * 2 * 32


def test_dora_and_bottleneck_compose():
    """Different touch points (a linear, a sublayer): both may be active; still exact."""
    model = get_peft_model(tiny_base(), LoraConfig(r=R, use_dora=True, target_modules=["q_proj", "fc1"]))
    model.add_adapter("adapters", BottleneckConfig(bottleneck_size=2, placement="parallel"))
    model.set_adapter(["default", "adapters"])
    randomise_zero_inits(model)
    for _, module in model.named_modules():
        if hasattr(module, "detach_norm"):
            module.detach_norm = False
    tokens, targets, mask = data(pad=True)
    errors = gradcheck_peft(model, tokens, targets, mask)
    assert max(errors.values()) <= 1e-6 and any("adapter.W_up" in n for n in errors)
    assert any(n.endswith("lora.magnitude") for n in errors)


@pytest.mark.parametrize("adapters_first", [True, False])
def test_lora_and_bottleneck_in_either_order(adapters_first, tmp_path):
    """The adapter wrapper is transparent: LoRA's paths and names do not depend on the order."""
    lora, adapters = LoraConfig(r=R), BottleneckConfig(bottleneck_size=2)
    model = get_peft_model(tiny_base(), adapters if adapters_first else lora)
    model.add_adapter("other", lora if adapters_first else adapters)
    lora_name, adapter_name = ("other", "default") if adapters_first else ("default", "other")
    model.set_adapter(["default", "other"])
    randomise_zero_inits(model)
    assert sorted(model.adapters[lora_name].slots) == sorted(
        f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert "layers.0.self_attn.q_proj.lora.A" in dict(model.named_parameters(trainable_only=True))
    tokens, targets, mask = data(pad=True)
    if adapters_first:
        assert max(gradcheck_peft(model, tokens, targets, mask).values()) <= 1e-6
    model.set_adapter(lora_name)
    lora_only = model(tokens, mask)
    model.save_pretrained(str(tmp_path), adapter_name=lora_name)
    assert np.array_equal(PeftModel.from_pretrained(tiny_base(), str(tmp_path))(tokens, mask), lora_only)
    model.delete_adapter(adapter_name)                       # unwraps the sublayers, keeps LoRA
    assert sorted(p for p, _ in model.wrappers()) == sorted(model.adapters[lora_name].slots)
    assert np.array_equal(model(tokens, mask), lora_only)


@pytest.mark.parametrize("first, second", [
    (LoraConfig(r=2), IA3Config()),
    (IA3Config(), LoraConfig(r=2, use_dora=True)),
])
def test_two_methods_on_the_same_linears_cannot_mix(first, second):
    model = get_peft_model(tiny_base(), first)
    with pytest.raises(ValueError, match=f"cannot mix {second.peft_type} with {first.peft_type}"):
        model.add_adapter("second", second)


@pytest.mark.parametrize("config", [PromptTuningConfig(num_virtual_tokens=2),
                                    PrefixTuningConfig(num_virtual_tokens=2),
                                    BottleneckConfig(bottleneck_size=2)])
def test_two_adapters_of_one_kind_cannot_be_active_together(config):
    model = get_peft_model(tiny_base(), config)
    model.add_adapter("second", type(config)(**{k: v for k, v in vars(config).items()}))
    with pytest.raises(ValueError, match="touch the same part"):
        model.set_adapter(["default", "second"])
    model.set_adapter("second")                             # one at a time is fine
    assert model.active_adapter == "second"


def test_not_a_config_and_already_a_peft_model():
    model = get_peft_model(tiny_base(), IA3Config())
    with pytest.raises(ValueError, match="expected a PEFT config"):
        model.add_adapter("x", {"peft_type": "IA3"})
    with pytest.raises(ValueError, match="already a PeftModel"):
        get_peft_model(model, IA3Config())
