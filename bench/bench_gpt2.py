"""GPT-2 small (124 M parameters) in NumPy: what real scale costs, measured.

    python bench/bench_gpt2.py                          # every part
    python bench/bench_gpt2.py --parts step,generation  # only these; results.json keeps the rest
    python bench/bench_gpt2.py --quick                  # a rough look (fewer steps, a shorter sweep)
    python bench/bench_gpt2.py --report-only            # README.md again from results.json

1. **Checkpoint.** ``transformers`` builds ``GPT2LMHeadModel`` with GPT-2 small's
   configuration (768 wide, 12 layers, 12 heads, context 1,024, vocabulary 50,257)
   and random weights, and saves it (``gpt2_torch_side.py make``); we load it with
   ``hf_import.load_hf_checkpoint``. No weights are downloaded: every number here is
   about cost, none about quality.
2. **One LoRA step** (r = 8 on ``c_attn``, batch 4 x 256 tokens, forward,
   cross-entropy, backward, AdamW) here and in PyTorch + ``peft`` (eager, its default
   SDPA attention) on the same checkpoint, 2 threads each (ours also as 2 processes of one
   thread, ``data_parallel.py``), in alternating blocks of
   steps (the child process times its own steps), so a machine whose speed drifts
   slows both alike. The ratio is the median over rounds of the blocks' median ratio.
   Both processes first call ``data_parallel.keep_freed_memory()``: a step allocates
   and frees the same arrays (the 206 MB logits among them) every time, and without
   it each would come back as fresh pages from the kernel on every step, on both sides.
3. **Memory** of full fine-tuning, LoRA and QLoRA, from the arrays held after one
   step (``accounting.memory_report``: weights, gradients, AdamW moments; a 4-bit
   weight counts its packed bytes), and the peak of the step's temporaries
   (``tracemalloc``, which sees NumPy's allocations).
4. **Growth** of step time and peak memory with the number of layers and the
   sequence length (LoRA on ``c_attn``, random GPT-2-small-wide models): a plot.
5. **The course's 7B and 70B tables** recomputed from the bytes per parameter
   measured in 3 (weights, gradients and optimizer state; activations excluded).
6. **Generation**: greedy tokens per second, batch 1, with ``generate.py``'s
   key/value cache and without it (a full forward over the whole sequence for every
   new token); both must pick the same tokens.

Writes ``results/bench_gpt2/results.json``, ``scaling.png`` and ``README.md`` (the tables).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "code", "stage-09"))

import numpy as np  # noqa: E402

from accounting import memory_report  # noqa: E402
from data_parallel import DataParallel, keep_freed_memory  # noqa: E402
from generate import generate, tokens_per_second  # noqa: E402
from gpt2 import GPT2LMHeadModel  # noqa: E402
from hf_import import load_hf_checkpoint  # noqa: E402
from minigpt import GPTConfig  # noqa: E402
from nn import blas_controller, cross_entropy  # noqa: E402
from optim import AdamW  # noqa: E402
from peft_model import FullFineTuningConfig, LoraConfig, get_peft_model  # noqa: E402
from quantization import quantize_model  # noqa: E402
from quantized_embedding import quantize_embeddings  # noqa: E402

BATCH, SEQ, RANK, TARGETS = 4, 256, 8, ["c_attn"]
LINEARS = ["c_attn", "c_proj", "c_fc"]
MB = 1e6
SIZES = {"7B": dict(d_model=4096, n_layers=32, params=6.74e9),     # LLaMA-2 7B / 70B shapes
         "70B": dict(d_model=8192, n_layers=80, params=68.98e9)}


def load_line() -> str:
    """Load averages, for the honest record: the machine is shared."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min) on {os.cpu_count()} cores"


