"""The real-text comparison's learning-rate sweep: every choice made on validation data.

    python code/stage-09/text_sweep.py           # writes results/text/lr_sweep/
    python code/stage-09/text_sweep.py --resume  # keeps an interrupted sweep's runs
    python code/stage-09/text_sweep.py --readme  # README.md and chosen.csv from results.json
    python code/stage-09/text_sweep.py --configs # the rank-sweep and low-data rates only

(options as ``compare_text.py``'s: ``--methods``, ``--quick``, ``--workers``, ``--out``).

Each method has two rates, one per task: ``TextMethod.lr`` for *Alice* (the loss on
Alice's validation split after the main job's training) and ``classify_lr`` for the
authorship task (accuracy on validation snippets, ties to the lower loss at the
label position). The prompt-tuning starts of ``SWEEP_VARIANTS`` run on Alice beside
``prompt``, so its start is chosen the same way. No test split is read.
The main job's LoRA rank sweep and low-data runs have rates of their own, chosen on
Alice by the same rule from ``config_grid`` (``--configs``: ``text_sweep_configs.py``).

The rule (``next_runs``), applied to one (task, method) whenever its runs so far are in:

1. seed 0 at every rate of its grid (``lr_grid`` / ``classify_lr_grid``);
2. while the best rate is the smallest or largest tried, the next rate past it on the
   digit sweep's ladder (``compare.LR_LADDER``: x3 or /3; its ends are hard limits);
   a run that diverges scores worst;
3. the best two rates get every seed of ``SEEDS[task]`` ("best": the mean over the seeds a
   rate has). On this shared 2-core machine Alice runs one seed: the README sets the gap
   between its best two rates against the seed-to-seed spread of the main job's three
   seeds (their *validation* losses, ``results/text/results.json``). The authorship task,
   scored on 200 snippets after 30 steps, is noisier: its best two rates get seed 1 too.

The engine (``next_runs``, ``sweep``: one pool for every key) is ``sweep_runs.py``; this
file chooses, writes the README and holds the command line. One pool of ``workers``
processes serves both tasks: a method's next runs are queued as
soon as its previous ones are in, so neither core waits for a whole round; Alice's runs go
first, and a widened grid's run before the remaining first grids.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import numpy as np

import compare_text as ct
import jobs
import text_sweep_configs
from checkpoint import atomic_write_text, load_model
from compare import LR_LADDER
from sweep_runs import (KINDS, SEEDS, by_rate, config_grid, grid, key_of, logged_runs,  # noqa: F401
                        next_runs, run_or_diverge, run_spec, score, sweep, timing_record)
from text import lm_loss

def seed_noise(path=os.path.join(ct.RESULTS_DIR, "results.json")) -> dict:
    """``{method: std over seeds of the Alice validation loss}`` of the main job's headline
    runs (its rows also carry validation losses), or ``{}`` without that file."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        runs = json.load(f)["runs"]
    groups = defaultdict(list)
    for r in runs:
        if r["kind"] == "adapt" and r["rank"] == 8 and r["fraction"] == 1.0 and "val_alice_loss" in r:
            groups[r["method"]].append(r["val_alice_loss"])
    return {m: float(np.std(v)) for m, v in groups.items() if len(v) > 1}


def start_losses(base_dir, settings) -> dict:
    """Alice's validation loss of the base with each prompt-tuning start, before any step."""
    from peft_model import get_peft_model
    base = load_model(base_dir)
    sets = ct.eval_sets(base.config, settings.eval_windows, settings.window)
    x, y = sets[("alice", "validation")]
    out = {"base": lm_loss(base, x, y)}
    for name in ["prompt"] + [v for v in ct.SWEEP_VARIANTS if v.startswith("prompt_")]:
        model = get_peft_model(load_model(base_dir), ct.method_spec(name).make_config(), seed=0)
        out[name] = lm_loss(model, x, y)
    return out


def _metric(kind, row):
    return row["alice_loss"] if kind == "adapt" else row["accuracy"]


