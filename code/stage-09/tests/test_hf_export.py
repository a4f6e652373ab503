"""The Hugging Face export: names, configs, refusals and round trips (NumPy only), then
the real thing -- transformers' OPTForCausalLM and peft's PeftModel load the files and
compute the same logits and LoRA gradients (skipped, with the reason, without torch).

All torch work happens in ONE subprocess running ``hf_check.py`` with a clean
``PYTHONPATH`` and a scratch working directory: inside this process ``import peft``
would find the course's ``peft.py``. Install the stack with ``make test-hf``.
"""
import copy
import json
import os
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_export as H
from checkpoint import save_model
from minigpt import GPT, GPTConfig
from nn import cross_entropy
from peft_config import ALL_LINEARS
from quantization import quantize_model
from peft_model import (BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig,
                        PromptTuningConfig, get_peft_model)

HERE = os.path.dirname(os.path.abspath(__file__))
STAGE = os.path.dirname(HERE)
CHECK = os.path.join(HERE, "hf_check.py")
CONFIG = GPTConfig(vocab_size=40, context_length=24, d_model=32, n_layers=2, n_heads=4)
LOGIT_TOL, GRAD_TOL = 1e-4, 1e-5


# ------------------------------------------------------------------ fixtures
def scaled_base(seed=1, config=CONFIG):
    """A GPT whose logits are O(1): GPT-2's 0.02 init would make any comparison trivially pass."""
    model = GPT(config, seed=seed)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p[...] = rng.standard_normal(p.shape) * 0.1
        elif p.ndim == 1:                                   # LayerNorm gains
            p[...] = 1.0 + rng.standard_normal(p.shape) * 0.1
        else:
            p[...] = rng.standard_normal(p.shape) / np.sqrt(p.shape[-1] if "embed" not in name else 1)
    return model


def randomize_adapter(peft_model, seed=2, scale=0.3):
    """Move every trainable tensor off its init (B = 0 or ia3 = 1 would hide mistakes)."""
    rng = np.random.default_rng(seed)
    for _, p in peft_model.named_parameters(trainable_only=True):
        p[...] += (rng.standard_normal(p.shape) * scale).astype(p.dtype)
    return peft_model


def tokens(batch=2, seq=10, seed=3):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (batch, seq))


def clean_env():
    """The environment minus any PYTHONPATH entry pointing into code/stage-09."""
    env = dict(os.environ)
    keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and not os.path.abspath(p).startswith(STAGE)]
    env["PYTHONPATH"] = os.pathsep.join(keep)
    return env


@lru_cache(maxsize=1)
def hf_missing():
    """Which of torch/transformers/peft the interpreter lacks (found without importing them)."""
    probe = ("import importlib.util, json; print(json.dumps([m for m in ('torch', 'transformers', "
             "'peft') if importlib.util.find_spec(m) is None]))")
    with tempfile.TemporaryDirectory() as scratch:
        out = subprocess.run([sys.executable, "-c", probe], cwd=scratch, env=clean_env(),
                             capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 else ["(probe failed: " + out.stderr + ")"]


# `make test-hf` sets REQUIRE_HF=1: there a missing package fails these tests instead of skipping
needs_hf = pytest.mark.skipif(bool(hf_missing()) and not os.environ.get("REQUIRE_HF"), reason=(
    f"Hugging Face stack not installed (missing: {', '.join(hf_missing())}); "
    f"run `make test-hf` to install the hf extra and run these checks"))


# ------------------------------------------------------------------ names and files
def test_name_table_round_trips_every_parameter():
    model = scaled_base()
    names = [n for n, _ in model.named_parameters()]
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=ALL_LINEARS, use_dora=True))
    names += [n for n, _ in pm.named_parameters()] + ["layers.0.mlp.fc2.ia3.ia3_l"]
    for name in names:
        assert H.from_hf_name(H.ADAPTER_PREFIX + H.to_hf_name(name)) == name, name


