"""Graduate to the real ecosystem: export the mini GPT and its adapters to Hugging Face.

The mini GPT *is* an OPT decoder (pre-LN blocks, learned positions, GELU MLP,
tied head), so it can be written as a ``transformers`` ``OPTForCausalLM``
checkpoint, and its adapters as ``peft`` adapter directories that
``PeftModel.from_pretrained`` loads onto it::

    export_base(model, "hf_base")                  config.json + model.safetensors
    export_adapter(peft_model, "hf_adapter")       adapter_config.json + adapter_model.safetensors
    import_lora_adapter(model, "hf_adapter")       a peft LoRA adapter back into our PeftModel

    python hf_export.py --base ckpt/ --out hf_base/ [--adapter my_adapter/]

Names (one table, ``MODULE_NAMES``, used in both directions)::

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

Files are written atomically (``checkpoint.save_tensors``/``save_json``) and read
with safetensors and JSON only: nothing is ever unpickled.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import warnings

import numpy as np

from checkpoint import load_json, load_model, load_tensors, save_json, save_tensors
from nn import LayerNorm
from peft_io import freeze_adapter, single_active
from peft_layout import ADAPTER_PREFIX, lora_config_from_peft, swap_suffix
from peft_methods import bias_names, linear_types
from peft_model import PeftModel, get_peft_model
from targets import matches

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
POSITION_OFFSET = 2          # OPTLearnedPositionalEmbedding.offset
SAFETENSORS_METADATA = {"format": "pt"}     # transformers refuses files without it

# (ours, Hugging Face): module paths; {i} is a layer index, {proj}/{fc} a projection name
MODULE_NAMES = [
    ("embed_tokens", "model.decoder.embed_tokens"),
    ("embed_positions", "model.decoder.embed_positions"),
    ("layers.{i}.ln_1", "model.decoder.layers.{i}.self_attn_layer_norm"),
    ("layers.{i}.self_attn.{proj}", "model.decoder.layers.{i}.self_attn.{proj}"),
    ("layers.{i}.ln_2", "model.decoder.layers.{i}.final_layer_norm"),
    ("layers.{i}.mlp.{fc}", "model.decoder.layers.{i}.{fc}"),
    ("ln_f", "model.decoder.final_layer_norm"),
    ("lm_head", "lm_head"),                         # only when the head is untied
]
_FIELDS = {"i": r"\d+", "proj": "q_proj|k_proj|v_proj|out_proj", "fc": "fc1|fc2"}


class PositionConventionWarning(UserWarning):
    """The exported adapter matches our model only with explicit ``position_ids``."""


# ---------------------------------------------------------------------- names
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


def to_hf_name(name: str) -> str:
    """Our dotted name -> the Hugging Face key (``base_model.model.`` not added)."""
    return swap_suffix(_translate(name, 0, 1), 0, 1)


def from_hf_name(key: str) -> str:
    """A Hugging Face key (with or without ``base_model.model.``) -> our dotted name."""
    key = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key
    return _translate(swap_suffix(key, 1, 0), 1, 0)


def namer(model):
    """``(to_hf, from_hf)`` for ``model``: a model with Hugging Face's module names
    (``gpt2.GPT2LMHeadModel``) only swaps the adapter suffixes; the mini GPT uses the table."""
    if getattr(model, "hf_names", False):
        return (lambda n: swap_suffix(n, 0, 1),
                lambda k: swap_suffix(k[len(ADAPTER_PREFIX):] if k.startswith(ADAPTER_PREFIX) else k, 1, 0))
    return to_hf_name, from_hf_name


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
    os.makedirs(directory, exist_ok=True)
    save_tensors(os.path.join(directory, WEIGHTS_NAME), tensors, metadata=SAFETENSORS_METADATA)
    save_json(os.path.join(directory, CONFIG_NAME), config)
    return directory


# -------------------------------------------------------------------- adapters
def _linear_paths(gpt):
    """Every linear of the blocks a LoRA or (IA)3 config could target, in our names."""
    paths = [p for p, m in gpt.named_modules() if isinstance(m, linear_types())]
    return [p.removesuffix(".base_layer") for p in paths if p != "lm_head"]


def _hf_targets(paths, gpt):
    """``target_modules`` for peft: the leaf names if they select exactly ``paths``, else full names."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if {n for n in _linear_paths(gpt) if matches(n, leaves)} == set(paths):
        return leaves
    return sorted(namer(gpt)[0](p) for p in paths)


