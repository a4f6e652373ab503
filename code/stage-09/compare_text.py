"""The real-text comparison: adapt the Shakespeare base to *Alice* with every method.

    python code/stage-09/compare_text.py              # the main job's part (make run)
    python code/stage-09/compare_text.py --quick      # <= 2 min, writes results/text_quick/
    python code/stage-09/text_sweep.py                # the rates' choice on validation

Every run starts from the shipped character-level base (``pretrained_text/``,
trained on Shakespeare only) and trains on *Alice*'s training split. Measured:

* **learning**: *Alice*'s validation and test loss (nats per character);
* **forgetting**: the rise of Shakespeare's loss with the adapter active;
* **disabled**: Shakespeare's loss with the adapter switched off -- exactly the
  base's for every method that leaves the base's weights alone (all but full
  fine-tuning and BitFit, which train the base's own numbers);
* trainable parameters, trainable-state bytes (weights + gradients + AdamW
  moments), the saved adapter's size and the time per step.

Also: a LoRA rank sweep (q,v and every linear), the same training on 1% and 10% of
*Alice*'s training text, and the authorship task of ``text_classify.py``. Every
number a notebook or the README shows comes from this file's ``SETTINGS`` and
``METHODS`` (imported, never retyped) and from the files it writes.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")     # small matmuls; runs go in parallel
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402

import numpy as np  # noqa: E402

import jobs  # noqa: E402
from accounting import memory_report  # noqa: E402
from checkpoint import load_model  # noqa: E402
from generate import window_limit  # noqa: E402
from optim import AdamW  # noqa: E402
from peft_config import ALL_LINEARS  # noqa: E402
from peft_model import (BitFitConfig, BottleneckConfig, FullFineTuningConfig, IA3Config,  # noqa: E402
                        LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model)
from pretrain_text import PRETRAINED_TEXT_DIR as TEXT_BASE_DIR  # noqa: E402
from nn import cross_entropy  # noqa: E402
from text import ByteTokenizer, WindowSampler, corpus_splits, fixed_windows, lm_loss, windows_at  # noqa: E402
from text_classify import train_and_score  # noqa: E402
from train import train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
RESULTS_DIR = os.path.join(ROOT, "results", "text")
QUICK_DIR = os.path.join(ROOT, "results", "text_quick")      # gitignored: --quick writes here
QV = ["q_proj", "v_proj"]
VIRTUAL_TOKENS = 10   # prompt / prefix length: windows leave them room in the context
PROMPT_INIT_TEXT = "said Alice"   # prompt tuning's TEXT start: a phrase of Alice's training split
SAMPLE = {"prompt": "Alice was beginning to", "max_new_tokens": 120, "temperature": 0.8,
          "top_k": 20, "seed": 0}   # one sample per headline run (seed 0), and the base's


@dataclass(frozen=True)
class TextMethod:
    make_config: object          # (rank) -> PeftConfig
    lr: float                    # Alice: chosen by text_sweep.py on the validation splits
    lr_grid: tuple               # the rates text_sweep.py tried for Alice
    classify_lr: float = None    # authorship: chosen by text_sweep.py on validation snippets
    classify_lr_grid: tuple = ()
    quantize: bool = False       # QLoRA: NF4 base first
    why: str = ""


def _lora(targets, **kw):
    return lambda r=8: LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **kw)


@functools.lru_cache(maxsize=1)
def new_token_ids() -> tuple:
    """Byte ids in Alice's training text that Shakespeare's training text never has."""
    seen = set(np.unique(corpus_splits("shakespeare")["train"]).tolist())
    return tuple(sorted(set(np.unique(corpus_splits("alice")["train"]).tolist()) - seen))


def _lora_new_tokens(r=8):
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(ALL_LINEARS),
                      trainable_token_indices=list(new_token_ids()))


def _bottleneck(placement):
    return lambda r=None: BottleneckConfig(bottleneck_size=16, placement=placement)


def _prefix(mlp):
    return lambda r=None: PrefixTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, prefix_projection=mlp,
                                             encoder_hidden_size=64 if mlp else None)


def _prompt(init="TEXT", position="shift"):
    ids = ByteTokenizer().encode(PROMPT_INIT_TEXT).tolist() if init == "TEXT" else None
    return lambda r=None: PromptTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, prompt_tuning_init=init,
                                             prompt_tuning_init_token_ids=ids,
                                             position_convention=position)


# The ONE table (with SETTINGS below) that the runner, the notebooks and the README use.
# Rates: `python code/stage-09/text_sweep.py` on the shipped base's validation
# splits (results/text/lr_sweep/README.md): Alice's loss for ``lr``, the authorship accuracy for
# ``classify_lr``; each grid is every rate that sweep tried (it widens a grid whose best
# rate is at an end, so every chosen rate has a worse rate on both sides or a stated limit).
METHODS = {
    "full": TextMethod(lambda r=None: FullFineTuningConfig(), 1e-3, (3e-4, 1e-3, 3e-3),
                       3e-4, (1e-4, 3e-4, 1e-3, 3e-3), why="every weight"),
    "lora_qv": TextMethod(_lora(QV), 1e-2, (3e-3, 1e-2, 3e-2), 1e-2, (3e-3, 1e-2, 3e-2),
                          why="LoRA r=8 on q_proj, v_proj"),
    "lora_all": TextMethod(_lora(ALL_LINEARS), 1e-2, (3e-3, 1e-2, 3e-2), 3e-3, (1e-3, 3e-3, 1e-2, 3e-2),
                           why="LoRA r=8 on every linear"),
    "dora": TextMethod(_lora(ALL_LINEARS, use_dora=True), 1e-2, (3e-3, 1e-2, 3e-2),
                       1e-2, (1e-3, 3e-3, 1e-2, 3e-2), why="DoRA r=8 on every linear"),
    "qlora": TextMethod(_lora(ALL_LINEARS), 1e-2, (3e-3, 1e-2, 3e-2),
                        1e-2, (1e-3, 3e-3, 1e-2, 3e-2), quantize=True,
                        why="LoRA r=8 on every linear over an NF4 base"),
    "lora_tokens": TextMethod(_lora_new_tokens, 1e-2, (3e-3, 1e-2, 3e-2),
                              3e-3, (1e-3, 3e-3, 1e-2, 3e-2),
                              why="LoRA r=8 on every linear + the embedding rows of Alice's new "
                                  "characters (trainable_token_indices)"),
    "ia3": TextMethod(lambda r=None: IA3Config(), 1e-1, (3e-2, 1e-1, 3e-1), 1e-1, (3e-2, 1e-1, 3e-1),
                      why="(IA)3 vectors on k, v and the fc2 input"),
    "houlsby": TextMethod(_bottleneck("houlsby"), 1e-2, (3e-3, 1e-2, 3e-2), 3e-3, (1e-3, 3e-3, 1e-2, 3e-2),
                          why="serial adapters after attention and MLP, bottleneck 16"),
    "parallel": TextMethod(_bottleneck("parallel"), 1e-2, (3e-3, 1e-2, 3e-2),
                           1e-2, (1e-3, 3e-3, 1e-2, 3e-2), why="parallel adapters, bottleneck 16"),
    "prefix": TextMethod(_prefix(False), 3e-1, (3e-2, 1e-1, 3e-1, 1e0), 1e-1, (3e-2, 1e-1, 3e-1, 1e0),
                         why=f"{VIRTUAL_TOKENS} virtual tokens, the key/value table trained directly"),
    "prefix_mlp": TextMethod(_prefix(True), 3e-2, (3e-3, 1e-2, 3e-2, 1e-1),
                             3e-2, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
                             why=f"{VIRTUAL_TOKENS} virtual tokens through a 64-unit MLP"),
    "prompt": TextMethod(_prompt("TEXT", "shift"), 3e-2, (1e-2, 3e-2, 1e-1),
                         1e-2, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
                         why=f"{VIRTUAL_TOKENS} soft input tokens, started as the embeddings of "
                             f"{PROMPT_INIT_TEXT!r} at positions 0-{VIRTUAL_TOKENS - 1}"),
    "bitfit": TextMethod(lambda r=None: BitFitConfig(), 1e-1, (1e-2, 3e-2, 1e-1, 3e-1),
                         3e-2, (1e-2, 3e-2, 1e-1), why="biases only"),
}

# Prompt-tuning starts the sweep also tries on Alice (not in the main job): the choice of
# METHODS["prompt"]'s start is made on validation like its rate.
SWEEP_VARIANTS = {
    "prompt_vocab_keep": TextMethod(_prompt("SAMPLE_VOCAB", "keep"), 1e-1, (1e-2, 3e-2, 1e-1, 3e-1),
                                    why="prompt tuning started from 10 random vocabulary rows, "
                                        "no position embedding for them"),
    "prompt_vocab_shift": TextMethod(_prompt("SAMPLE_VOCAB", "shift"), 3e-2, (1e-2, 3e-2, 1e-1),
                                     why="prompt tuning started from 10 random vocabulary rows "
                                         "at positions 0-9"),
}


def method_spec(name: str) -> TextMethod:
    return METHODS[name] if name in METHODS else SWEEP_VARIANTS[name]


@dataclass(frozen=True)
class TextSettings:
    steps: int = 80                  # optimizer steps per run (batch x window tokens each)
    batch_size: int = 16
    window: int = 64                 # tokens per training / evaluation window (<= context - 10)
    seeds: tuple = (0, 1, 2)
    ranks: tuple = (1, 4, 8, 16, 64)             # rank sweep; r=8 is the headline run
    rank_methods: tuple = ("lora_qv", "lora_all")
    rank_seeds: tuple = (0, 1)                   # the learn-forget plot's spread per rank
    fractions: tuple = (0.01, 0.1)               # of Alice's training split (1.0 is the headline)
    fraction_methods: tuple = ("full", "lora_all", "ia3")
    fraction_seeds: tuple = (0,)
    eval_windows: int = 128                      # fixed windows per split for every loss
    classify_steps: int = 30
    classify_seeds: tuple = (0, 1, 2)
    classify_train: int = 400                    # snippets per author to train on
    classify_validation: int = 100               # per author, the sweep's choice of classify_lr
    classify_test: int = 100                     # held-out snippets per author
    workers: int = 2


SETTINGS = TextSettings()
QUICK = replace(SETTINGS, steps=10, batch_size=8, window=32, seeds=(0,), ranks=(1, 8),
                rank_methods=("lora_all",), rank_seeds=(0,), fractions=(0.1,),
                fraction_methods=("lora_all",), fraction_seeds=(0,), eval_windows=8,
                classify_steps=8, classify_seeds=(0,), classify_train=20, classify_validation=10,
                classify_test=10)

# What a run costs, to hand the main job's runs out longest first (jobs.py): CPU seconds
# of one Alice run at SETTINGS' sizes per method (r=8), the share of it each unit of
# LoRA's rank above 8 adds, an authorship run's cost relative to an Alice run's, and
# the base's measurement (bench/job_costs.py measures them).
RUN_CPU_S = {"full": 15.7, "lora_qv": 12.8, "lora_all": 15.7, "dora": 17.7, "qlora": 17.3,
             "lora_tokens": 14.6, "ia3": 13.2, "houlsby": 12.3, "parallel": 14.0, "prefix": 11.9,
             "prefix_mlp": 12.6, "prompt": 12.9, "bitfit": 12.9}
RANK_SLOPE = 0.002
CLASSIFY_COST = 0.75
BASE_CPU_S = 2.8


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    steps: int
    batch_size: int
    eval_windows: int
    lr: float
    window: int = 64
    rank: int = 8
    fraction: float = 1.0
    kind: str = "adapt"              # "adapt" (Alice LM) or "classify" (text_classify.py)
    base_dir: str = TEXT_BASE_DIR
    split: str = "test"              # where results are reported; the sweep uses "validation"
    n_train: int = 0                 # classify: snippets per author
    n_test: int = 0


def window_length(config, window=None) -> int:
    """Tokens per window: ``window``, at most the context minus room for prompt tuning's
    virtual tokens (the same windows for every method, so their losses compare)."""
    longest = window_limit(config.context_length, VIRTUAL_TOKENS, VIRTUAL_TOKENS)   # shifted or not
    return longest if window is None else min(window, longest)


def build(method: str, base_dir=TEXT_BASE_DIR, rank=8, seed=0):
    """The base with ``method`` attached (QLoRA: the base quantized to NF4 first)."""
    spec = method_spec(method)
    base = load_model(base_dir)
    if spec.quantize:
        from quantization import quantize_model
        quantize_model(base, "nf4", ALL_LINEARS)
    return get_peft_model(base, spec.make_config(rank), seed=seed)


def eval_sets(config, n_windows, window=None, seed=1234):
    """Fixed windows of every split of both corpora: ``{(corpus, split): (inputs, targets)}``."""
    T = window_length(config, window)
    sets = {(c, s): fixed_windows(ids, T, n_windows, seed=seed)
            for c in ("alice", "shakespeare") for s, ids in corpus_splits(c).items() if s != "train"}
    sets.update({("alice_new_chars", s): new_char_windows(T, s) for s in ("validation", "test")})
    return sets


def train_ids(fraction: float, window: int):
    """The first ``fraction`` of Alice's training split (at least two windows' worth)."""
    ids = corpus_splits("alice")["train"]
    return ids[:max(int(round(fraction * len(ids))), 2 * (window + 1))]


def adapter_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def adapt(model, ids, steps, lr, batch_size, seed, window):
    """Train ``model`` on random windows of ``ids``: ``(optimizer, seconds per step, losses)``."""
    optimizer = AdamW(model, lr=lr)
    history = train(model, WindowSampler(ids, window, seed=seed), steps, batch_size=batch_size,
                    optimizer=optimizer, warmup_steps=max(1, steps // 20), seed=seed, progress=False)
    return optimizer, history["seconds"] / max(steps, 1), history["losses"]


def new_char_windows(window, split="test"):
    """Every non-overlapping window of Alice's ``split`` (new characters are rare: use them all)."""
    ids = corpus_splits("alice")[split]
    return windows_at(ids, np.arange(0, len(ids) - window, window), window)