def test_base_keys_and_shapes_are_opts(tmp_path):
    H.export_base(scaled_base(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    D, L = CONFIG.d_model, CONFIG.n_layers
    expected = {"model.decoder.embed_tokens.weight": (CONFIG.vocab_size, D),
                "model.decoder.embed_positions.weight": (CONFIG.context_length + 2, D),
                "model.decoder.final_layer_norm.weight": (D,), "model.decoder.final_layer_norm.bias": (D,)}
    for i in range(L):
        p = f"model.decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            expected[p + f"self_attn.{proj}.weight"], expected[p + f"self_attn.{proj}.bias"] = (D, D), (D,)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            expected[p + f"{ln}.weight"], expected[p + f"{ln}.bias"] = (D,), (D,)
        expected[p + "fc1.weight"], expected[p + "fc1.bias"] = (4 * D, D), (4 * D,)
        expected[p + "fc2.weight"], expected[p + "fc2.bias"] = (D, 4 * D), (D,)
    assert {k: v.shape for k, v in tensors.items()} == expected
    assert all(v.dtype == np.float32 for v in tensors.values())
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_position_table_has_two_leading_zero_rows(tmp_path):
    model = scaled_base()
    H.export_base(model, tmp_path)
    table = load_file(tmp_path / "model.safetensors")["model.decoder.embed_positions.weight"]
    assert np.all(table[:2] == 0)
    np.testing.assert_array_equal(table[2:], model.embed_positions.weight)


def test_config_json_describes_the_same_model(tmp_path):
    H.export_base(scaled_base(), tmp_path, eos_token_id=2)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["OPTForCausalLM"] and cfg["model_type"] == "opt"
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["word_embed_proj_dim"]) == (40, 32, 32)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["ffn_dim"]) == (2, 4, 128)
    assert cfg["max_position_embeddings"] == CONFIG.context_length
    assert cfg["activation_function"] == "gelu_new" and cfg["do_layer_norm_before"] is True
    assert cfg["tie_word_embeddings"] is True and cfg["enable_bias"] is True
    assert cfg["pad_token_id"] is None and cfg["eos_token_id"] == 2


