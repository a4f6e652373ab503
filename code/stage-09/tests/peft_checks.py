"""Shared helpers for the PEFT method tests (test_ia3, test_bottleneck, test_dora, ...).

* ``tiny_base`` / ``small_base``: a well-scaled float64 GPT for gradient checks, a
  float32 one for training runs.
* ``randomise_zero_inits``: every parameter a method starts at a special value
  (LoRA ``B = 0``, adapter ``W_up = 0``, (IA)3 ``l = 1``, DoRA ``m = ||W||``) is
  moved away from it, so a wrong backward cannot hide behind a zero.
* ``gradcheck_peft``: central differences of the token cross-entropy w.r.t. every
  trainable parameter of a ``PeftModel`` (tol 1e-6, float64).
"""
import importlib.util
import os

import numpy as np

from gradcheck import check_model_loss
from minigpt import GPT, GPTConfig
from nn import cross_entropy
from optim import AdamW


def _load_conftest():
    """This directory's ``conftest.py``, by path: ``from conftest import ...`` would pick up
    ``exercises/conftest.py`` instead when pytest collects both directories."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")
    spec = importlib.util.spec_from_file_location("stage09_tests_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


well_scaled = _load_conftest().well_scaled

CFG64 = GPTConfig(vocab_size=11, context_length=12, d_model=8, n_layers=2, n_heads=2,
                  dtype=np.float64)
CFG32 = GPTConfig(vocab_size=13, context_length=12, d_model=16, n_layers=2, n_heads=2)


def tiny_base(seed=1, cfg=CFG64):
    return well_scaled(GPT(cfg, seed=seed), seed=seed)


def small_base(seed=1):
    return tiny_base(seed, CFG32)


def data(cfg=CFG64, B=2, T=6, seed=0, pad=False):
    """Random tokens and targets (some ignored); with ``pad`` a left-padded mask too."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, :2] = -100
    if not pad:
        return tokens, targets, None
    mask = np.ones_like(tokens)
    mask[1, :2] = 0
    targets[1, :2] = -100
    return tokens, targets, mask


ZERO_INIT_SUFFIXES = ("lora.B", "adapter.W_up", "adapter.b_up")
SCALE_INIT_SUFFIXES = ("ia3.ia3_l", "lora.magnitude")


def randomise_zero_inits(model, seed=1):
    """Zero-initialised parameters become N(0, 0.25); scales are multiplied by 1 + N(0, 0.25).

    The adapters' down-projection bias only gets N(0, 0.01): a large negative one
    would switch a ReLU bottleneck off and leave nothing to check.
    """
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith(ZERO_INIT_SUFFIXES):
            p[...] = rng.standard_normal(p.shape) * 0.5
        elif name.endswith(SCALE_INIT_SUFFIXES):
            p[...] *= 1.0 + 0.5 * rng.standard_normal(p.shape)
        elif name.endswith("adapter.b_down"):
            p[...] = rng.standard_normal(p.shape) * 0.1
    return model


def loss_and_grads(model, tokens, targets, attention_mask=None):
    model.zero_grad()
    loss, dlogits = cross_entropy(model.forward(tokens, attention_mask), targets)
    model.backward(dlogits)
    return loss, {n: model.get_grad(n) for n, _ in model.named_parameters(trainable_only=True)}


def gradcheck_peft(model, tokens, targets, attention_mask=None, tol=1e-6, max_entries=None,
                   loss_only=None):
    """``{name: relative error}`` over every trainable parameter; raises on a mismatch.

    ``loss_only`` replaces the reference loss (DoRA's detached check passes a loss
    whose norm is held fixed).
    """
    def reference():
        return cross_entropy(model.forward(tokens, attention_mask), targets)[0]

    arrays = dict(model.named_parameters(trainable_only=True))
    return check_model_loss(lambda: loss_and_grads(model, tokens, targets, attention_mask)[1],
                            loss_only or reference, arrays, tol=tol, max_entries=max_entries)


def parameter_snapshot(model):
    """Copies of every parameter, by name (to compare with after an operation)."""
    return {n: p.copy() for n, p in model.named_parameters()}


def assert_parameters_equal(model, before, what="changed"):
    """The model has exactly the parameters of ``before`` (names and values)."""
    now = dict(model.named_parameters())
    assert set(now) == set(before), "the parameter names changed"
    for name, value in before.items():
        assert np.array_equal(now[name], value), f"{name} {what}"


def frozen_snapshot(model):
    """Copies of every frozen parameter, by name."""
    trainable = {n for n, _ in model.named_parameters(trainable_only=True)}
    return {n: p.copy() for n, p in model.named_parameters() if n not in trainable}


def learnable_batch(cfg=CFG32, B=4, T=8, seed=0):
    """Fixed random sequences whose next token is ``(token + 1) mod vocab``: learnable."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    return tokens, (tokens + 1) % cfg.vocab_size


def train_steps(model, steps=25, lr=1e-2, batch=None):
    """A few AdamW steps on a fixed batch; returns ``(losses, optimizer)``."""
    tokens, targets = batch if batch is not None else learnable_batch()
    opt = AdamW(model, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss, dlogits = cross_entropy(model.forward(tokens), targets)
        model.backward(dlogits)
        opt.step()
        losses.append(loss)
    return losses, opt