def new_char_loss(model, inputs, targets, batch_size=64) -> float:
    """Mean loss on the positions whose target is a character Shakespeare never has."""
    masked = np.where(np.isin(targets, new_token_ids()), targets, -100)
    was_training, total, count = model.training, 0.0, int((masked != -100).sum())
    model.eval()
    for s in range(0, len(inputs), batch_size):
        n = int((masked[s:s + batch_size] != -100).sum())
        if n:
            total += n * cross_entropy(model.forward(inputs[s:s + batch_size]), masked[s:s + batch_size])[0]
    model.train(was_training)
    return total / max(count, 1)


def sample(model) -> str:
    """``SAMPLE``'s continuation (the adapter active)."""
    from generate import complete
    s = dict(SAMPLE)
    return complete(model, ByteTokenizer(), s.pop("prompt"), s.pop("max_new_tokens"), **s)


def losses(model, sets, split):
    """Alice and Shakespeare loss on ``split`` with the adapter active, Shakespeare's disabled."""
    row = {"alice_loss": lm_loss(model, *sets[("alice", split)]),
           "shakespeare_loss": lm_loss(model, *sets[("shakespeare", split)]),
           "new_char_loss": new_char_loss(model, *sets[("alice_new_chars", split)])}
    with model.disable_adapter():
        row["shakespeare_disabled"] = lm_loss(model, *sets[("shakespeare", split)])
    return row


