"""The comparison runner's quick mode, and the structural facts its table must show."""
import json

import pytest

import compare
from checkpoint import load_model
from pretrain import PRETRAINED_DIR
from tasks import DOWNSTREAM_TASKS, PRETRAIN_TASKS, fixed_test_set
from train import evaluate


def test_shipped_base_knows_its_tasks():
    model = load_model(PRETRAINED_DIR)
    report = json.load(open(f"{PRETRAINED_DIR}/pretrain_report.json"))
    assert all(acc >= 0.99 for acc in report["test_accuracy"].values())
    for task in PRETRAIN_TASKS:                      # a spot check of the recorded numbers
        assert evaluate(model, fixed_test_set(task, 100)) >= 0.99
    for task in DOWNSTREAM_TASKS:                    # and it cannot do the downstream tasks
        assert evaluate(model, fixed_test_set(task, 100)) <= 0.2


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    compare.main(["--quick", "--out", str(out)])
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_writes_every_output(quick_results):
    out, results = quick_results
    for name in ("runs.csv", "summary.csv", "results.json", "README.md",
                 "accuracy_vs_params.png", "forgetting_vs_accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    assert {s["method"] for s in results["summary"]} == set(compare.METHODS)
    assert "python code/stage-09/compare.py --quick" in results["meta"]["command"]


def test_frozen_base_scores_as_before_when_disabled(quick_results):
    _, results = quick_results
    base = results["meta"]["base"]
    for row in results["runs"]:
        if row["method"] in ("full", "bitfit"):      # these edit base weights in place
            continue
        if row["method"] == "qlora":                 # disabled = the 4-bit base
            assert row["disabled_accuracy"] >= 0.9
            continue
        assert row["disabled_accuracy"] == base["pretrain_accuracy"], row["method"]
        assert row["disabled_ce"] == pytest.approx(base["pretrain_ce"], abs=1e-6), row["method"]


def test_counts_and_bytes_are_consistent(quick_results):
    _, results = quick_results
    rows = {r["method"]: r for r in results["runs"]}
    d, L, r = 64, 4, 8
    assert rows["lora_qv"]["trainable_params"] == L * 2 * r * 2 * d
    assert rows["prompt"]["trainable_params"] == 10 * d
    assert rows["prefix"]["trainable_params"] == L * 2 * 10 * d
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
    for row in rows.values():                       # params + grads + 2 AdamW moments, float32
        assert row["trainable_state_bytes"] == 16 * row["trainable_params"]
        assert 4 * row["trainable_params"] <= row["adapter_bytes"] <= 4 * row["trainable_params"] + 16384
