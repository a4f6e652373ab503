"""Checkers for the tools: 9.10 efficiency analyser, 9.11 LoRA manager, 9.22 LoRA+.
References: ``accounting.py`` (``compute_parameter_efficiency``,
``estimate_finetune_memory``), ``PeftModel.add_weighted_adapter`` and
``create_loraplus_optimizer`` in ``peft_model.py``.
"""
from __future__ import annotations

import numpy as np

from checking import (expect, expect_close, expect_equal, expect_number, expect_raises,
                      expect_tuple, expect_unchanged, randn, rng_for, tiny_gpt)
from registry import exercise

import accounting
from peft_model import LoraConfig, PromptTuningConfig, get_peft_model


# ------------------------------------------------------------------ 9.10
MEMORY_CASES = [  # (num_params, trainable_params, dtype, optimizer, mixed_precision)
    (175e9, None, "fp16", "adamw", False), (7e9, None, "fp16", "adamw", True),
    (7e9, None, "fp32", "sgd", False), (7e9, None, "bf16", "sgd_momentum", True),
    (7e9, 4_194_304, "fp16", "adamw", False), (7e9, 4_194_304, "nf4", "adamw", False),
    (70e9, 81_920, "int8", "sgd_momentum", False), (1e9, 1e6, "int4", "sgd", False)]
MEMORY_KEYS = ("weights", "gradients", "master_weights", "optimizer_states", "total", "total_gb")


def _expect_memory(label, yours, ref):
    expect(isinstance(yours, dict), f"{label} should return a dict, got {type(yours).__name__}")
    for key in MEMORY_KEYS:
        expect(key in yours, f"{label} has no key {key!r} (keys: {sorted(yours)})")
        expect_number(f"{label}[{key!r}]", yours[key], ref[key])


def _expect_efficiency(label, yours, ref):
    for key in ("trainable_params", "total_params", "trainable_ratio", "efficiency_gain"):
        expect(isinstance(yours, dict) and key in yours, f"{label} needs the key {key!r}")
        expect_number(f"{label}[{key!r}]", yours[key], ref[key])


@exercise("9.10", "ex9_10_efficiency_analyser", "PEFT efficiency analyser: counts, ratio, memory",
          "course")
