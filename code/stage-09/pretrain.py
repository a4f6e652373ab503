"""Regenerate the shipped pretrained base: ``python code/stage-09/pretrain.py``.

PEFT only makes sense on a model that already knows something. This script
trains the mini GPT on the pretraining mixture of ``tasks.py`` (copy, reverse,
sort, add1) until every task scores at least 99% exact match on its held-out
test set, then writes ``pretrained/`` (``model.safetensors`` + ``config.json``)
and ``pretrained/pretrain_report.json`` (accuracies, steps, time, machine).

Everything is seeded and runs on one BLAS thread, so the same seed gives the
same weights and the same accuracies. The downstream tasks (sort_desc, add3,
is_sorted) are never trained here; ``compare.py`` fine-tunes on them.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")     # determinism and speed on small matmuls
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from checkpoint import atomic_directory, save_json, save_model  # noqa: E402
from minigpt import GPT, GPTConfig  # noqa: E402
from tasks import PRETRAIN_TASKS, VOCAB_SIZE, MixtureSampler, fixed_test_set  # noqa: E402
from train import evaluate, train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAINED_DIR = os.path.join(HERE, "pretrained")
BASE_CONFIG = GPTConfig(vocab_size=VOCAB_SIZE, context_length=64, d_model=64, n_layers=4,
                        n_heads=4)
TARGET_ACCURACY = 0.99


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"


def pretrain(steps=6000, batch_size=64, lr=3e-3, seed=0, out=PRETRAINED_DIR, progress=True,
             test_size=500):
    model = GPT(BASE_CONFIG, seed=seed)
    n_params = sum(p.size for _, p in model.named_parameters())
    print(f"pretraining a {n_params:,}-parameter mini GPT on {', '.join(PRETRAIN_TASKS)} "
          f"for {steps} steps (batch {batch_size}, lr {lr}, seed {seed})")
    start = time.perf_counter()
    history = train(model, MixtureSampler(PRETRAIN_TASKS, seed=seed), steps, lr=lr,
                    batch_size=batch_size, warmup_steps=max(1, steps // 30), seed=seed,
                    progress=progress, weight_decay=0.01)
    seconds = time.perf_counter() - start
    accuracies = {t: evaluate(model, fixed_test_set(t, n=test_size)) for t in PRETRAIN_TASKS}
    for task, acc in accuracies.items():
        print(f"  {task:<8} {acc:.4f}")
    print(f"{steps} steps in {seconds:.0f} s; final loss {np.mean(history['losses'][-50:]):.4f}")
    low = {t: a for t, a in accuracies.items() if a < TARGET_ACCURACY}
    if low:
        raise SystemExit(f"below the {TARGET_ACCURACY:.0%} target on {low}: not saving")
    if out:
        with atomic_directory(out) as tmp:       # weights, config and report: all or none
            save_model(model, tmp)
            save_json(os.path.join(tmp, "pretrain_report.json"), {
                "command": f"python code/stage-09/pretrain.py --steps {steps} --seed {seed}",
                "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                "parameters": n_params, "seconds": round(seconds, 1), "machine": machine(),
                "test_accuracy": accuracies, "test_examples_per_task": test_size,
                "final_loss": float(np.mean(history["losses"][-50:]))})
        print(f"saved to {out}")
    return model, accuracies


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=PRETRAINED_DIR, help="directory to write ('' to skip)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    pretrain(a.steps, a.batch_size, a.lr, a.seed, a.out or None, not a.no_progress)


if __name__ == "__main__":
    main()
