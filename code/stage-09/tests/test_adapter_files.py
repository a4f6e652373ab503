"""``save_pretrained`` writes what Hugging Face ``peft`` writes; ``from_pretrained`` reads that,
and still reads the files written before (``fixtures/adapters_v1``, made by the old code).

The last test loads directories written by *our* ``save_pretrained`` with the real
``transformers`` + ``peft`` (one subprocess, as in ``test_hf_export.py``; run by
``make test-hf``, skipped with the reason without the Hugging Face stack).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minigpt import GPT, GPTConfig
from peft_model import (IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig,
                        get_peft_model)
from test_hf_export import (CHECK, LOGIT_TOL, clean_env, hf_missing, needs_hf, randomize_adapter,
                            scaled_base, tokens)
import hf_export as H

HERE = os.path.dirname(os.path.abspath(__file__))
V1 = os.path.join(HERE, "fixtures", "adapters_v1")
V1_CONFIG = GPTConfig(vocab_size=13, context_length=12, d_model=16, n_layers=2, n_heads=2)


@pytest.mark.parametrize("name", ["lora", "dora", "ia3", "prefix", "prompt", "bottleneck", "bitfit"])
def test_files_written_before_the_peft_layout_still_load(name):
    expected = load_file(os.path.join(V1, "expected_logits.safetensors"))
    loaded = PeftModel.from_pretrained(GPT(V1_CONFIG, seed=1), os.path.join(V1, name))
    np.testing.assert_array_equal(loaded(expected["tokens"]), expected[name])


def test_lora_directory_is_pefts(tmp_path):
    model = GPT(V1_CONFIG, seed=1)
    model.name_or_path = "facebook/opt-mini"
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in ("peft_type", "task_type", "base_model_name_or_path", "target_modules",
                                "r", "lora_alpha", "bias", "use_dora", "use_rslora")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "facebook/opt-mini",
        "target_modules": ["q_proj", "v_proj"], "r": 2, "lora_alpha": 4, "bias": "none",
        "use_dora": False, "use_rslora": False}
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight"
    assert len(keys) == 2 * 2 * 2


def test_a_dtype_mismatch_is_refused_not_cast(tmp_path):
    pm = get_peft_model(GPT(V1_CONFIG, seed=1), LoraConfig(r=2))
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v.astype(np.float64) for k, v in load_file(path).items()}, path)
    fresh = GPT(V1_CONFIG, seed=1)
    with pytest.raises(ValueError, match=r"q_proj\.lora\.A \(base_model.*lora_A\.weight in the file\)"
                                         r": dtype float64.*expected float32"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert [n for n, _ in fresh.named_parameters()][0] == "embed_tokens.weight"
    assert not any(hasattr(m, "adapter_attr") for _, m in fresh.named_modules())


def test_a_directory_peft_wrote_loads_with_from_pretrained(tmp_path):
    """``hf_export.export_adapter`` writes what peft writes (no extension keys): ours reads it."""
    pm = randomize_adapter(get_peft_model(scaled_base(), IA3Config()))
    H.export_adapter(pm, tmp_path)
    loaded = PeftModel.from_pretrained(scaled_base(), tmp_path)
    np.testing.assert_array_equal(loaded(tokens()), pm(tokens()))


# ------------------------------------------------------------------ the real ecosystem
OURS = {   # adapter directories written by PeftModel.save_pretrained, loaded by peft
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    "ia3": IA3Config(),
    "prompt_shift": PromptTuningConfig(num_virtual_tokens=3, position_convention="shift"),
    "prefix_shift": PrefixTuningConfig(num_virtual_tokens=3, position_convention="shift"),
}


PEFT_WRITES = {   # peft writes an adapter for the exported base; ours must write the same layout
    "peft_qv": ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "peft_dora_fc": ({"r": 2, "lora_alpha": 4, "use_dora": True, "target_modules": ["fc1", "fc2"]},
                     LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["fc1", "fc2"])),
}


@pytest.fixture(scope="module")
def peft_loads_ours(tmp_path_factory):
    if hf_missing():
        pytest.fail(f"REQUIRE_HF is set but {', '.join(hf_missing())} cannot be imported")
    root = tmp_path_factory.mktemp("ours")
    H.export_base(scaled_base(), root / "base")
    cases = []
    for name, config in OURS.items():
        pm = randomize_adapter(get_peft_model(scaled_base(), config))
        pm.save_pretrained(root / name)
        arrays = {"input_ids": tokens().astype(np.int64),
                  "expected_logits": np.ascontiguousarray(pm(tokens()))}
        save_file(arrays, root / f"{name}.safetensors")
        cases.append({"name": name, "base": str(root / "base"), "adapter": str(root / name),
                      "arrays": str(root / f"{name}.safetensors")})
    make = [{"name": name, "base": str(root / "base"), "lora": lora, "out": str(root / name),
             "arrays": str(root / "lora.safetensors"), "logits": str(root / f"{name}.logits")}
            for name, (lora, _) in PEFT_WRITES.items()]
    (root / "manifest.json").write_text(json.dumps({"cases": cases, "make": make}))
    run = subprocess.run([sys.executable, CHECK, str(root / "manifest.json"), str(root / "results.json")],
                         cwd=str(root), env=clean_env(), capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        pytest.fail(f"hf_check.py failed:\n{run.stdout}\n{run.stderr[-4000:]}")
    results = json.loads((root / "results.json").read_text())
    return dict(results["cases"], made=results["made"], root=root)


@needs_hf
@pytest.mark.parametrize("name", list(OURS))
def test_hugging_face_loads_what_save_pretrained_wrote(peft_loads_ours, name):
    result = peft_loads_ours[name]
    assert "error" not in result, result.get("error")
    assert result["load_problems"] == {} and result["adapter_load_warnings"] == [], result
    assert result["max_abs_logit_diff"] <= LOGIT_TOL, result


@needs_hf
@pytest.mark.parametrize("name", list(PEFT_WRITES))
def test_save_pretrained_writes_what_peft_writes(peft_loads_ours, name, tmp_path):
    """Same tensor keys and shapes, same values in the fields both have, as peft's own
    ``save_pretrained`` for the same LoRA on the same (exported) base."""
    made, root = peft_loads_ours["made"][name], peft_loads_ours["root"]
    assert "error" not in made, made
    base = scaled_base()
    base.name_or_path = str(root / "base")
    get_peft_model(base, PEFT_WRITES[name][1]).save_pretrained(tmp_path)
    theirs = load_file(root / name / "adapter_model.safetensors")
    ours = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert {v.dtype for v in ours.values()} == {v.dtype for v in theirs.values()}
    their_cfg = json.loads((root / name / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    fields = ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout",
              "bias", "use_rslora", "use_dora", "fan_in_fan_out", "layers_to_transform")
    assert {f: our_cfg[f] for f in fields} == {f: their_cfg[f] for f in fields}
    assert sorted(our_cfg["target_modules"]) == sorted(their_cfg["target_modules"])
    assert set(our_cfg) <= set(their_cfg), sorted(set(our_cfg) - set(their_cfg))   # no key peft lacks