def _lora_export(peft_model, state, dtype):
    c, gpt = state.config, peft_model.base_model
    conv1d = getattr(gpt, "conv1d_modules", ())     # stored (in, out) by Hugging Face: GPT-2's
    config = {"r": c.r, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
              "target_modules": _hf_targets(list(state.slots), gpt), "bias": c.bias,
              "use_rslora": c.use_rslora, "use_dora": c.use_dora,
              "fan_in_fan_out": any(p.rsplit(".", 1)[-1] in conv1d for p in state.slots),
              "init_lora_weights": True, "layers_to_transform": None, "modules_to_save": None,
              "rank_pattern": {}, "alpha_pattern": {}}    # older peft rejects keys it lacks
    tensors = {}
    for path, layer in state.slots.items():
        for pname, arr in layer.named_parameters():
            tensors[f"{path}.lora.{pname}"] = arr
    for name in _lora_bias_names(gpt, state):        # trained in place, in the base model
        tensors[name] = gpt.get_parameter(name)
    to_hf = namer(gpt)[0]
    return config, {ADAPTER_PREFIX + to_hf(n): a.astype(dtype) for n, a in tensors.items()}


def _lora_bias_names(gpt, state):
    """The biases ``bias="all"``/``"lora_only"`` trains (from the config: a loaded, frozen
    adapter has an empty ``state.trainable``, but its biases still differ from the base's)."""
    if state.config.bias == "all":
        return bias_names(gpt)
    if state.config.bias == "lora_only":
        return [f"{p}.base_layer.bias" for p in state.slots if gpt.get_submodule(p).bias is not None]
    return []


