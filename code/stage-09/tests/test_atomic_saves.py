"""A directory of files is saved all at once; saved files get the usual permissions.

``save_model`` writes two files. If it fails after the first, the directory must still
hold the previous save, whole and loadable -- never the new weights beside the old
config (same shapes: it would load without complaint), never half of each. The same
holds for every other save of several files (``SAVERS``: the Hugging Face exports and
import, the text base, adapters), which all go through ``checkpoint.atomic_directory``.
"""
import argparse
import importlib
import os
import stat

import numpy as np
import pytest

import checkpoint
import hf_export
import hf_import
import hf_tokenizer
import pretrain_text
from checkpoint import (CONFIG_NAME, WEIGHTS_NAME, atomic_directory, load_into, load_model,
                        load_tensors, save_model, save_tensors)
from minigpt import GPT, GPTConfig
from peft_checks import assert_parameters_equal, parameter_snapshot
from peft_model import LoraConfig, get_peft_model

CFG = GPTConfig(vocab_size=16, context_length=8, d_model=8, n_layers=1, n_heads=2)


class Boom(RuntimeError):
    pass


@pytest.fixture(params=[True, False], ids=["exchange", "two-renames"])
def exchange(request, monkeypatch):
    """Run each test with the atomic exchange and with the fallback without it."""
    if not request.param:
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    return request.param


def test_a_save_that_fails_half_way_leaves_the_previous_save(tmp_path, monkeypatch, exchange):
    old, new = GPT(CFG, seed=1), GPT(CFG, seed=2)
    save_model(old, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "README.md").write_text("my notes")

    def fail(*args, **kwargs):                  # the weights are written, the config is not
        raise Boom("disk full")
    monkeypatch.setattr(checkpoint, "save_json", fail)
    with pytest.raises(Boom):
        save_model(new, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]          # no temporary directory left
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted([CONFIG_NAME, "README.md", WEIGHTS_NAME])
    assert_parameters_equal(load_model(tmp_path / "ckpt"), parameter_snapshot(old), "differs from the expected save")


def test_a_successful_save_replaces_the_files_and_keeps_the_others(tmp_path, exchange):
    old, new = GPT(CFG, seed=1), GPT(CFG, seed=2)
    save_model(old, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "README.md").write_text("my notes")
    (tmp_path / "ckpt" / "runs").mkdir()
    (tmp_path / "ckpt" / "runs" / "log.txt").write_text("step 1")
    save_model(new, tmp_path / "ckpt")
    assert_parameters_equal(load_model(tmp_path / "ckpt"), parameter_snapshot(new), "differs from the expected save")
    assert (tmp_path / "ckpt" / "README.md").read_text() == "my notes"
    assert (tmp_path / "ckpt" / "runs" / "log.txt").read_text() == "step 1"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_crash_inside_the_block_changes_nothing(tmp_path, exchange):
    """Any error (here: after one of several files) leaves the target as it was."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old a")
    with pytest.raises(Boom):
        with atomic_directory(target) as tmp:
            with open(os.path.join(tmp, "a.txt"), "w") as f:
                f.write("new a")
            raise Boom("crash between the files")
    assert sorted(os.listdir(target)) == ["a.txt"] and (target / "a.txt").read_text() == "old a"
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_saved_files_get_the_usual_permissions(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        save_model(GPT(CFG), tmp_path / "ckpt")
        save_tensors(tmp_path / "one.safetensors", {"w": np.zeros(3, np.float32)})
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "ckpt") == dir_mode
    for path in (tmp_path / "ckpt" / WEIGHTS_NAME, tmp_path / "ckpt" / CONFIG_NAME,
                 tmp_path / "one.safetensors"):
        assert mode(path) == file_mode, f"{path.name}: {oct(mode(path))}, expected {oct(file_mode)}"


def test_a_directory_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "ckpt").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="ckpt: it is a file, not a directory"):
        save_model(GPT(CFG), tmp_path / "ckpt")
    assert (tmp_path / "ckpt").read_text() == "not a directory"
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="d: it is a directory"):
        save_tensors(tmp_path / "d", {"w": np.zeros(3, np.float32)})


def test_save_model_refuses_what_is_not_a_gpt(tmp_path):
    with pytest.raises(ValueError, match="save_model saves a minigpt.GPT, got dict"):
        save_model({"weight": np.zeros(3)}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_with_a_tensor_missing_is_refused_and_the_model_unchanged(tmp_path):
    save_model(GPT(CFG, seed=1), tmp_path)
    tensors = load_tensors(tmp_path / WEIGHTS_NAME)
    del tensors["layers.0.mlp.fc2.bias"]
    save_tensors(tmp_path / WEIGHTS_NAME, tensors,
                 metadata=checkpoint.load_metadata(tmp_path / WEIGHTS_NAME))
    target = GPT(CFG, seed=2)
    before = parameter_snapshot(target)
    with pytest.raises(ValueError, match="missing tensors: layers.0.mlp.fc2.bias"):
        load_into(target, tmp_path)
    assert_parameters_equal(target, before, "differs from the expected save")
    with pytest.raises(ValueError, match="missing tensors: layers.0.mlp.fc2.bias"):
        load_model(tmp_path)


def test_without_an_exchange_a_failed_second_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    old = GPT(CFG, seed=1)
    save_model(old, tmp_path / "ckpt")
    real_rename = os.rename

    def rename(src, dst):
        if str(dst) == str(tmp_path / "ckpt") and str(src).endswith(".tmp"):
            raise OSError("the new directory cannot move in")
        return real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="cannot move in"):
        save_model(GPT(CFG, seed=2), tmp_path / "ckpt")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert_parameters_equal(load_model(tmp_path / "ckpt"), parameter_snapshot(old), "differs from the expected save")


# ---- every multi-file save of the code base uses atomic_directory ---------------------
def files_of(directory):
    """``{relative path: bytes}`` of every file under ``directory``."""
    return {os.path.relpath(os.path.join(root, name), directory):
            open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


def adapted(seed, base=None):
    model = get_peft_model(base or GPT(CFG, seed=0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for _, p in model.named_parameters(trainable_only=True):
        p[...] = np.random.default_rng(seed).standard_normal(p.shape)
    return model


def save_text_base(seed, directory):
    """``pretrain_text.save_base`` with the shipped base's real report (for its model card)."""
    report = checkpoint.load_json(os.path.join(pretrain_text.PRETRAINED_TEXT_DIR,
                                               pretrain_text.REPORT_NAME))
    pretrain_text.save_base(GPT(CFG, seed=seed), directory, report)


