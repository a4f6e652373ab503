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

A model that keeps Hugging Face's own module names (``gpt2.GPT2LMHeadModel``, its
class attribute ``hf_names = True``) needs no table: its paths *are* the keys, and
only the adapter suffixes change. The functions taking a ``model`` choose for it.
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
    ("lm_head", "lm_head"),                         # only when the head is untied (a loaded OPT)
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


def to_hf_key(model, name: str) -> str:
    """``to_hf_name`` for ``model``: a model with Hugging Face's names only swaps the suffix."""
    return _swap_suffix(name, 0, 1) if getattr(model, "hf_names", False) else to_hf_name(name)


def from_hf_key(model, key: str) -> str:
    """``from_hf_name`` for ``model`` (see ``to_hf_key``)."""
    if not getattr(model, "hf_names", False):
        return from_hf_name(key)
    return _swap_suffix(key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key, 1, 0)


def fan_in_fan_out(model, paths) -> bool:
    """peft's flag for these modules: True where Hugging Face stores the weight ``(in, out)``
    (GPT-2's ``Conv1D``: ``model.conv1d_modules``); ours are all ``(out, in)``, so only the
    files need it."""
    conv1d = getattr(model, "conv1d_modules", ())
    return any(p.rsplit(".", 1)[-1] in conv1d for p in paths)


def linear_paths(model):
    """Every linear a LoRA or (IA)3 config could target, in our names (``model.hf_blocks``:
    where a model with other names keeps its blocks and their linears)."""
    prefix, leaves = getattr(model, "hf_blocks", ("layers", LINEAR_LEAVES))
    return [f"{prefix}.{i}.{m}" for i in range(model.config.n_layers) for m in leaves]


def hf_targets(paths, model):
    """``target_modules`` for peft: the leaf names if they select exactly ``paths``, else full names."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if {n for n in linear_paths(model) if matches(n, leaves)} == set(paths):
        return leaves
    return sorted(to_hf_key(model, p) for p in paths)


def our_targets(paths, model):
    """``target_modules`` for our ``LoraConfig``/``IA3Config`` selecting exactly ``paths``."""
    targets = hf_targets(paths, model)
    return targets if "." not in targets[0] else sorted(paths)
