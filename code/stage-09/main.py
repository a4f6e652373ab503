"""Temporary main job: pretrain the mini GPT on the task mixture and report accuracy.

    cd code/stage-09 && python main.py [--steps 1500] [--save DIR]

Trains the teaching config (d_model 64, 2 layers, 4 heads, vocab 64) on the four
pretraining tasks for about half a minute on a laptop core, then prints the
exact-match accuracy of greedy answers on each task's held-out test set, a few
decoded examples, and the downstream tasks' accuracy (near zero: the model has
never seen their task tokens -- that gap is what the PEFT methods will close).
The comparison runner (``compare.py``) replaces this file later.

The 1500-step budget sits near a plateau: with seed 0 all four tasks reach
about 0.96-1.0, but other seeds can stall with ``reverse`` and ``sort`` at
0.4-0.8. A base model meant for fine-tuning should be pretrained for longer
(``--steps``) and saved once (``--save``).
"""
from __future__ import annotations

import os

# Small matrices: one BLAS thread is faster, and far faster when cores are shared.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from checkpoint import save_model  # noqa: E402
from minigpt import GPT, GPTConfig  # noqa: E402
from tasks import DOWNSTREAM_TASKS, PRETRAIN_TASKS, MixtureSampler, decode, fixed_test_set  # noqa: E402
from train import evaluate, greedy_answers, train  # noqa: E402


def main(steps=1500, batch_size=32, lr=3e-3, seed=0, save=None, progress=True):
    config = GPTConfig(vocab_size=64, context_length=64, d_model=64, n_layers=2, n_heads=4)
    model = GPT(config, seed=seed)
    n_params = sum(p.size for _, p in model.named_parameters())
    print(f"mini GPT: {n_params:,} parameters; pretraining on {', '.join(PRETRAIN_TASKS)}")
    tests = {t: fixed_test_set(t, n=200) for t in PRETRAIN_TASKS + DOWNSTREAM_TASKS}
    start = time.perf_counter()
    history = train(model, MixtureSampler(PRETRAIN_TASKS, seed=seed), steps, lr=lr,
                    batch_size=batch_size, warmup_steps=steps // 20, seed=seed, progress=progress)
    losses = history["losses"]
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s; "
          f"loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f} (mean of 10 steps)")
    print("\nexact-match accuracy on 200 held-out examples per task:")
    for name, examples in tests.items():
        kind = "pretraining" if name in PRETRAIN_TASKS else "downstream (unseen)"
        print(f"  {name:<10} {evaluate(model, examples):6.3f}   {kind}")
    print("\nsamples (prompt | greedy answer):")
    samples = [tests[t][0] for t in PRETRAIN_TASKS + DOWNSTREAM_TASKS[:1]]
    answers = greedy_answers(model, [p for p, _ in samples], [len(a) + 1 for _, a in samples])
    for (prompt, answer), got in zip(samples, answers):
        mark = "ok " if got == answer else "bad"
        print(f"  {mark} {decode(prompt)} {decode(got)}")
    if save:
        save_model(model, save)
        print(f"\nsaved to {save}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="directory for config.json + model.safetensors")
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed, save=args.save)
