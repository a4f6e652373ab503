"""Every layer's backward against central differences (float64, random upstream gradient).

Tolerance 1e-7 on ``max|a-b| / max(|a|+|b|)``; a correct layer lands near 1e-10.
Parameters are redrawn at well-scaled random values first, because LayerNorm's
ones/zeros init would hide a backward that mixes up weight and bias.
"""
import numpy as np
import pytest

from gradcheck import check_module, numerical_gradient, rel_error
from gradcheck import well_scaled as randomise  # (module, rng): N(0, 1/fan_in) in place
from nn import GELU, Dropout, Embedding, LayerNorm, Linear, ReLU, cross_entropy

TOL = 1e-7


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("bias", [True, False])
def test_linear(rng, bias):
    layer = randomise(Linear(5, 3, bias=bias, rng=rng, dtype=np.float64), rng)
    errors = check_module(layer, rng.standard_normal((2, 4, 5)), tol=TOL)
    assert set(errors) == {"input", "weight"} | ({"bias"} if bias else set())


def test_linear_accepts_2d_and_3d_inputs(rng):
    layer = Linear(4, 6, rng=rng, dtype=np.float64)
    check_module(layer, rng.standard_normal((7, 4)), tol=TOL)


def test_linear_backward_accumulates(rng):
    """Gradients are added (+=), so two backward passes give twice the gradient."""
    layer = Linear(3, 2, rng=rng, dtype=np.float64)
    x, dout = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    layer.zero_grad()
    layer.forward(x)
    layer.backward(dout)
    once = layer.weight_grad.copy()
    layer.backward(dout)
    np.testing.assert_allclose(layer.weight_grad, 2 * once)


def test_embedding(rng):
    emb = Embedding(7, 4, rng=rng, dtype=np.float64)
    ids = np.array([[0, 3, 3, 6], [1, 3, 0, 2]])      # repeated ids must add up
    errors = check_module(emb, ids, tol=TOL, input_grad=False)
    assert errors["weight"] <= TOL


def test_layernorm(rng):
    ln = randomise(LayerNorm(6, dtype=np.float64), rng)
    ln.weight += 1.0
    check_module(ln, rng.standard_normal((3, 2, 6)) * 2.0 + 0.5, tol=TOL)


def test_gelu(rng):
    check_module(GELU(), rng.standard_normal((4, 5)) * 2.0, tol=TOL)


def test_gelu_is_the_tanh_approximation():
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(GELU().forward(x), expected, rtol=1e-12)


def test_relu(rng):
    x = rng.standard_normal((4, 5))
    x += np.where(x >= 0, 0.1, -0.1)                  # keep central differences off the kink
    check_module(ReLU(), x, tol=TOL)


class FixedUniform:
    """Stands in for a Generator: returns the same uniforms every call, so the
    dropout mask is identical in every forward of the numerical check."""

    def __init__(self, values):
        self.values = values

    def random(self, shape):
        assert shape == self.values.shape
        return self.values


def test_dropout_with_fixed_mask(rng):
    x = rng.standard_normal((3, 8))
    drop = Dropout(0.4)
    drop.rng = FixedUniform(rng.random(x.shape))
    check_module(drop, x, tol=TOL)
    y = drop.forward(x)
    kept = drop.rng.values >= 0.4
    np.testing.assert_allclose(y[kept], x[kept] / 0.6)
    assert np.all(y[~kept] == 0)


def test_dropout_is_identity_in_eval(rng):
    x = rng.standard_normal((3, 8))
    drop = Dropout(0.5, rng=np.random.default_rng(0)).eval()
    assert drop.forward(x) is x
    assert drop.backward(x) is x


