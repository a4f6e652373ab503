"""``load_hf_checkpoint`` on files written here (NumPy only, no torch): the layouts real
GPT-2 and OPT files use, and every bad input refused with a clear error before a
weight is read. The equality with transformers itself is in ``test_hf_import.py``.
"""
import json
import os
import pickle

import numpy as np
import pytest
from safetensors.numpy import save_file

from gpt2 import GPT2LMHeadModel
from hf_export import export_base
from hf_import import gpt2_state_dict, load_hf_checkpoint
from minigpt import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=40, context_length=16, d_model=16, n_layers=2, n_heads=2)
GPT2_JSON = {"model_type": "gpt2", "vocab_size": 40, "n_positions": 16, "n_embd": 16, "n_layer": 2,
             "n_head": 2}


def random_gpt2(seed=0):
    model = GPT2LMHeadModel(CONFIG, seed=seed)
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        p[...] = rng.standard_normal(p.shape) * 0.3
    return model


def write_gpt2(directory, model=None, tensors=None, config=None):
    """A GPT-2 checkpoint folder as transformers writes it (Conv1D weights (in, out))."""
    os.makedirs(directory, exist_ok=True)
    tensors = gpt2_state_dict(model or random_gpt2()) if tensors is None else tensors
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config or GPT2_JSON, f)
    return tensors


def write_bf16(path, tensors):
    """A safetensors file with bfloat16 tensors (safetensors.numpy cannot write them)."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        raw = (np.ascontiguousarray(array, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def ids():
    return np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 9))


# --------------------------------------------------------------------- layouts
def test_gpt2_round_trip_through_files(tmp_path):
    model = random_gpt2()
    write_gpt2(tmp_path, model)
    loaded = load_hf_checkpoint(tmp_path)
    np.testing.assert_array_equal(loaded(ids()), model(ids()))
    assert not loaded.training


def test_original_gpt2_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """The ``gpt2`` files on the Hub were saved from GPT2Model: ``h.0...`` keys, ``attn.bias`` masks."""
    model = random_gpt2()
    tensors = {k.removeprefix("transformer."): v for k, v in gpt2_state_dict(model).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((16, 16), np.float32))[None, None]
    write_gpt2(tmp_path, tensors=tensors)
    np.testing.assert_array_equal(load_hf_checkpoint(tmp_path)(ids()), model(ids()))


def test_half_precision_files_are_read(tmp_path):
    model = random_gpt2()
    tensors = gpt2_state_dict(model)
    write_gpt2(tmp_path / "f16", tensors={k: v.astype(np.float16) for k, v in tensors.items()})
    write_gpt2(tmp_path / "bf16", tensors={})
    write_bf16(tmp_path / "bf16" / "model.safetensors", tensors)
    for kind, bits in (("f16", 11), ("bf16", 8)):          # mantissa bits kept
        loaded = load_hf_checkpoint(tmp_path / kind)
        w, ref = loaded.get_parameter("transformer.h.1.mlp.c_fc.weight"), model.get_parameter("transformer.h.1.mlp.c_fc.weight")
        assert w.dtype == np.float32 and np.abs(w - ref).max() <= np.abs(ref).max() * 2.0 ** -bits


def test_opt_written_by_our_export_loads_back(tmp_path):
    model = GPT(GPTConfig(vocab_size=40, context_length=16, d_model=16, n_layers=2, n_heads=2,
                          activation="relu", d_ff=24), seed=3)
    export_base(model, tmp_path)
    np.testing.assert_array_equal(load_hf_checkpoint(tmp_path)(ids()), model(ids()))


def test_shards_listed_in_the_index(tmp_path):
    model, tensors = random_gpt2(), None
    tensors = gpt2_state_dict(model)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (tmp_path / "config.json").write_text(json.dumps(GPT2_JSON))
    np.testing.assert_array_equal(load_hf_checkpoint(tmp_path)(ids()), model(ids()))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        load_hf_checkpoint(tmp_path)


# ------------------------------------------------------------------- bad input
def test_a_folder_without_config_or_weights(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(GPT2_JSON))
    with pytest.raises(ValueError, match="no weights .*model.safetensors"):
        load_hf_checkpoint(tmp_path)


def test_pytorch_model_bin_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))             # would create the marker if unpickled
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    (tmp_path / "config.json").write_text(json.dumps(GPT2_JSON))
    with pytest.raises(ValueError, match="pickle.*save_pretrained"):
        load_hf_checkpoint(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "llama"}, r"model_type='llama' is not supported; supported: \['gpt2', 'opt'\]"),
    ({"model_type": None}, "model_type=None"),
    ({"activation_function": "gelu"}, r"activation_function='gelu' is not supported"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
])
def test_unsupported_configs(tmp_path, changes, message):
    write_gpt2(tmp_path, config={k: v for k, v in {**GPT2_JSON, **changes}.items() if v is not None})
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(tmp_path)


def test_opt_350m_layout_names_what_is_missing(tmp_path):
    config = {"model_type": "opt", "hidden_size": 32, "word_embed_proj_dim": 16,
              "do_layer_norm_before": False, "num_hidden_layers": 1, "num_attention_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"project_in/project_out .*16 != hidden_size=32.*post-LayerNorm"):
        load_hf_checkpoint(tmp_path)


def test_config_disagreeing_with_the_tensors_names_tensor_and_shapes(tmp_path):
    write_gpt2(tmp_path, config=dict(GPT2_JSON, n_embd=32, n_head=4))
    with pytest.raises(ValueError, match=r"tensor 'transformer.wte.weight' has shape \(40, 16\) .* "
                                         r"implies \(40, 32\)"):
        load_hf_checkpoint(tmp_path)
    write_gpt2(tmp_path, config=dict(GPT2_JSON, n_layer=3))
    with pytest.raises(ValueError, match=r"missing \['transformer.h.2.ln_1.weight'"):
        load_hf_checkpoint(tmp_path)
    write_gpt2(tmp_path, config=dict(GPT2_JSON, n_layer=1))
    with pytest.raises(ValueError, match=r"unexpected \['transformer.h.1"):
        load_hf_checkpoint(tmp_path)


def test_a_truncated_file_is_refused(tmp_path):
    write_gpt2(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="do not fit .*truncated"):
        load_hf_checkpoint(tmp_path)


def test_too_large_for_the_memory_is_refused_before_loading(tmp_path, monkeypatch):
    tensors = write_gpt2(tmp_path)
    numel = sum(v.size for v in tensors.values())
    largest = max(v.size for v in tensors.values())
    need = 4 * (numel + largest)
    built = []
    monkeypatch.setattr(GPT2LMHeadModel, "__init__", lambda *a: built.append(1) or None)
    with pytest.raises(ValueError, match=rf"{numel:,} parameters as float32.*only 0 MiB .*max_memory"):
        load_hf_checkpoint(tmp_path, max_memory=need - 1)
    assert built == []                                      # refused before building anything
    monkeypatch.undo()
    assert load_hf_checkpoint(tmp_path, max_memory=need) is not None


def test_save_gpt2_checkpoint_round_trips(tmp_path):
    from hf_import import save_gpt2_checkpoint
    model = random_gpt2(seed=4)
    save_gpt2_checkpoint(model, tmp_path)
    np.testing.assert_array_equal(load_hf_checkpoint(tmp_path)(ids()), model(ids()))
