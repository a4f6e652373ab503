"""Choosing a method from the real-text comparison: read its results, serve each method
as it would run at inference, and build the decision table from the numbers.

``compare_text.py`` writes ``results/text/summary.csv`` (one row per method, rank and
data fraction; mean over seeds) and ``classification.csv`` (the authorship task).
Notebook 06 reads them through ``load`` (notebook 02 reads the rank sweep); without
them ``run_small`` makes a few short runs with the runner's own ``QUICK`` settings, so
a notebook always executes. ``decision_rows`` answers one concern per row (learn the
most, forget the least, the smallest file, no inference overhead, ...) with the method
the measurements favour, its number and the runner-up; every sentence of the table is
built from the numbers, so it says whatever the measurement says.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import compare_text as ct
import text_report as tr
from report import read_csv

# A method counts as having *learned* Alice when it closed at least this share of full
# fine-tuning's drop in Alice's loss; the cost rows (smallest file, least memory, fastest
# step) choose among those only, or the method that learned nothing would win them all.
LEARNED_ENOUGH = 0.5
IN_PLACE = ("FULL", "BITFIT")        # train the base's own numbers: nothing to merge or switch off
FALLBACK_METHODS = ("full", "lora_all", "ia3", "houlsby", "prompt", "bitfit", "lora_tokens")


# ---- reading the results ------------------------------------------------------------
def load(directory=ct.RESULTS_DIR):
    """``{"summary", "classification", "base", "meta"}`` of the comparison in ``directory``
    (``summary.csv``, ``classification.csv``, and ``results.json`` for the base's losses and
    how the runs were made); ``None`` when a file is missing."""
    names = ("summary.csv", "classification.csv", "results.json")
    paths = [os.path.join(directory, n) for n in names]
    if not all(os.path.exists(p) for p in paths):
        return None
    with open(paths[2]) as f:
        meta = json.load(f)["meta"]
    return {"summary": read_csv(paths[0]), "classification": read_csv(paths[1]),
            "base": meta["base"], "meta": meta}


def run_small(methods=FALLBACK_METHODS, settings=ct.QUICK):
    """The same dict as ``load`` from a few short runs made now (``compare_text``'s plan and
    runs with ``settings``, one process): rough numbers, for a checkout without results."""
    specs = ct.plan(settings, list(methods))
    base = ct.base_losses(ct.TEXT_BASE_DIR, settings.eval_windows, settings.window)
    rows = ct.run_all(specs, workers=1, progress=False)
    meta = {"command": f"compare_text.run on {len(methods)} methods with QUICK settings "
                       f"({settings.steps} steps; notebook fallback)",
            "settings": asdict(settings), "base": base}
    return {"summary": tr.summarize(rows, base), "classification": tr.summarize_classification(rows),
            "base": base, "meta": meta}


def headline(summary) -> list[dict]:
    """Each method's main row: all of Alice's training text, the default rank."""
    return [s for s in summary if s["fraction"] == 1.0 and s["label"] == s["method"]]


# ---- serving a method ------------------------------------------------------------------
def served(model):
    """``(model, form)``: a trained ``PeftModel`` as it would be served, in eval mode.

    ``"plain"``: full fine-tuning and BitFit changed the base's own numbers, so the trained
    model *is* a plain GPT (nothing to merge, nothing to switch off). ``"merged"``: LoRA,
    DoRA, (IA)3 and QLoRA fold into the weights (``merge_and_unload``; QLoRA's becomes a
    float model). ``"unmerged"``: adapters, prefixes and prompts stay in the forward pass.
    """
    config = model.peft_config[model.active_adapters[0]]
    if config.peft_type in IN_PLACE:
        return model.unload_model().eval(), "plain"
    if config.mergeable:
        return model.merge_and_unload().eval(), "merged"
    return model.eval(), "unmerged"


# ---- the decision table -----------------------------------------------------------------
def pareto(rows, x="alice_loss", y="forgetting") -> list[dict]:
    """The rows no other row beats on both ``x`` and ``y`` (lower is better on both)."""
    return [s for s in rows if not any(o[x] <= s[x] and o[y] <= s[y] and (o[x], o[y]) != (s[x], s[y])
                                       for o in rows)]


def learned(rows, base) -> list[dict]:
    """The rows that closed at least ``LEARNED_ENOUGH`` of full fine-tuning's Alice gain
    (of the best row's, when there is no full fine-tuning row)."""
    gain = {s["label"]: base["alice_test"] - s["alice_loss"] for s in rows}
    ref = next((gain[s["label"]] for s in rows if s["method"] == "full"), max(gain.values()))
    return [s for s in rows if gain[s["label"]] >= LEARNED_ENOUGH * ref]


def _ranked(concern, rows, key, show, reverse=False, note=""):
    """One table row: the best and second-best of ``rows`` by ``key``; ``show(row)`` the evidence."""
    if not rows:
        return None
    best = sorted(rows, key=key, reverse=reverse)
    runner = f"{best[1]['method']} ({show(best[1])})" if len(best) > 1 else "none"
    return {"concern": concern, "choice": best[0]["method"], "evidence": show(best[0]) + note,
            "runner_up": runner}


def decision_rows(summary, classification, base, inference=None) -> list[dict]:
    """Per concern, the method the real-text measurements favour.

    ``inference``: ``{method: {"form", "ratio", "frozen_bytes"}}`` (served form, forward time
    over the base's, frozen weight bytes while training: 4-bit for QLoRA), for the inference
    and memory rows. Rows whose data is missing are left out.
    """
    main = headline(summary)
    ok = learned(main, base)
    kb = lambda b: f"{b / 1024:,.0f} KB"                           # noqa: E731
    alice = lambda s: f"Alice loss {s['alice_loss']:.3f}"          # noqa: E731
    rows = [
        _ranked("learn the new text best", main, lambda s: s["alice_loss"], alice),
        _ranked("forget the least while learning", ok, lambda s: s["forgetting"],
                lambda s: f"Shakespeare rise {s['forgetting']:+.3f}, {alice(s)}"),
        _ranked("old model back exactly (adapter off)",
                [s for s in ok if abs(s["disabled_rise"]) < 1e-6], lambda s: s["alice_loss"],
                lambda s: f"disabled rise {s['disabled_rise']:.1g}, {alice(s)}"),
        _ranked("smallest file per task", ok, lambda s: s["adapter_bytes"],
                lambda s: f"{kb(s['adapter_bytes'])}, {alice(s)}"),
        _ranked("least trainable state", ok, lambda s: s["trainable_state_bytes"],
                lambda s: f"{kb(s['trainable_state_bytes'])} of trainable state, {s['trainable_pct']:.2f}% "
                          f"trainable"),
        _ranked("fastest training step", ok, lambda s: s["step_ms"],
                lambda s: f"{s['step_ms']:.0f} ms per step", note=" (noisy on a shared machine)"),
    ]
    if inference:
        free = [s for s in ok if inference.get(s["method"], {}).get("form") in ("plain", "merged")]
        rows.append(_ranked("no inference overhead", free, lambda s: s["alice_loss"],
                            lambda s: f"{inference[s['method']]['form']}, forward "
                                      f"{inference[s['method']]['ratio']:.2f}x the base's, {alice(s)}"))
        total = lambda s: inference[s["method"]]["frozen_bytes"] + s["trainable_state_bytes"]  # noqa: E731
        rows.append(_ranked("least memory in all (a base that barely fits)", ok, total,
                            lambda s: f"{kb(total(s))}: frozen weights "
                                      f"{kb(inference[s['method']]['frozen_bytes'])} + trainable state"))
    rows.append(_ranked("characters the base never saw", main, lambda s: s["new_char_loss"],
                        lambda s: f"{s['new_char_loss']:.2f} nats on them"))
    fractions = sorted({s["fraction"] for s in summary})
    if fractions[0] < 1.0:
        few = [s for s in summary if s["fraction"] == fractions[0]
               and s["label"].split("@")[0] == s["method"]]              # the default rank
        rows.append(_ranked(f"little data ({fractions[0]:.0%} of the text)", few,
                            lambda s: s["alice_loss"], alice))
    if classification:
        rows.append(_ranked("a label task (who wrote it?)", classification, lambda s: s["accuracy"],
                            lambda s: f"accuracy {s['accuracy']:.3f}, majority {s['majority_baseline']:.2f}",
                            reverse=True))
    return [r for r in rows if r is not None]


def markdown_table(rows) -> str:
    """The decision rows as a Markdown table."""
    lines = ["| your concern | choose | measured | runner-up |", "|---|---|---|---|"]
    lines += [f"| {r['concern']} | **{r['choice']}** | {r['evidence']} | {r['runner_up']} |" for r in rows]
    return "\n".join(lines)
