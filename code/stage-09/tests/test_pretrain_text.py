"""The text base's pretraining script: resumable, and the shipped base is what its report says."""
import os

import numpy as np
import pytest

from minigpt import GPTConfig
from pretrain_text import PRETRAINED_TEXT_DIR, evaluate_split, load_text_base, pretrain_text
from text import corpus_splits, fixed_windows, lm_loss, token_losses

TINY = GPTConfig(vocab_size=256, context_length=16, d_model=16, n_layers=1, n_heads=2)
FAST = dict(batch_size=4, eval_windows=8, progress_windows=8, eval_every=3, checkpoint_every=2,
            warmup_steps=1)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    straight, _ = pretrain_text(TINY, out=None, checkpoint_dir=None, progress=False, steps=6,
                                processes=1, **FAST)
    pretrain_text(TINY, out=None, checkpoint_dir=tmp_path, progress=False, steps=6, processes=1,
                  stop_after=3, **FAST)
    resumed, report = pretrain_text(TINY, out=tmp_path / "base", checkpoint_dir=tmp_path,
                                    progress=False, steps=6, processes=1, **FAST)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert np.array_equal(a, b), name
    assert len(report["curve"]["train_loss_per_step"]) == 6
    model, tokenizer, saved = load_text_base(tmp_path / "base")
    assert saved["validation"] == report["validation"] and tokenizer.vocab_size == 256


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    pretrain_text(TINY, out=None, checkpoint_dir=tmp_path, progress=False, steps=4, processes=1,
                  stop_after=2, **FAST)
    with pytest.raises(ValueError, match="other settings"):
        pretrain_text(TINY, out=None, checkpoint_dir=tmp_path, progress=False, steps=4,
                      processes=1, **{**FAST, "lr": 1e-3})


@pytest.mark.skipif(not os.path.isdir(PRETRAINED_TEXT_DIR), reason="no shipped text base yet")
def test_shipped_base_validation_loss_equals_its_report():
    model, tokenizer, report = load_text_base()
    val = evaluate_split(model, corpus_splits("shakespeare")["validation"],
                         report["eval_windows"], report["eval_seed"])
    assert val["loss"] == pytest.approx(report["validation"]["loss"], rel=1e-6)
    assert report["validation"]["loss"] <= 1.55
    size = sum(os.path.getsize(os.path.join(PRETRAINED_TEXT_DIR, f))
               for f in os.listdir(PRETRAINED_TEXT_DIR))
    assert size <= 5 * 2**20


def test_token_losses_average_to_the_loss():
    model, _ = pretrain_text(TINY, out=None, checkpoint_dir=None, progress=False, steps=2,
                             processes=1, **FAST)
    inputs, targets = fixed_windows(corpus_splits("alice")["validation"], 16, 10, seed=0)
    per_position = token_losses(model, inputs, targets, batch_size=3)
    assert per_position.shape == (10, 16) and (per_position > 0).all()
    assert per_position.mean() == pytest.approx(lm_loss(model, inputs, targets), rel=1e-5)


@pytest.mark.skipif(not os.path.isdir(PRETRAINED_TEXT_DIR), reason="no shipped text base yet")
def test_readmes_quote_the_shipped_report():
    """The numbers the README and the model card give are the report's, not retyped ones."""
    from pretrain_text import REPORT_NAME, model_card
    root = os.path.dirname(os.path.dirname(os.path.dirname(PRETRAINED_TEXT_DIR)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    _, _, report = load_text_base()
    v, t, g = report["validation"], report["test"], report["generation"]
    quoted = [f"{report['parameters']:,} parameters", f"{v['loss']:.3f} nats per character",
              f"{v['bits_per_char']:.2f} bits", f"perplexity {v['perplexity']:.2f}",
              f"test split {t['loss']:.3f}", f"{report['seconds'] / 60:.0f} minutes",
              f"{g['tokens_per_second_cached']:,.0f} tokens/s", f"{g['tokens_per_second_uncached']:,.0f}",
              f"{report['cost']['cpu_seconds_per_step']:.2f} s per step",
              f"{report['unseen_characters']['alice_loss_on_seen_characters']:.2f} nats on characters",
              f"{report['unseen_characters']['alice_loss_on_unseen_characters']:.2f} on `",
              f"load average {min(report['load_average_during_run']):.2f}-"
              f"{max(report['load_average_during_run']):.2f}",
              f"measured at load {g['load_average']:.1f})"]
    missing = [q for q in quoted if q not in readme]
    assert not missing, f"README.md should quote {missing} (from pretrained_text/{REPORT_NAME})"
    # the budgets: validation <= 1.55 nats/char, regeneration <= 45 min on 2 cores
    assert v["loss"] <= 1.55 and report["seconds"] <= 45 * 60 and report["processes"] == 2
    with open(os.path.join(PRETRAINED_TEXT_DIR, "README.md"), encoding="utf-8") as f:
        assert f.read() == model_card(report)
