"""What each PEFT method costs per training step, in memory and at inference, beside PyTorch.

Run ``python bench/bench_peft.py`` (a few minutes; ``--quick`` for a rough look,
``--no-torch`` to skip PyTorch and Hugging Face). For both configs of ``bench.py``
(batch 32, float32) it prints one table:

* **training**: median milliseconds of one step -- forward, cross-entropy,
  backward, AdamW -- for full fine-tuning and every method, its ratio to full
  fine-tuning's step, and the trainable state (parameters + gradients + AdamW
  moments, ``accounting.memory_report`` after a step) with its ratio to full's.
  Under the full and LoRA rows, the same step in PyTorch eager (``torch_reference.build_torch``)
  and in Hugging Face ``transformers`` (``OPTForCausalLM``) + ``peft``, with ours/theirs;
* **inference**: median milliseconds of one forward pass in eval mode, unmerged
  and merged, and the ratio to the base model;
* **QLoRA / LoRA**: the step-time ratio, i.e. what the NF4 base costs;
* how busy other processes kept the machine meanwhile (``bench.OtherLoad``).

Prefix and prompt tuning add 10 virtual tokens, so their rows use 54 real tokens
(54 + 10 = the context of 64); a full fine-tuning row and a base row at seq 54 are
there to compare them with. Contestants run in alternating blocks of steps
(A B C A B C ...), and every ratio is the median over rounds of the two blocks'
median ratio, so a shared machine whose speed drifts slows both sides alike.
Threads: 2 per side, fewer under ``taskset`` (set OPENBLAS_NUM_THREADS to match).
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from bench import (CONFIGS, SEQ, STAGE, OtherLoad, Timing, machine_line, make_batch,  # noqa: I001
                   parse_args, training_step)  # first: puts code/stage-09 on sys.path
from accounting import memory_report
from data_parallel import DataParallel, keep_freed_memory, usable_cores
from hf_export import opt_config
from minigpt import GPT
from optim import AdamW
from peft_config import ALL_LINEARS
from peft_model import (BitFitConfig, BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig,
                        PromptTuningConfig, get_peft_model)
from quantization import quantize_model
from torch_reference import torch_available

HERE = os.path.dirname(os.path.abspath(__file__))
QV = ["q_proj", "v_proj"]
NUM_VIRTUAL_TOKENS = 10
SHORT_SEQ = SEQ - NUM_VIRTUAL_TOKENS            # 54: virtual + real tokens fill the context


# ---- the contestants ----------------------------------------------------------------
def peft_builder(make_config, quantize=False, merged=False):
    """``build(config) -> model``: a fresh ``GPT(config)`` with one method attached.

    ``quantize``: NF4 base first (QLoRA); ``merged``: ``merge_adapter()`` at the end.
    """
    def build(config):
        base = GPT(config)
        if quantize:
            quantize_model(base, "nf4", ALL_LINEARS)
        model = get_peft_model(base, make_config())
        if merged:
            model.merge_adapter()
        return model
    return build


def lora(targets, **kwargs):
    return lambda: LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), **kwargs)


@dataclass(frozen=True)
class Case:
    """One row: ``build(config) -> model`` run on a batch of ``seq`` tokens.

    ``processes > 1``: the training step runs data-parallel (``data_parallel.py``).
    """
    key: str
    label: str
    build: Callable
    seq: int = SEQ
    processes: int = 1


houlsby = lambda: BottleneckConfig(bottleneck_size=16, placement="houlsby")  # noqa: E731
parallel = lambda: BottleneckConfig(bottleneck_size=16, placement="parallel")  # noqa: E731
prefix = lambda: PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)  # noqa: E731
prompt = lambda: PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)  # noqa: E731

TRAINING = [
    Case("full", "full fine-tuning", GPT),
    Case("full_54", f"full fine-tuning, seq {SHORT_SEQ}", GPT, SHORT_SEQ),
    Case("lora_qv", "LoRA r=8 q,v", peft_builder(lora(QV))),
    Case("lora_all", "LoRA r=8 all linears", peft_builder(lora(ALL_LINEARS))),
    Case("dora", "DoRA r=8 all linears", peft_builder(lora(ALL_LINEARS, use_dora=True))),
    Case("qlora", "QLoRA r=8 all (NF4 base)", peft_builder(lora(ALL_LINEARS), quantize=True)),
    Case("ia3", "(IA)3 k,v,fc2", peft_builder(IA3Config)),
    Case("houlsby", "adapters houlsby b=16", peft_builder(houlsby)),
    Case("parallel", "adapters parallel b=16", peft_builder(parallel)),
    Case("prefix", "prefix tuning P=10", peft_builder(prefix), SHORT_SEQ),
    Case("prompt", "prompt tuning P=10", peft_builder(prompt), SHORT_SEQ),
    Case("bitfit", "BitFit", peft_builder(BitFitConfig)),
    Case("full_dp", "full, data-parallel", GPT, processes=usable_cores()),
    Case("lora_qv_dp", "LoRA q,v, data-parallel", peft_builder(lora(QV)),
         processes=usable_cores()),
    Case("lora_all_dp", "LoRA all, data-parallel", peft_builder(lora(ALL_LINEARS)),
         processes=usable_cores()),
]
INFERENCE = [
    Case("base", "base model", GPT),
    Case("base_54", f"base model, seq {SHORT_SEQ}", GPT, SHORT_SEQ),
    Case("lora_qv", "LoRA q,v unmerged", peft_builder(lora(QV))),
    Case("lora_all", "LoRA all unmerged", peft_builder(lora(ALL_LINEARS))),
    Case("lora_all_merged", "LoRA all merged", peft_builder(lora(ALL_LINEARS), merged=True)),
    Case("ia3", "(IA)3 unmerged", peft_builder(IA3Config)),
    Case("ia3_merged", "(IA)3 merged", peft_builder(IA3Config, merged=True)),
    Case("dora", "DoRA all unmerged", peft_builder(lora(ALL_LINEARS, use_dora=True))),
    Case("dora_merged", "DoRA all merged",
         peft_builder(lora(ALL_LINEARS, use_dora=True), merged=True)),
    Case("houlsby", "adapters houlsby (serial)", peft_builder(houlsby)),
    Case("parallel", "adapters parallel", peft_builder(parallel)),
    Case("prefix", "prefix tuning P=10", peft_builder(prefix), SHORT_SEQ),
    Case("prompt", "prompt tuning P=10", peft_builder(prompt), SHORT_SEQ),
]
# PyTorch contestants, each printed under the row of ours it is compared with
TORCH = {"full": [("torch_full", "PyTorch eager (bench.py)"), ("hf_full", "HF OPTForCausalLM")],
         "lora_qv": [("hf_lora_qv", "HF peft LoRA q,v")],
         "lora_all": [("hf_lora_all", "HF peft LoRA all")],
         "full_dp": [("torch_full", "PyTorch eager (bench.py)")],
         "lora_qv_dp": [("hf_lora_qv", "HF peft LoRA q,v")],
         "lora_all_dp": [("hf_lora_all", "HF peft LoRA all")]}


def forward_ms(model, tokens) -> float:
    start = time.perf_counter()
    model.forward(tokens)                                   # (B, T, V)
    return 1e3 * (time.perf_counter() - start)


@dataclass(frozen=True)
class Schedule:
    rounds: int
    steps: int
    settle: float = 0.0                         # seconds of pause before each block


# (training, inference) per config; a pause before each training block, where our
# steps alternate with the PyTorch child's
SCHEDULES = {"a": (Schedule(5, 8, 0.3), Schedule(5, 10)),
             "b": (Schedule(4, 4, 0.3), Schedule(4, 5))}
QUICK = {"a": (Schedule(2, 3, 0.3), Schedule(2, 5)), "b": (Schedule(2, 2, 0.3), Schedule(2, 2))}


def in_blocks(contestants: dict, schedule: Schedule) -> dict:
    """``{name: (rounds, steps) array of ms}`` for every ``fn() -> ms``.

    In each round every contestant in turn runs a block: a pause of ``settle``
    seconds, one untimed call, then ``steps`` timed ones. Blocks, as in
    ``bench.benchmark_config``, because BLAS and OpenMP worker threads keep
    spinning for a while after their library's call and would slow whatever runs
    next, in this process or in the PyTorch child.
    """
    times = {name: [] for name in contestants}
    for _ in range(schedule.rounds):
        for name, fn in contestants.items():
            time.sleep(schedule.settle)
            fn()
            times[name].append([fn() for _ in range(schedule.steps)])
    return {name: np.array(t) for name, t in times.items()}


# ---- the PyTorch side, in a child interpreter -----------------------------------------
def _torch_child():
    """Build the PyTorch contestants, then time one step per name read from stdin.

    Runs as ``python -E -c <this source>`` in an empty directory (``TorchSide``), so
    ``import peft`` finds Hugging Face's package, not our peft.py; our directory is
    appended to ``sys.path`` only afterwards (bench/ for ``torch_reference.build_torch``,
    code/stage-09 for the model it builds).
    """
    import json
    import sys
    import time
    import warnings
    setup = json.loads(sys.stdin.readline())
    warnings.filterwarnings("ignore")
    import torch
    import torch.nn.functional as F
    versions = {"torch": torch.__version__}
    try:
        import peft
        import transformers
        versions.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        peft = transformers = None
    sys.path.extend(setup["paths"])
    from torch_reference import build_torch
    from data_parallel import keep_freed_memory
    keep_freed_memory()                         # as in the parent: no page faults on reuse
    from minigpt import GPTConfig
    V = setup["opt_config"]["vocab_size"]

    def hf_step(lora_targets=None):
        torch.manual_seed(0)
        model = transformers.OPTForCausalLM(transformers.OPTConfig.from_dict(setup["opt_config"]))
        if lora_targets:
            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16,
                                                               target_modules=lora_targets))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step(tokens, targets):
            optimizer.zero_grad()
            logits = model(input_ids=tokens, use_cache=False).logits        # (B, T, V)
            F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)).backward()
            optimizer.step()
        return step

    steps = {"torch_full": build_torch(GPTConfig.from_dict(setup["config"]))}
    torch.set_num_threads(setup["threads"])                 # after build_torch, which sets 2
    if peft is not None:
        steps.update(hf_full=hf_step(), hf_lora_qv=hf_step(setup["qv"]),
                     hf_lora_all=hf_step(setup["all_linears"]))
    print(json.dumps({"versions": versions, "built": sorted(steps)}), flush=True)
    tokens, targets = torch.tensor(setup["tokens"]), torch.tensor(setup["targets"])
    for line in sys.stdin:
        start = time.perf_counter()
        steps[line.strip()](tokens, targets)
        print(1e3 * (time.perf_counter() - start), flush=True)


class TorchSide:
    """The PyTorch and Hugging Face contestants, alive in a child process.

    In this process ``import peft`` would find our peft.py (code/stage-09 is on
    ``sys.path``), so Hugging Face's ``peft`` lives in a child started with ``-E``
    (no PYTHONPATH) in an empty directory. ``step(name)`` asks it for one step and
    returns the milliseconds the child measured, so the pipe costs nothing.
    """

    def __init__(self, config, tokens, targets):
        self._dir = tempfile.TemporaryDirectory()
        source = inspect.getsource(_torch_child) + "\n_torch_child()\n"
        self.proc = subprocess.Popen([sys.executable, "-E", "-c", source], cwd=self._dir.name,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        setup = dict(paths=[HERE, STAGE], threads=threads(), config=config.to_dict(),
                     opt_config=opt_config(config), tokens=tokens.tolist(),
                     targets=targets.tolist(), qv=QV, all_linears=list(ALL_LINEARS))
        hello = json.loads(self._ask(json.dumps(setup)))
        self.versions, self.built = hello["versions"], hello["built"]

    def _ask(self, line) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the PyTorch child died (exit code {self.proc.wait()}); "
                               f"its error is printed above")
        return answer

    def step(self, name) -> float:
        return float(self._ask(name))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self._dir.cleanup()


# ---- one config -------------------------------------------------------------------------
def ratios(times, ref) -> dict:
    """``{name: median over rounds of (its block's median / ref's block's median)}``."""
    med = {name: np.median(t, axis=1) for name, t in times.items()}         # (rounds,)
    return {name: float(np.median(m / med[ref])) for name, m in med.items()}


def timings(times) -> dict:
    return {name: Timing.of(t.ravel()) for name, t in times.items()}


def bench_training(config, schedule, torch_side=None) -> dict:
    """Time every ``TRAINING`` row (and the PyTorch ones) in blocks; count their state."""
    batches = {seq: make_batch(config, seq=seq) for seq in {c.seq for c in TRAINING}}
    models, contestants, opened = {}, {}, []
    try:
        for case in TRAINING:
            model = case.build(config)
            optimizer = AdamW(model, lr=1e-3)
            stepper = model                             # what training_step runs
            if case.processes > 1:
                stepper = DataParallel(model, case.processes)
                opened.append(stepper)
            models[case.key] = model, optimizer
            contestants[case.key] = lambda m=stepper, o=optimizer, b=batches[case.seq]: (
                training_step(m, b[0], b[1], o))
        for name in torch_side.built if torch_side else []:
            contestants[name] = lambda n=name: torch_side.step(n)
        times = in_blocks(contestants, schedule)
    finally:
        for parallel in opened:
            parallel.close()
    state = {k: memory_report(m, opt)["trainable_state"] for k, (m, opt) in models.items()}
    ours_over = {f"{key} / {name}": ratios(times, name)[key]   # ours / theirs
                 for key, pairs in TORCH.items() for name, _ in pairs if name in times}
    return dict(times=timings(times), x_full=ratios(times, "full"), state=state,
                ours_over=ours_over, qlora_over_lora=ratios(times, "lora_all")["qlora"])


def bench_inference(config, schedule) -> dict:
    """Time one eval-mode forward of every ``INFERENCE`` row, in alternating blocks."""
    tokens = {seq: make_batch(config, seq=seq)[0] for seq in {c.seq for c in INFERENCE}}
    contestants = {}
    for case in INFERENCE:
        model = case.build(config).eval()
        contestants[case.key] = lambda m=model, t=tokens[case.seq]: forward_ms(m, t)
    times = in_blocks(contestants, schedule)
    return dict(times=timings(times), x_base=ratios(times, "base"))


# ---- printing ---------------------------------------------------------------------------------
def _timing(t: Timing, digits=1) -> str:
    return f"{t.median_ms:>9.{digits}f}" + f"{f'({t.min_ms:.1f}-{t.max_ms:.1f})':>18}"


def print_training(train):
    head = (f"{'training step':<30}{'seq':>4}{'ms/step':>9}{'(min-max)':>18}{'x full':>8}"
            f"{'trainable state B':>19}{'x full':>8}{'ours/this':>10}")
    print(head + "\n" + "-" * len(head))
    for case in TRAINING:
        state, x_full = train["state"][case.key], train["x_full"][case.key]
        print(f"{case.label:<30}{case.seq:>4}{_timing(train['times'][case.key])}{x_full:>8.2f}"
              f"{state:>19,}{state / train['state']['full']:>8.2%}")
        for name, label in TORCH.get(case.key, []):
            if name in train["times"]:
                print(f"{'  ' + label:<30}{SEQ:>4}{_timing(train['times'][name])}{'':>35}"
                      f"{train['ours_over'][f'{case.key} / {name}']:>10.2f}")
    print(f"QLoRA / LoRA (all linears) step: {train['qlora_over_lora']:.2f}x "
          f"(the NF4 base: QuantizedLinear dequantizes and multiplies, forward and backward)")


def print_inference(infer):
    head = (f"{'inference (forward, eval mode)':<30}{'seq':>4}{'ms':>9}{'(min-max)':>18}"
            f"{'x base':>8}")
    print(head + "\n" + "-" * len(head))
    for case in INFERENCE:
        print(f"{case.label:<30}{case.seq:>4}{_timing(infer['times'][case.key], 2)}"
              f"{infer['x_base'][case.key]:>8.2f}")


def targets(results) -> list:
    """The issues' targets as ``(label, measured, limit, passed)``."""
    checks = []
    for key in results:
        train, infer = results[key]["train"], results[key]["infer"]
        c = f"({key})"
        if key == "b":
            for lo in ("lora_qv", "lora_all"):
                checks.append((f"{c} {lo} step / full step", train["x_full"][lo], 0.8))
        for lo in ("lora_qv", "lora_all"):
            frac = train["state"][lo] / train["state"]["full"]
            checks.append((f"{c} {lo} trainable state / full's", frac, 0.02))
        checks.append((f"{c} merged LoRA forward / base", infer["x_base"]["lora_all_merged"], 1.05))
        limit = 0.9 if key == "a" else 1.0
        for pair, value in train["ours_over"].items():
            if pair.split(" / ")[1] != "hf_full":           # HF's OPT: a different model
                checks.append((f"{c} {pair}", value, limit))
    return [(label, value, limit, value <= limit) for label, value, limit in checks]


def threads() -> int:
    """Threads per side: 2, or the cores ``taskset`` leaves us if fewer."""
    return min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)


def run_config(config, schedules, with_torch):
    """Training (beside the PyTorch side), then inference, on one config.

    Returns ``(result, versions)``; ``result["other"]`` is the share of the cores
    that other processes kept busy meanwhile (``bench.OtherLoad``; our PyTorch child
    and data-parallel workers count as ours), or None where /proc/stat is absent.
    """
    versions = {}
    with OtherLoad() as load:                               # children are waited for inside
        torch_side = TorchSide(config, *make_batch(config)) if with_torch else None
        try:
            train = bench_training(config, schedules[0], torch_side)
        finally:
            if torch_side is not None:
                versions = torch_side.versions
                torch_side.close()
        infer = bench_inference(config, schedules[1])
    return dict(train=train, infer=infer, other=load.share), versions


def main(argv=None):
    args = parse_args(argv, __doc__, "skip PyTorch and Hugging Face")
    keep_freed_memory()                         # here and in the PyTorch child alike
    with_torch = not args.no_torch and torch_available()
    blas = os.environ.get("OPENBLAS_NUM_THREADS")
    print(machine_line(False) + f"; {threads()} threads per side"
          + (f" (OPENBLAS_NUM_THREADS={blas})" if blas else "")
          + ("; PyTorch in a child process" if with_torch else ""))
    results, versions = {}, {}
    for key in args.configs:
        name, config = CONFIGS[key]
        schedules = (QUICK if args.quick else SCHEDULES)[key]
        results[key], versions = run_config(config, schedules, with_torch)
        print(f"\n{name}: d_model {config.d_model}, {config.n_layers} layers, "
              f"{config.n_heads} heads, vocab {config.vocab_size}, "
              f"context {config.context_length}; batch 32, float32", flush=True)
        print_training(results[key]["train"])
        print()
        print_inference(results[key]["infer"])
        other = results[key]["other"]
        if other is not None:
            note = "  -- a shared machine: times inflated, ratios less so" if other >= 0.1 else ""
            print(f"other processes kept {other:.0%} of the cores busy meanwhile{note}", flush=True)
    if versions:
        print("\nPyTorch side: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print("\ntargets:")
    for label, value, limit, ok in targets(results):
        print(f"  {label:<44}{value:8.3f}  <= {limit:<5}{'PASS' if ok else 'MISS'}")


if __name__ == "__main__":
    main()
