"""Tests of quantization.py and nf4.py: formulas, error bounds, NF4, double quantization,
packing, bytes actually stored, and the quantized frozen linear inside the mini GPT."""
import copy
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from gradcheck import check_model_loss, check_module
from minigpt import GPT, GPTConfig
from nf4 import normal_cdf
from nn import Linear, cross_entropy
from quantization import (NF4_CODEBOOK, NF4Tensor, QuantizedLinear, blockwise_absmax_roundtrip,
                          dequantize_4bit, dequantize_absmax, dequantize_tensor, normal_ppf,
                          pack_4bit, quantize_absmax, quantize_model, quantize_nf4,
                          quantize_tensor, quantize_to_4bit, quantized_nbytes, unpack_4bit)

# bitsandbytes functional.py (get_4bit_type "nf4") / QLoRA appendix E.
NF4_REFERENCE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
PROPERTY = settings(max_examples=60, deadline=None)
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=64)
tensors = arrays(np.float64, array_shapes(min_dims=1, max_dims=2, max_side=9), elements=finite)


# ---- the normal quantile function and the codebook ------------------------------
def test_normal_ppf_inverts_the_cdf():
    for p in np.linspace(1e-6, 1 - 1e-6, 401):
        assert abs(normal_cdf(normal_ppf(p)) - p) < 1e-13
    assert abs(normal_ppf(0.975) - 1.959963984540054) < 1e-12
    assert normal_ppf(0.5) == 0.0


def test_normal_ppf_matches_scipy_when_available():
    norm = pytest.importorskip("scipy.stats").norm
    ps = np.linspace(1e-6, 1 - 1e-6, 999)
    assert max(abs(normal_ppf(p) - norm.ppf(p)) for p in ps) < 1e-9


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, float("nan")])
def test_normal_ppf_rejects_probabilities_outside_0_1(p):
    with pytest.raises(ValueError, match="0 < p < 1"):
        normal_ppf(p)


def test_nf4_codebook_reproduces_the_bitsandbytes_table():
    np.testing.assert_allclose(NF4_CODEBOOK, NF4_REFERENCE, rtol=0, atol=1e-6)


def test_nf4_codebook_shape():
    assert NF4_CODEBOOK.shape == (16,) and np.all(np.diff(NF4_CODEBOOK) > 0)
    assert NF4_CODEBOOK[0] == -1.0 and NF4_CODEBOOK[-1] == 1.0 and NF4_CODEBOOK[7] == 0.0
    assert (NF4_CODEBOOK > 0).sum() == 8 and (NF4_CODEBOOK < 0).sum() == 7
    with pytest.raises(ValueError):
        NF4_CODEBOOK[3] = 0.5                                # read-only


# ---- 4-bit packing ----------------------------------------------------------------
@PROPERTY
@given(st.lists(st.integers(0, 15), max_size=201))
def test_pack_unpack_round_trip(codes):
    packed = pack_4bit(np.array(codes, dtype=np.int64))
    assert packed.dtype == np.uint8 and packed.size == math.ceil(len(codes) / 2)
    np.testing.assert_array_equal(unpack_4bit(packed, len(codes)), codes)


def test_pack_order_and_odd_length():
    np.testing.assert_array_equal(pack_4bit([1, 2, 15]), [0x12, 0xF0])      # high nibble first


@pytest.mark.parametrize("codes", [[0, 16], [-1, 3], [0.5, 1.0]])
def test_pack_rejects_codes_outside_4_bits(codes):
    with pytest.raises(ValueError, match="4-bit codes"):
        pack_4bit(np.array(codes))


def test_unpack_rejects_wrong_count():
    with pytest.raises(ValueError, match="n=5"):
        unpack_4bit(np.zeros(4, np.uint8), 5)


# ---- affine and absmax quantization -----------------------------------------------
@PROPERTY
@given(tensors, st.integers(2, 8), st.sampled_from([None, 0]))
def test_affine_error_at_most_half_a_step(x, bits, axis):
    q, scale, zp = quantize_tensor(x, bits=bits, axis=axis)
    assert q.dtype == np.uint8 and q.max() <= 2 ** bits - 1
    assert np.all((zp >= 0) & (zp <= 2 ** bits - 1))
    err = np.abs(dequantize_tensor(q, scale, zp) - x)
    assert np.all(err <= np.broadcast_to(scale, x.shape) / 2 * (1 + 1e-9) + 1e-12 * np.abs(x).max())


