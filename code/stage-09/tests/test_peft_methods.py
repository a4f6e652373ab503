"""The invariants every PEFT method is tested for (docs/DESIGN.md, "How the code reads", rule 5), method by method.

For each config below, through ``get_peft_model`` on the mini GPT:
whole-model gradient check (float64, zero-inits randomised, tol 1e-6); only the
method's parameters get gradients and optimizer state; frozen weights bit-for-bit
unchanged after AdamW steps; the trainable count equals its closed form; a short
run lowers the loss; save -> load gives identical outputs.
LoRA itself is covered in ``test_lora.py``; DoRA, (IA)3 and adapters have their
own files for what only they promise (merging, placement, the detached norm).
"""
import numpy as np
import pytest
import tasks
import train
from peft_checks import (CFG32, CFG64, data, frozen_snapshot, gradcheck_peft, randomise_zero_inits,
                         small_base, tiny_base, train_steps, well_scaled)

from minigpt import GPT, GPTConfig
from peft_model import (BitFitConfig, BottleneckConfig, FullFineTuningConfig, IA3Config, LoraConfig,
                        PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model)

DORA_TARGETS = ["q_proj", "v_proj", "fc2"]


def _is(*suffixes):
    return lambda name: name.endswith(suffixes)


# id -> (config factory, "is this one of the method's parameter names?", closed-form count(cfg))
def _bottleneck_count(sites, b, bias=True):
    return lambda c: c.n_layers * sites * (2 * c.d_model * b + (b + c.d_model if bias else 0))


def _dora_count(r):
    def count(c):
        d = c.d_model
        per_layer = (r * 2 * d + d) * 2 + (r * 5 * d + d)        # q, v (d -> d); fc2 (4d -> d)
        return c.n_layers * per_layer
    return count


def _prefix_proj_count(P, hidden):
    return lambda c: P * c.d_model + (c.d_model + 1) * hidden + (hidden + 1) * c.n_layers * 2 * c.d_model


METHODS = {
    "ia3": (lambda: IA3Config(), _is("ia3.ia3_l"), lambda c: c.n_layers * 6 * c.d_model),
    "houlsby": (lambda: BottleneckConfig(bottleneck_size=3), _is("W_down", "W_up", "b_down", "b_up"),
                _bottleneck_count(2, 3)),
    "pfeiffer": (lambda: BottleneckConfig(bottleneck_size=3, placement="pfeiffer", activation="gelu"),
                 _is("W_down", "W_up", "b_down", "b_up"), _bottleneck_count(1, 3)),
    "parallel": (lambda: BottleneckConfig(reduction_factor=4, placement="parallel"),
                 _is("W_down", "W_up", "b_down", "b_up"),
                 lambda c: _bottleneck_count(2, c.d_model // 4)(c)),
    "dora": (lambda: LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=DORA_TARGETS),
             _is("lora.A", "lora.B", "lora.magnitude"), _dora_count(2)),
    "prefix": (lambda: PrefixTuningConfig(num_virtual_tokens=3), _is("prefix_encoder.prefix"),
               lambda c: c.n_layers * 2 * 3 * c.n_heads * c.d_head),
    "prefix_projection": (lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                                     encoder_hidden_size=5),
                          lambda n: n.startswith("prefix_encoder."), _prefix_proj_count(3, 5)),
    "bitfit": (lambda: BitFitConfig(), _is(".bias"), lambda c: c.n_layers * 11 * c.d_model + c.d_model),
    "bitfit_no_layernorm": (lambda: BitFitConfig(include_layernorm=False),
                            _is("proj.bias", "fc1.bias", "fc2.bias"),
                            lambda c: c.n_layers * 9 * c.d_model),
    "full": (lambda: FullFineTuningConfig(), lambda n: True, None),
}
for convention in ("keep", "shift"):
    for init, extra in (("RANDOM", {}), ("SAMPLE_VOCAB", {}),
                        ("TEXT", {"prompt_tuning_init_token_ids": [3, 5]})):
        METHODS[f"prompt_{convention}_{init.lower()}"] = (
            lambda convention=convention, init=init, extra=extra: PromptTuningConfig(
                num_virtual_tokens=3, prompt_tuning_init=init, position_convention=convention, **extra),
            _is("prompt_encoder.prompt"), lambda c: 3 * c.d_model)

