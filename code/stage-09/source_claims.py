"""The source documents' claims, recomputed: the numbers of ``docs/SOURCES.md``.

    python code/stage-09/source_claims.py           # print the table
    python code/stage-09/source_claims.py --write   # put it into docs/SOURCES.md

Every number in the table's "here" column comes from this file: arithmetic from
``accounting.py``'s calculators, bits per parameter measured on a real NF4 tensor,
and the two experiments' outputs (``results/qat/runs.csv``, ``results/alpha_r/runs.csv``).
``tests/test_source_claims.py`` fails when ``docs/SOURCES.md`` differs from what this
file prints, and asserts the verdicts (a claim called wrong is wrong by these numbers).

Published model sizes are computed from their architectures, never typed in:
LLaMA-7B and -65B with ``accounting.llama_parameter_count``, BERT and GPT-2 with the
two small counters below. GPT-3 is "175B" as its paper names it.
"""
from __future__ import annotations

import csv
import os
import sys

import numpy as np

from accounting import (compare_peft_methods, estimate_finetune_memory, llama_parameter_count,
                        step_matmul_flops)
from alpha_scaling import RANKS, best_lr_spread, rank_sensitivity, read_runs
from minigpt import GPT
from nf4 import quantize_nf4
from pretrain import BASE_CONFIG

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
SOURCES_MD = os.path.join(ROOT, "docs", "SOURCES.md")
BEGIN, END = "<!-- begin: source_claims.py -->", "<!-- end: source_claims.py -->"
GPT3 = 175e9
GPT3_SHAPE = dict(d_model=12288, num_layers=96, num_heads=96)      # Brown et al. 2020, Table 2.1


def bert_parameter_count(d_model, num_layers, vocab=30522, positions=512, types=2) -> dict:
    """BERT (Devlin et al. 2019): embeddings + LN, layers (attention, FFN 4d, two LNs), pooler."""
    per_layer = 4 * (d_model * d_model + d_model) + 2 * 2 * d_model \
        + (d_model * 4 * d_model + 4 * d_model) + (4 * d_model * d_model + d_model)
    total = (vocab + positions + types) * d_model + 2 * d_model + num_layers * per_layer \
        + d_model * d_model + d_model
    biases = num_layers * (4 + 4 + 1 + 2) * d_model + d_model + d_model  # + embedding LN, pooler
    return {"total": total, "biases": biases}


def gpt2_parameter_count(d_model, num_layers, vocab=50257, positions=1024) -> int:
    """GPT-2 (Radford et al. 2019), tied head: embeddings, 12 d^2 + 13 d per layer, final LN."""
    return (vocab + positions) * d_model + num_layers * (12 * d_model ** 2 + 13 * d_model) \
        + 2 * d_model


def houlsby_adapter_params(d_model, num_layers, bottleneck) -> int:
    """Two adapters per layer, each down + up projection with biases (Houlsby et al. 2019)."""
    return num_layers * 2 * (2 * d_model * bottleneck + d_model + bottleneck)


def lora_all_linear_params(d_model, num_layers, d_ff, r) -> int:
    """LoRA on q, k, v, o and the gated MLP's three projections of a LLaMA-style layer."""
    return num_layers * r * (4 * 2 * d_model + 3 * (d_model + d_ff))


def nf4_bits_per_parameter(double_quant=True, shape=(1024, 1024), blocksize=64) -> float:
    """Measured: stored bits per weight of a real NF4 tensor (codes + block constants)."""
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return quantize_nf4(w, blocksize, double_quant).bits_per_parameter()


def _read(path):
    path = os.path.join(ROOT, path)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return list(csv.DictReader(f))


def gb(x):
    return f"{x / 1e9:,.1f} GB"


def num(x):
    return f"{int(x):,}"


def pct(x, digits=3):
    return f"{100 * x:.{digits}f}%"


