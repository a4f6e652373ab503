"""DoRA (Liu et al. 2024): the magnitude/direction form, both gradients, merging."""
import numpy as np
import pytest
from peft_checks import CFG32, data, gradcheck_peft, loss_and_grads, randomise_zero_inits, tiny_base

from dora import DoRALayer, row_norm
from gradcheck import check_module, rel_error
from nn import Linear, cross_entropy
from peft import LoRALinear
from peft_config import ALL_LINEARS
from peft_model import LoraConfig, get_peft_model
from quantization import QuantizedLinear, quantize_model

TARGETS = ["q_proj", "v_proj", "fc2"]


def dora_model(base=None, targets=TARGETS, **kw):
    cfg = LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=targets, **kw)
    return get_peft_model(base if base is not None else tiny_base(), cfg)


def dora_layers(model):
    return [m for _, m in model.named_modules() if isinstance(m, DoRALayer)]


def test_config_builds_dora_layers_with_row_norm_magnitudes():
    base = tiny_base()
    W = base.layers[0].self_attn.q_proj.weight.copy()
    model = dora_model(base)
    layer = model.get_submodule("layers.0.self_attn.q_proj").lora
    assert isinstance(layer, DoRALayer) and len(dora_layers(model)) == 2 * len(TARGETS)
    np.testing.assert_array_equal(layer.magnitude, np.linalg.norm(W, axis=1))
    assert layer.magnitude.shape == (W.shape[0],)
    assert "layers.0.self_attn.q_proj.lora.magnitude" in dict(model.named_parameters(trainable_only=True))


def test_output_at_init_is_the_base_model_bit_for_bit():
    base = tiny_base()
    tokens, _, mask = data(pad=True)
    expected = base(tokens, mask)
    model = dora_model(base, targets=ALL_LINEARS)
    assert np.array_equal(model(tokens, mask), expected)


def test_forward_is_magnitude_times_normalised_direction():
    model = randomise_zero_inits(dora_model())
    wrapper = model.get_submodule("layers.1.mlp.fc2")
    layer, W, b = wrapper.lora, wrapper.weight, wrapper.bias
    x = np.random.default_rng(0).standard_normal((2, 3, W.shape[1]))
    V = W + layer.scaling * layer.B @ layer.A
    W_adapted = (layer.magnitude / np.linalg.norm(V, axis=1))[:, None] * V
    np.testing.assert_allclose(wrapper(x), x @ W_adapted.T + b, rtol=1e-12, atol=1e-12)
    assert np.allclose(np.linalg.norm(W_adapted, axis=1), layer.magnitude)   # rows have length m


def test_whole_model_exact_gradient_matches_central_differences():
    model = randomise_zero_inits(dora_model(targets=ALL_LINEARS, bias="all"))
    for layer in dora_layers(model):
        layer.detach_norm = False
    tokens, targets, mask = data(pad=True)
    errors = gradcheck_peft(model, tokens, targets, mask, max_entries=12)
    assert max(errors.values()) <= 1e-6
    assert any(n.endswith("magnitude") for n in errors) and any("base_layer.bias" in n for n in errors)


def test_whole_model_detached_gradient_matches_a_loss_with_the_norm_held_fixed():
    """Detached (§4.3): the gradient of the loss in which ||W + sBA|| is a constant."""
    model = randomise_zero_inits(dora_model())
    tokens, targets, mask = data(pad=True)
    model(tokens, mask)
    layers = dora_layers(model)
    for layer in layers:
        assert layer.detach_norm                         # the default
        layer.fixed_norm = layer.norm.copy()             # freeze ||V|| at its current value
    _, detached_with_fixed = loss_and_grads(model, tokens, targets, mask)

    def loss_with_fixed_norm():
        return cross_entropy(model.forward(tokens, mask), targets)[0]

    errors = gradcheck_peft(model, tokens, targets, mask, loss_only=loss_with_fixed_norm)
    assert max(errors.values()) <= 1e-6
    for layer in layers:
        layer.fixed_norm = None                          # back to the live norm
    _, detached = loss_and_grads(model, tokens, targets, mask)
    for layer in layers:
        layer.detach_norm = False
    _, exact = loss_and_grads(model, tokens, targets, mask)
    for name in detached:                                # fixed_norm only froze the value
        np.testing.assert_allclose(detached[name], detached_with_fixed[name], rtol=1e-12, atol=1e-14)
    name = "layers.0.self_attn.q_proj.lora.B"
    assert rel_error(detached[name], exact[name]) > 1e-4     # the detach changes A and B grads
    m = "layers.0.self_attn.q_proj.lora.magnitude"
    np.testing.assert_allclose(detached[m], exact[m], rtol=1e-12)   # ... but not the magnitude's