@PROPERTY
@given(tensors, st.integers(2, 8), st.sampled_from([None, 0]))
def test_absmax_error_at_most_half_a_step(x, bits, axis):
    q, scale = quantize_absmax(x, bits=bits, axis=axis)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == np.int8 and np.abs(q).max() <= qmax
    err = np.abs(dequantize_absmax(q, scale) - x)
    assert np.all(err <= np.broadcast_to(scale, x.shape) / 2 * (1 + 1e-9) + 1e-12 * np.abs(x).max())


def test_affine_formulas_and_per_channel_shapes():
    x = np.array([[-1.0, 0.0, 3.0], [0.5, 2.0, -0.5]], dtype=np.float32)
    q, scale, zp = quantize_tensor(x, bits=8)
    assert scale.shape == () and math.isclose(scale, 4.0 / 255, rel_tol=1e-6)
    assert zp == round(1.0 / (4.0 / 255))
    q, scale, zp = quantize_tensor(x, bits=8, axis=0)
    assert scale.shape == (2, 1) and zp.shape == (2, 1)
    np.testing.assert_allclose(scale[:, 0], [4.0 / 255, 2.5 / 255], rtol=1e-6)
    err = np.abs(dequantize_tensor(q, scale, zp) - x)
    assert np.all(err <= scale / 2 + 1e-6)


def test_float32_round_trip_and_exercise_9_12_names():
    x = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    q, scale, zp = quantize_to_4bit(x)
    assert q.max() <= 15 and scale.dtype == np.float32
    err = np.abs(dequantize_4bit(q, scale, zp) - x)
    assert err.max() <= scale / 2 * (1 + 1e-5)
    q8, s8, z8 = quantize_tensor(x, bits=8, axis=0)
    assert np.abs(dequantize_tensor(q8, s8, z8) - x).max() < np.abs(err).max() / 8


def test_one_signed_tensor_keeps_the_bound():
    x = np.array([10.0, 10.5, 11.0])                        # plain formula: zp clips, all wrong
    q, scale, zp = quantize_tensor(x, bits=4)
    assert zp == 0 and np.all(np.abs(dequantize_tensor(q, scale, zp) - x) <= scale / 2 + 1e-12)


@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
def test_constant_tensors_do_not_divide_by_zero(value):
    x = np.full((3, 4), value)
    for axis in (None, 0):
        q, scale, zp = quantize_tensor(x, bits=4, axis=axis)
        assert np.all(np.isfinite(scale)) and np.all(scale > 0)
        np.testing.assert_allclose(dequantize_tensor(q, scale, zp), x, atol=1e-12)
        qa, sa = quantize_absmax(x, axis=axis)
        np.testing.assert_allclose(dequantize_absmax(qa, sa), x, atol=1e-12)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_bits_outside_2_to_8_rejected(bits):
    for fn in (quantize_tensor, quantize_absmax):
        with pytest.raises(ValueError, match=f"got {bits!r}"):
            fn(np.ones(4), bits=bits)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_rejected(bad):
    x = np.ones((4, 64), dtype=np.float32)
    x[2, 5] = bad
    for fn in (quantize_tensor, quantize_absmax, quantize_to_4bit, quantize_nf4):
        with pytest.raises(ValueError, match=r"finite.*\(2, 5\)"):
            fn(x)


# ---- NF4 -----------------------------------------------------------------------
def _normal_weight(shape, seed=0, std=0.02):
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


