"""The comparison runner's quick mode, the structural facts its table must show, and
the honesty of the committed results (rates chosen on validation, README from results)."""
import csv
import json
import os

import pytest

import compare
import report
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
    # the file holds the trainable numbers, prefix_mlp's MLP included: save_pretrained keeps
    # the reparameterisation so training can go on (hf_export writes peft's folded table)
    for name, row in rows.items():                   # params + grads + 2 AdamW moments, float32
        assert row["trainable_state_bytes"] == 16 * row["trainable_params"]
        n = row["trainable_params"]
        assert 4 * n <= row["adapter_bytes"] <= 4 * n + 16384, name


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_and_partial_runs_never_write_the_committed_results():
    assert compare.output_dir(None, full=True, lr_sweep=False) == compare.RESULTS_DIR
    assert compare.output_dir(None, full=True, lr_sweep=True) == compare.SWEEP_DIR
    assert compare.output_dir(None, full=False, lr_sweep=False).startswith(compare.QUICK_DIR)
    assert compare.output_dir(None, full=False, lr_sweep=True).startswith(compare.QUICK_DIR)
    for argv in (["--quick", "--out", compare.RESULTS_DIR], ["--methods", "lora_qv", "--out", compare.RESULTS_DIR],
                 ["--lr-sweep", "--tasks", "add3", "--out", compare.SWEEP_DIR]):
        with pytest.raises(SystemExit, match="may not overwrite"):
            compare.main(argv)                       # refused before any run starts
    with open(os.path.join(compare.RESULTS_DIR, "..", ".gitignore")) as f:
        assert "/results/quick/" in f.read().split()


def test_learning_rates_were_chosen_on_the_validation_split():
    sweep = read_csv(os.path.join(compare.SWEEP_DIR, "sweep.csv"))
    runs = read_csv(os.path.join(compare.SWEEP_DIR, "runs.csv"))
    assert "test_accuracy" not in sweep[0] and "test_accuracy" not in runs[0]   # no test set looked at
    assert {r["split"] for r in runs} == {"validation"}
    for r in sweep:
        for k in ("lr", "validation_accuracy", "ce_rise"):
            r[k] = float(r[k])
    redone = [(c["method"], c["task"], c["lr"]) for c in report.choose_learning_rates(sweep)]
    stored = [(c["method"], c["task"], float(c["lr"])) for c in read_csv(compare.CHOSEN_CSV)]
    assert redone == stored                          # chosen.csv is the sweep's choice, not edited
    assert {(m, t) for m, t, _ in stored} == {(m, t) for m in compare.METHODS for t in DOWNSTREAM_TASKS}
    # every method got the same search: its three-rate grid, grown past an edge winner
    # exactly as compare.main does (replayed here from the stored measurements)
    by_rate = {(r["method"], r["task"], r["lr"]): r for r in sweep}
    tried = {(m, t, lr) for m in compare.METHODS for t in DOWNSTREAM_TASKS for lr in compare.sweep_grid(m)}
    for _ in range(compare.SWEEP_EXTENSIONS):
        extra = compare.beyond_edges(report.choose_learning_rates([by_rate[k] for k in tried]), tried)
        tried |= set(extra)
    assert tried == set(by_rate)


def test_committed_comparison_trained_with_the_chosen_rates():
    summary = read_csv(os.path.join(compare.RESULTS_DIR, "summary.csv"))
    for s in summary:
        method = "lora_all" if s["rank"] else s["method"]
        assert float(s["lr"]) == compare.learning_rate(method, s["task"]), (s["method"], s["task"])
    assert {(s["method"], s["task"]) for s in summary if not s["rank"]} == \
        {(m, t) for m in compare.METHODS for t in DOWNSTREAM_TASKS}


def test_readme_quotes_the_committed_results():
    readme = os.path.join(compare.RESULTS_DIR, "..", "README.md")
    with open(readme) as f:
        text = f.read()
    assert report.readme_section(compare.RESULTS_DIR) in text, \
        "README's main-job block is stale: run `python code/stage-09/report.py --readme`"
