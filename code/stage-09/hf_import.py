"""Bring a real model: a local Hugging Face GPT-2 or OPT checkpoint as a NumPy model.

    model = load_hf_checkpoint("path/to/gpt2")        # config.json + model.safetensors
    tokenizer = load_hf_tokenizer("path/to/gpt2")     # hf_tokenizer.py: GPT-2's byte-level BPE
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["c_attn", "c_proj"]))

Supported (what the two architectures need, nothing more):

    model_type  becomes                              file keys -> our names
    gpt2        gpt2.GPT2LMHeadModel (HF's names)    the same; Conv1D weights (in, out) transposed
    opt         minigpt.GPT (pre-LN, "125m-style")   hf_export's name table; 2 position rows dropped

Files: ``model.safetensors``, or shards listed in ``model.safetensors.index.json``.
``pytorch_model.bin`` is refused with the one-line conversion (a pickle can run
code when loaded; safetensors is a JSON header plus raw bytes). Weights may be
float32, float16 or bfloat16 on disk; the model computes in ``dtype`` (float32).

All or nothing: the config is translated, every file header read, every tensor
name and shape checked against the config, and the memory the model needs
estimated against what is available -- all before one weight is read. A refusal
names what is missing or wrong (the tensor, its shape in the file, the shape the
config implies). Errors are ``ValueError``, as everywhere in this module.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from checkpoint import atomic_directory, load_json, save_json, save_tensors
from gpt2 import GPT2LMHeadModel
from hf_export import POSITION_OFFSET
from hf_names import to_hf_name
from hf_tokenizer import load_hf_tokenizer  # noqa: F401  (the checkpoint's tokenizer, same folder)
from minigpt import GPT, GPTConfig
from nn import Embedding, LayerNorm, Linear
from quantization import QuantizedLinear

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONVERT = ('python -c "from transformers import AutoModelForCausalLM as M; '
           'M.from_pretrained(\'{d}\').save_pretrained(\'{d}\')"')
ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "relu": "relu"}
SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}
GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")   # old GPT-2 files keep the causal mask


# ------------------------------------------------------------------ configs
def _refuse(directory, what, problems):
    if problems:
        raise ValueError(f"{os.path.join(directory, CONFIG_NAME)}: {what} is not supported here: "
                         + "; ".join(problems))


def _activation(directory, name):
    if name not in ACTIVATIONS:
        raise ValueError(f"{os.path.join(directory, CONFIG_NAME)}: activation_function={name!r} "
                         f"is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def gpt2_config(raw: dict, directory=".", dtype=np.float32) -> GPTConfig:
    """Our config for a ``GPT2LMHeadModel`` ``config.json`` (Hugging Face's defaults where absent)."""
    problems = [f"{key}={raw[key]!r} (expected {ok!r})" for key, ok in
                (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                 ("add_cross_attention", False)) if key in raw and raw[key] != ok]
    _refuse(directory, "this GPT-2 variant", problems)
    return GPTConfig(vocab_size=raw.get("vocab_size", 50257), context_length=raw.get("n_positions", 1024),
                     d_model=raw.get("n_embd", 768), n_layers=raw.get("n_layer", 12),
                     n_heads=raw.get("n_head", 12), d_ff=raw.get("n_inner"), dtype=dtype,
                     activation=_activation(directory, raw.get("activation_function", "gelu_new")),
                     layer_norm_eps=raw.get("layer_norm_epsilon", 1e-5),
                     tie_word_embeddings=raw.get("tie_word_embeddings", True))


def opt_config_to_ours(raw: dict, directory=".", dtype=np.float32) -> GPTConfig:
    """Our config for an ``OPTForCausalLM`` ``config.json``: the 125m layout only.

    OPT-350m projects its 512-wide embeddings to 1024 (``project_in``/``project_out``)
    and normalises after each sublayer (``do_layer_norm_before=false``): both refused.
    """
    D = raw.get("hidden_size", 768)
    problems = []
    if raw.get("word_embed_proj_dim", D) != D:
        problems.append(f"project_in/project_out (word_embed_proj_dim={raw['word_embed_proj_dim']} "
                        f"!= hidden_size={D}, as in OPT-350m)")
    if not raw.get("do_layer_norm_before", True):
        problems.append("post-LayerNorm blocks (do_layer_norm_before=false, as in OPT-350m)")
    if raw.get("_remove_final_layer_norm", False):
        problems.append("no final LayerNorm (_remove_final_layer_norm=true)")
    if not raw.get("layer_norm_elementwise_affine", True):
        problems.append("LayerNorm without weight and bias (layer_norm_elementwise_affine=false)")
    _refuse(directory, "this OPT variant", problems)
    return GPTConfig(vocab_size=raw.get("vocab_size", 50272), d_model=D,
                     context_length=raw.get("max_position_embeddings", 2048),
                     n_layers=raw.get("num_hidden_layers", 12), n_heads=raw.get("num_attention_heads", 12),
                     d_ff=raw.get("ffn_dim", 4 * D), bias=raw.get("enable_bias", True), dtype=dtype,
                     activation=_activation(directory, raw.get("activation_function", "relu")),
                     tie_word_embeddings=raw.get("tie_word_embeddings", True))


# --------------------------------------------------- names: file key <-> ours
def gpt2_layout(key: str):
    """``(canonical key, transpose)`` of a GPT-2 file key; ``None`` for a mask buffer."""
    if key.endswith(GPT2_BUFFERS):
        return None
    if not key.startswith(("transformer.", "lm_head.")):
        key = "transformer." + key                          # files saved from GPT2Model
    conv1d = key.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))
    return key, conv1d