# ------------------------------------------------------------ the two sides
def torch_child(args, cwd):
    """A ``gpt2_torch_side.py`` process in a clean environment (Hugging Face's peft)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return [sys.executable, "-E", os.path.join(HERE, "gpt2_torch_side.py"), *args], dict(cwd=cwd, env=env)


def make_checkpoint(directory):
    if not os.path.isfile(os.path.join(directory, "model.safetensors")):
        cmd, kw = torch_child(["make", directory], tempfile.gettempdir())
        subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    return directory


class TorchSide:
    """PyTorch + peft LoRA on the same checkpoint, alive in a child; ``step()`` -> its ms."""

    def __init__(self, checkpoint, tokens, labels, attention="sdpa"):
        self._dir = tempfile.TemporaryDirectory()
        cmd, kw = torch_child(["serve"], self._dir.name)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kw)
        setup = dict(checkpoint=checkpoint, threads=2, r=RANK, modules=TARGETS, attention=attention,
                     tokens=tokens.tolist(), labels=labels.tolist(),
                     paths=[os.path.join(ROOT, "code", "stage-09")])   # for keep_freed_memory
        self.info = self._ask(json.dumps(setup))

    def _ask(self, line) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the PyTorch child died (exit code {self.proc.wait()})")
        return json.loads(answer)

    def step(self) -> float:
        return self._ask("step")["ms"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self._dir.cleanup()


def blas_threads():
    """How many threads NumPy's BLAS uses here (``None`` if threadpoolctl cannot tell)."""
    blas = blas_controller()
    info = blas.info() if blas is not None else []
    return info[0]["num_threads"] if info else None


def make_batch(vocab_size, batch=BATCH, seq=SEQ, seed=0):
    tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq))
    return tokens, np.roll(tokens, -1, axis=1)


def train_step(model, optimizer, tokens, labels) -> float:
    """One step, as ``torch``'s: forward, mean cross-entropy, backward, AdamW. Returns ms."""
    start = time.perf_counter()
    _, dlogits = cross_entropy(model(tokens), labels)
    model.zero_grad()
    model.backward(dlogits)
    optimizer.step()
    return 1e3 * (time.perf_counter() - start)


def lora(model, targets=TARGETS):
    pm = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets))
    return pm, AdamW(pm, lr=1e-4)


# ------------------------------------------------------------ 2. the step-time ratio
def parallel_step(dp, optimizer, tokens, labels) -> float:
    """The same step with the batch split over ``dp``'s processes (``data_parallel.py``)."""
    start = time.perf_counter()
    optimizer.zero_grad()
    dp.forward_backward(tokens, labels)
    optimizer.step()
    return 1e3 * (time.perf_counter() - start)


def step_ratio(checkpoint, rounds, steps) -> dict:
    """Ours (one process, 2 BLAS threads; and two processes of one thread each, as
    ``train(..., processes=2)``) and theirs in alternating blocks, after one untimed step each.
    Here and in the PyTorch child freed memory is kept for reuse (``keep_freed_memory``)."""
    kept = keep_freed_memory()
    pm, opt = lora(load_hf_checkpoint(checkpoint))
    pm2, opt2 = lora(load_hf_checkpoint(checkpoint))
    tokens, labels = make_batch(pm.config.vocab_size)
    side = TorchSide(checkpoint, tokens, labels)
    dp = DataParallel(pm2, 2)
    contestants = {"numpy": lambda: train_step(pm, opt, tokens, labels),
                   "numpy_2proc": lambda: parallel_step(dp, opt2, tokens, labels), "torch_peft": side.step}
    times = {name: [] for name in contestants}
    loads = [load_line()]
    try:
        for fn in contestants.values():
            fn()                                            # warm-up: allocations, AdamW state
        for _ in range(rounds):
            for name, fn in contestants.items():
                times[name].append([fn() for _ in range(steps)])
            loads.append(load_line())
    finally:
        side.close()
        dp.close()
    med = {n: np.median(np.array(t), axis=1) for n, t in times.items()}          # (rounds,)
    return {"ms": {n: np.array(t).ravel().tolist() for n, t in times.items()},
            "median_ms": {n: float(np.median(t)) for n, t in times.items()},
            "ratio": float(np.median(med["numpy"] / med["torch_peft"])),
            "ratio_2proc": float(np.median(med["numpy_2proc"] / med["torch_peft"])),
            "versions": side.info, "loads": loads, "keep_freed_memory": kept,
            "blas_threads": blas_threads()}


