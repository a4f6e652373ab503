"""The Hugging Face snippets of the course's source documents, run against ``peft.py``.

Each snippet is copied as the lecture notes print it; only the lines that load a
model from the Hub are replaced (by building a mini GPT, or quantizing one for the
QLoRA snippet, whose ``BitsAndBytesConfig`` is part of that loading). The LoRA and
QLoRA snippets name GPT-2's modules (``c_attn``, ``c_proj``); run as written they
get the library's clear refusal listing the mini GPT's names (common mistake #4),
and with those names they run to the end.
"""
import numpy as np
import pytest

from minigpt import GPT, GPTConfig
from quantization import quantize_model

IMPORT_LINE = ("from peft import LoraConfig, get_peft_model, PeftModel, PromptTuningConfig, "
               "PrefixTuningConfig, IA3Config, TaskType")

LORA = '''
from peft import LoraConfig, get_peft_model

model = AutoModelForCausalLM.from_pretrained("microsoft/DialoGPT-medium")

lora_config = LoraConfig(
    r=16,                    # rank
    lora_alpha=32,          # scaling parameter
    target_modules=["c_attn", "c_proj"],  # which layers to adapt
    lora_dropout=0.1,
    bias="none",
    task_type="CAUSAL_LM"
)

model = get_peft_model(model, lora_config)
print(f"Trainable parameters: {model.num_parameters(only_trainable=True):,}")
'''

PREFIX = '''
from transformers import GPT2LMHeadModel
from peft import PrefixTuningConfig, get_peft_model

model = GPT2LMHeadModel.from_pretrained("gpt2")
config = PrefixTuningConfig(
    task_type="CAUSAL_LM",
    num_virtual_tokens=30,  # prefix length
    token_dim=768,
    num_transformer_submodules=2
)
model = get_peft_model(model, config)
'''

QLORA = '''
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model

# TODO: Configure 4-bit quantization
bnb_config = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",        # Normal Float 4-bit
    bnb_4bit_compute_dtype=torch.float16,
    bnb_4bit_use_double_quant=True,   # Nested quantization
)

# Load quantized model
model = AutoModelForCausalLM.from_pretrained(
    "microsoft/DialoGPT-large",
    quantization_config=bnb_config,
    device_map="auto"
)

# TODO: Add LoRA configuration
lora_config = LoraConfig(
    r=64,                    # Higher rank for complex tasks
    lora_alpha=128,         # 2x rank for scaling
    target_modules=[
        "c_attn",           # Attention weights
        "c_proj",           # Projection weights
    ],
    lora_dropout=0.05,
    bias="none",
    task_type="CAUSAL_LM"
)

# Combine quantization + LoRA
model = get_peft_model(model, lora_config)

# Check parameter efficiency
total_params = sum(p.numel() for p in model.parameters())
trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

print(f"Total parameters: {total_params:,}")
print(f"Trainable parameters: {trainable_params:,}")
'''

# the mini GPT's names for what GPT-2's c_attn (q, k, v fused) and c_proj (attention
# output, MLP output) cover
MINI_GPT_NAMES = '["q_proj", "k_proj", "v_proj", "out_proj", "fc2"]'


def replace_hub_loading(snippet, model_line, start, end):
    """The snippet with the lines from ``start`` through the one containing ``end`` replaced."""
    lines, out, skipping = snippet.splitlines(), [], False
    for line in lines:
        if line.startswith(start) and not skipping:
            skipping = True
            out.append(model_line)
        if not skipping:
            out.append(line)
        elif end in line:
            skipping = False
    return "\n".join(out)


def run(code, **names):
    namespace = dict(names)
    exec(compile(code, "<snippet>", "exec"), namespace)
    return namespace


def test_the_hugging_face_import_line():
    namespace = run(IMPORT_LINE)
    assert namespace["TaskType"].CAUSAL_LM == "CAUSAL_LM"
    config = namespace["LoraConfig"](task_type=namespace["TaskType"].CAUSAL_LM,
                                     target_modules="all-linear")
    model = namespace["get_peft_model"](GPT(GPTConfig()), config)
    assert isinstance(model, namespace["PeftModel"])
    assert model.get_base_model() is model.base_model
    assert len(model.adapters["default"].slots) == 6 * GPTConfig().n_layers   # every linear
    with pytest.raises(ValueError, match="task_type='SEQ_CLS'.*causal language model"):
        namespace["LoraConfig"](task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="task_type='CAUSAL'.*known task types"):
        namespace["PrefixTuningConfig"](task_type="CAUSAL")


