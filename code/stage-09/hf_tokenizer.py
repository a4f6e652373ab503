"""GPT-2's byte-level BPE tokenizer, read from a checkpoint folder, in plain Python (no dependency).

    tok = load_hf_tokenizer("path/to/gpt2")         # tokenizer.json, or vocab.json + merges.txt
    ids = tok.encode("To be, or not to be")         # the ids Hugging Face's tokenizer gives
    tok.decode(ids) == "To be, or not to be"        # exact for any text

Why our own and not the ``tokenizers`` library: the algorithm is short and worth
reading (Radford et al. 2019, §2.2; Sennrich et al. 2016), the course keeps its
dependency list to NumPy and safetensors, and the tests check it id for id
against ``tokenizers`` (what ``GPT2TokenizerFast`` runs) on text it never saw.
It is slower (pure Python, cached per word), which is fine for a laptop's corpus.

The three steps:

1. **Bytes, not characters.** The UTF-8 bytes of the text are mapped one to one to
   256 printable characters (``bytes_to_unicode``), so every string, emoji included,
   is spelled with a finite alphabet and decoding is exact.
2. **Pre-tokenization.** A regular expression cuts the text into words (a leading
   space stays with its word, contractions split off, runs of letters, digits,
   other symbols and spaces apart). Merges never cross these cuts. GPT-2's pattern
   uses the Unicode classes ``\\p{L}`` and ``\\p{N}``, which Python's ``re`` lacks;
   ``unicode_class`` builds them from ``unicodedata`` once.
3. **Merges.** Inside each word, repeatedly join the adjacent pair with the lowest
   merge rank (the order the merges were learnt), until no pair has one. Each final
   piece is a vocabulary entry.

Added tokens such as ``<|endoftext|>`` are cut out of the text first and map to
their own ids, as in Hugging Face.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
import unicodedata

from checkpoint import atomic_directory, atomic_write_text, load_json


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict:
    """Byte -> printable character: printable Latin-1 bytes map to themselves, the rest to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


@functools.lru_cache(maxsize=None)
def unicode_class(prefix: str) -> str:
    """A ``re`` character class of every code point whose category starts with ``prefix``
    (``"L"``: letters, ``\\p{L}``; ``"N"``: numbers, ``\\p{N}``), as ranges."""
    ranges, start = [], None
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and unicodedata.category(chr(cp)).startswith(prefix)
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            ranges.append(re.escape(chr(start)) + ("-" + re.escape(chr(cp - 1)) if cp - 1 > start else ""))
            start = None
    return "".join(ranges)


@functools.lru_cache(maxsize=1)
def gpt2_pattern() -> re.Pattern:
    """GPT-2's pre-tokenizer: ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``."""
    L, N = unicode_class("L"), unicode_class("N")
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^\s{L}{N}]+|\s+(?!\S)|\s+")