# ------------------------------------------------------------------ 3. memory
def measured_step(model, optimizer, tokens, labels, warmup=True) -> dict:
    """One step (after a warm-up): its time, the arrays held after it, its peak of temporaries."""
    if warmup:
        train_step(model, optimizer, tokens, labels)
    held = memory_report(model, optimizer)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    ms = train_step(model, optimizer, tokens, labels)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return dict(held, step_ms=ms, step_peak=peak)


MEMORY_ROWS = {   # name -> how to prepare the loaded model
    "full fine-tuning (float32, AdamW)": lambda m: (lambda pm: (pm, AdamW(pm, lr=1e-5)))(
        get_peft_model(m, FullFineTuningConfig())),
    f"LoRA r={RANK} on c_attn (float32 base)": lambda m: lora(m),
    f"QLoRA r={RANK} on c_attn (NF4 linears)": lambda m: lora(quantize_model(m, target_modules=LINEARS)),
    f"QLoRA r={RANK} on c_attn (NF4 linears + embeddings)": lambda m: lora(
        (lambda q: (quantize_embeddings(q), q)[1])(quantize_model(m, target_modules=LINEARS))),
}


def memory_table(checkpoint) -> dict:
    rows = {}
    for name, prepare in MEMORY_ROWS.items():
        model = load_hf_checkpoint(checkpoint)
        batch = make_batch(model.config.vocab_size)
        num_params = sum(p.size for _, p in model.named_parameters())
        pm, optimizer = prepare(model)
        rows[name] = dict(measured_step(pm, optimizer, *batch), num_params=num_params,
                          trainable_params=sum(p.size for _, p in pm.named_parameters(trainable_only=True)))
        del pm, optimizer, model
    return rows


# ------------------------------------------------------------------ 4. growth
def scaling(layers, seqs, base_layers=12, base_seq=SEQ) -> list:
    """LoRA steps on random GPT-2-small-wide models: time and memory against L and T."""
    points = []
    for kind, values in (("layers", layers), ("seq", seqs)):
        for value in values:
            L, T = (value, base_seq) if kind == "layers" else (base_layers, value)
            model = GPT2LMHeadModel(GPTConfig(vocab_size=50257, context_length=1024, d_model=768,
                                              n_layers=L, n_heads=12))
            pm, optimizer = lora(model)
            row = measured_step(pm, optimizer, *make_batch(50257, seq=T), warmup=False)
            points.append(dict(kind=kind, n_layers=L, seq=T, step_ms=row["step_ms"],
                               held=row["total"], step_peak=row["step_peak"]))
            print(f"  {kind:6s} L={L:2d} T={T:4d}: {row['step_ms'] / 1e3:6.2f} s, held "
                  f"{row['total'] / MB:6.0f} MB, step peak {row['step_peak'] / MB:6.0f} MB", flush=True)
            del pm, optimizer, model
    return points


