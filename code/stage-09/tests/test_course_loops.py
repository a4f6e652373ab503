"""The course's training loop, as the course text writes it, for every standalone class.

The course's loop is ``forward``, ``backward``, ``p -= lr * p_grad``, repeat -- with no
zeroing. That is right only if ``backward`` *sets* the gradients, which the
standalone forms do; inside a model the same classes *accumulate* (tied weights
need it, and ``zero_grad`` clears). Each test here would fail with accumulating
standalone gradients: the gradient of three identical calls would grow 1x, 2x, 3x,
and the no-zeroing loop would drift away from the zeroing one.
"""
import numpy as np
import pytest

from minigpt import GPT, GPTConfig
from nn import cross_entropy
from peft import Adapter, LoRALayer, PrefixTuning, PromptTuning
from dora import DoRALayer

RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 5))                                  # frozen (out, in)
X = RNG.standard_normal((4, 3, 5))


def lora():
    layer = LoRALayer(5, 6, rank=2, alpha=4.0, dtype=np.float64)
    layer.B = np.random.default_rng(1).standard_normal((6, 2)) * 0.1    # off zero: A gets a gradient
    return layer


def dora():
    layer = DoRALayer(5, 6, rank=2, alpha=4.0, dtype=np.float64)
    layer.B = np.random.default_rng(1).standard_normal((6, 2)) * 0.1
    layer.init_magnitude(W)
    return layer


def adapter():
    ad = Adapter(5, bottleneck_dim=3, activation="gelu", bias=True, dtype=np.float64)
    ad.W_up = np.random.default_rng(1).standard_normal((3, 5)) * 0.1
    return ad


def prompt():
    return PromptTuning(5, prompt_length=2, dtype=np.float64)


def mse_step(layer, call):
    """One course step's loss ``mean((out - target)^2)`` and its gradient w.r.t. ``out``."""
    out = call(layer)
    target = np.random.default_rng(9).standard_normal(out.shape)   # same every call
    return float(np.mean((out - target) ** 2)), 2 * (out - target) / out.size


CASES = {   # name: (make, call, learning rate)
    "LoRALayer": (lora, lambda layer: layer.forward(X, W), 0.1),
    "DoRALayer": (dora, lambda layer: layer.forward(X, W), 0.1),
    "Adapter": (adapter, lambda layer: layer.forward(X), 0.5),
    "PromptTuning": (prompt, lambda layer: layer.forward(X), 5.0),
}


def course_loop(make, call, steps, lr, zero_first):
    """``steps`` of the course's loop; ``zero_first`` adds the zeroing the course omits."""
    layer, losses = make(), []
    for _ in range(steps):
        if zero_first:
            layer.zero_grad()
        loss, dout = mse_step(layer, call)
        layer.backward(dout)
        for p, g in zip(layer.parameters(), layer.gradients()):
            p -= lr * g
        losses.append(loss)
    return layer, losses


@pytest.mark.parametrize("name", list(CASES))
def test_repeated_backward_sets_the_same_gradient(name):
    make, call, _ = CASES[name]
    layer = make()
    grads = []
    for _ in range(3):                                  # three identical calls, no zeroing
        _, dout = mse_step(layer, call)
        layer.backward(dout)
        grads.append([g.copy() for g in layer.gradients()])
    for later in grads[1:]:
        for a, b in zip(grads[0], later):
            np.testing.assert_array_equal(a, b)
    assert all(np.abs(g).max() > 0 for g in grads[0])


@pytest.mark.parametrize("name", list(CASES))
def test_the_course_loop_trains_as_with_zeroing(name):
    make, call, lr = CASES[name]
    course, losses = course_loop(make, call, steps=20, lr=lr, zero_first=False)
    zeroed, _ = course_loop(make, call, steps=20, lr=lr, zero_first=True)
    for a, b in zip(course.parameters(), zeroed.parameters()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert losses[-1] < losses[0]                        # and it does train


def test_inside_a_model_the_same_classes_accumulate():
    """``delta_backward`` / ``branch_backward`` / ``accumulate_backward``: the model's path adds."""
    layer = lora()
    layer.forward(X, W)
    dout = np.ones((4, 3, 6))
    layer.backward(dout)
    once = layer.A_grad.copy()
    layer.delta(X)
    layer.delta_backward(dout)
    np.testing.assert_allclose(layer.A_grad, 2 * once, rtol=1e-12)
    pt = prompt()
    pt.forward(X)
    pt.backward(np.ones((4, 5, 5)))
    pt.accumulate_backward(np.ones((4, 5, 5)))
    np.testing.assert_array_equal(pt.prompt_grad, 2 * 4 * np.ones((2, 5)))


def test_prefix_tuning_course_loop_on_the_mini_gpt():
    """The prefix's loop: the frozen GPT reads ``get_prefix(l)`` in every layer; ``backward``
    takes each attention layer's prefix gradient and *sets* ``prefix_grad``."""
    cfg = GPTConfig(vocab_size=11, context_length=8, d_model=8, n_layers=2, n_heads=2,
                    dtype=np.float64)
    model = GPT(cfg, seed=1).freeze()
    tokens = np.random.default_rng(2).integers(0, 11, (3, 6))
    targets = np.roll(tokens, -1, axis=1)

    def run(zero_first, steps=15, lr=0.5):
        pt, losses = PrefixTuning(cfg.n_layers, cfg.n_heads, cfg.d_head, prefix_length=3,
                                  dtype=np.float64), []
        for _ in range(steps):
            if zero_first:
                pt.zero_grad()
            logits = model.forward(tokens, prefixes=[pt.get_prefix(i) for i in range(cfg.n_layers)])
            loss, dlogits = cross_entropy(logits, targets)
            model.backward(dlogits)
            pt.backward([block.self_attn.prefix_grad for block in model.layers])
            pt.prefix -= lr * pt.prefix_grad
            losses.append(loss)
        return pt, losses

    course, losses = run(zero_first=False)
    zeroed, _ = run(zero_first=True)
    np.testing.assert_allclose(course.prefix, zeroed.prefix, rtol=1e-12, atol=1e-12)
    assert losses[-1] < losses[0]
