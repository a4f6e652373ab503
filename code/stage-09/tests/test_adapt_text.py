"""Bring your own text: the adapt_text command, its RESULT line, the saved adapter, bad input."""
import json
import os

import numpy as np
import pytest

import adapt_text
from checkpoint import load_config, load_model
from compare_text import SETTINGS, TEXT_BASE_DIR, window_length
from peft_model import PeftModel
from text import ByteTokenizer

BASE = os.environ.get("PEFT_TEXT_BASE", TEXT_BASE_DIR)
KEYS = ("target_loss_before", "target_loss_after", "source_loss_before", "source_loss_after",
        "source_loss_disabled", "trainable_params", "adapter_dir")


@pytest.fixture
def small_text(tmp_path):
    path = tmp_path / "letter.txt"
    path.write_text("Dear diary, the rain came again today and the garden is a lake. " * 20
                    + "Fin (the end) -- caf\u00e9 \u2603\n", encoding="utf-8")
    return path


def test_adapts_prints_result_and_the_adapter_reloads(small_text, tmp_path, capsys):
    out = tmp_path / "adapter"
    adapt_text.main([str(small_text), "--method", "lora", "--r", "4", "--steps", "3", "--seed", "1",
                     "--out", str(out), "--base", BASE])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("RESULT ")
    result = json.loads(lines[-1][len("RESULT "):])
    assert set(KEYS) <= set(result)
    assert result["target_loss_after"] < result["target_loss_before"]
    assert result["source_loss_disabled"] == result["source_loss_before"]     # base untouched
    assert result["adapter_dir"] == str(out.resolve())
    report = "\n".join(lines)
    assert "sample 2 before" in report and "sample 2 after" in report
    reloaded = PeftModel.from_pretrained(load_model(BASE), str(out))
    assert reloaded.get_nb_trainable_parameters()[0] == 0                    # loaded frozen
    assert reloaded.peft_config["default"].r == 4
    tokens = ByteTokenizer().encode(small_text.read_text(encoding="utf-8"))[None, :40]
    base_out = load_model(BASE).forward(tokens)
    assert np.abs(reloaded.forward(tokens) - base_out).max() > 0             # the adapter acts


def _bad(args, tmp_path, capsys, match):
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        adapt_text.main(args + ["--out", str(out), "--base", BASE])
    err = capsys.readouterr().err
    assert match in err, err
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]   # no temporary directory


def test_missing_file(tmp_path, capsys):
    _bad([str(tmp_path / "nope.txt")], tmp_path, capsys, "does not exist")


def test_empty_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    _bad([str(tmp_path / "empty.txt")], tmp_path, capsys, "is empty")


def test_binary_file(tmp_path, capsys):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    _bad([str(tmp_path / "blob.bin")], tmp_path, capsys, "binary")


def test_not_utf8(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 200)
    _bad([str(tmp_path / "latin1.txt")], tmp_path, capsys, "not UTF-8")


def test_shorter_than_two_windows(tmp_path, capsys):
    window = window_length(load_config(BASE), SETTINGS.window)
    (tmp_path / "short.txt").write_text("a" * (2 * (window + 1) - 1))
    _bad([str(tmp_path / "short.txt")], tmp_path, capsys, f"at least two windows of {window + 1}")


def test_unknown_method(small_text, tmp_path, capsys):
    _bad([str(small_text), "--method", "lorax"], tmp_path, capsys, "--method 'lorax' is unknown")


@pytest.mark.parametrize("flag", ["--steps", "--r"])
def test_zero_steps_or_rank(small_text, tmp_path, capsys, flag):
    _bad([str(small_text), flag, "0"], tmp_path, capsys, f"{flag} must be at least 1, got 0")
