# Exercise 9.10: your file to edit. Generated from solutions/ex9_10_efficiency_analyser.py by make_stubs.py (body sha256 810f0cf43c3d).
"""Exercise 9.10 (challenge) -- a PEFT efficiency analyser.

How much of a model does a PEFT method train, and how much memory does
fine-tuning it need? Three questions, three functions:

* ``count_parameters``: trainable and total numbers of a model's named arrays;
* ``parameter_efficiency``: the ratio (trainable / total) and the gain (total / trainable);
* ``finetune_memory``: bytes for weights, gradients, optimizer state (no activations).

and ``analyse_model`` puts them together for any model of the library (a mini
GPT, or one wrapped by ``get_peft_model``). The byte rules, per parameter:

==================  ============================  ================================
                    full fine-tuning              PEFT (base frozen)
==================  ============================  ================================
weights             ``b`` (the dtype's bytes)     base: ``b``; trainable: 4 (fp32)
gradients           ``b``                         trainable only: 4
master copy         4, with mixed precision only  none
optimizer state     per trainable parameter: AdamW 8 (two fp32 moments),
                    SGD with momentum 4, SGD 0
==================  ============================  ================================

So full fine-tuning in mixed precision with AdamW costs 2 + 2 + 4 + 8 = 16 bytes
per parameter, whereas LoRA costs little more than the frozen weights.

Check your work:  ``python exercises/check.py 9.10``
"""
import numpy as np

BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5, "nf4": 0.5}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd_momentum": 4, "sgd": 0}


def count_parameters(named_params, trainable_names):
    """``named_params``: ``{name: array}``; ``trainable_names``: the names that train.

    Returns ``(trainable, total)`` numbers of elements (ints).
    """
    raise NotImplementedError("Exercise 9.10: sum the array sizes: all of them, and those whose name is trainable")


def parameter_efficiency(trainable, total):
    """``{"trainable_params", "total_params", "trainable_ratio", "efficiency_gain"}``.

    ``trainable_ratio = trainable / total``; ``efficiency_gain = total / trainable``
    (``float("inf")`` when nothing trains). Raise ``ValueError`` unless
    ``total > 0`` and ``trainable >= 0``.
    """
    raise NotImplementedError("Exercise 9.10: validate, then the two quotients")


def finetune_memory(num_params, trainable_params=None, dtype="fp16", optimizer="adamw",
                    mixed_precision=False):
    """Bytes to fine-tune, by the table in the module docstring.

    ``trainable_params=None`` means full fine-tuning of ``num_params`` parameters;
    otherwise ``num_params`` is the frozen base, kept in ``dtype``, and only the
    ``trainable_params`` adapter numbers (fp32) get gradients and optimizer state.
    Returns ``{"weights", "gradients", "master_weights", "optimizer_states",
    "total", "total_gb"}`` (bytes; ``total_gb = total / 1e9``). Raise
    ``ValueError`` for an unknown ``dtype`` or ``optimizer``.
    """
    raise NotImplementedError("Exercise 9.10: look up the bytes, then fill the four rows of the table")


def analyse_model(model, dtype="fp32", optimizer="adamw"):
    """Efficiency report of a library model (``model.named_parameters()``).

    ``model.named_parameters()`` yields ``(name, array)`` for every parameter and
    ``model.named_parameters(trainable_only=True)`` the trainable ones. Returns the
    ``parameter_efficiency`` dict plus ``"memory"``: ``finetune_memory`` for full
    fine-tuning when everything trains, else for a frozen base of
    ``total - trainable`` parameters and ``trainable`` adapter parameters.
    """
    raise NotImplementedError("Exercise 9.10: count with the two named_parameters calls, then combine the helpers")


def format_report(report):
    """Given: the report as a few readable lines."""
    mem = report["memory"]
    return "\n".join([
        f"trainable {report['trainable_params']:,} of {report['total_params']:,} "
        f"({100 * report['trainable_ratio']:.4f}%, {report['efficiency_gain']:,.1f}x fewer)",
        f"memory: weights {mem['weights'] / 1e6:,.2f} MB, gradients {mem['gradients'] / 1e6:,.2f} MB, "
        f"optimizer {mem['optimizer_states'] / 1e6:,.2f} MB, total {mem['total_gb']:.6f} GB"])
