"""The mini GPT: attention (masks, prefixes, heads), whole-model gradients, freezing, generation.

Gradient checks follow gradcheck.py's recipe: float64, well-scaled random weights,
random targets (so the upstream gradient of every logit is different), relative
error <= 1e-7 for one attention layer and <= 1e-6 for the whole model.
"""
import numpy as np
import pytest

from gradcheck import check_model_loss, check_module, numerical_gradient, rel_error
from gradcheck import well_scaled as randomise  # (module, rng): N(0, 1/fan_in) in place
from minigpt import GPT, CausalSelfAttention, GPTConfig
from nn import Linear, cross_entropy


@pytest.fixture
def attn_setup():
    rng = np.random.default_rng(7)
    config = GPTConfig(vocab_size=11, context_length=8, d_model=8, n_heads=2, dtype=np.float64)
    attn = randomise(CausalSelfAttention(config, rng), rng)
    x = rng.standard_normal((2, 5, 8))                     # (B, T, D)
    return attn, x, rng


def make_prefix(rng, shape):
    return rng.standard_normal(shape), rng.standard_normal(shape)


# ---- attention gradients -----------------------------------------------------
def test_attention_gradients(attn_setup):
    attn, x, _ = attn_setup
    errors = check_module(attn, x, tol=1e-7)
    assert "q_proj.weight" in errors and "out_proj.bias" in errors


def test_attention_gradients_with_padding_mask(attn_setup):
    attn, x, _ = attn_setup
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    check_module(attn, x, tol=1e-7, forward_kwargs={"attention_mask": mask})


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_prefix_gradients(attn_setup, batched, with_mask):
    """Inputs, weights and both prefix tensors, shared (P,H,dh) or per-batch (B,P,H,dh)."""
    attn, x, rng = attn_setup
    shape = (2, 3, 2, 4) if batched else (3, 2, 4)
    pk, pv = make_prefix(rng, shape)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]) if with_mask else None
    kwargs = {"prefix": (pk, pv), "attention_mask": mask}
    check_module(attn, x, tol=1e-7, forward_kwargs=kwargs)

    G = rng.standard_normal(x.shape)
    attn.forward(x, **kwargs)
    attn.backward(G)
    dpk, dpv = attn.prefix_grad
    assert dpk.shape == shape and dpv.shape == shape
    loss = lambda: float(np.sum(attn.forward(x, **kwargs) * G))  # noqa: E731
    assert rel_error(dpk, numerical_gradient(loss, pk)) <= 1e-7
    assert rel_error(dpv, numerical_gradient(loss, pv)) <= 1e-7


# ---- attention behaviour -----------------------------------------------------
def test_every_query_attends_to_every_prefix_slot(attn_setup):
    attn, x, rng = attn_setup
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])   # even fully padded queries
    attn.forward(x, attention_mask=mask, prefix=make_prefix(rng, (3, 2, 4)))
    assert np.all(attn.att[..., :3] > 0)                   # (B, H, T, P)
    np.testing.assert_allclose(attn.att.sum(-1), 1.0)


def test_padded_keys_get_zero_attention(attn_setup):
    attn, x, rng = attn_setup
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    future = np.triu(np.ones((5, 5), dtype=bool), k=1)     # (T, T): key after query
    for prefix in (None, make_prefix(rng, (3, 2, 4))):
        attn.forward(x, attention_mask=mask, prefix=prefix)
        tokens_part = attn.att[..., attn.P:]               # (B, H, T, T)
        assert np.all(tokens_part[1, :, :, 3:] == 0)       # padded keys 3, 4 of sequence 1
        assert np.all(tokens_part[:, :, future] == 0)      # and no future key, anywhere


