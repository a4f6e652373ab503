"""Bottleneck adapters: Houlsby, Pfeiffer and parallel placement in the mini GPT."""
import copy

import numpy as np
import pytest
from peft_checks import data, gradcheck_peft, randomise_zero_inits, tiny_base

from accounting import compare_peft_methods
from bottleneck import BottleneckWrapper, bottleneck_param_count
from minigpt import GPT, GPTConfig
from nn import Linear
from peft import Adapter
from peft_model import BottleneckConfig, PrefixTuningConfig, get_peft_model

PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]


def adapter_model(base=None, **kw):
    kw.setdefault("bottleneck_size", 3)
    return get_peft_model(base if base is not None else tiny_base(), BottleneckConfig(**kw))


@pytest.mark.parametrize("placement, wrapped", [
    ("houlsby", ["self_attn", "mlp"]), ("pfeiffer", ["mlp"]), ("parallel", ["self_attn", "mlp"])])
def test_wrappers_sit_where_the_placement_says(placement, wrapped):
    model = adapter_model(placement=placement)
    paths = sorted(p for p, _ in model.wrappers())
    assert paths == sorted(f"layers.{i}.{s}" for i in range(2) for s in wrapped)
    for _, w in model.wrappers():
        assert isinstance(w, BottleneckWrapper) and (w.adapter_attr, w.peft_type) == ("adapter", "BOTTLENECK")
        assert isinstance(w.adapter, Adapter) and w.adapter.parallel == (placement == "parallel")
        assert w.adapter.b_down is not None and not np.any(w.adapter.W_up)   # bias=True, W_up = 0
        assert w.disabled is False


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_output_at_init_is_the_base_model_bit_for_bit(placement):
    base = tiny_base()
    tokens, _, mask = data(pad=True)
    expected = base(tokens, mask)
    assert np.array_equal(adapter_model(base, placement=placement)(tokens, mask), expected)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_wrapped_sublayer_by_hand(placement):
    """serial: ``h + f(h Wd + bd) Wu + bu`` with ``h = sublayer(x)``; parallel: the branch reads ``x``."""
    model = randomise_zero_inits(adapter_model(placement=placement, activation="gelu"))
    wrapper = model.get_submodule("layers.1.mlp")
    x = np.random.default_rng(0).standard_normal((2, 3, 8))
    h = wrapper.base_layer(x)
    a = wrapper.adapter

    def branch(t):
        z = t @ a.W_down + a.b_down
        return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))) @ a.W_up + a.b_up

    expected = h + branch(x) if placement == "parallel" else h + branch(h)
    np.testing.assert_allclose(wrapper(x), expected, rtol=1e-12, atol=1e-12)


def test_attention_keywords_pass_through_the_wrapper():
    model = randomise_zero_inits(adapter_model())
    attn = model.get_submodule("layers.0.self_attn")
    x = np.random.default_rng(0).standard_normal((2, 4, 8))
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    prefix = tuple(np.random.default_rng(1).standard_normal((2, 3, 2, 4)))
    out = attn(x, attention_mask=mask, prefix=prefix)
    np.testing.assert_allclose(out, attn.adapter(attn.base_layer(x, attention_mask=mask, prefix=prefix)))
    assert attn.P == 3 and attn.att.size == 2 * 2 * 4 * (3 + 4)  # read from the wrapped attention


def test_wrapper_is_transparent_to_names():
    base = tiny_base()
    names = [n for n, _ in base.named_parameters()]
    model = adapter_model(base)
    frozen = [n for n, _ in model.named_parameters() if ".adapter." not in n]
    assert frozen == names                                  # q_proj keeps its name, no base_layer
    attn = model.get_submodule("layers.0.self_attn")
    assert model.get_submodule("layers.0.self_attn.q_proj") is attn.base_layer.q_proj
    with pytest.raises(ValueError, match="holds parameters itself"):
        BottleneckWrapper(Linear(4, 4))


def test_bottleneck_from_reduction_factor_and_no_bias_counts():
    model = adapter_model(bottleneck_size=None, reduction_factor=4)
    assert model.get_submodule("layers.0.mlp").adapter.bottleneck_dim == 2
    cfg = BottleneckConfig(bottleneck_size=3, bias=False)
    model = adapter_model(bottleneck_size=3, bias=False)
    assert model.get_submodule("layers.0.mlp").adapter.b_up is None
    assert model.get_nb_trainable_parameters()[0] == bottleneck_param_count(cfg, 8, 2) == 2 * 2 * 2 * 8 * 3


def test_count_agrees_with_the_course_accounting():
    """``compare_peft_methods`` counts two bias-free adapters per layer: ``layers * 2 * 2 d b``."""
    c = GPTConfig(vocab_size=16, context_length=8, d_model=32, n_layers=3, n_heads=4)
    model = get_peft_model(GPT(c), BottleneckConfig(bottleneck_size=4, bias=False))
    course = compare_peft_methods(d_model=32, num_layers=3, num_heads=4, adapter_bottleneck=4)
    assert model.get_nb_trainable_parameters()[0] == course["adapters"]["params"]


def test_gradcheck_together_with_prefix_tuning():
    """Prefix tuning reads ``block.self_attn.prefix_grad`` through the adapter's wrapper."""
    model = adapter_model()
    model.add_adapter("prefix", PrefixTuningConfig(num_virtual_tokens=2))
    model.set_adapter(["default", "prefix"])
    randomise_zero_inits(model)
    tokens, targets, mask = data(pad=True)
    errors = gradcheck_peft(model, tokens, targets, mask)
    assert "prefix_encoder.prefix" in errors and "layers.0.self_attn.adapter.W_up" in errors
    assert max(errors.values()) <= 1e-6


def test_not_mergeable_disable_and_deepcopy():
    base = tiny_base()
    tokens, _, _ = data()
    expected = base(tokens)
    model = randomise_zero_inits(adapter_model(base, placement="parallel"))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with model.disable_adapter():
        assert np.array_equal(model(tokens), expected)
    twin = copy.deepcopy(model)
    assert np.array_equal(twin(tokens), model(tokens))
    assert np.array_equal(model.unload()(tokens), expected)


@pytest.mark.parametrize("kwargs, match", [
    ({"bottleneck_size": 0}, "bottleneck_size=0"),
    ({"bottleneck_size": -2}, "bottleneck_size=-2"),
    ({"bottleneck_size": 2.5}, "bottleneck_size=2.5"),
    ({"bottleneck_size": None, "reduction_factor": 0}, "reduction_factor=0"),
    ({"bottleneck_size": 4, "reduction_factor": 2}, "not both"),
    ({"placement": "middle"}, "placement='middle'"),
    ({"activation": "tanh"}, "activation='tanh'"),
])
def test_bad_config_names_the_field_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BottleneckConfig(**{"bottleneck_size": 3, **kwargs})


def test_reduction_factor_larger_than_d_model():
    with pytest.raises(ValueError, match="reduction_factor=16 is larger than d_model=8"):
        adapter_model(bottleneck_size=None, reduction_factor=16)
