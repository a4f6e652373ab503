"""Tables, plots and findings of the real-text comparison (``compare_text.py``).

``summarize`` turns per-run rows into one row per configuration (method, rank,
fraction of the data) with the mean and standard deviation over seeds;
``findings`` states in words what the numbers show -- the sentences are built
from the numbers, so they say whatever the measurement says;
``write_text_results`` writes ``runs.csv``, ``summary.csv``, ``classification.csv``,
``results.json`` (with every setting), the plots and a README.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict

import numpy as np

from checkpoint import atomic_write_text
from jobs import job_meta, job_sentence
from report import write_csv

LOSS_FIELDS = ("alice_loss", "shakespeare_loss", "shakespeare_disabled", "forgetting",
               "disabled_rise", "new_char_loss")
TOUCH_BASE = ("full", "bitfit", "qlora")   # train the base's own numbers, or quantize them


def label(method, rank, fraction) -> str:
    name = method if rank == 8 or not method.startswith("lora") else f"{method}_r{rank}"
    return name if fraction == 1.0 else f"{name}@{fraction:g}"


def summarize(rows, base) -> list[dict]:
    """Mean and std over seeds per (method, rank, fraction) of the language-model runs."""
    groups = defaultdict(list)
    for r in (r for r in rows if r["kind"] == "adapt"):
        r = dict(r)
        split = r["split"]
        r["forgetting"] = r["shakespeare_loss"] - base[f"shakespeare_{split}"]
        r["disabled_rise"] = r["shakespeare_disabled"] - base[f"shakespeare_{split}"]
        groups[(r["method"], r["rank"], r["fraction"], r["lr"])].append(r)
    out = []
    for (method, rank, fraction, lr), rs in groups.items():
        s = {"label": label(method, rank, fraction), "method": method, "rank": rank,
             "fraction": fraction, "lr": lr, "seeds": len(rs),
             **{k: rs[0][k] for k in ("trainable_params", "trainable_pct", "trainable_state_bytes",
                                      "adapter_bytes", "steps", "batch_size", "window")},
             "step_ms": float(np.median([r["step_ms"] for r in rs]))}
        for f in LOSS_FIELDS:
            v = [r[f] for r in rs]
            s[f], s[f + "_std"] = float(np.mean(v)), float(np.std(v))
        out.append(s)
    return sorted(out, key=lambda s: (s["fraction"] != 1.0, s["trainable_params"], s["label"]))


def summarize_classification(rows) -> list[dict]:
    """Mean and std over seeds per (method, learning rate) of the authorship runs."""
    groups = defaultdict(list)
    for r in (r for r in rows if r["kind"] == "classify"):
        groups[(r["method"], r["lr"])].append(r)
    out = []
    for (method, lr), rs in groups.items():
        s = {"method": method, "lr": lr, "seeds": len(rs), "steps": rs[0]["steps"],
             "trainable_params": rs[0]["trainable_params"], "n_test": rs[0]["n_test"],
             "majority_baseline": rs[0]["majority_baseline"], "split": rs[0].get("split", "test")}
        for f in ("accuracy", "top1_accuracy", "accuracy_before", "label_loss"):
            v = [r[f] for r in rs if f in r]
            if v:
                s[f], s[f + "_std"] = float(np.mean(v)), float(np.std(v))
        out.append(s)
    return sorted(out, key=lambda s: (s["trainable_params"], s["method"], s["lr"]))


def format_table(summary, base, split="test") -> str:
    head = (f"{'method':<18} {'lr':>6} {'trainable':>9} {'%':>7} {'Alice loss':>14} {'Shakesp. rise':>14} "
            f"{'disabled':>9} {'new chars':>9} {'ms/step':>7} {'state KB':>8} {'file KB':>8}")
    lines = [f"base ({split} split): Alice {base[f'alice_{split}']:.3f}, Shakespeare "
             f"{base[f'shakespeare_{split}']:.3f} nats/char", head, "-" * len(head)]
    for s in summary:
        lines.append(
            f"{s['label']:<18} {s['lr']:>6.0e} {s['trainable_params']:>9,} {s['trainable_pct']:>7.3f} "
            f"{s['alice_loss']:>7.3f}±{s['alice_loss_std']:.3f} {s['forgetting']:>+7.3f}±"
            f"{s['forgetting_std']:.3f} {s['disabled_rise']:>+9.3f} {s['new_char_loss']:>9.2f} "
            f"{s['step_ms']:>7.1f} "
            f"{s['trainable_state_bytes'] / 1024:>8.1f} {s['adapter_bytes'] / 1024:>8.1f}")
    lines.append("Alice loss: mean±std over seeds; Shakesp. rise: Shakespeare loss minus the base's, "
                 "adapter active; disabled: the same rise with the adapter off;\nnew chars: Alice loss on "
                 "the characters Shakespeare lacks; @0.1: 10% of the data")
    return "\n".join(lines)


def format_classification(csum) -> str:
    if not csum:
        return ""
    lines = [f"{'method':<12} {'lr':>6} {'trainable':>9} {'accuracy':>14} {'top-1':>6} {'before':>6} "
             f"{'majority':>8} {'seeds':>5}"]
    for s in csum:
        lines.append(f"{s['method']:<12} {s['lr']:>6.0e} {s['trainable_params']:>9,} {s['accuracy']:>7.3f}±"
                     f"{s['accuracy_std']:.3f} {s['top1_accuracy']:>6.3f} {s['accuracy_before']:>6.3f} "
                     f"{s['majority_baseline']:>8.3f} {s['seeds']:>5}")
    return "\n".join(lines)


def _by_label(summary):
    return {s["label"]: s for s in summary}


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def findings(summary, csum, base) -> list[str]:
    """What the measurement shows, in sentences built from the numbers."""
    by, out = _by_label(summary), []
    if "full" in by and "lora_all" in by:
        f, lo = by["full"], by["lora_all"]
        learns = "less" if lo["alice_loss"] > f["alice_loss"] else "more"
        forgets = "less" if lo["forgetting"] < f["forgetting"] else "more"
        out.append(f"LoRA on every linear (r=8) learned {learns} than full fine-tuning (Alice loss "
                   f"{lo['alice_loss']:.3f} vs {f['alice_loss']:.3f}) and forgot {forgets} "
                   f"(Shakespeare rise {lo['forgetting']:+.3f} vs {f['forgetting']:+.3f}).")
    for m in ("lora_all", "lora_qv"):
        sweep = sorted((s for s in summary if s["method"] == m and s["fraction"] == 1.0),
                       key=lambda s: s["rank"])
        if len(sweep) > 1:
            lo, hi = sweep[0], sweep[-1]
            out.append(f"{m} from r={lo['rank']} to r={hi['rank']}: Alice loss {lo['alice_loss']:.3f}"
                       f" -> {hi['alice_loss']:.3f}, Shakespeare rise {lo['forgetting']:+.3f} -> "
                       f"{hi['forgetting']:+.3f}.")
    full_data = [s for s in summary if s["fraction"] == 1.0]
    if len(full_data) > 2:
        rho = spearman([s["alice_loss"] for s in full_data], [s["forgetting"] for s in full_data])
        kind = ("the more a configuration learned, the more it forgot" if rho < -0.3 else
                "learning and forgetting rose together only weakly" if rho < 0.3 else
                "configurations that learned more forgot less")
        out.append(f"Across all {len(full_data)} full-data configurations the rank correlation of "
                   f"Alice loss with Shakespeare rise is {rho:+.2f}: {kind}.")
    kept = [s for s in full_data if s["method"] not in TOUCH_BASE]
    if kept:
        worst = max(abs(s["disabled_rise"]) for s in kept)
        out.append(f"Disabled, the {len(kept)} configurations that leave the base's weights alone "
                   f"give the base's Shakespeare loss (largest difference {worst:.1e} nats).")
    if "qlora" in by:
        out.append(f"QLoRA disabled is the NF4-quantized base: its Shakespeare loss is "
                   f"{by['qlora']['disabled_rise']:+.4f} nats from the float base's.")
    if "lora_tokens" in by and "lora_all" in by:
        t, lo = by["lora_tokens"], by["lora_all"]
        out.append(f"New characters (those of Alice that Shakespeare lacks): their loss is {base[f'new_char_test']:.2f} nats for the base, "
                   f"{lo['new_char_loss']:.2f} after LoRA, {t['new_char_loss']:.2f} after LoRA with "
                   f"their embedding rows trainable (trainable_token_indices); all-character Alice "
                   f"loss {lo['alice_loss']:.3f} vs {t['alice_loss']:.3f}.")
    out += low_data_findings(summary, base)
    if csum:
        out.append(authorship_finding(csum))
    return out


def authorship_finding(csum) -> str:
    """The authorship task in one sentence: best, worst, and who beats the majority baseline
    by more than twice its seed spread."""
    best = max(csum, key=lambda s: s["accuracy"])
    worst = min(csum, key=lambda s: s["accuracy"])
    majority = best["majority_baseline"]
    weak = [s["method"] for s in csum if s["accuracy"] - 2 * s["accuracy_std"] <= majority]
    return (f"Authorship (held-out snippets, mean ± std over {best['seeds']} seed{'s' * (best['seeds'] > 1)}): {best['method']} is "
            f"best at {best['accuracy']:.1%} ± {best['accuracy_std']:.1%}, {worst['method']} lowest at "
            f"{worst['accuracy']:.1%} ± {worst['accuracy_std']:.1%}; always answering one author scores "
            f"{majority:.0%}. {len(csum) - len(weak)} of {len(csum)} methods beat that by more than "
            f"twice their seed spread" + (f" (not: {', '.join(weak)})." if weak else "."))


def low_data_findings(summary, base) -> list[str]:
    out = []
    fractions = sorted({s["fraction"] for s in summary})
    for frac in fractions:
        rows = [s for s in summary if s["fraction"] == frac and (s["rank"] == 8 or
                                                                not s["method"].startswith("lora"))]
        if frac == 1.0:
            methods = {s["method"] for s in summary if s["fraction"] != 1.0}
            rows = [s for s in rows if s["method"] in methods]
        if len(rows) < 2:
            continue
        ranked = sorted(rows, key=lambda s: s["alice_loss"])
        out.append(f"With {frac:.0%} of Alice's training text: " + ", ".join(
            f"{s['method']} {s['alice_loss']:.3f}" for s in ranked) + " (Alice loss, best first).")
    return out


def method_colors(order):
    """One colour per method, the same in every figure (``order``: the methods table's keys)."""
    import matplotlib.pyplot as plt
    return {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(order)}


def plot_learn_forget(summary, base, path, order, split="test"):
    """Alice loss (x) against the Shakespeare loss rise (y): a point per method, a line per
    LoRA rank sweep, error bars one standard deviation over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    color = method_colors(order)
    fig, ax = plt.subplots(figsize=(10.5, 6))
    full_data = [s for s in summary if s["fraction"] == 1.0]
    for m in ("lora_qv", "lora_all"):
        sweep = sorted((s for s in full_data if s["method"] == m), key=lambda s: s["rank"])
        if len(sweep) > 1:
            ax.plot([s["alice_loss"] for s in sweep], [s["forgetting"] for s in sweep], "-",
                    color=color[m], alpha=0.5)
            for s in sweep:
                ax.annotate(f"r{s['rank']}", (s["alice_loss"], s["forgetting"]), fontsize=7,
                            xytext=(3, -9), textcoords="offset points", color=color[m])
    for s in full_data:
        headline = s["label"] == s["method"]
        ax.errorbar(s["alice_loss"], s["forgetting"], xerr=s["alice_loss_std"],
                    yerr=s["forgetting_std"], fmt="o" if headline else ".", capsize=2,
                    color=color[s["method"]], label=s["method"] if headline else None)
    ax.axvline(base[f"alice_{split}"], color="grey", ls=":", lw=1)
    ax.annotate("base, untouched", (base[f"alice_{split}"], 0), fontsize=8, color="grey",
                xytext=(-80, 6), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Learning Alice vs forgetting Shakespeare (lower-left is better)",
           xlabel=f"Alice {split} loss after adaptation (nats/char; left = learned more)",
           ylabel=f"Shakespeare {split} loss rise, adapter active (nats/char)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))    # outside: hides no point
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_low_data(summary, base, path, order, split="test"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    color = method_colors(order)
    methods = sorted({s["method"] for s in summary if s["fraction"] != 1.0}, key=order.index)
    if not methods:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        pts = sorted((s for s in summary if s["method"] == m and (s["rank"] == 8 or not
                      m.startswith("lora"))), key=lambda s: s["fraction"])
        ax.errorbar([s["fraction"] for s in pts], [s["alice_loss"] for s in pts],
                    yerr=[s["alice_loss_std"] for s in pts], fmt="o-", capsize=3, color=color[m],
                    label=m)
    ax.axhline(base[f"alice_{split}"], color="grey", ls=":", lw=1, label="base")
    ax.set_xscale("log")
    ax.set(title="How much Alice text does each method need?",
           xlabel="fraction of Alice's training split (log)", ylabel=f"Alice {split} loss (nats/char)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_classification(csum, path, order):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not csum:
        return
    color = method_colors(order)
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(csum))
    ax.bar(x, [s["accuracy"] for s in csum], yerr=[s["accuracy_std"] for s in csum],
           color=[color[s["method"]] for s in csum], capsize=3)
    ax.axhline(csum[0]["majority_baseline"], color="black", ls="--", lw=1, label="majority baseline")
    ax.set_xticks(x, [s["method"] for s in csum], rotation=30, ha="right")
    ax.set(title="Who wrote it? Shakespeare or Carroll, one label token",
           ylabel="held-out accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_text_results(rows, base, out, command, timing, settings, methods, sweep=False,
                       sample=None):
    """Print the tables and write every file of one job into ``out`` (``timing``: the
    job's cost record, ``jobs.run_jobs``)."""
    os.makedirs(out, exist_ok=True)
    split = "validation" if sweep else "test"
    summary, csum = summarize(rows, base), summarize_classification(rows)
    table, ctable = format_table(summary, base, split), format_classification(csum)
    words = [] if sweep else findings(summary, csum, base)
    print(table, ctable, *words, sep="\n\n")
    print(f"\n{len(rows)} runs; {job_sentence(timing)}")
    write_csv(os.path.join(out, "runs.csv"), [{k: v for k, v in r.items() if k != "sample"}
                                              for r in rows if r["kind"] == "adapt"])
    write_csv(os.path.join(out, "classification_runs.csv"), [r for r in rows if r["kind"] == "classify"])
    write_csv(os.path.join(out, "summary.csv"), summary)
    write_csv(os.path.join(out, "classification.csv"), csum)
    order = list(methods)
    meta = {**job_meta(command, timing), "base": base, "settings": asdict(settings), "sample": sample,
            "methods": {m: {"lr": spec.lr, "lr_grid": list(spec.lr_grid), "classify_lr": spec.classify_lr,
                            "classify_lr_grid": list(spec.classify_lr_grid), "why": spec.why,
                            "quantize": spec.quantize} for m, spec in methods.items()}}
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(
        {"meta": meta, "summary": summary, "classification": csum, "findings": words,
         "runs": rows}, indent=1))
    if sweep:                        # text_sweep.write_sweep_readme writes its README
        return summary, csum, words
    plot_learn_forget(summary, base, os.path.join(out, "learn_forget.png"), order)
    plot_low_data(summary, base, os.path.join(out, "low_data.png"), order)
    plot_classification(csum, os.path.join(out, "classification.png"), order)
    bullets = "".join(f"- {w}\n" for w in words)
    atomic_write_text(os.path.join(out, "README.md"),
                      f"# Real-text results: Shakespeare base adapted to Alice\n\n{len(rows)} runs: "
                      f"{job_sentence(timing)}.\n\n"
                      f"```\n{table}\n```\n\n```\n{ctable}\n```\n\n{bullets}")
    return summary, csum, words


def samples_by_method(results) -> dict:
    """``{"base": text, method: text}`` from the headline runs of ``results.json``."""
    out = {"base": results["meta"]["base"].get("sample", "")}
    for r in results["runs"]:
        if r.get("sample") is not None and r["method"] not in out:
            out[r["method"]] = r["sample"]
    return out


def job_cost(meta) -> str:
    """The main job's time and CPU cost (its ``timing`` record), or what an older record has."""
    if "job" in meta:
        return f"**What the job cost.** {job_sentence(meta['job'])}."
    return (f"**What the job cost.** `{meta['command']}` took {meta['minutes']:.1f} min on "
            f"{meta['machine']} (load average {meta.get('load_average')}; no CPU time recorded).")


def readme_block(results, image="results/text/learn_forget.png", show=("full", "lora_all",
                                                                       "prompt")) -> str:
    """The README's opening: the learn-forget table, the plot and a few samples (generated)."""
    base, summary = results["meta"]["base"], results["summary"]
    rows = [s for s in summary if s["fraction"] == 1.0 and s["label"] == s["method"]]
    lines = ["| method | trainable % | Alice loss | Shakespeare rise | disabled rise |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {s['method']} | {s['trainable_pct']:.2f} | {s['alice_loss']:.3f} ± "
              f"{s['alice_loss_std']:.3f} | {s['forgetting']:+.3f} ± {s['forgetting_std']:.3f} | "
              f"{s['disabled_rise']:+.3f} |" for s in rows]
    texts = samples_by_method(results)
    prompt = results["meta"]["sample"]["prompt"]
    shown = "\n\n".join(f"**{m}**: `{prompt}` {json.dumps(texts[m])[1:-1]}"
                         for m in ("base",) + tuple(show) if m in texts)
    pre = base.get("pretraining", {})
    origin = (f"Runs started from `{pre.get('dir')}`" + (
        f" ({pre['snapshot_of']} at step {pre['steps']}, Shakespeare validation loss "
        f"{pre['validation_loss']:.3f})" if pre.get("snapshot_of") else "") + "; ")
    return (origin + f"base: Alice {base['alice_test']:.3f}, Shakespeare {base['shakespeare_test']:.3f} "
            f"nats/char (test splits, {results['meta']['settings']['steps']} steps per run, "
            f"mean ± std over {len(results['meta']['settings']['seeds'])} seeds; "
            f"`{results['meta']['command']}`)\n\n"
            + "\n".join(lines) + f"\n\n![learn-forget]({image})\n\n"
            + "".join(f"- {w}\n" for w in results["findings"]) + "\n" + shown + "\n\n"
            + job_cost(results["meta"]) + "\n")


def choose_learning_rates(sweep_results) -> dict:
    """``{method: lr}``: the rate with the lowest Alice *validation* loss (mean over the
    seeds it has) in a ``--lr-sweep``'s ``results.json``; ties: the smaller Shakespeare rise."""
    return {m: ranked[0]["lr"] for m, ranked in ranked_rates(sweep_results).items()}


def ranked_rates(sweep_results, kind="adapt") -> dict:
    """``{method: [summary row per rate, best first]}`` of a sweep: Alice by validation loss
    (ties: the smaller Shakespeare rise), authorship (``kind="classify"``) by validation
    accuracy (ties: the lower loss at the label position)."""
    groups = defaultdict(list)
    if kind == "adapt":
        for s in sweep_results["summary"]:
            groups[s["method"]].append(s)
        key = lambda s: (s["alice_loss"], s["forgetting"])                 # noqa: E731
    else:
        for s in sweep_results["classification"]:
            groups[s["method"]].append(s)
        key = lambda s: (-s["accuracy"], s.get("label_loss", 0.0))         # noqa: E731
    return {m: sorted(rows, key=key) for m, rows in groups.items()}


def choose_classification_rates(sweep_results) -> dict:
    """``{method: lr}``: the best validation accuracy of the authorship task (mean over seeds)."""
    return {m: ranked[0]["lr"] for m, ranked in ranked_rates(sweep_results, "classify").items()}


README_MARKERS = ("<!-- real-text results: start (python code/stage-09/text_report.py --readme) -->",
                  "<!-- real-text results: end -->")


def readme_with_block(readme: str, results) -> str:
    """``readme`` with the text between ``README_MARKERS`` replaced by ``readme_block``."""
    start, end = README_MARKERS
    if start not in readme or end not in readme:
        raise ValueError(f"the README has no {start!r} ... {end!r} markers")
    head, rest = readme.split(start, 1)
    return head + start + "\n" + readme_block(results) + rest[rest.index(end):]


def update_readme(readme_path, results_path):
    """Replace the README's real-text block with one made from ``results_path`` (all or nothing)."""
    with open(results_path) as f:
        results = json.load(f)
    with open(readme_path) as f:
        text = readme_with_block(f.read(), results)
    atomic_write_text(readme_path, text)
    print(f"updated {readme_path}")


def main(argv=None):
    """``--readme``: refresh the README's real-text block from ``results/text/results.json``."""
    import argparse
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", ".."))
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--readme", action="store_true")
    p.add_argument("--results", default=os.path.join(root, "results", "text", "results.json"))
    a = p.parse_args(argv)
    if a.readme:
        return update_readme(os.path.join(root, "README.md"), a.results)
    with open(a.results) as f:
        print(readme_block(json.load(f)))


if __name__ == "__main__":
    main()
