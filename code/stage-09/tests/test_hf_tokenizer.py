"""GPT-2's byte-level BPE (``hf_tokenizer.py``): exact round trips, and the very ids of
Hugging Face's ``tokenizers`` (what ``GPT2TokenizerFast`` runs) for a tokenizer trained
here, offline, on Shakespeare -- read from ``tokenizer.json`` and from vocab.json + merges.txt.
"""
import json
import os

import pytest

from hf_tokenizer import ByteLevelBPETokenizer, bytes_to_unicode, load_hf_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
TEXTS = [   # none of these is in the training text; they stress the pre-tokenizer
    "ROMEO: I'll say it's 42°C -- naïve café, 東京 🙂  two  spaces\n\n\tend",
    "<|endoftext|>Next doc's 12345 x² ½ ⅷ   trailing   ",
    "'s'S 've you'RE   \u00a0nbsp\u2003em-space\r\nCRLF ١٢٣ ǅungla Ⅻ",
    "",
]


def shakespeare() -> str:
    """The repository's Shakespeare text (data/), or a few lines of it when absent."""
    for path in (os.path.join(ROOT, "data", "tinyshakespeare.txt"),
                 "/work/shared/corpora/tinyshakespeare.txt"):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()[:200_000]
    return ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n") * 200


def byte_only_tokenizer(merges=()):
    """A vocabulary of the 256 byte characters (plus what ``merges`` make): any text encodes."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return ByteLevelBPETokenizer(vocab, list(merges), {"<|endoftext|>": len(vocab)})


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(text):
    tok = byte_only_tokenizer(merges=[("Ġ", "t"), ("h", "e"), ("Ġt", "he")])
    assert tok.decode(tok.encode(text)) == text


def test_merges_apply_by_rank_and_added_tokens_are_cut_out():
    tok = byte_only_tokenizer(merges=[("h", "e"), ("Ġ", "t"), ("Ġt", "he")])
    ids = tok.encode(" the<|endoftext|>he")
    assert [tok.id_to_token[i] for i in ids] == ["Ġthe", "<|endoftext|>", "he"]
    assert tok.eos_token_id == ids[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A byte-level BPE trained with Hugging Face ``tokenizers`` on Shakespeare, saved both ways."""
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face tokenizers not installed "
                                     "(it comes with the hf extra: make test-hf)")
    root = tmp_path_factory.mktemp("tok")
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator([shakespeare()], vocab_size=800, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    (root / "json").mkdir()
    (root / "files").mkdir()
    tok.save(str(root / "json" / "tokenizer.json"))
    tok.save_model(str(root / "files"))                    # vocab.json + merges.txt
    return tok, root


@pytest.mark.parametrize("layout", ["json", "files"])
def test_same_ids_as_hugging_face(trained, layout):
    reference, root = trained
    ours = load_hf_tokenizer(root / layout)
    for text in TEXTS + [shakespeare()[-3000:]]:
        ids = ours.encode(text)
        assert ids == reference.encode(text).ids, text[:40]
        assert ours.decode(ids) == text
    assert len(ours) == reference.get_vocab_size()


def test_a_vocabulary_too_big_for_the_model_is_refused(trained, tmp_path):
    _, root = trained
    (root / "json" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 500}))
    try:
        with pytest.raises(ValueError, match=r"ids up to 799 .*vocab_size is 500"):
            load_hf_tokenizer(root / "json")
    finally:
        os.remove(root / "json" / "config.json")


def test_other_tokenizers_and_missing_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="expected tokenizer.json, or vocab.json"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "WordPiece", "vocab": {}}, "pre_tokenizer": {"type": "BertPreTokenizer"}}))
    with pytest.raises(ValueError, match="WordPiece.*BertPreTokenizer"):
        load_hf_tokenizer(tmp_path)


def test_the_byte_vocabulary_encodes_one_token_per_byte(tmp_path):
    from hf_tokenizer import write_byte_vocabulary
    tok = load_hf_tokenizer(write_byte_vocabulary(tmp_path))
    text = TEXTS[0]
    assert len(tok.encode(text)) == len(text.encode("utf-8")) and tok.decode(tok.encode(text)) == text
    assert len(tok) == 257 and tok.eos_token_id == 256


def test_ids_past_the_vocabulary_decode_to_nothing_as_in_hugging_face():
    tok = byte_only_tokenizer()
    assert tok.decode(tok.encode("ab") + [10_000] + tok.encode("c")) == "abc"
    with pytest.raises(ValueError, match=">= 0"):
        tok.decode([-1])
