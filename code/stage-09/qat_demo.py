"""Post-training quantization vs quantization-aware training, measured on the mini GPT.

    python code/stage-09/qat_demo.py             # bits 8, 4, 3, 2; a few minutes on one core
    python code/stage-09/qat_demo.py --quick     # one width, short runs (the tests use it)

For each weight width, two full fine-tuning runs of the shipped base on ``TASK``,
with the comparison's settings for full fine-tuning (``compare.run_spec``: steps,
batch, training set, and the learning rate chosen on validation data):

* **PTQ**: train in float, then round every linear weight of the blocks to ``bits``
  bits (symmetric, one scale per output row: ``qat.quantize_weights``);
* **QAT**: the same run with those linears replaced by ``qat.FakeQuantLinear`` from
  the first step (forward with the rounded weights, straight-through backward), then
  ``qat.convert``: the stored weights are the same kind of ``bits``-bit codes.

Both quantized models are scored on the task's fixed test set (exact match), beside
the float model before rounding. Nothing is chosen on it: the widths are all reported.
Results: ``results/qat/`` (``runs.csv``, ``README.md``).
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

from checkpoint import atomic_write_text, load_model  # noqa: E402
from compare import RESULTS_DIR, STEPS, run_spec  # noqa: E402
from pretrain import PRETRAINED_DIR, machine  # noqa: E402
from qat import convert, prepare_qat, quantize_weights  # noqa: E402
from tasks import fixed_test_set, make_examples  # noqa: E402
from train import evaluate, train  # noqa: E402

TASK = "sort_desc"
BITS = (8, 4, 3, 2)
OUT_DIR = os.path.join(RESULTS_DIR, "qat")


def finetune(bits, qat, spec):
    """Full fine-tuning of the base with ``spec``'s recipe (``train.train`` draws the same
    batches, warm-up and clipping as ``compare.finetune``); ``qat=True`` trains through
    ``bits``-bit weights."""
    model = load_model(PRETRAINED_DIR)
    if qat:
        prepare_qat(model, bits)
    train(model, make_examples(TASK, spec.n_train, seed=0), spec.steps, lr=spec.lr,
          batch_size=spec.batch_size, seed=spec.seed, progress=False,
          warmup_steps=max(1, spec.steps // 20), grad_clip=spec.grad_clip)
    return model


def compare_ptq_qat(bits, steps=STEPS, n_test=500, seed=0) -> dict:
    """Test accuracy of the float model, its PTQ rounding, and the QAT model, at ``bits``."""
    spec = run_spec("full", TASK, seed=seed, steps=steps)
    tests = fixed_test_set(TASK, n_test)
    model = finetune(bits, False, spec)
    float_acc = evaluate(model, tests)
    ptq_acc = evaluate(quantize_weights(model, bits), tests)
    qat_model = convert(finetune(bits, True, spec))
    return {"bits": bits, "task": TASK, "steps": steps, "seed": seed, "lr": spec.lr,
            "float_accuracy": float_acc,
            "ptq_accuracy": ptq_acc, "qat_accuracy": evaluate(qat_model, tests)}


def table(rows) -> str:
    lines = ["| bits | float (before rounding) | PTQ | QAT |", "|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['float_accuracy']:.3f} | {r['ptq_accuracy']:.3f} | "
              f"{r['qat_accuracy']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 bits only, 150 steps, 200 test examples")
    p.add_argument("--out", default=OUT_DIR)
    a = p.parse_args(argv)
    start = time.perf_counter()
    if a.quick:
        rows = [compare_ptq_qat(2, steps=150, n_test=200)]
    else:
        rows = [compare_ptq_qat(b) for b in BITS]
    minutes = (time.perf_counter() - start) / 60
    command = "python code/stage-09/qat_demo.py" + (" --quick" if a.quick else "")
    text = (f"# PTQ vs QAT: full fine-tuning on {TASK}, linear weights of the blocks in k bits\n\n"
            f"Made by `{command}` in {minutes:.1f} min on {machine()}.\n\n{table(rows)}\n\n"
            "Test exact match (500 held-out examples). PTQ: rounded after float training; "
            "QAT: trained through the rounding (straight-through estimator), then rounded the "
            "same way. Every run: `runs.csv`.\n")
    os.makedirs(a.out, exist_ok=True)
    keys = list(rows[0])
    atomic_write_text(os.path.join(a.out, "runs.csv"), "\n".join(
        [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n")
    atomic_write_text(os.path.join(a.out, "README.md"), text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
