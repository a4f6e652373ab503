r"""The token vocabulary and the synthetic tasks the mini GPT learns.

Every example is one token sequence::

    [task] d d d ... [sep] a a a ... [eos]
    \_______ prompt ______/ \_ answer _/

The task token says what to do with the digits, so one model can learn a
mixture of tasks and a later fine-tune can teach it a new one behind a new task
token. The loss covers only the answer and the closing ``[eos]`` (targets are
-100 on the prompt and on padding), the usual instruction-tuning set-up: the
model is never asked to predict the random digits of the prompt.

Pretraining tasks (the mixture the base model sees): ``copy``, ``reverse``,
``sort`` (ascending) and ``add1`` (each digit + 1 mod 10). Downstream tasks (never
in that mixture; PEFT methods fine-tune on them): ``sort_desc``, ``add3`` and the
classification ``is_sorted`` (answer ``YES`` or ``NO``).

Train/test split. A digit sequence belongs to the *test split* when a stable
hash of its digits falls in the top ``TEST_FRACTION`` of the hash range. Training
examples (``make_examples``) are drawn only from the train split and
``fixed_test_set`` only from the test split, so no test prompt is ever trained
on, whatever the seeds or sizes -- this matters for 2-digit inputs, where
there are only 100 possible prompts. The split depends on the digits alone, so
a test sequence is unseen by *every* task, pretraining included. The two
functions also draw from distinct seed streams, so equal seeds give unrelated data.
"""
from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from validate import check_int, check_number

# ---- vocabulary --------------------------------------------------------------
PAD, SEP, EOS = 0, 1, 2
FIRST_TASK_TOKEN, NUM_TASK_TOKENS = 3, 16          # ids 3..18 are task tokens
DIGIT0 = FIRST_TASK_TOKEN + NUM_TASK_TOKENS        # ids 19..28 are digits 0..9
YES, NO = DIGIT0 + 10, DIGIT0 + 11                 # ids 29, 30 are labels
VOCAB_SIZE = 64                                     # ids 31..63 are free for later use
MIN_LEN, MAX_LEN = 2, 8                             # default input lengths (digits)
TEST_FRACTION = 0.1
TRAIN_STREAM, TEST_STREAM = 0, 1


def digit_tokens(digits) -> list[int]:
    return [DIGIT0 + int(d) for d in digits]


def max_sequence_length(max_len: int = MAX_LEN) -> int:
    """Tokens in the longest example: task, digits, sep, answer (<= max_len), eos."""
    return 2 * max_len + 3


# ---- tasks -------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A named task. ``generator(rng, length)`` -> ``(input_digits, answer_tokens)``."""

    name: str
    token: int
    generator: Callable
    kind: str = "generation"          # or "classification"
    description: str = ""


def _digits(rng, length):
    return rng.integers(0, 10, length)


def _copy(rng, n):
    d = _digits(rng, n)
    return d, digit_tokens(d)


def _reverse(rng, n):
    d = _digits(rng, n)
    return d, digit_tokens(d[::-1])


def _sort(rng, n):
    d = _digits(rng, n)
    return d, digit_tokens(np.sort(d))


def _sort_desc(rng, n):
    d = _digits(rng, n)
    return d, digit_tokens(np.sort(d)[::-1])


def _add(k):
    def gen(rng, n):
        d = _digits(rng, n)
        return d, digit_tokens((d + k) % 10)
    return gen


def _is_sorted(rng, n):
    """Balanced labels: half the inputs are sorted on purpose (random digits of
    length >= 4 are almost never sorted, so a model could answer NO and score 95%)."""
    if rng.random() < 0.5:
        return np.sort(_digits(rng, n)), [YES]
    while True:
        d = _digits(rng, n)
        if np.any(np.diff(d) < 0):
            return d, [NO]


