"""Synthetic tasks, batching, exact-match evaluation, and a model that visibly learns."""
import time

import numpy as np
import pytest

from minigpt import GPT, GPTConfig
from optim import SGD
from tasks import (DIGIT0, DOWNSTREAM_TASKS, EOS, NO, PAD, PRETRAIN_TASKS, SEP, TASKS, VOCAB_SIZE,
                   TEST_FRACTION, VALIDATION_FRACTION, YES, MixtureSampler, decode, fixed_test_set,
                   in_test_split, make_batch, make_examples, split_of, validation_set)
from train import eval_loss, evaluate, greedy_answers, train


def digits_of(prompt):
    return [t - DIGIT0 for t in prompt[1:-1]]


# ---- vocabulary and tasks ------------------------------------------------------
def test_vocabulary_layout():
    specials = [PAD, SEP, EOS, YES, NO] + [t.token for t in TASKS.values()] + list(range(DIGIT0, DIGIT0 + 10))
    assert len(set(specials)) == len(specials) and max(specials) < VOCAB_SIZE
    assert not set(PRETRAIN_TASKS) & set(DOWNSTREAM_TASKS)
    assert len(PRETRAIN_TASKS) >= 4 and set(PRETRAIN_TASKS + DOWNSTREAM_TASKS) <= set(TASKS)
    assert TASKS["is_sorted"].kind == "classification" and TASKS["copy"].kind == "generation"


ANSWERS = {
    "copy": lambda d: d,
    "reverse": lambda d: d[::-1],
    "sort": sorted,
    "add1": lambda d: [(x + 1) % 10 for x in d],
    "sort_desc": lambda d: sorted(d, reverse=True),
    "add3": lambda d: [(x + 3) % 10 for x in d],
}


@pytest.mark.parametrize("name", list(TASKS))
def test_examples_follow_the_task_rule(name):
    examples = make_examples(name, 300, seed=1)
    for prompt, answer in examples:
        d = digits_of(prompt)
        assert prompt[0] == TASKS[name].token and prompt[-1] == SEP and 2 <= len(d) <= 8
        if name == "is_sorted":
            assert answer == [YES if d == sorted(d) else NO]
        else:
            assert answer == [DIGIT0 + x for x in ANSWERS[name](d)]
    lengths = {len(p) - 2 for p, _ in examples}
    assert lengths == set(range(2, 9))                     # every length shows up


def test_is_sorted_labels_are_balanced():
    labels = [a[0] for _, a in make_examples("is_sorted", 1000, seed=2)]
    assert 0.4 < labels.count(YES) / len(labels) < 0.6


def test_examples_are_deterministic_in_the_seed():
    assert make_examples("sort", 50, seed=3) == make_examples("sort", 50, seed=3)
    assert make_examples("sort", 50, seed=3) != make_examples("sort", 50, seed=4)
    assert make_examples("copy", 20, seed=0, min_len=5, max_len=5)[0][0].__len__() == 7


def test_test_set_is_disjoint_from_training_data():
    """Short inputs collide easily (100 two-digit prompts), so the split is by content."""
    test = fixed_test_set("copy", 500, min_len=2, max_len=3)
    test_digits = {tuple(digits_of(p)) for p, _ in test}
    assert all(in_test_split(d) for d in test_digits)
    for task in PRETRAIN_TASKS + DOWNSTREAM_TASKS:
        for seed in range(3):
            train_digits = {tuple(digits_of(p)) for p, _ in make_examples(task, 1000, seed, 2, 3)}
            assert not train_digits & test_digits
    assert fixed_test_set("copy", 500, min_len=2, max_len=3) == test


def test_validation_set_is_disjoint_from_training_and_test_data():
    """Learning rates are chosen on it, so it must share no input with either."""
    val = validation_set("add3", 300, min_len=2, max_len=3)
    val_digits = {tuple(digits_of(p)) for p, _ in val}
    assert all(split_of(d) == "validation" for d in val_digits)
    test_digits = {tuple(digits_of(p)) for p, _ in fixed_test_set("add3", 500, min_len=2, max_len=3)}
    assert not val_digits & test_digits
    for task in PRETRAIN_TASKS + DOWNSTREAM_TASKS:
        for seed in range(3):
            train_digits = {tuple(digits_of(p)) for p, _ in make_examples(task, 1000, seed, 2, 3)}
            assert not train_digits & val_digits, task
    assert validation_set("add3", 300, min_len=2, max_len=3) == val
    rng = np.random.default_rng(0)                    # each split has about its share of inputs
    splits = [split_of(rng.integers(0, 10, 6)) for _ in range(20000)]
    assert splits.count("test") / len(splits) == pytest.approx(TEST_FRACTION, abs=0.01)
    assert splits.count("validation") / len(splits) == pytest.approx(VALIDATION_FRACTION, abs=0.01)


def test_make_batch_shifts_and_masks():
    examples = [([3, 20, 21, 1], [20, 21]), ([4, 22, 1], [22])]
    inputs, targets = make_batch(examples)
    assert inputs.dtype == np.int64 and targets.dtype == np.int64
    np.testing.assert_array_equal(inputs, [[3, 20, 21, 1, 20, 21], [4, 22, 1, 22, PAD, PAD]])
    np.testing.assert_array_equal(targets, [[-100, -100, -100, 20, 21, EOS],
                                            [-100, -100, 22, EOS, -100, -100]])
    full = [p + a + [EOS] for p, a in examples]
    for row, seq in enumerate(full):                       # targets are inputs shifted by one
        for i in np.flatnonzero(targets[row] != -100):
            assert targets[row, i] == seq[i + 1] and inputs[row, i] == seq[i]


