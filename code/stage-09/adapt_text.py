"""Bring your own text: adapt the shipped Shakespeare base to any UTF-8 file.

    python code/stage-09/adapt_text.py FILE --method lora [--r 8] [--steps N] [--seed S] [--out DIR]

The last tenth of the file (at least one window) is held out to measure the
*target* loss; the rest is trained on, with the method's learning rate from
``compare_text.METHODS`` (chosen there on validation data). The *source* loss is
the base's own Shakespeare validation windows: with the adapter active it shows
what the adaptation cost, with the adapter disabled what was kept.

The report ends with one line ``RESULT {json}``; the adapter directory reloads
with ``PeftModel.from_pretrained(load_model(base), DIR)``. Bad input -- a missing,
empty or binary file, a text shorter than two windows, an unknown method, a
non-positive ``--steps`` or ``--r`` -- stops with a message before anything is
written; so does any failure during training (the adapter is written last, by
``save_pretrained``, all files at once).
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from checkpoint import load_config, load_model  # noqa: E402
from compare_text import (METHODS, SETTINGS, TEXT_BASE_DIR, VIRTUAL_TOKENS, adapt, build,  # noqa: E402
                          window_length)
from generate import complete  # noqa: E402
from text import ByteTokenizer, corpus_splits, fixed_windows, lm_loss  # noqa: E402

ALIASES = {"lora": "lora_all", "adapter": "houlsby"}    # short names a learner may type
CHOICES = sorted(set(METHODS) | set(ALIASES))
EVAL_WINDOWS = 64
SAMPLE_CHARS = 160


class BadInput(ValueError):
    """Input the command refuses, with a message naming the argument, value and limit."""


def read_text(path) -> str:
    """The file's text, or ``BadInput`` if it is missing, empty, binary or not UTF-8."""
    if not os.path.isfile(path):
        raise BadInput(f"FILE {path!r} does not exist or is not a regular file")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise BadInput(f"FILE {path!r} is empty: give a text file with some content")
    if b"\x00" in data:
        raise BadInput(f"FILE {path!r} looks binary (it contains NUL bytes): give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"FILE {path!r} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})")


