"""DataParallel: slices of a batch in worker processes give exactly the single-process gradients."""
import os
import signal

import numpy as np
import pytest

from data_parallel import DataParallel
from minigpt import GPT, GPTConfig
from nn import cross_entropy
from optim import SGD
from peft_model import LoraConfig, get_peft_model

CFG = GPTConfig(vocab_size=13, context_length=10, d_model=16, n_layers=2, n_heads=2,
                dtype=np.float64)


def batch(B=5, T=8, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (B, T))
    targets = rng.integers(0, CFG.vocab_size, (B, T))
    targets[B // 2:, : T - 2] = -100        # the later slices count far fewer targets
    return tokens, targets


def single_process(model, tokens, targets, attention_mask=None):
    """Loss and gradients of the whole batch in this process: the reference."""
    model.zero_grad()
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    loss, dlogits = cross_entropy(model.forward(tokens, **kwargs), targets)
    model.backward(dlogits)
    return loss, {n: model.get_grad(n).copy() for n, _ in model.named_parameters(trainable_only=True)}


def rel_err(a, b, floor):
    """Max-normalised relative error, the denominator floored at ``floor`` (the gradient of
    ``k_proj.bias`` is zero in exact arithmetic, so its own scale is rounding noise)."""
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a) + np.abs(b)), floor)


def assert_same_gradients(model, ref, tol=1e-10):
    floor = 1e-6 * max(np.abs(g).max() for g in ref.values())
    for name, g in ref.items():
        got = model.get_grad(name)
        assert got is not None, f"{name}: no gradient after the data-parallel step"
        err = rel_err(got, g, floor)
        assert err <= tol, f"{name}: data-parallel gradient differs, relative error {err:.2e}"


@pytest.fixture(scope="module")
def gpt_dp():
    model = GPT(CFG, seed=3)
    with DataParallel(model, processes=2) as dp:
        yield model, dp


def test_gradients_and_loss_equal_one_process(gpt_dp):
    model, dp = gpt_dp
    tokens, targets = batch()
    ref_loss, ref = single_process(model, tokens, targets)
    model.zero_grad()
    loss = dp.forward_backward(tokens, targets)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert_same_gradients(model, ref)


def test_gradients_accumulate_like_backward(gpt_dp):
    model, dp = gpt_dp
    tokens, targets = batch(seed=1)
    _, ref = single_process(model, tokens, targets)
    model.zero_grad()
    dp.forward_backward(tokens, targets)
    dp.forward_backward(tokens, targets)                    # += , as backward does
    assert_same_gradients(model, {n: 2 * g for n, g in ref.items()})


def test_attention_mask_is_sliced_too(gpt_dp):
    model, dp = gpt_dp
    tokens, targets = batch(seed=2)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    mask[4, :5] = 0
    ref_loss, ref = single_process(model, tokens, targets, mask)
    model.zero_grad()
    loss = dp.forward_backward(tokens, targets, attention_mask=mask)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert_same_gradients(model, ref)


def test_a_batch_of_one_runs_here(gpt_dp):
    model, dp = gpt_dp
    tokens, targets = batch(B=1, seed=4)
    targets[0, 0] = 3
    ref_loss, ref = single_process(model, tokens, targets)
    model.zero_grad()
    assert abs(dp.forward_backward(tokens, targets) - ref_loss) <= 1e-12 * abs(ref_loss)
    assert_same_gradients(model, ref)


def test_a_worker_error_is_raised_here_and_the_workers_go_on(gpt_dp):
    model, dp = gpt_dp
    tokens, targets = batch(seed=5)
    bad = targets.copy()
    bad[-1, -1] = CFG.vocab_size + 7                        # only the worker's slice is bad
    model.zero_grad()
    with pytest.raises(ValueError, match=f"target {CFG.vocab_size + 7} out of range"):
        dp.forward_backward(tokens, bad)
    _, ref = single_process(model, tokens, targets)
    model.zero_grad()
    dp.forward_backward(tokens, targets)                    # still in step with its worker
    assert_same_gradients(model, ref)


def test_mismatched_batch_axes_are_refused(gpt_dp):
    _, dp = gpt_dp
    tokens, targets = batch()
    with pytest.raises(ValueError, match="batch axis"):
        dp.forward_backward(tokens, targets[:3])


