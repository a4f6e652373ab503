"""Graduate to the real ecosystem: export the mini GPT and its adapters to Hugging Face.

The mini GPT *is* an OPT decoder (pre-LN blocks, learned positions, GELU MLP,
tied head), so it can be written as a ``transformers`` ``OPTForCausalLM``
checkpoint, and its adapters as ``peft`` adapter directories that
``PeftModel.from_pretrained`` loads onto it::

    export_base(model, "hf_base")                  config.json + model.safetensors
    export_adapter(peft_model, "hf_adapter")       adapter_config.json + adapter_model.safetensors
    import_lora_adapter(model, "hf_adapter")       a peft LoRA adapter back into our PeftModel

    python hf_export.py --base ckpt/ --out hf_base/ [--adapter my_adapter/]

Names: one table, ``hf_names.MODULE_NAMES``, used in both directions (our
adapter files, ``PeftModel.save_pretrained``, are already in peft's layout;
``export_adapter`` writes the same files, minus our extension keys).

Where the two models differ, and what the export does about it:

* OPT's position table has 2 extra leading rows (``OPTLearnedPositionalEmbedding``
  looks up ``position + 2``; positions come from ``cumsum(attention_mask) - 1``).
  We write two zero rows first. With an all-ones mask, or right padding, the real
  tokens sit at 0..T-1 as in our model; with *left* padding OPT shifts them.
* OPT multiplies q by 1/sqrt(d_head) before ``q @ k^T``; we scale the scores. Same maths.
* Prompt tuning: ``peft`` puts the soft prompt at positions 0..P-1 and the real
  tokens at P..P+T-1 (our ``position_convention="shift"``). An adapter trained with
  ``"keep"`` (prompt without position, tokens at 0..T-1) cannot be expressed:
  ``export_adapter`` refuses it rather than write a file that behaves differently.
* Prefix tuning: ``peft`` hands the prefix to OPT as a key/value cache of P
  entries, so OPT numbers the real tokens P..P+T-1, while our prefix leaves them
  at 0..T-1. ``peft`` >= 0.19 honours explicit ``position_ids`` (it adds P), so
  ``model(ids, position_ids=hf_prefix_position_ids(T, P))`` reproduces our logits
  exactly. The export writes the adapter and warns (``PositionConventionWarning``).
* Prefix tuning with ``prefix_projection=True``: the MLP is evaluated once and the
  resulting table is written with ``prefix_projection: false`` -- what ``peft``
  itself saves; it loads for inference and for further training alike.
* A 4-bit (QLoRA) base is written dequantized, in float32: our quantized layers
  dequantize in their forward too, so the HF model computes the same logits.
* Only LoRA/DoRA come back in (``import_lora_adapter``): it takes the adapted
  modules from the file's tensor names, so any ``target_modules`` form peft
  accepts ("all-linear", a regex, ``layers_to_transform``) reads the same.

Each directory is written at once (``checkpoint.atomic_directory``): a failure
half-way leaves the previous export whole, never new weights beside an old
config. Files are read with safetensors and JSON only: nothing is ever unpickled.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

from checkpoint import atomic_directory, load_json, load_model, save_json, save_tensors
from hf_names import (ADAPTER_PREFIX, MODULE_NAMES, from_hf_name, hf_targets,  # noqa: F401
                      to_hf_name)
from nn import LayerNorm
from peft_io import (CONFIG_NAME as ADAPTER_CONFIG_NAME, HF_WRITERS, SAFETENSORS_METADATA,  # noqa: F401
                     adapter_files, from_pretrained, load_adapter, prefix_table, single_active,
                     write_adapter)
from peft_model import PeftModel

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
POSITION_OFFSET = 2          # OPTLearnedPositionalEmbedding.offset


class PositionConventionWarning(UserWarning):
    """The exported adapter matches our model only with explicit ``position_ids``."""


# ---------------------------------------------------------------------- names
def hf_prefix_position_ids(seq_len: int, num_virtual_tokens: int) -> np.ndarray:
    """``position_ids`` that make a peft prefix-tuned OPT number tokens 0..T-1 like ours.

    peft adds ``num_virtual_tokens`` to the ``position_ids`` it is given."""
    return (np.arange(seq_len) - num_virtual_tokens)[None]          # (1, T)


# ------------------------------------------------------------------ base model
def _gpt_of(model):
    gpt = model.base_model if isinstance(model, PeftModel) else model
    merged = [p for p, m in gpt.named_modules() if getattr(m, "merged", False)]
    if merged:
        raise ValueError(f"an adapter is merged into {merged[0]}: the base weights hold the "
                         f"update. Call unmerge_adapter() first (or merge_and_unload() and "
                         f"export that model on purpose)")
    return gpt


def _frozen_module(module):
    """The plain layer under any PEFT wrappers (``LoRALinear``, ``IA3Linear``, ...)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def base_tensors(model, dtype=np.float32) -> dict:
    """``{Hugging Face key: array}`` of the base model (adapters left out, unmerged)."""
    gpt = _gpt_of(model)
    ours = {"embed_tokens.weight": gpt.embed_tokens.weight}
    pad = np.zeros((POSITION_OFFSET, gpt.config.d_model), dtype=gpt.embed_positions.weight.dtype)
    ours["embed_positions.weight"] = np.concatenate([pad, gpt.embed_positions.weight])
    paths = ["ln_f"] + [f"layers.{i}.{m}" for i in range(gpt.config.n_layers)
                        for m in ("ln_1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                  "self_attn.out_proj", "ln_2", "mlp.fc1", "mlp.fc2")]
    if gpt.lm_head is not None:                      # an untied head (a loaded OPT can have one)
        ours["lm_head.weight"] = _frozen_module(gpt.lm_head).weight
    for path in paths:
        module = _frozen_module(gpt.get_submodule(path))
        if isinstance(module, LayerNorm) and module.eps != 1e-5:
            raise ValueError(f"{path} has eps={module.eps}; OPT's LayerNorm uses 1e-5 (no config field)")
        if module.bias is None:
            raise ValueError(f"{path} has no bias; OPT with enable_bias=True needs one")
        ours[f"{path}.weight"], ours[f"{path}.bias"] = module.weight, module.bias
    return {to_hf_name(n): np.ascontiguousarray(a, dtype=dtype) for n, a in ours.items()}


def opt_config(config, dtype="float32", pad_token_id=None, bos_token_id=None,
               eos_token_id=None) -> dict:
    """The ``config.json`` of an ``OPTForCausalLM`` equal to a mini GPT with ``config``.

    ``pad_token_id`` defaults to None: OPT would give that row a zero gradient
    (``nn.Embedding(padding_idx=...)``), which our embedding does not do.
    """
    return {
        "architectures": ["OPTForCausalLM"], "model_type": "opt",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "word_embed_proj_dim": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "ffn_dim": config.ffn_dim,
        "max_position_embeddings": config.context_length,
        "activation_function": config.activation,    # gelu_new = 0.5 x (1 + tanh(...)): our GELU
        "do_layer_norm_before": True, "_remove_final_layer_norm": False,
        "enable_bias": True, "layer_norm_elementwise_affine": True,
        "tie_word_embeddings": config.tie_word_embeddings,
        "dropout": float(config.dropout), "attention_dropout": 0.0, "layerdrop": 0.0,
        "init_std": 0.02, "use_cache": True, "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "dtype": dtype, "torch_dtype": dtype,
    }


def export_base(model, directory, dtype=np.float32, **token_ids) -> str:
    """Write ``model`` (a GPT, or a PeftModel's frozen base) as an OPTForCausalLM checkpoint.

    The tied LM head is stored once, as ``model.decoder.embed_tokens.weight``
    (``transformers`` ties ``lm_head.weight`` to it). ``token_ids``: ``pad_token_id``,
    ``bos_token_id``, ``eos_token_id`` for generation (default None).
    """
    tensors = base_tensors(model, dtype)
    config = opt_config(_gpt_of(model).config, np.dtype(dtype).name, **token_ids)
    with atomic_directory(directory) as tmp:     # both files or neither (other files are kept)
        save_tensors(os.path.join(tmp, WEIGHTS_NAME), tensors, metadata=SAFETENSORS_METADATA)
        save_json(os.path.join(tmp, CONFIG_NAME), config)
    return directory


# -------------------------------------------------------------------- adapters
def _check_expressible(state):
    """Refuse what peft would compute differently; warn where it needs position_ids."""
    c = state.config
    if c.peft_type == "PROMPT_TUNING" and c.position_convention != "shift":
        raise ValueError(
            f"this prompt-tuning adapter was trained with position_convention={c.position_convention!r}: "
            f"its soft prompt has no position embedding and the real tokens sit at 0..T-1. "
            f"Hugging Face peft always puts the prompt at positions 0..P-1 and the tokens at "
            f"P..P+T-1 (and ignores position_ids for prompt tuning), so the exported adapter would "
            f"compute different logits. Train with PromptTuningConfig(position_convention='shift') "
            f"to export it.")
    if c.peft_type == "PREFIX_TUNING" and c.position_convention == "keep":
        warnings.warn(
            f"peft numbers the real tokens {c.num_virtual_tokens}..{c.num_virtual_tokens}+T-1 "
            f"after a prefix of {c.num_virtual_tokens}; this adapter keeps them at 0..T-1. Pass "
            f"position_ids=hf_export.hf_prefix_position_ids(T, {c.num_virtual_tokens}) (that is, "
            f"arange(T) - {c.num_virtual_tokens}) to the Hugging Face model to get the same "
            f"logits (or train with PrefixTuningConfig(position_convention='shift')).",
            PositionConventionWarning, stacklevel=4)


def export_adapter(peft_model, directory, adapter_name=None, base_model_name_or_path=None,
                   dtype=np.float32) -> str:
    """Write one adapter of ``peft_model`` as a Hugging Face peft adapter directory.

    Supports LoRA (rsLoRA, DoRA, ``bias`` modes), (IA)3, prompt tuning (``"shift"``
    convention only) and prefix tuning. ``base_model_name_or_path`` goes into the
    config (where ``AutoPeftModelForCausalLM`` looks for the base).
    """
    files = hf_adapter_files(peft_model, adapter_name, base_model_name_or_path, dtype)
    with atomic_directory(directory) as tmp:        # both files or neither
        write_adapter(tmp, *files)
    return directory


def hf_adapter_files(peft_model, adapter_name=None, base_model_name_or_path=None,
                     dtype=np.float32):
    """``(adapter_config.json dict, {key: array})`` that ``export_adapter`` writes, after
    every check (so a caller can check everything before it writes anything)."""
    name = adapter_name or single_active(peft_model)
    if name not in peft_model.adapters:
        raise ValueError(f"unknown adapter {name!r}; known adapters: {sorted(peft_model.adapters)}")
    state = peft_model.adapters[name]
    kind = state.config.peft_type
    if kind not in HF_WRITERS:
        raise ValueError(f"{kind} has no Hugging Face peft equivalent (peft has LoRA, DoRA, IA3, "
                         f"prompt and prefix tuning). For BitFit or full fine-tuning export the "
                         f"fine-tuned model itself with export_base(model.base_model).")
    _gpt_of(peft_model)                             # refuses merged weights
    _check_expressible(state)
    return adapter_files(peft_model, name, base_model_name_or_path, dtype, extensions=False)


# ------------------------------------------------------------- LoRA back in
def import_lora_adapter(model, directory, adapter_name="default", is_trainable=False):
    """Read a peft LoRA (or DoRA) adapter made for an exported base; return our PeftModel.

    ``model`` is a GPT (it is wrapped in place, as ``get_peft_model`` does) or a
    PeftModel (the adapter is added and made active). The reading is
    ``PeftModel.from_pretrained``'s (our adapter files are in peft's layout):
    everything is checked on a copy first; a bad file leaves ``model`` untouched.
    """
    peft_type = load_json(os.path.join(directory, ADAPTER_CONFIG_NAME)).get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"import_lora_adapter reads LoRA adapters; this one is "
                         f"peft_type={peft_type!r}")
    if not isinstance(model, PeftModel):
        return from_pretrained(PeftModel, model, directory, adapter_name, is_trainable)
    load_adapter(model, directory, adapter_name, is_trainable)
    model.set_adapter(adapter_name)
    return model


# ------------------------------------------------------------------------ CLI
def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a mini GPT checkpoint (and an adapter) "
                                                 "to Hugging Face transformers / peft.")
    parser.add_argument("--base", required=True, help="our checkpoint directory (checkpoint.save_model)")
    parser.add_argument("--out", required=True, help="where to write the OPTForCausalLM checkpoint")
    parser.add_argument("--adapter", help="our adapter directory (PeftModel.save_pretrained)")
    parser.add_argument("--adapter-out", help="where to write the peft adapter (default: OUT/adapter)")
    args = parser.parse_args(argv)
    try:
        export(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def export(args):
    """Read and check everything, then write: the base and an adapter inside it (the
    default ``OUT/adapter``) as one directory, all at once; an ``--adapter-out``
    elsewhere is a second directory, written after the first."""
    model, files = load_model(args.base), None
    out = os.path.abspath(args.out)
    adapter_out = os.path.abspath(args.adapter_out or os.path.join(out, "adapter"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PositionConventionWarning)
        if args.adapter:      # onto a second copy: a bias="all" adapter loads its biases into the base
            adapted = PeftModel.from_pretrained(load_model(args.base), args.adapter)
            files = hf_adapter_files(adapted, base_model_name_or_path=out)
    inside = os.path.commonpath([out, adapter_out]) == out
    with atomic_directory(out) as tmp:
        export_base(model, tmp)
        if files and inside:
            write_adapter(os.path.join(tmp, os.path.relpath(adapter_out, out)), *files)
    if files and not inside:
        with atomic_directory(adapter_out) as tmp:
            write_adapter(tmp, *files)
    print(f"base model -> {args.out} (load with OPTForCausalLM.from_pretrained)")
    for w in caught:
        print(f"note: {w.message}")
    if files:
        print(f"adapter -> {adapter_out} (load with peft.PeftModel.from_pretrained(base, dir))")


if __name__ == "__main__":
    raise SystemExit(main())
