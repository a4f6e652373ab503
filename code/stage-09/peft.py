"""Parameter-efficient fine-tuning, from scratch: the course's front door.

``from peft import ...`` gives everything the course text and Hugging Face's
snippets import, from the files where each piece lives:

    the course's classes               LoRALayer, LoRALinear, apply_lora_to_attention   lora.py
                                       Adapter                                          adapters.py
                                       PrefixTuning, PromptTuning                       soft_prompts.py
    their maths as pure functions      lora_forward / lora_backward, adapter_forward /
                                       adapter_backward, prompt_forward / prompt_backward
    the counting utilities             count_trainable_parameters, compare_peft_methods, ...
                                                                                        accounting.py
    the Hugging Face-style API         LoraConfig, PromptTuningConfig, PrefixTuningConfig,
                                       IA3Config, TaskType, get_peft_model, PeftModel   peft_model.py

Every method freezes a pretrained weight and trains something small beside it:

    method          trains                      touches the model at
    LoRA            A (r, in), B (out, r)       a Linear:  h = W0 x + (alpha/r) B A x
    Adapter         W_down, W_up                a sublayer output: h + f(h W_down) W_up
    PrefixTuning    prefix (L, 2, P, H, d_head) each attention's keys and values
    PromptTuning    prompt (P, d_model)         the embedding output, before the blocks

Conventions: weights are ``(out_features, in_features)`` and a layer computes
``x @ W.T``; inputs are ``(batch, seq, features)`` or ``(seq, features)``; after
``backward`` the gradient of attribute ``X`` is in ``X_grad``. The standalone
course classes *set* it (so the course's loop needs no zeroing); inside a
model every module adds to it. ``python peft.py`` gives a tour. This module
sits at the top of the imports (docs/ARCHITECTURE.md): nothing in the library
imports it, so it can gather everything without a cycle.
"""
from __future__ import annotations

import numpy as np

from accounting import (compare_peft_methods, compute_parameter_efficiency,  # noqa: F401
                        count_frozen_parameters, count_trainable_parameters,
                        estimate_finetune_memory, llama_parameter_count, memory_report)
from adapters import Adapter, adapter_backward, adapter_forward  # noqa: F401
from lora import (LinearWrapper, LoRALayer, LoRALinear, apply_lora_to_attention,  # noqa: F401
                  lora_backward, lora_forward)
from peft_model import (BitFitConfig, BottleneckConfig, FullFineTuningConfig, IA3Config,  # noqa: F401
                        LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType,
                        create_loraplus_optimizer, get_peft_model)
from soft_prompts import (PrefixTuning, PromptTuning, prefix_grad_table,  # noqa: F401
                          prompt_backward, prompt_forward)


# --------------------------------------------------------------------------- demo
def demo():
    rng = np.random.default_rng(0)
    print("LoRA on one 512 x 512 layer, r=8, alpha=16")
    W = rng.standard_normal((512, 512)).astype(np.float32) / np.sqrt(512)
    layer = LoRALinear(W, lora_rank=8, lora_alpha=16.0)
    print(f"  A {layer.lora.A.shape}, B {layer.lora.B.shape}, scaling {layer.lora.scaling}")
    print(f"  trainable {layer.lora.num_parameters():,} of {W.size:,} "
          f"(compression {layer.lora.compression_ratio():.4f})")
    x = rng.standard_normal((4, 10, 512)).astype(np.float32)
    y = layer.forward(x)
    print(f"  forward {x.shape} -> {y.shape}; equals the frozen layer at init: "
          f"{np.array_equal(y, x @ W.T)}")
    dx = layer.backward(rng.standard_normal(y.shape).astype(np.float32))
    print(f"  backward: dx {dx.shape}, A_grad {layer.lora.A_grad.shape}, "
          f"|A_grad| = {np.abs(layer.lora.A_grad).max():.3g} (0 because B = 0), "
          f"|B_grad| = {np.abs(layer.lora.B_grad).max():.3g}")
    adapter = Adapter(512, bottleneck_dim=64)
    print(f"Adapter 512 -> 64 -> 512: {adapter.num_parameters():,} parameters, "
          f"starts as identity: {np.allclose(adapter(x), x)}")
    prompt = PromptTuning(512, prompt_length=20)
    print(f"Soft prompt: {prompt.num_parameters():,} parameters, "
          f"{x.shape} -> {prompt.forward(x).shape}")
    total = llama_parameter_count()["total"]
    print("\nTrainable parameters at 7B scale (d_model 4096, 32 layers, 32 heads), counted the")
    print(f"course's way: % of the attention weights (the first row), not of all {total:,}:")
    table = compare_peft_methods()
    for name, row in table.items():
        print(f"  {name:17s} {row['params']:>15,}  {row['ratio']:9.5%}  {row['description']}")


if __name__ == "__main__":
    demo()
