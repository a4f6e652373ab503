"""Regenerate the shipped language-model base: ``python code/stage-09/pretrain_text.py``.

A byte-level mini GPT (``TEXT_BASE_CONFIG``) is pretrained with AdamW on random
windows of the Shakespeare training split (``text.py``), every batch split across
both cores (``data_parallel.DataParallel``). A tqdm bar shows the training loss;
every ``eval_every`` steps the loss on a fixed sample of validation windows is
printed. Every ``checkpoint_every`` steps the weights, the optimizer's moments,
the sampler's random state and the history go to one safetensors file, written
atomically: run the same command again after an interruption and it resumes from
there, giving the same weights as an uninterrupted run.

At the end ``pretrained_text/`` holds ``config.json``, ``model.safetensors``,
``tokenizer.json`` and ``pretrain_report.json`` (the validation loss in nats, bits
per character and perplexity, the test loss measured once, the loss curve, the
settings, the time, the machine and its load). The settings are the ``PRETRAIN``
table below; scripts and notebooks import it rather than retyping numbers.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")     # one BLAS thread per process
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoint import (atomic_directory, atomic_write_text, load_into, load_json,  # noqa: E402
                        load_metadata, load_tensors, save_json, save_model, save_tensors)
from data_parallel import DataParallel  # noqa: E402
from generate import complete, tokens_per_second  # noqa: E402
from minigpt import GPT, GPTConfig  # noqa: E402
from optim import AdamW, warmup_cosine  # noqa: E402
from pretrain import machine  # noqa: E402
from text import (ByteTokenizer, WindowSampler, bits_and_perplexity, corpus_splits,  # noqa: E402
                  fixed_windows, lm_loss, token_losses)
from train import train_step  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAINED_TEXT_DIR = os.path.join(HERE, "pretrained_text")
CHECKPOINT_DIR = os.path.join(HERE, "..", "..", "tmp", "pretrain_text")    # git-ignored
REPORT_NAME = "pretrain_report.json"

TEXT_BASE_CONFIG = GPTConfig(vocab_size=ByteTokenizer.vocab_size, context_length=128,
                             d_model=128, n_layers=5, n_heads=4)
PRETRAIN = {              # the one table: pretraining and its evaluation
    "steps": 3000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 100, "min_lr_scale": 0.1,
    "weight_decay": 0.1, "grad_clip": 1.0, "seed": 0, "processes": 2,
    "eval_every": 250, "checkpoint_every": 250,
    "eval_windows": 512, "eval_seed": 1234,      # the fixed validation (and test) sample
    "progress_windows": 128,                     # the periodic estimate during training
}
SAMPLING = {"temperature": 0.8, "top_k": 20, "seed": 0}    # how the shipped samples are drawn
SAMPLE_PROMPTS = ("ROMEO:\n", "First Citizen:\n", "Alice was beginning")
SAMPLE_TOKENS = 200


def build_optimizer(model, lr, weight_decay):
    """AdamW; matrices decay, vectors (biases, LayerNorm gains) do not (GPT-2's practice)."""
    names = [(n, p.ndim) for n, p in model.named_parameters(trainable_only=True)]
    groups = [{"names": [n for n, d in names if d >= 2]},
              {"names": [n for n, d in names if d < 2], "weight_decay": 0.0}]
    return AdamW(model, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay, param_groups=groups)


def evaluate_split(model, ids, windows=PRETRAIN["eval_windows"], seed=PRETRAIN["eval_seed"]):
    """Loss (nats/char), bits per character and perplexity on a fixed sample of windows."""
    inputs, targets = fixed_windows(ids, model.config.context_length, windows, seed)
    return bits_and_perplexity(lm_loss(model, inputs, targets))


# ---- resumable checkpoints -------------------------------------------------------
def save_checkpoint(path, model, optimizer, sampler, state: dict) -> None:
    """Weights, AdamW moments and step counts, the sampler's rng and ``state`` in one file."""
    tensors = dict(model.named_parameters())
    for name, moments in optimizer.state.items():
        tensors.update({f"adamw.{k}.{name}": v for k, v in moments.items()})
    meta = {"state": json.dumps(state), "adamw_steps": json.dumps(optimizer.steps),
            "rng": json.dumps(sampler.rng.bit_generator.state)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_tensors(path, tensors, metadata=meta)


def load_checkpoint(path, model, optimizer, sampler, settings: dict) -> dict:
    """Restore what ``save_checkpoint`` wrote; the run's settings must be the same."""
    meta = load_metadata(path)
    state = json.loads(meta["state"])
    if state["settings"] != settings:
        raise ValueError(f"checkpoint {path} was made with other settings {state['settings']}, "
                         f"not {settings}: delete it or pass --no-resume")
    tensors = load_tensors(path)
    for name, moments in optimizer.state.items():
        for k in moments:
            moments[k][...] = tensors.pop(f"adamw.{k}.{name}")
    load_weights(model, tensors)
    optimizer.steps = json.loads(meta["adamw_steps"])
    sampler.rng.bit_generator.state = json.loads(meta["rng"])
    return state


def load_weights(model, tensors):
    for name, value in model.named_parameters():
        value[...] = tensors[name]


# ---- the run ---------------------------------------------------------------------
def pretrain_text(config=TEXT_BASE_CONFIG, out=PRETRAINED_TEXT_DIR, checkpoint_dir=CHECKPOINT_DIR,
                  resume=True, progress=True, stop_after=None, **overrides):
    """Pretrain the text base with ``PRETRAIN`` (``overrides`` change entries); returns ``(model, report)``.

    ``stop_after``: leave the loop after that many steps, as an interruption would
    (the checkpoint is written, nothing is saved to ``out``; the report is ``None``).
    """
    unknown = set(overrides) - set(PRETRAIN)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(PRETRAIN)}")
    s = {**PRETRAIN, **overrides}
    settings = {**{k: s[k] for k in s if k not in ("processes", "eval_every", "checkpoint_every")},
                "config": config.to_dict()}
    splits = corpus_splits("shakespeare")
    model = GPT(config, seed=s["seed"])
    optimizer = build_optimizer(model, s["lr"], s["weight_decay"])
    sampler = WindowSampler(splits["train"], config.context_length, seed=s["seed"])
    ckpt = os.path.join(checkpoint_dir, "checkpoint.safetensors") if checkpoint_dir else None
    state = {"settings": settings, "step": 0, "seconds": 0.0, "losses": [], "eval_steps": [],
             "val_losses": [], "loads": []}
    if ckpt and resume and os.path.exists(ckpt):
        state = load_checkpoint(ckpt, model, optimizer, sampler, settings)
        print(f"resuming from {ckpt} at step {state['step']}")
    state.setdefault("sessions", []).append(          # each start or resume, for the record
        {"from_step": state["step"], "processes": s["processes"],
         "load_average": round(os.getloadavg()[0], 2)})
    n_params = sum(p.size for _, p in model.named_parameters())
    print(f"pretraining a {n_params:,}-parameter byte-level GPT on Shakespeare "
          f"({len(splits['train']):,} training characters) for {s['steps']} steps of "
          f"{s['batch_size']} x {config.context_length}, {s['processes']} processes")
    started = time.perf_counter() - state["seconds"]
    with DataParallel(model, s["processes"]) as parallel:
        bar = tqdm(range(state["step"], s["steps"]), initial=state["step"], total=s["steps"],
                   disable=not progress, desc="pretrain")
        for step in bar:
            optimizer.set_lr_scale(warmup_cosine(step, s["steps"], s["warmup_steps"], s["min_lr_scale"]))
            loss, _ = train_step(model, optimizer, sampler(s["batch_size"]), s["grad_clip"], parallel)
            state["losses"].append(round(loss, 5))
            done = step + 1
            if done % s["eval_every"] == 0 or done == s["steps"]:
                val = evaluate_split(model, splits["validation"], s["progress_windows"])["loss"]
                state["eval_steps"].append(done)
                state["val_losses"].append(round(val, 5))
                state["loads"].append(round(os.getloadavg()[0], 2))
                bar.write(f"step {done:>5}: train {np.mean(state['losses'][-50:]):.4f}, "
                          f"validation {val:.4f} nats/char, load {state['loads'][-1]}")
            bar.set_postfix(loss=f"{loss:.3f}")
            state["step"], state["seconds"] = done, time.perf_counter() - started
            if ckpt and (done % s["checkpoint_every"] == 0 or done in (s["steps"], stop_after)):
                save_checkpoint(ckpt, model, optimizer, sampler, state)
            if done == stop_after:
                break
        bar.close()
    if state["step"] < s["steps"]:
        return model, None
    report = finish(model, splits, s, state, n_params)
    if out:
        save_base(model, out, report)
        print(f"saved to {out}")
    return model, report


def finish(model, splits, s, state, n_params) -> dict:
    val = evaluate_split(model, splits["validation"])
    test = evaluate_split(model, splits["test"])
    print(f"validation: {val['loss']:.4f} nats/char = {val['bits_per_char']:.3f} bits/char, "
          f"perplexity {val['perplexity']:.2f}; test {test['loss']:.4f} (measured once)")
    print(f"{state['step']} steps in {state['seconds'] / 60:.1f} min")
    return {
        "samples": samples(model), "generation": generation_speed(model),
        "unseen_characters": unseen_character_cost(model),
        "cost": cpu_seconds_per_step(model.config),
        "command": "python code/stage-09/pretrain_text.py", "settings": state["settings"],
        "processes": s["processes"], "sessions": state["sessions"], "parameters": n_params,
        "validation": val, "test": test, "eval_windows": s["eval_windows"],
        "eval_seed": s["eval_seed"], "seconds": round(state["seconds"], 1),
        "machine": machine(), "load_average_during_run": state["loads"],
        "curve": {"steps": state["eval_steps"], "validation_loss": state["val_losses"],
                  "train_loss_per_step": state["losses"]}}


def unseen_character_cost(model, windows=256, seed=PRETRAIN["eval_seed"]) -> dict:
    """The base's loss on *Alice*'s validation text, split by the predicted character:
    one Shakespeare has, or one of those it lacks (their embedding rows never trained)."""
    tok = ByteTokenizer()
    seen = np.zeros(tok.vocab_size, dtype=bool)
    seen[np.unique(corpus_splits("shakespeare")["train"])] = True
    inputs, targets = fixed_windows(corpus_splits("alice")["validation"],
                                    model.config.context_length, windows, seed)
    losses, new = token_losses(model, inputs, targets), ~seen[targets]
    return {"alice_loss_on_seen_characters": float(losses[~new].mean()),
            "alice_loss_on_unseen_characters": float(losses[new].mean()) if new.any() else None,
            "unseen_positions": int(new.sum()), "positions": int(new.size),
            "unseen_characters": "".join(sorted({chr(t) for t in targets[new].tolist()}))}


def cpu_seconds_per_step(config=TEXT_BASE_CONFIG, steps=20, processes=2) -> dict:
    """CPU time (all processes) of ``steps`` training steps of a fresh model, per step.

    Wall time depends on what else the machine runs; CPU time hardly does, so
    ``steps x this / cores`` estimates the run on idle cores. The workers' start-up
    is included (a slight overestimate). Linux/macOS only (``resource``).
    """
    import resource
    children = lambda: sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])  # noqa: E731
    model = GPT(config, seed=1)
    optimizer = build_optimizer(model, PRETRAIN["lr"], PRETRAIN["weight_decay"])
    sampler = WindowSampler(corpus_splits("shakespeare")["train"], config.context_length, seed=1)
    cpu, kids, wall = time.process_time(), children(), time.perf_counter()
    with DataParallel(model, processes) as parallel:
        for _ in range(steps):
            train_step(model, optimizer, sampler(PRETRAIN["batch_size"]), PRETRAIN["grad_clip"], parallel)
    total = time.process_time() - cpu + children() - kids
    return {"cpu_seconds_per_step": round(total / steps, 3), "processes": processes,
            "wall_seconds_per_step": round((time.perf_counter() - wall) / steps, 3),
            "load_average": round(os.getloadavg()[0], 2)}


