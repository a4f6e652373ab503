"""All or nothing, and nothing silent: quantizing, training, optimizers and data parallelism.

Each test provokes one failure a learner meets (a NaN weight, a diverging run, a
worker that stops answering, an adapter switched under a running ``DataParallel``)
and checks two things: the error says what went wrong, and nothing changed.
"""
import os
import signal

import numpy as np
import pytest

from data_parallel import DataParallel
from minigpt import GPT, GPTConfig
from peft_checks import assert_parameters_equal, parameter_snapshot
from nn import Linear, set_submodule
from optim import SGD, AdamW
from peft_model import LoraConfig, get_peft_model
from quantization import QuantizedLinear, quantize_model
from tasks import make_examples
from train import check_finite_step, train

CFG = GPTConfig(vocab_size=13, context_length=10, d_model=16, n_layers=2, n_heads=2,
                dtype=np.float64)


def batch(B=4, T=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CFG.vocab_size, (B, T)), rng.integers(0, CFG.vocab_size, (B, T))


# ---- quantize_model: every target checked before one is replaced ---------------------
def test_a_nan_in_the_last_linear_quantizes_nothing():
    model = GPT(CFG, seed=0)
    model.get_parameter("layers.1.mlp.fc2.weight")[3, 5] = np.nan   # the last target
    before, modules = parameter_snapshot(model), dict(model.named_modules())
    with pytest.raises(ValueError, match=r"cannot quantize layers.1.mlp.fc2 \(nothing was "
                                         r"quantized\): weight must be finite: found nan"):
        quantize_model(model, blocksize=8)
    assert not any(isinstance(m, QuantizedLinear) for _, m in model.named_modules())
    assert all(model.get_submodule(n) is m for n, m in modules.items() if n)
    assert {n for n, _ in model.named_parameters(trainable_only=True)} == set(before)  # not frozen
    np.testing.assert_array_equal(before["layers.0.mlp.fc1.weight"],
                                  model.get_parameter("layers.0.mlp.fc1.weight"))


def test_a_blocksize_that_does_not_divide_a_later_layer_quantizes_nothing():
    model = GPT(CFG, seed=0)
    with pytest.raises(ValueError, match="blocksize=48 does not divide"):
        quantize_model(model, target_modules=["q_proj", "fc1"], blocksize=48)  # 256: 48 fails on q
    assert not any(isinstance(m, QuantizedLinear) for _, m in model.named_modules())


# ---- training: stop at the first non-finite loss or gradient --------------------------
def test_training_stops_at_the_first_non_finite_gradient_and_names_step_and_parameter():
    model = GPT(GPTConfig(vocab_size=64, context_length=24, d_model=16, n_heads=2), seed=0)
    fc1 = model.get_submodule("layers.1.mlp.fc1")
    real = Linear.backward
    calls = {"n": 0}

    def backward(self, dout):                       # a NaN gradient on the 3rd backward of fc1
        dx = real(self, dout)
        if self is fc1:
            calls["n"] += 1
            if calls["n"] == 3:
                self.weight_grad[0, 0] = np.nan
        return dx
    examples = make_examples("copy", 16, seed=0, min_len=2, max_len=4)
    Linear.backward = backward
    try:
        optimizer = AdamW(model, lr=1e-3)
        train(model, examples, steps=2, batch_size=4, optimizer=optimizer, progress=False)
        before = parameter_snapshot(model)
        with pytest.raises(FloatingPointError, match=r"at step 1: loss [0-9.]+, gradient norm nan; "
                                                     r"first non-finite gradient: layers.1.mlp.fc1.weight"):
            train(model, examples, steps=3, batch_size=4, optimizer=optimizer, progress=False)
    finally:
        Linear.backward = real
    assert_parameters_equal(model, before)                 # the NaN step updated nothing


