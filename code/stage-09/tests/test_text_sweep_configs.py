"""The rank-sweep and low-data runs get their own validation-chosen rates (text_sweep_configs.py)."""
import csv
import json
import os
from dataclasses import asdict

import pytest

import compare_text as ct
import text_sweep
import text_sweep_configs as tsc
from compare import LR_LADDER

SWEEP_DIR = os.path.join(ct.RESULTS_DIR, "lr_sweep")


def _configs(specs):
    return [s for s in specs if s.kind == "adapt" and (s.rank, s.fraction) != (8, 1.0)]


def test_config_grid_is_the_headline_rate_and_its_ladder_neighbours():
    assert text_sweep.grid("adapt", "lora_all", 64, 1.0) == (3e-3, 1e-2, 3e-2)
    assert text_sweep.grid("adapt", "full", 8, 0.01) == (3e-4, 1e-3, 3e-3)
    assert text_sweep.grid("adapt", "lora_all") == ct.METHODS["lora_all"].lr_grid   # headline
    assert text_sweep.config_grid(LR_LADDER[0]) == LR_LADDER[:2]                    # clipped
    assert text_sweep.config_grid(LR_LADDER[-1]) == LR_LADDER[-2:]


def test_committed_rates_cover_the_full_plan_and_plan_uses_them():
    rates = ct.config_rates()
    specs = _configs(ct.plan(ct.SETTINGS, list(ct.METHODS)))
    assert specs and {(s.method, s.rank, s.fraction) for s in specs} <= set(rates)
    for s in specs:
        assert s.lr == rates[(s.method, s.rank, s.fraction)], s
    assert {(m, 8, 1.0) for m in ct.METHODS} & set(rates) == set()    # headline: METHODS' lr
    assert all(ct.config_lr(m) == spec.lr for m, spec in ct.METHODS.items())
    assert any(s.lr != ct.METHODS[s.method].lr for s in specs)       # the choice changed something


def test_committed_rates_are_the_runs_choice_on_validation_from_the_shipped_base():
    record = tsc.load_configs(SWEEP_DIR)
    assert record is not None
    assert all(r["split"] == "validation" for r in record["runs"])
    assert record["meta"]["base"] == ct.base_record(ct.TEXT_BASE_DIR)
    full = json.loads(json.dumps(asdict(ct.SETTINGS)))
    for k in ("steps", "batch_size", "window", "eval_windows", "ranks", "rank_methods",
              "fractions", "fraction_methods"):
        assert record["meta"]["settings"][k] == full[k], k
    chosen = tsc.config_choices(record["runs"])
    with open(os.path.join(SWEEP_DIR, ct.CONFIG_RATES_FILE)) as f:
        committed = list(csv.DictReader(f))
    assert [(c["method"], c["rank"], c["fraction"], c["lr"]) for c in chosen] == [
        (r["method"], int(r["rank"]), float(r["fraction"]), float(r["lr"])) for r in committed]
    for c in chosen:               # interior (a worse rate on each side) or at the ladder's end
        assert not c["edge"] or c["lr"] in (LR_LADDER[0], LR_LADDER[-1]), c
        assert text_sweep.next_runs("adapt", c["method"],
                                    [r for r in record["runs"] if text_sweep.key_of(r)
                                     == ("adapt", c["method"], c["rank"], c["fraction"])],
                                    text_sweep.config_grid(c["headline_lr"])) == [], c


def test_a_missing_configuration_is_an_error_except_for_quick(tmp_path, monkeypatch):
    path = tmp_path / "config_rates.csv"
    path.write_text("method,rank,fraction,lr\nlora_all,64,1.0,0.003\n")
    assert ct.config_lr("lora_all", 64, 1.0, path=str(path)) == 0.003
    with pytest.raises(KeyError, match=r"'lora_qv' at rank 64 on fraction 1"):
        ct.config_lr("lora_qv", 64, 1.0, path=str(path))
    assert ct.config_lr("lora_qv", 64, 1.0, fallback=True, path=str(path)) == ct.METHODS["lora_qv"].lr
    rates = dict(ct.config_rates())
    missing = next(iter(rates))
    del rates[missing]
    monkeypatch.setattr(ct, "config_rates", lambda path=None: rates)
    with pytest.raises(KeyError, match=f"{missing[0]!r} at rank {missing[1]}"):
        ct.plan(ct.SETTINGS, list(ct.METHODS))
    monkeypatch.setattr(ct, "config_rates", lambda path=None: {})
    quick = _configs(ct.plan(ct.QUICK, list(ct.METHODS)))      # quick: the headline rate
    assert quick and all(s.lr == ct.METHODS[s.method].lr for s in quick)


def test_the_readme_section_is_generated_from_the_record():
    record = tsc.load_configs(SWEEP_DIR)
    section = tsc.readme_section(record)
    with open(os.path.join(SWEEP_DIR, "README.md")) as f:
        assert section in f.read()
    for c in tsc.config_choices(record["runs"]):
        assert f"| {c['method']} | {c['rank']} | {c['fraction']:g} | {c['lr']:g}" in section