def samples(model) -> dict:
    """``SAMPLE_TOKENS`` sampled characters after each of ``SAMPLE_PROMPTS`` (``SAMPLING``)."""
    return {p: complete(model, ByteTokenizer(), p, SAMPLE_TOKENS, **SAMPLING) for p in SAMPLE_PROMPTS}


def generation_speed(model, prompt="ROMEO:\n", new_tokens=100) -> dict:
    """Tokens per second of one sequence, with and without the key/value cache, and the load."""
    ids = ByteTokenizer().encode(prompt)
    rates = {f"tokens_per_second_{name}": round(tokens_per_second(model, ids, new_tokens, cached,
                                                                  repeats=2, **SAMPLING), 1)
             for name, cached in (("cached", True), ("uncached", False))}
    return {**rates, "new_tokens": new_tokens, "prompt_tokens": len(ids),
            "load_average": round(os.getloadavg()[0], 2)}


def quiet_minutes(report, cores=2) -> float:
    """The training time on ``cores`` idle cores that the measured CPU time per step implies."""
    return report["settings"]["steps"] * report["cost"]["cpu_seconds_per_step"] / cores / 60


def model_card(report) -> str:
    """``pretrained_text/README.md``: what the base is, how good, how it was made."""
    c, v, t = report["settings"]["config"], report["validation"], report["test"]
    g, u = report["generation"], report["unseen_characters"]
    unseen = (f"{u['alice_loss_on_unseen_characters']:.2f}"
              if u["alice_loss_on_unseen_characters"] is not None else "nothing")
    sessions = "; ".join(f"from step {x['from_step']}: {x['processes']} processes, load {x['load_average']}"
                         for x in report["sessions"])
    lines = [
        "# The text base: a byte-level mini GPT pretrained on tiny Shakespeare",
        "",
        f"{report['parameters']:,} parameters (d_model {c['d_model']}, {c['n_layers']} layers, "
        f"{c['n_heads']} heads, context {c['context_length']} bytes, vocabulary "
        f"{c['vocab_size']} bytes), trained by `{report['command']}` on the first 90% of "
        f"`data/tinyshakespeare.txt` ({report['settings']['steps']:,} AdamW steps of "
        f"{report['settings']['batch_size']} windows).",
        "",
        f"| split | loss (nats/char) | bits/char | perplexity |",
        f"|---|---|---|---|",
        f"| validation | {v['loss']:.4f} | {v['bits_per_char']:.3f} | {v['perplexity']:.2f} |",
        f"| test (measured once) | {t['loss']:.4f} | {t['bits_per_char']:.3f} | {t['perplexity']:.2f} |",
        "",
        f"Both on {report['eval_windows']} fixed random windows (seed {report['eval_seed']}) "
        f"of the split, every position of each window counted.",
        "",
        f"Training took {report['seconds'] / 60:.1f} min on {report['machine']} "
        f"({sessions}), load average during the run "
        f"{min(report['load_average_during_run'])}-{max(report['load_average_during_run'])} "
        f"(the machine was shared). CPU time per step (all processes, measured on "
        f"{report['cost']['processes']} processes): {report['cost']['cpu_seconds_per_step']:.2f} s, "
        f"so the {report['settings']['steps']:,} steps need about "
        f"{quiet_minutes(report):.0f} min on 2 idle cores.",
        "",
        f"Generating {g['new_tokens']} tokens after a {g['prompt_tokens']}-token prompt: "
        f"{g['tokens_per_second_cached']:,.0f} tokens/s with the key/value cache, "
        f"{g['tokens_per_second_uncached']:,.0f} without (load average {g['load_average']}). "
        f"Past the context every step is a full forward of the last window, cache or not.",
        "",
        f"Characters it never saw: on {u['positions']:,} positions of *Alice*'s validation "
        f"text the base loses {u['alice_loss_on_seen_characters']:.2f} nats per character it "
        f"knows from Shakespeare and {unseen} on the {u['unseen_positions']} positions that hold "
        f"one of `{u['unseen_characters']}`, whose embedding rows were never trained.",
        "",
        f"Samples (temperature {SAMPLING['temperature']}, top-k {SAMPLING['top_k']}, "
        f"seed {SAMPLING['seed']}):",
    ]
    for prompt, text in sorted(report["samples"].items()):     # (the JSON file sorts them too)
        lines += ["", "```", prompt + text, "```"]
    return "\n".join(lines) + "\n"