def claims() -> list[dict]:
    """One dict per claim: id, claim, source, here (computed), status, home."""
    rows = []

    def add(claim, source, here, status, home):
        rows.append({"id": len(rows) + 1, "claim": claim, "source": source, "here": here,
                     "status": status, "home": home})

    mem = lambda n, **k: estimate_finetune_memory(n, **k)  # noqa: E731
    llama7, llama65 = llama_parameter_count(), llama_parameter_count(8192, 80, 22016)
    t7 = compare_peft_methods()
    lora7, prompt7 = t7["lora"]["params"], t7["prompt_tuning"]["params"]
    add("A 7B model needs ~28 GB for its weights in fp32", "000 Overview",
        gb(mem(7e9, method="full", dtype="fp32")["weights"]), "recomputed", "`accounting.estimate_finetune_memory`")
    add("7B full fine-tuning: ~28 GB of GPU memory", "000 Why this matters",
        f"weights + gradients + AdamW in fp32: {gb(mem(7e9, dtype='fp32')['total'])}", "wrong",
        "`accounting.py`; exercise 9.1")
    add("7B LoRA r=8: ~4M trainable, ~8 GB", "000 Why this matters",
        f"{num(lora7)} (q, v); frozen base fp16 {gb(mem(7e9, method='lora', dtype='fp16', trainable_params=lora7)['total'])}, "
        f"int8 {gb(mem(7e9, method='lora', dtype='int8', trainable_params=lora7)['total'])}",
        "recomputed (count); memory only with an 8-bit base", "`compare_peft_methods`, `estimate_finetune_memory`")
    add("7B prompt tuning: ~80K trainable, ~2 GB", "000 Why this matters",
        f"{num(prompt7)}; frozen base alone in fp16 {gb(7e9 * 2)}", "recomputed (count); memory wrong",
        "`compare_peft_methods`")
    add("The course's 7B 'full fine-tuning' row: 2,147,483,648", "course table (`compare_peft_methods`)",
        f"attention weights only: {num(llama7['attention'])} of LLaMA-7B's {num(llama7['total'])} "
        f"({pct(llama7['attention'] / llama7['total'], 1)})", "recomputed; labelled",
        "`accounting.llama_parameter_count`; `peft.py` tour")
    shares = ", ".join(f"{k.split('_')[0]} {pct(t7[k]['params'] / llama7['total'])}"
                       for k in ("lora", "adapters", "prefix_tuning", "prompt_tuning"))
    add("Share trained: LoRA ~0.1-1%, adapters ~1-5%, prefix ~0.01%, prompt ~0.001%",
        "000 Methods; 002 Step 4", f"of all LLaMA-7B, course defaults: {shares}",
        "recomputed: LoRA and adapters lower, prefix higher", "`compare_peft_methods`")
    add("Fine-tuning 1% of parameters can achieve 99% of full fine-tuning", "000 Overview", "-",
        "unsourced", "`results/` (what our methods reach)")
    add("175B: weights 2 B, gradients 2 B, optimizer 8 B per parameter", "001 Quick math",
        "{} + {} + {} = {}".format(*(gb(mem(GPT3, dtype='fp16')[k]) for k in
                                     ("weights", "gradients", "optimizer_states", "total"))),
        "recomputed", "`estimate_finetune_memory`; exercise 9.1")
    ratio = step_matmul_flops(BASE_CONFIG, 32, 64) / (32 * 64 * _gpt_params(BASE_CONFIG))
    add("~6 operations per parameter per token (forward + backward)", "001 Quick math",
        f"{6 * GPT3 * 32 * 512:.3g} per 32x512 batch, {6 * GPT3 * 32 * 512 / 1e14:.0f} s at 100 TFLOPS, "
        f"{6 * GPT3 * 1e12 / 1e18 * 0.1:,.0f} kWh per 1T tokens; mini GPT step: {ratio:.2f} per parameter-token",
        "recomputed", "`accounting.step_matmul_flops`; notebook 01")
    add("PEFT on 175B: 1.75M trainable = 0.01%", "001 PEFT vs full", pct(1.75e6 / GPT3, 4),
        "wrong (0.001%)", "-")
    add("PEFT on 175B: ~14 GB of memory (full: ~1.4 TB)", "001 PEFT vs full",
        f"frozen base fp16 {gb(GPT3 * 2)}, NF4 {gb(GPT3 * nf4_bits_per_parameter() / 8)}; "
        f"full fp16 + AdamW {gb(mem(GPT3, dtype='fp16')['total'])}", "wrong", "`estimate_finetune_memory`")
    add("Storage per task: 350 GB full, 3.5 MB PEFT", "001 PEFT vs full",
        f"{gb(GPT3 * 2)}; 1.75M x 2 B = {1.75e6 * 2 / 1e6:.1f} MB", "recomputed", "-")
    add("LoRA r=8 on a 1024x1024 layer adds 16,384", "001 LoRA quiz", num(8 * (1024 + 1024)),
        "recomputed", "`LoRALayer.num_parameters`; exercise 9.2")
    add("calculate_lora_params(4096, rank=16, num_layers=96) vs 175B", "001 calculator",
        f"{num(16 * 2 * 4096 * 96)} = {pct(16 * 2 * 4096 * 96 / GPT3, 4)}; GPT-3's width is "
        f"12,288: {num(16 * 2 * 12288 * 96)}", "recomputed; width wrong for GPT-3", "-")
    add("1B parameters: 4 / 2 / 1 / 0.5 GB in FP32 / FP16 / INT8 / INT4", "001 Memory table",
        " / ".join(gb(mem(1e9, dtype=d)["weights"]) for d in ("fp32", "fp16", "int8", "int4")),
        "recomputed", "`accounting.BYTES`")
    bits = nf4_bits_per_parameter()
    add("4-bit quantization: 4x less memory", "001 QLoRA quiz",
        f"NF4 + double quantization, measured {bits:.3f} bits: {16 / bits:.2f}x vs fp16, "
        f"{32 / bits:.2f}x vs fp32", "reproduced", "`nf4.py`; notebook 05")
    add("Double quantization saves memory", "001; 003 §29.6",
        f"measured {nf4_bits_per_parameter(False) - 4:.3f} -> {bits - 4:.3f} bits of constants per weight",
        "reproduced", "`nf4.py`")
    add("70B on a single 24 GB GPU: QLoRA works best", "001 QLoRA quiz",
        f"NF4 weights alone {gb(70e9 * bits / 8)}", "wrong (does not fit)", "`estimate_finetune_memory`")
    add("Benchmark table (GLUE 85.2 / 84.8 / 84.5 / 82.1 ...)", "001 Benchmarks", "-", "unsourced",
        "`results/` (our own comparison)")
    add("Alpaca: QLoRA fine-tuning of LLaMA, GPT-3.5 level for $600", "001 Case study 2", "-",
        "wrong: Alpaca was full fine-tuning of LLaMA-7B (Taori et al. 2023), before QLoRA", "-")
    add("Hugging Face PEFT: 10,000+ models fine-tuned", "001 Case study 1", "-", "unsourced", "-")
    add("Full tuning with Adam ~12-16 bytes per parameter; inference ~2", "003 §29.3",
        f"{mem(1, dtype='fp16')['bytes_per_param']:.0f} (fp16) / "
        f"{mem(1, dtype='fp16', mixed_precision=True)['bytes_per_param']:.0f} (mixed precision); 2 (fp16)",
        "recomputed", "`estimate_finetune_memory`")
    bert_l = bert_parameter_count(1024, 24)["total"]
    add("Adapters: within 0.4% of full fine-tuning on GLUE with 3.6% parameters per task",
        "003 §29.4 (Houlsby et al. 2019)",
        f"BERT-Large {num(bert_l)}: bottleneck 64 -> "
        f"{pct(houlsby_adapter_params(1024, 24, 64) / bert_l, 1)}, 256 -> "
        f"{pct(houlsby_adapter_params(1024, 24, 256) / bert_l, 1)}", "cited (3.6% lies in the range)",
        "`bottleneck.py`; `results/` adapter rows")
    lora_r4 = compare_peft_methods(lora_rank=4, **GPT3_SHAPE)["lora"]["params"]
    add("LoRA on GPT-3: ~10,000x fewer trainable parameters", "003 §29.5 (Hu et al. 2021 §4.2)",
        f"r=4 on q, v: {num(lora_r4)}, {GPT3 / lora_r4:,.0f}x fewer", "recomputed", "`compare_peft_methods`")
    add("LoRA on GPT-3: ~3x less GPU memory", "003 §29.5 (Hu et al.: 1.2 TB -> 350 GB, measured)",
        f"LoRA: {gb(mem(GPT3, method='lora', dtype='fp16', trainable_params=lora_r4)['total'])}; full: "
        f"{gb(mem(GPT3, dtype='fp16')['total'])}-{gb(mem(GPT3, dtype='fp16', mixed_precision=True)['total'])} "
        "without activations", "cited (their full-side measurement); LoRA side recomputed",
        "`estimate_finetune_memory`")
    lora65 = lora_all_linear_params(8192, 80, 22016, 64)
    linear65 = llama65["attention"] + llama65["mlp"]
    q65 = linear65 * bits / 8 + (llama65["embeddings"] + llama65["norms"]) * 2 + lora65 * 12
    add("QLoRA: 65B on a single 48 GB GPU", "003 §29.6 (Dettmers et al. 2023)",
        f"LLaMA-65B {num(llama65['total'])}: NF4 linears + 16-bit rest + LoRA r=64 on all linears "
        f"({num(lora65)}, 12 B each) = {gb(q65)} before activations", "recomputed (fits)",
        "`quantization.py`, `nf4.py`; notebook 05")
    add("Guanaco reaches 99.3% of ChatGPT on the Vicuna benchmark, 24 h on one GPU",
        "003 §29.6 (Dettmers et al. 2023)", "-", "cited (a GPT-4-judged benchmark; not reproducible here)", "-")
    gpt2m = gpt2_parameter_count(1024, 24)
    prefix_m = compare_peft_methods(d_model=1024, num_layers=24, num_heads=16, prefix_length=10)
    add("Prefix tuning: ~0.1% of parameters", "003 §29.7 (Li & Liang 2021)",
        f"GPT-2 Medium ({num(gpt2m)}), 10 slots: {pct(prefix_m['prefix_tuning']['params'] / gpt2m, 2)}",
        "recomputed", "`PrefixTuning`; notebook 04")
    add("Prompt tuning becomes competitive with full tuning near 10B parameters",
        "003 §29.7 (Lester et al. 2021)", "-", "cited (our 0.2M-parameter model: prompt tuning learns little)",
        "`results/` prompt rows; notebook 04")
    bert_b = bert_parameter_count(768, 12)
    add("BitFit: <0.1% of parameters", "004 §2",
        f"BERT-base biases {num(bert_b['biases'])} of {num(bert_b['total'])} = "
        f"{pct(bert_b['biases'] / bert_b['total'])}", "recomputed", "`BitFitConfig`")
    lora70 = compare_peft_methods(d_model=8192, num_layers=80, num_heads=64)["lora"]["params"]
    add("70B: ~140 GB; 10 tasks 1.4 TB; one base + 10 adapters of ~100 MB saves over 80%", "004 §3B",
        f"{gb(70e9 * 2)}; {gb(10 * 70e9 * 2)}; LoRA r=8 q,v {lora70 * 2 / 1e6:.0f} MB in fp16; saving "
        f"{pct(1 - (70e9 * 2 + 10 * 100e6) / (10 * 70e9 * 2), 1)}", "recomputed", "-")
    add("Prefix tuning needs more parameters than prompt tuning (True)", "001 prefix quiz",
        f"7B defaults: {num(t7['prefix_tuning']['params'])} vs {num(prompt7)}", "recomputed",
        "`compare_peft_methods`")
    add("LoRA code: `lora_A` (out, r) random, `lora_B` (r, in) zero, `x @ B.T @ A.T`", "001 LoRA deep dive",
        "Hu et al. and HF peft: A (r, in) random, B (out, r) zero", "wrong names (swapped; the maths holds)",
        "`peft.LoRALayer`; `docs/COURSE_API.md`")
    add("Merged LoRA adds no inference latency; adapters do", "002; 003 §29.5; 004 §2", "-",
        "reproduced (measured, `bench/README.md` inference table)", "`bench/bench_peft.py`; notebook 03")
    add("LoRA learns less and forgets less (Biderman et al. 2024)", "003 §29.8", "-",
        "cited; forgetting measured here", "`results/` CE rise and disabled columns; notebook 06")
    add("Fine-tuning has a low intrinsic dimension (~200 parameters for RoBERTa)",
        "003 §29.5 (Aghajanyan et al. 2020)", "-", "cited", "notebook 02 (effective rank of updates)")
    add("NF4 is information-theoretically optimal for normally distributed weights", "003 §29.6", "-",
        "cited; NF4 beats uniform int4 on normal weights here", "`nf4.py`; exercise 9.21; notebook 05")
    add("Paged optimizers absorb memory spikes", "001; 003 §29.6", "-",
        "cited; not reproducible on a CPU (no second memory to page to)", "`quantization.py` docstring")
    add("DoRA closes part of LoRA's gap to full fine-tuning (Liu et al. 2024)", "003 §29.8", "-",
        "cited; compared here", "`dora.py`; `results/` dora rows")
    add("P-tuning v2: prompts at every layer work on small models too", "003 §29.7", "-",
        "cited; our prefix tuning is that (keys and values at every layer)", "`PrefixTuningConfig`")
    add("GPU prices ($500 vs $10,000; $30,000 A100; $1,500 RTX 4090)", "000; 004 §3C", "-",
        "unsourced; not our subject", "-")
    qat = _qat_result()
    add("PTQ vs QAT (quantize after training vs train with quantization)", "001 Quantization",
        qat[0], qat[1], "`qat.py`, `qat_demo.py`, `results/qat/`")
    alpha = _alpha_result()
    add("alpha/r lets you change r without retuning the learning rate", "003 §29.5",
        alpha[0], alpha[1], "`alpha_scaling.py`, `results/alpha_r/`")
    return rows


