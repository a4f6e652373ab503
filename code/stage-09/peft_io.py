"""Adapter files, in Hugging Face ``peft``'s layout: one directory loads here and in ``peft``.

    my_adapter/
      adapter_config.json          {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, ...}
      adapter_model.safetensors    only the adapter's tensors, under peft's key names:
                                   base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight

LoRA (rsLoRA, DoRA, ``bias`` modes), (IA)3, prompt and prefix tuning are written
exactly as ``peft`` writes them for the equivalent ``OPTForCausalLM`` (the mini
GPT *is* an OPT decoder; ``hf_names.py`` holds the name table). One of our
settings has no ``peft`` field and is kept as an extra key, which ``peft``
ignores with a warning: ``position_convention: "keep"`` of prompt and prefix
tuning. What ``peft`` cannot hold -- bottleneck adapters, BitFit, full
fine-tuning, and a prefix still produced by its MLP (``prefix_projection``; peft
saves only the table, and training would go on without the MLP) -- is written
in the same two files with our own dotted tensor names.
(``hf_export.export_adapter`` writes the MLP's table, as peft does.)

Loading reads either layout, and also the files written before this one (our
dotted names plus a ``base_model_config`` key; ``tests/fixtures/adapters_v1``).
Everything is read and validated -- names, shapes *and* dtypes, by
``checkpoint.validate_tensors``, the one validator for checkpoints and adapters
-- on a copy of the model *before* the model is touched: a corrupt file, a
missing or unexpected tensor, or a shape made for another base raises
``ValueError`` and leaves the model as it was.
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np

from checkpoint import (atomic_directory, load_json, load_metadata, load_tensors, save_json,
                        save_tensors, validate_tensors)
from hf_names import ADAPTER_PREFIX, fan_in_fan_out, from_hf_key, hf_targets, our_targets, to_hf_key
from peft_base import bias_names, method_for
from peft_config import CONFIG_TYPES, IA3Config, LoraConfig, PeftConfig, check_keys

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SAFETENSORS_METADATA = {"format": "pt"}     # what peft writes; transformers expects it
PROMPT_KEY = "prompt_embeddings"            # peft's one tensor for prompt / prefix tuning
# peft LoRA options that change what the adapter computes and that our LoRA lacks
TOKEN_PARAMS = ("trainable_tokens_delta",)          # trainable_tokens.TrainableTokensLayer
UNSUPPORTED_LORA = ("lora_bias", "use_qalora", "rank_pattern", "alpha_pattern",
                    "layer_replication", "modules_to_save", "target_parameters")


# ------------------------------------------------------------------ what an adapter holds
def adapter_state_dict(peft_model, adapter_name=None) -> dict:
    """``{our dotted name: live array}`` of one adapter's tensors (the active one by default)."""
    name = adapter_name or single_active(peft_model)
    if name not in peft_model.adapters:
        raise ValueError(f"unknown adapter {name!r}; known adapters: {sorted(peft_model.adapters)}")
    state, base = peft_model.adapters[name], peft_model.base_model
    tensors = {}
    for path, module in state.slots.items():
        attr = base.get_submodule(path).adapter_attr
        for pname, arr in module.named_parameters():
            tensors[f"{path}.{attr}.{pname}"] = arr
    if state.encoder is not None:
        prefix = method_for(state.config.peft_type).encoder_attr
        for pname, arr in state.encoder.named_parameters():
            tensors[f"{prefix}.{pname}"] = arr
    for pname in state.trainable:
        tensors[pname] = base.get_parameter(pname)
    return tensors


def single_active(peft_model) -> str:
    """The one active adapter's name; a ValueError when several are active."""
    if len(peft_model.active_adapters) != 1:
        raise ValueError(f"several adapters are active ({peft_model.active_adapters}); "
                         f"name the one to use with adapter_name=")
    return peft_model.active_adapters[0]


