"""Real checkpoints in: transformers builds GPT-2 and OPT models with random weights and
saves them, ``load_hf_checkpoint`` reads them, and both sides compute the same numbers --
logits, LoRA and QLoRA-layer gradients, peft's adapters here and ours in peft, and
training that continues in torch from the same loss.

All torch work runs in ``hf_import_check.py`` in a clean subprocess (inside this process
``import peft`` would find the course's ``peft.py``): once to build (``make``), once to
load what we produced (``check``). Skipped with the reason without the Hugging Face
stack; ``make test-hf`` (REQUIRE_HF=1) turns a skip into a failure.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_import import gpt2_state_dict, load_hf_checkpoint
from nn import cross_entropy
from optim import AdamW
from hf_names import ADAPTER_PREFIX, to_hf_key
from peft_model import LoraConfig, PeftModel, get_peft_model
from quantization import quantize_model
from test_hf_export import clean_env, hf_missing, needs_hf

HERE = os.path.dirname(os.path.abspath(__file__))
CHECK = os.path.join(HERE, "hf_import_check.py")
LOGIT_TOL, GRAD_TOL = 1e-4, 1e-5
V, T = 64, 12
GPT2 = dict(vocab_size=V, n_positions=24, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
            bos_token_id=0, eos_token_id=0)
OPT = dict(vocab_size=V, max_position_embeddings=24, hidden_size=32, word_embed_proj_dim=32,
           num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, init_std=0.2,
           bos_token_id=0, eos_token_id=0, pad_token_id=0)
CASES = {   # name -> what transformers builds; "lora": the adapter peft makes for it
    "gpt2": dict(arch="gpt2", config=GPT2, lora=dict(r=4, lora_alpha=8, fan_in_fan_out=True,
                                                     target_modules=["c_attn", "c_proj"])),
    "gpt2_sharded_relu": dict(arch="gpt2", config=dict(GPT2, n_inner=48, activation_function="relu",
                                                       layer_norm_epsilon=1e-3), shard="40KB"),
    "opt": dict(arch="opt", config=OPT, lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"])),
    "opt_untied_gelu": dict(arch="opt", config=dict(OPT, tie_word_embeddings=False,
                                                    activation_function="gelu_new")),
}
OURS = {"gpt2": ["c_attn", "c_proj"], "opt": ["q_proj", "v_proj", "fc2"]}   # adapters we train
QLORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"]}


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (2, T))
    targets = np.roll(ids, -1, axis=1)
    targets[:, -1] = -100
    return ids, targets


def run_check(mode, root, items):
    ids, targets = batch()
    save_file({"input_ids": ids.astype(np.int64), "targets": targets.astype(np.int64)}, str(root / "arrays.st"))
    manifest = root / f"{mode}.json"
    manifest.write_text(json.dumps({"arrays": str(root / "arrays.st"), "items": items}))
    run = subprocess.run([sys.executable, CHECK, mode, str(manifest)], cwd=str(root), env=clean_env(),
                         capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        pytest.fail(f"hf_import_check.py {mode} failed:\n{run.stdout}\n{run.stderr[-4000:]}")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Every case built, saved and measured by transformers + peft (one subprocess)."""
    if hf_missing():
        pytest.fail(f"REQUIRE_HF is set but {', '.join(hf_missing())} cannot be imported")
    root = tmp_path_factory.mktemp("hf_import")
    items = [dict(case, name=name, seed=i, dir=str(root / name), out=str(root / f"{name}.st"),
                  adapter_dir=str(root / f"{name}_peft_adapter")) for i, (name, case) in enumerate(CASES.items())]
    run_check("make", root, items)
    return root, {item["name"]: item for item in items}


def rel_error(a, b):
    return float(np.abs(a - b).max() / max(np.abs(a).max() + np.abs(b).max(), 1e-30))