def opt_layout(key: str):
    return ("model." + key if key.startswith("decoder.") else key), False


ARCHITECTURES = {   # model_type -> (config translation, model class, key layout, our name -> key)
    "gpt2": (gpt2_config, GPT2LMHeadModel, gpt2_layout, lambda name: name),
    "opt": (opt_config_to_ours, GPT, opt_layout, to_hf_name),
}


# ------------------------------------------------------------- safetensors files
def read_header(path) -> tuple[int, dict]:
    """``(bytes before the data, {key: {"dtype", "shape", "data_offsets"}})`` of a safetensors file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: corrupt safetensors header ({err})") from None
    header.pop("__metadata__", None)
    for key, entry in header.items():
        start, end = entry["data_offsets"]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} is {entry['dtype']}; readable here: "
                             f"{sorted(SAFETENSORS_DTYPES)} (quantized checkpoints are not)")
        itemsize = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]).itemsize
        if end - start != math.prod(entry["shape"]) * itemsize or 8 + n + end > size:
            raise ValueError(f"{path}: tensor {key!r} has offsets {start}..{end} that do not fit "
                             f"its shape {entry['shape']} or the file (truncated?)")
    return 8 + n, header


def read_tensor(path, data_start, entry, dtype) -> np.ndarray:
    """One tensor's bytes, converted to ``dtype`` (bfloat16: the high half of a float32)."""
    raw = np.fromfile(path, dtype=SAFETENSORS_DTYPES[entry["dtype"]],
                      count=math.prod(entry["shape"]), offset=data_start + entry["data_offsets"][0])
    if entry["dtype"] == "BF16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.reshape(entry["shape"]).astype(dtype, copy=False)


