"""LoRA's trainable_token_indices: only the listed embedding rows train, saved with the adapter."""
import numpy as np
import pytest
from gradcheck import check_model_loss, well_scaled

from minigpt import GPT, GPTConfig
from nn import cross_entropy
from optim import AdamW
from peft_model import LoraConfig, PeftModel, get_peft_model

CFG64 = GPTConfig(vocab_size=11, context_length=8, d_model=8, n_layers=2, n_heads=2,
                  dtype=np.float64)
ROWS = [2, 7, 9]


def data(B=2, T=6, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG64.vocab_size, (B, T))
    tokens[0, :3] = ROWS                                   # the listed rows occur as inputs
    return tokens, rng.integers(0, CFG64.vocab_size, (B, T))


def tokens_model(rows=ROWS, seed=0):
    base = well_scaled(GPT(CFG64, seed=seed), seed)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                            trainable_token_indices=rows), seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name, p in model.named_parameters(trainable_only=True):   # leave the zero / copy start
        p[...] = p + rng.standard_normal(p.shape) * 0.3
    return model


def test_only_lora_and_the_listed_rows_train():
    model = tokens_model()
    names = [n for n, _ in model.named_parameters(trainable_only=True)]
    assert "embed_tokens.token_adapter.trainable_tokens_delta" in names
    assert not any(n.startswith("embed_tokens.base_layer") for n in names)
    trainable, _ = model.get_nb_trainable_parameters()
    lora = 2 * 2 * CFG64.d_model * CFG64.n_layers           # A (2, 8) + B (8, 2) per q_proj
    assert trainable == lora + len(ROWS) * CFG64.d_model


def test_gradients_match_finite_differences():
    model = tokens_model()
    tokens, targets = data()

    def loss_and_backward():
        model.zero_grad()
        loss, d = cross_entropy(model.forward(tokens), targets)
        model.backward(d)
        return {n: model.get_grad(n) for n, _ in model.named_parameters(trainable_only=True)}

    def loss_only():
        return cross_entropy(model.forward(tokens), targets)[0]

    check_model_loss(loss_and_backward, loss_only, dict(model.named_parameters(trainable_only=True)),
                     tol=1e-6)


def test_starts_at_the_base_and_disabled_is_the_base():
    base = well_scaled(GPT(CFG64, seed=0), 0)
    tokens, targets = data()
    expected = base.forward(tokens)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=ROWS))
    np.testing.assert_array_equal(model.forward(tokens), expected)      # delta = copy, B = 0
    frozen = model.base_model.embed_tokens.base_layer.weight.copy()
    opt = AdamW(model, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss, d = cross_entropy(model.forward(tokens), targets)
        model.backward(d)
        opt.step()
    np.testing.assert_array_equal(model.base_model.embed_tokens.base_layer.weight, frozen)
    eff = model.base_model.embed_tokens.weight
    others = np.setdiff1d(np.arange(CFG64.vocab_size), ROWS)
    np.testing.assert_array_equal(eff[others], frozen[others])
    assert np.abs(eff[ROWS] - frozen[ROWS]).min() > 0                 # every listed row moved
    with model.disable_adapter():
        np.testing.assert_array_equal(model.forward(tokens), expected)


def test_saved_with_the_adapter_and_reloaded(tmp_path):
    model = tokens_model()
    tokens, _ = data()
    out = model.forward(tokens)
    model.save_pretrained(tmp_path / "adapter")
    base = well_scaled(GPT(CFG64, seed=0), 0)
    again = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert again.peft_config["default"].trainable_token_indices == ROWS
    np.testing.assert_allclose(again.forward(tokens), out, rtol=0, atol=1e-12)


def test_merge_equals_unmerged_and_merge_and_unload():
    model = tokens_model()
    tokens, _ = data()
    out = model.forward(tokens)
    with model.disable_adapter():
        base_out = model.forward(tokens)
    model.merge_adapter()
    np.testing.assert_allclose(model.forward(tokens), out, atol=1e-12)
    with model.disable_adapter():                        # merged rows taken out, then put back
        np.testing.assert_allclose(model.forward(tokens), base_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.forward(tokens), out, atol=1e-12)
    model.unmerge_adapter()
    np.testing.assert_allclose(model.forward(tokens), out, atol=1e-12)
    plain = model.merge_and_unload()
    assert type(plain.embed_tokens).__name__ == "Embedding"
    np.testing.assert_allclose(plain.forward(tokens), out, atol=1e-12)


@pytest.mark.parametrize("bad", [[], [11], [-1], [1, 1], "abc", [1.5]])
def test_bad_indices_are_refused(bad):
    with pytest.raises(ValueError, match="trainable_token_indices"):
        get_peft_model(GPT(CFG64), LoraConfig(r=2, target_modules=["q_proj"],
                                              trainable_token_indices=bad))