class ByteLevelBPETokenizer:
    """``encode(text) -> ids`` and ``decode(ids) -> text`` for a GPT-2-style vocabulary."""

    def __init__(self, vocab: dict, merges: list, added_tokens: dict | None = None,
                 add_prefix_space: bool = False):
        self.vocab = dict(vocab)
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.added = dict(added_tokens or {})
        self.vocab.update(self.added)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.add_prefix_space = add_prefix_space
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self._split = (re.compile("(" + "|".join(map(re.escape, sorted(self.added, key=len, reverse=True))) + ")")
                       if self.added else None)
        self.eos_token_id = self.added.get("<|endoftext|>")

    def __len__(self):
        return len(self.vocab)

    @property
    def max_id(self) -> int:
        return max(self.vocab.values())

    @functools.lru_cache(maxsize=65536)
    def _bpe(self, word: str) -> tuple:
        """Merge the pieces of one pre-tokenized word by rank, lowest first."""
        pieces = list(word)
        while len(pieces) > 1:
            pairs = [(self.ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            first, second = pieces[i], pieces[i + 1]
            merged, j = [], 0                               # merge every occurrence, left to right
            while j < len(pieces):
                if j + 1 < len(pieces) and pieces[j] == first and pieces[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(pieces[j])
                    j += 1
            pieces = merged
        return tuple(pieces)

    def _encode_plain(self, text: str) -> list:
        ids = []
        for word in gpt2_pattern().findall(text):
            chars = "".join(self.byte_char[b] for b in word.encode("utf-8"))
            ids.extend(self.vocab[piece] for piece in self._bpe(chars))
        return ids

    def encode(self, text: str) -> list:
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        if self.add_prefix_space and not text.startswith(" "):
            text = " " + text
        parts = self._split.split(text) if self._split else [text]
        ids = []
        for k, part in enumerate(parts):                    # odd parts are added tokens
            ids.extend([self.added[part]] if k % 2 else self._encode_plain(part))
        return ids

    def __call__(self, text: str) -> dict:
        return {"input_ids": self.encode(text)}

    def decode(self, ids) -> str:
        """The text of ``ids``. An id the vocabulary lacks decodes to nothing, as in Hugging
        Face: a model may have more rows than its tokenizer has tokens (OPT: 50,272 for
        50,265), and an untrained row can still be generated. A negative id is an error."""
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"token ids must be >= 0, got {min(ids)}")
        tokens = [self.id_to_token[i] for i in ids if i in self.id_to_token]
        out, pending = [], []
        for token in tokens + [None]:
            if token is None or token in self.added:        # flush the byte run, then the added token
                out.append(bytes(self.char_byte[c] for c in "".join(pending)).decode("utf-8", errors="replace"))
                pending = []
                if token is not None:
                    out.append(token)
            else:
                pending.append(token)
        return "".join(out)


# ------------------------------------------------------------------- loading
def _from_tokenizer_json(path):
    """Vocabulary, merges, added tokens and prefix-space flag of a ``tokenizer.json``,
    refusing anything that is not GPT-2's byte-level BPE."""
    raw = load_json(path)
    model, pre = raw.get("model") or {}, raw.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model type {model.get('type')!r} (byte-level BPE expected)")
    if [p.get("type") for p in pres] != ["ByteLevel"] or not pres[0].get("use_regex", True):
        problems.append(f"pre_tokenizer {[p.get('type') for p in pres]} (GPT-2's ByteLevel expected)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            problems.append(f"{key}={model[key]!r}")
    if model.get("ignore_merges") or raw.get("normalizer"):
        problems.append("ignore_merges or a normalizer")
    if problems:
        raise ValueError(f"{path}: not a GPT-2 byte-level BPE tokenizer: " + "; ".join(problems))
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    added = {t["content"]: t["id"] for t in raw.get("added_tokens") or []}
    return model.get("vocab", {}), merges, added, bool(pres[0].get("add_prefix_space", False))


def _from_vocab_and_merges(directory):
    vocab = load_json(os.path.join(directory, "vocab.json"))
    with open(os.path.join(directory, "merges.txt"), encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{directory}/merges.txt: every line must be two tokens, got {bad[0]!r}")
    extra = os.path.join(directory, "added_tokens.json")
    added = load_json(extra) if os.path.isfile(extra) else {}
    if "<|endoftext|>" in vocab:                        # GPT-2's special token, as its tokenizer adds it
        added.setdefault("<|endoftext|>", vocab["<|endoftext|>"])
    return vocab, merges, added, False


def load_hf_tokenizer(directory, model=None) -> ByteLevelBPETokenizer:
    """GPT-2's byte-level BPE from ``tokenizer.json`` (preferred) or ``vocab.json`` + ``merges.txt``.

    The vocabulary must fit the model: every id below ``model.config.vocab_size``
    (or, without ``model``, below the ``vocab_size`` of a ``config.json`` in the
    same folder); otherwise a ``ValueError`` before anything is returned.
    """
    directory = os.path.expanduser(os.fspath(directory))
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        parts = _from_tokenizer_json(os.path.join(directory, "tokenizer.json"))
    elif all(os.path.isfile(os.path.join(directory, n)) for n in ("vocab.json", "merges.txt")):
        parts = _from_vocab_and_merges(directory)
    else:
        raise ValueError(f"no tokenizer in {directory!r}: expected tokenizer.json, or vocab.json "
                         f"and merges.txt (GPT-2's byte-level BPE)")
    vocab, merges, added, prefix_space = parts
    unknown = [m for m in merges if m[0] + m[1] not in vocab]
    if unknown:
        raise ValueError(f"{directory}: merge {unknown[0]} makes a token that is not in the vocabulary")
    tokenizer = ByteLevelBPETokenizer(vocab, merges, added, prefix_space)
    config = os.path.join(directory, "config.json")
    limit = model.config.vocab_size if model is not None else (
        load_json(config).get("vocab_size") if os.path.isfile(config) else None)
    if limit is not None and tokenizer.max_id >= limit:
        raise ValueError(f"the tokenizer in {directory!r} has ids up to {tokenizer.max_id} "
                         f"({len(tokenizer)} tokens) but the model's vocab_size is {limit}: ids "
                         f">= {limit} would index past its embedding table. Is it the model's tokenizer?")
    return tokenizer


def write_byte_vocabulary(directory) -> str:
    """``vocab.json`` + ``merges.txt`` of the smallest GPT-2-style tokenizer: the 256 byte
    symbols and ``<|endoftext|>``, no merges (one token per byte). For when no trained
    tokenizer is at hand; ``load_hf_tokenizer`` reads it like any other."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    with atomic_directory(directory) as tmp:         # both files or neither
        atomic_write_text(os.path.join(tmp, "vocab.json"), json.dumps(vocab, ensure_ascii=False))
        atomic_write_text(os.path.join(tmp, "merges.txt"), "#version: 0.2\n")
    return directory
