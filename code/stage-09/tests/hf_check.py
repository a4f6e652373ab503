"""Load exported checkpoints with the real transformers / peft and compare with our numbers.

Run by ``test_hf_export.py`` in a separate process (so that ``import peft`` finds
Hugging Face's package, not the course's ``peft.py``)::

    python hf_check.py manifest.json results.json

``manifest.json``: ``{"cases": [{"name", "base", "adapter" (or null), "arrays"}],
"make": [{"name", "base", "lora": {LoraConfig fields}, "out", "arrays", "logits"}]}``
("make": peft writes a LoRA adapter and its logits, for our importer to read).
``arrays`` is a safetensors file written by our side with

    input_ids (B, T) int64        expected_logits (B, T, V) float32
    attention_mask (B, T)         optional; compared only where it is 1
    position_ids (1, T)           optional; passed to the model (prefix tuning)
    targets (B, T) int64          optional; then the adapter loads trainable and the
    grad.<peft key>               cross-entropy gradients are compared too

``results.json``: per case the max abs logit difference, the gradient relative
error ``max|a-b| / max(|a|+|b|)`` per tensor, the loading problems, and for
cases with ``position_ids`` the difference *without* them. This script only
measures; the test decides what passes. Nothing is unpickled (safetensors, JSON).
"""
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file
from transformers import OPTForCausalLM

import peft
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import save_file

# the mini GPT's numbers are float32; make torch match them, not its fast kernels
torch.backends.cuda.matmul.allow_tf32 = False
torch.set_num_threads(2)


def load_base(directory):
    model, info = OPTForCausalLM.from_pretrained(directory, output_loading_info=True)  # float32
    problems = {k: sorted(v) for k, v in info.items() if v}
    return model.eval(), problems


def load(case, trainable):
    base, problems = load_base(case["base"])
    if not case.get("adapter"):
        return base, problems, []
    with open(f"{case['adapter']}/adapter_config.json") as f:
        prompt_learning = json.load(f)["peft_type"] in ("PROMPT_TUNING", "PREFIX_TUNING")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # peft refuses is_trainable=True for a saved prompt-learning adapter; its table
        # (prompt_encoder.embedding.weight) is still a parameter autograd can reach
        model = PeftModel.from_pretrained(base, case["adapter"],
                                          is_trainable=trainable and not prompt_learning)
    if trainable and prompt_learning:
        model.prompt_encoder.requires_grad_(True)
    loading = [str(w.message) for w in caught
               if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    return model.eval(), problems, loading


def logits_of(model, arrays, use_position_ids=True):
    kwargs = {"input_ids": torch.from_numpy(arrays["input_ids"]).long()}
    if "attention_mask" in arrays:
        kwargs["attention_mask"] = torch.from_numpy(arrays["attention_mask"]).long()
    if use_position_ids and "position_ids" in arrays:
        kwargs["position_ids"] = torch.from_numpy(arrays["position_ids"]).long()
    logits = model(**kwargs).logits
    T = arrays["input_ids"].shape[1]
    return logits[:, -T:]              # prompt tuning returns the virtual positions first


def max_diff(logits, arrays):
    diff = np.abs(logits.detach().numpy() - arrays["expected_logits"])   # (B, T, V)
    if "attention_mask" in arrays:
        diff = diff[arrays["attention_mask"].astype(bool)]
    return float(diff.max())


def gradient_error(model, logits, arrays):
    """Cross-entropy (mean over targets != -100, as ours) backward.

    Per tensor ``[max|a-b|, max(|a|+|b|)]``; their ratio is the relative error."""
    targets = torch.from_numpy(arrays["targets"]).long()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=-100)
    loss.backward()
    errors, missing = {}, []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # peft's parameter names carry the adapter name; its files do not
        key = name.replace(".default.", ".").removesuffix(".default")
        key = key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
        expected = arrays.get("grad." + key)
        if expected is None:
            missing.append(key)
            continue
        a, b = p.grad.numpy(), expected
        errors[key] = [float(np.abs(a - b).max()), float((np.abs(a) + np.abs(b)).max())]
    expected_keys = {k[5:] for k in arrays if k.startswith("grad.")}
    return {"grad": errors, "grad_without_ours": missing,
            "grad_not_in_torch": sorted(expected_keys - set(errors)), "loss": float(loss)}


def run_case(case):
    arrays = load_file(case["arrays"])
    trainable = "targets" in arrays
    model, problems, loading = load(case, trainable)
    result = {"load_problems": problems, "adapter_load_warnings": loading}
    with torch.set_grad_enabled(trainable):
        logits = logits_of(model, arrays)
        result["max_abs_logit_diff"] = max_diff(logits, arrays)
        if trainable:
            result.update(gradient_error(model, logits, arrays))
    if "position_ids" in arrays:
        with torch.no_grad():
            result["diff_without_position_ids"] = max_diff(logits_of(model, arrays, False), arrays)
    return result


def make_adapter(task):
    """peft trains nothing here: it makes a LoRA adapter with random weights on our exported
    base, saves it the usual way, and records its logits for our ``import_lora_adapter``."""
    base, _ = load_base(task["base"])
    torch.manual_seed(task.get("seed", 0))
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False,
                                            **task["lora"]))
    with torch.no_grad():                          # DoRA: move the magnitude off ||W + sBA||
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(task["out"])
    ids = torch.from_numpy(load_file(task["arrays"])["input_ids"]).long()
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    save_file({"logits": logits.numpy()}, task["logits"])
    return {"written": sorted(os.listdir(task["out"]))}


def main(manifest_path, out_path):
    start = time.perf_counter()
    with open(manifest_path) as f:
        manifest = json.load(f)
    results = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__}, "cases": {}, "made": {}}
    for task in manifest.get("make", []):
        try:
            results["made"][task["name"]] = make_adapter(task)
        except Exception as err:
            results["made"][task["name"]] = {"error": f"{type(err).__name__}: {err}"}
    for case in manifest["cases"]:
        try:
            results["cases"][case["name"]] = run_case(case)
        except Exception as err:                       # report, let the test say which failed
            results["cases"][case["name"]] = {"error": f"{type(err).__name__}: {err}"}
    results["seconds"] = time.perf_counter() - start
    with open(out_path, "w") as f:
        json.dump(results, f, indent=2)
    for name, r in results["cases"].items():
        grads = r.get("grad", {})
        scale = max((m for _, m in grads.values()), default=1.0)
        # a key bias's exact gradient is 0 (softmax ignores a shift shared by all keys)
        rel = {k: d / (scale if k.endswith("k_proj.bias") else m) for k, (d, m) in grads.items()}
        worst = f" worst grad rel err {max(rel.values()):.3g} ({max(rel, key=rel.get)})" if rel else ""
        print(f"{name:20s} " + ", ".join(f"{k}={v:.3g}" for k, v in r.items() if isinstance(v, float))
              + worst + (f" {r['error']}" if "error" in r else ""))


if __name__ == "__main__":
    main(*sys.argv[1:3])