def test_lora_adapter_files(tmp_path):
    pm = get_peft_model(scaled_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  use_rslora=True))
    H.export_adapter(pm, tmp_path, base_model_name_or_path="hf_base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "target_modules",
                                "use_rslora", "use_dora", "bias", "fan_in_fan_out",
                                "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"], "use_rslora": True, "use_dora": False,
        "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": "hf_base"}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.decoder.layers.1.self_attn.v_proj.lora_"
    assert tensors[key + "A.weight"].shape == (4, 32) and tensors[key + "B.weight"].shape == (32, 4)
    assert len(tensors) == 2 * 2 * 2


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_are_exported_after_a_frozen_load(tmp_path, bias):
    pm = randomize_adapter(get_peft_model(scaled_base(), LoraConfig(r=2, bias=bias)))
    pm.save_pretrained(tmp_path / "ours")
    loaded = type(pm).from_pretrained(scaled_base(), tmp_path / "ours")    # frozen: trainable == []
    H.export_adapter(loaded, tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    biases = {k for k in tensors if k.endswith("bias")}
    assert len(biases) == (2 * (6 + 2) + 1 if bias == "all" else 2 * 2)   # LayerNorms included
    key = "base_model.model.model.decoder.layers.0.self_attn.q_proj.base_layer.bias"
    np.testing.assert_array_equal(tensors[key], pm.get_parameter("layers.0.self_attn.q_proj.base_layer.bias"))


def test_targets_outside_a_leaf_pattern_are_written_in_full(tmp_path):
    config = LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1])
    H.export_adapter(get_peft_model(scaled_base(), config), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.decoder.layers.1.self_attn.q_proj"]


def test_dora_magnitude_and_ia3_vector_shapes(tmp_path):
    pm = get_peft_model(scaled_base(), LoraConfig(r=2, target_modules=["fc1"], use_dora=True))
    H.export_adapter(pm, tmp_path / "dora")
    dora = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    assert dora["base_model.model.model.decoder.layers.0.fc1.lora_magnitude_vector"].shape == (128,)
    pm = get_peft_model(scaled_base(), IA3Config())
    H.export_adapter(pm, tmp_path / "ia3")
    ia3 = load_file(tmp_path / "ia3" / "adapter_model.safetensors")
    p = "base_model.model.model.decoder.layers.0."
    assert ia3[p + "fc2.ia3_l"].shape == (1, 128)              # scales fc2's input
    assert ia3[p + "self_attn.k_proj.ia3_l"].shape == (32, 1)  # scales k_proj's output
    cfg = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    assert cfg["feedforward_modules"] == ["fc2"]
    assert sorted(cfg["target_modules"]) == ["fc2", "k_proj", "v_proj"]


def test_prompt_tuning_with_keep_convention_is_refused(tmp_path):
    pm = get_peft_model(scaled_base(), PromptTuningConfig(num_virtual_tokens=4))
    with pytest.raises(ValueError, match="position_convention='shift'"):
        H.export_adapter(pm, tmp_path / "prompt")
    assert not (tmp_path / "prompt").exists()


def test_prefix_table_follows_pefts_layout(tmp_path):
    """Replay peft's ``get_prompt``: view (B, P, L*2, H, dh), permute to (L*2, B, H, P, dh)."""
    pm = randomize_adapter(get_peft_model(scaled_base(), PrefixTuningConfig(num_virtual_tokens=3)))
    with pytest.warns(H.PositionConventionWarning, match="position_ids"):
        H.export_adapter(pm, tmp_path)
    flat = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    L, H_, dh, P = CONFIG.n_layers, CONFIG.n_heads, CONFIG.d_head, 3
    past = flat[None].reshape(1, P, L * 2, H_, dh).transpose(2, 0, 3, 1, 4)   # (L*2, B, H, P, dh)
    table = pm.prefix_encoder.prefix                                          # (L, 2, P, H, dh)
    for layer in range(L):
        np.testing.assert_array_equal(past[2 * layer][0], table[layer, 0].swapaxes(0, 1))      # keys
        np.testing.assert_array_equal(past[2 * layer + 1][0], table[layer, 1].swapaxes(0, 1))  # values


def test_methods_without_a_peft_equivalent_are_refused(tmp_path):
    pm = get_peft_model(scaled_base(), BottleneckConfig())
    with pytest.raises(ValueError, match="no Hugging Face peft equivalent"):
        H.export_adapter(pm, tmp_path)


@pytest.mark.parametrize("config", [LoraConfig(r=2, target_modules=ALL_LINEARS), IA3Config(),
                                    BottleneckConfig(), PrefixTuningConfig(num_virtual_tokens=2)],
                         ids=["lora", "ia3", "bottleneck", "prefix"])
def test_export_base_of_a_peft_model_is_its_frozen_base(config):
    pm = randomize_adapter(get_peft_model(scaled_base(), config))
    ours, plain = H.base_tensors(pm), H.base_tensors(scaled_base())
    assert ours.keys() == plain.keys() and all(np.array_equal(ours[k], plain[k]) for k in ours)


def test_a_4bit_base_is_written_dequantized():
    model = quantize_model(scaled_base())
    tensors = H.base_tensors(model)
    layer = model.get_submodule("layers.1.mlp.fc2")
    np.testing.assert_array_equal(tensors["model.decoder.layers.1.fc2.weight"], layer.weight)


def test_merged_weights_are_refused(tmp_path):
    pm = randomize_adapter(get_peft_model(scaled_base(), LoraConfig(r=2)))
    pm.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        H.export_base(pm, tmp_path)


# ------------------------------------------------------------------ LoRA back in
@pytest.mark.parametrize("config", [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"]),
                                    LoraConfig(r=2, use_rslora=True, use_dora=True, bias="lora_only",
                                               target_modules=["v_proj", "out_proj", "fc2"])],
                         ids=["lora", "dora_rslora_bias"])
def test_lora_round_trip_is_exact(tmp_path, config):
    base = scaled_base()
    pm = randomize_adapter(get_peft_model(copy.deepcopy(base), config))
    H.export_adapter(pm, tmp_path)
    back = H.import_lora_adapter(base, tmp_path, is_trainable=True)
    ids = tokens()
    np.testing.assert_array_equal(back(ids), pm(ids))
    ours, theirs = pm.adapter_state_dict(), back.adapter_state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[n], theirs[n]) for n in ours)
    assert sorted(back.peft_config["default"].target_modules) == sorted(config.target_modules)


