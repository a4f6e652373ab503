"""How fast is one training step of the NumPy mini GPT, and how far from the hardware?

Run ``python bench/bench.py`` (about two minutes; ``--quick`` for a rough look,
``--no-torch`` to skip PyTorch). For two model sizes it prints

* the median milliseconds of one training step -- forward, cross-entropy,
  backward and the AdamW update -- with every weight trainable ("full") and with
  every weight frozen ("frozen base": gradients still flow back to the embedding
  output, all that prompt tuning needs, and there is no optimizer work), and the
  full step once more split across one process per core ("full, data-par.",
  ``data_parallel.DataParallel``: both cores busy, the same gradients);
* the same architecture in PyTorch eager, timed in the same process, and the ratio;
* the matmul FLOPs of a step counted by hand (``accounting.step_matmul_flops``), and the GFLOP/s achieved as a
  fraction of this machine's float32 matmul throughput, measured in the same run.

Contestants are timed in alternating blocks of steps (A B C A B C ...), and a
ratio is the median of the per-round ratios, so a shared machine whose speed
drifts slows both sides of a comparison alike. The last line says how busy
other processes kept the cores: quote runs where that share is near 0%.

A row is ``Row(label, build)`` with ``build(config) -> (model, optimizer)``,
``model.forward(tokens) -> logits`` and ``model.backward(dlogits)`` (or a
``DataParallel``, stepped with ``forward_backward``); an optimizer
of ``None`` means the step has no optimizer work. A PEFT method is one more
``Row`` whose ``build`` wraps ``GPT(config)``: append it to ``ROWS``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
STAGE = os.path.join(HERE, "..", "code", "stage-09")       # the course module being timed
if STAGE not in sys.path:
    sys.path.insert(1, STAGE)                               # after bench/ itself

from accounting import step_matmul_flops  # noqa: E402
from data_parallel import DataParallel, keep_freed_memory, usable_cores  # noqa: E402
from minigpt import GPT, GPTConfig  # noqa: E402
from nn import cross_entropy  # noqa: E402
from optim import AdamW  # noqa: E402
from torch_reference import build_torch, torch_available  # noqa: E402

BATCH, SEQ = 32, 64
CONFIGS = {
    "a": ("(a) teaching", GPTConfig(vocab_size=64, context_length=64, d_model=64,
                                    n_layers=2, n_heads=4)),
    "b": ("(b) d256 x4", GPTConfig(vocab_size=64, context_length=64, d_model=256,
                                   n_layers=4, n_heads=8)),
}


# ---- one training step ------------------------------------------------------
def training_step(model, inputs, targets, optimizer) -> float:
    """Run one step and return its wall time in milliseconds.

    ``optimizer.zero_grad()``, forward, cross-entropy, backward, ``optimizer.step()``
    (the optimizer calls are skipped when it is ``None``).
    """
    start = time.perf_counter()
    if optimizer is not None:
        optimizer.zero_grad()
    if isinstance(model, DataParallel):                     # the same, one slice per process
        model.forward_backward(inputs, targets)
    else:
        logits = model.forward(inputs)                      # (B, T, V)
        _, dlogits = cross_entropy(logits, targets)
        model.backward(dlogits)
    if optimizer is not None:
        optimizer.step()
    return 1e3 * (time.perf_counter() - start)


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, times_ms):
        return cls(float(np.median(times_ms)), float(np.min(times_ms)), float(np.max(times_ms)))


def time_training_step(model, inputs, targets, optimizer, repeats, warmup=2) -> Timing:
    """Median, min and max of ``repeats`` timed steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        training_step(model, inputs, targets, optimizer)
    return Timing.of([training_step(model, inputs, targets, optimizer) for _ in range(repeats)])


# ---- rows -----------------------------------------------------------------------
class FrozenBase:
    """Every weight frozen; backward stops at the embedding output, as prompt tuning needs.

    ``forward`` = ``embed`` then ``forward_embeds``; ``backward`` = ``backward_embeds``,
    which still returns dL/d(embeddings) ``(B, T, D)`` though no weight gets a gradient.
    """

    def __init__(self, model: GPT):
        self.model = model.freeze()

    def forward(self, tokens):
        return self.model.forward_embeds(self.model.embed(tokens))

    def backward(self, dlogits):
        return self.model.backward_embeds(dlogits)


def build_full(config):
    model = GPT(config)
    return model, AdamW(model, lr=1e-3)


def build_frozen(config):
    return FrozenBase(GPT(config)), None


def build_data_parallel(config):
    """Full fine-tuning with the batch split across one process per core."""
    model = GPT(config)
    return DataParallel(model, processes=usable_cores()), AdamW(model, lr=1e-3)


