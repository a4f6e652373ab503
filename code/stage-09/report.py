"""Tables and plots of the comparison runner's measurements (``compare.py``).

``aggregate`` turns per-run rows into one row per (method, task, rank) with the
mean and standard deviation over seeds; ``write_results`` prints the table and
writes ``runs.csv``, ``summary.csv``, ``results.json``, the PNG plots and a
README naming the command and the machine.
"""
from __future__ import annotations

import csv
import json
import os
from collections import defaultdict

import numpy as np

from checkpoint import atomic_write_text

MEAN_FIELDS = ("test_accuracy", "validation_accuracy", "pretrain_accuracy", "ce_rise", "disabled_accuracy",
               "disabled_ce_rise", "final_loss")


def aggregate(rows, base):
    groups = defaultdict(list)
    for r in rows:
        r = dict(r)
        r["ce_rise"] = r["pretrain_ce"] - base["pretrain_ce"]
        r["disabled_ce_rise"] = r["disabled_ce"] - base["pretrain_ce"]
        groups[(r["method"], r["task"], r["rank"], r["lr"])].append(r)
    summary = []
    for (method, task, rank, lr), rs in groups.items():
        s = {"method": method if rank is None else f"lora_r{rank}", "task": task, "rank": rank,
             "lr": lr, "seeds": len(rs), "trainable_params": rs[0]["trainable_params"],
             "trainable_pct": rs[0]["trainable_pct"],
             "step_ms": float(np.median([r["step_ms"] for r in rs])),
             "trainable_state_bytes": rs[0]["trainable_state_bytes"],
             "adapter_bytes": rs[0]["adapter_bytes"]}
        for f in (f for f in MEAN_FIELDS if f in rs[0]):
            values = [r[f] for r in rs]
            s[f], s[f + "_std"] = float(np.mean(values)), float(np.std(values))
        summary.append(s)
    return summary


def format_table(summary, base) -> str:
    head = (f"{'method':<11} {'task':<10} {'lr':>6} {'trainable':>9} {'%':>7} {'test acc':>13} "
            f"{'pretrain acc':>12} {'CE rise':>8} {'disabled':>8} {'ms/step':>7} "
            f"{'state KB':>8} {'file KB':>8}")
    lines = [f"base model on the pretraining tasks: accuracy {base['pretrain_accuracy']:.3f}, "
             f"answer cross-entropy {base['pretrain_ce']:.4f}", head, "-" * len(head)]
    for s in sorted(summary, key=lambda s: (s["task"], s["trainable_params"])):
        lines.append(
            f"{s['method']:<11} {s['task']:<10} {s['lr']:>6.0e} {s['trainable_params']:>9,} {s['trainable_pct']:>7.3f} "
            f"{s['test_accuracy']:>6.3f}±{s['test_accuracy_std']:.3f} {s['pretrain_accuracy']:>12.3f} "
            f"{s['ce_rise']:>8.3f} {s['disabled_accuracy']:>8.3f} {s['step_ms']:>7.1f} "
            f"{s['trainable_state_bytes'] / 1024:>8.1f} {s['adapter_bytes'] / 1024:>8.1f}")
    lines.append("test acc: mean±std over seeds; pretrain acc / CE rise: the pretraining tasks "
                 "with the adapter active; disabled: the same tasks with the adapter disabled")
    return "\n".join(lines)


def write_csv(path, rows):
    if not rows:
        return
    fields = list(rows[0])
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def plot_results(summary, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({s["task"] for s in summary})
    methods = [s for s in summary if s["rank"] is None]
    names = sorted({s["method"] for s in methods})
    color = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(names)}
    # labels of methods with equal x (LoRA, QLoRA, DoRA) would overprint: stagger them
    offset = {m: (4, 10 * ((i % 4) - 1.5)) for i, m in enumerate(names)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for s in (s for s in methods if s["task"] == task):
            ax.errorbar(s["trainable_params"], s["test_accuracy"], yerr=s["test_accuracy_std"],
                        fmt="o", capsize=3, color=color[s["method"]])
            ax.annotate(s["method"], (s["trainable_params"], s["test_accuracy"]), fontsize=8,
                        xytext=offset[s["method"]], textcoords="offset points",
                        color=color[s["method"]])
        ax.set_xscale("log")
        ax.set(title=task, xlabel="trainable parameters (log)", ylabel="test exact match")
        ax.set_ylim(-0.05, 1.05)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_params.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for s in (s for s in methods if s["task"] == task):
            ax.scatter(s["test_accuracy"], s["ce_rise"], color=color[s["method"]])
            ax.annotate(s["method"], (s["test_accuracy"], s["ce_rise"]), fontsize=8,
                        xytext=offset[s["method"]], textcoords="offset points",
                        color=color[s["method"]])
        ax.set(title=task, xlabel="downstream test exact match",
               ylabel="pretraining-task cross-entropy rise (nats)")
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "forgetting_vs_accuracy.png"), dpi=110)
    plt.close(fig)

    sweep = sorted((s for s in summary if s["rank"] is not None or s["method"] == "lora_all"),
                   key=lambda s: s["rank"] or 8)
    sweep_task = next((s["task"] for s in summary if s["rank"] is not None), None)
    sweep = [s for s in sweep if s["task"] == sweep_task]
    if len(sweep) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        r = [s["rank"] or 8 for s in sweep]
        ax.errorbar(r, [s["test_accuracy"] for s in sweep],
                    yerr=[s["test_accuracy_std"] for s in sweep], fmt="o-", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set(title=f"LoRA rank sweep on {sweep_task} (every linear)", xlabel="rank r",
               ylabel="test exact match")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "rank_sweep.png"), dpi=110)
        plt.close(fig)


