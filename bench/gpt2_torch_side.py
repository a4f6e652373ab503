"""The PyTorch + Hugging Face side of ``bench_gpt2.py``, in a process of its own.

Started by ``bench_gpt2.py`` with ``python -E`` in an empty directory, so that
``import peft`` finds Hugging Face's package (with ``code/stage-09`` on the path it
would find the course's ``peft.py``). Two modes::

    python gpt2_torch_side.py make DIR [json config overrides]
        GPT2LMHeadModel with GPT-2-small's configuration and random weights,
        saved with save_pretrained: the checkpoint both sides load.
    python gpt2_torch_side.py serve
        reads one JSON setup line, builds peft LoRA on the checkpoint, then times one
        training step (forward, cross-entropy, backward, AdamW) per line "step". With
        ``paths`` (the course's folder) in the setup it first calls the course's
        ``keep_freed_memory()``, as the NumPy side does.

It prints the milliseconds it measured itself, so the pipe costs nothing.
"""
import json
import sys
import time
import warnings

import torch
import torch.nn.functional as F
import transformers

warnings.filterwarnings("ignore")


def make(directory, overrides):
    """GPT-2 small (124 M): n_embd 768, 12 layers, 12 heads, context 1,024, vocabulary 50,257."""
    config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    print(json.dumps({"saved": directory, "transformers": transformers.__version__}))


def serve():
    import peft                             # Hugging Face's, before the course's folder is on the path
    setup = json.loads(sys.stdin.readline())
    sys.path.extend(setup.get("paths", []))
    if setup.get("paths"):
        from data_parallel import keep_freed_memory
        keep_freed_memory()                 # as in the NumPy process: freed pages are reused
    torch.set_num_threads(setup["threads"])
    model = transformers.GPT2LMHeadModel.from_pretrained(setup["checkpoint"],
                                                         attn_implementation=setup["attention"])
    model = peft.get_peft_model(model, peft.LoraConfig(r=setup["r"], lora_alpha=2 * setup["r"],
                                                       target_modules=setup["modules"],
                                                       fan_in_fan_out=True, lora_dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens, targets = torch.tensor(setup["tokens"]), torch.tensor(setup["labels"])
    V = model.config.vocab_size

    def step():
        optimizer.zero_grad()
        logits = model(input_ids=tokens, use_cache=False).logits          # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        return loss.item()

    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        loss = step()
        print(json.dumps({"ms": 1e3 * (time.perf_counter() - start), "loss": loss}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
    else:
        serve()