@pytest.mark.parametrize("snippet,end", [(LORA, ")"), (QLORA, ")")], ids=["lora", "qlora"])
def test_gpt2_names_get_the_clear_refusal(snippet, end):
    code = replace_hub_loading(snippet, "model = base", "model = AutoModelForCausalLM", end)
    code = replace_hub_loading(code, "", "bnb_config = BitsAndBytesConfig(", ")")
    code = code.replace("import torch\nfrom transformers import AutoModelForCausalLM, BitsAndBytesConfig\n", "")
    with pytest.raises(ValueError, match=r"c_attn.*matched no module.*q_proj"):
        run(code, base=GPT(GPTConfig()))


def test_lora_snippet(capsys):
    code = replace_hub_loading(LORA, "model = base", "model = AutoModelForCausalLM", ")")
    code = code.replace('["c_attn", "c_proj"]', MINI_GPT_NAMES)
    namespace = run(code, base=GPT(GPTConfig()))
    model, c = namespace["model"], GPTConfig()
    expected = c.n_layers * 16 * (4 * (c.d_model + c.d_model) + (4 * c.d_model + c.d_model))
    assert model.num_parameters(only_trainable=True) == expected
    assert capsys.readouterr().out == f"Trainable parameters: {expected:,}\n"
    assert model.peft_config["default"].task_type == "CAUSAL_LM"


def test_prefix_snippet():
    code = PREFIX.replace("from transformers import GPT2LMHeadModel\n", "")
    code = replace_hub_loading(code, "model = base", "model = GPT2LMHeadModel", ")")
    cfg = GPTConfig(vocab_size=50, context_length=64, d_model=768, n_layers=2, n_heads=12)
    model = run(code, base=GPT(cfg))["model"]
    assert model.prefix_encoder.prefix.shape == (2, 2, 30, 12, 64)
    tokens = np.random.default_rng(0).integers(0, 50, (2, 5))
    assert model(tokens).shape == (2, 5, 50)
    with pytest.raises(ValueError, match="token_dim=768 does not match the model, which has 64"):
        run(code, base=GPT(GPTConfig()))


def test_qlora_snippet(capsys):
    code = QLORA.replace("import torch\nfrom transformers import AutoModelForCausalLM, BitsAndBytesConfig\n", "")
    code = replace_hub_loading(code, "", "bnb_config = BitsAndBytesConfig(", ")")
    code = replace_hub_loading(code, "model = base", "model = AutoModelForCausalLM", ")")
    code = code.replace('''[
        "c_attn",           # Attention weights
        "c_proj",           # Projection weights
    ]''', MINI_GPT_NAMES)
    base = quantize_model(GPT(GPTConfig()), "nf4", double_quant=True)   # the 4-bit load
    namespace = run(code, base=base)
    model = namespace["model"]
    assert namespace["trainable_params"] == model.num_parameters(only_trainable=True) > 0
    plain = sum(p.size for p in model.parameters())               # 4-bit weights are not arrays here
    assert namespace["total_params"] == plain
    out = capsys.readouterr().out.splitlines()
    assert out == [f"Total parameters: {plain:,}",
                   f"Trainable parameters: {namespace['trainable_params']:,}"]


def test_prompt_tuning_the_hugging_face_way():
    """The notes' prompt-tuning code is a PyTorch class; this is the same idea through peft's API."""
    namespace = run(IMPORT_LINE)
    config = namespace["PromptTuningConfig"](task_type=namespace["TaskType"].CAUSAL_LM,
                                             num_virtual_tokens=20)
    model = namespace["get_peft_model"](GPT(GPTConfig()), config)
    assert model.num_parameters(only_trainable=True) == 20 * GPTConfig().d_model
    tokens = np.zeros((2, 5), int)
    assert model(tokens).shape == (2, 5, GPTConfig().vocab_size)
