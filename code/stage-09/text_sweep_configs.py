"""Rates for the main job's rank-sweep and low-data runs, chosen on Alice's validation split.

    python code/stage-09/text_sweep.py --configs            # writes results/text/lr_sweep/config_*
    python code/stage-09/text_sweep.py --configs --resume   # keeps an interrupted part's runs

``METHODS[m].lr`` is the rate chosen for rank 8 on all of Alice's training text. A LoRA of
rank 1 or 64, or any method trained on 1% of the text, is another configuration: the
same rate may be far from its best, and a learn-forget point at a wrong rate says more
about the rate than about the rank or the data. So each configuration of the main job
(``SETTINGS.rank_methods`` x ranks other than 8, ``fraction_methods`` x fractions below 1)
gets ``text_sweep``'s rule for Alice: seed 0 at ``config_grid`` (``{lr/3, lr, 3 lr}``
around the method's headline rate), one rate more past an edge on ``compare.LR_LADDER``
until the best is interior or at the ladder's end; one seed, like the headline choice.

Written: ``config_runs.json`` (every run, the settings, the time and load) and
``config_rates.csv`` (one row per configuration: the chosen rate), which
``compare_text.config_lr`` reads; the sweep README's section comes from the same record.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import asdict

import compare_text as ct
import jobs
import sweep_runs as sr
from checkpoint import atomic_write_text
from compare import LR_LADDER

RUNS_FILE = "config_runs.json"


def config_keys(settings, methods) -> list[tuple]:
    """The sweep keys ``(kind, method, rank, fraction)`` of every configuration of
    ``settings`` other than the headline one (rank 8, all of Alice)."""
    keys = [("adapt", m, r, 1.0) for m in settings.rank_methods if m in methods
            for r in settings.ranks if r != 8]
    return keys + [("adapt", m, 8, f) for m in settings.fraction_methods if m in methods
                   for f in settings.fractions if f != 1.0]


def config_choices(runs) -> list[dict]:
    """One row per configuration: the chosen rate (lowest Alice validation loss, ties to the
    lower Shakespeare loss), its loss, every rate tried, the loss at the headline rate, and
    whether the choice is at an edge of the rates tried (then: at the ladder's end)."""
    groups = defaultdict(list)
    for r in runs:
        groups[sr.key_of(r)[1:]].append(r)
    out = []
    for (method, rank, fraction), rows in groups.items():
        done = sr.by_rate(rows)
        ranked = sorted(done, key=lambda lr: sr.score("adapt", done[lr]))
        best, rates, headline = ranked[0], sorted(done), ct.METHODS[method].lr
        edge = best in (rates[0], rates[-1])
        value = sr.score("adapt", done[best])[0]
        at_headline = sr.score("adapt", done[headline])[0] if headline in done else None
        out.append({"method": method, "rank": rank, "fraction": fraction, "lr": best,
                    "value": value, "rates": " ".join(f"{lr:g}" for lr in rates),
                    "headline_lr": headline, "value_at_headline_lr": at_headline,
                    "edge": edge, "limit": ("" if not edge else "the ladder's end"
                                            if best in (LR_LADDER[0], LR_LADDER[-1]) else "unsettled")})
    return out


def load_configs(out) -> dict | None:
    """The record ``main`` wrote in ``out``, or ``None``."""
    path = os.path.join(out, RUNS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def readme_section(configs) -> str:
    """The sweep README's lines on these configurations (``""`` without a record)."""
    if not configs:
        return ""
    meta, chosen = configs["meta"], config_choices(configs["runs"])
    t = meta["timing"]
    lines = ["| method | rank | share of Alice | lr | tried | Alice val. loss | at the headline lr |",
             "|---" * 7 + "|"]
    for c in chosen:
        lines.append(f"| {c['method']} | {c['rank']} | {c['fraction']:g} | {c['lr']:g}"
                     + (f" ({c['limit']})" if c["edge"] else "") + f" | {c['rates']} | "
                     f"{c['value']:.3f} | {c['headline_lr']:g}: {c['value_at_headline_lr']:.3f} |")
    moved = [c for c in chosen if c["lr"] != c["headline_lr"]]
    gain = max((c["value_at_headline_lr"] - c["value"] for c in moved), default=0.0)
    unsettled = [c for c in chosen if c["limit"] == "unsettled"]
    s = meta["settings"]
    return f"""
## Rank-sweep and low-data rates

The main job's other configurations, each with its own rate: made by `{t['command']}` in
{t['wall_minutes']:.1f} minutes with {t['workers']} workers (load average 1/5/15 min before
{t['load_before']}, after {t['load_after']}); {len(configs['runs'])} runs of {s['steps']} steps,
one seed, from the base `{meta['base']['dir']}`, scored on Alice's validation split. The rule
is the one above, starting from the method's headline rate and its neighbours on the ladder
(`text_sweep.config_grid`). `compare_text.config_lr` reads `config_rates.csv`.

{chr(10).join(lines)}

- {len(moved)} of {len(chosen)} configurations choose another rate than the headline's; the
  largest gain over the headline rate is {gain:.3f} nats.
- {"Every chosen rate has a worse rate tried on each side or is at the ladder's end." if not unsettled
   else "Unsettled (at an edge inside the ladder): " + ", ".join(
       f"{c['method']} r={c['rank']} {c['fraction']:g}" for c in unsettled) + "."}
"""


def main(methods, settings, base_dir, out, workers, command, resume=False):
    """Run (or finish) every configuration's choice; write ``config_runs.json``,
    ``config_rates.csv`` (``text_sweep.py --configs`` then rewrites the sweep README)."""
    from report import write_csv
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "config_progress.jsonl")      # removed once the results are written
    done = sr.logged_runs(log, resume)
    start, load_before = time.perf_counter(), os.getloadavg()
    cpu_start, children_start = time.process_time(), jobs._children_cpu()
    rows = sr.sweep(methods, settings, base_dir, workers, log, done,
                    keys=config_keys(settings, methods))
    new = [r for r in rows if not any(r is d for d in done)]
    timing = sr.timing_record(command, workers, new, start, load_before, cpu_start, children_start)
    record = {"meta": {"timing": timing, "settings": asdict(settings),
                       "base": ct.base_record(base_dir), "resumed": len(rows) - len(new)},
              "runs": rows}
    atomic_write_text(os.path.join(out, RUNS_FILE), json.dumps(record, indent=1))
    chosen = config_choices(rows)
    write_csv(os.path.join(out, ct.CONFIG_RATES_FILE), chosen)
    os.remove(log)
    for c in chosen:
        print(f"{c['method']:<10} r={c['rank']:<3} fraction {c['fraction']:<5g} lr {c['lr']:g}  "
              f"tried {c['rates']}" + ("  EDGE" if c["edge"] else ""))
    return record
