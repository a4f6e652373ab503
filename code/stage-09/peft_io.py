"""Saving and loading adapters in the Hugging Face layout.

    my_adapter/
      adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, ...}
      adapter_model.safetensors    only the adapter's tensors (a few KB, not the model)

Tensor names are the dotted parameter names in our model
(``layers.0.self_attn.q_proj.lora.A``); ``hf_export.py`` renames them for
Hugging Face. Loading reads and validates everything *before* touching the
model: a corrupt file, a missing or unexpected tensor, or a shape made for
another base raises ``ValueError`` and leaves the model as it was.
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np

from checkpoint import atomic_write_text, load_tensors, save_tensors
from peft_config import PeftConfig
from peft_layout import from_peft_layout, is_peft_layout

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state_dict(peft_model, adapter_name=None) -> dict:
    """``{name: array}`` of one adapter's tensors (the active one by default)."""
    name = adapter_name or single_active(peft_model)
    if name not in peft_model.adapters:
        raise ValueError(f"unknown adapter {name!r}; known adapters: {sorted(peft_model.adapters)}")
    from peft_model import METHODS
    state, base = peft_model.adapters[name], peft_model.base_model
    tensors = {}
    for path, module in state.slots.items():
        attr = base.get_submodule(path).adapter_attr
        for pname, arr in module.named_parameters():
            tensors[f"{path}.{attr}.{pname}"] = arr
    if state.encoder is not None:
        prefix = METHODS[state.config.peft_type].encoder_attr
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


def save_pretrained(peft_model, directory, adapter_name=None):
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (atomically).

    With several adapters and no ``adapter_name``, ``"default"`` goes to
    ``directory`` and every other adapter to ``directory/<name>`` (as in ``peft``).
    """
    names = [adapter_name] if adapter_name else list(peft_model.adapters)
    for name in names:
        target = directory if (name == "default" or len(names) == 1) else os.path.join(directory, name)
        os.makedirs(target, exist_ok=True)
        config = peft_model.adapters[name].config.to_dict()
        config["base_model_config"] = peft_model.base_model.config.to_dict()
        tensors = {k: np.ascontiguousarray(v) for k, v in adapter_state_dict(peft_model, name).items()}
        save_tensors(os.path.join(target, WEIGHTS_NAME), tensors,
                     metadata={"format": "np", "peft_type": config["peft_type"]})
        atomic_write_text(os.path.join(target, CONFIG_NAME), json.dumps(config, indent=2))


def read_adapter_dir(directory):
    """Parse and load an adapter directory; raises ``ValueError`` with the path on any problem."""
    cfg_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"no {CONFIG_NAME} in {directory!r}: not an adapter directory")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); the file is corrupt or truncated")
    base_cfg = raw.pop("base_model_config", None)
    tensors = load_tensors(os.path.join(directory, WEIGHTS_NAME))
    if is_peft_layout(tensors):         # written by Hugging Face peft (for a model with its names)
        config, tensors = from_peft_layout(raw, tensors)
        return config, tensors, base_cfg
    return PeftConfig.from_dict(raw), tensors, base_cfg


def check_against(expected: dict, tensors: dict, directory):
    """Same names and shapes, or a ``ValueError`` naming the tensor and both shapes."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter in {directory!r} does not fit this model: "
                         f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, arr in expected.items():
        if tensors[name].shape != arr.shape:
            raise ValueError(f"tensor {name!r}: the adapter file has shape {tensors[name].shape} "
                             f"but this model expects {arr.shape}; was it trained on another base?")


def _copy_in(live: dict, tensors: dict):
    for name, arr in live.items():
        arr[...] = tensors[name].astype(arr.dtype)


def from_pretrained(cls, model, directory, adapter_name="default", is_trainable=False):
    """Attach the adapter saved in ``directory`` to ``model`` (validated first)."""
    from peft_model import get_peft_model
    config, tensors, _ = read_adapter_dir(directory)
    trial = get_peft_model(copy.deepcopy(model), config, adapter_name)   # dry run on a copy
    check_against(trial.adapter_state_dict(adapter_name), tensors, directory)
    peft_model = get_peft_model(model, config, adapter_name)
    _copy_in(peft_model.adapter_state_dict(adapter_name), tensors)
    if not is_trainable:
        freeze_adapter(peft_model, adapter_name)
    return peft_model


def load_adapter(peft_model, directory, adapter_name, is_trainable=False):
    """Add the adapter saved in ``directory`` under ``adapter_name`` (not activated)."""
    config, tensors, _ = read_adapter_dir(directory)
    trial = copy.deepcopy(peft_model)
    trial.add_adapter(adapter_name, config)
    check_against(trial.adapter_state_dict(adapter_name), tensors, directory)
    peft_model.add_adapter(adapter_name, config)
    _copy_in(peft_model.adapter_state_dict(adapter_name), tensors)
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