@dataclass
class Row:
    """One benchmark row. ``build(config) -> (model, optimizer or None)``.

    ``torch``: ``"full"`` or ``"frozen"`` times the PyTorch counterpart; ``None`` none.
    ``flops(config) -> int``: matmul FLOPs of one step, or ``None`` if not counted.
    """
    label: str
    build: Callable
    torch: str | None = None
    flops: Callable | None = None


ROWS = [
    Row("full fine-tuning", build_full, torch="full",
        flops=lambda c: step_matmul_flops(c, BATCH, SEQ, trainable=True)),
    Row("frozen base", build_frozen, torch="frozen",
        flops=lambda c: step_matmul_flops(c, BATCH, SEQ, trainable=False)),
    Row("full, data-par.", build_data_parallel, torch="full",
        flops=lambda c: step_matmul_flops(c, BATCH, SEQ, trainable=True)),
]


# ---- the matmul roofline ---------------------------------------------------------
def matmul_gflops(n=2048, repeats=5) -> float:
    """float32 GFLOP/s of an ``n x n`` by ``n x n`` NumPy matmul (best of ``repeats``)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


# ---- PyTorch reference (torch_reference.py) ------------------------------------------
class _TorchContestant:
    """A PyTorch step behind the same ``forward``/``backward`` face as our rows."""

    def __init__(self, config, frozen):
        import torch
        self.torch, self.step = torch, build_torch(config, frozen)

    def run(self, inputs, targets):
        start = time.perf_counter()
        self.step(self.torch.from_numpy(inputs), self.torch.from_numpy(targets))
        return 1e3 * (time.perf_counter() - start)


# ---- driver ------------------------------------------------------------------------
def make_batch(config: GPTConfig, batch=BATCH, seq=SEQ, seed=0):
    """Random tokens ``(batch, seq)`` and their next-token targets."""
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq + 1))
    return tokens[:, :-1].copy(), tokens[:, 1:].copy()


def benchmark_config(name, config, rows=ROWS, rounds=4, steps=8, with_torch=True,
                     peak_gflops=None, settle=0.3) -> list[dict]:
    """Time every row (and its PyTorch counterpart) on one config, in alternating blocks.

    Each of ``rounds`` rounds gives every contestant in turn a block: a pause of
    ``settle`` seconds, one untimed step, then ``steps`` timed ones. Blocks rather
    than single steps, because BLAS and OpenMP worker threads keep spinning for a
    while after their library's call and would slow whichever step comes next.
    Returns one dict per row: ``ours``/``torch`` ``Timing`` (``torch`` is ``None``
    when not timed), ``ratio`` (median over rounds of the two blocks' median
    ratio), ``flops``, ``gflops``, ``peak_fraction``.
    """
    inputs, targets = make_batch(config)
    contestants = []                            # (row index, "ours" | "torch", run)
    opened = []                                 # models holding processes: closed at the end
    try:
        for i, row in enumerate(rows):
            model, optimizer = row.build(config)
            if hasattr(model, "close"):
                opened.append(model)
            contestants.append((i, "ours", lambda m=model, o=optimizer:
                                training_step(m, inputs, targets, o)))
            if with_torch and row.torch is not None:
                theirs = _TorchContestant(config, frozen=row.torch == "frozen")
                contestants.append((i, "torch", lambda t=theirs: t.run(inputs, targets)))
        blocks = {(i, side): [] for i, side, _ in contestants}  # per round: that block's times
        for _ in range(rounds):
            for i, side, run in contestants:
                time.sleep(settle)
                run()                                           # warm-up after the switch
                blocks[(i, side)].append([run() for _ in range(steps)])
    finally:
        for model in opened:
            model.close()
    results = []
    for i, row in enumerate(rows):
        ours, theirs = blocks[(i, "ours")], blocks.get((i, "torch"))
        ours_t = Timing.of(np.concatenate(ours))
        ratio = None
        if theirs:
            ratio = float(np.median([np.median(a) / np.median(b) for a, b in zip(ours, theirs)]))
        flops = row.flops(config) if row.flops is not None else None
        gflops = flops / ours_t.median_ms / 1e6 if flops else None
        results.append(dict(
            config=name, row=row.label, ours=ours_t,
            torch=Timing.of(np.concatenate(theirs)) if theirs else None, ratio=ratio,
            flops=flops, gflops=gflops,
            peak_fraction=gflops / peak_gflops if gflops and peak_gflops else None))
    return results


def _cell(value, spec, width):
    """``value`` formatted with ``spec``, right-aligned in ``width``; ``-`` when absent."""
    return f"{'-' if value is None else format(value, spec):>{width}}"


def print_table(results, peak_gflops):
    header = (f"{'config':<14}{'row':<18}{'ours ms':>9}{'(min-max)':>16}{'torch ms':>10}"
              f"{'ours/torch':>11}{'GFLOP':>7}{'GFLOP/s':>9}{'of peak':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        ours, theirs = r["ours"], r["torch"]
        print(f"{r['config']:<14}{r['row']:<18}{ours.median_ms:>9.1f}"
              + f"{f'({ours.min_ms:.1f}-{ours.max_ms:.1f})':>16}"
              + _cell(theirs.median_ms if theirs else None, ".1f", 10)
              + _cell(r["ratio"], ".2f", 11)
              + _cell(r["flops"] / 1e9 if r["flops"] else None, ".2f", 7)
              + _cell(r["gflops"], ".1f", 9)
              + _cell(r["peak_fraction"], ".0%", 8))
    print(f"float32 matmul throughput (NumPy, 2048 x 2048 x 2048): {peak_gflops:.0f} GFLOP/s")


def print_targets(results):
    """The issue's targets, each with its measured value."""
    by = {(r["config"], r["row"]): r for r in results}
    checks = []
    for key, limit in (("a", 0.9), ("b", 1.0)):
        for row, how in (("full fine-tuning", "one process"), ("full, data-par.", "data-parallel")):
            r = by.get((CONFIGS[key][0], row))
            if r and r["ratio"]:
                checks.append((f"({key}) full, {how}: ours/torch <= {limit}", r["ratio"],
                               r["ratio"] <= limit))
    b_full = by.get((CONFIGS["b"][0], "full fine-tuning"))
    b_frozen = by.get((CONFIGS["b"][0], "frozen base"))
    if b_full and b_frozen:
        frac = b_frozen["ours"].median_ms / b_full["ours"].median_ms
        checks.append(("(b) frozen step / full step <= 0.75", frac, frac <= 0.75))
    for row, how in (("full fine-tuning", "one process"), ("full, data-par.", "data-parallel")):
        r = by.get((CONFIGS["b"][0], row))
        if r and r["peak_fraction"]:
            frac = r["peak_fraction"]
            checks.append((f"(b) full, {how}: >= 50% of matmul peak", frac, frac >= 0.5))
    print("\ntargets:")
    for label, value, ok in checks:
        print(f"  {label:<46}{value:6.2f}  {'met' if ok else 'MISSED'}")


