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
import csv  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import numpy as np  # noqa: E402

import jobs  # noqa: E402
from accounting import memory_report  # noqa: E402
from checkpoint import load_model  # noqa: E402
from optim import AdamW, warmup_cosine  # noqa: E402
from peft_config import ALL_LINEARS  # noqa: E402
from peft_model import (BitFitConfig, BottleneckConfig, FullFineTuningConfig, IA3Config,  # noqa: E402
                        LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model)
from pretrain import PRETRAINED_DIR, machine  # noqa: E402
from tasks import (DOWNSTREAM_TASKS, PRETRAIN_TASKS, fixed_test_set, make_examples,  # noqa: E402
                   validation_set)
from train import eval_loss, evaluate, train_step  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "..", "..", "results")


@dataclass(frozen=True)
class MethodSpec:
    make_config: object          # () -> PeftConfig
    sweep_centre: float          # the validation sweep tries rates around this one
    quantize: bool = False       # QLoRA: NF4 base first
    why: str = ""


# Learning rates are chosen per method AND per task on the *validation* split
# (``--lr-sweep``: seed 0, 300 steps, three rates a half-decade apart centred on
# ``sweep_centre``, the single rate each method used before, and one more step along
# the ladder, up to twice, wherever the best rate is at the edge). The rate with the best
# validation accuracy wins; ties go to the one that disturbs the pretraining tasks
# least (lowest rise of their cross-entropy). The chosen table is
# results/lr_sweep/chosen.csv, read by ``learning_rate``; the test sets are scored
# only by the comparison itself. The few-parameter methods want rates 10-100x larger
# than full fine-tuning: they move few numbers from an identity (or zero) start.
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
SEEDS = (0, 1, 2)
# The rank sweep runs the first seed only: its accuracy barely moved from seed to seed
# when it had three (results/README.md's spread), and the main job must fit 20 minutes
# on 2 cores (README: "How the job is run and what it costs"); the headline runs keep all.
RANK_SWEEP_SEEDS = 1
STEPS, QUICK_STEPS = 300, 60
QUICK_SIZES = dict(n_test=100, n_forget=50, n_train=500)
# What a run costs, to hand the main job's runs out longest first (jobs.py): CPU seconds
# of one run at the comparison's sizes on DOWNSTREAM_TASKS[0] per method, a factor per
# task, the share of lora_all's cost each unit of rank above 8 adds, and the base's
# measurement (bench/job_costs.py measures them).
RUN_CPU_S = {"full": 9.7, "lora_qv": 7.6, "lora_all": 9.5, "dora": 11.6, "ia3": 7.9,
             "adapter": 8.4, "prefix": 7.5, "prefix_mlp": 6.9, "prompt": 8.9, "bitfit": 6.1,
             "qlora": 10.6}
TASK_COST = {"sort_desc": 1.0, "add3": 0.94, "is_sorted": 0.7}
RANK_SLOPE = 0.005
BASE_CPU_S = 0.4
LR_LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
SWEEP_DIR = os.path.join(RESULTS_DIR, "lr_sweep")
CHOSEN_CSV = os.path.join(SWEEP_DIR, "chosen.csv")
QUICK_DIR = os.path.join(RESULTS_DIR, "quick")     # gitignored: --quick and partial runs


SWEEP_EXTENSIONS = 2                               # extra ladder steps past an edge winner


def sweep_grid(method, width=1):
    """The ``2 * width + 1`` ladder rates centred on the method's ``sweep_centre``."""
    i = LR_LADDER.index(METHODS[method].sweep_centre)
    return LR_LADDER[max(0, i - width):i + width + 1]


def beyond_edges(chosen, tried):
    """``(method, task, lr)`` one ladder step past each winner at the edge of its tried rates."""
    extra = []
    for c in chosen:
        rates = sorted(lr for m, t, lr in tried if (m, t) == (c["method"], c["task"]))
        i = LR_LADDER.index(c["lr"])
        step = -1 if c["lr"] == rates[0] else 1 if c["lr"] == rates[-1] else 0
        if step and 0 <= i + step < len(LR_LADDER) and (c["method"], c["task"], LR_LADDER[i + step]) not in tried:
            extra.append((c["method"], c["task"], LR_LADDER[i + step]))
    return extra


