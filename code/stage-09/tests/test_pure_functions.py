"""The course classes' maths as pure forward/backward pairs, gradient-checked on their own.

``lora_forward``/``lora_backward``, ``adapter_forward``/``adapter_backward`` and
``prompt_forward``/``prompt_backward`` are what ``LoRALayer``, ``Adapter`` and
``PromptTuning`` call (so exercises 9.6-9.8 compare line by line with the library).
Float64, random upstream gradients, no zero-initialised factor left at zero.
"""
import numpy as np
import pytest

from gradcheck import compare, numerical_gradient
from nn import ACTIVATIONS
from peft import (Adapter, LoRALayer, PromptTuning, adapter_backward, adapter_forward,
                  lora_backward, lora_forward, prefix_grad_table, prompt_backward, prompt_forward)

TOL = 1e-7


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)], ids=["2d", "3d"])
def test_lora_pair(shape):
    rng = np.random.default_rng(0)
    x, A, B = rng.standard_normal(shape), rng.standard_normal((3, 5)), rng.standard_normal((4, 3))
    out, cache = lora_forward(x, A, B, 0.7)
    np.testing.assert_allclose(out, 0.7 * (x @ A.T) @ B.T, rtol=1e-12)
    G = rng.standard_normal(out.shape)
    dx, dA, dB = lora_backward(G, cache)

    def loss():
        return float(np.sum(lora_forward(x, A, B, 0.7)[0] * G))
    for name, analytic, wrt in (("x", dx, x), ("A", dA, A), ("B", dB, B)):
        compare(name, analytic, numerical_gradient(loss, wrt), TOL)
    assert lora_backward(G, cache, weight_grads=False)[1:] == (None, None)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_adapter_pair(activation):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 5))
    W_down, W_up = rng.standard_normal((5, 4)) / 2, rng.standard_normal((4, 5)) / 2
    b_down, b_up = rng.standard_normal(4), rng.standard_normal(5)

    def run():
        return adapter_forward(x, W_down, b_down, W_up, b_up, ACTIVATIONS[activation]())
    out, cache = run()
    G = rng.standard_normal(out.shape)
    dx, *grads = adapter_backward(G, cache)

    def loss():
        return float(np.sum(run()[0] * G))
    for name, analytic, wrt in zip(("x", "W_down", "b_down", "W_up", "b_up"), [dx] + grads,
                                   (x, W_down, b_down, W_up, b_up)):
        compare(name, analytic, numerical_gradient(loss, wrt), TOL)


def test_prompt_pair_and_prefix_table():
    rng = np.random.default_rng(2)
    prompt, x = rng.standard_normal((2, 4)), rng.standard_normal((3, 5, 4))
    out, cache = prompt_forward(prompt, x)
    G = rng.standard_normal(out.shape)
    d_input, d_prompt = prompt_backward(G, cache)

    def loss():
        return float(np.sum(prompt_forward(prompt, x)[0] * G))
    compare("input", d_input, numerical_gradient(loss, x), TOL)
    compare("prompt", d_prompt, numerical_gradient(loss, prompt), TOL)
    pairs = [(rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))) for _ in range(3)]
    table = prefix_grad_table(pairs)
    assert table.shape == (3, 2, 2, 3, 4)
    np.testing.assert_array_equal(table[2, 1], pairs[2][1])


def test_the_classes_compute_with_the_pure_functions(monkeypatch):
    """Swap each pure function for a marked copy: the class's output changes with it."""
    import adapters
    import lora
    import soft_prompts
    x = np.random.default_rng(3).standard_normal((2, 3, 4))
    for module, name, layer, call in (
            (lora, "lora_forward", LoRALayer(4, 4, rank=2), lambda m: m.delta(x)),
            (adapters, "adapter_forward", Adapter(4, 2), lambda m: m.branch(x)),
            (soft_prompts, "prompt_forward", PromptTuning(4, 2), lambda m: m.forward(x))):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real: (_real(*a)[0] + 1.0, _real(*a)[1]))
        marked = call(layer)
        monkeypatch.setattr(module, name, real)
        np.testing.assert_allclose(marked, call(layer) + 1.0)
