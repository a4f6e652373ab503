"""(IA)3 (Liu et al. 2022): where the vectors scale, merging, 4-bit bases, bad input."""
import numpy as np
import pytest
from peft_checks import CFG32, data, gradcheck_peft, randomise_zero_inits, tiny_base

from gradcheck import check_module, rel_error
from ia3 import IA3Linear, IA3Vector, ia3_param_count
from nn import Linear
from peft_model import IA3Config, LoraConfig, get_peft_model
from quantization import QuantizedLinear, quantize_model


def ia3_model(base=None, **kw):
    return get_peft_model(base if base is not None else tiny_base(), IA3Config(**kw))


def test_wraps_k_v_fc2_with_ones_of_the_right_size():
    model = ia3_model()
    d = model.config.d_model
    wrapped = {p: w for p, w in model.wrappers()}
    assert sorted(wrapped) == sorted(f"layers.{i}.{m}" for i in range(2)
                                     for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.fc2"))
    for path, w in wrapped.items():
        assert isinstance(w, IA3Linear) and w.adapter_attr == "ia3" and w.peft_type == "IA3"
        assert isinstance(w.ia3, IA3Vector) and np.array_equal(w.ia3.ia3_l, np.ones(w.ia3.features))
        assert w.ia3.is_feedforward == path.endswith("fc2")
        assert w.ia3.ia3_l.shape == ((4 * d,) if path.endswith("fc2") else (d,))
    assert model.get_nb_trainable_parameters()[0] == ia3_param_count(d, 2)


def test_output_at_init_is_the_base_model_bit_for_bit():
    base = tiny_base()
    tokens, _, mask = data(pad=True)
    expected = base(tokens, mask)
    assert np.array_equal(ia3_model(base)(tokens, mask), expected)


def test_output_scaling_and_input_scaling_by_hand():
    model = randomise_zero_inits(ia3_model())
    x = np.random.default_rng(0).standard_normal((2, 3, 8))
    v = model.get_submodule("layers.0.self_attn.v_proj")
    W, b, l = v.weight, v.bias, v.ia3.ia3_l
    np.testing.assert_allclose(v(x), l * (x @ W.T + b), rtol=1e-13)
    fc2 = model.get_submodule("layers.0.mlp.fc2")
    h = np.random.default_rng(1).standard_normal((2, 3, 32))
    W, b, l = fc2.weight, fc2.bias, fc2.ia3.ia3_l
    np.testing.assert_allclose(fc2(h), (l * h) @ W.T + b, rtol=1e-13)


@pytest.mark.parametrize("path", ["layers.0.self_attn.k_proj", "layers.1.mlp.fc2"])
def test_layer_gradcheck(path):
    model = randomise_zero_inits(ia3_model())
    wrapper = model.get_submodule(path)
    x = np.random.default_rng(0).standard_normal((2, 3, wrapper.in_features))
    errors = check_module(wrapper, x)
    assert set(errors) == {"input", "ia3.ia3_l"} and max(errors.values()) <= 1e-7


def test_merge_equals_unmerged_float32_and_unmerge_restores():
    base = tiny_base(cfg=CFG32)
    weights = {n: p.copy() for n, p in base.named_parameters()}
    model = randomise_zero_inits(ia3_model(base))
    tokens, _, _ = data(CFG32)
    unmerged = model(tokens)
    model.merge_adapter()
    fc2, v = model.get_submodule("layers.0.mlp.fc2"), model.get_submodule("layers.0.self_attn.v_proj")
    np.testing.assert_allclose(fc2.weight, weights["layers.0.mlp.fc2.weight"] * fc2.ia3.ia3_l, rtol=1e-6)
    np.testing.assert_array_equal(fc2.bias, weights["layers.0.mlp.fc2.bias"])   # input scale: b stays
    np.testing.assert_allclose(v.bias, weights["layers.0.self_attn.v_proj.bias"] * v.ia3.ia3_l, rtol=1e-6)
    assert rel_error(model(tokens), unmerged) <= 1e-5
    with pytest.raises(ValueError, match="already merged"):
        v.merge_in_place()
    model.unmerge_adapter()
    assert rel_error(model(tokens), unmerged) <= 1e-6
    restored = dict(model.unload().named_parameters())
    for name, w in weights.items():
        np.testing.assert_allclose(restored[name], w, rtol=1e-5, atol=1e-7, err_msg=name)
    with pytest.raises(ValueError, match="not merged"):
        v.unmerge_in_place()


def test_merge_and_unload_gives_plain_linears_with_same_outputs():
    model = randomise_zero_inits(ia3_model())
    tokens, _, mask = data(pad=True)
    expected = model(tokens, mask)
    plain = model.merge_and_unload()
    assert type(plain.layers[1].mlp.fc2) is Linear and type(plain.layers[1].self_attn.k_proj) is Linear
    np.testing.assert_allclose(plain(tokens, mask), expected, rtol=1e-12, atol=1e-12)


def test_zero_scale_cannot_be_merged_in_place_but_can_be_unloaded():
    model = ia3_model()
    model.get_submodule("layers.0.self_attn.k_proj").ia3.ia3_l[2] = 0.0
    with pytest.raises(ValueError, match="zero entries"):
        model.merge_adapter()
    tokens, _, _ = data()
    expected = model(tokens)
    np.testing.assert_allclose(model.merge_and_unload()(tokens), expected, rtol=1e-12)


def test_disable_adapter_gives_base_outputs():
    base = tiny_base()
    tokens, _, _ = data()
    expected = base(tokens)
    model = randomise_zero_inits(ia3_model(base))
    assert not np.allclose(model(tokens), expected)
    with model.disable_adapter():
        assert np.array_equal(model(tokens), expected)


def test_4bit_base_gradcheck_no_in_place_merge_float_unload():
    base = quantize_model(tiny_base())
    tokens, targets, mask = data(pad=True)
    expected = base(tokens, mask)
    model = ia3_model(base)
    assert isinstance(model.get_submodule("layers.0.mlp.fc2").base_layer, QuantizedLinear)
    assert np.array_equal(model(tokens, mask), expected)
    randomise_zero_inits(model)
    assert max(gradcheck_peft(model, tokens, targets, mask).values()) <= 1e-6
    with pytest.raises(ValueError, match="QuantizedLinear"):
        model.merge_adapter()
    logits = model(tokens, mask)
    np.testing.assert_allclose(model.merge_and_unload()(tokens, mask), logits, rtol=1e-12, atol=1e-12)


def test_two_named_ia3_adapters_share_the_wrappers():
    model = ia3_model()
    tokens, _, _ = data()
    randomise_zero_inits(model, seed=1)
    first = model(tokens)
    model.add_adapter("other", IA3Config())
    model.set_adapter("other")
    assert len(model.wrappers()) == 6 and np.array_equal(
        model.get_submodule("layers.0.mlp.fc2").ia3.ia3_l, np.ones(32))
    model.set_adapter("default")
    assert np.array_equal(model(tokens), first)


def test_regex_targets_layers_to_transform_and_no_feedforward():
    model = ia3_model(target_modules=r".*\.(v_proj|fc2)", feedforward_modules=["fc2"],
                      layers_to_transform=[1])
    assert sorted(p for p, _ in model.wrappers()) == ["layers.1.mlp.fc2", "layers.1.self_attn.v_proj"]
    assert model.get_submodule("layers.1.mlp.fc2").ia3.is_feedforward
    model = ia3_model(target_modules=["fc2"], feedforward_modules=[])
    assert model.get_submodule("layers.0.mlp.fc2").ia3.ia3_l.shape == (8,)   # output scaling


@pytest.mark.parametrize("kwargs, match", [
    ({"target_modules": ["k_proj", "v_proj"], "feedforward_modules": ["fc2"]}, "feedforward_modules"),
    ({"target_modules": r".*\.v_proj", "feedforward_modules": ["fc2"]}, "feedforward_modules"),
    ({"target_modules": ["nope"], "feedforward_modules": []}, "target_modules"),
])
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ia3_model(**kwargs)


def test_ia3_cannot_join_a_lora_model():
    model = get_peft_model(tiny_base(), LoraConfig(r=2))
    with pytest.raises(ValueError, match="cannot mix IA3 with LORA"):
        model.add_adapter("ia3", IA3Config())
    assert list(model.adapters) == ["default"]