def headline(spec: RunSpec) -> bool:
    """A run of the table's rows: rank 8 (or no rank), all of Alice's training text."""
    return spec.kind == "adapt" and spec.rank == 8 and spec.fraction == 1.0


def run(spec: RunSpec) -> dict:
    """One run; returns a flat dict of settings and measurements."""
    model = build(spec.method, spec.base_dir, spec.rank, spec.seed)
    window = window_length(model.config, None if spec.kind == "classify" else spec.window)
    row = {"kind": spec.kind, "method": spec.method, "rank": spec.rank, "fraction": spec.fraction,
           "seed": spec.seed, "lr": spec.lr, "steps": spec.steps, "batch_size": spec.batch_size,
           "window": window, "split": spec.split, "eval_windows": spec.eval_windows,
           "base": os.path.relpath(spec.base_dir, ROOT)}
    if spec.kind == "classify":
        row["n_train"] = spec.n_train
        scores, step_s = train_and_score(model, window, spec.steps, spec.lr, spec.batch_size,
                                         spec.seed, spec.n_train, spec.n_test, spec.split)
        row.update(scores)
    else:
        sets = eval_sets(model.config, spec.eval_windows, window)
        optimizer, step_s, _ = adapt(model, train_ids(spec.fraction, window), spec.steps, spec.lr,
                                     spec.batch_size, spec.seed, window)
        row["trainable_state_bytes"] = memory_report(model, optimizer)["trainable_state"]
        row.update(losses(model, sets, spec.split))
        if spec.seed == 0 and headline(spec) and spec.split == "test":
            row["sample"] = sample(model)
    trainable, total = model.get_nb_trainable_parameters()
    row.update({"trainable_params": trainable, "trainable_pct": 100.0 * trainable / total,
                "step_ms": 1000 * step_s, "adapter_bytes": adapter_bytes(model)})
    if spec.kind == "classify":
        return row
    if spec.split == "test" and headline(spec):    # the sweep chose on validation: report both
        row.update({f"val_{k}": v for k, v in losses(model, sets, "validation").items()})
    return row


