"""Choosing a method from the real-text results (``text_choice.py``, notebook 06).

* the results CSVs read back with their numbers as numbers;
* ``pareto`` keeps exactly the rows no other row beats on both losses;
* ``decision_rows`` picks the best row per concern, and the cost rows only among the
  methods that learned (else the method that learned nothing wins every cost);
* ``served``: full fine-tuning is a plain model, LoRA and QLoRA merge into a float model
  that computes what the adapter computed, prefixes stay in the forward pass;
* ``run_small``: the fallback without committed results gives the same kind of rows.
"""
from dataclasses import replace

import numpy as np
import pytest

import compare_text as ct
import text_choice as tc
from minigpt import GPT
from report import write_csv


def row(method, alice, forgetting, file_kb, disabled=0.0, fraction=1.0, **kw):
    label = method if fraction == 1.0 else f"{method}@{fraction:g}"
    out = {"label": label, "method": method, "rank": 8, "fraction": fraction, "seeds": 3,
           "alice_loss": alice, "forgetting": forgetting, "disabled_rise": disabled,
           "adapter_bytes": file_kb * 1024, "trainable_state_bytes": 4 * file_kb * 1024,
           "trainable_pct": file_kb / 10, "step_ms": 100.0, "new_char_loss": 10.0}
    out.update(kw)
    return out


BASE = {"alice_test": 2.0}
SUMMARY = [row("full", 1.5, 0.30, 4000, disabled=0.30, step_ms=300.0),
           row("lora_all", 1.6, 0.25, 300, new_char_loss=8.0),
           row("ia3", 1.74, 0.20, 20, step_ms=90.0),
           row("prompt", 1.95, 0.05, 5, step_ms=50.0, new_char_loss=12.0),
           row("ia3", 2.5, 0.9, 20, fraction=0.01), row("full", 3.1, 1.6, 4000, fraction=0.01)]
CLASSIFY = [{"method": "ia3", "accuracy": 0.8, "majority_baseline": 0.5},
            {"method": "full", "accuracy": 0.7, "majority_baseline": 0.5}]


def test_read_csv_gives_numbers(tmp_path):
    path = tmp_path / "summary.csv"
    write_csv(str(path), SUMMARY)
    back = tc.read_csv(path)
    assert back == SUMMARY, f"read back {back[0]}, wrote {SUMMARY[0]}"


def test_pareto_keeps_the_undominated():
    rows = [{"label": n, "alice_loss": a, "forgetting": f} for n, a, f in
            [("a", 1.0, 1.0), ("b", 2.0, 0.5), ("c", 2.0, 2.0), ("d", 1.0, 1.5)]]
    assert [r["label"] for r in tc.pareto(rows)] == ["a", "b"]


def test_decision_rows_choose_the_best_among_methods_that_learned():
    inference = {"full": {"form": "plain", "ratio": 1.0, "frozen_bytes": 0},
                 "lora_all": {"form": "merged", "ratio": 1.01, "frozen_bytes": 4000 * 1024},
                 "ia3": {"form": "merged", "ratio": 1.0, "frozen_bytes": 4000 * 1024},
                 "prompt": {"form": "unmerged", "ratio": 1.2, "frozen_bytes": 4000 * 1024}}
    rows = {r["concern"]: r for r in tc.decision_rows(SUMMARY, CLASSIFY, BASE, inference)}
    assert rows["learn the new text best"]["choice"] == "full"
    # prompt has the smallest file and forgets least, but closed 10% of full's gain: left out
    assert [s["method"] for s in tc.learned(tc.headline(SUMMARY), BASE)] == ["full", "lora_all", "ia3"]
    assert rows["smallest file per task"]["choice"] == "ia3"
    assert rows["forget the least while learning"]["choice"] == "ia3"
    assert rows["old model back exactly (adapter off)"]["choice"] == "lora_all"    # full: disabled rise 0.3
    assert rows["fastest training step"]["choice"] == "ia3"
    assert rows["no inference overhead"]["choice"] == "full"
    assert rows["characters the base never saw"]["choice"] == "lora_all"
    assert rows["little data (1% of the text)"]["choice"] == "ia3"
    assert rows["a label task (who wrote it?)"]["choice"] == "ia3"
    assert rows["learn the new text best"]["runner_up"].startswith("lora_all")
    table = tc.markdown_table(list(rows.values()))
    assert table.count("\n") == len(rows) + 1 and "| **ia3** |" in table


def _randomize_adapter(model, seed=0):
    """Non-zero values in every trainable array (LoRA's B starts at zero: merging it is trivial)."""
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters(trainable_only=True):
        p[...] = 0.02 * rng.standard_normal(p.shape)


@pytest.mark.parametrize("method, form", [("full", "plain"), ("lora_all", "merged"), ("qlora", "merged"),
                                          ("prefix", "unmerged")])
def test_served_form_computes_what_the_trained_model_computes(method, form):
    model = ct.build(method)
    _randomize_adapter(model)
    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 16))
    before = model.eval().forward(tokens)
    served, got = tc.served(model)
    assert got == form
    if form != "unmerged":
        assert type(served) is GPT and not any(hasattr(m, "adapter_attr") for _, m in served.named_modules())
    after = served.forward(tokens)
    err = np.abs(after - before).max() / np.abs(before).max()
    assert err < 1e-5, f"{method} served as {form}: relative logit difference {err:.2e}"


def test_run_small_makes_the_rows_load_reads():
    quick = replace(ct.QUICK, steps=2, classify_steps=2, eval_windows=2)
    got = tc.run_small(("lora_all",), quick)
    labels = {s["label"] for s in got["summary"]}
    assert {"lora_all", f"lora_all_r{quick.ranks[0]}", f"lora_all@{quick.fractions[0]:g}"} <= labels
    assert [c["method"] for c in got["classification"]] == ["lora_all"]
    assert got["base"]["alice_test"] > 0 and got["meta"]["settings"]["steps"] == 2
