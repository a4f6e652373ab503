"""Wrong input fails early with a ValueError that names the offending value and the limit.

A learner who feeds the model a 1-D array or a too-long sequence should read what
went wrong in the message, not decode a broadcasting error three layers down.
"""
import numpy as np
import pytest

from minigpt import GPT, GPTConfig
from nn import Dropout, Embedding, cross_entropy
from optim import SGD, AdamW, clip_grad_norm
from tasks import MixtureSampler, fixed_test_set, make_batch, make_examples
from train import as_sampler, evaluate, train


@pytest.fixture(scope="module")
def model():
    return GPT(GPTConfig(vocab_size=64, context_length=16, d_model=16, n_heads=2), seed=0)


@pytest.mark.parametrize("tokens, parts", [
    (np.array([[1, 2, 64]]), ["64", "0..63"]),                      # id too large
    (np.array([[1, -1, 3]]), ["-1", "0..63"]),                      # negative id
    (np.zeros((1, 17), dtype=np.int64), ["17", "context_length 16"]),
    (np.array([1, 2, 3]), ["rank 1", "(3,)", "(batch, seq)"]),      # forgot the batch axis
    (np.zeros((1, 2, 3), dtype=np.int64), ["rank 3", "(batch, seq)"]),
    (np.array([[1.0, 2.0]]), ["float64", "integer"]),               # float tokens
])
def test_bad_tokens(model, tokens, parts):
    with pytest.raises(ValueError) as info:
        model.forward(tokens)
    for part in parts:
        assert part in str(info.value)


@pytest.mark.parametrize("fields, parts", [
    ({"d_model": 64, "n_heads": 3}, ["n_heads=3", "d_model=64"]),
    ({"d_model": 0}, ["d_model", "0"]),
    ({"dropout": 1.0}, ["dropout", "1.0"]),
])
def test_bad_config(fields, parts):
    with pytest.raises(ValueError) as info:
        GPTConfig(**fields)
    for part in parts:
        assert part in str(info.value)


def test_wrong_attention_mask_shape(model):
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 4\).*\(2, 5\)"):
        model.forward(np.zeros((2, 5), dtype=np.int64), attention_mask=np.ones((2, 4)))


def test_generation_guards_its_input(model):
    with pytest.raises(ValueError, match="rank 1"):
        model.generate(np.array([1, 2, 3]), max_new_tokens=2)


def test_prefix_shapes_are_checked():
    from minigpt import GPT, CausalSelfAttention, GPTConfig
    cfg = GPTConfig(vocab_size=8, context_length=6, d_model=8, n_heads=2)
    attn = CausalSelfAttention(cfg, np.random.default_rng(0))
    x = np.zeros((1, 4, 8), np.float32)
    with pytest.raises(ValueError, match=r"\(3, 4, 4\).*\(P, 2, 4\)"):
        attn.forward(x, prefix=(np.zeros((3, 4, 4)),) * 2)          # 4 heads, the model has 2
    with pytest.raises(ValueError, match="got 1 layer prefixes for 2 layers"):
        GPT(cfg).forward(np.zeros((1, 3), int), prefixes=[(np.zeros((2, 2, 4)),) * 2])


def test_prefix_grad_is_cleared_by_a_forward_without_prefix():
    from minigpt import CausalSelfAttention, GPTConfig
    attn = CausalSelfAttention(GPTConfig(d_model=8, n_heads=2), np.random.default_rng(0))
    x = np.ones((1, 3, 8), np.float32)
    attn.backward(np.ones_like(attn.forward(x, prefix=(np.ones((2, 2, 4)),) * 2)))
    assert attn.prefix_grad is not None
    attn.backward(np.ones_like(attn.forward(x)))
    assert attn.prefix_grad is None


def test_cross_entropy_target_shape_mismatch():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\) and targets \(2, 4\).*\(2, 3\)"):
        cross_entropy(np.zeros((2, 3, 5)), np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="target 7 out of range for 5 classes"):
        cross_entropy(np.zeros((2, 5)), np.array([1, 7]))


def test_embedding_and_dropout_guards():
    with pytest.raises(ValueError, match=r"index 9 .* 0\.\.8"):
        Embedding(9, 4).forward(np.array([0, 9]))
    with pytest.raises(ValueError, match=r"p must be a finite number in \[0, 1\), got 1.5"):
        Dropout(1.5)


def test_bad_optimizer_settings(model):
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got -0.1"):
        AdamW(model, lr=-0.1)
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match=r"weight_decay must be a finite number >= 0, got -1.0 \(param group 0\)"):
        AdamW(model, param_groups=[{"names": names, "weight_decay": -1}])
    with pytest.raises(ValueError, match=r"betas\[1\] must be a finite number in \[0, 1\), got 1.0 \(betas=\(0.9, 1.0\)\)"):
        AdamW(model, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"momentum must be a finite number in \[0, 1\), got 1.2"):
        SGD(model, lr=0.1, momentum=1.2)
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0, got 0"):
        clip_grad_norm(model, 0)


def test_bad_task_requests():
    with pytest.raises(ValueError, match="unknown task 'sortt'; known tasks: copy, reverse"):
        make_examples("sortt", 3)
    with pytest.raises(ValueError, match="min_len=5, max_len=3"):
        make_examples("copy", 3, min_len=5, max_len=3)
    with pytest.raises(ValueError, match="no inputs of length 1..1"):
        fixed_test_set("copy", 3, min_len=1, max_len=1)
    with pytest.raises(ValueError, match=r"weights must be a finite number >= 0, got -1.0 \(weights=\[1, -1\]\)"):
        MixtureSampler(["copy", "sort"], weights=[1, -1])


def test_batch_longer_than_the_context():
    examples = make_examples("copy", 4, seed=0, min_len=8, max_len=8)    # 18 positions
    with pytest.raises(ValueError, match="18 positions, more than context_length 16"):
        make_batch(examples, context_length=16)
    with pytest.raises(ValueError, match="at least one example"):
        make_batch([])


def test_training_on_sequences_that_do_not_fit(model):
    """The default lengths (up to 8 digits) need 18 positions; this model has 16."""
    with pytest.raises(ValueError, match="sequence length 18 exceeds context_length 16"):
        train(model, make_examples("copy", 8, seed=0, min_len=8, max_len=8), steps=1,
              batch_size=8, progress=False)


def test_bad_training_arguments(model):
    with pytest.raises(ValueError, match="empty list of examples"):
        as_sampler([])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        train(model, "copy", steps=5, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="at least one example"):
        evaluate(model, [])
