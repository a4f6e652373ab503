"""Training loop, exact-match evaluation and answer loss for the synthetic tasks.

Everything here talks to the model through a small protocol, so the same loop
trains the plain ``GPT`` and any PEFT wrapper around it:

    forward(tokens) -> logits (B, T, V)      backward(dlogits)
    named_parameters(trainable_only=True)    get_submodule(path)
    zero_grad()   train()   eval()           generate(tokens, max_new_tokens, eos_id)

A PEFT wrapper decides what is trainable; the loop and the optimizer only see
the trainable names, which is where PEFT's memory saving comes from.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import nullcontext

import numpy as np
from tqdm import tqdm  # plain text bar: tqdm.auto needs ipywidgets in notebooks

from data_parallel import DataParallel
from nn import IGNORE_INDEX, cross_entropy
from optim import AdamW, clip_grad_norm, grad_norm, trainable_grads, warmup_cosine
from tasks import EOS, MixtureSampler, Task, make_batch
from validate import check_int, check_number


def as_sampler(data, seed=0):
    """Turn what the caller has into ``sampler(n) -> list of examples``.

    ``data`` may be a task (name or ``Task``), a list of tasks (a uniform mixture
    of fresh examples), a fixed list of ``(prompt, answer)`` examples (minibatches
    drawn with replacement: the small-dataset fine-tuning case), or already a callable.
    """
    if callable(data) and not isinstance(data, Task):
        return data
    if isinstance(data, (str, Task)) or (len(data) and isinstance(data[0], (str, Task))):
        return MixtureSampler(data, seed=seed)
    examples = list(data)
    if not examples:
        raise ValueError("no training data: got an empty list of examples")
    rng = np.random.default_rng(seed)
    return lambda n: [examples[i] for i in rng.integers(0, len(examples), n)]


def train(model, data, steps, lr=1e-3, batch_size=32, optimizer=None, eval_every=None,
          eval_examples=None, seed=0, progress=True, grad_clip=1.0, warmup_steps=0,
          schedule="cosine", weight_decay=0.0, processes=1):
    """Train on ``data`` (see ``as_sampler``) for ``steps`` optimizer steps.

    ``optimizer`` defaults to ``AdamW(model, lr, weight_decay=...)``; pass one to
    use parameter groups (LoRA+) or SGD. ``schedule="cosine"`` scales every
    group's lr by ``warmup_cosine``; ``None`` keeps it constant. ``eval_examples``
    (a list, or a dict name -> list) is scored with ``evaluate`` every
    ``eval_every`` steps and at the end. ``processes > 1`` splits every batch
    across that many processes (``data_parallel.DataParallel``; the same gradients,
    both cores busy; a script that uses it needs an ``if __name__ == "__main__":``).

    Returns ``history`` with ``steps``, ``losses``, ``grad_norms``,
    ``eval_steps``, ``eval_accuracies`` (a list, or a dict of lists when
    ``eval_examples`` is a dict), and ``seconds``.
    """
    check_int("steps", steps, 0)
    check_int("batch_size", batch_size, 1)
    check_int("warmup_steps", warmup_steps, 0)
    check_int("processes", processes, 1)
    check_int("seed", seed, 0)
    if eval_every is not None:
        check_int("eval_every", eval_every, 1)
    if grad_clip is not None:
        check_number("grad_clip", grad_clip, 0.0, inclusive=False)
    if schedule not in (None, "cosine"):
        raise ValueError(f"schedule must be 'cosine' or None, got {schedule!r}")
    sampler = as_sampler(data, seed)
    optimizer = optimizer if optimizer is not None else AdamW(model, lr=lr, weight_decay=weight_decay)
    named_evals = isinstance(eval_examples, dict)
    history = {"steps": [], "losses": [], "grad_norms": [], "eval_steps": [],
               "eval_accuracies": defaultdict(list) if named_evals else [], "seconds": 0.0}
    start = time.perf_counter()
    with DataParallel(model, processes) if processes > 1 else nullcontext() as parallel:
        bar = tqdm(range(steps), disable=not progress, desc="train", leave=False)
        for step in bar:
            if schedule == "cosine":
                optimizer.set_lr_scale(warmup_cosine(step, steps, warmup_steps))
            loss, norm = train_step(model, optimizer, sampler(batch_size), grad_clip, parallel,
                                    step=step + 1)
            history["steps"].append(step + 1)
            history["losses"].append(loss)
            history["grad_norms"].append(norm)
            last = step + 1 == steps
            if eval_examples is not None and ((eval_every and (step + 1) % eval_every == 0) or last):
                _record_eval(model, eval_examples, history, step + 1)
                bar.set_postfix(loss=f"{loss:.3f}", acc=_short(history["eval_accuracies"]))
            elif step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")
    history["seconds"] = time.perf_counter() - start
    if named_evals:
        history["eval_accuracies"] = dict(history["eval_accuracies"])
    return history


def train_step(model, optimizer, examples, grad_clip=None, parallel=None, step=None):
    """One forward/backward/update on a batch of examples; returns ``(loss, grad_norm)``.

    ``parallel``: a ``DataParallel`` over ``model`` to split the batch across processes.
    A non-finite loss or gradient norm raises ``FloatingPointError`` naming ``step``
    (and the first parameter whose gradient is not finite) *before* the optimizer
    touches the weights: one NaN update would silently ruin every later step.
    """
    inputs, targets = make_batch(examples)                  # (B, T), (B, T)
    model.train()
    optimizer.zero_grad()
    if parallel is not None:
        loss = parallel.forward_backward(inputs, targets)   # the same, one slice per process
    else:
        logits = model.forward(inputs)                      # (B, T, V)
        loss, dlogits = cross_entropy(logits, targets)
        model.backward(dlogits)
    norm = clip_grad_norm(model, grad_clip) if grad_clip else grad_norm(model)
    check_finite_step(model, loss, norm, targets, step)
    optimizer.step()
    return loss, norm


def check_finite_step(model, loss, norm, targets=None, step=None) -> None:
    """Raise ``FloatingPointError`` if ``loss`` or ``norm`` is NaN or infinite."""
    where = "" if step is None else f" at step {step}"
    if targets is not None and not np.any(np.asarray(targets) != IGNORE_INDEX):
        raise FloatingPointError(f"loss is {loss}{where}: every target of the batch is "
                                 f"ignore_index {IGNORE_INDEX}, so there is nothing to average "
                                 f"(PyTorch also returns NaN)")
    if math.isfinite(loss) and math.isfinite(norm):
        return
    culprit = next((name for name, g in trainable_grads(model) if not np.isfinite(g).all()), None)
    raise FloatingPointError(
        f"training diverged{where}: loss {loss}, gradient norm {norm}"
        + (f"; first non-finite gradient: {culprit}" if culprit else "")
        + ". The weights were not updated; lower the learning rate, clip gradients "
          "(grad_clip) or check the data")


def _record_eval(model, eval_examples, history, step):
    history["eval_steps"].append(step)
    if isinstance(eval_examples, dict):
        for name, examples in eval_examples.items():
            history["eval_accuracies"][name].append(evaluate(model, examples))
    else:
        history["eval_accuracies"].append(evaluate(model, eval_examples))


def _short(accs):
    if isinstance(accs, dict):
        return " ".join(f"{k}={v[-1]:.2f}" for k, v in accs.items())
    return f"{accs[-1]:.3f}"


class _EvalMode:
    """Run a block in ``eval()`` mode and restore the previous mode afterwards."""

    def __init__(self, model):
        self.model, self.was_training = model, getattr(model, "training", True)

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def greedy_answers(model, prompts, max_new_tokens, batch_size=256):
    """Greedy continuation of every prompt, cut after the first ``EOS`` (EOS dropped).

    ``max_new_tokens`` is one int or one per prompt. Prompts are grouped by
    length so each batch is rectangular without left padding (which would shift
    positions and need an attention mask).
    """
    limits = np.broadcast_to(np.asarray(max_new_tokens, dtype=np.int64), (len(prompts),))
    by_len = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    answers = [None] * len(prompts)
    with _EvalMode(model):
        for idx in by_len.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                batch = np.array([prompts[i] for i in chunk], dtype=np.int64)   # (b, Tp)
                n_new = int(limits[chunk].max())
                out = np.asarray(model.generate(batch, n_new, eos_id=EOS))      # (b, <=n_new)
                for i, row in zip(chunk, out.tolist()):
                    answers[i] = row[:row.index(EOS)] if EOS in row else row
    return answers


def evaluate(model, examples, batch_size=256) -> float:
    """Exact-match accuracy of greedy answers.

    The model generates up to ``len(answer) + 1`` tokens; the answer counts as
    right only if the tokens before the first ``EOS`` equal it exactly, so
    stopping too early or rambling on both count as wrong.
    """
    if not examples:
        raise ValueError("evaluate needs at least one example")
    check_int("batch_size", batch_size, 1)
    limits = [len(a) + 1 for _, a in examples]
    predictions = greedy_answers(model, [p for p, _ in examples], limits, batch_size)
    hits = [pred == list(ans) for pred, (_, ans) in zip(predictions, examples)]
    return float(np.mean(hits))


def eval_loss(model, examples, batch_size=256) -> float:
    """Mean cross-entropy per answer token (answer + EOS), in eval mode.

    The comparison runner measures forgetting with it: the pretraining tasks'
    loss before and after fine-tuning on a downstream task.
    """
    if not examples:
        raise ValueError("eval_loss needs at least one example")
    check_int("batch_size", batch_size, 1)
    total, count = 0.0, 0
    with _EvalMode(model):
        for s in range(0, len(examples), batch_size):
            inputs, targets = make_batch(examples[s:s + batch_size])   # (B, T), (B, T)
            n = int((targets != -100).sum())
            loss, _ = cross_entropy(model.forward(inputs), targets)
            total, count = total + loss * n, count + n
    return total / count