def plot_scaling(points, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind, xlabel in ((axes[0], "layers", "number of layers (T = 256)"),
                             (axes[1], "seq", "sequence length T (12 layers)")):
        pts = [p for p in points if p["kind"] == kind]
        x = [p["n_layers"] if kind == "layers" else p["seq"] for p in pts]
        ax.plot(x, [p["step_ms"] / 1e3 for p in pts], "o-", color="tab:blue", label="step time")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds per LoRA step (batch 4)", color="tab:blue")
        twin = ax.twinx()
        twin.plot(x, [(p["held"] + p["step_peak"]) / MB for p in pts], "s--", color="tab:red",
                  label="held + step peak")
        twin.set_ylabel("MB (weights held + step's temporaries)", color="tab:red")
        ax.set_title(f"GPT-2-small width, LoRA r={RANK} on c_attn: growth with {kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -------------------------------------------------------------- 5. 7B and 70B
def projections(rows) -> dict:
    """Weights + gradients + optimizer state at 7B / 70B from the bytes measured here.

    Frozen bytes per base parameter and state bytes per trainable parameter are
    measured on GPT-2 small; LoRA's trainable count is the course's: r = 8 on the
    query and value projections of every layer, ``2 r (d + d) L`` (~4 M at 7B).
    """
    out = {}
    for name, row in rows.items():
        frozen_per = row["frozen_weights"] / max(row["num_params"] - row["trainable_params"], 1)
        state_per = row["trainable_state"] / row["trainable_params"]
        out[name] = {"frozen_bytes_per_param": frozen_per, "state_bytes_per_trainable": state_per}
        for size, s in SIZES.items():
            trainable = s["params"] if name.startswith("full") else 2 * RANK * 2 * s["d_model"] * s["n_layers"]
            frozen = 0 if name.startswith("full") else s["params"]
            out[name][size] = (frozen * frozen_per + trainable * state_per) / 1e9
    return out


# ------------------------------------------------------------------ 6. generation
def generation(checkpoint, prompt_len, new_tokens, repeats) -> dict:
    """Greedy tokens per second, batch 1, with and without ``generate.py``'s key/value
    cache (best of ``repeats`` timings each), and whether both chose the same tokens."""
    model = load_hf_checkpoint(checkpoint)
    prompt = make_batch(model.config.vocab_size, batch=1, seq=prompt_len, seed=1)[0]
    out = {name: tokens_per_second(model, prompt, new_tokens, use_cache=flag, repeats=repeats)
           for name, flag in (("no cache", False), ("kv cache", True))}
    out["same tokens"] = bool(np.array_equal(generate(model, prompt, new_tokens, use_cache=True),
                                             generate(model, prompt, new_tokens, use_cache=False)))
    return dict(out, prompt=prompt_len, new_tokens=new_tokens)


# ------------------------------------------------------------------ printing
def print_memory(rows):
    print(f"\n{'GPT-2 small, one step (batch 4 x 256)':52s} {'frozen':>8s} {'trainable':>10s} {'grads':>8s}"
          f" {'AdamW':>8s} {'held':>8s} {'B/param':>8s} {'step peak':>10s} {'step s':>7s}")
    for name, r in rows.items():
        print(f"{name:52s} {r['frozen_weights'] / MB:7.1f}M {r['trainable_weights'] / MB:9.2f}M "
              f"{r['gradients'] / MB:7.2f}M {r['optimizer_state'] / MB:7.2f}M {r['total'] / MB:7.1f}M "
              f"{r['total'] / r['num_params']:8.3f} {r['step_peak'] / MB:9.0f}M {r['step_ms'] / 1e3:7.1f}")


def print_projections(proj):
    print(f"\n{'recomputed from measured bytes (no activations)':52s} {'7B':>9s} {'70B':>9s}")
    for name, p in proj.items():
        print(f"{name:52s} {p['7B']:7.1f}GB {p['70B']:7.1f}GB")


def report(results) -> str:
    """``results/bench_gpt2/README.md``: every number below comes from ``results.json``."""
    s, gen = results["step"], results["generation"]
    share = 50257 * 768 / next(iter(results["memory"].values()))["num_params"]   # GPT-2's wte
    lines = ["# GPT-2 small in NumPy: measured", "",
             "Written by `bench/bench_gpt2.py` from `results.json`; random weights saved by "
             "`transformers` (no quality is measured here). Machine: 2 cores, possibly shared with "
             "other work; each part was run at its own time (`--parts`), with the load before and "
             "after it, and its minutes:", ""]
    lines += [f"* {part}{' (`--quick`)' if v.get('quick', results.get('quick')) else ''}: "
              f"{'finished ' + v['finished'] + ', ' if 'finished' in v else ''}{v['before']} -> {v['after']}; "
              f"{v['minutes']:.1f} min" for part, v in results["loads"].items()]
    lines += ["",
             f"## One LoRA step (r = {RANK} on `c_attn`, batch {BATCH} x {SEQ}, AdamW)", "",
             "| | median seconds | steps timed |", "|---|---|---|"]
    threads = s.get("blas_threads", 2)                      # (2: set before this was recorded)
    for name, label in (("numpy", f"NumPy, one process ({threads or '?'} BLAS threads)"),
                        ("numpy_2proc", "NumPy, 2 processes x 1 thread (`train(..., processes=2)`)"),
                        ("torch_peft", "PyTorch + peft (eager, SDPA), 2 threads")):
        lines.append(f"| {label} | {s['median_ms'][name] / 1e3:.2f} | {len(s['ms'][name])} |")
    lines += ["", f"**ours / theirs = {s['ratio']:.2f}** in one process, **{s['ratio_2proc']:.2f}** with two "
              f"(target <= 1.2; median over {len(s['loads']) - 1} "
              f"rounds of alternating blocks). Versions: {s['versions']}. Load per round: "
              + "; ".join(s["loads"]) + ".", "",
              *(["Both processes keep freed memory for reuse (`data_parallel.keep_freed_memory`), so "
                 "neither pays fresh pages for its 206 MB logits every step. Ours runs the attention's "
                 "per-head matmuls and LoRA's rank-8 products on one BLAS thread (`nn.one_blas_thread`), "
                 "the projections and the head on two; elementwise NumPy runs on one core.", ""]
                if s.get("keep_freed_memory") else []),
              "## Memory after one step (arrays held) and the step's own peak", "",
              "| setup | frozen MB | trainable MB | gradients MB | AdamW MB | held MB | bytes / param | "
              "step peak MB | step s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["memory"].items():
        lines.append(f"| {name} | {r['frozen_weights'] / MB:.1f} | {r['trainable_weights'] / MB:.2f} | "
                     f"{r['gradients'] / MB:.2f} | {r['optimizer_state'] / MB:.2f} | {r['total'] / MB:.1f} | "
                     f"{r['total'] / r['num_params']:.3f} | {r['step_peak'] / MB:.0f} | {r['step_ms'] / 1e3:.1f} |")
    lines += ["", "\"step peak\": the most memory the step's temporaries (activations, logits, "
              "gradients in flight) took at once, measured with `tracemalloc`, on top of what is held.", "",
              "## The course's 7B and 70B tables, from the measured bytes", "",
              "Weights, gradients and optimizer state (no activations): frozen bytes per base parameter "
              f"and state bytes per trainable parameter as measured above; LoRA trains r = {RANK} on the "
              "query and value projections of every layer (the course's ~4 M at 7B).", "",
              f"The \"NF4 linears\" row keeps GPT-2's embedding table in float32, {100 * share:.0f} % of its "
              f"weights (50,257 x 768); at 7B (a 32,000-token table) the embeddings are "
              f"{100 * 32000 * SIZES['7B']['d_model'] / SIZES['7B']['params']:.0f} % of the weights, so that "
              "row overstates 7B and 70B and the all-NF4 row is the closer projection for either.", "",
              "| setup | frozen B / param | state B / trainable | 7B GB | 70B GB |", "|---|---|---|---|---|"]
    for name, p in results["projections"].items():
        lines.append(f"| {name} | {p['frozen_bytes_per_param']:.3f} | {p['state_bytes_per_trainable']:.1f} | "
                     f"{p['7B']:.1f} | {p['70B']:.1f} |")
    cache = "not measured (no generate.py with a cache here)" if gen.get("kv cache") is None else \
        (f"{gen['kv cache']:.1f} tokens/s, {gen['kv cache'] / gen['no cache']:.1f}x (the same tokens "
         f"as without: {gen.get('same tokens')}; `generate` decodes on one BLAS thread)")
    lines += ["", f"## Generation (greedy, batch 1, {gen.get('prompt', 32)}-token prompt, "
              f"{gen.get('new_tokens', 16)} new tokens)", "",
              f"Without a key/value cache: {gen['no cache']:.1f} tokens/s; with it: {cache}.", "",
              "## Growth", "", "![step time and memory against layers and sequence length](scaling.png)", "",
              "| varied | layers | T | step s | held MB | step peak MB |", "|---|---|---|---|---|---|"]
    for p in results["scaling"]:
        lines.append(f"| {p['kind']} | {p['n_layers']} | {p['seq']} | {p['step_ms'] / 1e3:.2f} | "
                     f"{p['held'] / MB:.0f} | {p['step_peak'] / MB:.0f} |")
    return "\n".join(lines) + "\n"


PARTS = ("step", "memory", "generation", "scaling")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, a shorter sweep")
    parser.add_argument("--checkpoint", help="a GPT-2 checkpoint folder (default: make a random GPT-2 small)")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "bench_gpt2"))
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}; "
                        "results.json keeps the other parts of an earlier run")
    parser.add_argument("--report-only", action="store_true", help="rewrite README.md from results.json")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts {args.parts!r}: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = {}
    if os.path.isfile(path):
        with open(path) as f:
            results = json.load(f)
    missing = [p for p in PARTS if p not in results]
    if args.report_only:
        if missing:
            parser.error(f"--report-only: {path} lacks the part(s) {missing}; run them with --parts")
        return write_report(results, args.out)
    checkpoint = args.checkpoint or make_checkpoint(os.path.join(tempfile.gettempdir(), "gpt2-small-random"))
    results["checkpoint"] = checkpoint
    print(f"checkpoint {checkpoint}; {load_line()}", flush=True)
    for part in parts:
        started, before = time.perf_counter(), load_line()
        results[part] = RUN[part](checkpoint, args)
        results.setdefault("loads", {})[part] = {
            "before": before, "after": load_line(), "minutes": (time.perf_counter() - started) / 60,
            "quick": args.quick, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"  ({part}: {results['loads'][part]})", flush=True)
    if "scaling" in parts:
        plot_scaling(results["scaling"], os.path.join(args.out, "scaling.png"))
    missing = [p for p in PARTS if p not in results]
    if missing:
        print(f"README.md not written: results.json lacks {missing} (run them with --parts)")
    else:
        write_report(results, args.out)
        print(f"wrote {os.path.join(args.out, 'README.md')} from {path}")