def test_mixture_sampler_covers_tasks_and_is_reproducible():
    sampler = MixtureSampler(PRETRAIN_TASKS, seed=5, weights=[1, 1, 1, 0])
    batch = sampler(400)
    tokens = {p[0] for p, _ in batch}
    assert tokens == {TASKS[t].token for t in ["copy", "reverse", "sort"]}
    assert MixtureSampler(PRETRAIN_TASKS, seed=5, weights=[1, 1, 1, 0])(400) == batch


def test_decode():
    prompt, answer = make_examples("reverse", 1, seed=0, min_len=2, max_len=2)[0]
    text = decode(prompt + answer + [EOS])
    assert text.startswith("<reverse> ") and " | " in text and text.endswith(" <eos>")
    assert decode([YES, NO, PAD, 63]) == "YES NO <pad> <63>"


# ---- evaluation ----------------------------------------------------------------
class Oracle:
    """A fake model whose greedy output is looked up: tests evaluate() alone."""

    def __init__(self, continuations):
        self.continuations = continuations

    def train(self, mode=True):
        return self

    def eval(self):
        return self

    def generate(self, tokens, max_new_tokens, eos_id=None):
        rows = [list(self.continuations[tuple(t)])[:max_new_tokens] for t in tokens.tolist()]
        return np.array([r + [eos_id] * (max_new_tokens - len(r)) for r in rows])


def test_evaluate_is_exact_match_up_to_eos():
    examples = make_examples("reverse", 40, seed=6)
    right = {tuple(p): a + [EOS] for p, a in examples}
    assert evaluate(Oracle(right), examples) == 1.0
    rambling = {tuple(p): a + [a[0], EOS] for p, a in examples}     # no EOS in time
    assert evaluate(Oracle(rambling), examples) == 0.0
    early = {tuple(p): a[:-1] + [EOS] for p, a in examples}         # stops too soon
    assert evaluate(Oracle(early), examples) == 0.0
    half = {tuple(p): (a if i % 2 else a[::-1] + [9]) + [EOS] for i, (p, a) in enumerate(examples)}
    assert evaluate(Oracle(half), examples) == 0.5
    assert greedy_answers(Oracle(right), [examples[0][0]], 9) == [examples[0][1]]


class ProtocolOnly:
    """Exposes exactly the model protocol a PEFT wrapper will: nothing else is reachable."""

    __slots__ = ("_model",)

    def __init__(self, model):
        self._model = model

    def forward(self, tokens):
        return self._model.forward(tokens)

    def backward(self, dlogits):
        return self._model.backward(dlogits)

    def named_parameters(self, trainable_only=False):
        return self._model.named_parameters(trainable_only=trainable_only)

    def get_submodule(self, path):
        return self._model.get_submodule(path)

    def zero_grad(self):
        self._model.zero_grad()

    def train(self, mode=True):
        self._model.train(mode)

    def eval(self):
        self._model.eval()

    def generate(self, tokens, max_new_tokens, eos_id=None):
        return self._model.generate(tokens, max_new_tokens, eos_id=eos_id)


def small_gpt(context=12, d_model=32, seed=0):
    return GPT(GPTConfig(vocab_size=VOCAB_SIZE, context_length=context, d_model=d_model,
                         n_layers=2, n_heads=4), seed=seed)


def test_train_uses_only_the_protocol_and_records_history():
    model = small_gpt()
    frozen = model.embed_positions.weight.copy()
    model.embed_positions.freeze()
    data = make_examples("copy", 64, seed=0, max_len=4)
    evals = {"copy": fixed_test_set("copy", 20, max_len=4)}
    opt = SGD(ProtocolOnly(model), lr=0.05, momentum=0.9)
    h = train(ProtocolOnly(model), data, steps=6, batch_size=8, optimizer=opt, eval_every=3,
              eval_examples=evals, progress=False, schedule=None)
    assert h["steps"] == list(range(1, 7)) and len(h["losses"]) == 6
    assert h["eval_steps"] == [3, 6] and len(h["eval_accuracies"]["copy"]) == 2
    assert np.array_equal(model.embed_positions.weight, frozen)
    assert model.training                                  # evaluation restored train mode


def test_model_learns_copy_in_seconds():
    start = time.perf_counter()
    model = small_gpt()
    test = fixed_test_set("copy", 200, min_len=2, max_len=4)
    loss_before = eval_loss(model, test)
    h = train(model, MixtureSampler("copy", seed=0, max_len=4),
              steps=600, lr=3e-3, batch_size=32, warmup_steps=30, progress=False)
    first, last = np.mean(h["losses"][:10]), np.mean(h["losses"][-10:])
    accuracy = evaluate(model, test)
    print(f"copy: loss {first:.3f} -> {last:.4f}, accuracy {accuracy:.3f}, "
          f"{time.perf_counter() - start:.1f} s")
    assert first / last > 5
    assert eval_loss(model, test) < loss_before / 5
    assert accuracy >= 0.9                                 # chance is ~10^-len


def test_train_with_two_processes_follows_the_one_process_run():
    """Data parallelism changes where the slices run, not the gradients: same losses."""
    data = make_examples("copy", 64, seed=0, max_len=4)
    runs = []
    for processes in (1, 2):
        model = small_gpt()
        h = train(model, data, steps=8, lr=3e-3, batch_size=8, progress=False,
                  processes=processes)
        runs.append((np.array(h["losses"]), model.get_parameter("layers.0.mlp.fc1.weight")))
    (one, w1), (two, w2) = runs
    assert np.max(np.abs(one - two)) <= 1e-5 * np.max(one), (one, two)
    assert np.max(np.abs(w1 - w2)) <= 1e-5 * np.max(np.abs(w1))
    assert w2.flags.owndata                                 # the run closed its workers
