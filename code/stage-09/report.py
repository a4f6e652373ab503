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

import jobs
from checkpoint import atomic_write_text

MEAN_FIELDS = ("test_accuracy", "validation_accuracy", "pretrain_accuracy", "ce_rise", "disabled_accuracy",
               "disabled_ce_rise", "final_loss")


def aggregate(rows, base):
    groups = defaultdict(list)
    for r in rows:
        r = dict(r)
        r["ce_rise"] = r["pretrain_ce"] - base["pretrain_ce"]
        if "disabled_ce" in r:                      # (sweep runs measure less)
            r["disabled_ce_rise"] = r["disabled_ce"] - base["pretrain_ce"]
        groups[(r["method"], r["task"], r["rank"], r["lr"])].append(r)
    summary = []
    for (method, task, rank, lr), rs in groups.items():
        s = {"method": method if rank is None else f"lora_r{rank}", "task": task, "rank": rank,
             "lr": lr, "seeds": len(rs), "trainable_params": rs[0]["trainable_params"],
             "trainable_pct": rs[0]["trainable_pct"],
             "step_ms": float(np.median([r["step_ms"] for r in rs])),
             "trainable_state_bytes": rs[0]["trainable_state_bytes"],
             "adapter_bytes": rs[0].get("adapter_bytes")}
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


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_csv(path) -> list[dict]:
    """Rows of a results CSV with numbers as ``int`` / ``float`` (the rest as text)."""
    with open(path, newline="") as f:
        return [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(f)]


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


# One colour and marker per method, the same in every figure (results/ and notebooks).
METHOD_STYLE = {
    "full": ("#000000", "o"), "lora_qv": ("#1f77b4", "s"), "lora_all": ("#17becf", "D"),
    "qlora": ("#9467bd", "v"), "dora": ("#e377c2", "^"), "adapter": ("#2ca02c", "P"),
    "ia3": ("#bcbd22", "X"), "bitfit": ("#8c564b", "h"), "prefix": ("#ff7f0e", "<"),
    "prefix_mlp": ("#d62728", ">"), "prompt": ("#7f7f7f", "*"),
    # the real-text comparison's rows (compare_text.METHODS): "houlsby" is the digit "adapter"
    "houlsby": ("#2ca02c", "P"), "parallel": ("#98df8a", "p"), "lora_tokens": ("#0b5563", "d"),
}


def method_style(method):
    """``(colour, marker)`` of a method (``lora_r4`` etc. take ``lora_all``'s)."""
    if method not in METHOD_STYLE and method.startswith("lora_r"):
        method = "lora_all"
    return METHOD_STYLE.get(method, ("#444444", "o"))


def _method_legend(fig, names):
    import matplotlib.lines as mlines
    handles = [mlines.Line2D([], [], color=method_style(m)[0], marker=method_style(m)[1],
                             ls="", ms=7, label=m) for m in names]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 6), fontsize=9,
               frameon=False, title="method (colour and marker)")