def _step(checkpoint, args):
    s = step_ratio(checkpoint, rounds=2 if args.quick else 5, steps=1 if args.quick else 2)
    print(f"LoRA r={RANK} c_attn step, batch {BATCH} x {SEQ}: NumPy ({s['blas_threads']} BLAS threads) "
          f"{s['median_ms']['numpy'] / 1e3:.2f} s, "
          f"PyTorch + peft {s['median_ms']['torch_peft'] / 1e3:.2f} s, ours/theirs {s['ratio']:.2f}; "
          f"2 processes {s['median_ms']['numpy_2proc'] / 1e3:.2f} s, {s['ratio_2proc']:.2f} "
          f"({s['versions']})", flush=True)
    return s


def _memory(checkpoint, args):
    rows = memory_table(checkpoint)
    print_memory(rows)
    print_projections(projections(rows))
    return rows


def _generation(checkpoint, args):
    g = generation(checkpoint, prompt_len=32, new_tokens=8 if args.quick else 32,
                   repeats=1 if args.quick else 2)
    print(f"greedy generation, batch 1: {g}", flush=True)
    return g


def _scaling(checkpoint, args):
    print("growth (LoRA step, batch 4):", flush=True)
    return scaling(layers=[1, 4, 12] if args.quick else [1, 2, 4, 8, 12],
                   seqs=[64, 256] if args.quick else [64, 256, 1024])


RUN = {"step": _step, "memory": _memory, "generation": _generation, "scaling": _scaling}


def write_report(results, out):
    results = dict(results, projections=projections(results["memory"]))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(report(results))


if __name__ == "__main__":
    main()
