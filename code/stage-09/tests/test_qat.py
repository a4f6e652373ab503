"""Quantization-aware training (qat.py): the fake-quant layer, its straight-through backward,
PTQ/QAT conversion, and the demonstration that QAT survives a rounding PTQ does not."""
import numpy as np
import pytest

from gradcheck import check_model_loss, compare, numerical_gradient, rel_error, well_scaled
from minigpt import GPT
from nn import Linear, cross_entropy
from qat import FakeQuantLinear, convert, fake_quantize, prepare_qat, quantize_weights


def layer_and_input(bits=3, seed=0):
    rng = np.random.default_rng(seed)
    base = Linear(6, 5, rng=rng, dtype=np.float64)
    base.weight = rng.standard_normal((5, 6)) / np.sqrt(6)
    base.bias = rng.standard_normal(5)
    return FakeQuantLinear.from_linear(base, bits), rng.standard_normal((2, 4, 6)), rng


# ---- the rounding --------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quantize_is_a_bits_wide_grid_per_row(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((7, 33))
    w_hat = fake_quantize(w, bits)
    qmax = 2 ** (bits - 1) - 1
    step = np.abs(w).max(axis=1, keepdims=True) / qmax      # (7, 1): the row's scale
    codes = w_hat / step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-9)   # on the grid
    assert np.abs(codes).max() <= qmax + 1e-9               # within 2^bits - 1 levels
    assert np.all(np.abs(w_hat - w) <= step / 2 + 1e-12)    # round to nearest
    np.testing.assert_allclose(fake_quantize(w_hat, bits), w_hat, atol=1e-12)   # idempotent
    assert w_hat.dtype == w.dtype


# ---- the straight-through backward ------------------------------------------------------
def test_input_and_bias_gradients_are_exact():
    """dx and db differentiate the fake-quantized layer itself (smooth in x and b)."""
    layer, x, rng = layer_and_input()
    G = rng.standard_normal((2, 4, 5))
    loss = lambda: float(np.sum(layer.forward(x) * G))  # noqa: E731
    layer.zero_grad()
    layer.forward(x)
    dx = layer.backward(G)
    compare("x", dx, numerical_gradient(loss, x), tol=1e-7)
    compare("bias", layer.bias_grad, numerical_gradient(loss, layer.bias), tol=1e-7)


def test_weight_gradient_is_the_gradient_at_the_rounded_weight():
    """STE: the latent weight's gradient is dL/dW_hat, the gradient of the same layer
    with the rounding removed and W_hat as its weight (central differences)."""
    layer, x, rng = layer_and_input()
    G = rng.standard_normal((2, 4, 5))
    layer.zero_grad()
    layer.forward(x)
    layer.backward(G)
    surrogate = Linear(6, 5, dtype=np.float64)
    surrogate.weight, surrogate.bias = fake_quantize(layer.weight, layer.bits), layer.bias.copy()
    loss = lambda: float(np.sum(surrogate.forward(x) * G))  # noqa: E731
    compare("weight", layer.weight_grad, numerical_gradient(loss, surrogate.weight), tol=1e-7)
    # the true gradient through the staircase is zero except at each row's largest |w|,
    # which sets the row's scale: without the STE almost nothing would train
    true = numerical_gradient(lambda: float(np.sum(layer.forward(x) * G)), layer.weight, h=1e-9)
    absmax = np.abs(layer.weight) == np.abs(layer.weight).max(axis=1, keepdims=True)
    assert np.all(true[~absmax] == 0) and np.all(true[absmax] != 0)


def test_whole_model_ste_gradient_equals_exact_gradient_of_the_converted_model(tiny_config):
    """In a stack, every latent gradient flows through the other layers' rounded weights:
    QAT's gradients equal the exact gradients of the converted (rounded) model."""
    rng = np.random.default_rng(3)
    qat_model = prepare_qat(well_scaled(GPT(tiny_config, seed=1), seed=2), bits=3)
    tokens = rng.integers(0, tiny_config.vocab_size, (2, 6))
    targets = rng.integers(0, tiny_config.vocab_size, (2, 6))
    qat_model.zero_grad()
    loss, dlogits = cross_entropy(qat_model.forward(tokens), targets)
    qat_model.backward(dlogits)
    ste = {n: np.array(qat_model.get_grad(n), copy=True)
           for n, _ in qat_model.named_parameters() if n.endswith("fc1.weight") or "q_proj" in n}

    deployed = convert(qat_model)                            # the same arrays, weights rounded
    assert not any(isinstance(m, FakeQuantLinear) for _, m in deployed.named_modules())

    def loss_and_backward():
        deployed.zero_grad()
        deployed.backward(cross_entropy(deployed.forward(tokens), targets)[1])
        return {n: deployed.get_grad(n) for n in ste}
    exact = loss_and_backward()
    for n in ste:
        assert rel_error(ste[n], exact[n]) < 1e-12, n
    check_model_loss(loss_and_backward,                     # and those are right numerically
                     lambda: cross_entropy(deployed.forward(tokens), targets)[0],
                     {n: deployed.get_parameter(n) for n in ste}, tol=1e-6, max_entries=20)
    assert loss > 0


# ---- conversion ----------------------------------------------------------------------
def test_convert_computes_what_qat_trained(tiny_model):
    tokens = np.random.default_rng(0).integers(0, 11, (2, 5))
    prepare_qat(tiny_model, bits=4)
    during = tiny_model.forward(tokens)
    assert np.array_equal(convert(tiny_model).forward(tokens), during)


def test_ptq_and_qat_store_the_same_rounding(tiny_config):
    a, b = GPT(tiny_config, seed=4), GPT(tiny_config, seed=4)
    quantize_weights(a, 3)
    convert(prepare_qat(b, 3))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert np.array_equal(pa, pb), name


@pytest.mark.parametrize("bits", [1, 9, True, 2.0])
def test_bad_bits_refused_before_anything_changes(tiny_model, bits):
    before = {n: p.copy() for n, p in tiny_model.named_parameters()}
    types = [type(m) for _, m in tiny_model.named_modules()]
    for fn in (prepare_qat, quantize_weights):
        with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
            fn(tiny_model, bits)
    assert [type(m) for _, m in tiny_model.named_modules()] == types
    assert all(np.array_equal(p, before[n]) for n, p in tiny_model.named_parameters())


def test_convert_without_prepare_says_so(tiny_model):
    with pytest.raises(ValueError, match="prepare_qat"):
        convert(tiny_model)


# ---- the demonstration ---------------------------------------------------------------
@pytest.mark.slow
def test_qat_survives_a_rounding_that_breaks_ptq():
    """2-bit weights (3 levels per row): rounding after float training loses the task,
    training through the rounding keeps most of it (qat_demo.py's claim, half-length runs)."""
    from qat_demo import compare_ptq_qat
    r = compare_ptq_qat(2, steps=150, n_test=200)
    assert r["float_accuracy"] > 0.9
    assert r["ptq_accuracy"] < 0.5 * r["float_accuracy"]
    assert r["qat_accuracy"] > r["ptq_accuracy"] + 0.4
