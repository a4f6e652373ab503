"""Generate ``answers.md`` (the worked answers to ``conceptual.md``) from the library.

Every number in the answers is computed here by the library's calculators --
``accounting.estimate_finetune_memory``, ``compare_peft_methods``, ``BYTES``,
``peft.LoRALayer.num_parameters``, ``nf4.quantize_nf4(...).bits_per_parameter`` --
so the answers cannot drift from the code. The prose lives in
``answers_text.py``; this file computes the numbers and assembles the page.

    python exercises/make_answers.py           # rewrite exercises/answers.md
    python exercises/make_answers.py --check   # exit 1 if answers.md is stale

(The library has no FLOP calculator; ``training_flops`` below is the one formula
computed here, ``6 * parameters * tokens``.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "code" / "stage-09"))
sys.path.insert(0, str(HERE))

import accounting as acc  # noqa: E402
from minigpt import GPT, GPTConfig  # noqa: E402
from nf4 import quantize_nf4  # noqa: E402
from peft import LoRALayer  # noqa: E402
from peft_config import (BitFitConfig, BottleneckConfig, IA3Config, LoraConfig,  # noqa: E402
                         PrefixTuningConfig, PromptTuningConfig)
from peft_model import get_peft_model  # noqa: E402
from checks_quant import nf4_vs_int4_error  # noqa: E402  (the measurement exercise 9.21 prints)

ANSWERS = HERE / "answers.md"


# ------------------------------------------------------------------ formatting
def gb(nbytes) -> str:
    """Bytes as GB (1e9), with sensible precision."""
    v = nbytes / 1e9
    return f"{v:,.0f} GB" if v >= 100 else f"{v:,.1f} GB" if v >= 10 else f"{v:,.2f} GB"


def mb(nbytes) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


def num(x) -> str:
    return f"{int(round(x)):,}"


def pct(x, digits=4) -> str:
    return f"{100 * x:.{digits}f}%"


def training_flops(params, tokens, per_param=6):
    return per_param * params * tokens


# ------------------------------------------------------------------ the numbers
def memory(n, method="full", dtype="fp16", trainable=None, mixed=False, optimizer="adamw"):
    return acc.estimate_finetune_memory(n, method, dtype, optimizer, trainable_params=trainable,
                                        mixed_precision=mixed)


def lora_params(d_in, d_out, r):
    return LoRALayer(d_in, d_out, rank=r).num_parameters()


def nf4_bits(double_quant=True):
    """Measured bits per weight of the library's NF4 storage (blocks of 64)."""
    return quantize_nf4(np.zeros((256, 1024), np.float32), 64, double_quant).bits_per_parameter()


def bitfit_fraction():
    model = get_peft_model(GPT(GPTConfig()), BitFitConfig())
    trainable, total = model.get_nb_trainable_parameters()
    return trainable, total


def method_table():
    """``(name, touch point, mergeable)`` from the library's configs."""
    rows = [("LoRA", LoraConfig), ("(IA)3", IA3Config), ("bottleneck adapters", BottleneckConfig),
            ("prefix tuning", PrefixTuningConfig), ("prompt tuning", PromptTuningConfig),
            ("BitFit", BitFitConfig)]
    return [(name, cls.touch_point, cls.mergeable) for name, cls in rows]


def numbers() -> dict:
    """Everything the answers quote, computed once."""
    N7, N70, N175 = 7e9, 70e9, 175e9
    table7 = acc.compare_peft_methods()
    lora7, prompt7 = table7["lora"]["params"], table7["prompt_tuning"]["params"]
    gpt3 = {r: acc.compare_peft_methods(d_model=12288, num_layers=96, num_heads=96, lora_rank=r)
            ["lora"]["params"] for r in (1, 8)}
    ranks = {r: acc.compare_peft_methods(lora_rank=r)["lora"]["params"] for r in (1, 2, 4, 8, 16, 32, 64)}
    tokens_batch = 32 * 512
    dq_bits, plain_bits = nf4_bits(True), nf4_bits(False)
    return dict(
        N7=N7, N70=N70, N175=N175, B=acc.BYTES, lora7=lora7, prompt7=prompt7, table7=table7,
        full7_mixed=memory(N7, mixed=True), full7=memory(N7), lora7_mem=memory(N7, "lora", "fp16", lora7),
        qlora7_mem=memory(N7, "lora", "nf4", lora7), lora7_int8=memory(N7, "lora", "int8", lora7),
        prompt7_mem=memory(N7, "prompt", "fp16", prompt7),
        full175=memory(N175), full175_mixed=memory(N175, mixed=True),
        lora70_fp16=memory(N70, "lora", "fp16", 10 * lora7), qlora70=memory(N70, "lora", "nf4", 10 * lora7),
        l4096=lora_params(4096, 4096, 8), l1024=lora_params(1024, 1024, 8),
        snippet=16 * (4096 + 4096) * 96, gpt3=gpt3, ranks=ranks,
        flops_token=training_flops(N175, 1), flops_batch=training_flops(N175, tokens_batch),
        flops_total=training_flops(N175, 1e12), tokens_batch=tokens_batch,
        dq_bits=dq_bits, plain_bits=plain_bits, err=nf4_vs_int4_error(), bitfit=bitfit_fraction(),
        methods=method_table(),
        d1_lora=acc.compare_peft_methods(d_model=5120, num_layers=40, num_heads=40, lora_rank=16)["lora"]["params"],
    )


# ------------------------------------------------------------------ the page
def generate() -> str:
    from answers_text import sections
    parts = ["# Answers to the conceptual exercises\n",
             "Worked answers to [conceptual.md](conceptual.md). Generated by "
             "`python exercises/make_answers.py` from the library's calculators; do not edit by "
             "hand. 1 GB = 10^9 bytes.\n"]
    for title, answers in sections(numbers(), dict(gb=gb, mb=mb, num=num, pct=pct)):
        parts.append(f"## {title}\n")
        for qid, heading, body in answers:
            parts.append(f"### {qid} {heading}\n\n{body.strip()}\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Generate exercises/answers.md from the library.")
    parser.add_argument("--check", action="store_true", help="exit 1 if answers.md is stale")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        fresh = ANSWERS.exists() and ANSWERS.read_text() == text
        print("answers.md is up to date" if fresh else "answers.md is stale: run make_answers.py")
        return 0 if fresh else 1
    ANSWERS.write_text(text)
    print(f"wrote {ANSWERS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
