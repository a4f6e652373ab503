"""Does ``alpha / r`` let you change the rank without retuning the learning rate?

Hu et al. (2021, section 4.1) scale the low-rank update by ``alpha / r`` with
``alpha`` held constant, and say this "helps to reduce the need to retune
hyperparameters when we vary r". This script measures it on the mini GPT:

    python code/stage-09/alpha_scaling.py            # 30 runs, about 5 minutes on one core
    python code/stage-09/alpha_scaling.py --quick    # a smoke run (tests use it)

LoRA on every linear fine-tunes the shipped base on ``add3`` for each rank in
``RANKS`` and each learning rate in ``LRS``, in two ways:

* ``alpha/r``: ``lora_alpha = ALPHA`` fixed, so the scaling is ``ALPHA / r``;
* ``no scaling``: ``lora_alpha = r``, so the scaling is 1 for every rank.

At ``r = ALPHA`` the two are the same run. Why the scaling should matter, with
Adam: every step moves each entry of ``B`` by about ``lr`` whatever the
gradient's size, and the ``r`` columns of ``B`` grow aligned with their rows of
``A x``, so the update ``scaling * B A x`` grows like ``scaling * r * lr``. With
``scaling = alpha / r`` that is ``alpha * lr``: the rank drops out. Without it the
best learning rate should fall like ``1 / r``.

Every run is ``compare.finetune`` with ``compare.run_spec``'s settings for
``lora_all`` (steps, batch, training set, schedule, clipping), only the rank,
``lora_alpha`` and the learning rate changed, and is scored on the task's validation
split (``tasks.validation_set``, never the test set). The best learning rate per rank
is the one with the lowest validation answer cross-entropy. Results: ``results/alpha_r/`` (``runs.csv``, ``alpha_r.png``,
``README.md``).
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from checkpoint import atomic_write_text  # noqa: E402
from compare import RESULTS_DIR, STEPS, finetune, run_spec  # noqa: E402
from peft_config import ALL_LINEARS  # noqa: E402
from peft_model import LoraConfig  # noqa: E402
from pretrain import machine  # noqa: E402
from tasks import validation_set  # noqa: E402
from train import eval_loss, evaluate  # noqa: E402

TASK = "add3"
RANKS = (2, 8, 32)
ALPHA = 8
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
OUT_DIR = os.path.join(RESULTS_DIR, "alpha_r")
SCHEMES = ("alpha/r", "no scaling")


def lora_alpha(scheme: str, r: int) -> float:
    """``lora_alpha`` for a scheme: fixed ``ALPHA`` (scaling ``ALPHA / r``) or ``r`` (scaling 1)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    return ALPHA if scheme == "alpha/r" else r


def run_one(scheme, r, lr, steps, n_val, seed=0):
    """One run of the comparison's recipe with this rank, ``lora_alpha`` and rate."""
    spec = run_spec("lora_all", TASK, seed=seed, steps=steps, lr=lr)
    config = LoraConfig(r=r, lora_alpha=lora_alpha(scheme, r), target_modules=ALL_LINEARS)
    model, _, losses, _ = finetune(spec, config)
    val = validation_set(TASK, n_val)
    return {"scheme": scheme, "rank": r, "lora_alpha": lora_alpha(scheme, r),
            "scaling": lora_alpha(scheme, r) / r, "lr": lr, "seed": seed, "steps": steps,
            "final_train_loss": losses[-1],
            "val_ce": eval_loss(model, val), "val_accuracy": evaluate(model, val)}


def plan(quick=False):
    """The grid: ``(scheme, rank, lr)``; the shared ``r = ALPHA`` runs appear once."""
    ranks, lrs = ((2, 8), (1e-2, 1e-1)) if quick else (RANKS, LRS)
    runs = [("alpha/r", r, lr) for r in ranks for lr in lrs]
    runs += [("no scaling", r, lr) for r in ranks if r != ALPHA for lr in lrs]
    return runs


def with_shared_runs(rows):
    """Copy the ``r = ALPHA`` runs into the other scheme (they are the same run)."""
    shared = [dict(r, scheme="no scaling") for r in rows
              if r["scheme"] == "alpha/r" and r["rank"] == ALPHA]
    return rows + shared


def best_lrs(rows) -> dict:
    """``{(scheme, rank): lr}`` with the lowest validation cross-entropy."""
    best = {}
    for r in rows:
        key = (r["scheme"], r["rank"])
        if key not in best or r["val_ce"] < best[key]["val_ce"]:
            best[key] = r
    return {k: v["lr"] for k, v in best.items()}


def best_lr_spread(rows) -> dict:
    """Per scheme: largest best lr / smallest best lr across the ranks (1 = no retuning)."""
    best = best_lrs(rows)
    out = {}
    for scheme in SCHEMES:
        lrs = [lr for (s, _), lr in best.items() if s == scheme]
        out[scheme] = max(lrs) / min(lrs)
    return out


