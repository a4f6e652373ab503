"""The learning-rate sweeps' engine: which runs a choice still needs, and a pool that runs them.

``text_sweep.py`` (the headline rates) and ``text_sweep_configs.py`` (the rank-sweep and
low-data configurations) both drive ``sweep``; each key ``(kind, method, rank, fraction)``
is extended by ``next_runs`` until its choice is settled (the rule is in ``text_sweep.py``'s
docstring). This module knows nothing of READMEs or command lines.
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
from compare import LR_LADDER, beyond_edges
from pretrain import machine

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