# ------------------------------------------------------------------ writing
def _lora_files(peft_model, state):
    c, gpt = state.config, peft_model.base_model
    lora_paths = [p for p, layer in state.slots.items() if layer.param_names != TOKEN_PARAMS]
    config = {"r": c.r, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
              "target_modules": hf_targets(lora_paths, gpt), "bias": c.bias,
              "use_rslora": c.use_rslora, "use_dora": c.use_dora,
              "fan_in_fan_out": fan_in_fan_out(gpt, lora_paths),
              "init_lora_weights": c.init_lora_weights, "layers_to_transform": None,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
              "trainable_token_indices": c.trainable_token_indices}
    tensors = {f"{path}.{'lora' if path in lora_paths else 'token_adapter'}.{pname}": arr
               for path, layer in state.slots.items() for pname, arr in layer.named_parameters()}
    for name in lora_bias_names(gpt, state):        # trained in place, in the base model
        tensors[name] = gpt.get_parameter(name)
    return config, {ADAPTER_PREFIX + to_hf_key(gpt, n): a for n, a in tensors.items()}


def lora_bias_names(gpt, state):
    """The biases ``bias="all"``/``"lora_only"`` trains (from the config: a loaded, frozen
    adapter has an empty ``state.trainable``, but its biases still differ from the base's)."""
    if state.config.bias == "all":
        return bias_names(gpt)
    if state.config.bias == "lora_only":
        return [f"{p}.base_layer.bias" for p in state.slots if gpt.get_submodule(p).bias is not None]
    return []


def _ia3_files(peft_model, state):
    gpt, tensors = peft_model.base_model, {}
    for path, vector in state.slots.items():
        # peft: (1, in) multiplies a feed-forward layer's input, (out, 1) the others' output
        tensors[ADAPTER_PREFIX + to_hf_key(gpt, path) + ".ia3_l"] = (
            vector.ia3_l[None, :] if vector.is_feedforward else vector.ia3_l[:, None])
    ff = [p for p, v in state.slots.items() if v.is_feedforward]
    targets = hf_targets(list(state.slots), gpt)
    ff_targets = hf_targets(ff, gpt) if ff else []
    if any("." in t for t in targets + ff_targets):     # peft wants ff a subset of targets
        targets = sorted(to_hf_key(gpt, p) for p in state.slots)
        ff_targets = sorted(to_hf_key(gpt, p) for p in ff)
    config = {"target_modules": targets, "feedforward_modules": ff_targets,
              "fan_in_fan_out": fan_in_fan_out(gpt, state.slots), "init_ia3_weights": True, "modules_to_save": None}
    return config, tensors


def _prompt_learning_config(gpt, c):
    return {"num_virtual_tokens": c.num_virtual_tokens, "token_dim": gpt.config.d_model,
            "num_transformer_submodules": 1, "num_attention_heads": gpt.config.n_heads,
            "num_layers": gpt.config.n_layers}


def _prompt_files(peft_model, state):
    config = dict(_prompt_learning_config(peft_model.base_model, state.config),
                  prompt_tuning_init="RANDOM", tokenizer_name_or_path=None)   # irrelevant once loaded
    return config, {PROMPT_KEY: state.encoder.prompt}


def prefix_table(encoder) -> np.ndarray:
    """Our ``(L, 2, P, H, dh)`` prefix as peft's ``(P, L*2*H*dh)`` embedding.

    peft views it as ``(B, P, L*2, H, dh)`` and permutes to ``(L*2, B, H, P, dh)``:
    row ``2 l`` of the ``L*2`` axis is layer l's keys, ``2 l + 1`` its values.
    """
    table = encoder.table()                                 # (L, 2, P, H, dh)
    P = table.shape[2]
    return np.ascontiguousarray(table.transpose(2, 0, 1, 3, 4).reshape(P, -1))   # (P, L*2*D)


def _prefix_files(peft_model, state):
    gpt = peft_model.base_model
    config = dict(_prompt_learning_config(gpt, state.config), encoder_hidden_size=gpt.config.d_model,
                  prefix_projection=False)            # the MLP, if any, is evaluated once
    return config, {PROMPT_KEY: prefix_table(state.encoder)}


HF_WRITERS = {"LORA": _lora_files, "IA3": _ia3_files, "PROMPT_TUNING": _prompt_files,
              "PREFIX_TUNING": _prefix_files}