def _busy_seconds():
    """CPU seconds spent busy by the whole machine so far (None where /proc/stat is absent)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")   # minus idle, iowait


class OtherLoad:
    """Share of the machine's cores that *other* processes kept busy meanwhile.

    Timings on a shared machine are only as good as this number is small. Our own
    child processes (data-parallel workers, a PyTorch child) count as ours once they
    have ended and been waited for, which is why they are closed inside the block.
    """

    @staticmethod
    def _own_cpu(t):
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self):
        self.busy, self.own, self.wall = _busy_seconds(), os.times(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy, own = _busy_seconds(), os.times()
        self.share = None
        if busy is not None and self.busy is not None:
            own_cpu = self._own_cpu(own) - self._own_cpu(self.own)
            wall = time.perf_counter() - self.wall
            self.share = max(0.0, (busy - self.busy - own_cpu) / (wall * (os.cpu_count() or 1)))


def machine_line(with_torch) -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = f"numpy {np.__version__}"
    if with_torch:
        import torch
        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    return (f"machine: {os.cpu_count()} cores, {cpu}; Python {platform.python_version()}, "
            f"{versions}; batch {BATCH} x seq {SEQ}, float32")


def parse_args(argv, doc, torch_help):
    """The benchmarks' shared command line: ``--quick``, ``--no-torch``, ``--configs``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (rough numbers)")
    parser.add_argument("--no-torch", action="store_true", help=torch_help)
    parser.add_argument("--configs", default="ab", help="which configs to run: a, b or ab")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv, __doc__, "skip the PyTorch comparison")
    keep_freed_memory()       # for every contestant alike: no page faults on reused memory
    with_torch = not args.no_torch and torch_available()
    if with_torch:
        build_torch(CONFIGS["a"][1])                        # sets torch's 2 threads now
    print(machine_line(with_torch), flush=True)
    blocks = {"a": (2, 5) if args.quick else (5, 10), "b": (2, 2) if args.quick else (4, 4)}
    results = []
    with OtherLoad() as load:
        peak = matmul_gflops()
        for key in args.configs:
            name, config = CONFIGS[key]
            rounds, steps = blocks[key]
            results += benchmark_config(name, config, rounds=rounds, steps=steps,
                                        with_torch=with_torch, peak_gflops=peak)
        peak = max(peak, matmul_gflops())                   # the better of before and after
    for r in results:
        r["peak_fraction"] = r["gflops"] / peak if r["gflops"] else None
    print()
    print_table(results, peak)
    print_targets(results)
    print("(a frozen-base step has no optimizer work: nothing in it is trainable)")
    if load.share is not None:
        note = "" if load.share < 0.1 else "  -- a busy machine: times are inflated, ratios less so"
        print(f"other processes kept {load.share:.0%} of the cores busy during the run{note}")


if __name__ == "__main__":
    main()
