"""A directory of files is saved all at once; saved files get the usual permissions.

``save_model`` writes two files. If it fails after the first, the directory must still
hold the previous save, whole and loadable -- never the new weights beside the old
config (same shapes: it would load without complaint), never half of each.
"""
import os
import stat

import numpy as np
import pytest

import checkpoint
from checkpoint import (CONFIG_NAME, WEIGHTS_NAME, atomic_directory, load_into, load_model,
                        load_tensors, save_model, save_tensors)
from minigpt import GPT, GPTConfig

CFG = GPTConfig(vocab_size=16, context_length=8, d_model=8, n_layers=1, n_heads=2)


def params(model):
    return {n: p.copy() for n, p in model.named_parameters()}


def assert_same(model, expected):
    for name, p in model.named_parameters():
        assert np.array_equal(p, expected[name]), f"{name} differs from the expected save"


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
    assert_same(load_model(tmp_path / "ckpt"), params(old))


def test_a_successful_save_replaces_the_files_and_keeps_the_others(tmp_path, exchange):
    old, new = GPT(CFG, seed=1), GPT(CFG, seed=2)
    save_model(old, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "README.md").write_text("my notes")
    (tmp_path / "ckpt" / "runs").mkdir()
    (tmp_path / "ckpt" / "runs" / "log.txt").write_text("step 1")
    save_model(new, tmp_path / "ckpt")
    assert_same(load_model(tmp_path / "ckpt"), params(new))
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
    before = params(target)
    with pytest.raises(ValueError, match="missing tensors: layers.0.mlp.fc2.bias"):
        load_into(target, tmp_path)
    assert_same(target, before)
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
    assert_same(load_model(tmp_path / "ckpt"), params(old))