def adapter_files(peft_model, adapter_name, base_model_name_or_path=None, dtype=None,
                  extensions=True):
    """``(adapter_config.json dict, {file key: array})`` for one adapter.

    ``extensions``: also write our settings ``peft`` has no field for (see above);
    ``hf_export`` leaves them out so that ``peft`` loads its files without a warning.
    """
    state = peft_model.adapters[adapter_name]
    kind = state.config.peft_type
    mlp = getattr(state.encoder, "embedding", None) is not None     # a prefix MLP still training
    if kind in HF_WRITERS and not (mlp and extensions):
        config, tensors = HF_WRITERS[kind](peft_model, state)
        convention = getattr(state.config, "position_convention", "shift")
        if extensions and convention != "shift":
            config["position_convention"] = convention
    else:                                              # no peft equivalent: our names
        config = {k: v for k, v in state.config.to_dict().items() if k != "peft_type"}
        tensors = adapter_state_dict(peft_model, adapter_name)
    config = dict(config, peft_type=kind, task_type="CAUSAL_LM", inference_mode=True,
                  base_model_name_or_path=base_model_name_or_path)
    tensors = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in tensors.items()}
    return config, tensors


def write_adapter(directory, config, tensors, base_config=None):
    """The two files, into a directory an ``atomic_directory`` block is filling (the
    callers' ``with``: both files or neither); ``base_config`` (a ``GPTConfig`` dict)
    goes into the safetensors metadata, where peft does not look, so that a load into
    another base can be refused."""
    os.makedirs(directory, exist_ok=True)
    metadata = dict(SAFETENSORS_METADATA)
    if base_config is not None:
        metadata["base_model_config"] = json.dumps(base_config, sort_keys=True)
    save_tensors(os.path.join(directory, WEIGHTS_NAME), tensors, metadata=metadata)
    save_json(os.path.join(directory, CONFIG_NAME), config)


def save_pretrained(peft_model, directory, adapter_name=None):
    """Write each adapter (or only ``adapter_name``) in peft's layout.

    With several adapters and no ``adapter_name``, ``"default"`` goes to
    ``directory`` and every other adapter to ``directory/<name>`` (as in ``peft``).
    ``base_model_name_or_path`` is the base's ``name_or_path`` (set by
    ``checkpoint.load_model``), or ``None``.
    """
    if adapter_name is not None and adapter_name not in peft_model.adapters:
        raise ValueError(f"unknown adapter {adapter_name!r}; known adapters: "
                         f"{sorted(peft_model.adapters)}")
    names = [adapter_name] if adapter_name else list(peft_model.adapters)
    source = getattr(peft_model.base_model, "name_or_path", None)
    files = {name: adapter_files(peft_model, name, source) for name in names}   # all, then write
    base = peft_model.base_model.config.to_dict()
    with atomic_directory(directory) as tmp:           # all files or none (a failed save
        for name in names:                             # leaves the previous one loadable)
            target = tmp if (name == "default" or len(names) == 1) else os.path.join(tmp, name)
            write_adapter(target, *files[name], base_config=base)


