"""LoRA fine-tuning reaches full fine-tuning's accuracy, from the shipped base."""
import numpy as np

from compare import METHODS
from checkpoint import load_model
from optim import AdamW, warmup_cosine
from peft_model import get_peft_model
from pretrain import PRETRAINED_DIR
from tasks import fixed_test_set, make_examples
from train import evaluate, train_step

MARGIN = 0.05          # LoRA may trail full fine-tuning by at most 5 points of exact match
STEPS = 300


def finetune(method, task="add3", seed=0):
    model = get_peft_model(load_model(PRETRAINED_DIR), METHODS[method].make_config(), seed=seed)
    opt = AdamW(model, lr=METHODS[method].lr)
    data = make_examples(task, 2000, seed=0)
    rng = np.random.default_rng(seed)
    for step in range(STEPS):
        opt.set_lr_scale(warmup_cosine(step, STEPS, STEPS // 20))
        train_step(model, opt, [data[i] for i in rng.integers(0, len(data), 32)], grad_clip=1.0)
    return model, evaluate(model, fixed_test_set(task, 300))


def test_lora_reaches_full_finetuning_accuracy():
    full, acc_full = finetune("full")
    lora, acc_lora = finetune("lora_all")
    assert acc_full >= 0.8, acc_full                 # the task is learnable in this budget
    assert acc_lora >= acc_full - MARGIN, (acc_lora, acc_full)
    trainable_lora = lora.get_nb_trainable_parameters()[0]
    assert trainable_lora < 0.2 * full.get_nb_trainable_parameters()[0]
