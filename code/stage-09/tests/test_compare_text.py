"""The real-text comparison: every method learns Alice, disabled is the base, the runner's files."""
import json
import os

import numpy as np
import pytest

import compare_text as ct
from checkpoint import load_model
from text import corpus_splits, fixed_windows, lm_loss
from text_report import (README_MARKERS, choose_learning_rates, findings, readme_with_block,
                         summarize)

BASE = os.environ.get("PEFT_TEXT_BASE", ct.TEXT_BASE_DIR)
TOUCH = {"full", "bitfit", "qlora"}          # train or quantize the base's own numbers


@pytest.fixture(scope="module")
def alice_batch():
    """Eight fixed windows of Alice's training text, and Shakespeare validation windows."""
    window = 32
    x, y = fixed_windows(corpus_splits("alice")["train"], window, 8, seed=5)
    sx, _ = fixed_windows(corpus_splits("shakespeare")["validation"], window, 4, seed=5)
    return x, y, sx


@pytest.mark.parametrize("method", list(ct.METHODS))
def test_each_method_lowers_alice_loss_and_disabled_is_the_base(method, alice_batch):
    x, y, sx = alice_batch
    base = load_model(BASE)
    expected = base.forward(sx)
    model = ct.build(method, BASE, seed=0)
    before = lm_loss(model, x, y)
    opt = ct.AdamW(model, lr=ct.METHODS[method].lr)
    from train import train_step
    for _ in range(12):
        train_step(model, opt, (x, y), grad_clip=1.0)
    after = lm_loss(model, x, y)
    assert after < before - 0.02, f"{method}: Alice loss {before:.4f} -> {after:.4f}"
    model.eval()
    with model.disable_adapter():
        disabled = model.forward(sx)
    if method not in TOUCH:
        np.testing.assert_array_equal(disabled, expected)
    elif method == "qlora":          # disabled: exactly the NF4-quantized base
        from quantization import quantize_model
        quantized = quantize_model(load_model(BASE), "nf4", ct.ALL_LINEARS)
        np.testing.assert_array_equal(disabled, quantized.forward(sx))
        assert np.abs(disabled - expected).max() > 0
    else:                            # full, BitFit: their changes are the base's own weights
        assert np.abs(disabled - expected).max() > 0


def test_plan_counts_every_run():
    s = ct.SETTINGS
    specs = ct.plan(s, list(ct.METHODS))
    adapt = [r for r in specs if r.kind == "adapt"]
    expected = (len(ct.METHODS) * len(s.seeds)
                + len(s.rank_methods) * (len(s.ranks) - 1) * len(s.rank_seeds)
                + len(s.fraction_methods) * len(s.fractions) * len(s.fraction_seeds))
    assert len(adapt) == expected
    assert len(specs) - len(adapt) == len(ct.METHODS) * len(s.classify_seeds)
    assert all(r.split == "test" for r in specs)
    sweep = ct.plan(s, ["lora_all"], lr_sweep=True)
    assert [r.lr for r in sweep] == list(ct.METHODS["lora_all"].lr_grid)
    assert all(r.split == "validation" for r in sweep)


def test_quick_never_writes_the_full_results():
    with pytest.raises(SystemExit, match="never writes the full results"):
        ct.main(["--quick", "--out", ct.RESULTS_DIR])
    with pytest.raises(SystemExit, match="unknown method"):
        ct.main(["--quick", "--methods", "lora_all,nonsense"])


def test_quick_run_writes_settings_and_findings(tmp_path):
    ct.main(["--quick", "--methods", "lora_all,prompt", "--base", BASE, "--out", str(tmp_path),
             "--workers", "1"])
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["meta"]["settings"]["steps"] == ct.QUICK.steps
    assert result["meta"]["methods"]["prompt"]["lr"] == ct.METHODS["prompt"].lr
    assert {r["method"] for r in result["runs"]} == {"lora_all", "prompt"}
    for name in ("runs.csv", "summary.csv", "classification.csv", "learn_forget.png", "README.md"):
        assert (tmp_path / name).exists(), name
    run = next(r for r in result["runs"] if r["kind"] == "adapt" and r["method"] == "prompt")
    assert run["shakespeare_disabled"] == pytest.approx(result["meta"]["base"]["shakespeare_test"],
                                                        abs=0)


def _row(method, alice, shakes, rank=8, seed=0):
    return {"kind": "adapt", "method": method, "rank": rank, "fraction": 1.0, "lr": 1e-3,
            "seed": seed, "split": "test", "alice_loss": alice, "shakespeare_loss": shakes,
            "shakespeare_disabled": 1.5, "new_char_loss": 9.0, "trainable_params": 10,
            "trainable_pct": 1.0, "trainable_state_bytes": 1, "adapter_bytes": 1, "steps": 1,
            "batch_size": 1, "window": 8, "step_ms": 1.0}


def test_findings_say_what_the_numbers_say():
    base = {"alice_test": 2.2, "shakespeare_test": 1.5, "new_char_test": 11.0}
    learns_less = [_row("full", 1.6, 1.9), _row("lora_all", 1.8, 1.6)]
    text = " ".join(findings(summarize(learns_less, base), [], base))
    assert "learned less than full fine-tuning" in text and "forgot less" in text
    learns_more = [_row("full", 1.9, 1.9), _row("lora_all", 1.8, 2.0)]
    text = " ".join(findings(summarize(learns_more, base), [], base))
    assert "learned more than full fine-tuning" in text and "forgot more" in text


RESULTS_JSON = os.path.join(ct.RESULTS_DIR, "results.json")
SWEEP_JSON = os.path.join(ct.RESULTS_DIR, "lr_sweep", "results.json")


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_learning_rates_are_the_validation_sweeps_choice():
    sweep = _load(SWEEP_JSON)
    assert all(r["split"] == "validation" for r in sweep["runs"])
    chosen = choose_learning_rates(sweep)
    assert set(chosen) == set(ct.METHODS)
    assert {m: ct.METHODS[m].lr for m in chosen} == chosen


def test_readme_opens_with_the_generated_results():
    results = _load(RESULTS_JSON)
    with open(os.path.join(ct.ROOT, "README.md")) as f:
        readme = f.read()
    assert readme_with_block(readme, results) == readme, \
        "README's real-text block is stale: python code/stage-09/text_report.py --readme"
    assert readme.index(README_MARKERS[0]) < readme.index("## Quick start")


def test_committed_results_come_from_this_settings_table():
    meta = _load(RESULTS_JSON)["meta"]
    assert meta["settings"] == json.loads(json.dumps(ct.asdict(ct.SETTINGS)))
    assert {m: v["lr"] for m, v in meta["methods"].items()} == {m: s.lr for m, s in ct.METHODS.items()}
