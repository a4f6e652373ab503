"""Whole-model gradient checks in training mode, dropout on, its masks replayed.

Every other whole-model check runs with dropout off, so dropout's backward inside the
model -- after the embeddings, after attention and the MLP in each block, in front of
LoRA's ``A`` -- was never checked: a backward that forgot the mask passed them all.
``gradcheck.replayed_dropout`` makes each mask a constant of the loss, so central
differences see the same network the analytic backward differentiates.
"""
import numpy as np
import pytest

from gradcheck import check_model_loss, replayed_dropout, well_scaled
from minigpt import GPT, GPTConfig
from nn import cross_entropy
from peft_model import LoraConfig, get_peft_model


def config(dropout):
    return GPTConfig(vocab_size=11, context_length=8, d_model=8, n_layers=2, n_heads=2,
                     dropout=dropout, dtype=np.float64)


def data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))


def check(model, names, max_entries=24):
    """Check ``names`` (dotted parameter names) of ``model`` in training mode."""
    tokens, targets = data()
    model.train()
    arrays = {n: model.get_parameter(n) for n in names}

    def loss_and_backward():
        model.zero_grad()
        loss, dlogits = cross_entropy(model.forward(tokens), targets)
        model.backward(dlogits)
        return {n: model.get_grad(n) for n in names}

    loss_only = lambda: cross_entropy(model.forward(tokens), targets)[0]  # noqa: E731
    with replayed_dropout(model) as active:
        errors = check_model_loss(loss_and_backward, loss_only, arrays, tol=1e-6,
                                  max_entries=max_entries)
        masks = {n: m.mask for n, m in active}
    return errors, masks


def test_gpt_with_dropout_after_the_embeddings_and_in_every_block():
    model = well_scaled(GPT(config(dropout=0.3), seed=2))
    names = ["embed_tokens.weight", "embed_positions.weight", "layers.0.self_attn.q_proj.weight",
             "layers.0.mlp.fc1.weight", "layers.1.self_attn.v_proj.weight", "layers.1.ln_2.weight"]
    errors, masks = check(model, names)
    assert set(masks) == {"drop", "layers.0.drop_1", "layers.0.drop_2",
                          "layers.1.drop_1", "layers.1.drop_2"}
    for name, mask in masks.items():                # the masks really drop something
        assert mask is not None and (mask == 0).any() and (mask > 0).any(), name
    assert max(errors.values()) < 1e-6


def test_lora_with_dropout_in_its_branch_and_in_the_base():
    model = get_peft_model(well_scaled(GPT(config(dropout=0.2), seed=3)),
                           LoraConfig(r=2, lora_alpha=4, lora_dropout=0.4,
                                      target_modules=["q_proj", "v_proj", "fc1"]))
    rng = np.random.default_rng(1)
    for name, p in model.named_parameters(trainable_only=True):
        p[...] = rng.standard_normal(p.shape) * 0.5  # B = 0 at init would hide mistakes
    names = [n for n, _ in model.named_parameters(trainable_only=True)]
    errors, masks = check(model, names)
    lora_masks = [n for n in masks if ".lora." in n or n.endswith("lora.dropout")]
    assert len(lora_masks) == 6, sorted(masks)      # 3 targets x 2 layers
    assert all((masks[n] == 0).any() for n in lora_masks)
    assert max(errors.values()) < 1e-6


def test_the_replay_is_needed_and_undone():
    """Without the replay each forward draws a new mask: the check cannot even agree with
    itself. After the block, the generators are the model's own again."""
    model = well_scaled(GPT(config(dropout=0.3), seed=2))
    tokens, targets = data()
    model.train()
    first = cross_entropy(model.forward(tokens), targets)[0]
    assert cross_entropy(model.forward(tokens), targets)[0] != first
    rngs = [m.rng for _, m in model.named_modules() if hasattr(m, "rng")]
    with replayed_dropout(model):
        again = cross_entropy(model.forward(tokens), targets)[0]
        assert cross_entropy(model.forward(tokens), targets)[0] == again
    assert [m.rng for _, m in model.named_modules() if hasattr(m, "rng")] == rngs


def test_a_replayed_mask_of_another_shape_is_refused():
    model = GPT(config(dropout=0.3), seed=2)
    with replayed_dropout(model):
        model.forward(np.zeros((2, 6), int))
        with pytest.raises(ValueError, match=r"replayed dropout mask has shape \(2, 6, 8\)"):
            model.forward(np.zeros((2, 5), int))