_SPECS = [  # name, generator, kind, description  (task token = position in this list)
    ("copy", _copy, "generation", "repeat the digits"),
    ("reverse", _reverse, "generation", "the digits in reverse order"),
    ("sort", _sort, "generation", "the digits sorted ascending"),
    ("add1", _add(1), "generation", "each digit plus 1, mod 10"),
    ("sort_desc", _sort_desc, "generation", "the digits sorted descending"),
    ("add3", _add(3), "generation", "each digit plus 3, mod 10"),
    ("is_sorted", _is_sorted, "classification", "YES if non-decreasing, else NO"),
]
TASKS: dict[str, Task] = {name: Task(name, FIRST_TASK_TOKEN + i, gen, kind, desc)
                          for i, (name, gen, kind, desc) in enumerate(_SPECS)}
PRETRAIN_TASKS = ["copy", "reverse", "sort", "add1"]
DOWNSTREAM_TASKS = ["sort_desc", "add3", "is_sorted"]


def get_task(task) -> Task:
    """Accept a ``Task`` or its name; unknown names raise ``ValueError`` listing the known ones."""
    if isinstance(task, Task):
        return task
    if not isinstance(task, str) or task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[task]


# ---- examples ----------------------------------------------------------------
def in_test_split(digits) -> bool:
    """Stable (process-independent) hash of the digits decides the split."""
    h = hashlib.blake2b(bytes(int(d) for d in digits), digest_size=8, key=b"held-out").digest()
    return int.from_bytes(h, "little") < TEST_FRACTION * 2.0**64


def _rng(task: Task, seed: int, stream: int):
    return np.random.default_rng([zlib.crc32(task.name.encode()), int(seed), stream])


def check_lengths(min_len, max_len) -> None:
    check_int("min_len", min_len, 1)
    check_int("max_len", max_len, 1)
    if min_len > max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")


def _sample(task, n, seed, min_len, max_len, test):
    check_int("n", n, 0)
    check_int("seed", seed, 0)
    check_lengths(min_len, max_len)
    task = get_task(task)
    rng = _rng(task, seed, TEST_STREAM if test else TRAIN_STREAM)
    examples, draws = [], 0
    while len(examples) < n:
        digits, answer = task.generator(rng, int(rng.integers(min_len, max_len + 1)))
        if in_test_split(digits) == test:           # rejection keeps the splits disjoint
            examples.append(([task.token, *digit_tokens(digits), SEP], list(answer)))
        draws += 1
        if draws > 1000 * (n + 10):                 # e.g. 1-digit inputs have no test split
            split = "test" if test else "train"
            raise ValueError(f"the {split} split of {task.name!r} has (almost) no inputs of "
                             f"length {min_len}..{max_len}; use longer inputs")
    return examples


def make_examples(task, n, seed=0, min_len=MIN_LEN, max_len=MAX_LEN):
    """``n`` training examples ``(prompt_tokens, answer_tokens)`` from the train split.

    ``prompt = [task, digits..., SEP]``; ``answer`` excludes ``EOS`` (``make_batch``
    appends it). Deterministic in ``(task, n, seed, lengths)``.
    """
    return _sample(task, n, seed, min_len, max_len, test=False)


def fixed_test_set(task, n=500, seed=0, min_len=MIN_LEN, max_len=MAX_LEN):
    """``n`` held-out examples from the test split (see the module docstring)."""
    return _sample(task, n, seed, min_len, max_len, test=True)


def make_batch(examples, context_length=None, pad_id=PAD):
    """Right-padded next-token batch.

    Each sequence ``s = prompt + answer + [EOS]``; ``inputs = s[:-1]`` and
    ``targets = s[1:]`` with -100 on prompt positions and on padding, so the loss
    covers the answer and the EOS only. Right padding needs no attention mask:
    causal attention never lets a real token see the padding after it.
    Returns ``inputs (B, T)`` and ``targets (B, T)``, both int64.
    """
    if not hasattr(examples, "__len__") or isinstance(examples, (str, bytes, np.ndarray)):
        raise ValueError(f"examples must be a list of (prompt, answer) pairs, got "
                         f"{type(examples).__name__} {examples!r:.60}")
    if len(examples) == 0:
        raise ValueError("make_batch needs at least one example")
    if context_length is not None:
        check_int("context_length", context_length, 1)
    for i, example in enumerate(examples):
        check_example(i, example)
    seqs = [list(p) + list(a) + [EOS] for p, a in examples]
    T = max(len(s) for s in seqs) - 1
    if context_length is not None and T > context_length:
        raise ValueError(f"batch needs {T} positions, more than context_length {context_length}")
    inputs = np.full((len(seqs), T), pad_id, dtype=np.int64)      # (B, T)
    targets = np.full((len(seqs), T), -100, dtype=np.int64)       # (B, T)
    for i, ((prompt, _), s) in enumerate(zip(examples, seqs)):
        inputs[i, :len(s) - 1] = s[:-1]
        targets[i, len(prompt) - 1:len(s) - 1] = s[len(prompt):]
    return inputs, targets


