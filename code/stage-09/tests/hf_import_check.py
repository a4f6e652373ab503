"""The Hugging Face side of ``test_hf_import.py``: transformers + peft, in a process of their own.

Run in a clean environment (``import peft`` must find Hugging Face's package,
not the course's ``peft.py``)::

    python hf_import_check.py make  manifest.json     build, save and measure the checkpoints
    python hf_import_check.py check manifest.json     load our adapters / QLoRA bases in peft

``make``: per case a ``GPT2LMHeadModel`` or ``OPTForCausalLM`` from a small config,
random weights (LayerNorm gains and biases moved off 1 and 0, so a mistake in
either shows), ``save_pretrained`` (sharded when asked); its logits on the shared
``input_ids``; and, if the case has a LoRA config, a peft adapter with random A
and B saved the usual way, with its logits and the gradients of the mean
cross-entropy for ``targets`` (``grad.<file key>``).

``check``: per task the original checkpoint, optionally some weights replaced
(``override``: the dequantized NF4 weights of our QLoRA base), and an adapter
directory loaded with ``PeftModel.from_pretrained``: its logits, its LoRA
gradients, and with ``steps`` the loss of a few torch AdamW steps from there
(``is_trainable=True``). This script measures; the test decides what passes.
"""
import json
import sys

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file, save_file

import peft

torch.set_num_threads(2)
ARCH = {"gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "opt": (transformers.OPTConfig, transformers.OPTForCausalLM)}


def peft_key(name):
    """peft's parameter name -> the key its adapter file uses (no adapter name)."""
    return name.replace(".default.", ".").removesuffix(".default")


def mean_ce(logits, targets):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=-100)


def logits_and_grads(model, arrays):
    """Logits, and (when ``targets`` are given) the loss and every trainable tensor's gradient."""
    ids = torch.from_numpy(arrays["input_ids"]).long()
    out = {}
    with torch.set_grad_enabled("targets" in arrays):
        logits = model(input_ids=ids).logits
        out["logits"] = logits.detach().numpy()
        if "targets" in arrays:
            loss = mean_ce(logits, torch.from_numpy(arrays["targets"]).long())
            loss.backward()
            out["loss"] = np.array(loss.item())
            for name, p in model.named_parameters():
                if p.requires_grad:
                    out["grad." + peft_key(name)] = p.grad.numpy().copy()
    return out


def make(case, arrays):
    config_cls, model_cls = ARCH[case["arch"]]
    torch.manual_seed(case["seed"])
    model = model_cls(config_cls(**case["config"]))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(case["dir"], **({"max_shard_size": case["shard"]} if case.get("shard") else {}))
    with torch.no_grad():
        result = {"logits": model(input_ids=torch.from_numpy(arrays["input_ids"]).long()).logits.numpy()}
    if case.get("lora"):
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **case["lora"]))
        pm.save_pretrained(case["adapter_dir"])
        result.update({"adapter_" + k: v for k, v in logits_and_grads(pm.eval(), arrays).items()})
    save_file(result, case["out"])


def check(task, arrays):
    config_cls, model_cls = ARCH[task["arch"]]
    base = model_cls.from_pretrained(task["base"]).eval()
    if task.get("override"):
        missing = base.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(task["override"]).items()},
                                       strict=False).unexpected_keys
        assert not missing, f"override keys the model lacks: {missing}"
    model = peft.PeftModel.from_pretrained(base, task["adapter"], is_trainable=True).eval()
    result = logits_and_grads(model, arrays)
    if task.get("steps"):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids, targets = (torch.from_numpy(arrays[k]).long() for k in ("input_ids", "targets"))
        losses = []
        for _ in range(task["steps"]):
            optimizer.zero_grad()
            loss = mean_ce(model(input_ids=ids).logits, targets)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        result["torch_losses"] = np.array(losses)
    save_file(result, task["out"])


def main(mode, manifest_path):
    with open(manifest_path) as f:
        manifest = json.load(f)
    arrays = load_file(manifest["arrays"])
    for item in manifest["items"]:
        (make if mode == "make" else check)(item, arrays)
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
