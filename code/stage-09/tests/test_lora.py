"""LoRA in the mini GPT through get_peft_model: exactness and the invariants."""
import numpy as np
import pytest
from gradcheck import well_scaled

from gradcheck import check_model_loss
from minigpt import GPT, GPTConfig
from nn import Linear, cross_entropy
from optim import AdamW
from peft import LoRALayer, LoRALinear
from peft_config import ALL_LINEARS
from peft_model import LoraConfig, PeftModel, create_loraplus_optimizer, get_peft_model

CFG64 = GPTConfig(vocab_size=11, context_length=8, d_model=8, n_layers=2, n_heads=2,
                  dtype=np.float64)
CFG32 = GPTConfig(vocab_size=13, context_length=10, d_model=16, n_layers=2, n_heads=2)


def data(cfg=CFG64, B=2, T=6, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, :2] = -100
    return tokens, targets


def randomise_B(model, seed=1):
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters(trainable_only=True):
        if name.endswith("lora.B"):
            p[...] = rng.standard_normal(p.shape) * 0.5


def gradcheck_peft(model, tokens, targets, attention_mask=None, tol=1e-6):
    def loss_and_backward():
        model.zero_grad()
        loss, d = cross_entropy(model.forward(tokens, attention_mask), targets)
        model.backward(d)
        return {n: model.get_grad(n) for n, _ in model.named_parameters(trainable_only=True)}

    def loss_only():
        return cross_entropy(model.forward(tokens, attention_mask), targets)[0]

    arrays = dict(model.named_parameters(trainable_only=True))
    return check_model_loss(loss_and_backward, loss_only, arrays, tol=tol)


TARGET_SETS = [[t] for t in ALL_LINEARS] + [["q_proj", "v_proj"], ALL_LINEARS,
                                            r".*\.(k_proj|fc2)"]


@pytest.mark.parametrize("targets", TARGET_SETS, ids=str)
def test_whole_model_gradcheck_every_target(targets):
    base = well_scaled(GPT(CFG64, seed=1))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    randomise_B(model)
    tokens, tgt = data()
    mask = np.ones_like(tokens)
    mask[1, :1] = 0
    errors = gradcheck_peft(model, tokens, tgt, mask)
    assert errors and max(errors.values()) <= 1e-6
    assert all(n.endswith(("lora.A", "lora.B")) for n in errors)


def test_gradcheck_rslora_bias_modes_and_dropout_off_in_eval():
    base = well_scaled(GPT(CFG64, seed=2))
    cfg = LoraConfig(r=3, lora_alpha=2, target_modules=ALL_LINEARS, use_rslora=True,
                     bias="all", lora_dropout=0.3, init_lora_weights="gaussian")
    model = get_peft_model(base, cfg)
    model.eval()                                        # dropout off -> deterministic
    randomise_B(model)
    tokens, tgt = data()
    errors = gradcheck_peft(model, tokens, tgt)
    assert any(n.endswith(".bias") and "ln_" in n for n in errors)   # bias="all" trains LN biases
    assert max(errors.values()) <= 1e-6
    layer = model.get_submodule("layers.0.self_attn.q_proj").lora
    assert layer.scaling == pytest.approx(2 / np.sqrt(3))


def test_lora_dropout_only_on_lora_branch():
    base = GPT(CFG32, seed=0)
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"]))
    wrapper = model.get_submodule("layers.0.self_attn.q_proj")
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    base_out = wrapper.base_layer(x)
    model.train()
    np.testing.assert_array_equal(wrapper(x), base_out)          # B = 0: dropout changes nothing
    wrapper.lora.B[...] = 1.0
    model.train()
    a, b = wrapper(x), wrapper(x)
    assert not np.allclose(a, b)                                 # dropout active in training
    model.eval()
    np.testing.assert_array_equal(wrapper(x), wrapper(x))         # and off in eval
    np.testing.assert_allclose(wrapper(x), base_out + wrapper.lora.scaling *
                               (x @ wrapper.lora.A.T) @ wrapper.lora.B.T, rtol=1e-5, atol=1e-6)


def test_output_at_init_bit_identical():
    tokens, _ = data(CFG32)
    base = GPT(CFG32, seed=3)
    ref = base.forward(tokens)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=ALL_LINEARS))
    np.testing.assert_array_equal(model.forward(tokens), ref)


def test_init_false_changes_output_and_gaussian_keeps_it():
    tokens, _ = data(CFG32)
    ref = GPT(CFG32, seed=3).forward(tokens)
    m = get_peft_model(GPT(CFG32, seed=3), LoraConfig(init_lora_weights=False))
    assert not np.allclose(m.forward(tokens), ref)
    m = get_peft_model(GPT(CFG32, seed=3), LoraConfig(init_lora_weights="gaussian"))
    np.testing.assert_array_equal(m.forward(tokens), ref)


