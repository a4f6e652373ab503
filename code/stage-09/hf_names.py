"""One table of names between the mini GPT and Hugging Face's ``OPTForCausalLM`` / ``peft``.

The mini GPT *is* an OPT decoder, so every parameter has an OPT name; adapter
tensors carry ``peft``'s ``base_model.model.`` prefix and its suffixes::

    ours                                  Hugging Face OPTForCausalLM
    embed_tokens / embed_positions        model.decoder.embed_tokens / embed_positions
    layers.{i}.ln_1                       model.decoder.layers.{i}.self_attn_layer_norm
    layers.{i}.self_attn.q_proj           model.decoder.layers.{i}.self_attn.q_proj  (k, v, out too)
    layers.{i}.ln_2                       model.decoder.layers.{i}.final_layer_norm
    layers.{i}.mlp.fc1 / fc2              model.decoder.layers.{i}.fc1 / fc2
    ln_f                                  model.decoder.final_layer_norm
    <path>.lora.A / .lora.B               base_model.model.<hf path>.lora_A.weight / lora_B.weight
    <path>.lora.magnitude (DoRA)          base_model.model.<hf path>.lora_magnitude_vector
    <path>.ia3.ia3_l  (n,)                base_model.model.<hf path>.ia3_l  (n, 1) out, (1, n) in

Used in both directions by ``peft_io`` (our adapter files are in ``peft``'s
layout) and ``hf_export`` (the base model as an OPT checkpoint).
"""
from __future__ import annotations

import re

from targets import matches

ADAPTER_PREFIX = "base_model.model."

# (ours, Hugging Face): module paths; {i} is a layer index, {proj}/{fc} a projection name
MODULE_NAMES = [
    ("embed_tokens", "model.decoder.embed_tokens"),
    ("embed_positions", "model.decoder.embed_positions"),
    ("layers.{i}.ln_1", "model.decoder.layers.{i}.self_attn_layer_norm"),
    ("layers.{i}.self_attn.{proj}", "model.decoder.layers.{i}.self_attn.{proj}"),
    ("layers.{i}.ln_2", "model.decoder.layers.{i}.final_layer_norm"),
    ("layers.{i}.mlp.{fc}", "model.decoder.layers.{i}.{fc}"),
    ("ln_f", "model.decoder.final_layer_norm"),
]
# (ours, Hugging Face): what follows a module path inside an adapter
ADAPTER_SUFFIXES = [(".lora.A", ".lora_A.weight"), (".lora.B", ".lora_B.weight"),
                    (".lora.magnitude", ".lora_magnitude_vector"), (".ia3.ia3_l", ".ia3_l")]
_FIELDS = {"i": r"\d+", "proj": "q_proj|k_proj|v_proj|out_proj", "fc": "fc1|fc2"}
LINEAR_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "mlp.fc1", "mlp.fc2")


def _pattern(template):
    escaped = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    return re.compile(re.sub(r"{(\w+)}", lambda m: f"(?P<{m[1]}>{_FIELDS[m[1]]})", escaped)
                      + r"(?P<tail>(\..*)?)$")


def _translate(name, source, target):
    """Rename the module path at the start of ``name`` (0: ours, 1: Hugging Face)."""
    for pair in MODULE_NAMES:
        m = _pattern(pair[source]).match(name)
        if m:
            return pair[target].format(**m.groupdict()) + m["tail"]
    raise ValueError(f"{name!r} is not a parameter of the mini GPT / OPT architecture")


def _swap_suffix(name, source, target):
    for pair in ADAPTER_SUFFIXES:
        if name.endswith(pair[source]):
            return name[: -len(pair[source])] + pair[target]
    return name


def to_hf_name(name: str) -> str:
    """Our dotted name -> the Hugging Face key (``base_model.model.`` not added)."""
    return _swap_suffix(_translate(name, 0, 1), 0, 1)


def from_hf_name(key: str) -> str:
    """A Hugging Face key (with or without ``base_model.model.``) -> our dotted name."""
    key = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key
    return _translate(_swap_suffix(key, 1, 0), 1, 0)


def linear_paths(config):
    """Every linear a LoRA or (IA)3 config could target, in our names."""
    return [f"layers.{i}.{m}" for i in range(config.n_layers) for m in LINEAR_LEAVES]


def hf_targets(paths, config):
    """``target_modules`` for peft: the leaf names if they select exactly ``paths``, else full names."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if {n for n in linear_paths(config) if matches(n, leaves)} == set(paths):
        return leaves
    return sorted(to_hf_name(p) for p in paths)


def our_targets(paths, config):
    """``target_modules`` for our ``LoraConfig``/``IA3Config`` selecting exactly ``paths``."""
    targets = hf_targets(paths, config)
    return targets if "." not in targets[0] else sorted(paths)