def hf_cli(seed, directory):
    """``hf_export.py --base ... --out directory --adapter ...``: the base and OUT/adapter."""
    base, ours, model = directory + ".ckpt", directory + ".ours", GPT(CFG, seed=seed)
    save_model(model, base)
    adapted(seed, model).save_pretrained(ours)          # (peft_io.save_json's first call)
    hf_export.export(argparse.Namespace(base=base, out=directory, adapter=ours, adapter_out=None))


# name -> (save(seed, directory), the module whose writer fails, its name, which call fails)
SAVERS = {
    "hf_export.export_base": (lambda seed, d: hf_export.export_base(GPT(CFG, seed=seed), d),
                              "hf_export", "save_json", 1),
    "hf_export.export_adapter": (lambda seed, d: hf_export.export_adapter(adapted(seed), d),
                                 "peft_io", "save_json", 1),
    "hf_export.py (base and adapter)": (hf_cli, "peft_io", "save_json", 2),
    "hf_import.save_gpt2_checkpoint": (
        lambda seed, d: hf_import.save_gpt2_checkpoint(GPT(CFG, seed=seed), d),
        "hf_import", "save_json", 1),
    "pretrain_text.save_base": (save_text_base, "pretrain_text", "atomic_write_text", 1),
    "save_pretrained": (lambda seed, d: adapted(seed).save_pretrained(d), "peft_io", "save_json", 1),
}


@pytest.mark.parametrize("name", sorted(SAVERS))
def test_every_multi_file_save_that_fails_half_way_leaves_the_previous_one(name, tmp_path,
                                                                         monkeypatch, exchange):
    """The writer of a later file raises: the directory keeps every byte of the previous
    save (and the user's own file), and no temporary directory is left behind."""
    save, module, writer, nth = SAVERS[name]
    target = str(tmp_path / "out")
    save(1, target)
    (tmp_path / "out" / "notes.txt").write_text("my notes")
    before, around = files_of(target), sorted(os.listdir(tmp_path))
    real, calls = getattr(importlib.import_module(module), writer), []

    def fail(*args, **kwargs):
        calls.append(args)
        if len(calls) == nth:
            raise Boom(f"disk full writing {args[0]}")
        return real(*args, **kwargs)
    monkeypatch.setattr(f"{module}.{writer}", fail)
    with pytest.raises(Boom):
        save(2, target)
    assert files_of(target) == before
    assert sorted(os.listdir(tmp_path)) == around                  # no temporary directory
    monkeypatch.setattr(f"{module}.{writer}", real)
    save(2, target)                                                # and a save that succeeds
    assert files_of(target) != before and (tmp_path / "out" / "notes.txt").read_text() == "my notes"


def test_a_byte_vocabulary_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "tok" / "merges.txt").write_text("#version: 0.2\na b\n")
    before, real = files_of(tmp_path / "tok"), hf_tokenizer.atomic_write_text

    def fail(path, text):
        if path.endswith("merges.txt"):
            raise Boom("disk full")
        real(path, text)
    monkeypatch.setattr(hf_tokenizer, "atomic_write_text", fail)
    with pytest.raises(Boom):
        hf_tokenizer.write_byte_vocabulary(tmp_path / "tok")
    assert files_of(tmp_path / "tok") == before and sorted(os.listdir(tmp_path)) == ["tok"]
    monkeypatch.undo()
    hf_tokenizer.write_byte_vocabulary(tmp_path / "tok")
    assert len(hf_tokenizer.load_hf_tokenizer(tmp_path / "tok")) == 257
