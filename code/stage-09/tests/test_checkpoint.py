"""Checkpoints: exact round trips, clear errors, atomic writes, untouched model on failure."""
import ast
import json
import os

import numpy as np
import pytest

import checkpoint
from checkpoint import (CONFIG_NAME, WEIGHTS_NAME, atomic_write_text, copy_into, load_into,
                        load_json, load_metadata, load_model, load_tensors, save_json, save_model,
                        save_tensors)
from minigpt import GPT, GPTConfig
from peft_checks import assert_parameters_equal, parameter_snapshot


def small(seed=0, **overrides):
    config = dict(vocab_size=64, context_length=16, d_model=16, n_layers=2, n_heads=2)
    config.update(overrides)
    return GPT(GPTConfig(**config), seed=seed)


def test_model_round_trip_is_exact(tmp_path):
    model = small(seed=1)
    save_model(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]   # no temp files left
    assert json.loads((tmp_path / CONFIG_NAME).read_text()) == model.config.to_dict()
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    assert_parameters_equal(loaded, parameter_snapshot(model))
    tokens = np.random.default_rng(0).integers(0, 64, (2, 9))
    np.testing.assert_array_equal(loaded.forward(tokens), model.forward(tokens))


def test_float64_model_round_trip(tmp_path):
    model = small(dtype=np.float64)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.embed_tokens.weight.dtype == np.float64
    assert_parameters_equal(loaded, parameter_snapshot(model))


def test_tensors_round_trip_with_metadata(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    tensors = {"a.lora_A": np.arange(6, dtype=np.float32).reshape(2, 3),
               "a.lora_B": np.ones((3, 2), np.float64)[:, ::-1]}      # non-contiguous is fine
    save_tensors(path, tensors, metadata={"method": "lora"})
    loaded = load_tensors(path, expected={"a.lora_A": ((2, 3), np.float32), "a.lora_B": None})
    for name in tensors:
        np.testing.assert_array_equal(loaded[name], tensors[name])
        assert loaded[name].dtype == tensors[name].dtype and loaded[name].flags.writeable
    assert load_metadata(path) == {"method": "lora"}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)})
    return path


@pytest.mark.parametrize("expected, messages", [
    ({"w": ((2, 3), np.float32), "b": None, "c": None}, ["missing tensors: c"]),
    ({"w": ((2, 3), np.float32)}, ["unexpected tensors: b"]),
    ({"w": ((3, 2), np.float32), "b": None}, ["w: shape (2, 3) in", "expected (3, 2)"]),
    ({"w": ((2, 3), np.float64), "b": None}, ["w: dtype float32 in", "expected float64"]),
    ({"w": ((2, 4), np.float16), "b": None, "x": None}, ["missing tensors: x", "w: shape", "w: dtype"]),
])
def test_load_tensors_names_what_is_wrong(saved, expected, messages):
    with pytest.raises(ValueError) as info:
        load_tensors(saved, expected=expected)
    for message in messages:
        assert message in str(info.value)
    assert str(saved) in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "header"])
def test_corrupt_files_raise_value_error_with_the_path(saved, damage):
    data = saved.read_bytes()
    broken = {"truncate": data[:-5], "garbage": b"not a safetensors file at all",
              "empty": b"", "header": data[:8] + b"[" + data[9:]}[damage]
    saved.write_bytes(broken)
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        load_tensors(saved)
    assert str(saved) in str(info.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "nope.safetensors")


def test_failed_load_leaves_the_model_unchanged(tmp_path):
    source, target = small(seed=1), small(seed=2)
    save_model(source, tmp_path)
    tensors = load_tensors(tmp_path / WEIGHTS_NAME)
    tensors["ln_f.bias"] = np.zeros(17, np.float32)        # last in order: all others "fit"
    save_tensors(tmp_path / WEIGHTS_NAME, tensors,
                 metadata=load_metadata(tmp_path / WEIGHTS_NAME))
    before = parameter_snapshot(target)
    with pytest.raises(ValueError, match=r"ln_f.bias: shape \(17,\) in .*, expected \(16,\)"):
        load_into(target, tmp_path)
    assert_parameters_equal(target, before)


def test_config_mismatch(tmp_path):
    save_model(small(), tmp_path)
    other = small(d_model=32)
    before = parameter_snapshot(other)
    with pytest.raises(ValueError, match="config mismatch.*d_model: 16 vs 32"):
        load_into(other, tmp_path)
    assert_parameters_equal(other, before)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())  # json edited, weights not
    config["n_heads"] = 4
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="n_heads: 2 vs 4"):
        load_model(tmp_path)


@pytest.mark.parametrize("text, match", [('{"d_model": 16', "not valid JSON"),
                                         ('{"d_model": 16, "wings": 2}', "not a valid GPTConfig"),
                                         ('{"n_heads": 3}', "not a valid GPTConfig"),
                                         ('[1, 2]', "JSON object")])
def test_bad_config_json(tmp_path, text, match):
    save_model(small(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(text)
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path)


def test_copy_into_accepts_a_subset_and_validates_it():
    model = small()
    new_bias = np.full(16, 0.5, np.float32)
    copy_into(model, {"ln_f.bias": new_bias})
    np.testing.assert_array_equal(model.ln_f.bias, new_bias)
    before = parameter_snapshot(model)
    with pytest.raises(ValueError, match="unexpected tensors: lora_A"):
        copy_into(model, {"ln_f.weight": np.zeros(16, np.float32), "lora_A": np.zeros(2)})
    assert_parameters_equal(model, before)


def test_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    """A crash before the rename leaves the old file intact and no temp file behind."""
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"w": np.ones(3)})
    old = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_tensors(path, {"w": np.zeros(5)})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["t.safetensors"]


def test_text_and_json_helpers(tmp_path):
    atomic_write_text(tmp_path / "card.md", "LoRA r=8 \u2713\n")
    assert (tmp_path / "card.md").read_text(encoding="utf-8") == "LoRA r=8 \u2713\n"
    save_json(tmp_path / "c.json", {"r": 8, "target_modules": ["q_proj"]})
    assert load_json(tmp_path / "c.json") == {"r": 8, "target_modules": ["q_proj"]}
    assert sorted(os.listdir(tmp_path)) == ["c.json", "card.md"]


def test_bad_tensors_or_metadata_are_refused(tmp_path):
    with pytest.raises(ValueError, match="str -> np.ndarray"):
        save_tensors(tmp_path / "x.safetensors", {"w": [1, 2, 3]})
    with pytest.raises(ValueError, match="metadata must map str -> str"):
        save_tensors(tmp_path / "x.safetensors", {"w": np.ones(2)}, metadata={"rank": 8})


def test_nothing_is_ever_unpickled():
    """No pickle import, no ``np.load``, no ``allow_pickle`` anywhere in the code (docstrings aside)."""
    tree = ast.parse(open(checkpoint.__file__).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    np_load = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "load"
               and isinstance(n.value, ast.Name) and n.value.id in ("np", "numpy")]
    keywords = {k.arg for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords}
    assert not {"pickle", "dill", "cloudpickle", "joblib"} & imported
    assert not np_load and "allow_pickle" not in keywords