def test_import_into_an_existing_peft_model(tmp_path):
    pm = randomize_adapter(get_peft_model(scaled_base(), LoraConfig(r=2)))
    H.export_adapter(pm, tmp_path)
    host = get_peft_model(scaled_base(), LoraConfig(r=3))
    H.import_lora_adapter(host, tmp_path, adapter_name="imported")
    assert host.active_adapters == ["imported"]
    np.testing.assert_array_equal(host(tokens()), pm(tokens()))


def test_import_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    small = GPTConfig(vocab_size=40, context_length=24, d_model=16, n_layers=2, n_heads=4)
    H.export_adapter(get_peft_model(scaled_base(config=small), LoraConfig(r=2)), tmp_path)
    model = scaled_base()
    before = {n: p.copy() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"lora_A\.weight.*\(2, 16\).*\(2, 32\)"):
        H.import_lora_adapter(model, tmp_path)
    assert [n for n, _ in model.named_parameters()] == list(before)      # not wrapped
    assert all(np.array_equal(p, before[n]) for n, p in model.named_parameters())


def test_import_refuses_options_our_lora_lacks(tmp_path):
    H.export_adapter(get_peft_model(scaled_base(), LoraConfig(r=2)), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, fan_in_fan_out=True)))
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        H.import_lora_adapter(scaled_base(), tmp_path)


def test_import_refuses_unknown_tensors(tmp_path):
    H.export_adapter(get_peft_model(scaled_base(), LoraConfig(r=2)), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((2, 32), np.float32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lm_head"):
        H.import_lora_adapter(scaled_base(), tmp_path)


def run_cli(tmp_path, peft_config):
    """Save a base and one adapter of ours, then run ``hf_export.py`` on them."""
    base = scaled_base()
    save_model(base, tmp_path / "ckpt")
    get_peft_model(base, peft_config).save_pretrained(tmp_path / "ours")
    return subprocess.run([sys.executable, os.path.join(STAGE, "hf_export.py"), "--base",
                           str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--adapter",
                           str(tmp_path / "ours")], cwd=STAGE, capture_output=True, text=True,
                          timeout=120)


def test_cli_writes_base_and_adapter(tmp_path):
    run = run_cli(tmp_path, LoraConfig(r=2))
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(tmp_path / "hf")) == ["adapter", "config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "hf" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "hf")


def test_cli_refuses_what_peft_cannot_express(tmp_path):
    run = run_cli(tmp_path, PromptTuningConfig(num_virtual_tokens=2))
    assert run.returncode == 2 and "error:" in run.stderr and "shift" in run.stderr, run.stderr
    assert not (tmp_path / "hf").exists()           # checked before anything is written


def test_cli_adapter_elsewhere_and_a_base_untouched_by_the_adapters_biases(tmp_path):
    """``--adapter-out`` outside ``--out``: two directories. A ``bias="all"`` adapter loads
    its trained biases into the model it is loaded onto; the exported base keeps its own."""
    import argparse
    base = scaled_base()
    save_model(base, tmp_path / "ckpt")
    ours = randomize_adapter(get_peft_model(scaled_base(), LoraConfig(r=2, bias="all")))
    ours.save_pretrained(tmp_path / "ours")
    H.export(argparse.Namespace(base=str(tmp_path / "ckpt"), out=str(tmp_path / "hf"),
                                adapter=str(tmp_path / "ours"), adapter_out=str(tmp_path / "elsewhere")))
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path / "elsewhere")) == ["adapter_config.json",
                                                          "adapter_model.safetensors"]
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    np.testing.assert_array_equal(exported["model.decoder.layers.0.fc1.bias"], base.layers[0].mlp.fc1.bias)
    adapter = load_file(tmp_path / "elsewhere" / "adapter_model.safetensors")
    trained = adapter["base_model.model.model.decoder.layers.0.fc1.bias"]
    assert np.abs(trained - base.layers[0].mlp.fc1.bias).max() > 0.01     # (so the check can fail)


