"""Counting parameters and bytes: the arithmetic behind "why PEFT".

Two kinds of numbers live here:

* closed-form estimates for models we cannot run (7B, 70B, 175B): the course's
  tables, reproduced by ``estimate_finetune_memory`` and ``compare_peft_methods``;
* real byte counts of the arrays a model and its optimizer hold, by
  ``memory_report`` -- measured, not estimated.
"""
from __future__ import annotations

import numpy as np

from validate import check_int

BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2,
         "int8": 1, "int4": 0.5, "nf4": 0.5}
# Optimizer state bytes per trainable parameter (moments kept in fp32).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd_momentum": 4, "sgd": 0}


def _count(name, value, low, high=None, where=""):
    """A parameter count: an int, or a whole float such as ``7e9`` (the way sizes are written)."""
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        value = int(value)
    return check_int(name, value, low, high, where)


def count_trainable_parameters(arrays) -> int:
    """Total number of elements in a list of trainable arrays."""
    return int(sum(np.asarray(a).size for a in arrays))


def count_frozen_parameters(arrays) -> int:
    """Total number of elements in a list of frozen arrays (the same count; the
    course names both so a learner's code says which list it is counting)."""
    return count_trainable_parameters(arrays)


def compute_parameter_efficiency(trainable, total) -> dict:
    _count("total", total, 1)
    _count("trainable", trainable, 0, total, where=f" (total={total})")
    return {"trainable_params": trainable, "total_params": total,
            "trainable_ratio": trainable / total,
            "efficiency_gain": total / trainable if trainable else float("inf")}


def compare_peft_methods(d_model=4096, num_layers=32, num_heads=32, lora_rank=8,
                         adapter_bottleneck=64, prefix_length=10, prompt_length=20) -> dict:
    """Trainable parameters of each method, counted the course's way.

    The ``full_fine_tuning`` row counts the **attention weights only** (4 d^2 per
    layer: 2,147,483,648 at the 7B defaults), the base the others' ``ratio`` is
    taken against -- not the whole model, which also has its MLP, embeddings and
    norms (``llama_parameter_count``: 6,738,415,616 for LLaMA-7B). LoRA sits on Q
    and V; adapters are two per layer without biases; prefix tuning stores keys
    and values per layer.
    """
    for name, value in (("d_model", d_model), ("num_layers", num_layers), ("num_heads", num_heads),
                        ("lora_rank", lora_rank), ("adapter_bottleneck", adapter_bottleneck),
                        ("prefix_length", prefix_length), ("prompt_length", prompt_length)):
        check_int(name, value, 1)
    if d_model % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide d_model={d_model}")
    d_head = d_model // num_heads
    full = num_layers * 4 * d_model * d_model
    rows = {
        "full_fine_tuning": (full, "attention weights only (4 d^2 per layer), not the whole model"),
        "lora": (num_layers * 2 * lora_rank * 2 * d_model,
                 f"rank-{lora_rank} updates B A on W_q and W_v"),
        "adapters": (num_layers * 2 * 2 * d_model * adapter_bottleneck,
                     f"two {d_model}->{adapter_bottleneck}->{d_model} bottlenecks per layer"),
        "prefix_tuning": (num_layers * 2 * prefix_length * num_heads * d_head,
                          f"{prefix_length} learned keys and values per layer"),
        "prompt_tuning": (prompt_length * d_model,
                          f"{prompt_length} soft-prompt vectors at the input"),
    }
    return {name: {"params": p, "ratio": p / full, "description": desc}
            for name, (p, desc) in rows.items()}


def llama_parameter_count(d_model=4096, num_layers=32, d_ff=11008, vocab_size=32000,
                          tied_embeddings=False) -> dict:
    """Every parameter of a LLaMA-style decoder (multi-head attention, gated MLP, RMSNorm).

    Per layer: q, k, v, o (``4 d^2``, no biases), the gated MLP's gate, up and down
    projections (``3 d d_ff``) and two norm weights (``2 d``); plus the token
    embedding, the LM head (unless tied) and the final norm. The defaults are
    LLaMA-7B's (6,738,415,616); ``d_model=8192, num_layers=80, d_ff=22016`` is
    LLaMA-65B's. Not for grouped-query models (LLaMA-2-70B), whose k and v are smaller.
    """
    attention = num_layers * 4 * d_model * d_model
    mlp = num_layers * 3 * d_model * d_ff
    embeddings = vocab_size * d_model * (1 if tied_embeddings else 2)
    norms = d_model * (2 * num_layers + 1)
    return {"attention": attention, "mlp": mlp, "embeddings": embeddings, "norms": norms,
            "total": attention + mlp + embeddings + norms}


