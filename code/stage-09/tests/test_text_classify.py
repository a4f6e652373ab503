"""The authorship task: balanced, deterministic, one label position, padding that cannot leak."""
import numpy as np

import text_classify as tc
from minigpt import GPT, GPTConfig
from text import ByteTokenizer

WINDOW = 118


def test_examples_are_balanced_deterministic_and_labelled_once():
    x, y, pos, labels = tc.make_examples("test", 20, WINDOW, seed=0)
    x2, y2, pos2, labels2 = tc.make_examples("test", 20, WINDOW, seed=0)
    for a, b in ((x, x2), (y, y2), (pos, pos2), (labels, labels2)):
        np.testing.assert_array_equal(a, b)
    assert np.bincount(labels).tolist() == [20, 20]
    assert tc.majority_baseline(labels) == 0.5
    assert ((y != -100).sum(1) == 1).all()
    np.testing.assert_array_equal(y[np.arange(len(y)), pos], tc.label_ids()[labels])
    sep = len(tc.SEPARATOR)
    lengths = pos + 1 - sep                                  # snippet characters
    assert lengths.min() >= tc.SNIPPET_CHARS[0] and lengths.max() <= min(tc.SNIPPET_CHARS[1], WINDOW - sep)
    assert ByteTokenizer().decode(x[0, pos[0] + 1 - sep:pos[0] + 1]) == tc.SEPARATOR


def test_snippets_come_from_their_own_split():
    from text import corpus_splits
    x, _, pos, labels = tc.make_examples("validation", 5, WINDOW, seed=1)
    for row, p, lab in zip(x, pos, labels):
        snippet = row[:p + 1 - len(tc.SEPARATOR)].astype(np.uint8).tobytes()
        split = corpus_splits(tc.AUTHORS[lab])["validation"].astype(np.uint8).tobytes()
        assert snippet in split


def test_validation_and_test_snippets_are_not_in_the_training_text():
    """The rate is chosen on validation snippets, accuracy reported on test snippets: neither
    occurs in the text the model trains on (nor in each other's split)."""
    from text import corpus_splits
    for split, other in (("validation", "test"), ("test", "validation")):
        x, _, pos, labels = tc.make_examples(split, 30, WINDOW, seed=0)
        for row, p, lab in zip(x, pos, labels):
            snippet = row[:p + 1 - len(tc.SEPARATOR)].astype(np.uint8).tobytes()
            splits = corpus_splits(tc.AUTHORS[lab])
            assert snippet in splits[split].astype(np.uint8).tobytes()
            for elsewhere in ("train", other):
                assert snippet not in splits[elsewhere].astype(np.uint8).tobytes()


def test_scoring_refuses_the_training_split():
    import pytest
    with pytest.raises(ValueError, match="split must be 'validation' or 'test'"):
        tc.train_and_score(None, WINDOW, 1, 1e-3, 2, 0, 2, 2, split="train")


def test_right_padding_cannot_change_the_label_logits():
    model = GPT(GPTConfig(vocab_size=256, context_length=WINDOW, d_model=16, n_layers=1, n_heads=2))
    x, _, pos, _ = tc.make_examples("test", 2, WINDOW, seed=2)
    other = x.copy()
    for i, p in enumerate(pos):
        other[i, p + 1:] = 7                                 # different padding after the label position
    a, b = model.forward(x), model.forward(other)
    for i, p in enumerate(pos):
        np.testing.assert_allclose(a[i, p], b[i, p], rtol=0, atol=1e-5)
