"""What the main job (``make run``) costs: a sample of its runs timed, the whole job projected.

    python bench/job_costs.py           # time a sample (about 6 min on 2 idle cores), project
    python bench/job_costs.py --plan    # no runs: project from the constants in the code

The main job (``code/stage-09/main_job.py``) hands its runs out longest first by the
estimates of ``compare.estimated_cpu_s`` and ``compare_text.estimated_cpu_s``, whose
constants (``RUN_CPU_S`` and friends) come from here. The sample is one run of each
kind at the job's own sizes, in the job's own pool (``jobs.execute``, 2 workers, one
BLAS thread each): every digit method on the rank sweep's task, ``lora_all`` on the
other tasks and at ranks 1 and 32; every text method on *Alice*, LoRA at r=64 (q,v and
every linear), three authorship runs; and both bases' measurements. From their CPU
seconds it fits the constants (printed, to paste into the code), then replays the
whole planned job through the same schedule on 2 workers: the projected wall time on
2 idle cores, plus the CPU spent outside the runs (start-up), counted as serial.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

STAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "code", "stage-09")
if STAGE not in sys.path:
    sys.path.insert(0, STAGE)

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import compare  # noqa: E402
import compare_text as ct  # noqa: E402
import jobs  # noqa: E402
import main_job  # noqa: E402
from pretrain import machine  # noqa: E402


def sample_calls():
    """``[(label, fn, arg)]``: one run of each kind the job makes, at the job's sizes."""
    task, other_tasks = compare.DOWNSTREAM_TASKS[0], compare.DOWNSTREAM_TASKS[1:]
    calls = [(("digits", m, task, None), compare.run, compare.RunSpec(m, task, 0))
             for m in compare.METHODS]
    calls += [(("digits", "lora_all", t, None), compare.run, compare.RunSpec("lora_all", t, 0))
              for t in other_tasks]
    calls += [(("digits", "lora_all", task, r), compare.run, compare.RunSpec("lora_all", task, 0, rank=r))
              for r in (1, 32)]
    calls.append((("digits", "base"), compare.base_metrics, compare.RunSpec.n_forget))
    s = ct.SETTINGS
    text = {r.method: r for r in ct.plan(s, list(ct.METHODS), classify=False)
            if r.seed == 0 and r.rank == 8 and r.fraction == 1.0}
    calls += [(("text", m, 8), ct.run, spec) for m, spec in text.items()]
    calls += [(("text", m, 64), ct.run, ct.replace(text[m], rank=64)) for m in ("lora_qv", "lora_all")]
    classify = {r.method: r for r in ct.plan(s, list(ct.METHODS)) if r.kind == "classify"}
    calls += [(("classify", m), ct.run, classify[m]) for m in ("full", "lora_all", "prompt")]
    calls.append((("text", "base"), ct.base_measurement, (ct.TEXT_BASE_DIR, s.eval_windows, s.window)))
    return calls


def fit(cpu):
    """The cost constants of both runners from the sample's CPU seconds ``{label: s}``."""
    task = compare.DOWNSTREAM_TASKS[0]
    d = {"RUN_CPU_S": {m: cpu[("digits", m, task, None)] for m in compare.METHODS}}
    ref = cpu[("digits", "lora_all", task, None)]
    d["TASK_COST"] = {t: cpu[("digits", "lora_all", t, None)] / ref for t in compare.DOWNSTREAM_TASKS}
    d["RANK_SLOPE"] = (cpu[("digits", "lora_all", task, 32)] - cpu[("digits", "lora_all", task, 1)]) / 31 / ref
    d["BASE_CPU_S"] = cpu[("digits", "base")]
    t = {"RUN_CPU_S": {m: cpu[("text", m, 8)] for m in ct.METHODS}}
    t["RANK_SLOPE"] = sum(cpu[("text", m, 64)] / cpu[("text", m, 8)] - 1
                          for m in ("lora_qv", "lora_all")) / 2 / 56
    t["CLASSIFY_COST"] = sum(cpu[k] / cpu[("text", k[1], 8)] for k in cpu if k[0] == "classify") / 3
    t["BASE_CPU_S"] = cpu[("text", "base")]
    return d, t


def apply(constants, module):
    for name, value in constants.items():
        setattr(module, name, value)


def projection(workers=2, overhead_s=0.0):
    """``(minutes, cpu minutes, runs per part)`` of the planned full job by the estimates."""
    digits, text = main_job.parts(quick=False, workers=workers)
    costs = [compare.BASE_CPU_S, ct.BASE_CPU_S]
    d_specs = compare.plan(digits.methods, digits.tasks, digits.seeds, digits.steps)
    t_specs = ct.plan(text.settings, text.methods)
    costs += [compare.estimated_cpu_s(s) for s in d_specs] + [ct.estimated_cpu_s(s) for s in t_specs]
    order = sorted(costs, reverse=True)
    wall = jobs.list_schedule(order, workers) + overhead_s
    return wall / 60, (sum(costs) + overhead_s) / 60, (len(d_specs), len(t_specs))


def fmt(constants):
    return "\n".join(f"{k} = " + (repr({m: round(v, 1) for m, v in c.items()}) if isinstance(c, dict)
                                  and k == "RUN_CPU_S" else repr({m: round(v, 2) for m, v in c.items()})
                                  if isinstance(c, dict) else repr(round(c, 4)))
                     for k, c in constants.items())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", action="store_true", help="no runs: project from the code's constants")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    overhead = 0.0
    if not a.plan:
        calls = sample_calls()
        load, start = os.getloadavg(), time.perf_counter()
        cpu0 = time.process_time() + jobs._children_cpu()
        rows, _ = jobs.execute([(fn, arg) for _, fn, arg in calls],
                               [0 if lab[-1] == "base" else 1 for lab, _, _ in calls], a.workers)
        total = time.process_time() + jobs._children_cpu() - cpu0
        cpu = {lab: r["cpu_s"] for (lab, _, _), r in zip(calls, rows)}
        overhead = max(total - sum(cpu.values()), 0.0)
        for (lab, _, _), r in zip(calls, rows):
            print(f"{' '.join(map(str, lab)):<34} cpu {r['cpu_s']:7.1f} s  wall {r['wall_s']:7.1f} s")
        print(f"sample: {len(calls)} tasks, {(time.perf_counter() - start) / 60:.1f} min wall, "
              f"{total / 60:.1f} CPU min ({overhead:.1f} s outside the runs); load average "
              f"{load[0]:.2f} before, {os.getloadavg()[0]:.2f} after; {machine()}")
        d, t = fit(cpu)
        print(f"\n# compare.py\n{fmt(d)}\n# compare_text.py\n{fmt(t)}\n")
        apply(d, compare)
        apply(t, ct)
    wall, cpu_min, (n_digits, n_text) = projection(a.workers, overhead)
    print(f"the full job: {n_digits} digit runs + {n_text} text runs, {cpu_min:.1f} CPU min; "
          f"projected {wall:.1f} min on {a.workers} idle cores")


if __name__ == "__main__":
    main()
