"""The text corpora, the byte tokenizer, the splits and the window sampler."""
import hashlib
import os
import re

import numpy as np
import pytest

from text import (CORPORA, DATA_DIR, SPLIT_FRACTIONS, ByteTokenizer, WindowSampler,
                  corpus_splits, fixed_windows, load_corpus, split_ids, windows_at)


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_vendored_files_match_their_recorded_sha256(name):
    filename, digest = CORPORA[name]
    with open(os.path.join(DATA_DIR, filename), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest
    with open(os.path.join(DATA_DIR, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert re.search(rf"`{re.escape(filename)}`.*`{digest}`", readme), \
        f"data/README.md must name {filename} with its sha256"


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_round_trip_is_exact_on_both_corpora(name):
    tok, text = ByteTokenizer(), load_corpus(name)
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text


def test_unseen_characters_encode_to_bytes_and_round_trip():
    tok = ByteTokenizer()
    shakespeare = set(load_corpus("shakespeare"))
    alice_only = sorted(set(load_corpus("alice")) - shakespeare)
    assert alice_only == sorted('"()*[]_')
    text = 'é — 🙂 "quoted" [x] _y_ *z*'
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(tok.encode("é")) == 2 and len(tok.encode("—")) == 3 and len(tok.encode("🙂")) == 4
    seen = set(tok.encode("".join(shakespeare)).tolist())
    assert len(seen) == 65 and not set(tok.encode("".join(alice_only)).tolist()) & seen


def test_decode_shows_an_incomplete_character_and_rejects_bad_ids():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="256"):
        tok.decode([65, 256])
    with pytest.raises(ValueError, match="str"):
        tok.encode(b"bytes")


def test_tokenizer_saves_and_loads(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert ByteTokenizer.load(tmp_path).encode("abc").tolist() == [97, 98, 99]
    (tmp_path / "tokenizer.json").write_text('{"kind": "chars", "vocab_size": 65}')
    with pytest.raises(ValueError, match="byte tokenizer"):
        ByteTokenizer.load(tmp_path)


def test_splits_are_contiguous_ordered_and_deterministic():
    ids = ByteTokenizer().encode(load_corpus("shakespeare"))
    a, b = corpus_splits("shakespeare"), corpus_splits("shakespeare")
    assert list(a) == ["train", "validation", "test"]
    assert np.array_equal(np.concatenate(list(a.values())), ids)       # contiguous, in order
    for name in a:
        assert np.array_equal(a[name], b[name])
    sizes = np.array([len(v) for v in a.values()]) / len(ids)
    assert np.allclose(sizes, SPLIT_FRACTIONS, atol=1e-5)


def test_split_rejects_bad_fractions_and_short_blocks():
    with pytest.raises(ValueError, match="fractions"):
        split_ids(np.arange(100), (0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="min_length"):
        split_ids(np.arange(30), min_length=5)


def test_windows_stay_inside_their_split_and_targets_shift_by_one():
    ids = np.arange(50)                       # each id is its position: windows are readable
    sampler = WindowSampler(ids, context_length=8, seed=3)
    for _ in range(20):
        x, y = sampler(16)
        assert x.shape == y.shape == (16, 8)
        assert np.array_equal(y[:, :-1], x[:, 1:]) and np.array_equal(y[:, -1], x[:, -1] + 1)
        assert (np.diff(x, axis=1) == 1).all() and x.min() >= 0 and y.max() <= 49
    starts = set()
    for _ in range(200):
        starts.update(sampler(16)[0][:, 0].tolist())
    assert starts == set(range(50 - 8))       # every start reachable, none past the end


def test_window_sampler_is_seeded():
    ids = ByteTokenizer().encode(load_corpus("alice"))
    a, b = fixed_windows(ids, 32, 10, seed=5), fixed_windows(ids, 32, 10, seed=5)
    c = fixed_windows(ids, 32, 10, seed=6)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    x, y = windows_at(ids, [0], 4)
    assert ByteTokenizer().decode(x[0]) == load_corpus("alice")[:4]


def test_window_sampler_rejects_a_split_shorter_than_a_window():
    with pytest.raises(ValueError, match="context_length \\+ 1 = 9"):
        WindowSampler(np.arange(8), 8)