def test_cross_entropy_gradient_with_ignore_index(rng):
    logits = rng.standard_normal((2, 5, 7))
    targets = rng.integers(0, 7, (2, 5))
    targets[0, :2] = -100
    targets[1, 4] = -100
    loss, dlogits = cross_entropy(logits, targets)
    numeric = numerical_gradient(lambda: cross_entropy(logits, targets)[0], logits)
    assert rel_error(dlogits, numeric) <= TOL
    assert np.all(dlogits[targets == -100] == 0)       # ignored positions get no gradient


def test_cross_entropy_value_matches_definition(rng):
    logits = rng.standard_normal((6, 4))
    targets = np.array([0, 3, -100, 1, 2, -100])
    keep = targets != -100
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -logp[np.arange(6)[keep], targets[keep]].mean()   # mean over kept only
    loss, _ = cross_entropy(logits, targets)
    assert abs(loss - expected) < 1e-12


def test_cross_entropy_all_ignored_is_nan_as_in_pytorch(rng):
    """No counted target: NaN loss (not a perfect-looking 0.0) and a zero gradient."""
    loss, d = cross_entropy(rng.standard_normal((2, 3, 5)), np.full((2, 3), -100))
    assert np.isnan(loss) and d.shape == (2, 3, 5) and not d.any()
    torch = pytest.importorskip("torch")
    x = torch.tensor(rng.standard_normal((6, 5)), requires_grad=True)
    ref = torch.nn.functional.cross_entropy(x, torch.full((6,), -100))
    ref.backward()
    assert np.isnan(ref.item()) and not x.grad.numpy().any()


def test_cross_entropy_is_stable_for_huge_logits():
    loss, d = cross_entropy(np.array([[1000.0, 0.0, -1000.0]]), np.array([0]))
    assert np.isfinite(loss) and np.all(np.isfinite(d)) and loss < 1e-12


def test_module_counts_parameters_once_for_every_class():
    """``Module`` provides ``parameters``/``gradients``/``num_parameters`` (no overrides):
    ``trainable_only`` is honoured, a missing parameter is never listed as ``None``, and
    the course's ``LoRALinear`` lists what trains, as the course does."""
    from minigpt import GPTConfig
    from peft import LoRALayer, LoRALinear, PrefixTuningConfig
    from peft_methods import PrefixEncoder
    cfg = GPTConfig(vocab_size=11, context_length=8, d_model=8, n_layers=2, n_heads=2)
    encoder = PrefixEncoder(cfg, PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True),
                            np.random.default_rng(0))
    assert all(p is not None for p in encoder.parameters())
    assert encoder.num_parameters() == sum(p.size for p in encoder.parameters()) > 0
    lora = LoRALayer(4, 3, rank=2)
    lora.requires_grad_(False, ["A"])
    assert [p.shape for p in lora.parameters(trainable_only=True)] == [(3, 2)]
    assert lora.num_parameters(trainable_only=True) == 6 and lora.num_parameters() == 14
    layer = LoRALinear(np.ones((3, 4)), np.zeros(3), lora_rank=2)
    assert [p.shape for p in layer.parameters()] == [(2, 4), (3, 2)]
    assert len(layer.parameters(trainable_only=False)) == 4          # + the frozen W and b
    assert [p.requires_grad for p in layer.parameters(trainable_only=False)] == [False, False, True, True]
    with pytest.raises(ValueError, match="got r=True"):
        LoRALayer(4, 3, rank=True)                      # True is not a rank, anywhere


def test_one_blas_thread_limits_blas_inside_and_restores_it_after():
    """The attention's per-head products and LoRA's rank-r ones run through this."""
    from nn import blas_controller, on_one_blas_thread, one_blas_thread
    blas = blas_controller()
    if blas is None or not blas.info():
        pytest.skip("threadpoolctl sees no BLAS here")
    threads = lambda: blas.info()[0]["num_threads"]   # noqa: E731
    with blas.limit(limits=2):
        with one_blas_thread():
            assert threads() == 1
        assert threads() == 2
        assert on_one_blas_thread(threads)() == 1
        assert threads() == 2
