"""Who wrote it? A real-text classification task built from the two corpora.

An example is 64-128 characters cut from one text, two newlines, then one label
token: ``S`` for Shakespeare, ``C`` for Carroll (*Alice*)::

    "ALICE: Curiouser and curiouser ... \\n\\n"  ->  "C"

Training snippets come from the training splits, each method's learning rate is
chosen on snippets of the validation splits and the reported accuracy is measured
on the test splits (three disjoint blocks of each text), with as many snippets of
each author, so always answering one author -- the majority
baseline -- scores 50%. A prediction is the more likely of the two label tokens
at the position after the separator (rank classification, as in T5's and
GPT-3's evaluations); the model is also scored on whether the label is its top
choice over all 256 bytes. The loss trains only that one position.

Rows are right-padded to one window: attention is causal, so padding after the
label position cannot change the logits there, and no mask is needed. A
context shorter than 129 tokens shortens the longest snippets to fit.
"""
from __future__ import annotations

import numpy as np

from text import ByteTokenizer, corpus_splits

AUTHORS = ("shakespeare", "alice")
LABELS = {"shakespeare": "S", "alice": "C"}
SEPARATOR = "\n\n"
SNIPPET_CHARS = (64, 128)
PAD = ord(" ")


def label_ids():
    tok = ByteTokenizer()
    return np.array([int(tok.encode(LABELS[a])[0]) for a in AUTHORS])       # (2,)


def make_examples(split: str, n_per_author: int, window: int, seed: int = 0):
    """Balanced examples from ``split``: ``inputs (N, window)``, ``targets (N, window)``
    (-100 except at the label position), ``positions (N,)`` of the label prediction
    and ``labels (N,)`` (0 Shakespeare, 1 Alice). The same arguments give the same set."""
    sep = ByteTokenizer().encode(SEPARATOR)
    longest = min(SNIPPET_CHARS[1], window - len(sep))
    shortest = min(SNIPPET_CHARS[0], longest)
    rng = np.random.default_rng([seed, {"train": 0, "validation": 1, "test": 2}[split]])
    inputs = np.full((2 * n_per_author, window), PAD, dtype=np.int64)
    targets = np.full((2 * n_per_author, window), -100, dtype=np.int64)
    positions = np.zeros(2 * n_per_author, dtype=np.int64)
    labels = np.repeat(np.arange(2), n_per_author)
    ids_of = {a: corpus_splits(a)[split] for a in AUTHORS}
    for i, label in enumerate(labels):
        ids = ids_of[AUTHORS[label]]
        length = int(rng.integers(shortest, longest + 1))
        start = int(rng.integers(0, len(ids) - length))
        row = np.concatenate([ids[start:start + length], sep])
        inputs[i, :len(row)] = row
        positions[i] = len(row) - 1
        targets[i, positions[i]] = label_ids()[label]
    return inputs, targets, positions, labels


def accuracy(model, inputs, positions, labels, batch_size=64) -> dict:
    """Rank accuracy (the more likely of the two labels), top-1 accuracy over all bytes and
    the loss at the label position (nats; what training lowers, and a tie-free score)."""
    was_training = getattr(model, "training", True)
    model.eval()
    ranked, top1, nll = [], [], []
    ids = label_ids()
    try:
        for s in range(0, len(inputs), batch_size):
            logits = model.forward(inputs[s:s + batch_size])                    # (b, T, V)
            at = logits[np.arange(len(logits)), positions[s:s + batch_size]]    # (b, V)
            right = ids[labels[s:s + batch_size]]                               # (b,)
            ranked.append(at[:, ids].argmax(-1))
            top1.append(at.argmax(-1) == right)
            m = at.max(-1)                          # log softmax = a - m - log sum exp(a - m)
            log_z = m + np.log(np.exp(at - m[:, None]).sum(-1))
            nll.append(log_z - at[np.arange(len(at)), right])
    finally:
        model.train(was_training)
    ranked, top1 = np.concatenate(ranked), np.concatenate(top1)
    return {"accuracy": float(np.mean(ranked == labels)), "top1_accuracy": float(np.mean(top1)),
            "label_loss": float(np.mean(np.concatenate(nll)))}


def majority_baseline(labels) -> float:
    return float(np.bincount(labels).max() / len(labels))


class ExampleSampler:
    """``sampler(batch_size) -> (inputs, targets)``: minibatches drawn with replacement."""

    def __init__(self, inputs, targets, seed=0):
        self.inputs, self.targets = inputs, targets
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch_size):
        i = self.rng.integers(0, len(self.inputs), batch_size)
        return self.inputs[i], self.targets[i]


def train_and_score(model, window, steps, lr, batch_size, seed, n_train, n_test, split="test"):
    """Fine-tune ``model`` on the task; accuracy on the held-out ``split`` before and after
    (``"validation"`` for the learning-rate sweep, ``"test"`` for the reported numbers).

    Returns the measurements and the seconds per step.
    """
    from optim import AdamW
    from train import train
    if split not in ("validation", "test"):
        raise ValueError(f"split must be 'validation' or 'test' (held out), got {split!r}")
    x, y, _, _ = make_examples("train", n_train, window, seed=0)
    inputs, _, positions, labels = make_examples(split, n_test, window, seed=0)
    before = accuracy(model, inputs, positions, labels)
    history = train(model, ExampleSampler(x, y, seed), steps, batch_size=batch_size,
                    optimizer=AdamW(model, lr=lr), warmup_steps=max(1, steps // 20), progress=False)
    after = accuracy(model, inputs, positions, labels)
    return {"accuracy": after["accuracy"], "top1_accuracy": after["top1_accuracy"],
            "label_loss": after["label_loss"], "accuracy_before": before["accuracy"],
            "majority_baseline": majority_baseline(labels), "n_test": len(labels),
            "final_train_loss": float(np.mean(history["losses"][-10:]))
            }, history["seconds"] / max(steps, 1)