def test_training_with_shared_weights_matches_one_process():
    """Three SGD steps: the workers must see every update the optimizer makes here.

    (SGD, not AdamW: Adam divides by the gradient's size, so it would turn the rounding
    noise in ``k_proj.bias``'s zero gradient into full-size, differing updates.)"""
    tokens, targets = batch(seed=6)
    ref_model = GPT(CFG, seed=7)
    ref_opt = SGD(ref_model, lr=0.1, momentum=0.9)
    for _ in range(3):
        single_process(ref_model, tokens, targets)
        ref_opt.step()
    model = GPT(CFG, seed=7)
    opt = SGD(model, lr=0.1, momentum=0.9)
    with DataParallel(model, processes=2) as dp:
        for _ in range(3):
            opt.zero_grad()
            dp.forward_backward(tokens, targets)
            opt.step()
        shared = model.get_parameter("layers.0.mlp.fc1.weight")
        assert not shared.flags.owndata                     # a view into shared memory
    for name, value in ref_model.named_parameters():
        err = rel_err(model.get_parameter(name), value, 1e-8)   # k_proj.bias: ~1e-17
        assert err <= 1e-9, f"{name} after 3 steps: relative error {err:.2e}"
    after = model.get_parameter("layers.0.mlp.fc1.weight")
    assert after.flags.owndata                              # close() gave back private arrays
    model.forward(tokens)                                   # and the model still works


def test_lora_model_gets_only_adapter_gradients():
    tokens, targets = batch(seed=8)
    model = get_peft_model(GPT(CFG, seed=9), LoraConfig(r=2, lora_alpha=4,
                                                        target_modules=["q_proj", "v_proj"]))
    rng = np.random.default_rng(0)
    for name, p in model.named_parameters(trainable_only=True):
        p[...] = rng.standard_normal(p.shape) * 0.3         # B is zero at init: not a test
    _, ref = single_process(model, tokens, targets)
    with DataParallel(model, processes=2) as dp:
        model.zero_grad()
        dp.forward_backward(tokens, targets)
        assert_same_gradients(model, ref)
        trainable = {n for n, _ in model.named_parameters(trainable_only=True)}
        frozen = [n for n, _ in model.named_parameters() if n not in trainable]
        assert frozen and all(model.get_grad(n) is None for n in frozen)


def test_one_process_needs_no_workers_and_bad_counts_are_refused():
    model = GPT(CFG, seed=3)
    tokens, targets = batch(seed=10)
    ref_loss, ref = single_process(model, tokens, targets)
    with DataParallel(model, processes=1) as dp:
        assert dp.worker_pids == []
        model.zero_grad()
        assert abs(dp.forward_backward(tokens, targets) - ref_loss) <= 1e-12 * abs(ref_loss)
        assert_same_gradients(model, ref)
    with pytest.raises(ValueError, match="processes must be an integer >= 1, got 0"):
        DataParallel(model, processes=0)


class Unpicklable(GPT):
    """A model that cannot be rebuilt in a worker (as when a script lacks its main guard)."""

    def __setstate__(self, state):
        raise RuntimeError("cannot rebuild here")


def test_a_worker_that_dies_at_start_is_reported_at_once():
    with pytest.raises(RuntimeError, match=r"exited with code 1 before it started.*__main__"):
        DataParallel(Unpicklable(CFG, seed=0), processes=2)


def test_a_worker_that_dies_later_is_reported():
    model = GPT(CFG, seed=3)
    tokens, targets = batch(seed=11)
    with DataParallel(model, processes=2) as dp:
        os.kill(dp.worker_pids[0], signal.SIGKILL)
        with pytest.raises(RuntimeError, match="died .*closed: build a new one"):
            dp.forward_backward(tokens, targets)
    model.forward(tokens)                                   # close() still gave arrays back


def test_a_parameter_replaced_instead_of_updated_in_place_still_reaches_the_workers():
    """``m.weight = m.weight - lr * g`` rebinds: the shared copy is refreshed before the step."""
    tokens, targets = batch(seed=12)
    model = GPT(CFG, seed=3)
    with DataParallel(model, processes=2) as dp:
        fc1 = model.get_submodule("layers.1.mlp.fc1")
        fc1.weight = fc1.weight * 1.5                       # a new array, not in shared memory
        _, ref = single_process(model, tokens, targets)
        model.zero_grad()
        dp.forward_backward(tokens, targets)
        assert_same_gradients(model, ref)
        assert not fc1.weight.flags.owndata                 # shared again
        fc1.weight = np.zeros((3, 3))
        with pytest.raises(ValueError, match=r"layers.1.mlp.fc1.weight .*\(3, 3\).*\(64, 16\)"):
            dp.forward_backward(tokens, targets)


def test_without_threadpoolctl_it_warns_and_still_gives_the_same_gradients(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)   # import fails: not installed
    model = GPT(CFG, seed=3)
    tokens, targets = batch(seed=13)
    _, ref = single_process(model, tokens, targets)
    with pytest.warns(RuntimeWarning, match="threadpoolctl is not installed"):
        dp = DataParallel(model, processes=2)
    with dp:
        model.zero_grad()
        dp.forward_backward(tokens, targets)
        assert_same_gradients(model, ref)
