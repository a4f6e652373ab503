"""The real-text comparison: every method learns Alice, disabled is the base, the runner's files."""
import json
import os

import numpy as np
import pytest

import compare_text as ct
from checkpoint import load_model
from text import corpus_splits, fixed_windows, lm_loss
import text_sweep
from text_report import (README_MARKERS, authorship_finding, choose_classification_rates,
                         choose_learning_rates, findings, readme_with_block, summarize,
                         summarize_classification)

BASE = os.environ.get("PEFT_TEXT_BASE", ct.TEXT_BASE_DIR)
TOUCH = {"full", "bitfit", "qlora"}          # train or quantize the base's own numbers


@pytest.fixture(scope="module")
def held_out():
    """Fixed windows of Alice's validation split (never trained on) and of Shakespeare's."""
    window = 32
    vx, vy = fixed_windows(corpus_splits("alice")["validation"], window, 32, seed=7)
    sx, _ = fixed_windows(corpus_splits("shakespeare")["validation"], window, 4, seed=5)
    return window, vx, vy, sx


SHORT_STEPS, MARGIN = 40, 0.02     # a 40-step run lowers held-out Alice loss by 0.05-0.3 nats


@pytest.mark.parametrize("method", list(ct.METHODS))
def test_each_method_lowers_alice_loss_and_disabled_is_the_base(method, held_out):
    """A short run on Alice's training split lowers the loss on held-out Alice windows by at
    least MARGIN (a method whose backward is broken does not move, or moves the wrong way)."""
    window, vx, vy, sx = held_out
    base = load_model(BASE)
    expected, base_loss = base.forward(sx), lm_loss(base, vx, vy)
    model = ct.build(method, BASE, seed=0)
    before = lm_loss(model, vx, vy)
    if method not in TOUCH and not method.startswith(("prefix", "prompt")):
        assert before == base_loss          # the identity at the start: exactly the base
    ct.adapt(model, corpus_splits("alice")["train"], SHORT_STEPS, ct.METHODS[method].lr,
             batch_size=8, seed=0, window=window)          # the job's training, shorter
    after = lm_loss(model, vx, vy)
    assert after < before - MARGIN, f"{method}: held-out Alice loss {before:.4f} -> {after:.4f}"
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
    assert {(r.method, r.lr) for r in specs if r.kind == "classify"} == \
        {(m, ct.METHODS[m].classify_lr) for m in ct.METHODS}


def test_quick_never_writes_the_full_results():
    with pytest.raises(SystemExit, match="may not overwrite the committed full results"):
        ct.main(["--quick", "--out", ct.RESULTS_DIR])
    with pytest.raises(SystemExit, match="unknown method"):
        ct.main(["--quick", "--methods", "lora_all,nonsense"])
    with pytest.raises(SystemExit, match="python code/stage-09/text_sweep.py --quick"):
        ct.main(["--lr-sweep", "--quick"])


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
    runs = [{"kind": "classify", "method": m, "lr": 1e-2, "seed": seed, "steps": 1, "n_test": 4,
             "trainable_params": 1, "majority_baseline": 0.5, "accuracy": a, "top1_accuracy": a,
             "accuracy_before": 0.5} for m, accs in (("ia3", (0.9, 0.8, 0.85)), ("bitfit", (0.5, 0.7, 0.5)))
            for seed, a in enumerate(accs)]
    text = authorship_finding(summarize_classification(runs))
    assert "ia3 is best at 85.0%" in text and "1 of 2 methods" in text and "(not: bitfit)" in text


RESULTS_JSON = os.path.join(ct.RESULTS_DIR, "results.json")
SWEEP_JSON = os.path.join(ct.RESULTS_DIR, "lr_sweep", "results.json")


def _load(path):
    with open(path) as f:
        return json.load(f)


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


# ---- the learning-rate sweep (text_sweep.py) and its committed results ----------------------
def _runs(kind, results):
    """Fake finished runs: ``{lr: [value per seed]}`` -> rows as ``compare_text.run`` makes."""
    key = "alice_loss" if kind == "adapt" else "accuracy"
    return [{"kind": kind, "method": "m", "lr": lr, "seed": seed, key: v, "shakespeare_loss": 1.0,
             "label_loss": 0.5} for lr, vs in results.items() for seed, v in enumerate(vs)]