def trained_lora_model(targets=ALL_LINEARS, steps=3, seed=4):
    base = GPT(CFG32, seed=seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    tokens, tgt = data(CFG32, B=4, T=8)
    opt = AdamW(model, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        _, d = cross_entropy(model(tokens), tgt)
        model.backward(d)
        opt.step()
    return model, tokens, opt


def test_merge_equals_unmerged_and_unmerge_restores():
    model, tokens, _ = trained_lora_model()
    before = {n: p.copy() for n, p in model.named_parameters() if "base_layer.weight" in n}
    unmerged = model.forward(tokens)
    model.merge_adapter()
    merged = model.forward(tokens)
    assert np.abs(merged - unmerged).max() <= 1e-5 * np.abs(unmerged).max()
    with pytest.raises(ValueError, match="already merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model.backward(np.zeros_like(merged))
    model.unmerge_adapter()
    with pytest.raises(ValueError, match="not merged"):
        model.unmerge_adapter()
    for n, w in before.items():
        np.testing.assert_allclose(model.get_parameter(n), w, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.forward(tokens), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_returns_plain_gpt():
    model, tokens, _ = trained_lora_model()
    expected = model.forward(tokens)
    plain = model.merge_and_unload()
    assert isinstance(plain, GPT)
    assert not any(isinstance(m, LoRALinear) for _, m in plain.named_modules())
    assert all(isinstance(plain.get_submodule(f"layers.0.self_attn.{p}"), Linear)
               for p in ("q_proj", "v_proj"))
    names = [n for n, _ in plain.named_parameters()]
    assert "layers.0.self_attn.q_proj.weight" in names and not any("lora" in n for n in names)
    np.testing.assert_allclose(plain.forward(tokens), expected, rtol=1e-5, atol=1e-5)


def test_disable_adapter_gives_base_outputs():
    base = GPT(CFG32, seed=5)
    tokens, _ = data(CFG32)
    ref = base.forward(tokens)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=ALL_LINEARS))
    randomise_B(model)
    assert not np.allclose(model.forward(tokens), ref)
    with model.disable_adapter():
        np.testing.assert_array_equal(model.forward(tokens), ref)
    assert not np.allclose(model.forward(tokens), ref)


def test_only_lora_params_get_grads_and_state_and_base_unchanged():
    base = GPT(CFG32, seed=6)
    frozen = {n: p.copy() for n, p in base.named_parameters()}
    model, tokens, opt = trained_lora_model(targets=["q_proj", "v_proj"], seed=6)
    model2 = get_peft_model(GPT(CFG32, seed=6), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert set(dict(model2.named_parameters())) == set(dict(model.named_parameters()))
    for n, p in model.named_parameters():
        g = model.get_grad(n)
        if "lora" in n:
            assert g is not None and n in opt.state
        else:
            assert g is None and n not in opt.state
            key = n.replace(".base_layer", "")
            np.testing.assert_array_equal(p, frozen[key])     # bit for bit
    assert any(np.abs(model.get_parameter(n)).max() > 0 for n in opt.state if n.endswith("lora.B"))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ALL_LINEARS])
def test_trainable_count_closed_form(targets, capsys):
    base = GPT(CFG32, seed=0)
    total = sum(p.size for _, p in base.named_parameters())
    r = 4
    model = get_peft_model(base, LoraConfig(r=r, target_modules=targets))
    expected = 0
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear):
            expected += r * (m.in_features + m.out_features)
    assert model.get_nb_trainable_parameters() == (expected, total + expected)
    D, L = CFG32.d_model, CFG32.n_layers
    if targets == ["q_proj", "v_proj"]:
        assert expected == L * 2 * r * 2 * D
    model.print_trainable_parameters()
    out = capsys.readouterr().out.strip()
    assert out == (f"trainable params: {expected:,} || all params: {total + expected:,} || "
                   f"trainable%: {100 * expected / (total + expected):.4f}")


def test_print_format_thousands_and_four_decimals(capsys):
    model = get_peft_model(GPT(GPTConfig(vocab_size=64, context_length=64, d_model=64, n_layers=2,
                                         n_heads=4)), LoraConfig(r=8))
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    import re
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: \d{1,3}(,\d{3})+ \|\| "
                        r"trainable%: \d+\.\d{4}", line), line


def test_layers_to_transform_and_regex_targets():
    model = get_peft_model(GPT(CFG32), LoraConfig(target_modules=["q_proj"], layers_to_transform=[1]))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["layers.1.self_attn.q_proj"]
    model = get_peft_model(GPT(CFG32), LoraConfig(target_modules=r"layers\.0\.mlp\.fc\d"))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["layers.0.mlp.fc1", "layers.0.mlp.fc2"]