def plot_results(summary, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({s["task"] for s in summary})
    methods = [s for s in summary if s["rank"] is None]
    names = sorted({s["method"] for s in methods}, key=lambda m: next(
        s["trainable_params"] for s in methods if s["method"] == m))
    # points of methods with equal x (LoRA, QLoRA) would hide each other: a legend names
    # them by colour and marker, and each gets a small horizontal nudge
    nudge = {m: 1.06 ** (i % 3 - 1) for i, m in enumerate(names)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for s in (s for s in methods if s["task"] == task):
            color, marker = method_style(s["method"])
            ax.errorbar(s["trainable_params"] * nudge[s["method"]], s["test_accuracy"],
                        yerr=s["test_accuracy_std"], fmt=marker, ms=7, capsize=3, color=color,
                        alpha=0.85)
        ax.set_xscale("log")
        ax.set(title=task, xlabel="trainable parameters (count, log scale)",
               ylabel="test exact match (fraction)")
        ax.set_ylim(-0.05, 1.05)
    fig.suptitle("Test accuracy against trainable parameters (mean ± std over seeds)")
    _method_legend(fig, names)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(os.path.join(out, "accuracy_vs_params.png"), dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for s in (s for s in methods if s["task"] == task):
            color, marker = method_style(s["method"])
            ax.scatter(s["test_accuracy"], s["ce_rise"], color=color, marker=marker, s=55, alpha=0.85)
        ax.set(title=task, xlabel="downstream test exact match (fraction)",
               ylabel="pretraining-task CE rise (nats/token)")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(bottom=0)
    fig.suptitle("Forgetting (adapter active) against the new task's accuracy")
    _method_legend(fig, names)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(os.path.join(out, "forgetting_vs_accuracy.png"), dpi=80)
    plt.close(fig)

    sweep = sorted((s for s in summary if s["rank"] is not None or s["method"] == "lora_all"),
                   key=lambda s: s["rank"] or 8)
    sweep_task = next((s["task"] for s in summary if s["rank"] is not None), None)
    sweep = [s for s in sweep if s["task"] == sweep_task]
    if len(sweep) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        r = [s["rank"] or 8 for s in sweep]
        color, marker = method_style("lora_all")
        ax.errorbar(r, [s["test_accuracy"] for s in sweep], yerr=[s["test_accuracy_std"] for s in sweep],
                    fmt=marker + "-", color=color, capsize=3, label="lora_all (alpha = 2r)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(r, [str(x) for x in r])
        ax.set(title=f"LoRA rank sweep on {sweep_task} (every linear)", xlabel="rank r",
               ylabel="test exact match (fraction)", ylim=(-0.05, 1.05))
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "rank_sweep.png"), dpi=80)
        plt.close(fig)


def write_results(rows, base, out, command, timing, plots=True):
    os.makedirs(out, exist_ok=True)
    summary = aggregate(rows, base)
    table = format_table(summary, base)
    print(table)
    print(f"\n{len(rows)} runs; {jobs.job_sentence(timing)}")
    write_csv(os.path.join(out, "runs.csv"), rows)
    write_csv(os.path.join(out, "summary.csv"), summary)
    meta = {**jobs.job_meta(command, timing), "base": base}
    atomic_write_text(os.path.join(out, "results.json"),
                      json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=1))
    if plots:
        plot_results(summary, out)
    atomic_write_text(os.path.join(out, "README.md"),
                      f"# Comparison results\n\n{len(rows)} runs: {jobs.job_sentence(timing)}.\n\n"
                      f"```\n{table}\n```\n\nPlots: `accuracy_vs_params.png`, "
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
training set) at three learning rates a half-decade apart, centred on the single rate the method
used before (`compare.METHODS[...].sweep_centre`), plus one more step along the ladder (up to
twice) wherever the best rate was the smallest or largest tried, and scored on each task's
**validation split**
(`tasks.validation_set`: digit strings disjoint from the training data and from the test sets).
Per method and per task, the rate with the best validation accuracy wins; ties go to the rate
that raises the pretraining tasks' cross-entropy least (measured on those tasks' held-out
sets, as the comparison's forgetting column is). No downstream task's test set is looked at here.

`chosen.csv` is the table `compare.py` (and every notebook, through `compare.run_spec`) trains
with; `sweep.csv` has every rate's measurements, `runs.csv` the raw runs. "edge of grid" marks a
winner at the smallest or largest rate tried.

```
{text}
```
""")
    return chosen


README_BEGIN = "<!-- BEGIN main-job results: generated by `python code/stage-09/report.py --readme` -->"
README_END = "<!-- END main-job results -->"


def _findings(summary, base):
    """Sentences read off the summary (nothing retyped)."""
    rows = [s for s in summary if s["rank"] is None]
    tasks = sorted({s["task"] for s in rows})
    by = {(s["method"], s["task"]): s for s in rows}
    out = []
    for t in tasks:
        full = by.get(("full", t))
        if full is None:
            continue
        ref = full["test_accuracy"]
        close = sorted((s for s in rows if s["task"] == t and s["method"] != "full"
                        and s["test_accuracy"] >= ref - 0.02), key=lambda s: s["trainable_params"])
        weak = [s["method"] for s in rows if s["task"] == t and s["test_accuracy"] < 0.5 * ref]
        out.append(f"- `{t}`: full fine-tuning {ref:.3f}; within 0.02 of it: "
                   + (", ".join(f"{s['method']} ({s['test_accuracy']:.3f})" for s in close) or "none")
                   + "; below half of it: " + (", ".join(weak) or "none") + ".")
    restored = [m for m in sorted({s["method"] for s in rows})
                if all(s["disabled_accuracy"] == base["pretrain_accuracy"]
                       and abs(s["disabled_ce_rise"]) < 1e-6 for s in rows if s["method"] == m)]
    out.append(f"- Disabled, these methods give back the base model exactly on every task: "
               f"{', '.join(restored)}; the others edit base weights in place (full, BitFit) or "
               f"stand on a quantized base (QLoRA).")
    learned = [s for s in rows if s["test_accuracy"] >= 0.5]
    if learned:
        out.append(f"- With the adapter active, every run that reached 0.5 on its task raised the "
                   f"pretraining tasks' cross-entropy by {min(s['ce_rise'] for s in learned):.1f} to "
                   f"{max(s['ce_rise'] for s in learned):.1f} nats: the adapters were trained on the "
                   f"new task only.")
    size = {s["method"]: s["adapter_bytes"] / 1024 for s in rows}
    small, big = min(size, key=size.get), max((m for m in size if m != "full"), key=size.get)
    out.append(f"- Files: from {size[small]:.0f} KB ({small}) to {size[big]:.0f} KB ({big}), against "
               f"{size.get('full', float('nan')):.0f} KB for the full model.")
    return "\n".join(out)


def _chosen_table(chosen):
    tasks = sorted({c["task"] for c in chosen})
    cell = {(c["method"], c["task"]): c for c in chosen}
    lines = ["| method | " + " | ".join(f"`{t}` lr (validation acc.)" for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for m in dict.fromkeys(c["method"] for c in chosen):
        cells = []
        for t in tasks:
            c = cell.get((m, t))
            cells.append("" if c is None else f"{float(c['lr']):g} ({float(c['validation_accuracy']):.3f})"
                         + (" (edge)" if str(c["edge"]) == "True" else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cost(meta) -> str:
    if "job" in meta:
        return "**What the job cost.** " + jobs.job_sentence(meta["job"]) + "."
    return (f"**What the job cost.** `{meta['command']}` took {meta['minutes']:.1f} min on "
            f"{meta['machine']}, two runs at a time (no CPU time recorded).")


def readme_section(results_dir):
    """The README's generated main-job block, from ``results.json`` and ``lr_sweep/chosen.csv``."""
    with open(os.path.join(results_dir, "results.json")) as f:
        data = json.load(f)
    with open(os.path.join(results_dir, "lr_sweep", "chosen.csv")) as f:
        chosen = list(csv.DictReader(f))
    meta, summary = data["meta"], data["summary"]
    runs = data["runs"]
    first = runs[0]
    return f"""{README_BEGIN}
**How the learning rates were chosen.** Not on the test sets: every method was trained on
every task at three rates a half-decade apart (seed 0, the comparison's settings; one step
further, up to twice, where the best was at the edge), scored on
that task's *validation split* (`tasks.validation_set`: inputs disjoint from the training data
and from the test sets), and the best validation accuracy won, per method and per task (ties:
the rate that raises the pretraining tasks' cross-entropy least, on their held-out sets).
`python code/stage-09/compare.py --lr-sweep`
redoes it and writes `results/lr_sweep/` (`chosen.csv` is the table `compare.py` and every
notebook train with; "edge": the winner is the grid's smallest or largest rate):

{_chosen_table(chosen)}

**The comparison** then scores each test set once: {first['steps']} AdamW steps per run,
{len(runs)} runs, each with one BLAS thread (on a machine shared with other jobs step times
are noisy: `bench_peft.py` measures them properly).

{_cost(meta)}

```
{format_table(summary, meta['base'])}
```

![test accuracy against trainable parameters](results/accuracy_vs_params.png)

What the numbers say, on this small model (generated from `results/results.json`):

{_findings(summary, meta['base'])}
{README_END}"""


def update_readme(readme_path, results_dir):
    """Replace the block between the markers in ``readme_path`` (all or nothing)."""
    with open(readme_path) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme_path} has no generated block; add the lines {README_BEGIN!r} "
                         f"and {README_END!r} where it belongs")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    atomic_write_text(readme_path, head + readme_section(results_dir) + tail)


def replot(results_dir):
    """Redraw the PNGs from a ``results.json`` (no training)."""
    with open(os.path.join(results_dir, "results.json")) as f:
        plot_results(json.load(f)["summary"], results_dir)


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["--replot"]:
        replot(sys.argv[2])
        raise SystemExit
    if sys.argv[1:2] == ["--readme"]:       # refresh README.md's main-job block from results/
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
        update_readme(os.path.join(root, "README.md"), os.path.join(root, "results"))
        raise SystemExit
    with open(sys.argv[1]) as f:        # a sweep.csv: redo the choice
        rows = [{k: (float(v) if k in ("lr", "validation_accuracy", "ce_rise") else v)
                 for k, v in r.items()} for r in csv.DictReader(f)]
    print(format_choice(rows, choose_learning_rates(rows)))