# ------------------------------------------------------------------ reading
def _config_from_hf(raw, names, shapes, model) -> PeftConfig:
    """Our config for a peft-layout LoRA or (IA)3 file; the targets are the file's modules,
    so any ``target_modules`` form peft accepts ("all-linear", a regex, ...) reads the same."""
    kind = raw.get("peft_type")
    if kind == "LORA":
        for key in UNSUPPORTED_LORA:
            if raw.get(key):
                raise ValueError(f"adapter_config.json sets {key}={raw[key]!r}; our LoRA has no such "
                                 f"option, so the loaded adapter would compute something else")
        paths = sorted({n.rsplit(".lora.", 1)[0] for n in names if ".lora." in n})
        if not paths:
            raise ValueError("the adapter file holds no lora_A / lora_B tensors")
        if raw.get("fan_in_fan_out") and not fan_in_fan_out(model, paths):
            raise ValueError("adapter_config.json sets fan_in_fan_out=True, which is for weights "
                             "stored (in, out) (GPT-2's Conv1D); this model's targeted layers are "
                             "nn.Linear (OPT), so the adapter was made for another architecture")
        return LoraConfig(r=raw.get("r"), lora_alpha=raw.get("lora_alpha"),   # types checked there:
                          lora_dropout=raw.get("lora_dropout", 0.0),       # no int("8"), no
                          bias=raw.get("bias", "none"),                    # bool("false")
                          use_rslora=raw.get("use_rslora", False),
                          use_dora=raw.get("use_dora", False),
                          fan_in_fan_out=raw.get("fan_in_fan_out", False),
                          target_modules=our_targets(paths, model),
                          trainable_token_indices=raw.get("trainable_token_indices"))
    paths = sorted(n[: -len(".ia3.ia3_l")] for n in names if n.endswith(".ia3.ia3_l"))
    ff = [p for p in paths if shapes[p + ".ia3.ia3_l"][0] == 1]      # (1, in): input scaled
    targets = our_targets(paths, model)
    ff_targets = ([] if not ff else sorted(ff) if "." in targets[0] else our_targets(ff, model))
    return IA3Config(target_modules=targets, feedforward_modules=ff_targets)


def _our_name(key, directory, model):
    if not key.startswith(ADAPTER_PREFIX):
        return key                                     # our own dotted name
    try:
        return from_hf_key(model, key)
    except ValueError:
        raise ValueError(f"tensor {key!r} in {directory!r} names no module of the mini GPT "
                         f"(expected keys like {ADAPTER_PREFIX}model.decoder.layers.0."
                         f"self_attn.q_proj.lora_A.weight)") from None


def read_adapter_dir(directory, model):
    """``(config, {our name: array}, {our name: key in the file})`` of an adapter directory
    for the base ``model`` (its config, and its names: ``hf_names.to_hf_key``).

    Reads peft's layout and ours; raises ``ValueError`` with the path on any problem.
    """
    cfg_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"no {CONFIG_NAME} in {directory!r}: not an adapter directory")
    raw = load_json(cfg_path)
    kind = raw.get("peft_type")
    if not isinstance(kind, str) or kind not in CONFIG_TYPES:
        raise ValueError(f"{cfg_path}: unknown peft_type {kind!r}; known: {sorted(CONFIG_TYPES)}")
    check_keys(raw, CONFIG_TYPES[kind], cfg_path)
    check_same_base(raw.pop("base_model_config", None), model.config, cfg_path)  # (files before
    weights = os.path.join(directory, WEIGHTS_NAME)                              # peft's layout)
    check_same_base(_saved_base(weights), model.config, weights)
    file_tensors = load_tensors(weights)
    check_finite_floats(file_tensors, weights)
    tensors, keys = {}, {}
    for key, arr in file_tensors.items():
        if key == PROMPT_KEY:
            name = ("prefix_encoder.prefix" if raw.get("peft_type") == "PREFIX_TUNING"
                    else "prompt_encoder.prompt")
        else:
            name = _our_name(key, directory, model)
        tensors[name], keys[name] = arr, key
    if PROMPT_KEY in file_tensors:                     # peft's numbering unless we said otherwise
        raw.setdefault("position_convention", "shift")
        if raw.get("prompt_tuning_init") == "TEXT" and not raw.get("prompt_tuning_init_token_ids"):
            # peft's TEXT start names a text and a tokenizer (prompt_tuning_init_text,
            # tokenizer_name_or_path), not ids; the saved prompt replaces any start anyway
            raw["prompt_tuning_init"] = "RANDOM"
    if raw.get("peft_type") in ("LORA", "IA3") and any(k.startswith(ADAPTER_PREFIX) for k in file_tensors):
        config = _config_from_hf(raw, tensors, {n: a.shape for n, a in tensors.items()}, model)
    else:
        config = PeftConfig.from_dict(raw, cfg_path)
    return config, tensors, keys


def _saved_base(weights_path):
    try:
        text = load_metadata(weights_path).get("base_model_config")
    except (OSError, ValueError):
        return None                                    # (load_tensors reports the file itself)
    return None if text is None else json.loads(text)