def choices(results) -> list[dict]:
    """One row per (task, method): the chosen rate, the rates tried, the runner-up, the gap
    between them against the seed-to-seed difference, and whether the choice is at an edge."""
    import text_report as tr
    tried, runs = defaultdict(set), defaultdict(list)
    for r in results["runs"] + results.get("diverged", []):
        tried[(r["kind"], r["method"])].add(r["lr"])
        if not r.get("diverged"):
            runs[(r["kind"], r["method"], r["lr"])].append(r)
    out = []
    for kind in KINDS:
        for method, ranked in tr.ranked_rates(results, kind).items():
            best, rates = ranked[0], sorted(tried[(kind, method)])
            value = "alice_loss" if kind == "adapt" else "accuracy"
            spreads = [np.ptp([_metric(kind, r) for r in runs[(kind, method, s["lr"])]])
                       for s in ranked[:2] if s["seeds"] > 1]
            edge = best["lr"] in (rates[0], rates[-1])
            out.append({
                "task": kind, "method": method, "lr": best["lr"], "value": best[value],
                "seeds": best["seeds"], "rates": " ".join(f"{lr:g}" for lr in rates),
                "runner_up_lr": ranked[1]["lr"] if len(ranked) > 1 else None,
                "gap": abs(best[value] - ranked[1][value]) if len(ranked) > 1 else None,
                "seed_difference": max(spreads) if spreads else None,
                "edge": edge,
                "limit": ("" if not edge else "the ladder's end" if best["lr"] in (LR_LADDER[0],
                                                                                   LR_LADDER[-1])
                          else "unsettled")})
    return out


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def choice_table(chosen) -> str:
    by = {(c["task"], c["method"]): c for c in chosen}
    head = ("| method | Alice lr | tried | Alice val. loss | runner-up: gap | seed diff. "
            "| authorship lr | tried | val. accuracy | runner-up: gap | seed diff. |")
    lines = [head, "|---" * 11 + "|"]
    for method in dict.fromkeys(c["method"] for c in chosen):
        cells = [method]
        for kind, spec in (("adapt", ".3f"), ("classify", ".3f")):
            c = by.get((kind, method))
            if c is None:
                cells += [""] * 5
                continue
            cells += [f"{c['lr']:g}" + (" (edge)" if c["edge"] else ""), c["rates"],
                      f"{c['value']:{spec}}" + (f" ({c['seeds']} seeds)" if c["seeds"] > 1 else ""),
                      f"{c['runner_up_lr']:g}: {c['gap']:{spec}}" if c["gap"] is not None else "",
                      _fmt(c["seed_difference"], spec)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_sentences(chosen) -> list[str]:
    out = []
    for kind, what, unit in (("adapt", "Alice", "nats"), ("classify", "authorship", "accuracy")):
        cs = [c for c in chosen if c["task"] == kind and c["seed_difference"] is not None
              and c["gap"] is not None]
        if not cs:
            continue
        close = [c["method"] for c in cs if c["gap"] <= c["seed_difference"]]
        out.append(
            f"{what}: the gap between the best two rates is {min(c['gap'] for c in cs):.3f} to "
            f"{max(c['gap'] for c in cs):.3f} {unit}; seeds 0 and 1 at those rates differ by up to "
            f"{max(c['seed_difference'] for c in cs):.3f}. "
            + (f"For {len(close)} of {len(cs)} methods ({', '.join(close)}) the gap is not larger "
               f"than the seed difference: one seed could have picked either rate, so the choice "
               f"uses the mean of two." if close else
               f"For every one of the {len(cs)} methods the gap is larger than the seed "
               f"difference: one seed would have picked the same rates."))
    return out


def noise_sentences(chosen, noise) -> list[str]:
    """One seed or more? The gap between the best two Alice rates against the main job's
    seed-to-seed standard deviation of the Alice validation loss (``noise``)."""
    cs = [c for c in chosen if c["task"] == "adapt" and c["gap"] is not None and c["method"] in noise]
    if not cs:
        return []
    close = [f"{c['method']} ({c['lr']:g} vs {c['runner_up_lr']:g}: {c['gap']:.3f})" for c in cs
             if c["gap"] < 2 * noise[c["method"]]]
    return [f"Seed noise: over the main job's three seeds the Alice validation loss varies by a "
            f"standard deviation of {min(noise.values()):.4f} to {max(noise.values()):.4f} nats "
            f"(per method, at its rate then); the gap between the best and the second-best rate "
            f"here is {min(c['gap'] for c in cs):.3f} to {max(c['gap'] for c in cs):.3f} nats. "
            + (f"Within twice that noise, so one seed cannot tell the two rates apart (either "
               f"serves): {', '.join(close)}." if close else
               "Every gap is more than twice the noise: one seed picks the same rates.")]


def edge_sentences(chosen) -> list[str]:
    edges = [c for c in chosen if c["edge"]]
    if not edges:
        return ["Every chosen rate has a worse rate tried on each side (none is at an edge of its grid)."]
    return [f"At an edge: {c['task']} {c['method']} lr {c['lr']:g} ({c['limit']})." for c in edges]


def prompt_sentences(results, starts) -> list[str]:
    import text_report as tr
    ranked = tr.ranked_rates(results)
    names = [n for n in ["prompt"] + list(ct.SWEEP_VARIANTS) if n in ranked and n in starts]
    if not names:
        return []
    base = starts["base"]
    parts = [f"{n} ({ct.method_spec(n).why}): {starts[n]:.3f} before training, "
             f"{ranked[n][0]['alice_loss']:.3f} after at its best rate {ranked[n][0]['lr']:g}"
             for n in names]
    best = min(names, key=lambda n: ranked[n][0]["alice_loss"])
    gain = base - ranked[best][0]["alice_loss"]
    return [f"The base's Alice validation loss is {base:.3f}. " + "; ".join(parts) + ".",
            f"Best start: {best} ({gain:+.3f} nats below the base" + ("" if gain > 0 else
                                                                      ", i.e. no gain") + ")."]


def write_sweep_readme(results, out, configs=None):
    """``out/README.md`` and ``out/chosen.csv``, from a sweep's ``results.json`` alone
    (and ``configs``, the rank-sweep and low-data part's record, ``text_sweep_configs.py``)."""
    meta, s = results["meta"], results["meta"]["settings"]
    starts, workers = meta["prompt_starts"], meta["workers"]
    pre, base = meta["base"]["pretraining"], meta["base"]
    chosen = choices(results)
    import text_report as tr
    table = tr.format_table(results["summary"], base, "validation")
    ctable = tr.format_classification(results["classification"])
    load, job = meta["load_average"], meta.get("job")
    cost = ("" if not job else f"; {job['cpu_minutes']:.1f} CPU minutes, which on {workers} idle "
            f"cores projects to {job['projected_idle_minutes']:.1f} min")
    diverged = results.get("diverged", [])
    resumed = ("" if "--resume" not in meta["command"] else " (`--resume`: the runs an interrupted "
               "start had finished were kept, and the time counts the resumed part only)")
    text = f"""# Learning rates of the real-text comparison (validation splits only)

Made by `{meta['command']}` in {meta['minutes']:.1f} minutes on {meta['machine']} with {workers} worker
process{'es' if workers > 1 else ''} (load average 1/5/15 min before {load[:3]}, after {load[3:]}){cost}; {len(results['runs'])} runs{resumed}.
Every run starts from the shipped base `{pre['dir']}` (Shakespeare validation loss
{pre['validation_loss']:.3f} after {pre['steps']} pretraining steps). *Alice*: {s['steps']} steps of
batch {s['batch_size']} x {s['window']} characters, scored on {s['eval_windows']} fixed windows of Alice's
validation split. Authorship: {s['classify_steps']} steps on {s['classify_train']} training snippets
per author, scored on {s['classify_validation']} validation snippets per author (majority baseline
50%). No test split was read.

The rule (`text_sweep.next_runs`): seed 0 at every rate of the method's grid; while the best
rate is the smallest or largest tried, one more rate past it (x3 or /3 on `compare.LR_LADDER`);
then (authorship) seed 1 for the best two rates; the best rate is the one with the lowest mean Alice loss
(authorship: highest mean accuracy, ties to the lower loss at the label position).
`compare_text.METHODS` holds the chosen rates and, as each grid, every rate tried here
(`test_compare_text.py` checks both against this sweep's `results.json`).

## Chosen rates

{choice_table(chosen)}

"seed diff.": the largest difference between seeds 0 and 1 at the best two rates.

""" + "".join(f"- {w}\n" for w in edge_sentences(chosen) + seed_sentences(chosen)
              + noise_sentences(chosen, meta.get("seed_noise", {}))) + """
## Prompt tuning's start

""" + "".join(f"- {w}\n" for w in prompt_sentences(results, starts)) + (
        "" if not diverged else "\n## Diverged\n\n" + "".join(
            f"- {r['kind']} {r['method']} lr {r['lr']:g} seed {r['seed']}: {r['diverged']}\n"
            for r in diverged)) + text_sweep_configs.readme_section(configs) + f"""
## Every rate

```
{table}
```

```
{ctable}
```
"""
    atomic_write_text(os.path.join(out, "README.md"), text)
    from report import write_csv
    write_csv(os.path.join(out, "chosen.csv"), chosen)
    return chosen


def main(methods, settings, base_dir, out, workers, command, resume=False, run_more=True):
    """The sweep, its files and its README (``text_sweep.py``). ``resume``: keep
    the runs an interrupted sweep logged in ``out/progress.jsonl`` (same settings assumed;
    the time then counts this part only)."""
    import text_report as tr
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "progress.jsonl")          # removed once the results are written
    done = logged_runs(log, resume)
    start, load_before = time.perf_counter(), os.getloadavg()
    cpu_start, children_start = time.process_time(), jobs._children_cpu()
    base = ct.base_measurement((base_dir, settings.eval_windows, settings.window))
    starts = start_losses(base_dir, settings)
    rows = sweep(methods, settings, base_dir, workers, log, done) if run_more else done
    new = [r for r in rows if not any(r is d for d in done)]
    timing = timing_record(command, workers, new, start, load_before, cpu_start, children_start)
    ok = [r for r in rows if not r.get("diverged")]
    tr.write_text_results(ok, base, out, command=command, timing=timing, settings=settings,
                          methods={**ct.METHODS, **ct.SWEEP_VARIANTS}, sweep=True, sample=ct.SAMPLE)
    path = os.path.join(out, "results.json")
    with open(path) as f:
        results = json.load(f)
    results["diverged"] = [r for r in rows if r.get("diverged")]
    results["meta"]["workers"], results["meta"]["prompt_starts"] = workers, starts
    results["meta"]["seed_noise"] = seed_noise()
    atomic_write_text(path, json.dumps(results, indent=1))
    chosen = write_sweep_readme(results, out, text_sweep_configs.load_configs(out))
    os.remove(log)
    for c in chosen:
        print(f"{c['task']:<8} {c['method']:<18} lr {c['lr']:g}  tried {c['rates']}"
              + ("  EDGE" if c["edge"] else ""))
    return results