# ------------------------------------------------------------------ the real ecosystem
CASES = {   # name -> (adapter config, or None for the base alone; options)
    "base": (None, {}),
    "base_right_padded": (None, {"padded": True}),
    "lora": (LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEARS), {"grad": True}),
    "lora_rslora_bias": (LoraConfig(r=4, lora_alpha=6, use_rslora=True, bias="all",
                                    target_modules=["q_proj", "v_proj"]), {"grad": True}),
    "qlora_nf4_base": (LoraConfig(r=4, target_modules=["q_proj", "fc2"]), {"quantized": True}),
    "dora": (LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "fc1"]),
             {"grad": True}),
    "ia3": (IA3Config(), {"grad": True}),
    "prompt_shift": (PromptTuningConfig(num_virtual_tokens=4, position_convention="shift"), {"grad": True}),
    "prefix": (PrefixTuningConfig(num_virtual_tokens=3), {"grad": True}),
    "prefix_shift": (PrefixTuningConfig(num_virtual_tokens=3, position_convention="shift"),
                     {"grad": True}),           # matches peft with no position_ids at all
    "prefix_projection": (PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                             encoder_hidden_size=24), {}),
}
GRAD_CASES = [name for name, (_, opts) in CASES.items() if opts.get("grad")]
MADE_BY_PEFT = {   # LoRA adapters that peft itself writes, for import_lora_adapter to read
    "peft_lora_rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True,
                         "target_modules": ["q_proj", "v_proj", "fc1"]},
    "peft_dora_all_linear": {"r": 2, "lora_alpha": 4, "use_dora": True, "target_modules": "all-linear"},
    "peft_lora_one_layer": {"r": 2, "target_modules": ["k_proj"], "layers_to_transform": [1]},
}


def our_grads(pm, ids, targets, adapter_dir):
    """Our hand-written backward of the mean cross-entropy, keyed and shaped like peft's tensors."""
    _, dlogits = cross_entropy(pm(ids), targets)
    pm.zero_grad()
    pm.backward(dlogits)
    if "prompt_encoder" in dict(pm.children()):
        return {"grad.prompt_encoder.embedding.weight": pm.prompt_encoder.prompt_grad}
    if "prefix_encoder" in dict(pm.children()):
        g = pm.prefix_encoder.prefix_grad                          # (L, 2, P, H, dh)
        return {"grad.prompt_encoder.embedding.weight": g.transpose(2, 0, 1, 3, 4).reshape(g.shape[2], -1)}
    files = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    shapes = {k: v.shape for k, v in files.items()}
    grads = {}
    for name, _ in pm.named_parameters(trainable_only=True):
        key = H.ADAPTER_PREFIX + H.to_hf_name(name)
        grads["grad." + key] = pm.get_grad(name).reshape(shapes[key])   # ia3: (n,) -> (1, n) / (n, 1)
    return grads


def build_case(name, root):
    """Our model, its exported files and the numbers peft must reproduce."""
    config, opts = CASES[name]
    model, ids = scaled_base(), tokens()
    if opts.get("quantized"):
        quantize_model(model)
    base_dir = str(root / ("base_nf4" if opts.get("quantized") else "base"))
    if not os.path.isdir(base_dir):
        H.export_base(model, base_dir)
    arrays = {"input_ids": ids.astype(np.int64)}
    case = {"name": name, "base": base_dir, "adapter": None, "arrays": str(root / f"{name}.safetensors")}
    base_logits = model(ids)
    if config is None:
        mask = np.ones(ids.shape, np.int64)
        if opts.get("padded"):
            mask[0, 6:] = 0                                   # right padding
            arrays["attention_mask"] = mask
        arrays["expected_logits"] = model(ids, attention_mask=mask)
        case["effect"] = None
    else:
        pm = randomize_adapter(get_peft_model(model, config))
        case["adapter"] = str(root / name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", H.PositionConventionWarning)
            H.export_adapter(pm, case["adapter"], base_model_name_or_path=base_dir)
        if name.startswith("prefix") and config.position_convention == "keep":
            arrays["position_ids"] = H.hf_prefix_position_ids(ids.shape[1], config.num_virtual_tokens)
        if opts.get("grad"):
            targets = np.roll(ids, -1, axis=1)
            targets[:, -1] = -100                             # ignored, as in training
            arrays["targets"] = targets.astype(np.int64)
            arrays.update(our_grads(pm, ids, targets, case["adapter"]))
        arrays["expected_logits"] = pm(ids)
        case["effect"] = float(np.abs(arrays["expected_logits"] - base_logits).max())
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, case["arrays"])
    return case