def test_sweep_widens_an_edge_then_seeds_the_best_two():
    grid = (1e-3, 3e-3, 1e-2)
    assert text_sweep.next_runs("adapt", "m", [], grid) == [(lr, 0) for lr in grid]
    top = _runs("adapt", {1e-3: [2.0], 3e-3: [1.9], 1e-2: [1.8]})
    assert text_sweep.next_runs("adapt", "m", top, grid) == [(3e-2, 0)]            # x3 past the top
    bottom = _runs("adapt", {1e-3: [1.7], 3e-3: [1.9], 1e-2: [1.8]})
    assert text_sweep.next_runs("adapt", "m", bottom, grid) == [(3e-4, 0)]         # /3 past the bottom
    inside = _runs("adapt", {1e-3: [2.0], 3e-3: [1.7], 1e-2: [1.8]})
    assert text_sweep.next_runs("adapt", "m", inside, grid, seeds=(0,)) == []       # settled
    two = (0, 1)                                   # with a second seed: the best two get it
    assert text_sweep.next_runs("adapt", "m", inside, grid, two) == [(3e-3, 1), (1e-2, 1)]
    seeded = _runs("adapt", {1e-3: [1.81], 3e-3: [1.7, 1.9], 1e-2: [1.75, 1.95]})  # means 1.80, 1.85
    assert text_sweep.next_runs("adapt", "m", seeded, grid, two) == [(1e-3, 1)]         # new best two
    moved = _runs("adapt", {1e-3: [2.0], 3e-3: [1.7, 1.9], 1e-2: [1.8, 1.75]})    # 1e-2 now best
    assert text_sweep.next_runs("adapt", "m", moved, grid, two) == [(3e-2, 0)]
    settled = _runs("adapt", {1e-3: [1.81, 1.82], 3e-3: [1.7, 1.9], 1e-2: [1.75, 1.95]})
    assert text_sweep.next_runs("adapt", "m", settled, grid, two) == []
    # accuracy: higher is better; the ladder's end is a hard limit
    accurate = _runs("classify", {1.0: [0.6], 3.0: [0.9]})
    assert text_sweep.next_runs("classify", "m", accurate, (1.0, 3.0), two) == [(3.0, 1), (1.0, 1)]
    diverged = _runs("adapt", {1e-2: [1.9], 3e-2: [1.8]}) + [
        {"kind": "adapt", "method": "m", "lr": 1e-1, "seed": 0, "diverged": "nan"}]
    assert text_sweep.next_runs("adapt", "m", diverged, (1e-2, 3e-2, 1e-1), two) == [(3e-2, 1), (1e-2, 1)]


def test_learning_rates_are_the_validation_sweeps_choice():
    sweep = _load(SWEEP_JSON)
    assert all(r["split"] == "validation" for r in sweep["runs"])
    assert sweep["meta"]["base"]["pretraining"]["dir"] == os.path.relpath(ct.TEXT_BASE_DIR, ct.ROOT)
    assert not sweep["meta"]["base"]["pretraining"].get("snapshot_of")
    shipped = ct.base_record(ct.TEXT_BASE_DIR)          # the very base shipped now, not an earlier one
    assert sweep["meta"]["base"]["pretraining"]["validation_loss"] == shipped["validation_loss"]
    assert choose_learning_rates(sweep) == {m: ct.method_spec(m).lr for m in choose_learning_rates(sweep)}
    assert choose_classification_rates(sweep) == {m: s.classify_lr for m, s in ct.METHODS.items()}
    for c in text_sweep.choices(sweep):
        spec = ct.method_spec(c["method"])
        tried = spec.lr_grid if c["task"] == "adapt" else spec.classify_lr_grid
        assert c["rates"] == " ".join(f"{lr:g}" for lr in sorted(tried)), c
        assert not c["edge"] or c["limit"] == "the ladder's end", c
    prompts = {m: s["alice_loss"] for m, s in ranked_first(sweep).items() if m.startswith("prompt")}
    assert min(prompts, key=prompts.get) == "prompt"      # the main job's start is the best one


def ranked_first(sweep):
    from text_report import ranked_rates
    return {m: ranked[0] for m, ranked in ranked_rates(sweep).items()}


def test_the_sweeps_readme_is_generated_from_its_results(tmp_path):
    sweep = _load(SWEEP_JSON)
    from text_sweep_configs import load_configs
    text_sweep.write_sweep_readme(sweep, str(tmp_path), load_configs(os.path.dirname(SWEEP_JSON)))
    with open(os.path.join(os.path.dirname(SWEEP_JSON), "README.md")) as f:
        assert (tmp_path / "README.md").read_text() == f.read()