def save_base(model, directory, report) -> None:
    """Weights, config, tokenizer, report and model card, all at once (``atomic_directory``):
    a failure half-way leaves the previous base whole, never new weights beside an old card."""
    card = model_card(report)
    with atomic_directory(directory) as tmp:
        save_model(model, tmp)
        ByteTokenizer().save(tmp)
        save_json(os.path.join(tmp, REPORT_NAME), report)
        atomic_write_text(os.path.join(tmp, "README.md"), card)


def load_text_base(directory=PRETRAINED_TEXT_DIR):
    """``(model, tokenizer, report)`` of the shipped (or another saved) text base."""
    from checkpoint import load_config
    model = GPT(load_config(directory))
    load_into(model, directory)
    return model, ByteTokenizer.load(directory), load_json(os.path.join(directory, REPORT_NAME))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=PRETRAIN["steps"])
    p.add_argument("--processes", type=int, default=PRETRAIN["processes"])
    p.add_argument("--out", default=PRETRAINED_TEXT_DIR, help="directory to write ('' to skip)")
    p.add_argument("--checkpoint-dir", default=CHECKPOINT_DIR, help="'' for no checkpoints")
    p.add_argument("--no-resume", action="store_true", help="start again even if a checkpoint exists")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {a.steps}")
    pretrain_text(out=a.out or None, checkpoint_dir=a.checkpoint_dir or None, resume=not a.no_resume,
                  progress=not a.no_progress, steps=a.steps, processes=a.processes)


if __name__ == "__main__":
    main()