@PROPERTY
@given(arrays(np.float32, (4, 32), elements=st.floats(-100, 100, width=32)), st.sampled_from([8, 16, 32]))
def test_nf4_picks_the_nearest_level(w, blocksize):
    t = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    blocks = w.reshape(-1, blocksize)
    absmax = np.abs(blocks).max(1, keepdims=True)
    normed = blocks / np.where(absmax > 0, absmax, 1)
    codes = unpack_4bit(t.packed, w.size).reshape(blocks.shape)
    chosen = np.abs(normed - NF4_CODEBOOK[codes])
    best = np.abs(normed[..., None] - NF4_CODEBOOK).min(-1)
    assert np.all(chosen <= best + 1e-6)
    half_gap = np.diff(NF4_CODEBOOK).max() / 2               # worst case between two levels
    err = np.abs(t.dequantize() - w).reshape(blocks.shape)
    assert np.all(err <= absmax * (half_gap + 1e-6))


def test_nf4_codebook_values_round_trip_exactly():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, (8, 64))
    codes[:, 0] = 15                                        # absmax of every block is 1 * 0.3
    w = NF4_CODEBOOK[codes] * np.float32(0.3)
    np.testing.assert_array_equal(quantize_nf4(w, double_quant=False).dequantize(), w)


def test_nf4_beats_uniform_int4_on_normal_weights():
    w = _normal_weight((512, 128))
    mse_nf4 = np.mean((quantize_nf4(w, double_quant=False).dequantize() - w) ** 2)
    mse_int4 = np.mean((blockwise_absmax_roundtrip(w, bits=4, blocksize=64) - w) ** 2)
    assert mse_nf4 < 0.8 * mse_int4, (mse_nf4, mse_int4)


@pytest.fixture(scope="module")
def trained_gpt():
    """A tiny GPT after 150 plain-SGD steps on 'count by k' sequences (x[t+1] = x[t] + k)."""
    cfg = GPTConfig(vocab_size=32, context_length=12, d_model=64, n_layers=1, n_heads=4)
    model, rng = GPT(cfg, seed=0), np.random.default_rng(1)
    for _ in range(150):
        start, step = rng.integers(0, 32, (16, 1)), rng.integers(1, 4, (16, 1))
        seq = (start + step * np.arange(13)) % 32            # (16, 13)
        loss, dlogits = cross_entropy(model(seq[:, :-1]), seq[:, 1:])
        model.zero_grad()
        model.backward(dlogits)
        for name, p in model.named_parameters(trainable_only=True):
            p -= 0.3 * model.get_grad(name)
    model.final_loss = loss
    return model


def test_nf4_beats_uniform_int4_on_trained_gpt_weights(trained_gpt):
    assert trained_gpt.final_loss < 2.5                      # it did learn (log 32 = 3.47)
    for name, w in trained_gpt.named_parameters():
        if ".layers." in f".{name}" and w.ndim == 2:
            mse_nf4 = np.mean((quantize_nf4(w).dequantize() - w) ** 2)
            mse_int4 = np.mean((blockwise_absmax_roundtrip(w) - w) ** 2)
            assert mse_nf4 < mse_int4, (name, mse_nf4, mse_int4)


@pytest.mark.parametrize("shape", [(256, 256), (512, 128), (64, 256)])
def test_bits_per_parameter(shape):
    w = _normal_weight(shape)
    plain, dq = quantize_nf4(w, double_quant=False), quantize_nf4(w, double_quant=True)
    assert plain.bits_per_parameter() == 4.5
    assert abs(dq.bits_per_parameter() - (4 + 8 / 64 + 32 / (64 * 256))) < 0.01
    for t in (plain, dq):
        assert t.nbytes == sum(a.nbytes for a in t.stored_arrays().values())
        assert t.packed.dtype == np.uint8 and t.packed.nbytes == w.size // 2


def test_double_quant_keeps_the_constants_close():
    w = _normal_weight((256, 256), seed=4) * np.linspace(0.1, 3, 256, dtype=np.float32)[:, None]
    plain, dq = quantize_nf4(w, double_quant=False), quantize_nf4(w)
    assert dq.absmax is None and dq.absmax_codes.dtype == np.int8
    assert dq.absmax_scale.shape == (4,) and dq.absmax_mean.dtype == np.float32
    step = np.repeat(dq.absmax_scale, 256)                  # int8 step of each constant
    assert np.all(np.abs(dq.block_absmax() - plain.absmax) <= step / 2 * (1 + 1e-5))
    assert np.abs(dq.dequantize() - plain.dequantize()).max() <= 0.02 * np.abs(w).max()
    v = _normal_weight((256, 256), seed=5)                  # i.i.d.: constants close together
    exact = quantize_nf4(v, double_quant=False).absmax
    assert np.max(np.abs(quantize_nf4(v).block_absmax() / exact - 1)) < 0.01


