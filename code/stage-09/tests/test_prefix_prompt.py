"""Prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021) in the mini GPT."""
import numpy as np
import pytest
from peft_checks import CFG64, data, gradcheck_peft, tiny_base

from accounting import compare_peft_methods
from minigpt import GPT, GPTConfig
from peft_model import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

P = 3


def prompt_model(base=None, **kw):
    kw.setdefault("num_virtual_tokens", P)
    return get_peft_model(base if base is not None else tiny_base(), PromptTuningConfig(**kw))


def prefix_model(base=None, **kw):
    kw.setdefault("num_virtual_tokens", P)
    return get_peft_model(base if base is not None else tiny_base(), PrefixTuningConfig(**kw))


# ------------------------------------------------------------------ prefix tuning
def attention_weights(attn, B, H, T, S):
    """The cached weights as ``(B, H, T, S)`` whichever layout attention keeps them in
    (query-major ``(B, H, T, S)`` or key-major ``(S, B, H, T)``)."""
    att = attn.att
    if att.shape == (S, B, H, T):
        return att.transpose(1, 2, 3, 0)
    assert att.shape == (B, H, T, S), att.shape
    return att


def test_prefix_attention_weights_with_a_padding_mask():
    model = prefix_model()
    tokens, _, mask = data(pad=True)                        # row 1: first two keys padded
    T = tokens.shape[1]
    model(tokens, mask)
    for block in model.layers:
        att = attention_weights(block.self_attn, 2, 2, T, P + T)   # (B, H, T, P+T)
        np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-12)
        future = np.triu(np.ones((T, T), dtype=bool), k=1)
        assert np.all(att[..., P:][..., future] == 0)       # no query sees a later token
        assert np.all(att[..., :P] > 0)                     # every query sees every prefix slot
        assert np.all(att[1, :, :, P:P + 2] == 0)           # padded keys get no weight
        assert np.all(att[0, :, :, P:][..., ~future] > 0)   # unpadded past keys do


def test_prefix_keeps_logits_shape_and_positions():
    base = tiny_base()
    tokens, _, _ = data()
    model = prefix_model(base)
    assert model(tokens).shape == tokens.shape + (CFG64.vocab_size,)
    assert np.array_equal(base.embed_positions.ids, np.arange(tokens.shape[1]))


def test_collapse_gives_identical_outputs_and_a_saveable_table(tmp_path):
    model = prefix_model(prefix_projection=True, encoder_hidden_size=5)
    tokens, targets, mask = data(pad=True)
    expected = model(tokens, mask)
    encoder = model.prefix_encoder
    encoder.collapse()
    assert np.array_equal(model(tokens, mask), expected)
    assert encoder.mlp_in is None and model.peft_config["default"].prefix_projection is False
    names = [n for n, _ in model.named_parameters(trainable_only=True)]
    assert names == ["prefix_encoder.prefix"]
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * P * CFG64.d_model
    assert max(gradcheck_peft(model, tokens, targets, mask).values()) <= 1e-6
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_base(), str(tmp_path))
    assert np.array_equal(loaded(tokens, mask), expected)


def test_collapse_of_a_frozen_encoder_stays_frozen():
    model = prefix_model(prefix_projection=True)
    model.prefix_encoder.freeze()
    model.prefix_encoder.collapse()
    assert model.get_nb_trainable_parameters()[0] == 0


def test_prefix_count_agrees_with_the_course_accounting():
    c = GPTConfig(vocab_size=16, context_length=8, d_model=32, n_layers=3, n_heads=4)
    model = get_peft_model(GPT(c), PrefixTuningConfig(num_virtual_tokens=5))
    course = compare_peft_methods(d_model=32, num_layers=3, num_heads=4, prefix_length=5)
    assert model.get_nb_trainable_parameters()[0] == course["prefix_tuning"]["params"]


@pytest.mark.parametrize("kwargs, match", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens=0"),
    ({"num_virtual_tokens": 2.0}, "num_virtual_tokens=2.0"),
    ({"encoder_hidden_size": -1}, "encoder_hidden_size=-1"),
])
def test_bad_prefix_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrefixTuningConfig(**kwargs)


# ------------------------------------------------------------------ prompt tuning
def test_text_init_repeats_or_cuts_the_given_ids():
    base = tiny_base()
    E = base.embed_tokens.weight.copy()
    model = prompt_model(base, num_virtual_tokens=5, prompt_tuning_init="TEXT",
                         prompt_tuning_init_token_ids=[3, 5])
    np.testing.assert_array_equal(model.prompt_encoder.prompt, E[[3, 5, 3, 5, 3]])
    model = prompt_model(tiny_base(), num_virtual_tokens=3, prompt_tuning_init="TEXT",
                         prompt_tuning_init_token_ids=[1, 2, 4, 6, 7])
    np.testing.assert_array_equal(model.prompt_encoder.prompt, E[[1, 2, 4]])   # cut, as Hugging Face


def test_sample_vocab_rows_are_vocabulary_rows_and_random_is_not():
    base = tiny_base()
    E = base.embed_tokens.weight.copy()
    sampled = prompt_model(base, prompt_tuning_init="SAMPLE_VOCAB").prompt_encoder.prompt
    assert all(any(np.array_equal(row, e) for e in E) for row in sampled)
    random = prompt_model(tiny_base()).prompt_encoder.prompt
    assert random.shape == (P, CFG64.d_model)
    assert not any(np.array_equal(row, e) for row in random for e in E)