def test_training_stops_at_a_non_finite_loss():
    model = GPT(GPTConfig(vocab_size=64, context_length=24, d_model=16, n_heads=2), seed=0)
    model.get_parameter("ln_f.weight")[...] = np.inf
    with pytest.raises(FloatingPointError, match=r"training diverged at step 1: loss nan"), \
            np.errstate(invalid="ignore", over="ignore"):      # (the NaN is on purpose)
        train(model, "copy", steps=3, batch_size=2, progress=False, grad_clip=None)


@pytest.mark.parametrize("lr, message", [
    (0.0, "lr must be a finite number > 0, got 0.0"),
    (-1e-3, "lr must be a finite number > 0, got -0.001"),
    (float("nan"), "lr must be a finite number > 0, got nan"),
    (float("inf"), "lr must be a finite number > 0, got inf"),
    ("1e-3", r"lr must be a real number, got '1e-3' \(str\)"),
    (True, r"lr must be a real number, got True \(bool\)"),
])
@pytest.mark.parametrize("make", [AdamW, SGD])
def test_optimizers_refuse_non_finite_or_non_positive_learning_rates(make, lr, message):
    with pytest.raises(ValueError, match=message):
        make(GPT(CFG), lr=lr)


def test_a_param_group_with_a_nan_learning_rate_is_refused():
    model = GPT(CFG)
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got nan \(param group 1\)"):
        AdamW(model, param_groups=[{"names": names[:3]}, {"names": names[3:], "lr": float("nan")}])


# ---- the model refuses what it cannot compute ------------------------------------------
@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.bool_, "float16", np.complex128])
def test_model_dtypes_other_than_float32_and_float64_are_refused(dtype):
    with pytest.raises(ValueError, match="GPTConfig.dtype must be float32 or float64, got"):
        GPTConfig(dtype=dtype)


@pytest.mark.parametrize("position_ids, match", [
    (np.arange(5), r"position_ids must be integers of shape \(6,\) or \(2, 6\).*shape \(5,\)"),
    (np.zeros((3, 6), int), r"shape \(6,\) or \(2, 6\).*shape \(3, 6\)"),
    (np.arange(6.0), r"got float64 of shape \(6,\)"),
    (np.arange(6) + 5, r"position id 10 out of range: valid positions are 0..9"),
])
def test_position_ids_of_the_wrong_shape_or_range_are_refused(position_ids, match):
    model = GPT(CFG)
    with pytest.raises(ValueError, match=match):
        model.forward(np.zeros((2, 6), int), position_ids=position_ids)


def test_a_batch_whose_targets_are_all_ignored_is_not_a_perfect_loss():
    model = GPT(GPTConfig(vocab_size=64, context_length=24, d_model=16, n_heads=2), seed=0)
    prompt_only = [([3, 20, 21, 1], [])] * 2     # answers empty: only EOS is a target
    history = train(model, prompt_only, steps=1, batch_size=2, progress=False)
    assert np.isfinite(history["losses"][0])      # (EOS still counts)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 4: every target of the "
                                                 r"batch is ignore_index -100"):
        check_finite_step(model, float("nan"), 0.0, np.full((2, 3), -100), step=4)
    tokens, targets = batch()
    with DataParallel(GPT(CFG), processes=1) as dp:
        assert np.isnan(dp.forward_backward(tokens, np.full_like(targets, -100)))