def write_results(rows, base, out, command, machine, seconds, plots=True):
    os.makedirs(out, exist_ok=True)
    summary = aggregate(rows, base)
    table = format_table(summary, base)
    print(table)
    print(f"\n{len(rows)} runs in {seconds / 60:.1f} min on {machine}")
    write_csv(os.path.join(out, "runs.csv"), rows)
    write_csv(os.path.join(out, "summary.csv"), summary)
    meta = {"command": command, "machine": machine, "minutes": round(seconds / 60, 2),
            "base": base}
    atomic_write_text(os.path.join(out, "results.json"),
                      json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=1))
    if plots:
        plot_results(summary, out)
    atomic_write_text(os.path.join(out, "README.md"),
                      f"# Comparison results\n\nMade by `{command}` in {seconds / 60:.1f} minutes on "
                      f"{machine}.\n\n```\n{table}\n```\n\nPlots: `accuracy_vs_params.png`, "
                      f"`forgetting_vs_accuracy.png`, `rank_sweep.png`.\n")
    return summary


def choose_learning_rates(summary):
    """Per (method, task): the rate with the best *validation* accuracy; ties go to
    the lowest rise of the pretraining tasks' cross-entropy. Returns rows
    ``{method, task, lr, validation_accuracy, ce_rise, edge}`` (``edge``: the winner
    is the smallest or largest rate tried, so the grid may not bracket the best)."""
    groups = defaultdict(list)
    for s in summary:
        groups[(s["method"], s["task"])].append(s)
    chosen = []
    for (method, task), rows in sorted(groups.items()):
        best = max(rows, key=lambda s: (s["validation_accuracy"], -s["ce_rise"]))
        rates = sorted(s["lr"] for s in rows)
        chosen.append({"method": method, "task": task, "lr": best["lr"],
                       "validation_accuracy": best["validation_accuracy"],
                       "ce_rise": best["ce_rise"],
                       "edge": best["lr"] in (rates[0], rates[-1])})
    return chosen


def format_choice(summary, chosen) -> str:
    """One line per (method, task): the chosen rate, then validation accuracy per rate."""
    acc = {(s["method"], s["task"], s["lr"]): s["validation_accuracy"] for s in summary}
    lines = []
    for c in chosen:
        cells = "  ".join(f"{lr:g}:{a:.3f}" for (m, t, lr), a in sorted(acc.items())
                          if (m, t) == (c["method"], c["task"]))
        lines.append(f"{c['method']:<11} {c['task']:<10} lr {c['lr']:<6g} "
                     f"{'(edge of grid) ' if c['edge'] else ''}  {cells}")
    return "\n".join(lines)


def write_sweep(rows, base, out, command, machine, seconds):
    """The validation sweep: ``runs.csv``, ``sweep.csv`` (per rate), ``chosen.csv``
    (the table ``compare.learning_rate`` reads) and a README with the choice."""
    os.makedirs(out, exist_ok=True)
    summary = aggregate(rows, base)
    chosen = choose_learning_rates(summary)
    text = format_choice(summary, chosen)
    print(text)
    write_csv(os.path.join(out, "runs.csv"), rows)
    write_csv(os.path.join(out, "sweep.csv"), summary)
    write_csv(os.path.join(out, "chosen.csv"), chosen)
    atomic_write_text(os.path.join(out, "README.md"), f"""# Learning rates chosen on the validation split

Made by `{command}` in {seconds / 60:.1f} minutes on {machine}.

Every method was trained on every downstream task (seed 0, the comparison's steps, batch and
training set) at five learning rates a half-decade apart, centred on the single rate the method
used before (`compare.METHODS[...].sweep_centre`), and scored on each task's **validation split**
(`tasks.validation_set`: digit strings disjoint from the training data and from the test sets).
Per method and per task, the rate with the best validation accuracy wins; ties go to the rate
that raises the pretraining tasks' cross-entropy least. No test set is looked at here.

`chosen.csv` is the table `compare.py` (and every notebook, through `compare.run_spec`) trains
with; `sweep.csv` has every rate's measurements, `runs.csv` the raw runs. "edge of grid" marks a
winner at the smallest or largest rate tried.

```
{text}
```
""")
    return chosen


def replot(results_dir):
    """Redraw the PNGs from a ``results.json`` (no training)."""
    with open(os.path.join(results_dir, "results.json")) as f:
        plot_results(json.load(f)["summary"], results_dir)


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["--replot"]:
        replot(sys.argv[2])
        raise SystemExit
    with open(sys.argv[1]) as f:        # a sweep.csv: redo the choice
        rows = [{k: (float(v) if k in ("lr", "validation_accuracy", "ce_rise") else v)
                 for k, v in r.items()} for r in csv.DictReader(f)]
    print(format_choice(rows, choose_learning_rates(rows)))
