"""Real text for the language model: the two corpora, a byte tokenizer, splits and windows.

    data/tinyshakespeare.txt  ->  ByteTokenizer.encode  ->  ids (N,) int64
    ids -> split_ids: train | validation | test     (contiguous blocks, in this order)
    one split -> WindowSampler(split, context)(B)  ->  inputs (B, T), targets (B, T)

**The tokenizer is byte-level.** A token is one byte of the UTF-8 encoding, so the
vocabulary is exactly the 256 byte values, fixed before any text is seen: every
UTF-8 file encodes, and decoding gives back the very same string. The corpora
here are plain ASCII, so one character is one token.

*What an unseen character costs.* The base model is pretrained on Shakespeare,
which uses 65 distinct bytes. The other 191 rows of the embedding table (which is
also the output layer: the head is tied) never received a gradient that pushed
them towards anything: they are still their random initialisation, shrunk by
weight decay. A character such as ``*`` or ``_`` (in *Alice*, never in
Shakespeare) is therefore read as noise, and the model gives it almost no
probability when it should predict it, so it costs many nats each time until
something trains its row. A character outside ASCII costs this several times
over: ``é`` is two tokens, ``—`` three, an emoji four, each an untrained row, and
each step of generation emits one byte, so a sample may stop half-way through a
character (``decode`` then shows U+FFFD for the incomplete bytes).

**Splits are contiguous blocks.** Train is the first 90% of a corpus, validation
the next 5%, test the last 5% (``SPLIT_FRACTIONS``): no sentence is shared, and
because every window is cut out of one split's array, no window straddles two
splits. The same corpus always gives the same splits.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from checkpoint import save_json
from nn import cross_entropy

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "data"))
CORPORA = {   # name -> (file under data/, its sha256; see data/README.md)
    "shakespeare": ("tinyshakespeare.txt",
                    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    "alice": ("alice_in_wonderland.txt",
              "70f0b8fb6039ea9255ce17f134272677239fa5e0f5b1c3636f437f723919b3af"),
}
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
TOKENIZER_NAME = "tokenizer.json"


# ---- the corpora -----------------------------------------------------------------
def corpus_path(name: str) -> str:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {sorted(CORPORA)}")
    return os.path.join(DATA_DIR, CORPORA[name][0])


def sha256_of(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_corpus(name: str) -> str:
    """The text of a vendored corpus (``"shakespeare"`` or ``"alice"``), checked by its sha256."""
    path = corpus_path(name)
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPORA[name][1]:
        raise ValueError(f"{path} has sha256 {digest}, expected {CORPORA[name][1]}: "
                         f"the file was changed (see data/README.md)")
    return data.decode("utf-8")


# ---- the tokenizer -------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens: ``vocab_size = 256``, nothing learned, nothing unknown.

    ``encode(str) -> (N,) int64``; ``decode(ids) -> str`` (exact for ids that came
    from ``encode``; an incomplete multi-byte character decodes to U+FFFD).
    """

    vocab_size = 256
    kind = "bytes"

    def encode(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)   # (N,)

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode takes one sequence of ids (N,), got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise ValueError(f"token id {bad} out of range: valid ids are 0..{self.vocab_size - 1}")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_strings(self, ids) -> list[str]:
        """One printable label per id (for plots and tables): the character, or ``<0xNN>``."""
        return [chr(i) if 32 <= i < 127 else repr(chr(i))[1:-1] if i < 128 else f"<0x{i:02X}>"
                for i in np.asarray(ids).tolist()]

    # ---- files ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "encoding": "utf-8"}

    def save(self, directory) -> None:
        """Write ``tokenizer.json`` into ``directory`` (atomically)."""
        os.makedirs(directory, exist_ok=True)
        save_json(os.path.join(directory, TOKENIZER_NAME), self.to_dict())

    @classmethod
    def load(cls, directory) -> "ByteTokenizer":
        path = os.path.join(directory, TOKENIZER_NAME)
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        if spec != cls().to_dict():
            raise ValueError(f"{path} describes {spec}, not this byte tokenizer {cls().to_dict()}")
        return cls()