def split_text(ids, window):
    """``(train, held_out)``: the held-out part is the last tenth, at least ``window + 1`` tokens."""
    need = 2 * (window + 1)
    if len(ids) < need:
        raise BadInput(f"FILE has {len(ids)} tokens (bytes); adapting needs at least two windows "
                       f"of {window + 1} = {need} tokens")
    held = max(len(ids) // 10, window + 1)
    return ids[:-held], ids[-held:]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", metavar="FILE", help="a UTF-8 text file")
    p.add_argument("--method", default="lora", help=f"one of {', '.join(CHOICES)}")
    p.add_argument("--r", type=int, default=8, help="LoRA/DoRA/QLoRA rank")
    p.add_argument("--steps", type=int, default=SETTINGS.steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="default: the method's rate in compare_text")
    p.add_argument("--out", default=None, help="adapter directory (default adapters/<file>-<method>)")
    p.add_argument("--base", default=TEXT_BASE_DIR)
    a = p.parse_args(argv)
    if a.method not in CHOICES:
        raise BadInput(f"--method {a.method!r} is unknown; choose one of {', '.join(CHOICES)}")
    if a.steps < 1:
        raise BadInput(f"--steps must be at least 1, got {a.steps}")
    if a.r < 1:
        raise BadInput(f"--r must be at least 1, got {a.r}")
    if a.lr is not None and not a.lr > 0:
        raise BadInput(f"--lr must be > 0, got {a.lr}")
    a.method = ALIASES.get(a.method, a.method)
    stem = os.path.splitext(os.path.basename(a.file))[0]
    a.out = a.out or os.path.join("adapters", f"{stem}-{a.method}")
    if os.path.exists(a.out) and (not os.path.isdir(a.out) or os.listdir(a.out)):
        raise BadInput(f"--out {a.out!r} exists and is not an empty directory: choose another")
    return a


def measure(model, target, source):
    row = {"target": lm_loss(model, *target), "source": lm_loss(model, *source)}
    with model.disable_adapter():
        row["source_disabled"] = lm_loss(model, *source)
    return row


def samples(model, tokenizer, prompt, seed):
    return [complete(model, tokenizer, prompt, SAMPLE_CHARS, temperature=0.8, top_k=20, seed=seed + i)
            for i in range(2)]


def adapt_file(a) -> dict:
    """Everything after the input checks; prints the report, returns the RESULT dict."""
    text = read_text(a.file)
    tokenizer = ByteTokenizer()
    window = window_length(load_config(a.base), SETTINGS.window)
    train_part, held_out = split_text(tokenizer.encode(text), window)
    target = fixed_windows(held_out, window, EVAL_WINDOWS, seed=1234)
    source = fixed_windows(corpus_splits("shakespeare")["validation"], window, EVAL_WINDOWS, seed=1234)
    base = load_model(a.base)
    before = {"target": lm_loss(base, *target), "source": lm_loss(base, *source)}
    prompt = tokenizer.decode(held_out[:24])
    samples_before = samples(base, tokenizer, prompt, a.seed)
    model = build(a.method, a.base, a.r, a.seed)
    lr = a.lr or METHODS[a.method].lr
    start = time.perf_counter()
    _, step_s, _ = adapt(model, train_part, a.steps, lr, SETTINGS.batch_size, a.seed, window)
    seconds = time.perf_counter() - start
    after = measure(model, target, source)
    samples_after = samples(model, tokenizer, prompt, a.seed)
    trainable, total = model.get_nb_trainable_parameters()
    model.save_pretrained(a.out)                 # all files at once (atomic_directory)
    report(a, lr, window, len(train_part), len(held_out), before, after, trainable, total,
           seconds, prompt, samples_before, samples_after)
    return {"file": a.file, "method": a.method, "r": a.r, "steps": a.steps, "seed": a.seed, "lr": lr,
            "target_loss_before": before["target"], "target_loss_after": after["target"],
            "source_loss_before": before["source"], "source_loss_after": after["source"],
            "source_loss_disabled": after["source_disabled"], "trainable_params": trainable,
            "total_params": total, "seconds": round(seconds, 2), "step_ms": round(1000 * step_s, 1),
            "adapter_dir": os.path.abspath(a.out)}


def report(a, lr, window, n_train, n_held, before, after, trainable, total, seconds, prompt,
           samples_before, samples_after):
    print(f"adapting the Shakespeare base to {a.file} with {a.method} "
          f"({METHODS[a.method].why}), lr {lr:g}, {a.steps} steps, seed {a.seed}")
    print(f"text: {n_train:,} tokens to train on, {n_held:,} held out; windows of {window} tokens "
          f"(room for {VIRTUAL_TOKENS} virtual tokens)")
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%); "
          f"{seconds:.1f} s of training")
    print(f"\n{'loss (nats/char)':<34} {'before':>8} {'after':>8}")
    print(f"{'your text (held-out part)':<34} {before['target']:>8.3f} {after['target']:>8.3f}")
    print(f"{'Shakespeare, adapter active':<34} {before['source']:>8.3f} {after['source']:>8.3f}")
    print(f"{'Shakespeare, adapter disabled':<34} {before['source']:>8.3f} "
          f"{after['source_disabled']:>8.3f}")
    for name, texts in (("before", samples_before), ("after", samples_after)):
        for i, t in enumerate(texts):
            print(f"\n--- sample {i + 1} {name} (prompt {prompt!r}) ---\n{prompt}{t}")
    print(f"\nadapter saved to {a.out} (reload: PeftModel.from_pretrained(load_model(base), DIR))")


def main(argv=None):
    try:
        a = parse_args(argv)
        result = adapt_file(a)
    except BadInput as e:
        print(f"adapt_text.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
