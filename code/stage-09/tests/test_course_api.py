"""The course text's API (docs/COURSE_API.md): every name, argument, attribute and shape."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradcheck import compare, numerical_gradient
from peft import (Adapter, LoRALayer, LoRALinear, PrefixTuning, PromptTuning,
                  apply_lora_to_attention, compare_peft_methods, compute_parameter_efficiency,
                  count_frozen_parameters, count_trainable_parameters)

STAGE = Path(__file__).resolve().parents[1]


def test_lora_layer_attributes_and_init():
    lora = LoRALayer(32, 16, rank=4, alpha=8.0)
    assert (lora.in_features, lora.out_features, lora.rank, lora.alpha) == (32, 16, 4, 8.0)
    assert lora.scaling == 8.0 / 4
    assert lora.A.shape == (4, 32) and lora.B.shape == (16, 4)
    assert np.all(lora.B == 0) and np.abs(lora.A).max() <= 1 / np.sqrt(32)
    assert np.abs(lora.A).max() > 0
    assert lora.num_parameters() == 4 * 32 + 16 * 4
    assert lora.compression_ratio() == pytest.approx((4 * 32 + 16 * 4) / (32 * 16))
    assert [p.shape for p in lora.parameters()] == [(4, 32), (16, 4)]


def test_lora_layer_forward_backward_exact():
    rng = np.random.default_rng(0)
    lora = LoRALayer(6, 5, rank=3, alpha=6.0, dtype=np.float64)
    lora.B = rng.standard_normal((5, 3))            # a learner may assign B; forward must use it
    W = rng.standard_normal((5, 6))
    x = rng.standard_normal((2, 4, 6))
    y = lora.forward(x, W)
    np.testing.assert_allclose(y, x @ W.T + 2.0 * (x @ lora.A.T) @ lora.B.T, rtol=1e-12)
    G = rng.standard_normal(y.shape)
    dx = lora.backward(G)
    grads = [g.copy() for g in lora.gradients()]
    loss = lambda: float(np.sum(lora.forward(x, W) * G))  # noqa: E731
    compare("x", dx, numerical_gradient(loss, x), 1e-7)
    compare("A", grads[0], numerical_gradient(loss, lora.A), 1e-7)
    compare("B", grads[1], numerical_gradient(loss, lora.B), 1e-7)
    np.testing.assert_allclose(lora.merge_weights(W), W + 2.0 * lora.B @ lora.A)


def test_lora_layer_2d_input_and_zero_grad():
    lora = LoRALayer(4, 3, rank=2)
    x = np.ones((5, 4), dtype=np.float32)
    y = lora.forward(x, np.ones((3, 4), dtype=np.float32))
    assert y.shape == (5, 3)
    assert lora.backward(np.ones_like(y)).shape == x.shape
    lora.zero_grad()
    assert all(np.all(g == 0) for g in lora.gradients())


def test_lora_linear_course_form():
    rng = np.random.default_rng(1)
    W, b = rng.standard_normal((5, 6)), rng.standard_normal(5)
    layer = LoRALinear(W, b, lora_rank=2, lora_alpha=4.0)
    assert layer.weight is not W and layer.bias is not b          # copies: merging in place
    np.testing.assert_array_equal(layer.weight, W)                # must not change the learner's W
    np.testing.assert_array_equal(layer.bias, b)
    assert (layer.in_features, layer.out_features) == (6, 5)
    assert isinstance(layer.lora, LoRALayer) and layer.lora.rank == 2
    x = rng.standard_normal((3, 6))
    np.testing.assert_array_equal(layer.forward(x), x @ W.T + b)    # B = 0 at init
    layer.lora.B = rng.standard_normal((5, 2))
    merged_W, merged_b = layer.merge()
    np.testing.assert_allclose(x @ merged_W.T + merged_b, layer.forward(x), rtol=1e-10)
    G = rng.standard_normal((3, 5))
    dx = layer.backward(G)
    loss = lambda: float(np.sum(layer.forward(x) * G))  # noqa: E731
    compare("x", dx, numerical_gradient(loss, x), 1e-7)
    assert len(layer.parameters()) == 2 and len(layer.gradients()) == 2
    layer.zero_grad()
    assert np.all(layer.gradients()[0] == 0)


def test_adapter_course_form():
    rng = np.random.default_rng(2)
    ad = Adapter(8, bottleneck_dim=3, activation="gelu", dtype=np.float64)
    assert ad.W_down.shape == (8, 3) and ad.W_up.shape == (3, 8)
    x = rng.standard_normal((2, 4, 8))
    assert np.abs(ad.forward(x) - x).max() <= 0.1              # near identity (exactly, here)
    assert ad.num_parameters() == ad.W_down.size + ad.W_up.size
    ad.W_up = rng.standard_normal((3, 8))
    G = rng.standard_normal(x.shape)
    ad.forward(x)
    dx = ad.backward(G)
    gd, gu = ad.W_down_grad.copy(), ad.W_up_grad.copy()
    loss = lambda: float(np.sum(ad.forward(x) * G))  # noqa: E731
    compare("x", dx, numerical_gradient(loss, x), 1e-7)
    compare("W_down", gd, numerical_gradient(loss, ad.W_down), 1e-7)
    compare("W_up", gu, numerical_gradient(loss, ad.W_up), 1e-7)
    assert len(ad.parameters()) == 2 and len(ad.gradients()) == 2


def test_prefix_tuning_course_form():
    pt = PrefixTuning(num_layers=3, num_heads=2, d_head=4, prefix_length=5)
    assert pt.prefix.shape == (3, 2, 5, 2, 4)
    k, v = pt.get_prefix(1)
    assert k.shape == v.shape == (5, 2, 4)
    np.testing.assert_array_equal(k, pt.prefix[1, 0])
    np.testing.assert_array_equal(v, pt.prefix[1, 1])
    assert pt.num_parameters() == 3 * 2 * 5 * 2 * 4 and len(pt.parameters()) == 1


def test_prompt_tuning_course_form():
    rng = np.random.default_rng(3)
    vocab = rng.standard_normal((20, 6))
    pt = PromptTuning(6, prompt_length=4, init_from_vocab=vocab, dtype=np.float64)
    assert pt.prompt.shape == (4, 6)
    assert all(any(np.array_equal(row, v) for v in vocab) for row in pt.prompt)
    x = rng.standard_normal((3, 5, 6))
    out = pt.forward(x)
    assert out.shape == (3, 9, 6)
    np.testing.assert_array_equal(out[:, 4:], x)
    np.testing.assert_array_equal(out[1, :4], pt.prompt)
    G = rng.standard_normal(out.shape)
    dx = pt.backward(G)
    assert dx.shape == x.shape
    np.testing.assert_allclose(pt.prompt_grad, G[:, :4].sum(0))
    assert pt.num_parameters() == 24 and len(pt.parameters()) == 1


def test_utilities():
    arrays = [np.zeros((3, 4)), np.zeros(5)]
    assert count_trainable_parameters(arrays) == 17
    assert count_frozen_parameters(arrays) == 17
    eff = compute_parameter_efficiency(10, 1000)
    assert eff == {"trainable_params": 10, "total_params": 1000, "trainable_ratio": 0.01,
                   "efficiency_gain": 100.0}


def test_apply_lora_to_attention():
    rng = np.random.default_rng(4)
    ws = [rng.standard_normal((8, 8)) for _ in range(4)]
    out = apply_lora_to_attention(*ws, rank=2, alpha=4.0)
    assert set(out) == {"q", "k", "v", "o"}
    assert isinstance(out["q"], LoRALinear) and isinstance(out["v"], LoRALinear)
    assert out["k"] is ws[1] and out["o"] is ws[3]
    out = apply_lora_to_attention(*ws, target_modules=["q", "k", "v", "o"])
    assert all(isinstance(v, LoRALinear) for v in out.values())
    with pytest.raises(ValueError, match="unknown attention target"):
        apply_lora_to_attention(*ws, target_modules=["x"])


def test_compare_peft_methods_course_numbers():
    table = compare_peft_methods()
    assert [table[k]["params"] for k in ("full_fine_tuning", "lora", "adapters", "prefix_tuning",
                                         "prompt_tuning")] == [2_147_483_648, 4_194_304, 33_554_432,
                                                               2_621_440, 81_920]
    assert table["lora"]["ratio"] == pytest.approx(4_194_304 / 2_147_483_648)
    assert all("description" in row for row in table.values())


def test_demo_runs():
    out = subprocess.run([sys.executable, "peft.py"], cwd=STAGE, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "4,194,304" in out.stdout and "LoRA" in out.stdout