def _ia3_export(peft_model, state, dtype):
    gpt, tensors = peft_model.base_model, {}
    for path, vector in state.slots.items():
        column = vector.ia3_l.astype(dtype)
        # peft: (1, in) multiplies a feed-forward layer's input, (out, 1) the others' output
        tensors[ADAPTER_PREFIX + namer(gpt)[0](path) + ".ia3_l"] = (
            column[None, :] if vector.is_feedforward else column[:, None])
    ff = [p for p, v in state.slots.items() if v.is_feedforward]
    targets = _hf_targets(list(state.slots), gpt)
    ff_targets = _hf_targets(ff, gpt) if ff else []
    if any("." in t for t in targets + ff_targets):     # peft wants ff a subset of targets
        targets = sorted(namer(gpt)[0](p) for p in state.slots)
        ff_targets = sorted(namer(gpt)[0](p) for p in ff)
    config = {"target_modules": targets, "feedforward_modules": ff_targets,
              "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None}
    return config, tensors


def _prompt_learning_config(gpt, c):
    return {"num_virtual_tokens": c.num_virtual_tokens, "token_dim": gpt.config.d_model,
            "num_transformer_submodules": 1, "num_attention_heads": gpt.config.n_heads,
            "num_layers": gpt.config.n_layers}


def _prompt_export(peft_model, state, dtype):
    c = state.config
    if c.position_convention != "shift":
        raise ValueError(
            f"this prompt-tuning adapter was trained with position_convention={c.position_convention!r}: "
            f"its soft prompt has no position embedding and the real tokens sit at 0..T-1. "
            f"Hugging Face peft always puts the prompt at positions 0..P-1 and the tokens at "
            f"P..P+T-1 (and ignores position_ids for prompt tuning), so the exported adapter would "
            f"compute different logits. Train with PromptTuningConfig(position_convention='shift') "
            f"to export it.")
    config = dict(_prompt_learning_config(peft_model.base_model, c), prompt_tuning_init="RANDOM",
                  tokenizer_name_or_path=None)        # the init is irrelevant once loaded
    return config, {"prompt_embeddings": state.encoder.prompt.astype(dtype)}


def prefix_table(encoder) -> np.ndarray:
    """Our ``(L, 2, P, H, dh)`` prefix as peft's ``(P, L*2*H*dh)`` embedding.

    peft views it as ``(B, P, L*2, H, dh)`` and permutes to ``(L*2, B, H, P, dh)``:
    row ``2 l`` of the ``L*2`` axis is layer l's keys, ``2 l + 1`` its values.
    """
    table = encoder.table()                                 # (L, 2, P, H, dh)
    P = table.shape[2]
    return np.ascontiguousarray(table.transpose(2, 0, 1, 3, 4).reshape(P, -1))   # (P, L*2*D)


def _prefix_export(peft_model, state, dtype):
    gpt, c = peft_model.base_model, state.config
    if c.position_convention == "keep":
        warnings.warn(
            f"peft numbers the real tokens {c.num_virtual_tokens}..{c.num_virtual_tokens}+T-1 "
            f"after a prefix of {c.num_virtual_tokens}; this adapter keeps them at 0..T-1. Pass "
            f"position_ids=hf_export.hf_prefix_position_ids(T, {c.num_virtual_tokens}) (that is, "
            f"arange(T) - {c.num_virtual_tokens}) to the Hugging Face model to get the same "
            f"logits (or train with PrefixTuningConfig(position_convention='shift')).",
            PositionConventionWarning, stacklevel=3)
    config = dict(_prompt_learning_config(gpt, c), encoder_hidden_size=gpt.config.d_model,
                  prefix_projection=False)            # the MLP, if any, is evaluated once
    return config, {"prompt_embeddings": prefix_table(state.encoder).astype(dtype)}


EXPORTERS = {"LORA": _lora_export, "IA3": _ia3_export, "PROMPT_TUNING": _prompt_export,
             "PREFIX_TUNING": _prefix_export}


def export_adapter(peft_model, directory, adapter_name=None, base_model_name_or_path=None,
                   dtype=np.float32) -> str:
    """Write one adapter of ``peft_model`` as a Hugging Face peft adapter directory.

    Supports LoRA (rsLoRA, DoRA, ``bias`` modes), (IA)3, prompt tuning (``"shift"``
    convention only) and prefix tuning. ``base_model_name_or_path`` goes into the
    config (where ``AutoPeftModelForCausalLM`` looks for the base).
    """
    name = adapter_name or single_active(peft_model)
    if name not in peft_model.adapters:
        raise ValueError(f"unknown adapter {name!r}; known adapters: {sorted(peft_model.adapters)}")
    state = peft_model.adapters[name]
    kind = state.config.peft_type
    if kind not in EXPORTERS:
        raise ValueError(f"{kind} has no Hugging Face peft equivalent (peft has LoRA, DoRA, IA3, "
                         f"prompt and prefix tuning). For BitFit or full fine-tuning export the "
                         f"fine-tuned model itself with export_base(model.base_model).")
    _gpt_of(peft_model)                             # refuses merged weights
    config, tensors = EXPORTERS[kind](peft_model, state, dtype)
    config = dict(peft_type=kind, task_type="CAUSAL_LM", inference_mode=True,
                  base_model_name_or_path=base_model_name_or_path, **config)
    os.makedirs(directory, exist_ok=True)
    save_tensors(os.path.join(directory, ADAPTER_WEIGHTS_NAME), tensors,
                 metadata=SAFETENSORS_METADATA)
    save_json(os.path.join(directory, ADAPTER_CONFIG_NAME), config)
    return directory


# ------------------------------------------------------------- LoRA back in
def _lora_config_from_hf(raw, names, gpt):
    """Our ``LoraConfig`` for a peft ``adapter_config.json``; the targets are the file's modules."""
    if raw.get("fan_in_fan_out") and not getattr(gpt, "conv1d_modules", ()):
        raise ValueError("adapter_config.json sets fan_in_fan_out=True, which is for weights "
                         "stored (in, out) (GPT-2's Conv1D); this model's linears are nn.Linear "
                         "(OPT), so the adapter was made for another architecture")
    paths = sorted({n.rsplit(".lora.", 1)[0] for n in names if ".lora." in n})
    targets = _hf_targets(paths, gpt) if paths else []
    return lora_config_from_peft(raw, paths, targets if targets and "." not in targets[0] else paths)


def _attach(model, config, adapter_name):
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        model.set_adapter(adapter_name)
        return model
    return get_peft_model(model, config, adapter_name)


def _check_shapes(expected, tensors, hf_keys, directory, to_hf):
    """Same tensors, same shapes -- or a ValueError naming the tensor (both names) and both shapes."""
    missing = [hf_keys.get(n, ADAPTER_PREFIX + to_hf(n)) for n in expected if n not in tensors]
    extra = [hf_keys[n] for n in tensors if n not in expected]
    if missing or extra:
        raise ValueError(f"the adapter in {directory!r} does not fit this model: missing "
                         f"{missing[:4]}, unexpected {extra[:4]}")
    for name, live in expected.items():
        if tensors[name].shape != live.shape:
            raise ValueError(f"tensor {hf_keys[name]!r} (ours: {name}) has shape "
                             f"{tuple(tensors[name].shape)} in {directory!r}, but this model "
                             f"needs {tuple(live.shape)}: was the adapter made for another base?")


def import_lora_adapter(model, directory, adapter_name="default", is_trainable=False):
    """Read a peft LoRA (or DoRA) adapter made for an exported base; return our PeftModel.

    ``model`` is a GPT (it is wrapped in place, as ``get_peft_model`` does) or a
    PeftModel (the adapter is added and made active). Everything is read and
    checked on a copy first; a bad file leaves ``model`` untouched.
    """
    raw = load_json(os.path.join(directory, ADAPTER_CONFIG_NAME))
    hf = load_tensors(os.path.join(directory, ADAPTER_WEIGHTS_NAME))
    gpt = model.base_model if isinstance(model, PeftModel) else model
    tensors, hf_keys = {}, {}
    for key, arr in hf.items():
        try:
            name = namer(gpt)[1](key)
        except ValueError:
            raise ValueError(f"tensor {key!r} in {directory!r} names no module of an exported "
                             f"mini GPT (expected keys like {ADAPTER_PREFIX}model.decoder."
                             f"layers.0.self_attn.q_proj.lora_A.weight)") from None
        tensors[name], hf_keys[name] = arr, key
    config = _lora_config_from_hf(raw, tensors, gpt)
    try:
        trial = _attach(copy.deepcopy(model), config, adapter_name)
    except ImportError as err:
        raise ValueError(f"cannot import this adapter: {err}") from None
    _check_shapes(trial.adapter_state_dict(adapter_name), tensors, hf_keys, directory, namer(gpt)[0])
    peft_model = _attach(model, config, adapter_name)
    for name, live in peft_model.adapter_state_dict(adapter_name).items():
        live[...] = tensors[name].astype(live.dtype)
    if not is_trainable:
        freeze_adapter(peft_model, adapter_name)
    return peft_model


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
    model = load_model(args.base)
    export_base(model, args.out)
    print(f"base model -> {args.out} (load with OPTForCausalLM.from_pretrained)")
    if args.adapter:
        adapter_out = args.adapter_out or os.path.join(args.out, "adapter")
        peft_model = PeftModel.from_pretrained(model, args.adapter)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PositionConventionWarning)
            export_adapter(peft_model, adapter_out, base_model_name_or_path=os.path.abspath(args.out))
        for w in caught:
            print(f"note: {w.message}")
        print(f"adapter -> {adapter_out} (load with peft.PeftModel.from_pretrained(base, dir))")


if __name__ == "__main__":
    raise SystemExit(main())