def check_efficiency_analyser(mod, t):
    named = {"a": np.zeros((3, 4)), "b": np.zeros(5), "c": np.zeros((2, 2, 2))}
    got = mod.count_parameters(named, ["b", "c"])
    expect(tuple(got) == (13, 25), f"count_parameters(...) is {got!r}, expected (13, 25): "
           "(trainable = 5 + 8, total = 12 + 5 + 8)")
    t.ok("count_parameters")

    for trainable, total in [(4_194_304, 6_738_415_616), (25, 25), (0, 10)]:
        _expect_efficiency(f"parameter_efficiency({trainable}, {total})",
                           mod.parameter_efficiency(trainable, total),
                           accounting.compute_parameter_efficiency(trainable, total))
    expect_raises(ValueError, lambda: mod.parameter_efficiency(1, 0),
                  "parameter_efficiency(1, 0) should raise ValueError")
    t.ok("parameter_efficiency matches accounting.compute_parameter_efficiency")

    for n, tp, dtype, opt, mixed in MEMORY_CASES:
        label = (f"finetune_memory({n:g}, trainable_params={tp}, dtype={dtype!r}, "
                 f"optimizer={opt!r}, mixed_precision={mixed})")
        ref = accounting.estimate_finetune_memory(n, "full" if tp is None else "lora", dtype, opt,
                                                  trainable_params=tp, mixed_precision=mixed)
        _expect_memory(label, mod.finetune_memory(n, tp, dtype, opt, mixed), ref)
    expect_raises(ValueError, lambda: mod.finetune_memory(1e9, dtype="fp8"),
                  "finetune_memory(..., dtype='fp8') should raise ValueError")
    expect_raises(ValueError, lambda: mod.finetune_memory(1e9, optimizer="lion"),
                  "finetune_memory(..., optimizer='lion') should raise ValueError (an unknown "
                  "optimizer, as the docstring says)")
    t.ok("finetune_memory matches accounting.estimate_finetune_memory (full, LoRA, QLoRA; "
         "AdamW, SGD; fp32 .. nf4)")

    lora = get_peft_model(tiny_gpt(1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    prompt = get_peft_model(tiny_gpt(2), PromptTuningConfig(num_virtual_tokens=3))
    for label, model in [("a plain mini GPT", tiny_gpt(0)), ("the GPT with LoRA", lora),
                         ("the GPT with prompt tuning", prompt)]:
        if hasattr(model, "get_nb_trainable_parameters"):
            trainable, total = model.get_nb_trainable_parameters()
        else:
            total = trainable = sum(p.size for p in model.parameters())
        report = mod.analyse_model(model, dtype="fp32", optimizer="adamw")
        _expect_efficiency(f"analyse_model({label})", report,
                           accounting.compute_parameter_efficiency(trainable, total))
        full = trainable == total
        ref = accounting.estimate_finetune_memory(total if full else total - trainable,
                                                  "full" if full else "lora", "fp32", "adamw",
                                                  trainable_params=None if full else trainable)
        expect("memory" in report, f"analyse_model({label}) needs the key 'memory'")
        _expect_memory(f"analyse_model({label})['memory']", report["memory"], ref)
    t.ok("analyse_model on a plain GPT, with LoRA and with prompt tuning")


# ------------------------------------------------------------------ 9.11
def _library_pair(seed=3):
    """A tiny GPT with two library LoRA adapters: 'a' (r=2, on q, v) and 'b' (r=3, on v, fc1)."""
    pm = get_peft_model(tiny_gpt(seed), LoraConfig(r=2, lora_alpha=4.0,
                                                   target_modules=["q_proj", "v_proj"]),
                        adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=3, lora_alpha=3.0, target_modules=["v_proj", "fc1"]))
    return pm


@exercise("9.11", "ex9_11_lora_manager", "LoRA manager: add, switch, merge, weighted combination",
          "course")
def check_lora_manager(mod, t):
    rng = rng_for(911)
    pm = _library_pair()
    slots = {name: pm.adapters[name].slots for name in ("a", "b")}
    paths = sorted(set(slots["a"]) | set(slots["b"]))
    base = {p: np.array(pm.base_model.get_submodule(p).weight) for p in paths}
    frozen = {p: w.copy() for p, w in base.items()}
    man = mod.LoRAManager(base)
    expect_equal("adapters at the start", man.adapters, {})
    expect_equal("active_adapter at the start", man.active_adapter, None)
    man.add_adapter("a", rank=2, alpha=4.0, target_layers=sorted(slots["a"]))
    expect_equal("active_adapter after the first add_adapter", man.active_adapter, "a")
    man.add_adapter("b", rank=3, alpha=3.0, target_layers=sorted(slots["b"]))
    expect_equal("active_adapter after a second add_adapter", man.active_adapter, "a")
    for name, r in (("a", 2), ("b", 3)):
        ad = man.adapters[name]
        expect_number(f"adapters[{name!r}]['scaling']", ad["scaling"], pm.adapters[name].config.lora_alpha / r)
        expect_equal(f"the layers of adapter {name!r}", sorted(ad["A"]), sorted(slots[name]))
        for p, layer in slots[name].items():
            expect(np.shape(ad["A"][p]) == layer.A.shape and np.shape(ad["B"][p]) == layer.B.shape,
                   f"adapter {name!r}, layer {p}: A and B must be {layer.A.shape} and {layer.B.shape}, "
                   f"got {np.shape(ad['A'][p])} and {np.shape(ad['B'][p])}")
            expect(not np.any(ad["B"][p]), f"adapter {name!r}: B must start at zero")
    expect_raises(ValueError, lambda: man.add_adapter("a"), "add_adapter with an existing name "
                  "should raise ValueError")
    expect_raises(ValueError, lambda: man.add_adapter("c", target_layers=["nope"]),
                  "add_adapter on a layer that is not in the base should raise ValueError")
    expect_raises(ValueError, lambda: man.set_adapter("nope"), "set_adapter('nope') should raise ValueError")
    t.ok("add_adapter and set_adapter: shapes, B = 0, first one active, errors")

    for name in ("a", "b"):                       # train both: same random factors in both worlds
        for p, layer in slots[name].items():
            layer.A[...] = randn(rng, *layer.A.shape, scale=0.5)
            layer.B[...] = randn(rng, *layer.B.shape, scale=0.5)
            man.adapters[name]["A"][p], man.adapters[name]["B"][p] = layer.A.copy(), layer.B.copy()
    for name in ("a", "b"):
        man.set_adapter(name)
        for p in paths:
            delta = slots[name][p].delta_weight() if p in slots[name] else np.zeros_like(base[p])
            expect_close(f"delta_weight({p!r}) with adapter {name!r}", man.delta_weight(p), delta)
            xp = randn(rng, 2, 3, base[p].shape[1])
            expect_close(f"forward({p!r}, x) with adapter {name!r}", man.forward(p, xp),
                         xp @ (base[p] + delta).T, mistakes=[(xp @ base[p].T, "the adapter is missing")])
        merged = man.merged_weights()
        for p in paths:                           # the base first: else a merge in place shows
            expect_unchanged(f"base weight {p}", frozen[p], base[p])   # as wrong merged values
        for p in paths:
            expect_close(f"merged_weights()[{p!r}] with adapter {name!r}", merged[p],
                         frozen[p] + (slots[name][p].delta_weight() if p in slots[name] else 0))
    t.ok("switching adapters: delta_weight, forward and merged_weights per adapter; base untouched")

    w = [0.7, -0.4]
    pm.add_weighted_adapter(["a", "b"], w, "mix")
    man.add_weighted_adapter(["a", "b"], w, "mix")
    expect_equal("adapters['mix']['rank']", man.adapters["mix"]["rank"], 5, " (2 + 3: ranks stack)")
    for p in paths:
        expect_close(f"delta_weight({p!r}, 'mix')", man.delta_weight(p, "mix"),
                     pm.adapters["mix"].slots[p].delta_weight(), context=" (0.7 * delta_a - 0.4 * delta_b)")
    expect_raises(ValueError, lambda: man.add_weighted_adapter(["a", "zz"], w, "m2"),
                  "add_weighted_adapter with an unknown adapter should raise ValueError")
    expect_raises(ValueError, lambda: man.add_weighted_adapter(["a", "b"], [1.0], "m3"),
                  "add_weighted_adapter with 2 adapters and 1 weight should raise ValueError")
    t.ok("add_weighted_adapter: exactly the weighted sum of the updates (as PeftModel's)")

    man.set_adapter("mix")
    man.delete_adapter("mix")
    expect("mix" not in man.adapters, "delete_adapter('mix') must remove it from adapters")
    expect_equal("active_adapter after deleting the active adapter", man.active_adapter, None)
    p = paths[0]
    expect_close("forward with no active adapter", man.forward(p, base[p][:2]), base[p][:2] @ base[p].T)
    expect_raises(ValueError, lambda: man.delete_adapter("mix"), "deleting an unknown adapter "
                  "should raise ValueError")
    t.ok("delete_adapter")


# ------------------------------------------------------------------ 9.22
def _regression(seed=922, d=64, r=4, N=256):
    rng = np.random.default_rng(seed)
    X, W0 = rng.standard_normal((N, d)), rng.standard_normal((d, d)) / np.sqrt(d)
    Y = X @ (W0 + (rng.standard_normal((d, r)) / np.sqrt(d)) @ rng.standard_normal((r, d))).T
    A, B = rng.uniform(-1, 1, (r, d)) / np.sqrt(d), np.zeros((d, r))
    return X, Y, W0, A, B


def _library_losses(X, Y, W0, A, B, lr, ratio, steps):
    """The same training with the library's LoRALayer and SGD with two parameter groups."""
    import peft
    from optim import SGD
    layer = peft.LoRALayer(X.shape[1], Y.shape[1], rank=A.shape[0], alpha=1.0 * A.shape[0],
                           dtype=np.float64)
    layer.A, layer.B = A.copy(), B.copy()
    opt = SGD(layer, lr=lr, param_groups=[{"names": ["A"], "lr": lr}, {"names": ["B"], "lr": lr * ratio}])
    losses = []
    for _ in range(steps):
        y = layer.forward(X, W0)
        losses.append(0.5 * float(np.sum((y - Y) ** 2)) / X.shape[0])
        layer.zero_grad()
        layer.backward((y - Y) / X.shape[0])
        opt.step()
    return np.array(losses)


@exercise("9.22", "ex9_22_loraplus", "LoRA+: a larger learning rate for B", "ours")
def check_loraplus(mod, t):
    from peft_model import create_loraplus_optimizer
    pm = get_peft_model(tiny_gpt(4), LoraConfig(r=2, target_modules=["q_proj", "fc1"]))
    pm.add_adapter("p", PromptTuningConfig(num_virtual_tokens=2))
    pm.set_adapter(["default", "p"])
    names = [n for n, _ in pm.named_parameters(trainable_only=True)]
    for ratio in (16.0, 4.0):
        ref = create_loraplus_optimizer(pm, 1e-3, loraplus_lr_ratio=ratio).param_groups
        groups = mod.loraplus_param_groups(list(names), 1e-3, ratio)
        expect(isinstance(groups, list) and len(groups) == len(ref),
               f"expected {len(ref)} groups (others, then the B's), got {groups!r}"[:300])
        for i, (mine, theirs) in enumerate(zip(groups, ref)):
            expect_equal(f"group {i} names", list(mine["names"]), list(theirs["names"]))
            expect_number(f"group {i} lr", mine["lr"], theirs["lr"])
    only_b = mod.loraplus_param_groups(["x.lora.B"], 0.1, 16.0)
    expect_equal("loraplus_param_groups(['x.lora.B'], 0.1, 16)", only_b,
                 [{"names": ["x.lora.B"], "lr": 1.6}], " (an empty group is left out)")
    expect_raises(ValueError, lambda: mod.loraplus_param_groups(names, 1e-3, 0.0),
                  "loraplus_lr_ratio=0 should raise ValueError")
    t.ok("loraplus_param_groups matches create_loraplus_optimizer (LoRA + prompt tuning model)")

    X, Y, W0, A, B = _regression()
    inputs = [a.copy() for a in (X, Y, W0, A, B)]
    for ratio in (1.0, 16.0):
        with np.errstate(all="ignore"):                     # a wrong update may diverge
            out = mod.train_lora_regression(*inputs, 1.0, 0.01, ratio, 20)
        expect_tuple("train_lora_regression", out, "losses, A, B")
        for name, before, after in zip(("X", "Y", "W0", "A", "B"), (X, Y, W0, A, B), inputs):
            expect_unchanged(name, before, after)
        expect_close(f"the losses with ratio {ratio:g}", np.asarray(out[0], dtype=float),
                     _library_losses(X, Y, W0, A, B, 0.01, ratio, 20), rtol=1e-6,
                     context=" (20 steps of SGD with the library's LoRALayer)")
    t.ok("train_lora_regression: the same loss curve as the library's LoRALayer + SGD groups")

    final = {}
    with np.errstate(all="ignore"):
        for label, lr, ratio in (("ratio 1", 0.01, 1.0), ("ratio 16", 0.01, 16.0),
                                 ("both rates x16", 0.16, 1.0)):
            final[label] = float(mod.train_lora_regression(X, Y, W0, A, B, 1.0, lr, ratio, 100)[0][-1])
    expect(final["ratio 16"] < 0.1 * final["ratio 1"], f"after 100 steps LoRA+ (ratio 16) should beat "
           f"ratio 1 by far; losses {final}")
    summary = ", ".join(f"{k} {v:.3g}" for k, v in final.items())
    t.ok(f"final losses after 100 steps: {summary} (B alone can take the larger rate)")