def base_measurement(args) -> dict:
    """``base_losses`` and ``base_record`` of ``(base_dir, n_windows, window)`` (a pool task)."""
    base_dir, n_windows, window = args
    return {**base_losses(base_dir, n_windows, window), "pretraining": base_record(base_dir)}


def base_losses(base_dir, n_windows, window) -> dict:
    model = load_model(base_dir)
    sets = eval_sets(model.config, n_windows, window)
    row = {f"{c}_{s}": lm_loss(model, *sets[(c, s)]) for c, s in sets if c != "alice_new_chars"}
    row.update({f"new_char_{s}": new_char_loss(model, *sets[("alice_new_chars", s)])
                for s in ("validation", "test")})
    row["sample"] = sample(model)
    return row


def base_record(base_dir) -> dict:
    """Which base the runs started from (its pretraining report's key facts)."""
    import json
    path = os.path.join(base_dir, "pretrain_report.json")
    record = {"dir": os.path.relpath(base_dir, ROOT)}
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
        record.update({"validation_loss": report["validation"]["loss"],
                       "steps": report.get("step", report.get("settings", {}).get("steps")),
                       "snapshot_of": report.get("snapshot_of")})
    return record


CONFIG_RATES_FILE = "config_rates.csv"
CONFIG_RATES = os.path.join(RESULTS_DIR, "lr_sweep", CONFIG_RATES_FILE)