@pytest.fixture(scope="module")
def hf_results(tmp_path_factory):
    """Build every case, then ONE subprocess loads them all with transformers + peft."""
    if hf_missing():
        pytest.fail(f"REQUIRE_HF is set but {', '.join(hf_missing())} cannot be imported")
    root = tmp_path_factory.mktemp("hf")
    manifest = {"cases": [build_case(name, root) for name in CASES],
                "make": [{"name": name, "base": str(root / "base"), "lora": lora, "out": str(root / name),
                          "arrays": str(root / "base.safetensors"), "logits": str(root / f"{name}.logits")}
                         for name, lora in MADE_BY_PEFT.items()]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    run = subprocess.run([sys.executable, CHECK, str(root / "manifest.json"), str(root / "results.json")],
                         cwd=str(root), env=clean_env(), capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        pytest.fail(f"hf_check.py failed:\n{run.stdout}\n{run.stderr[-4000:]}")
    print(run.stdout)
    results = json.loads((root / "results.json").read_text())
    for case in manifest["cases"]:
        results["cases"][case["name"]]["effect"] = case["effect"]
    results["root"] = root
    return results


@needs_hf
@pytest.mark.parametrize("name", list(CASES))
def test_hugging_face_computes_our_logits(hf_results, name):
    result = hf_results["cases"][name]
    assert "error" not in result, result.get("error")
    assert result["load_problems"] == {} and result["adapter_load_warnings"] == [], result
    assert result["max_abs_logit_diff"] <= LOGIT_TOL, (
        f"{name}: max |ours - HF| = {result['max_abs_logit_diff']:.3g} > {LOGIT_TOL} "
        f"({hf_results['versions']})")
    if result["effect"] is not None:    # the adapter moved the logits: the match is not vacuous
        assert result["effect"] > 100 * LOGIT_TOL, result


def grad_errors(result):
    """``{tensor: relative error}``. Key biases get the gradient's overall scale as denominator:
    adding one vector to every key shifts a query's scores equally, so softmax ignores it and
    their exact gradient is 0 -- both sides hold rounding noise, whose ratio means nothing."""
    scale = max(m for _, m in result["grad"].values())
    return {k: d / (scale if k.endswith("k_proj.bias") else m) for k, (d, m) in result["grad"].items()}


@needs_hf
@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradients_match_autograd(hf_results, name):
    """Our backward vs PyTorch autograd through peft, same loss: every trainable tensor of peft."""
    result = hf_results["cases"][name]
    assert "error" not in result, result.get("error")
    assert result["grad_without_ours"] == [] and result["grad_not_in_torch"] == [], result
    if name == "lora":
        assert len(result["grad"]) == 2 * len(ALL_LINEARS) * CONFIG.n_layers, result
    errors = grad_errors(result)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_TOL, f"{name}: gradient of {worst}: relative error {errors[worst]:.3g}"


@needs_hf
@pytest.mark.parametrize("name", list(MADE_BY_PEFT))
def test_import_of_an_adapter_peft_wrote(hf_results, name):
    """The other direction: peft's own save_pretrained output, read by import_lora_adapter."""
    made, root = hf_results["made"][name], hf_results["root"]
    assert "error" not in made, made
    base_logits = scaled_base()(tokens())
    back = H.import_lora_adapter(scaled_base(), root / name)
    theirs = load_file(root / f"{name}.logits")["logits"]
    diff = float(np.abs(back(tokens()) - theirs).max())
    assert diff <= LOGIT_TOL, f"{name}: max |ours - peft| = {diff:.3g}"
    assert np.abs(theirs - base_logits).max() > 100 * LOGIT_TOL     # the adapter does something
    config = back.peft_config["default"]
    assert (config.use_dora, config.use_rslora) == (bool(MADE_BY_PEFT[name].get("use_dora")),
                                                    bool(MADE_BY_PEFT[name].get("use_rslora")))


@needs_hf
@pytest.mark.parametrize("name", ["prefix", "prefix_projection"])
def test_prefix_needs_the_documented_position_ids(hf_results, name):
    """Without ``position_ids`` peft's OPT numbers the tokens P..P+T-1: the logits differ."""
    assert hf_results["cases"][name]["diff_without_position_ids"] > 1e-2
