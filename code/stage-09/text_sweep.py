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

One pool of ``workers`` processes serves both tasks: a method's next runs are queued as
soon as its previous ones are in, so neither core waits for a whole round; Alice's runs go
first, and a widened grid's run before the remaining first grids.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

import numpy as np

import compare_text as ct
import jobs
from checkpoint import atomic_write_text, load_model
from compare import LR_LADDER, beyond_edges
from pretrain import machine
from text import lm_loss

SEEDS = {"adapt": (0,),                # Alice: one seed (the README sets gaps against noise)
         "classify": (0, 1)}            # authorship, 200 snippets: the best two get a second
KINDS = ("adapt", "classify")          # Alice's language model, the authorship task


def grid(kind, method, rank=8, fraction=1.0):
    """A (task, method)'s starting rates; a rank-sweep or low-data configuration's
    (``text_sweep_configs.py``): ``config_grid`` around the method's headline rate."""
    spec = ct.method_spec(method)
    if (rank, fraction) != (8, 1.0):
        return config_grid(spec.lr)
    return tuple(spec.lr_grid if kind == "adapt" else spec.classify_lr_grid)


def config_grid(lr) -> tuple:
    """``{lr / 3, lr, 3 lr}`` on ``LR_LADDER`` (clipped at its ends)."""
    i = LR_LADDER.index(lr)
    return LR_LADDER[max(0, i - 1):i + 2]


def key_of(row) -> tuple:
    """A run's sweep key: ``(kind, method, rank, fraction)``."""
    return row["kind"], row["method"], row.get("rank", 8), row.get("fraction", 1.0)


def score(kind, rows) -> tuple:
    """Sort key of one rate's runs (lower is better): means over its seeds."""
    if any(r.get("diverged") for r in rows):
        return (math.inf, math.inf)
    if kind == "adapt":
        return (float(np.mean([r["alice_loss"] for r in rows])),
                float(np.mean([r["shakespeare_loss"] for r in rows])))
    return (-float(np.mean([r["accuracy"] for r in rows])),
            float(np.mean([r["label_loss"] for r in rows])))


def by_rate(rows) -> dict:
    out = defaultdict(list)
    for r in rows:
        out[r["lr"]].append(r)
    return out


def next_runs(kind, method, rows, rates, seeds=None) -> list:
    """``[(lr, seed), ...]`` still to run for ``(kind, method)`` given its finished ``rows``
    and its starting ``rates``; ``[]`` when its choice is settled (see the module's rule)."""
    seeds = SEEDS[kind] if seeds is None else seeds
    done = by_rate(rows)
    missing = [(lr, seeds[0]) for lr in rates if lr not in done]
    if missing:
        return missing
    ranked = sorted(done, key=lambda lr: score(kind, done[lr]))
    edge = beyond_edges([{"method": method, "task": kind, "lr": ranked[0]}],
                        {(method, kind, lr) for lr in done})
    if edge:
        return [(edge[0][2], seeds[0])]
    return [(lr, s) for lr in ranked[:2] if not any(r.get("diverged") for r in done[lr])
            for s in seeds if s not in {r["seed"] for r in done[lr]}]


def run_spec(kind, method, lr, seed, s, base_dir, rank=8, fraction=1.0) -> ct.RunSpec:
    if kind == "adapt":
        return ct.RunSpec(method, seed, s.steps, s.batch_size, s.eval_windows, lr, window=s.window,
                          rank=rank, fraction=fraction, base_dir=base_dir, split="validation")
    return ct.RunSpec(method, seed, s.classify_steps, s.batch_size, s.eval_windows, lr,
                      kind="classify", base_dir=base_dir, split="validation",
                      n_train=s.classify_train, n_test=s.classify_validation)


def run_or_diverge(spec) -> dict:
    """``compare_text.run``; a run whose training diverges comes back marked, not raised."""
    try:
        return ct.run(spec)
    except FloatingPointError as e:
        return {"kind": spec.kind, "method": spec.method, "rank": spec.rank,
                "fraction": spec.fraction, "seed": spec.seed, "lr": spec.lr, "split": spec.split,
                "diverged": str(e)}