@pytest.mark.parametrize("detach_norm", [False, True])
def test_standalone_layer_course_form(detach_norm):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 4)) / 2
    layer = DoRALayer(4, 5, rank=2, alpha=4.0, init_lora_weights=False, dtype=np.float64,
                      detach_norm=detach_norm)
    layer.init_magnitude(W)
    layer.magnitude *= 1 + 0.3 * rng.standard_normal(5)
    x = rng.standard_normal((2, 3, 4))
    if detach_norm:
        layer.fixed_norm = row_norm(W + layer.delta_weight())
    errors = check_module(layer, x, forward_kwargs={"W": W})
    assert max(errors.values()) <= 1e-7 and set(errors) == {"input", "A", "B", "magnitude"}
    assert layer.num_parameters() == 2 * 4 + 5 * 2 + 5 and len(layer.gradients()) == 3


def test_merge_equals_unmerged_float32_and_unmerge_restores():
    base = tiny_base(cfg=CFG32)
    weights = {n: p.copy() for n, p in base.named_parameters()}
    model = randomise_zero_inits(dora_model(base, targets=ALL_LINEARS))
    tokens, _, _ = data(CFG32)
    unmerged = model(tokens)
    model.merge_adapter()
    merged = model(tokens)
    assert rel_error(merged, unmerged) <= 1e-5
    with pytest.raises(ValueError, match="merged"):
        model.backward(np.zeros_like(merged))
    model.unmerge_adapter()
    assert rel_error(model(tokens), unmerged) <= 1e-6
    restored = dict(model.unload().named_parameters())
    assert restored.keys() == weights.keys()
    for name, w in weights.items():
        np.testing.assert_allclose(restored[name], w, rtol=1e-5, atol=1e-6, err_msg=name)


def test_merged_weight_formula_and_merge_and_unload():
    model = randomise_zero_inits(dora_model())
    tokens, _, _ = data()
    expected = model(tokens)
    wrapper = model.get_submodule("layers.0.self_attn.v_proj")
    layer, W = wrapper.lora, wrapper.weight.copy()
    V = W + layer.delta_weight()
    np.testing.assert_allclose(layer.merge_weights(W),
                               (layer.magnitude / np.linalg.norm(V, axis=1))[:, None] * V, rtol=1e-13)
    plain = model.merge_and_unload()
    assert type(plain.layers[0].self_attn.v_proj) is Linear
    np.testing.assert_allclose(plain(tokens), expected, rtol=1e-10, atol=1e-12)


def test_unmerge_without_merge_is_an_error():
    layer = DoRALayer(4, 3, rank=1)
    layer.init_magnitude(np.ones((3, 4)))
    with pytest.raises(ValueError, match="needs the scale of the merge"):
        layer.unmerge_weights(np.ones((3, 4)))


def test_forward_before_init_magnitude_and_wrong_weight_shape():
    layer = DoRALayer(4, 3, rank=1)
    with pytest.raises(ValueError, match="init_magnitude"):
        layer.forward(np.ones((1, 4)), np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"\(out, in\)"):
        layer.init_magnitude(np.ones((4, 3)))


def test_dora_on_a_4bit_base():
    """QLoRA + DoRA: the magnitude starts at the rows of the *dequantized* weight."""
    base = quantize_model(tiny_base())
    tokens, targets, mask = data(pad=True)
    expected = base(tokens, mask)
    model = dora_model(base)
    wrapper = model.get_submodule("layers.0.self_attn.q_proj")
    assert isinstance(wrapper, LoRALinear) and isinstance(wrapper.base_layer, QuantizedLinear)
    assert np.array_equal(model(tokens, mask), expected)
    randomise_zero_inits(model)
    for layer in dora_layers(model):
        layer.detach_norm = False
    assert max(gradcheck_peft(model, tokens, targets, mask).values()) <= 1e-6
    with pytest.raises(ValueError, match="QuantizedLinear"):
        model.merge_adapter()
    logits = model(tokens, mask)
    plain = model.merge_and_unload()
    np.testing.assert_allclose(plain(tokens, mask), logits, rtol=1e-10, atol=1e-12)


def test_dropout_is_on_the_lora_branch_only():
    model = dora_model(lora_dropout=0.5)
    tokens, _, _ = data()
    model.train()
    at_init = model(tokens)
    model.eval()
    assert np.array_equal(at_init, model(tokens))        # B = 0: dropout changes nothing
    randomise_zero_inits(model)
    model.train()
    a, b = model(tokens), model(tokens)
    model.eval()
    assert not np.array_equal(a, b) and np.array_equal(model(tokens), model(tokens))