# ---- splits ----------------------------------------------------------------------
def split_ids(ids, fractions=SPLIT_FRACTIONS, min_length: int = 2) -> dict:
    """``{"train", "validation", "test"}`` -> contiguous blocks of ``ids`` (views), in order.

    The boundaries are ``round(cumulative fraction * N)``; each block must hold at
    least ``min_length`` tokens (one window of ``context + 1``, say).
    """
    ids = np.asarray(ids)
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    cuts = np.round(np.cumsum((0.0,) + tuple(fractions)) * len(ids)).astype(int)
    blocks = {name: ids[a:b] for name, a, b in zip(SPLITS, cuts[:-1], cuts[1:])}
    short = {name: len(b) for name, b in blocks.items() if len(b) < min_length}
    if short:
        raise ValueError(f"{len(ids)} tokens split {fractions} leave {short}, fewer than "
                         f"min_length={min_length} tokens")
    return blocks


def corpus_splits(name: str, tokenizer=None) -> dict:
    """The encoded splits of a vendored corpus: ``{"train", "validation", "test"} -> (N_split,)``."""
    return split_ids((tokenizer or ByteTokenizer()).encode(load_corpus(name)))


# ---- windows -----------------------------------------------------------------------
def _check_windows(ids, context_length):
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be one sequence (N,), got shape {ids.shape}")
    if not isinstance(context_length, (int, np.integer)) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
    if len(ids) < context_length + 1:
        raise ValueError(f"a window needs context_length + 1 = {context_length + 1} tokens, "
                         f"the split has only {len(ids)}")
    return ids


def windows_at(ids, starts, context_length):
    """Windows of ``context_length + 1`` tokens starting at ``starts`` (B,):
    ``inputs = window[:-1]`` and ``targets = window[1:]``, both ``(B, T)`` int64."""
    starts = np.asarray(starts)
    idx = starts[:, None] + np.arange(context_length + 1)          # (B, T+1)
    w = np.asarray(ids, dtype=np.int64)[idx]                         # (B, T+1)
    return w[:, :-1], w[:, 1:]


class WindowSampler:
    """Random windows from one split: ``sampler(batch_size) -> (inputs, targets)``.

    Start positions are uniform over ``0 .. N - context_length - 1`` (every window
    lies inside the split), drawn from ``np.random.default_rng(seed)``: the same
    seed gives the same stream of batches. ``train.train`` accepts it as ``data``.
    """

    def __init__(self, ids, context_length: int, seed: int = 0):
        self.ids = _check_windows(ids, context_length).astype(np.int64)
        self.context_length = int(context_length)
        self.rng = np.random.default_rng(seed)

    @property
    def n_starts(self) -> int:
        return len(self.ids) - self.context_length

    def __call__(self, batch_size: int):
        starts = self.rng.integers(0, self.n_starts, batch_size)   # (B,)
        return windows_at(self.ids, starts, self.context_length)


def fixed_windows(ids, context_length: int, n_windows: int, seed: int = 0):
    """A reproducible evaluation sample: ``n_windows`` random windows, ``(inputs, targets)``."""
    return WindowSampler(ids, context_length, seed)(n_windows)


def lm_loss(model, inputs, targets, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats per token) of ``model`` on the windows, in eval mode."""
    was_training = getattr(model, "training", True)
    model.eval()
    try:
        total = 0.0
        for s in range(0, len(inputs), batch_size):
            loss, _ = cross_entropy(model.forward(inputs[s:s + batch_size]), targets[s:s + batch_size])
            total += loss * targets[s:s + batch_size].size
    finally:
        model.train(was_training)
    return total / targets.size


def token_losses(model, inputs, targets, batch_size: int = 64) -> np.ndarray:
    """Cross-entropy of every position, ``(B, T)`` nats, in eval mode (for per-character views)."""
    was_training = getattr(model, "training", True)
    model.eval()
    out = np.empty(targets.shape)
    try:
        for s in range(0, len(inputs), batch_size):
            logits = np.asarray(model.forward(inputs[s:s + batch_size]), dtype=np.float64)  # (b, T, V)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))                # log-softmax
            out[s:s + batch_size] = -np.take_along_axis(logp, targets[s:s + batch_size, :, None], -1)[..., 0]
    finally:
        model.train(was_training)
    return out


def bits_and_perplexity(nats: float) -> dict:
    """A loss in nats per character also as bits per character and perplexity."""
    return {"loss": float(nats), "bits_per_char": float(nats / np.log(2)),
            "perplexity": float(np.exp(nats))}