def check_example(i, example) -> None:
    """Example ``i`` must be ``(prompt, answer)``: a non-empty prompt and an answer, both
    lists of integer token ids in ``0..VOCAB_SIZE-1``."""
    if not isinstance(example, (tuple, list)) or len(example) != 2:
        raise ValueError(f"example {i} must be a (prompt, answer) pair of token lists, "
                         f"got {example!r:.60}")
    for part, tokens in zip(("prompt", "answer"), example):
        if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
            raise ValueError(f"example {i}: {part} must be a list of token ids, got {tokens!r:.60}")
        for t in tokens:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) \
                    or not 0 <= t < VOCAB_SIZE:
                raise ValueError(f"example {i}: {part} token {t!r} is not an id in "
                                 f"0..{VOCAB_SIZE - 1}")
    if len(example[0]) == 0:
        raise ValueError(f"example {i}: the prompt is empty (it needs at least the task token)")


class MixtureSampler:
    """Endless source of fresh training examples from several tasks.

    ``sampler(n)`` returns ``n`` examples, each from a task drawn with
    probability ``weights`` (default uniform). Each call uses a new seed from the
    sampler's own generator, so a run is reproducible from ``seed`` alone.
    """

    def __init__(self, tasks=PRETRAIN_TASKS, seed=0, weights=None, min_len=MIN_LEN, max_len=MAX_LEN):
        self.tasks = [get_task(t) for t in ([tasks] if isinstance(tasks, (str, Task)) else tasks)]
        if not self.tasks:
            raise ValueError("tasks is empty: name at least one task, e.g. ['copy']")
        check_int("seed", seed, 0)
        check_lengths(min_len, max_len)
        if weights is not None:
            weights = list(weights)
            for w in weights:
                check_number("weights", w, 0.0, where=f" (weights={weights!r})")
        w = np.ones(len(self.tasks)) if weights is None else np.asarray(weights, dtype=float)
        if w.shape != (len(self.tasks),) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights {weights!r} must be {len(self.tasks)} non-negative numbers, not all 0")
        self.weights = w / w.sum()
        self.min_len, self.max_len = min_len, max_len
        self.rng = np.random.default_rng(seed)

    def __call__(self, n):
        check_int("n", n, 0)
        counts = self.rng.multinomial(n, self.weights)
        examples = []
        for task, k in zip(self.tasks, counts):
            if k:
                seed = int(self.rng.integers(2**62))
                examples += make_examples(task, int(k), seed, self.min_len, self.max_len)
        order = self.rng.permutation(len(examples))
        return [examples[i] for i in order]


# ---- printing ----------------------------------------------------------------
_NAMES = {PAD: "<pad>", SEP: "|", EOS: "<eos>", YES: "YES", NO: "NO"}
_NAMES.update({t.token: f"<{t.name}>" for t in TASKS.values()})
_NAMES.update({DIGIT0 + d: str(d) for d in range(10)})


def token_name(token: int) -> str:
    return _NAMES.get(int(token), f"<{int(token)}>")


def decode(tokens) -> str:
    """``[4, 19, 22, 1, 22, 19]`` -> ``"<reverse> 0 3 | 3 0"``."""
    return " ".join(token_name(t) for t in np.asarray(tokens).reshape(-1))