def our_grads(pm, ids, targets):
    """Mean cross-entropy backward here; ``{peft file key: grad}`` of every trainable tensor."""
    loss, dlogits = cross_entropy(pm(ids), targets)
    pm.zero_grad()
    pm.backward(dlogits)
    return loss, {ADAPTER_PREFIX + to_hf_key(pm.base_model, n): pm.get_grad(n)     # GPT-2: names kept
                  for n, _ in pm.named_parameters(trainable_only=True)}


def compare_grads(ours, theirs, prefix="grad."):
    """Worst relative error over the tensors; peft's are ``theirs[prefix + file key]``."""
    theirs = {k[len(prefix):]: v for k, v in theirs.items() if k.startswith(prefix)}
    assert sorted(ours) == sorted(theirs), (sorted(ours)[:3], sorted(theirs)[:3])
    errors = {k: rel_error(ours[k], theirs[k]) for k in ours}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_TOL, f"gradient of {worst}: relative error {errors[worst]:.3g}"
    return errors[worst]


# ------------------------------------------------------------------ the checkpoints
@needs_hf
@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers(made, name):
    root, items = made
    model = load_hf_checkpoint(items[name]["dir"])
    theirs = load_file(items[name]["out"])["logits"]
    diff = float(np.abs(model(batch()[0]) - theirs).max())
    print(f"{name}: max |ours - transformers| = {diff:.3g} (logits up to {np.abs(theirs).max():.2f})")
    assert diff <= LOGIT_TOL
    assert np.abs(theirs).max() > 1.0                       # not a vacuous match


@needs_hf
def test_the_sharded_case_is_sharded_and_names_are_huggingfaces(made):
    root, items = made
    files = os.listdir(items["gpt2_sharded_relu"]["dir"])
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    model = load_hf_checkpoint(items["gpt2"]["dir"])
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.1.mlp.c_proj.bias" in names
    opt = load_hf_checkpoint(items["opt_untied_gelu"]["dir"])
    assert opt.lm_head is not None and opt.config.activation == "gelu_new"


# ------------------------------------------------------------ peft's adapters here
@needs_hf
@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_a_peft_adapter_gives_pefts_logits_and_gradients(made, name):
    """``PeftModel.from_pretrained(load_hf_checkpoint(dir), adapter_dir)``, as in peft: GPT-2
    with fan_in_fan_out=True on c_attn, c_proj (its names are peft's), OPT through the name table."""
    root, items = made
    model, adapter = load_hf_checkpoint(items[name]["dir"]), items[name]["adapter_dir"]
    pm = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    assert pm.peft_config["default"].fan_in_fan_out is (name == "gpt2")
    theirs = load_file(items[name]["out"])
    ids, targets = batch()
    diff = float(np.abs(pm(ids) - theirs["adapter_logits"]).max())
    assert diff <= LOGIT_TOL, diff
    assert np.abs(theirs["adapter_logits"] - theirs["logits"]).max() > 100 * LOGIT_TOL   # it does something
    loss, grads = our_grads(pm, ids, targets)
    assert abs(loss - float(theirs["adapter_loss"])) <= 1e-5 * abs(loss)
    worst = compare_grads(grads, theirs, prefix="adapter_grad.")
    print(f"{name}: logits {diff:.3g}, worst LoRA gradient rel. error {worst:.3g}")


# --------------------------------------------------- QLoRA, and ours in peft
def _qlora(items, root):
    """Our 4-bit GPT-2 with peft's adapter; peft gets the same (dequantized) weights."""
    pm = PeftModel.from_pretrained(quantize_model(load_hf_checkpoint(items["gpt2"]["dir"]),
                                                  target_modules=QLORA_TARGETS["gpt2"]),
                                   items["gpt2"]["adapter_dir"], is_trainable=True)
    override = {k: v for k, v in gpt2_state_dict(pm).items() if k.endswith(".weight")
                and k.rsplit(".", 2)[-2] in QLORA_TARGETS["gpt2"]}
    save_file(override, str(root / "qlora_override.st"))
    task = dict(arch="gpt2", base=items["gpt2"]["dir"], override=str(root / "qlora_override.st"),
                adapter=items["gpt2"]["adapter_dir"], out=str(root / "qlora.st"))
    return pm, task