def _gpt_params(config) -> int:
    return sum(p.size for _, p in GPT(config).named_parameters())


def _qat_result():
    """``(summary, status)`` from ``results/qat/runs.csv``: reproduced when, at the
    narrowest width, QAT keeps the task better than PTQ."""
    rows = _read("results/qat/runs.csv")
    if not rows:
        return "(run qat_demo.py)", "not run"
    text = "; ".join(f"{r['bits']} bits: PTQ {float(r['ptq_accuracy']):.3f}, "
                     f"QAT {float(r['qat_accuracy']):.3f}" for r in rows)
    low = min(rows, key=lambda r: int(r["bits"]))
    better = float(low["qat_accuracy"]) > float(low["ptq_accuracy"])
    return f"test accuracy, {rows[0]['task']}: {text}", "reproduced" if better else "not reproduced"


def _alpha_result():
    """``(summary, status)``: reproduced when the best lr moves less across r with alpha/r."""
    path = os.path.join(ROOT, "results", "alpha_r", "runs.csv")
    if not os.path.exists(path):
        return "(run alpha_scaling.py)", "not run"
    rows = read_runs(path)
    spread, sens = best_lr_spread(rows), rank_sensitivity(rows)
    text = (f"r in {RANKS}, same lr: validation CE differs across r by up to {sens['alpha/r']:.1f}x "
            f"with alpha/r, {sens['no scaling']:,.0f}x without; best lr moves {spread['alpha/r']:.3g}x "
            f"vs {spread['no scaling']:.3g}x")
    ok = sens["alpha/r"] < sens["no scaling"] and spread["alpha/r"] <= spread["no scaling"]
    return text, "reproduced" if ok else "not reproduced"


def render() -> str:
    lines = [BEGIN, "| # | claim (source's words, shortened) | source | here (computed by `source_claims.py`) | status | home |",
             "|---|---|---|---|---|---|"]
    for r in claims():
        lines.append(f"| {r['id']} | {r['claim']} | {r['source']} | {r['here']} | {r['status']} | {r['home']} |")
    return "\n".join(lines + [END])


def write(path=SOURCES_MD):
    with open(path) as f:
        text = f.read()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    with open(path, "w") as f:
        f.write(text[:start] + render() + text[end:])


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write()
    else:
        print(render())