# ---- DataParallel ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_dp():
    model = get_peft_model(GPT(CFG, seed=3), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    rng = np.random.default_rng(0)
    for _, p in model.named_parameters(trainable_only=True):
        p[...] = rng.standard_normal(p.shape) * 0.3
    with DataParallel(model, processes=2) as dp:
        yield model, dp


def grads(model):
    return {n: model.get_grad(n).copy() for n, _ in model.named_parameters(trainable_only=True)}


def test_a_failed_worker_leaves_the_gradients_as_they_were(lora_dp):
    model, dp = lora_dp
    tokens, targets = batch(seed=1)
    model.zero_grad()
    dp.forward_backward(tokens, targets)          # some gradients to protect
    before = grads(model)
    bad = targets.copy()
    bad[-1, -1] = 99                               # only the worker's slice is bad
    with pytest.raises(ValueError, match="target 99 out of range for 13 classes"):
        dp.forward_backward(tokens, bad)
    after = grads(model)
    for name in before:
        assert np.array_equal(after[name], before[name]), f"{name}: half a step was added"


def test_a_model_changed_under_data_parallel_is_refused(lora_dp):
    model, dp = lora_dp
    tokens, targets = batch(seed=2)
    model.set_adapter("other")
    try:
        with pytest.raises(RuntimeError, match=r"model changed since .*: the adapter state of "
                                               r"\(the model\) changed .*'other'.*build a new"):
            dp.forward_backward(tokens, targets)
    finally:
        model.set_adapter("default")
    model.zero_grad()
    dp.forward_backward(tokens, targets)          # back as it was: accepted again
    q = model.get_submodule("layers.0.self_attn.q_proj")
    model.get_submodule("layers.0.self_attn").q_proj = Linear(16, 16, dtype=np.float64)
    try:
        with pytest.raises(RuntimeError, match="module layers.0.self_attn.q_proj was replaced"):
            dp.forward_backward(tokens, targets)
    finally:
        model.get_submodule("layers.0.self_attn").q_proj = q


def test_a_frozen_layer_or_a_merge_is_noticed():
    model = GPT(CFG, seed=0)
    tokens, targets = batch(seed=3)
    with DataParallel(model, processes=1) as dp:
        model.get_submodule("layers.0.mlp.fc1").requires_grad_(False)
        with pytest.raises(RuntimeError, match=r"frozen parameters of layers.0.mlp.fc1 changed"):
            dp.forward_backward(tokens, targets)
    lora = get_peft_model(GPT(CFG, seed=0), LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    with DataParallel(lora, processes=1) as dp:
        lora.merge_adapter()
        with pytest.raises(RuntimeError, match=r"adapter state of layers.0.self_attn.v_proj changed"):
            dp.forward_backward(tokens, targets)


def test_a_worker_that_stops_answering_times_out_with_a_clear_error():
    model = GPT(CFG, seed=0)
    tokens, targets = batch(seed=4)
    with DataParallel(model, processes=2, timeout=1.5) as dp:
        model.zero_grad()
        before = grads(model)
        os.kill(dp.worker_pids[0], signal.SIGSTOP)
        with pytest.raises(RuntimeError, match=r"did not answer within timeout=1.5 s.*now closed"):
            dp.forward_backward(tokens, targets)
        after = grads(model)
        assert all(np.array_equal(after[n], before[n]) for n in before)
        with pytest.raises(RuntimeError, match="was closed .*did not answer"):
            dp.forward_backward(tokens, targets)
    model.forward(tokens)                          # private arrays again


@pytest.mark.parametrize("kwargs, match", [
    ({"processes": 2.5}, r"processes must be an integer, got 2.5 \(float\)"),
    ({"processes": "2"}, r"processes must be an integer, got '2' \(str\)"),
    ({"timeout": 0}, "timeout must be a finite number > 0, got 0"),
])
def test_data_parallel_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataParallel(GPT(CFG), **kwargs)


@pytest.mark.parametrize("tokens, targets, match", [
    (np.zeros((0, 4), int), np.zeros((0, 4), int), r"batch >= 1 and seq >= 1, got shape \(0, 4\)"),
    (np.zeros((2, 0), int), np.zeros((2, 0), int), r"got shape \(2, 0\)"),
    (np.zeros((2, 4), int), np.zeros((2, 3), int), r"inputs \(2, 4\) and targets \(2, 3\)"),
])
def test_data_parallel_refuses_empty_or_mismatched_batches(tokens, targets, match):
    model = GPT(CFG)
    with DataParallel(model, processes=1) as dp:
        with pytest.raises(ValueError, match=match):
            dp.forward_backward(tokens, targets)