class _InProcess:
    """``workers=1``: the same loop, every run in this process (tests, debugging)."""

    def submit(self, fn, *args):
        f = Future()
        f.set_result(fn(*args))
        return f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def sweep(methods, settings, base_dir, workers=2, log=None, done=(), keys=None) -> list:
    """Every run of the sweep (rows of ``compare_text.run``), each key (``key_of``: by
    default every (task, method) at rank 8 on all of Alice) extended by ``next_runs``
    until settled; ``done``: rows of an interrupted sweep to keep."""
    if keys is None:
        variants = [v for v in ct.SWEEP_VARIANTS if any(v.startswith(m + "_") for m in methods)]
        keys = ([("adapt", m, 8, 1.0) for m in methods + variants]
                + [("classify", m, 8, 1.0) for m in methods])
    rows = {k: [r for r in done if key_of(r) == k] for k in keys}
    pool = (_InProcess() if workers == 1 else
            ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")))
    waiting, pending, order = [], {}, iter(range(10 ** 9))
    with pool:
        def queue(key):
            """Queue ``key``'s next runs: Alice before authorship, a widened grid's or an
            extra seed's run before the first grids' (they decide a choice sooner)."""
            for lr, seed in next_runs(key[0], key[1], rows[key], grid(*key)):
                first = lr in grid(*key) and seed == 0
                waiting.append(((KINDS.index(key[0]), first, next(order)), key, lr, seed))

        def submit():                   # at most ``workers`` runs in flight: the queue decides
            while waiting and len(pending) < workers:
                waiting.sort()
                _, key, lr, seed = waiting.pop(0)
                spec = run_spec(key[0], key[1], lr, seed, settings, base_dir, *key[2:])
                pending[pool.submit(jobs.timed, run_or_diverge, spec)] = key

        for key in keys:
            queue(key)
        submit()
        while pending:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for f in finished:
                key = pending.pop(f)
                row = f.result()
                rows[key].append(row)
                note(row, log)
                if key not in pending.values() and not any(w[1] == key for w in waiting):
                    queue(key)
            submit()
    return [r for k in keys for r in rows[k]]


def note(row, log):
    what = ("diverged" if row.get("diverged") else f"Alice {row['alice_loss']:.4f}"
            if row["kind"] == "adapt" else f"accuracy {row['accuracy']:.3f}")
    where = ("" if key_of(row)[2:] == (8, 1.0) else
             f" r={row.get('rank', 8)} fraction {row.get('fraction', 1.0):g}")
    print(f"{row['kind']:<8} {row['method']:<18}{where} lr {row['lr']:<7g} seed {row['seed']}: "
          f"{what}", flush=True)
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({k: v for k, v in row.items() if k != "sample"}) + "\n")


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
    from text_sweep_configs import readme_section
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
            for r in diverged)) + readme_section(configs) + f"""
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
    from text_sweep_configs import load_configs
    chosen = write_sweep_readme(results, out, load_configs(out))
    os.remove(log)
    for c in chosen:
        print(f"{c['task']:<8} {c['method']:<18} lr {c['lr']:g}  tried {c['rates']}"
              + ("  EDGE" if c["edge"] else ""))
    return results


def logged_runs(log, resume) -> list:
    """The rows an interrupted sweep logged in ``log`` if ``resume``, else none (and no log)."""
    if resume and os.path.exists(log):
        with open(log) as f:
            return [json.loads(line) for line in f if line.strip()]
    if os.path.exists(log):
        os.remove(log)
    return []


def timing_record(command, workers, new, start, load_before, cpu_start, children_start) -> dict:
    """A sweep's time, as ``jobs.run_jobs`` records the main job's (``new``: its runs)."""
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start + jobs._children_cpu() - children_start
    run_cpu = [r.get("cpu_s", 0.0) for r in new]
    return {"command": command, "machine": machine(), "workers": workers,
            "wall_minutes": round(wall / 60, 2), "cpu_minutes": round(cpu / 60, 2),
            "projected_idle_minutes": round((jobs.list_schedule(run_cpu, workers)
                                             + max(cpu - sum(run_cpu), 0.0)) / 60, 2),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "parts": {"sweep": {"runs": len(new), "run_cpu_minutes": round(sum(run_cpu) / 60, 2)}}}


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
        import text_sweep_configs
        return text_sweep_configs.main(a.methods, a.settings, a.base, a.out, a.workers, command,
                                       resume=a.resume)
    if "--readme" in argv:
        from text_sweep_configs import load_configs
        with open(os.path.join(a.out, "results.json")) as f:
            write_sweep_readme(json.load(f), a.out, load_configs(a.out))
        return print(f"wrote {os.path.join(a.out, 'README.md')}")
    return main(a.methods, a.settings, a.base, a.out, a.workers, command, resume=a.resume)


if __name__ == "__main__":
    cli()
