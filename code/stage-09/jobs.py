"""One pool for the main job: every run of both comparisons, longest first, cost recorded.

``make run`` is two comparisons (``compare.py`` on the digit tasks, ``compare_text.py``
on real text). Run one after the other, each with its own pool of two workers, the
last long run of each leaves one core idle while it finishes. Here both share ONE
pool: every run (and each comparison's measurement of its base model) is a task,
the tasks are submitted longest first by an estimated cost, and a worker that
finishes takes the next one. That is the "longest processing time first" rule
(Graham 1969): with many short tasks at the end, both cores stay busy until the
last minute. Each comparison still runs alone through the same code
(``run_jobs([one_job])``).

Every row gets what its run cost: ``cpu_s`` (``time.process_time`` in the worker,
one BLAS thread each) and ``wall_s``. The job's record (``timing``) adds the wall
minutes, the CPU minutes of every process (parent and workers, start-up included),
the load average before and after, the machine, and a **projection** of the wall
time on idle cores: the measured CPU seconds replayed through the same schedule
(each task to the first free worker, in submission order), plus everything that
was not a run (start-up, the parent's work) counted as if nothing ran beside it.
On a busy machine the wall time says more about the neighbours than about the job;
the CPU seconds and the projection do not.
"""
from __future__ import annotations

import heapq
import json
import multiprocessing as mp
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from pretrain import machine


@dataclass
class Job:
    """One comparison's share of a run.

    ``run(spec) -> row`` and ``base(base_arg) -> dict`` are module-level functions (the
    workers are fresh interpreters and import them); ``cost(spec)`` estimates a run's
    CPU seconds (it only orders the tasks); ``finish(rows, base, timing)`` writes the
    results in the parent once every task has returned. ``log``: a file that collects
    each finished run as a JSON line while the job runs (a job that dies keeps what it
    measured); removed once ``finish`` has written the results."""
    name: str
    run: object
    specs: list
    cost: object
    base: object
    base_arg: object
    base_cost: float
    finish: object
    log: str | None = None
    rows: list = field(default_factory=list)