def estimate_finetune_memory(num_params, method="full", dtype="fp32", optimizer="adamw",
                             trainable_params=None, mixed_precision=False) -> dict:
    """Bytes needed to fine-tune (weights + gradients + optimizer state; no activations).

    * ``method="full"``: every parameter has a gradient and optimizer state.
      With ``mixed_precision`` (fp16/bf16 weights and gradients, an fp32 master
      copy, fp32 Adam moments) that is 2 + 2 + 4 + 8 = 16 bytes per parameter.
    * ``method`` any PEFT name (``"lora"``, ...): the base is frozen in ``dtype``
      (``"nf4"`` for QLoRA: 0.5 byte, ignoring block constants); only
      ``trainable_params`` have fp32 gradients and optimizer state.

    Returns a dict of byte counts and the total in GB (1e9 bytes).
    """
    _count("num_params", num_params, 1)
    if not isinstance(method, str):
        raise ValueError(f"method must be a string ('full', 'lora', ...), got {method!r}")
    if trainable_params is not None:
        _count("trainable_params", trainable_params, 0, num_params,
                  where=f" (num_params={num_params})")
    if dtype not in BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(BYTES)}")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {sorted(OPTIMIZER_STATE_BYTES)}")
    w = BYTES[dtype]
    opt = OPTIMIZER_STATE_BYTES[optimizer]
    if method == "full":
        weights = num_params * w
        grads = num_params * w
        master = num_params * 4 if mixed_precision else 0
        states = num_params * opt
        trainable = num_params
    else:
        if trainable_params is None:
            raise ValueError(f"method={method!r} needs trainable_params (the adapter's size)")
        weights = num_params * w + trainable_params * 4
        grads = trainable_params * 4
        master = 0
        states = trainable_params * opt
        trainable = trainable_params
    total = weights + grads + master + states
    return {"weights": weights, "gradients": grads, "master_weights": master,
            "optimizer_states": states, "total": total, "total_gb": total / 1e9,
            "trainable_params": trainable,
            "bytes_per_param": total / num_params}


def step_matmul_flops(config, batch, seq, trainable=True) -> int:
    """Matmul FLOPs of one training step of the mini GPT (2 per multiply-add), counted by hand.

    ``config``: a ``GPTConfig`` (``d_model``, ``vocab_size``, ``n_layers``).
    Forward: ``2 N in out`` per linear (N = batch*seq tokens; q, k, v, out_proj,
    fc1, fc2), ``QK^T`` and ``AV`` at ``2 B T T D`` each (the masked half is
    computed too), and the tied head ``2 N D V``. Backward: two matmuls per
    trainable weight (dx and dW), one per frozen weight (its dW is skipped);
    attention always needs four (dA, dV, dQ, dK).
    """
    N, D, V = batch * seq, config.d_model, config.vocab_size
    linears = 2 * N * (4 * D * D + 2 * D * 4 * D)           # per layer, forward
    attention = 2 * (2 * batch * seq * seq * D)             # per layer, forward
    head = 2 * N * D * V
    weight_passes = 3 if trainable else 2                   # forward + backward
    return config.n_layers * (weight_passes * linears + 3 * attention) + weight_passes * head


def memory_report(model, optimizer=None) -> dict:
    """Real bytes held now: frozen weights, trainable weights, gradients, optimizer state.

    Quantized layers count their packed storage (``quant_state.nbytes``: codes,
    block constants), not the float weight they dequantize to.
    """
    frozen = trainable = grads = 0
    for path, module in model.named_modules():
        quant = getattr(module, "quant_state", None)        # a 4-bit weight: packed bytes
        if quant is not None:
            frozen += quant.nbytes
        for name, value in module.own_parameters():
            if name in module.frozen:
                frozen += value.nbytes
            else:
                trainable += value.nbytes
            g = getattr(module, name + "_grad", None)
            if g is not None:
                grads += g.nbytes
    state = optimizer.state_nbytes() if optimizer is not None else 0
    return {"frozen_weights": frozen, "trainable_weights": trainable, "gradients": grads,
            "optimizer_state": state, "trainable_state": trainable + grads + state,
            "total": frozen + trainable + grads + state}