def reference_attention(attn, x, mask=None):
    """Per-batch, per-head Python loops: slow and obviously right."""
    B, T, D = x.shape
    H, dh = attn.n_heads, attn.d_head
    q, k, v = (x @ m.weight.T + m.bias for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    y = np.zeros_like(x)
    for b in range(B):
        for h in range(H):
            cols = slice(h * dh, (h + 1) * dh)
            s = q[b, :, cols] @ k[b, :, cols].T / np.sqrt(dh)          # (T, T)
            allowed = np.tril(np.ones((T, T), bool))
            if mask is not None:
                allowed &= mask[b].astype(bool)[None, :]
            s = np.where(allowed, s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            y[b, :, cols] = (w / w.sum(-1, keepdims=True)) @ v[b, :, cols]
    return y @ attn.out_proj.weight.T + attn.out_proj.bias


def test_vectorised_heads_match_a_per_head_loop(attn_setup):
    attn, x, _ = attn_setup
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    np.testing.assert_allclose(attn.forward(x), reference_attention(attn, x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(attn.forward(x, attention_mask=mask),
                               reference_attention(attn, x, mask), rtol=1e-10, atol=1e-12)


def test_no_query_sees_the_future(tiny_model):
    tokens = np.random.default_rng(0).integers(0, 11, (2, 8))
    before = tiny_model.forward(tokens)
    for t in (3, 7):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % 11
        after = tiny_model.forward(changed)
        np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=1e-12, atol=1e-12)
        assert not np.allclose(after[:, t:], before[:, t:])


# ---- whole-model gradients ---------------------------------------------------
def _batch(seed=0, B=3, T=8, V=11):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T))
    targets = rng.integers(0, V, (B, T))
    targets[0, :3] = -100                                  # a prompt, as in the tasks
    return tokens, targets


def _grads(model, names):
    return {n: None if model.get_grad(n) is None else model.get_grad(n).copy() for n in names}


def test_gpt_gradient_wrt_every_parameter(tiny_model):
    tokens, targets = _batch()
    arrays = dict(tiny_model.named_parameters())

    def loss_and_backward():
        loss, d = cross_entropy(tiny_model.forward(tokens), targets)
        tiny_model.zero_grad()
        tiny_model.backward(d)
        return _grads(tiny_model, arrays)

    loss_only = lambda: cross_entropy(tiny_model.forward(tokens), targets)[0]  # noqa: E731
    errors = check_model_loss(loss_and_backward, loss_only, arrays, tol=1e-6)
    assert set(errors) == set(arrays) and max(errors.values()) <= 1e-6


def test_tied_embedding_gradient_has_both_uses(tiny_model):
    """A vocabulary row never used as input still gets a gradient: from the LM head."""
    tokens, targets = _batch()
    tokens[tokens == 10] = 0                               # token 10 never appears as input
    _, d = cross_entropy(tiny_model.forward(tokens), targets)
    tiny_model.zero_grad()
    tiny_model.backward(d)
    grad = tiny_model.embed_tokens.weight_grad
    head_share = d.reshape(-1, 11).T @ tiny_model.h.reshape(-1, 8)
    np.testing.assert_allclose(grad[10], head_share[10])
    assert np.abs(grad[10]).max() > 0
    assert not np.allclose(grad[tokens[0, 0]], head_share[tokens[0, 0]])   # lookup share too


def test_gpt_gradient_with_padding_mask(tiny_model):
    tokens, targets = _batch(seed=1)
    mask = np.ones_like(tokens)
    mask[1, 6:] = 0
    targets[1, 6:] = -100
    arrays = {n: p for n, p in tiny_model.named_parameters() if n.startswith("layers.0.self_attn")}

    def loss_and_backward():
        _, d = cross_entropy(tiny_model.forward(tokens, attention_mask=mask), targets)
        tiny_model.zero_grad()
        tiny_model.backward(d)
        return _grads(tiny_model, arrays)

    def loss_only():
        return cross_entropy(tiny_model.forward(tokens, attention_mask=mask), targets)[0]

    check_model_loss(loss_and_backward, loss_only, arrays, tol=1e-6)


def test_gpt_gradient_wrt_input_embeddings(tiny_model):
    tokens, targets = _batch(seed=2)
    x = tiny_model.embed(tokens).copy()                    # (B, T, D)
    _, d = cross_entropy(tiny_model.forward_embeds(x), targets)
    tiny_model.zero_grad()
    dx = tiny_model.backward_embeds(d)
    numeric = numerical_gradient(lambda: cross_entropy(tiny_model.forward_embeds(x), targets)[0], x)
    assert dx.shape == x.shape
    assert rel_error(dx, numeric) <= 1e-6


class Poison:
    """Stands in for a frozen Linear's cached input: any matmul with it fails,
    so the weight-gradient product ``dout.T @ x`` provably never runs."""

    __array_ufunc__ = None

    def __init__(self, shape):
        self.shape = shape                  # backward checks dout against the input's shape

    def reshape(self, *shape):
        return self

    def __rmatmul__(self, other):
        raise AssertionError("the weight gradient of a frozen Linear was computed")

    __matmul__ = __rmatmul__


def test_frozen_middle_layer_gets_no_gradient_but_passes_dx(tiny_model):
    tokens, targets = _batch(seed=3)
    tiny_model.layers[1].freeze()
    frozen = [n for n, _ in tiny_model.named_parameters() if n.startswith("layers.1.")]
    earlier = {n: p for n, p in tiny_model.named_parameters()
               if n.startswith("layers.0.") or n.startswith("embed_")}
    frozen_linears = [m for n, m in tiny_model.named_modules()
                      if n.startswith("layers.1.") and isinstance(m, Linear)]
    assert len(frozen_linears) == 6

    def loss_and_backward():
        _, d = cross_entropy(tiny_model.forward(tokens), targets)
        tiny_model.zero_grad()
        for layer in frozen_linears:
            layer.x = Poison(layer.x.shape)
        tiny_model.backward(d)
        return _grads(tiny_model, earlier)

    loss_only = lambda: cross_entropy(tiny_model.forward(tokens), targets)[0]  # noqa: E731
    check_model_loss(loss_and_backward, loss_only, earlier, tol=1e-6)
    assert all(tiny_model.get_grad(n) is None for n in frozen)
    assert {n for n, _ in tiny_model.named_parameters(trainable_only=True)}.isdisjoint(frozen)


# ---- generation --------------------------------------------------------------
def test_greedy_generation_matches_a_manual_argmax_loop(tiny_model):
    prompt = np.random.default_rng(4).integers(0, 11, (3, 3))
    out = tiny_model.generate(prompt, max_new_tokens=4)
    seq = prompt
    for _ in range(4):
        nxt = tiny_model.forward(seq)[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq[:, 3:])


def test_generation_stops_at_eos(tiny_model):
    prompt = np.random.default_rng(5).integers(0, 11, (2, 3))
    first = tiny_model.generate(prompt, max_new_tokens=1)[:, 0]
    eos = int(first[0])                                    # sequence 0 ends at once
    out = tiny_model.generate(prompt, max_new_tokens=5, eos_id=eos)
    assert np.all(out[0] == eos)                           # keeps emitting eos once done
    if first[1] == eos:                                    # both done: stopped after 1 token
        assert out.shape[1] == 1


def test_forward_shapes_and_dtype():
    model = GPT(GPTConfig(vocab_size=64, context_length=16, d_model=16, n_heads=4), seed=0)
    logits = model.forward(np.zeros((2, 5), dtype=np.int64))
    assert logits.shape == (2, 5, 64) and logits.dtype == np.float32