@functools.lru_cache(maxsize=None)
def chosen_rates(path=CHOSEN_CSV):
    """``{(method, task): lr}`` from the validation sweep's table."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no learning-rate table at {path}; make it with "
                                "`python code/stage-09/compare.py --lr-sweep`")
    with open(path) as f:
        return {(r["method"], r["task"]): float(r["lr"]) for r in csv.DictReader(f)}


def learning_rate(method, task):
    """The validation-chosen rate for ``method`` on ``task`` (results/lr_sweep/chosen.csv)."""
    rates = chosen_rates()
    if (method, task) not in rates:
        raise KeyError(f"no chosen learning rate for method {method!r} on task {task!r} in "
                       f"{CHOSEN_CSV}; known: {sorted(rates)}")
    return rates[(method, task)]


@dataclass(frozen=True)
class RunSpec:
    """Every setting of one fine-tuning run; ``lr=None`` means the chosen rate."""
    method: str
    task: str
    seed: int
    steps: int = STEPS
    batch_size: int = 32
    n_train: int = 2000
    n_test: int = 500
    n_forget: int = 100          # per pretraining task, scored adapter on and off (forgetting)
    rank: int | None = None      # rank-sweep runs override LoRA's r
    lr: float | None = None      # --lr-sweep overrides the method's chosen rate
    split: str = "test"          # the held-out set scored: "validation" in the sweep
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.lr is None:      # the rank sweep keeps alpha/r = 2, so lora_all's rate holds
            object.__setattr__(self, "lr", learning_rate(
                "lora_all" if self.rank is not None else self.method, self.task))


def run_spec(method, task, seed=0, quick=False, **overrides) -> RunSpec:
    """The comparison's settings for one run: what notebooks and scripts train with."""
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if quick:
        overrides = {"steps": QUICK_STEPS, **QUICK_SIZES, **overrides}
    return RunSpec(method, task, seed, **overrides)


def build(spec: RunSpec, config=None):
    """The base model with this run's method attached (and quantized for QLoRA).

    ``config`` replaces the method's own config (a notebook varying one knob, e.g.
    the bottleneck size, at the method's rate); the rank sweep's configs come from
    ``spec.rank``."""
    method = METHODS[spec.method]
    base = load_model(PRETRAINED_DIR)
    if method.quantize:
        from quantization import quantize_model
        quantize_model(base, "nf4", ALL_LINEARS)
    if config is None:
        config = method.make_config()
    if spec.rank is not None:
        config = LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, target_modules=ALL_LINEARS)
    return get_peft_model(base, config, seed=spec.seed)


def pretrain_metrics(model, n):
    accs = [evaluate(model, fixed_test_set(t, n)) for t in PRETRAIN_TASKS]
    ces = [eval_loss(model, fixed_test_set(t, n)) for t in PRETRAIN_TASKS]
    return float(np.mean(accs)), float(np.mean(ces))


