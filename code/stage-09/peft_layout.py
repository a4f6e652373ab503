"""Hugging Face ``peft``'s adapter files, read and named: the layout both bridges share.

peft writes a LoRA adapter as ``adapter_config.json`` plus tensors keyed by the
*Hugging Face model's* module path::

    base_model.model.<module path>.lora_A.weight      (r, in)     ours: <path>.lora.A
    base_model.model.<module path>.lora_B.weight      (out, r)    ours: <path>.lora.B
    base_model.model.<module path>.lora_magnitude_vector (out,)   ours: <path>.lora.magnitude (DoRA)

For a model that keeps Hugging Face's module names (``gpt2.GPT2LMHeadModel``) the
module path is the same on both sides, so ``PeftModel.from_pretrained`` reads a
directory peft wrote directly (``peft_io``). For the mini GPT, whose paths are
OPT's under other names, ``hf_export`` renames the paths with its table.

``fan_in_fan_out``: peft sets it per layer type (``True`` for GPT-2's ``Conv1D``,
whose weight is stored ``(in, out)``; ``False`` for ``nn.Linear``) and only uses
it to transpose the update when merging. Our layers hold every weight as
``(out, in)``, so the flag is recorded, never needed.
"""
from __future__ import annotations

from peft_config import LoraConfig

ADAPTER_PREFIX = "base_model.model."
# (ours, Hugging Face): what follows a module path inside an adapter
ADAPTER_SUFFIXES = [(".lora.A", ".lora_A.weight"), (".lora.B", ".lora_B.weight"),
                    (".lora.magnitude", ".lora_magnitude_vector"), (".ia3.ia3_l", ".ia3_l")]
# peft LoRA options that change what the adapter computes and that our LoRA lacks
UNSUPPORTED = ("lora_bias", "use_qalora", "rank_pattern", "alpha_pattern", "layer_replication",
               "modules_to_save", "target_parameters", "trainable_token_indices")


def swap_suffix(name: str, source: int, target: int) -> str:
    """Swap an adapter suffix (0: ours, 1: Hugging Face's); other names pass unchanged."""
    for pair in ADAPTER_SUFFIXES:
        if name.endswith(pair[source]):
            return name[: -len(pair[source])] + pair[target]
    return name


def is_peft_layout(tensors: dict) -> bool:
    """True when the tensor names are peft's (``base_model.model.`` ...)."""
    return bool(tensors) and all(k.startswith(ADAPTER_PREFIX) or k == "prompt_embeddings"
                                 for k in tensors)


def from_peft_key(key: str) -> str:
    """``base_model.model.<path>.lora_A.weight`` -> ``<path>.lora.A`` (the path itself unchanged)."""
    return swap_suffix(key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key, 1, 0)


def to_peft_key(name: str) -> str:
    return ADAPTER_PREFIX + swap_suffix(name, 0, 1)


def lora_config_from_peft(raw: dict, paths, targets=None) -> LoraConfig:
    """Our ``LoraConfig`` for peft's ``adapter_config.json``; ``targets`` default to ``paths``.

    The adapted modules are taken from the file's tensors (``paths``), so any
    ``target_modules`` form peft accepts ("all-linear", a regex, ``layers_to_transform``)
    reads the same here. Options our LoRA lacks are refused, not dropped.
    """
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"only LoRA adapters written by Hugging Face peft are read; this one is "
                         f"peft_type={raw.get('peft_type')!r}")
    for key in UNSUPPORTED:
        if raw.get(key):
            raise ValueError(f"adapter_config.json sets {key}={raw[key]!r}; our LoRA has no such "
                             f"option, so the adapter would compute something else here")
    if not paths:
        raise ValueError("the adapter file holds no lora_A / lora_B tensors")
    return LoraConfig(r=int(raw["r"]), lora_alpha=raw["lora_alpha"],
                      lora_dropout=float(raw.get("lora_dropout", 0.0)), bias=raw.get("bias", "none"),
                      use_rslora=bool(raw.get("use_rslora", False)),
                      use_dora=bool(raw.get("use_dora", False)),
                      fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
                      target_modules=list(targets if targets is not None else paths))


def from_peft_layout(raw: dict, tensors: dict):
    """``(LoraConfig, {our name: array})`` of a directory peft wrote for a model with its names."""
    ours = {from_peft_key(k): v for k, v in tensors.items()}
    paths = sorted({n.rsplit(".lora.", 1)[0] for n in ours if ".lora." in n})
    return lora_config_from_peft(raw, paths), ours