def _trained_here(name, items, root, steps=5):
    """An adapter trained here for a few AdamW steps, saved with ``save_pretrained`` (peft's layout)."""
    pm = get_peft_model(load_hf_checkpoint(items[name]["dir"]),
                        LoraConfig(r=4, lora_alpha=8, target_modules=OURS[name]))
    ids, targets = batch()
    optimizer = AdamW(pm, lr=1e-2)
    for _ in range(steps):
        loss, dlogits = cross_entropy(pm(ids), targets)
        pm.zero_grad()
        pm.backward(dlogits)
        optimizer.step()
    out = str(root / f"{name}_ours")
    pm.save_pretrained(out)
    assert json.loads(open(os.path.join(out, "adapter_config.json")).read())["base_model_name_or_path"] \
        == items[name]["dir"]
    task = dict(arch=CASES[name]["arch"], base=items[name]["dir"], adapter=out,
                out=str(root / f"{name}_ours.st"), steps=3)
    return pm, task


@pytest.fixture(scope="module")
def checked(made):
    """What peft computes with our QLoRA base and with adapters trained here (one subprocess)."""
    root, items = made
    qlora, q_task = _qlora(items, root)
    ours = {name: _trained_here(name, items, root) for name in OURS}
    run_check("check", root, [q_task] + [task for _, task in ours.values()])
    return {"qlora": (qlora, load_file(q_task["out"]))} | {
        name: (pm, load_file(task["out"])) for name, (pm, task) in ours.items()}


@needs_hf
def test_qlora_layer_gradients_equal_pefts(checked):
    pm, theirs = checked["qlora"]
    ids, targets = batch()
    diff = float(np.abs(pm(ids) - theirs["logits"]).max())
    assert diff <= LOGIT_TOL, diff
    _, grads = our_grads(pm, ids, targets)
    worst = compare_grads(grads, theirs)
    print(f"QLoRA (NF4 c_attn, c_proj, c_fc): logits {diff:.3g}, worst gradient rel. error {worst:.3g}")


@needs_hf
@pytest.mark.parametrize("name", list(OURS))
def test_an_adapter_trained_here_runs_in_peft_and_keeps_training(checked, name):
    """peft loads our adapter on the original checkpoint (is_trainable=True): same logits,
    the same loss, and torch's AdamW steps continue from there (the loss goes down)."""
    pm, theirs = checked[name]
    ids, targets = batch()
    ours = pm(ids)
    diff = float(np.abs(ours - theirs["logits"]).max())
    assert diff <= LOGIT_TOL, diff
    loss = cross_entropy(ours, targets)[0]
    losses = theirs["torch_losses"]
    assert abs(losses[0] - loss) <= 1e-5 * loss, (losses[0], loss)
    assert losses[-1] < losses[0], losses
    print(f"{name}: logits {diff:.3g}, loss here {loss:.6f}, torch steps {np.round(losses, 6).tolist()}")


def test_our_adapter_files_use_pefts_names(tmp_path):
    """No torch needed: a GPT-2 adapter saves with peft's keys and fan_in_fan_out=True."""
    from gpt2 import GPT2LMHeadModel
    from minigpt import GPTConfig
    config = GPTConfig(vocab_size=V, context_length=16, d_model=16, n_layers=1, n_heads=2)
    pm = get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=2, target_modules=["c_attn", "c_proj"]))
    for _, p in pm.named_parameters(trainable_only=True):      # B = 0 would hide a swap
        p[...] = np.random.default_rng(1).standard_normal(p.shape)
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["target_modules"] == ["c_attn", "c_proj"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert "base_model.model.transformer.h.0.mlp.c_proj.lora_B.weight" in keys and len(keys) == 6
    back = PeftModel.from_pretrained(GPT2LMHeadModel(config), tmp_path)   # peft's layout reads back
    ids = batch()[0][:, :8]
    np.testing.assert_array_equal(back(ids), pm(ids))