def finetune(spec: RunSpec, config=None):
    """Build and train one run: ``(model, optimizer, losses, per-step seconds)``.

    The one training recipe of the comparison and the notebooks: AdamW at ``spec.lr``,
    linear warm-up over the first 5% of steps then cosine decay, gradient clipping, batches drawn with ``spec.seed``
    from a fixed training set."""
    model = build(spec, config)
    optimizer = AdamW(model, lr=spec.lr)
    data = make_examples(spec.task, spec.n_train, seed=0)
    rng = np.random.default_rng(spec.seed)
    times, losses = [], []
    for step in range(spec.steps):
        optimizer.set_lr_scale(warmup_cosine(step, spec.steps, spec.steps // 20))
        batch = [data[i] for i in rng.integers(0, len(data), spec.batch_size)]
        t0 = time.perf_counter()
        loss, _ = train_step(model, optimizer, batch, grad_clip=spec.grad_clip)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return model, optimizer, losses, times


HELD_OUT = {"test": fixed_test_set, "validation": validation_set}


def run(spec: RunSpec) -> dict:
    """One fine-tuning run; returns a flat dict of measurements.

    A validation (sweep) run measures only what the choice uses: validation accuracy
    and the pretraining tasks' cross-entropy (the tie-break)."""
    model, optimizer, losses, times = finetune(spec)
    trainable, total = model.get_nb_trainable_parameters()
    row = {**asdict(spec),                   # every setting of the run, then what it measured
           "final_loss": losses[-1] if losses else float("nan"),
           "trainable_params": trainable, "total_params": total,
           "trainable_pct": 100.0 * trainable / total,
           f"{spec.split}_accuracy": evaluate(model, HELD_OUT[spec.split](spec.task, spec.n_test)),
           "step_ms": 1000 * float(np.median(times)),
           "trainable_state_bytes": memory_report(model, optimizer)["trainable_state"]}
    if spec.split == "validation":
        row["pretrain_ce"] = float(np.mean([eval_loss(model, fixed_test_set(t, spec.n_forget))
                                            for t in PRETRAIN_TASKS]))
        return row
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


def estimated_cpu_s(spec: RunSpec) -> float:
    """A run's CPU seconds, roughly (``RUN_CPU_S`` scaled to its task, rank and steps)."""
    method = "lora_all" if spec.rank is not None else spec.method
    rank = 1 + RANK_SLOPE * ((spec.rank or 8) - 8)
    return (RUN_CPU_S.get(method, max(RUN_CPU_S.values())) * TASK_COST.get(spec.task, 1.0) * rank
            * spec.steps * spec.batch_size / (STEPS * RunSpec.batch_size))


def run_all(specs, workers=2, progress=True, log=None):
    """Every run, ``workers`` at a time, longest first (``jobs.execute``); with ``log``,
    each finished row is also appended there as a JSON line (a long run that dies
    keeps what it measured)."""
    def record(_, row):
        if log:
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
    return jobs.execute([(run, s) for s in specs], [estimated_cpu_s(s) for s in specs], workers,
                        progress, "fine-tuning runs", record)[0]


def plan(methods, tasks, seeds, steps, quick=False, rank_sweep=True, lr_sweep=False):
    kw = dict(QUICK_SIZES) if quick else {}
    if lr_sweep:
        return [RunSpec(m, t, seeds[0], steps, lr=lr, split="validation", **kw)
                for m in methods for t in tasks for lr in sweep_grid(m)]
    specs = [RunSpec(m, t, s, steps, **kw) for m in methods for t in tasks for s in seeds]
    if rank_sweep and not quick:
        specs += [RunSpec("lora_all", tasks[0], s, steps, rank=r, **kw)
                  for r in RANKS if r != 8 for s in seeds[:RANK_SWEEP_SEEDS]]
    return specs


def output_dir(out, full, lr_sweep):
    """Where results go: only a full run may write the committed ``results/``."""
    return jobs.output_dir(out, full, lr_sweep, RESULTS_DIR, QUICK_DIR)


def parse_args(argv=None):
    """The command line, checked; ``full`` is True only for the committed comparison's
    own settings (or the whole sweep), and ``out`` is where the results may go."""
    p = argparse.ArgumentParser(description="Fine-tune the pretrained base with every PEFT method.")
    p.add_argument("--quick", action="store_true", help="every method, one task, one seed, short")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tasks", default=",".join(DOWNSTREAM_TASKS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="default: results/ for the full run, "
                   "results/quick/ (gitignored) for --quick or any partial run")
    p.add_argument("--no-rank-sweep", action="store_true")
    p.add_argument("--lr-sweep", action="store_true", help="instead of the comparison, sweep "
                   "learning rates on the validation split (seed 0) and write the chosen table")
    a = p.parse_args(argv)
    a.methods = jobs.method_list(a.methods, METHODS)
    a.tasks = (["add3"] if a.quick and a.tasks == ",".join(DOWNSTREAM_TASKS)
               else a.tasks.split(","))
    a.seeds = [0] if a.quick else [int(s) for s in a.seeds.split(",")]
    a.full = (not a.quick and a.steps is None and a.methods == list(METHODS)
              and a.tasks == list(DOWNSTREAM_TASKS) and (a.lr_sweep or (
                  a.seeds == list(SEEDS) and not a.no_rank_sweep)))
    a.steps = a.steps or (QUICK_STEPS if a.quick else STEPS)
    a.out = output_dir(a.out, a.full, a.lr_sweep)
    a.command = " ".join(["python code/stage-09/compare.py"] + list(
        argv if argv is not None else sys.argv[1:]))
    return a


def comparison_job(a) -> jobs.Job:
    """The comparison of ``parse_args``'s settings as one ``jobs.Job`` (``main_job.py``
    runs it in one pool with the real-text comparison)."""
    specs = plan(a.methods, a.tasks, a.seeds, a.steps, a.quick, not a.no_rank_sweep)
    n_forget = QUICK_SIZES["n_forget"] if a.quick else RunSpec.n_forget
    os.makedirs(a.out, exist_ok=True)

    def finish(rows, base, timing):
        import report
        report.write_results(rows, base, a.out, command=a.command, timing=timing)
        if a.full and a.out == RESULTS_DIR:              # the README quotes these results
            report.update_readme(os.path.join(HERE, "..", "..", "README.md"), a.out)

    return jobs.Job("digit", run, specs, estimated_cpu_s, base_metrics, n_forget,
                    BASE_CPU_S * n_forget / RunSpec.n_forget, finish,
                    log=os.path.join(a.out, "progress.jsonl"))


def lr_sweep(a):
    """``--lr-sweep``: the grid on the validation split, grown past edge winners."""
    import report
    specs = plan(a.methods, a.tasks, a.seeds, a.steps, a.quick, lr_sweep=True)
    start = time.perf_counter()
    base = base_metrics(QUICK_SIZES["n_forget"] if a.quick else RunSpec.n_forget)
    os.makedirs(a.out, exist_ok=True)
    log = os.path.join(a.out, "progress.jsonl")            # removed once the results are written
    if os.path.exists(log):
        os.remove(log)
    rows = run_all(specs, a.workers, log=log)
    for _ in range(SWEEP_EXTENSIONS):                        # the best at an edge: one step further
        tried = {(r["method"], r["task"], r["lr"]) for r in rows}
        extra = beyond_edges(report.choose_learning_rates(report.aggregate(rows, base)), tried)
        if not extra:
            break
        rows += run_all([RunSpec(m, t, a.seeds[0], a.steps, lr=lr, split="validation",
                                 **(dict(QUICK_SIZES) if a.quick else {})) for m, t, lr in extra],
                        a.workers, log=log)
    report.write_sweep(rows, base, a.out, command=a.command, machine=machine(),
                       seconds=time.perf_counter() - start)
    os.remove(log)


def main(argv=None):
    a = parse_args(argv)
    if a.lr_sweep:
        return lr_sweep(a)
    jobs.run_jobs([comparison_job(a)], a.workers, a.command)


if __name__ == "__main__":
    main()
