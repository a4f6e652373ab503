"""Exercise 9.18 (suggested) -- 4-bit LoRA (QLoRA) on the whole mini GPT.

The QLoRA recipe (Dettmers et al. 2023), in two steps and in this order:

1. quantize: every linear layer of the blocks becomes a frozen 4-bit NF4 layer
   (``quantization.QuantizedLinear.from_linear``), dequantized on the fly;
2. adapt: the targeted ones are wrapped in a float LoRA (``peft.LoRALinear``
   takes a ``QuantizedLinear`` as its base exactly as it takes a float ``Linear``).

Training then updates only ``A`` and ``B``: the 4-bit codes never change (they
are read-only arrays). Gradients flow *through* the dequantized weights into
the factors.

And after training? Merging ``s B A`` back into the 4-bit weight means
re-quantizing ``W + s B A``; the rounding error of NF4 is often as large as the
whole update, so the merged model can lose what was learned. You measure this in
``requantization_error``: keep adapters separate, or merge into a float copy.

Library pieces: ``QuantizedLinear.from_linear(linear, blocksize=...)``;
``LoRALinear(base, lora_rank=..., lora_alpha=..., rng=...)`` (factors in
``wrapper.lora``); ``wrapper.weight`` (a ``QuantizedLinear``'s is dequantized);
``nf4.quantize_nf4(weight, blocksize)`` returning an object with ``.dequantize()``.
Block linears: ``model.layers[i].self_attn.{q_proj, k_proj, v_proj, out_proj}``,
``model.layers[i].mlp.{fc1, fc2}``.

Check your work:  ``python exercises/check.py 9.18``
"""
import sys
from pathlib import Path

import numpy as np

for _parent in Path(__file__).resolve().parents:      # the library: code/stage-09 of the repository
    if (_parent / "code" / "stage-09").is_dir():
        sys.path.insert(0, str(_parent / "code" / "stage-09"))
        break
from nf4 import quantize_nf4  # noqa: E402
from peft import LoRALinear  # noqa: E402
from quantization import QuantizedLinear  # noqa: E402

LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "out_proj"), "mlp": ("fc1", "fc2")}


def prepare_4bit_lora(model, target_modules=("q_proj", "v_proj"), rank=4, alpha=8.0, blocksize=64,
                      rng=None):
    """Quantize all six linears of every block, freeze the model, then wrap the
    targets with LoRA. Returns ``{dotted path: LoRALinear}`` (e.g.
    ``"layers.0.self_attn.q_proj"``), in block order."""
    rng = rng if rng is not None else np.random.default_rng(0)
    # BEGIN SOLUTION first replace every block linear by a QuantizedLinear, freeze, then wrap targets
    for block in model.layers:
        for parent_name, names in LINEARS.items():
            parent = getattr(block, parent_name)
            for name in names:
                setattr(parent, name, QuantizedLinear.from_linear(getattr(parent, name),
                                                                  blocksize=blocksize))
    model.freeze()
    layers = {}
    for i, block in enumerate(model.layers):
        for parent_name, names in LINEARS.items():
            parent = getattr(block, parent_name)
            for name in names:
                if name in target_modules:
                    wrapper = LoRALinear(getattr(parent, name), lora_rank=rank, lora_alpha=alpha, rng=rng)
                    setattr(parent, name, wrapper)
                    layers[f"layers.{i}.{parent_name}.{name}"] = wrapper
    return layers
    # END SOLUTION


def sgd_step(lora_layers, lr):
    """One plain SGD step on every ``A`` and ``B`` (in place): ``p -= lr * p_grad``."""
    # BEGIN SOLUTION update both factors of every layer in place
    for wrapper in lora_layers.values():
        wrapper.lora.A -= lr * wrapper.lora.A_grad
        wrapper.lora.B -= lr * wrapper.lora.B_grad
    # END SOLUTION


def merge_to_float(wrapper):
    """The merged float weight ``W_deq + scaling * B @ A`` ``(out, in)`` of one layer."""
    # BEGIN SOLUTION the dequantized base weight plus the scaled update
    lora = wrapper.lora
    return np.array(wrapper.weight) + lora.scaling * lora.B @ lora.A
    # END SOLUTION


def requantization_error(wrapper, blocksize=64):
    """What merging into 4 bits would lose. Returns ``(update_norm, error_norm)``:

    * ``update_norm``: Frobenius norm of the update ``scaling * B @ A``;
    * ``error_norm``: Frobenius norm of ``dequant(quant_nf4(W_merged)) - W_merged``
      with ``W_merged = merge_to_float(wrapper)`` (NF4 with ``blocksize``).
    """
    # BEGIN SOLUTION merge in float, round-trip through NF4, compare the two norms
    lora = wrapper.lora
    update = lora.scaling * lora.B @ lora.A
    merged = merge_to_float(wrapper)
    requantized = quantize_nf4(merged, blocksize=blocksize).dequantize(np.float64)
    return float(np.linalg.norm(update)), float(np.linalg.norm(requantized - merged))
    # END SOLUTION