IDS = list(METHODS)


def make(method, base):
    factory, _, _ = METHODS[method]
    return get_peft_model(base, factory())


@pytest.mark.parametrize("method", IDS)
def test_whole_model_gradcheck(method):
    model = randomise_zero_inits(make(method, tiny_base()))
    for _, module in model.named_modules():
        if hasattr(module, "detach_norm"):
            module.detach_norm = False          # DoRA's exact gradient; detached: test_dora.py
    tokens, targets, mask = data(pad=True)
    errors = gradcheck_peft(model, tokens, targets, mask,
                            max_entries=8 if method == "full" else None)
    assert errors and max(errors.values()) <= 1e-6
    assert all(METHODS[method][1](n) for n in errors)


@pytest.mark.parametrize("method", IDS)
def test_only_method_params_get_grads_and_optimizer_state_and_frozen_unchanged(method):
    model = randomise_zero_inits(make(method, small_base()))
    is_method = METHODS[method][1]
    trainable = [n for n, _ in model.named_parameters(trainable_only=True)]
    assert trainable and all(is_method(n) for n in trainable)
    before = frozen_snapshot(model)
    losses, opt = train_steps(model, steps=3)
    assert sorted(opt.state) == sorted(trainable)
    for name, _ in model.named_parameters():
        grad = model.get_grad(name)
        assert (grad is not None) == (name in trainable), name
    for name, value in before.items():
        assert np.array_equal(model.get_parameter(name), value), f"frozen {name} changed"


@pytest.mark.parametrize("method", IDS)
def test_trainable_count_is_closed_form(method, capsys):
    base = tiny_base()
    total_base = sum(p.size for _, p in base.named_parameters())
    model = make(method, base)
    trainable, total = model.get_nb_trainable_parameters()
    expected = METHODS[method][2]
    if expected is None:                                   # full fine-tuning
        assert trainable == total == total_base
    else:
        assert trainable == expected(CFG64)
        adds_params = not method.startswith(("bitfit", "full"))
        assert total == total_base + (trainable if adds_params else 0)
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


@pytest.mark.parametrize("method", IDS)
def test_short_run_lowers_the_loss_on_a_downstream_task(method):
    """``train.train`` on 64 ``is_sorted`` examples (tasks.py), 40 AdamW steps, well under 1 s."""
    cfg = GPTConfig(vocab_size=tasks.VOCAB_SIZE, context_length=16, d_model=16, n_layers=2, n_heads=2)
    examples = tasks.make_examples("is_sorted", 64, seed=0, min_len=2, max_len=3)
    model = make(method, well_scaled(GPT(cfg, seed=1), seed=1))
    history = train.train(model, examples, steps=40, lr=3e-2, batch_size=16, progress=False,
                          schedule=None)
    first, last = history["losses"][0], float(np.mean(history["losses"][-5:]))
    assert last < first - 0.1, f"{method}: loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("method", IDS)
def test_save_load_round_trip(method, tmp_path):
    model = make(method, small_base())
    train_steps(model, steps=2)
    tokens, _, mask = data(CFG32, pad=True)
    model.eval()
    expected = model(tokens, mask)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(small_base(), str(tmp_path))
    assert np.array_equal(loaded(tokens, mask), expected)
    assert loaded.get_nb_trainable_parameters()[0] == 0     # loaded for inference by default


def test_dtype_and_float32_training_keep_dtypes():
    model = make("ia3", small_base())
    train_steps(model, steps=2)
    assert all(p.dtype == CFG32.dtype for _, p in model.named_parameters())