def test_nf4_tensor_is_read_only_and_handles_zero_blocks():
    w = np.zeros((4, 64), np.float32)
    w[1] = _normal_weight(64)
    t = quantize_nf4(w)
    np.testing.assert_array_equal(t.dequantize()[[0, 2, 3]], 0)
    with pytest.raises(ValueError):
        t.packed[0] = 1


@pytest.mark.parametrize("blocksize", [0, -64, 48, 2.0, None])
def test_bad_blocksize_rejected(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(np.ones((8, 64)), blocksize=blocksize)
    with pytest.raises(ValueError, match="blocksize"):
        blockwise_absmax_roundtrip(np.ones((8, 64)), blocksize=blocksize)


# ---- QuantizedLinear ------------------------------------------------------------
def _float64_linear(in_features=16, out_features=8, seed=0):
    rng = np.random.default_rng(seed)
    lin = Linear(in_features, out_features, rng=rng, dtype=np.float64)
    lin.weight = rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)
    lin.bias = rng.standard_normal(out_features)            # random: a zero bias hides bugs
    return lin


def test_quantized_linear_surface_and_forward():
    lin = _float64_linear()
    q = QuantizedLinear.from_linear(lin, blocksize=32)
    assert (q.in_features, q.out_features) == (16, 8) and q.param_names == ("bias",)
    assert q.compute_dtype == np.float64 and q.weight.shape == (8, 16)
    assert isinstance(q.quant_state, NF4Tensor) and q.nbytes_weight == q.quant_state.nbytes
    assert [n for n, _ in q.named_parameters()] == ["bias"]
    assert q.parameters(trainable_only=True) == []           # frozen by default
    x = np.random.default_rng(1).standard_normal((2, 3, 16))
    np.testing.assert_allclose(q(x), x @ q.quant_state.dequantize(np.float64).T + lin.bias)
    assert np.abs(q(x) - lin(x)).max() < 0.1 * np.abs(lin(x)).max()
    with pytest.raises(AttributeError):
        q.weight = lin.weight                               # no float weight to assign
    with pytest.raises(ValueError):
        q.weight[0, 0] = 1.0                                # a write would silently vanish
    assert QuantizedLinear(q.quant_state).compute_dtype == np.float32


def test_quantized_linear_gradients_input_and_bias():
    q = QuantizedLinear.from_linear(_float64_linear(), blocksize=16, compute_dtype=np.float64)
    q.requires_grad_(True, ["bias"])
    x = np.random.default_rng(2).standard_normal((2, 3, 16))
    errors = check_module(q, x, tol=1e-7)
    assert set(errors) == {"input", "bias"} and max(errors.values()) <= 1e-7
    assert getattr(q, "weight_grad", None) is None          # no weight gradient, ever


def test_frozen_bias_gets_no_gradient_but_input_does():
    q = QuantizedLinear.from_linear(_float64_linear(), blocksize=16)
    x = np.random.default_rng(3).standard_normal((5, 16))
    q(x)
    dx = q.backward(np.ones((5, 8)))
    assert dx.shape == x.shape and np.abs(dx).max() > 0 and q.bias_grad is None


def test_quant_state_of_the_wrong_shape_rejected():
    q = QuantizedLinear.from_linear(_float64_linear(), blocksize=16)
    with pytest.raises(ValueError, match=r"\(16, 8\).*\(8, 16\)"):
        q.quant_state = quantize_nf4(np.ones((16, 8)), blocksize=16)
    with pytest.raises(ValueError, match="NF4Tensor"):
        q.quant_state = np.ones((8, 16))
    with pytest.raises(ValueError, match="2-D"):
        QuantizedLinear(quantize_nf4(np.ones(64)))
    with pytest.raises(ValueError, match="bias shape"):
        QuantizedLinear(q.quant_state, bias=np.zeros(3))
    with pytest.raises(ValueError, match="features"):
        q(np.ones((2, 15)))
    q.quant_state = quantize_nf4(np.ones((8, 16)), blocksize=16)   # right shape: accepted