@pytest.mark.parametrize("pad", [False, True])
def test_keep_convention_by_hand(pad):
    """``keep``: tokens at positions 0..T-1, the prompt with no position embedding."""
    base = tiny_base()
    tokens, _, mask = data(pad=pad)
    model = prompt_model(base, position_convention="keep")
    logits = model(tokens, mask)
    prompt = np.broadcast_to(model.prompt_encoder.prompt, (2, P, CFG64.d_model))
    full = np.concatenate([prompt, base.embed(tokens)], axis=1)
    full_mask = None if mask is None else np.concatenate([np.ones((2, P), int), mask], axis=1)
    expected = base.forward_embeds(full, full_mask)[:, P:]
    assert logits.shape == tokens.shape + (CFG64.vocab_size,)       # real tokens only
    np.testing.assert_allclose(logits, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pad", [False, True])
def test_shift_convention_by_hand(pad):
    """``shift`` (Hugging Face): prompt at positions 0..P-1, tokens at P..P+T-1."""
    base = tiny_base()
    tokens, _, mask = data(pad=pad)
    T = tokens.shape[1]
    model = prompt_model(base, position_convention="shift")
    logits = model(tokens, mask)
    prompt = model.prompt_encoder.prompt + base.embed_positions.weight[:P]
    x = base.embed(tokens, position_ids=np.arange(P, P + T))
    full = np.concatenate([np.broadcast_to(prompt, (2, P, CFG64.d_model)), x], axis=1)
    full_mask = None if mask is None else np.concatenate([np.ones((2, P), int), mask], axis=1)
    expected = base.forward_embeds(full, full_mask)[:, P:]
    np.testing.assert_allclose(logits, expected, rtol=1e-12, atol=1e-12)
    keep = prompt_model(tiny_base(), position_convention="keep")(tokens, mask)
    assert not np.allclose(keep, logits)                    # the conventions really differ


def test_backward_takes_real_token_gradients_and_generate_fits_the_context():
    model = prompt_model()
    tokens, _, _ = data()
    logits = model(tokens)
    dx = model.backward(np.ones_like(logits))
    assert dx.shape == tokens.shape + (CFG64.d_model,)
    assert model.prompt_encoder.prompt_grad.shape == (P, CFG64.d_model)
    long = np.zeros((1, CFG64.context_length - P), dtype=int)
    assert model.generate(long, 4).shape == (1, 4)          # window keeps P + T <= context


def test_virtual_tokens_past_the_context_raise():
    model = prompt_model()
    ctx = CFG64.context_length
    model(np.zeros((1, ctx - P), dtype=int))                # exactly fits
    with pytest.raises(ValueError, match=f"{P} virtual tokens"):
        model(np.zeros((1, ctx - P + 1), dtype=int))
    with pytest.raises(ValueError, match="leaves no room"):
        prompt_model(num_virtual_tokens=ctx)


def test_prompt_count_agrees_with_the_course_accounting():
    c = GPTConfig(vocab_size=16, context_length=32, d_model=32, n_layers=3, n_heads=4)
    model = get_peft_model(GPT(c), PromptTuningConfig(num_virtual_tokens=20))
    assert model.get_nb_trainable_parameters()[0] == compare_peft_methods(
        d_model=32, num_layers=3, num_heads=4, prompt_length=20)["prompt_tuning"]["params"]


@pytest.mark.parametrize("kwargs, match", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens=0"),
    ({"prompt_tuning_init": "VOCAB"}, "prompt_tuning_init='VOCAB'"),
    ({"position_convention": "left"}, "position_convention='left'"),
    ({"prompt_tuning_init": "TEXT"}, "prompt_tuning_init_token_ids"),
    ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_token_ids": []}, "prompt_tuning_init_token_ids"),
])
def test_bad_prompt_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptTuningConfig(**kwargs)


@pytest.mark.parametrize("ids, match", [
    ([3, 11], "outside 0..10"),
    ([-1], "outside 0..10"),
    (list(range(10)) + [1, 2, 3], "has 13 ids, more than context_length=12"),
])
def test_bad_text_init_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        prompt_model(prompt_tuning_init="TEXT", prompt_tuning_init_token_ids=ids)


def test_prefix_shift_convention_moves_the_real_tokens():
    """``position_convention="shift"`` (Hugging Face's numbering): real tokens at P..P+T-1."""
    from minigpt import GPT, GPTConfig
    from peft_model import PrefixTuningConfig, get_peft_model
    cfg = GPTConfig(vocab_size=11, context_length=8, d_model=8, n_layers=2, n_heads=2,
                    dtype=np.float64)
    tokens = np.random.default_rng(0).integers(0, 11, (2, 5))
    keep = get_peft_model(GPT(cfg, seed=1), PrefixTuningConfig(num_virtual_tokens=3))
    shift = get_peft_model(GPT(cfg, seed=1), PrefixTuningConfig(num_virtual_tokens=3,
                                                                position_convention="shift"))
    prefixes = keep.prefix_encoder.layer_prefixes()
    np.testing.assert_allclose(keep(tokens), keep.base_model.forward(tokens, prefixes=prefixes))
    np.testing.assert_allclose(shift(tokens), shift.base_model.forward(
        tokens, prefixes=prefixes, position_ids=np.arange(3, 8)))
    with pytest.raises(ValueError, match="3 prefix positions \\+ sequence length 6 = 9 exceeds"):
        shift(np.zeros((1, 6), int))
    with pytest.raises(ValueError, match="position_convention"):
        PrefixTuningConfig(position_convention="left")