@functools.lru_cache(maxsize=None)
def config_rates(path=CONFIG_RATES) -> dict:
    """``{(method, rank, fraction): lr}`` of ``text_sweep.py --configs`` (``{}`` without the file)."""
    import csv
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {(r["method"], int(r["rank"]), float(r["fraction"])): float(r["lr"])
                for r in csv.DictReader(f)}


def config_lr(method, rank=8, fraction=1.0, fallback=False, path=CONFIG_RATES) -> float:
    """The Alice rate of ``method`` at ``rank`` on ``fraction`` of Alice's training text:
    ``METHODS[method].lr`` at rank 8 on all of it, else the validation sweep's choice for
    that configuration (``config_rates.csv``). No choice there is an error, unless
    ``fallback`` (quick runs only): then the headline rate."""
    if (rank, fraction) == (8, 1.0):
        return METHODS[method].lr
    rates = config_rates(path)
    if (method, rank, fraction) in rates:
        return rates[(method, rank, fraction)]
    if fallback:
        return METHODS[method].lr
    raise KeyError(f"no validation-chosen rate for method {method!r} at rank {rank} on fraction "
                   f"{fraction:g} of Alice in {path}; run `python code/stage-09/text_sweep.py --configs`")


def plan(s: TextSettings, methods, base_dir=TEXT_BASE_DIR, classify=True):
    """Every run of the job (``jobs.execute`` hands them out longest first), each at its
    configuration's rate (``config_lr``). The learning-rate sweep plans its own runs
    (``text_sweep.next_runs``)."""
    common = dict(steps=s.steps, batch_size=s.batch_size, eval_windows=s.eval_windows,
                  window=s.window, base_dir=base_dir)
    # QUICK (a smoke test of the code, not a measurement) may use the headline rate for a
    # configuration the sweep has not chosen a rate for; every other plan may not.
    lr = functools.partial(config_lr, fallback=s == QUICK)
    specs = [RunSpec(m, seed, lr=METHODS[m].lr, **common) for m in methods for seed in s.seeds]
    specs += [RunSpec(m, seed, lr=lr(m, r), rank=r, **common) for m in s.rank_methods
              if m in methods for r in s.ranks if r != 8 for seed in s.rank_seeds]
    specs += [RunSpec(m, seed, lr=lr(m, 8, f), fraction=f, **common) for m in s.fraction_methods
              if m in methods for f in s.fractions for seed in s.fraction_seeds]
    if classify:
        specs += [RunSpec(m, seed, s.classify_steps, s.batch_size, s.eval_windows, METHODS[m].classify_lr,
                          kind="classify", base_dir=base_dir, n_train=s.classify_train,
                          n_test=s.classify_test) for m in methods for seed in s.classify_seeds]
    return specs