def timed(fn, arg) -> dict:
    """``fn(arg)`` with its CPU and wall seconds added (run in the worker)."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn(arg)
    return {**out, "cpu_s": round(time.process_time() - cpu, 3),
            "wall_s": round(time.perf_counter() - wall, 3)}


def longest_first(costs) -> list[int]:
    """Task indices in submission order: largest estimated cost first (ties: plan order)."""
    return sorted(range(len(costs)), key=lambda i: (-costs[i], i))


def list_schedule(durations, workers) -> float:
    """Makespan of ``durations`` handed, in this order, each to the first free worker."""
    free = [0.0] * workers
    for d in durations:
        heapq.heapreplace(free, free[0] + d)
    return max(free)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)   # reaped workers only
    return usage.ru_utime + usage.ru_stime


def execute(calls, costs, workers, progress=True, desc="runs", on_result=None):
    """``[timed(fn, arg) for fn, arg in calls]``, ``workers`` at a time, longest first.

    Returns the results in the order of ``calls`` and their CPU seconds in the order
    they were submitted; ``on_result(i, result)`` sees each as it arrives (a long job
    that dies keeps what it wrote)."""
    from tqdm import tqdm
    order = longest_first(costs)
    out = [None] * len(calls)
    bar = tqdm(total=len(calls), disable=not progress, desc=desc)

    def done(i, result):
        out[i] = result
        if on_result:
            on_result(i, result)
        bar.update()

    if workers == 1:
        for i in order:
            done(i, timed(*calls[i]))
    else:
        # "spawn": a fresh interpreter per worker (a forked child would inherit dead
        # thread pools and locks from the parent)
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(timed, *calls[i]): i for i in order}
            try:
                for f in as_completed(futures):
                    done(futures[f], f.result())
            except BaseException:          # a failed run (or Ctrl-C): drop the queued ones
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    bar.close()
    return out, [out[i]["cpu_s"] for i in order]


def _tasks(jobs):
    """Every job's base measurement and runs: ``calls``, ``costs`` and each one's
    ``(job index, run index or None for the base)``."""
    calls, costs, owner = [], [], []
    for j, job in enumerate(jobs):
        calls.append((job.base, job.base_arg))
        costs.append(job.base_cost)
        owner.append((j, None))
        for k, spec in enumerate(job.specs):
            calls.append((job.run, spec))
            costs.append(job.cost(spec))
            owner.append((j, k))
    return calls, costs, owner


def run_jobs(jobs, workers=2, command="", progress=True) -> dict:
    """Run every task of ``jobs`` in one pool, then ``finish`` each job; returns ``timing``
    (its wall time runs from here to the last run's end: writing the tables and plots
    afterwards is not in it)."""
    load_before, start = os.getloadavg(), time.perf_counter()
    cpu_start, children_start = time.process_time(), _children_cpu()
    calls, costs, owner = _tasks(jobs)
    for job in jobs:
        job.rows = []
        if job.log and os.path.exists(job.log):
            os.remove(job.log)

    def record(i, row):
        log = jobs[owner[i][0]].log
        if log and owner[i][1] is not None:
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")

    results, cpu_in_order = execute(calls, costs, workers, progress, desc="runs", on_result=record)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start + _children_cpu() - children_start
    outside = max(cpu - sum(r["cpu_s"] for r in results), 0.0)     # start-up, the parent
    bases = {}
    for (j, k), result in zip(owner, results):
        if k is None:
            bases[j] = result
        else:
            jobs[j].rows.append(result)
    timing = {"command": command, "machine": machine(), "workers": workers,
              "wall_minutes": round(wall / 60, 2), "cpu_minutes": round(cpu / 60, 2),
              "projected_idle_minutes": round((list_schedule(cpu_in_order, workers) + outside) / 60, 2),
              "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()],
              "parts": {job.name: {"runs": len(job.rows), "run_cpu_minutes": round(
                  sum(r["cpu_s"] for r in job.rows) / 60, 2)} for job in jobs}}
    for j, job in enumerate(jobs):
        job.finish(job.rows, bases[j], timing)
        if job.log and os.path.exists(job.log):
            os.remove(job.log)
    return timing


def job_meta(command, timing) -> dict:
    """The ``meta`` fields every results.json of the main job shares (``jobs.run_jobs``'s
    ``timing`` under ``job``; ``minutes``, ``machine`` and ``load_average`` kept at the
    top, where the notebooks read them)."""
    return {"command": command, "machine": timing["machine"], "minutes": timing["wall_minutes"],
            "load_average": timing["load_before"] + timing["load_after"], "job": timing}


def job_sentence(timing) -> str:
    """What the job cost, in words, from its ``timing`` record (nothing retyped)."""
    parts = " and ".join(f"{p['runs']} {name} runs ({p['run_cpu_minutes']:.1f} CPU min)"
                         for name, p in timing["parts"].items())
    return (f"`{timing['command']}` ran {parts}, {timing['workers']} at a time in one pool, "
            f"in {timing['wall_minutes']:.1f} min of wall time on {timing['machine']} (load average "
            f"{timing['load_before'][0]:.2f} before, {timing['load_after'][0]:.2f} after); "
            f"{timing['cpu_minutes']:.1f} CPU minutes in all, which on {timing['workers']} idle "
            f"cores projects to {timing['projected_idle_minutes']:.1f} min")


# ---- the runners' shared command-line rules ---------------------------------------
def method_list(text: str, known) -> list:
    """``--methods a,b`` as a list; a name not in ``known`` stops the run, naming the choices."""
    methods = text.split(",")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(known)}")
    return methods


def output_dir(out, full: bool, lr_sweep: bool, results_dir: str, quick_dir: str) -> str:
    """Where a comparison's results go: only a full run may write the committed
    ``results_dir`` (or its ``lr_sweep/``); by default anything else goes to ``quick_dir``."""
    sweep_dir = os.path.join(results_dir, "lr_sweep")
    if out is None:
        return (sweep_dir if lr_sweep else results_dir) if full else \
            os.path.join(quick_dir, "lr_sweep" if lr_sweep else "")
    if not full and os.path.realpath(out) in {os.path.realpath(results_dir), os.path.realpath(sweep_dir)}:
        raise SystemExit(f"--out {out}: a quick or partial run may not overwrite the committed "
                         f"full results; leave --out unset (it writes to {quick_dir})")
    return out