def cli(argv=None):
    """The command line: ``compare_text.parse_args``'s options (a partial or quick sweep
    writes under results/text_quick/), plus ``--resume``, ``--readme`` and ``--finish``."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    a = ct.parse_args(["--lr-sweep"] + [x for x in argv if x not in ("--readme", "--finish", "--configs")])
    command = " ".join(["python code/stage-09/text_sweep.py"] + argv)
    if "--finish" in argv:           # an interrupted sweep's runs, nothing more run
        return main(a.methods, a.settings, a.base, a.out, a.workers, command, resume=True,
                    run_more=False)
    if "--configs" in argv:          # the rank-sweep and low-data configurations only
        record = text_sweep_configs.main(a.methods, a.settings, a.base, a.out, a.workers, command,
                                         resume=a.resume)
        headline = os.path.join(a.out, "results.json")
        if os.path.exists(headline):   # the README covers both parts
            with open(headline) as f:
                write_sweep_readme(json.load(f), a.out, record)
        return record
    if "--readme" in argv:
        with open(os.path.join(a.out, "results.json")) as f:
            write_sweep_readme(json.load(f), a.out, text_sweep_configs.load_configs(a.out))
        return print(f"wrote {os.path.join(a.out, 'README.md')}")
    return main(a.methods, a.settings, a.base, a.out, a.workers, command, resume=a.resume)


if __name__ == "__main__":
    cli()