def test_two_named_adapters_switch():
    base = GPT(CFG32, seed=7)
    tokens, _ = data(CFG32)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["v_proj", "fc1"]))
    assert model.active_adapter == "default"
    randomise_B(model, seed=1)
    out_default = model.forward(tokens)
    model.set_adapter("other")
    assert all("v_proj" in n or "fc1" in n for n, _ in model.named_parameters(trainable_only=True))
    randomise_B(model, seed=2)
    out_other = model.forward(tokens)
    assert not np.allclose(out_default, out_other)
    model.set_adapter("default")
    np.testing.assert_array_equal(model.forward(tokens), out_default)
    model.set_adapter("other")
    np.testing.assert_array_equal(model.forward(tokens), out_other)
    with pytest.raises(ValueError, match="known adapters: \\['default', 'other'\\]"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("other", LoraConfig())
    model.delete_adapter("other")
    assert model.active_adapter == "default"
    assert not isinstance(model.get_submodule("layers.0.self_attn.v_proj"), LoRALinear)
    np.testing.assert_array_equal(model.forward(tokens), out_default)


def test_add_weighted_adapter_is_weighted_sum_of_updates():
    base = GPT(CFG32, seed=8)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=3, target_modules=["v_proj", "fc2"]))
    for name in ("default", "b"):
        model.set_adapter(name)
        randomise_B(model, seed=len(name))
    model.add_weighted_adapter(["default", "b"], [0.7, -1.5], "mix")
    for path in ["layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.0.mlp.fc2"]:
        expected = np.zeros((16, 64 if path.endswith("fc2") else 16), dtype=np.float64)
        for name, w in (("default", 0.7), ("b", -1.5)):
            layer = model.adapters[name].slots.get(path)
            if layer is not None:
                expected += w * layer.delta_weight()
        got = model.adapters["mix"].slots[path].delta_weight()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert model.adapters["mix"].config.r == 5
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["default"], [1, 2], "bad")


def test_loraplus_groups():
    model = get_peft_model(GPT(CFG32), LoraConfig(r=4))
    opt = create_loraplus_optimizer(model, lr=1e-3, loraplus_lr_ratio=16)
    lrs = {}
    for group in opt.param_groups:
        for n in group["names"]:
            lrs[n] = group["lr"]
    assert all(lr == pytest.approx(16e-3) for n, lr in lrs.items() if n.endswith("lora.B"))
    assert all(lr == pytest.approx(1e-3) for n, lr in lrs.items() if n.endswith("lora.A"))
    assert len(lrs) == len(list(model.named_parameters(trainable_only=True)))


def test_save_load_round_trip_and_file_size(tmp_path):
    model, tokens, _ = trained_lora_model(targets=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path)
    import json
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    trainable, _ = model.get_nb_trainable_parameters()
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 4 * trainable <= size <= 4 * trainable + 4096
    loaded = PeftModel.from_pretrained(GPT(CFG32, seed=4), tmp_path)
    np.testing.assert_array_equal(loaded.forward(tokens), model.forward(tokens))
    assert loaded.get_nb_trainable_parameters()[0] == 0          # inference mode by default
    trainable_again = PeftModel.from_pretrained(GPT(CFG32, seed=4), tmp_path, is_trainable=True)
    assert trainable_again.get_nb_trainable_parameters()[0] == trainable


# ---------------------------------------------------------------- bad input
def test_target_modules_matching_nothing_lists_names():
    with pytest.raises(ValueError, match="q_proj") as e:
        get_peft_model(GPT(CFG32), LoraConfig(target_modules=["query"]))
    assert "fc1" in str(e.value) and "out_proj" in str(e.value)


@pytest.mark.parametrize("field,value", [("r", 0), ("r", -2), ("r", 2.5), ("lora_alpha", 0),
                                         ("lora_alpha", -1), ("lora_dropout", 1.0),
                                         ("lora_dropout", -0.1), ("bias", "some"),
                                         ("init_lora_weights", "xavier")])
def test_invalid_config_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}".replace("[", r"\[").replace(
            ".", r"\.").replace("(", r"\(")):
        LoraConfig(**{field: value})


def test_standalone_layer_rejects_bad_rank():
    with pytest.raises(ValueError, match="r=0"):
        LoRALayer(4, 4, rank=0)


def test_load_into_wrong_base_names_tensor_and_shapes(tmp_path):
    model, _, _ = trained_lora_model(targets=["q_proj"])
    model.save_pretrained(tmp_path)
    other = GPT(GPTConfig(vocab_size=13, context_length=10, d_model=32, n_layers=2, n_heads=2))
    before = {n: p.copy() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match=r"saved from another base model: d_model: 16 in the file, "
                                         r"32 in the model"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, LoRALinear) for _, m in other.named_modules())   # unchanged
    assert all(np.array_equal(p, before[n]) for n, p in other.named_parameters())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "json"])
def test_corrupt_adapter_file_clear_error_model_unchanged(tmp_path, damage):
    model, _, _ = trained_lora_model(targets=["q_proj"])
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-20])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    else:
        (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    fresh = GPT(CFG32, seed=4)
    with pytest.raises(ValueError, match="corrupt|truncated"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert not any(isinstance(m, LoRALinear) for _, m in fresh.named_modules())


def test_duplicate_and_unknown_adapter_names():
    model = get_peft_model(GPT(CFG32), LoraConfig())
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig())
    with pytest.raises(ValueError, match="known adapters"):
        model.delete_adapter("missing")
    with pytest.raises(ValueError, match="already a PeftModel"):
        get_peft_model(model, LoraConfig())