def estimated_cpu_s(spec: RunSpec) -> float:
    """A run's CPU seconds, roughly (``RUN_CPU_S`` scaled to its kind, rank and size)."""
    rank = 1 + RANK_SLOPE * (spec.rank - 8) if spec.method.startswith("lora") else 1.0
    size = spec.steps * spec.batch_size * spec.window / (SETTINGS.steps * SETTINGS.batch_size
                                                         * SETTINGS.window)
    if spec.kind == "classify":
        size *= CLASSIFY_COST * SETTINGS.steps / SETTINGS.classify_steps
    return RUN_CPU_S.get(spec.method, max(RUN_CPU_S.values())) * rank * size


def run_all(specs, workers=2, progress=True):
    """Every run, ``workers`` at a time, longest first (``jobs.execute``)."""
    return jobs.execute([(run, s) for s in specs], [estimated_cpu_s(s) for s in specs], workers,
                        progress, "text runs")[0]


def parse_args(argv=None):
    """The command line, checked; ``full``: the committed job's own settings (or the whole
    sweep); ``out``: where the results may go (a quick or partial run never writes the
    committed ``results/text/``)."""
    p = argparse.ArgumentParser(description="Adapt the Shakespeare base to Alice with every method.")
    p.add_argument("--quick", action="store_true", help="one seed, short runs; writes results/text_quick/")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--lr-sweep", action="store_true",
                   help="the validation sweep's options (it runs as code/stage-09/text_sweep.py)")
    p.add_argument("--resume", action="store_true",
                   help="with --lr-sweep: keep the runs in OUT/progress.jsonl of an interrupted sweep")
    p.add_argument("--steps", type=int, default=None, help="override SETTINGS.steps (recorded)")
    p.add_argument("--workers", type=int, default=SETTINGS.workers)
    p.add_argument("--base", default=TEXT_BASE_DIR, help="the pretrained text base's directory")
    p.add_argument("--out", default=None, help="results directory (default: results/text/, "
                   "results/text/lr_sweep/ with --lr-sweep; results/text_quick/ for --quick or "
                   "any partial run)")
    a = p.parse_args(argv)
    a.methods = jobs.method_list(a.methods, METHODS)
    a.settings = QUICK if a.quick else SETTINGS
    if a.steps is not None:
        if a.steps < 1:
            raise SystemExit(f"--steps must be at least 1, got {a.steps}")
        a.settings = replace(a.settings, steps=a.steps)
    a.full = (a.settings == SETTINGS and a.methods == list(METHODS)
              and os.path.realpath(a.base) == os.path.realpath(TEXT_BASE_DIR))
    a.out = jobs.output_dir(a.out, a.full, a.lr_sweep, RESULTS_DIR, QUICK_DIR)
    a.command = " ".join(["python code/stage-09/compare_text.py"] + list(
        argv if argv is not None else sys.argv[1:]))
    return a


def comparison_job(a) -> jobs.Job:
    """The runs of ``parse_args``'s settings as one ``jobs.Job`` (``main_job.py`` runs it in
    one pool with the digit comparison)."""
    s = a.settings
    specs = plan(s, a.methods, a.base)
    os.makedirs(a.out, exist_ok=True)

    def finish(rows, base, timing):
        from text_report import update_readme, write_text_results
        write_text_results(rows, base, a.out, command=a.command, timing=timing, settings=s,
                           methods=METHODS, sweep=a.lr_sweep, sample=SAMPLE)
        if a.full and not a.lr_sweep and a.out == RESULTS_DIR:   # the README quotes these
            update_readme(os.path.join(ROOT, "README.md"), os.path.join(a.out, "results.json"))

    base_cost = BASE_CPU_S * s.eval_windows * s.window / (SETTINGS.eval_windows * SETTINGS.window)
    return jobs.Job("text", run, specs, estimated_cpu_s, base_measurement,
                    (a.base, s.eval_windows, s.window), base_cost, finish)


def main(argv=None):
    a = parse_args(argv)
    if a.lr_sweep:                   # its own loop (text_sweep imports this module, not back)
        raise SystemExit("the learning-rate sweep runs from its own file, with the same options: "
                         "python code/stage-09/text_sweep.py " + " ".join(
                             x for x in (argv if argv is not None else sys.argv[1:]) if x != "--lr-sweep"))
    jobs.run_jobs([comparison_job(a)], a.workers, a.command)


if __name__ == "__main__":
    main()
