"""The textbook attention (attention_reference.py) against the speed-tuned layer (minigpt.py).

First the reference is proven by central differences (float64, random upstream
gradient, well-scaled weights); then the library's ``CausalSelfAttention``, whose
scores are stored key-major and written through ``out=`` views, must give the same
output, attention weights, input gradient, weight gradients and prefix gradients
for every combination of prefix (none, shared, per batch) and padding mask
(none, right padding, left padding: a padded query that sees no key at all).
"""
import numpy as np
import pytest

from attention_reference import (attention_backward, attention_forward, attention_mask,
                                 self_attention_backward, self_attention_forward)
from gradcheck import compare, numerical_gradient, rel_error, well_scaled
from minigpt import CausalSelfAttention, GPTConfig

B, T, D, H, P = 2, 5, 8, 2, 3
MASKS = {"none": None,
         "right": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
         "left": np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])}
PREFIXES = {"none": None, "shared": (P, H, D // H), "batched": (B, P, H, D // H)}


def setup(seed=3):
    rng = np.random.default_rng(seed)
    config = GPTConfig(vocab_size=11, context_length=8, d_model=D, n_heads=H, dtype=np.float64)
    layer = well_scaled(CausalSelfAttention(config, rng), seed)
    return layer, rng


def params_of(layer):
    return {name: value for name, value in layer.named_parameters()}


def make_prefix(rng, kind):
    shape = PREFIXES[kind]
    return None if shape is None else (rng.standard_normal(shape), rng.standard_normal(shape))


# ---- the reference itself, by central differences ----------------------------
def test_core_attention_gradients():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((B, H, T, 4)), rng.standard_normal((B, H, P + T, 4)), \
        rng.standard_normal((B, H, P + T, 4))
    allowed = attention_mask(T, P, MASKS["left"])
    out, cache = attention_forward(q, k, v, allowed)
    G = rng.standard_normal(out.shape)
    dq, dk, dv = attention_backward(G, cache)
    loss = lambda: float(np.sum(attention_forward(q, k, v, allowed)[0] * G))  # noqa: E731
    for name, analytic, array in (("q", dq, q), ("k", dk, k), ("v", dv, v)):
        compare(name, analytic, numerical_gradient(loss, array), tol=1e-7)


@pytest.mark.parametrize("prefix_kind", list(PREFIXES))
@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_reference_layer_gradients(prefix_kind, mask_kind):
    layer, rng = setup()
    params = {n: np.array(p, copy=True) for n, p in params_of(layer).items()}
    x = rng.standard_normal((B, T, D))
    prefix = make_prefix(rng, prefix_kind)
    mask = MASKS[mask_kind]
    y, cache = self_attention_forward(x, params, H, prefix, mask)
    G = rng.standard_normal(y.shape)
    dx, grads, dprefix = self_attention_backward(G, cache)
    loss = lambda: float(np.sum(self_attention_forward(x, params, H, prefix, mask)[0] * G))  # noqa: E731
    compare("x", dx, numerical_gradient(loss, x), tol=1e-7)
    for name, array in params.items():
        compare(name, grads[name], numerical_gradient(loss, array), tol=1e-7)
    if prefix is not None:
        for i in (0, 1):
            compare(f"prefix[{i}]", dprefix[i], numerical_gradient(loss, prefix[i]), tol=1e-7)


def test_reference_mask_is_the_textbook_one():
    allowed = attention_mask(3, 2, np.array([[1, 1, 0]]))[0, 0].astype(int)
    expected = np.array([[1, 1, 1, 0, 0],                   # prefix, prefix, t0
                         [1, 1, 1, 1, 0],                   # ..., t1
                         [1, 1, 1, 1, 0]])                  # t2 may not see itself: padded
    np.testing.assert_array_equal(allowed, expected)


# ---- the speed-tuned layer equals the reference -------------------------------
@pytest.mark.parametrize("prefix_kind", list(PREFIXES))
@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_library_attention_matches_reference(prefix_kind, mask_kind):
    layer, rng = setup()
    x = rng.standard_normal((B, T, D))
    prefix = make_prefix(rng, prefix_kind)
    mask = MASKS[mask_kind]
    G = rng.standard_normal((B, T, D))

    y_ref, cache = self_attention_forward(x, params_of(layer), H, prefix, mask)
    dx_ref, grads_ref, dprefix_ref = self_attention_backward(G, cache)
    att_ref = cache[-1][3]                                  # (B, H, T, S)

    layer.zero_grad()
    y = layer.forward(x, attention_mask=mask, prefix=prefix)
    att = np.array(layer.att, copy=True)                    # (B, H, T, S) view of key-major scores
    dx = layer.backward(G)

    assert rel_error(y, y_ref) < 1e-12
    assert rel_error(att, att_ref) < 1e-12
    assert rel_error(dx, dx_ref) < 1e-12
    for name in grads_ref:
        assert rel_error(layer.get_grad(name), grads_ref[name]) < 1e-12, name
    if prefix is None:
        assert layer.prefix_grad is None
    else:
        for mine, ref in zip(layer.prefix_grad, dprefix_ref):
            assert mine.shape == ref.shape
            assert rel_error(mine, ref) < 1e-12


def test_blind_query_gets_zero_weights_in_both():
    """Left padding without a prefix: query 0 of row 1 sees no key; both give it zero weights."""
    layer, rng = setup()
    x = rng.standard_normal((B, T, D))
    y_ref, cache = self_attention_forward(x, params_of(layer), H, None, MASKS["left"])
    layer.forward(x, attention_mask=MASKS["left"])
    assert np.all(cache[-1][3][1, :, 0] == 0) and np.all(layer.att[1, :, 0] == 0)