# ---- whole models ----------------------------------------------------------------
BIG = GPTConfig(vocab_size=64, context_length=64, d_model=256, n_layers=4, n_heads=8)


@pytest.fixture(scope="module")
def big_pair():
    model = GPT(BIG, seed=0)
    return copy.deepcopy(model), quantize_model(model)


def test_quantized_weights_take_under_0_15_of_float32(big_pair):
    _, qmodel = big_pair
    report = quantized_nbytes(qmodel)
    assert report["num_quantized"] == 4 * 6 and report["numel"] == 4 * 12 * 256 ** 2
    assert report["ratio"] <= 0.15, report
    assert abs(report["bits_per_parameter"] - 4.127) < 0.01


def test_quantized_gpt_runs_and_gradients_reach_the_embeddings(big_pair):
    fmodel, qmodel = big_pair
    assert qmodel.parameters(trainable_only=True) == []
    tokens = np.random.default_rng(5).integers(0, 64, (2, 16))
    logits = qmodel(tokens)
    ref = fmodel(tokens)
    # 4-bit weights carry ~9% RMS relative error each; the logits stay close (~17% here)
    assert np.sqrt(np.mean((logits - ref) ** 2) / np.mean(ref ** 2)) < 0.3
    stored = {n: {k: a.copy() for k, a in m.quant_state.stored_arrays().items()}
              for n, m in qmodel.named_modules() if isinstance(m, QuantizedLinear)}
    qmodel.embed_tokens.requires_grad_(True)
    try:
        qmodel.zero_grad()
        _, dlogits = cross_entropy(logits, np.roll(tokens, -1, axis=1))
        qmodel.backward(dlogits)
        grad = qmodel.embed_tokens.weight_grad
        assert np.all(np.isfinite(grad)) and np.abs(grad[tokens]).max() > 0
    finally:
        qmodel.embed_tokens.requires_grad_(False)
    for name, arrays in stored.items():
        module = qmodel.get_submodule(name)
        assert getattr(module, "weight_grad", None) is None and module.bias_grad is None
        for key, before in arrays.items():
            np.testing.assert_array_equal(module.quant_state.stored_arrays()[key], before)
    assert quantized_nbytes(qmodel)["quantized_bytes"] == sum(
        a.nbytes for arrays in stored.values() for a in arrays.values())


def test_whole_model_gradient_through_quantized_layers(tiny_model):
    model = quantize_model(tiny_model, blocksize=8)          # float64 compute: weights are
    model.embed_tokens.requires_grad_(True)                  # float64 in the fixture
    tokens = np.random.default_rng(6).integers(0, 11, (2, 8))
    targets = np.random.default_rng(7).integers(0, 11, (2, 8))

    def loss_and_backward():
        model.zero_grad()
        _, dlogits = cross_entropy(model(tokens), targets)
        model.backward(dlogits)
        return {"embed": model.embed_tokens.weight_grad}

    loss_only = lambda: cross_entropy(model(tokens), targets)[0]  # noqa: E731
    errors = check_model_loss(loss_and_backward, loss_only, {"embed": model.embed_tokens.weight})
    assert errors["embed"] < 1e-6


def test_quantize_model_targets_and_types(tiny_model):
    model = quantize_model(tiny_model, target_modules=["fc1"], blocksize=64, double_quant=False)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith(("fc1", "fc2"))}
    assert kinds == {"layers.0.mlp.fc1": "QuantizedLinear", "layers.1.mlp.fc1": "QuantizedLinear",
                     "layers.0.mlp.fc2": "Linear", "layers.1.mlp.fc2": "Linear"}
    before = model.layers[0].mlp.fc1
    assert quantize_model(model, target_modules=["fc1"]).layers[0].mlp.fc1 is before  # no-op
    assert quantized_nbytes(model)["bits_per_parameter"] == 4.5
    with pytest.raises(ValueError, match="'fp4'"):
        quantize_model(model, quant_type="fp4")
    with pytest.raises(ValueError, match="blocksize"):
        quantize_model(model, target_modules=["fc2"], blocksize=48)