def check_same_base(saved, model_config, source) -> None:
    """An adapter trained on another base (vocabulary, width, layers, heads, context) is
    refused, naming every difference; files that recorded no base are not checked."""
    if not isinstance(saved, dict):
        return
    ours = model_config.to_dict()
    diff = [f"{k}: {saved[k]!r} in the file, {ours[k]!r} in the model" for k in
            ("vocab_size", "context_length", "d_model", "n_layers", "n_heads")
            if k in saved and saved[k] != ours.get(k)]
    if diff:
        raise ValueError(f"{source} was saved from another base model: " + "; ".join(diff))


def check_finite_floats(tensors, source) -> None:
    """Every adapter tensor must be a float array without NaN or infinity (an all-NaN or
    an int8 adapter would otherwise load and silently ruin every output)."""
    for name, arr in tensors.items():
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{source}: tensor {name!r} has dtype {arr.dtype}, expected a "
                             f"float dtype")
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise ValueError(f"{source}: tensor {name!r} holds {bad} non-finite values "
                             f"(NaN or infinity) of {arr.size}")


def _fit_layouts(tensors, expected):
    """peft's shapes -> ours, where only the layout differs: an (IA)3 vector ``(n, 1)``/``(1, n)``
    -> ``(n,)``; a prefix ``(P, L*2*H*dh)`` -> ``(L, 2, P, H, dh)``. Other shapes stay, for the
    validator to report."""
    for name, arr in tensors.items():
        want = expected.get(name)
        if want is None or arr.shape == want.shape or arr.size != want.size:
            continue
        if name.endswith(".ia3_l"):
            tensors[name] = arr.reshape(-1)
        elif name == "prefix_encoder.prefix":
            L, two, P, H, dh = want.shape
            tensors[name] = arr.reshape(P, L, two, H, dh).transpose(1, 2, 0, 3, 4)


def _fill(live, tensors, keys, directory):
    """Validate ``tensors`` against the adapter's ``live`` arrays, then copy them in."""
    _fit_layouts(tensors, live)
    labels = {n: f"{n} ({keys[n]} in the file)" for n in tensors if keys.get(n, n) != n}
    validate_tensors(tensors, {n: (a.shape, a.dtype) for n, a in live.items()},
                     source=os.path.join(directory, WEIGHTS_NAME), labels=labels)
    for name, arr in live.items():
        arr[...] = tensors[name]


def from_pretrained(cls, model, directory, adapter_name="default", is_trainable=False):
    """``cls(model, config)`` with the adapter saved in ``directory`` (validated on a copy first)."""
    config, tensors, keys = read_adapter_dir(directory, model)
    trial = cls(copy.deepcopy(model), config, adapter_name)             # dry run on a copy
    _fill(trial.adapter_state_dict(adapter_name), dict(tensors), keys, directory)
    peft_model = cls(model, config, adapter_name)
    _fill(peft_model.adapter_state_dict(adapter_name), tensors, keys, directory)
    if not is_trainable:
        freeze_adapter(peft_model, adapter_name)
    return peft_model


def load_adapter(peft_model, directory, adapter_name, is_trainable=False):
    """Add the adapter saved in ``directory`` under ``adapter_name`` (not activated)."""
    config, tensors, keys = read_adapter_dir(directory, peft_model.base_model)
    trial = copy.deepcopy(peft_model)
    trial.add_adapter(adapter_name, config)
    _fill(trial.adapter_state_dict(adapter_name), dict(tensors), keys, directory)
    peft_model.add_adapter(adapter_name, config)
    _fill(peft_model.adapter_state_dict(adapter_name), tensors, keys, directory)
    if not is_trainable:
        freeze_adapter(peft_model, adapter_name)


def freeze_adapter(peft_model, adapter_name) -> None:
    """Freeze every module of one adapter (loaded for inference, as peft's is_trainable=False)."""
    state = peft_model.adapters[adapter_name]
    for module in list(state.slots.values()) + ([state.encoder] if state.encoder else []):
        module.freeze()
    state.trainable = []
    if adapter_name in peft_model.active_adapters:
        peft_model.set_adapter(peft_model.active_adapters)
