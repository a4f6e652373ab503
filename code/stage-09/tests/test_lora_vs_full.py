"""LoRA fine-tuning reaches full fine-tuning's accuracy, from the shipped base."""
from compare import RunSpec, finetune
from tasks import fixed_test_set
from train import evaluate

MARGIN = 0.05          # LoRA may trail full fine-tuning by at most 5 points of exact match
STEPS = 300


def accuracy(method, task="add3"):
    model = finetune(RunSpec(method, task, seed=0, steps=STEPS))[0]
    return model, evaluate(model, fixed_test_set(task, 300))


def test_lora_reaches_full_finetuning_accuracy():
    full, acc_full = accuracy("full")
    lora, acc_lora = accuracy("lora_all")
    assert acc_full >= 0.8, acc_full                 # the task is learnable in this budget
    assert acc_lora >= acc_full - MARGIN, (acc_lora, acc_full)
    trainable_lora = lora.get_nb_trainable_parameters()[0]
    assert trainable_lora < 0.2 * full.get_nb_trainable_parameters()[0]