def rank_sensitivity(rows) -> dict:
    """Per scheme: the largest, over learning rates, of max/min validation CE across the
    ranks at that rate -- how much the outcome depends on r when the rate is kept."""
    out = {}
    for scheme in SCHEMES:
        ratios = []
        for lr in sorted({r["lr"] for r in rows}):
            ces = [r["val_ce"] for r in rows if r["scheme"] == scheme and r["lr"] == lr]
            ratios.append(max(ces) / min(ces))
        out[scheme] = max(ratios)
    return out


def read_runs(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("rank", "seed", "steps"):
            r[k] = int(r[k])
        for k in ("lora_alpha", "scaling", "lr", "final_train_loss", "val_ce", "val_accuracy"):
            r[k] = float(r[k])
    return rows


def write_runs(path, rows):
    keys = list(rows[0])
    lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    best = best_lrs(rows)
    ranks = sorted({r["rank"] for r in rows})
    colours = dict(zip(ranks, ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]))
    fig, axes = plt.subplots(1, 2, figsize=(10.24, 4.2), sharey=True, dpi=100)
    for ax, scheme in zip(axes, SCHEMES):
        for r in ranks:
            rs = sorted((x for x in rows if x["scheme"] == scheme and x["rank"] == r),
                        key=lambda x: x["lr"])
            lrs, ces = [x["lr"] for x in rs], [x["val_ce"] for x in rs]
            ax.plot(lrs, ces, "o-", color=colours[r], label=f"r = {r}")
            b = best[(scheme, r)]
            ax.plot([b], [ces[lrs.index(b)]], "*", ms=16, color=colours[r], mec="black")
        title = (f"lora_alpha = {ALPHA} (scaling alpha/r)" if scheme == "alpha/r"
                 else "lora_alpha = r (scaling 1)")
        ax.set_title(title + ": lower is better")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate (AdamW, peak of warm-up + cosine)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("validation answer cross-entropy (nats/token)")
    handles, labels = axes[0].get_legend_handles_labels()
    star = plt.Line2D([], [], marker="*", ms=14, color="white", mec="black", ls="")
    fig.legend(handles + [star], labels + ["best lr of that rank"], loc="lower center",
               ncol=len(labels) + 1, frameon=False)
    fig.suptitle(f"LoRA on every linear, {TASK}, {rows[0]['steps']} steps: "
                 "does the best learning rate move with the rank?")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def readme(rows, made_by) -> str:
    best, spread, sens = best_lrs(rows), best_lr_spread(rows), rank_sensitivity(rows)
    lines = [f"# alpha/r: best learning rate per rank ({TASK}, LoRA on every linear)", "",
             made_by, "", "![validation loss against learning rate, per rank](alpha_r.png)", "",
             "At the same learning rate, the validation cross-entropy of the ranks differs by up to "
             f"{sens['alpha/r']:.1f}x with `alpha/r` and up to {sens['no scaling']:,.0f}x without "
             "(`rank_sensitivity`). The best learning rate per rank on this grid:", "",
             "| scheme | " + " | ".join(f"r={r} best lr" for r in sorted({r['rank'] for r in rows}))
             + " | largest / smallest |", "|---|" + "---|" * (len({r['rank'] for r in rows}) + 1)]
    for scheme in SCHEMES:
        cells = [f"{best[(scheme, r)]:g}" for r in sorted({r['rank'] for r in rows})]
        lines.append(f"| {scheme} | " + " | ".join(cells) + f" | {spread[scheme]:.3g} |")
    lines += ["", "Best = lowest validation answer cross-entropy (`tasks.validation_set`, never the test "
              "set). Every run: `runs.csv`; plot: `alpha_r.png`."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 ranks x 2 rates, 20 steps")
    p.add_argument("--out", default=OUT_DIR)
    p.add_argument("--replot", action="store_true", help="redraw from the out folder's runs.csv")
    a = p.parse_args(argv)
    if a.replot:
        return replot(a.out)
    steps, n_val = (20, 50) if a.quick else (STEPS, 300)
    start = time.perf_counter()
    rows = [run_one(s, r, lr, steps, n_val) for s, r, lr in plan(a.quick)]
    rows = with_shared_runs(rows)
    minutes = (time.perf_counter() - start) / 60
    command = "python code/stage-09/alpha_scaling.py" + (" --quick" if a.quick else "")
    os.makedirs(a.out, exist_ok=True)
    write_runs(os.path.join(a.out, "runs.csv"), rows)
    write_report(rows, a.out, f"Made by `{command}` in {minutes:.1f} min on {machine()}.")
    return rows


def write_report(rows, out, made_by):
    plot(rows, os.path.join(out, "alpha_r.png"))
    atomic_write_text(os.path.join(out, "README.md"), readme(rows, made_by))
    print(readme(rows, made_by))


def replot(out=OUT_DIR):
    """Redraw the plot and README from ``runs.csv`` (keeps the README's "Made by" line)."""
    with open(os.path.join(out, "README.md")) as f:
        made_by = next(line.strip() for line in f if line.startswith("Made by"))
    write_report(read_runs(os.path.join(out, "runs.csv")), out, made_by)


if __name__ == "__main__":
    main()