def weight_files(directory) -> list[str]:
    """The safetensors file(s) of a checkpoint; refuses pickles and half-present shards."""
    single, index = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, INDEX_NAME)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        weight_map = load_json(index).get("weight_map", {})
        files = sorted({os.path.join(directory, name) for name in weight_map.values()})
        missing = [os.path.basename(p) for p in files if not os.path.isfile(p)]
        if missing or not files:
            raise ValueError(f"{index} lists shards that are not in {directory!r}: {missing or '(none)'}")
        return files
    if any(os.path.isfile(os.path.join(directory, n)) for n in
           ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ValueError(f"{directory!r} holds only pytorch_model.bin, a pickle, which is never "
                         f"loaded here (unpickling can run code). Convert it once with "
                         f"transformers: {CONVERT.format(d=directory)}")
    raise ValueError(f"no weights in {directory!r}: expected {WEIGHTS_NAME} or {INDEX_NAME}")


# --------------------------------------------------------------------- loading
def read_config(directory) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint directory {directory!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"no {CONFIG_NAME} in {directory!r}: not a Hugging Face checkpoint folder")
    raw = load_json(path)
    if raw.get("model_type") not in ARCHITECTURES:
        raise ValueError(f"{path}: model_type={raw.get('model_type')!r} is not supported; supported: "
                         f"{sorted(ARCHITECTURES)} (GPT2LMHeadModel, OPTForCausalLM)")
    return raw


def available_memory() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(directory, numel: int, largest: int, dtype, max_memory=None) -> int:
    """Refuse before loading when the model (plus one tensor being converted) would not fit."""
    need = (numel + largest) * np.dtype(dtype).itemsize
    limit = available_memory() if max_memory is None else int(max_memory)
    if limit is not None and need > limit:
        raise ValueError(f"{directory!r}: loading needs about {need / 2**20:,.0f} MiB "
                         f"({numel:,} parameters as {np.dtype(dtype).name}) but only "
                         f"{limit / 2**20:,.0f} MiB are available"
                         f"{' (max_memory)' if max_memory is not None else ' (MemAvailable)'}; "
                         f"nothing was loaded")
    return need


def _index_tensors(files, layout):
    """``{canonical key: (path, data_start, entry, transpose)}`` over every file."""
    found = {}
    for path in files:
        data_start, header = read_header(path)
        for key, entry in header.items():
            canon = layout(key)
            if canon is not None:
                found[canon[0]] = (path, data_start, entry, canon[1])
    return found


def _plan(model, found, hf_key, directory, config_note):
    """``[(our name, file entry)]`` for every parameter, after checking names and shapes."""
    plan, missing = [], []
    for name, param in model.named_parameters():
        key = hf_key(name)
        if key not in found:
            missing.append(key)
            continue
        path, start, entry, transpose = found.pop(key)
        shape = tuple(param.shape[::-1] if transpose else param.shape)
        if key.endswith("embed_positions.weight"):          # OPT: 2 extra leading rows
            shape = (shape[0] + POSITION_OFFSET,) + shape[1:]
        if tuple(entry["shape"]) != shape:
            raise ValueError(f"tensor {key!r} has shape {tuple(entry['shape'])} in "
                             f"{os.path.basename(path)}, but {CONFIG_NAME} ({config_note}) implies "
                             f"{shape}; nothing was loaded")
        plan.append((name, (path, start, entry, transpose)))
    found.pop("lm_head.weight", None)                        # tied: the head is wte/embed_tokens
    if missing or found:
        raise ValueError(f"{directory!r}: tensors do not match {CONFIG_NAME} ({config_note}): "
                         f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
                         f"{sorted(found)[:4]}{'...' if len(found) > 4 else ''}; nothing was loaded")
    return plan


def load_hf_checkpoint(directory, dtype=np.float32, max_memory=None):
    """A ``GPT2LMHeadModel`` or ``OPTForCausalLM`` folder as our model, in eval mode.

    ``max_memory`` (bytes) replaces the available memory as the limit. The result
    is a ``gpt2.GPT2LMHeadModel`` (Hugging Face's names) or a ``minigpt.GPT`` (OPT).
    """
    directory = os.path.expanduser(os.fspath(directory))
    raw = read_config(directory)
    to_config, model_cls, layout, hf_key = ARCHITECTURES[raw["model_type"]]
    config = to_config(raw, directory, dtype)
    found = _index_tensors(weight_files(directory), layout)
    sizes = [math.prod(e["shape"]) for (_, _, e, _) in found.values()]
    check_memory(directory, sum(sizes), max(sizes, default=0), dtype, max_memory)
    model = model_cls(config)
    note = (f"d_model={config.d_model}, n_layers={config.n_layers}, vocab_size={config.vocab_size}, "
            f"context_length={config.context_length}, d_ff={config.ffn_dim}")
    for name, (path, start, entry, transpose) in _plan(model, found, hf_key, directory, note):
        array = read_tensor(path, start, entry, dtype)
        if transpose:
            array = np.ascontiguousarray(array.T)           # Conv1D (in, out) -> Linear (out, in)
        elif name == "embed_positions.weight":
            array = array[POSITION_OFFSET:].copy()
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, array)
    model.name_or_path = directory                          # save_pretrained records it, as in peft
    return model.eval()


# ------------------------------------------------------------------- and back
def gpt2_state_dict(model) -> dict:
    """``{Hugging Face key: array}`` of a loaded GPT-2's *base* weights, in the file layout.

    Conv1D weights go back to ``(in, out)``; a 4-bit weight is written dequantized
    (what our QLoRA computes with); adapters are left out. For OPT, see
    ``hf_export.base_tensors``.
    """
    model = getattr(model, "base_model", model)
    tensors = {}
    for path, module in model.named_modules():
        if not isinstance(module, (Linear, QuantizedLinear, LayerNorm, Embedding)):
            continue
        key = path.replace(".base_layer", "")
        weight = np.asarray(module.weight)
        tensors[key + ".weight"] = weight.T if key.endswith(GPT2LMHeadModel.conv1d_modules) else weight
        if getattr(module, "bias", None) is not None:
            tensors[key + ".bias"] = module.bias
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def gpt2_config_json(config: GPTConfig) -> dict:
    """The ``config.json`` of a ``GPT2LMHeadModel`` with our ``config`` (no dropout: ours has none)."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.context_length, "n_embd": config.d_model, "n_layer": config.n_layers,
            "n_head": config.n_heads, "n_inner": config.d_ff, "activation_function": config.activation,
            "layer_norm_epsilon": config.layer_norm_eps, "tie_word_embeddings": config.tie_word_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "torch_dtype": "float32"}


def save_gpt2_checkpoint(model, directory) -> str:
    """Write a loaded (or built) GPT-2 as a Hugging Face folder: ``GPT2LMHeadModel.from_pretrained`` reads it."""
    tensors, config = gpt2_state_dict(model), gpt2_config_json(getattr(model, "base_model", model).config)
    with atomic_directory(directory) as tmp:         # both files or neither
        save_tensors(os.path.join(tmp, WEIGHTS_NAME), tensors, metadata={"format": "pt"})
        save_json(os.path.join(tmp, CONFIG_NAME), config)
    return directory
