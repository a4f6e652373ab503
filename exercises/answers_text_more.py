"""The prose of ``answers.md``, second half: quizzes, "why" questions, design scenarios.

Same contract as ``answers_text.py``: each function takes the numbers ``n`` and
the formatters ``f`` and returns ``[(id, heading, markdown), ...]``.
"""
from __future__ import annotations


def quizzes(n, f):
    gb, num, pct = f["gb"], f["num"], f["pct"]
    prefix7 = n["table7"]["prefix_tuning"]["params"]
    nf4_err, int4_err = n["err"]
    saved = 4 + 32 / 64 - n["dq_bits"]
    bf_train, bf_total = n["bitfit"]
    return [
        ("Q1", "Soft prompts", f"""
**(a) about 0.001-0.01%**: 20 vectors of width 4096 are {num(n['prompt7'])} numbers,
{pct(n['prompt7'] / n['N7'])} of 7 billion. **(b) the prompt embeddings.** **(c)** Two
things. The prompt must be *used*: prepended to the input embeddings in the
forward pass (exercise 9.8), or it gets no gradient at all. And the base model
should be frozen: an optimizer over the prompt alone leaves the weights
unchanged, but autograd would still compute and store a gradient for every one
of them, which is the memory PEFT exists to save (`get_peft_model` freezes the
base for you).
"""),
        ("Q2", "Prefixes", f"""
**(a)** The keys and values of every attention layer. **(b) True**: a prefix
stores keys and values for every layer, `layers x 2 x P x d_model`, a prompt only
`P x d_model`. At 7B scale, `compare_peft_methods()` gives {num(prefix7)} for a 10-slot
prefix against {num(n['prompt7'])} for a 20-token prompt, {prefix7 / n['prompt7']:.0f}x more with half the
length (and more still while training through an MLP, exercise 9.16). **(c)** One
prefix pair serves all 12 layers; prefix tuning needs its own keys and values in
each layer: a table with a layer axis, `(layers, 2, P, heads, d_head)` here (a
`ParameterList` or one stacked parameter in PyTorch).
"""),
        ("Q3", "LoRA", """
**(a)** `h = x @ W.T + scaling * (x @ A.T) @ B.T`. **(b)** So that `B @ A = 0` at the
start: the adapted model is exactly the pretrained one, and training begins from
what already works. `A` is random so that `B`'s gradient, which is proportional to
`x @ A.T`, is not zero. Both zero would never learn (both gradients zero); both
random would start from a perturbed model. **(c)** The factor that *writes the
output*, `lora_A` of shape `(out, r)` there (our `B`), is the natural one to zero.
That snippet zeroes its `lora_B` (the input side) instead; the product is still
zero at the start, so it also starts at the pretrained model, but then the
output-side factor gets a zero gradient at the first step. Hugging Face and this
course: `A` (input side) random, `B` (output side) zero.
"""),
        ("Q4", "QLoRA", f"""
**(a) NF4.** Pretrained weights are roughly normal; NF4 puts its 16 levels at
quantiles of a normal distribution so each level is used about equally often
(FP4's levels follow a floating-point exponent pattern instead). On normally
distributed weights with blocks of 64, the library's NF4 has a mean absolute
error of {nf4_err:.4f} against {int4_err:.4f} for uniform symmetric int4 with the same
blocks (exercise 9.21). **(b)** Every block of 64 weights has an fp32 scale, 0.5
extra bits per weight. Double quantization stores those scales in 8 bits, with
one fp32 constant per 256 of them: {n['dq_bits']:.3f} bits per weight in total instead
of 4.5, saving {saved:.3f} bits per weight ({gb(65e9 * saved / 8)} on a 65B model).
**(c)** On a GPU, bitsandbytes puts optimizer states in CUDA unified memory: when
a long sequence makes memory spike, pages move to CPU RAM and come back when the
optimizer needs them, so training slows down for a moment instead of crashing.
NumPy arrays already live in the only memory there is, so there is nothing to
page (see the docstring of `quantization.py`).
"""),
        ("Q5", "True or false", f"""
**(a) False**: the pretrained weights stay frozen; only an explicit merge writes
`W + scaling * B @ A`, and it can be undone. **(b) False**: LoRA matches full
fine-tuning on many benchmarks (Hu et al. 2021), though it can trail on large
domain shifts (W5); "always" is wrong. **(c) False**: an adapter is a new nonlinear
layer in sequence; LoRA is a low-rank *linear* update beside an existing weight,
which is why it can be merged (W3). **(d) False**: a merged model has the
original shapes and cost. **(e) True** (Ben Zaken et al. 2022); this library can
include the LayerNorm biases: on the default mini GPT that is {num(bf_train)} of
{num(bf_total)} parameters ({pct(bf_train / bf_total, 2)}).
"""),
    ]


def why(n, f):
    mb = f["mb"]
    lo = n["lora7_mem"]
    return [
        ("W1", "Where the memory goes", f"""
Gradients and optimizer states exist only for trainable parameters, and they
are 10-14 of the 12-16 bytes per parameter of full fine-tuning (A10). For a 7B
model with LoRA they shrink to {mb(lo['gradients'] + lo['optimizer_states'])}, and what is left is
essentially the frozen weights (9.1). Compute shrinks much less: the backward
pass still carries gradients through every frozen layer above the lowest
adapter, skipping only the weight gradients: about 4 instead of 6 operations
per parameter per token (A2). Activations must still be stored, too.
"""),
        ("W2", "LoRA term by term", """
`W0` is the pretrained weight, frozen: no gradient, never changed. `A (r x in)`
projects the input down to `r` numbers (random at the start); `B (out x r)` maps
them back up (zero at the start). `r` is the rank, the capacity of the update
`B A`; `alpha` sets its strength through `alpha / r`. Only `A` and `B` receive
gradients; the input gets a gradient too, so that earlier layers (and their
adapters) can learn (exercise 9.6).
"""),
        ("W3", "Zero latency", """
LoRA's update is linear: `W0 x + s B A x = (W0 + s B A) x`, one matrix. A
bottleneck adapter computes `f(x W_down) W_up` with a nonlinearity `f` in the
middle; no single matrix does that, so the two extra products stay, in sequence
with the layer, at every token. (IA)3 merges too: scaling outputs by a vector is
multiplying by a diagonal matrix.
"""),
        ("W4", "What QLoRA trains", """
In 4 bits: the frozen base weights (NF4 codes plus block constants). In 16 bits
(32 in this library): the activations, the dequantized weight of each layer,
rebuilt on the fly for each product and thrown away, and the LoRA factors, which
are the only trained parameters. The base never changes because nothing computes
a gradient for it: the quantized layer has no weight parameter at all (the
library's `QuantizedLinear`), only codes, read-only. Gradients still reach the
adapters because the gradient with respect to each layer's *input*,
`grad_output @ W_deq`, flows through the dequantized weights to every earlier
layer (exercises 9.12 and 9.18).
"""),
        ("W5", "Learning less, forgetting less", """
On code and mathematics, both in continued pretraining and instruction tuning,
LoRA at the usual ranks reaches lower accuracy than full fine-tuning; full
fine-tuning learns weight changes of much higher rank (10-100x the typical LoRA
rank). In exchange LoRA keeps more of the base model's abilities outside the
target domain: it forgets less, acting as a regulariser. The rank is the knob
between the two.
"""),
        ("W6", "Soft prompts versus hard prompts", """
A soft prompt is a sequence of free vectors, not of token embeddings: it can sit
anywhere in embedding space, including places no word reaches, and it is found
by gradient descent instead of by trial and error. Length is capacity: more
vectors can encode more, but each costs a position of the context window and
compute at every layer, and in Lester et al.'s experiments gains beyond about 20
vectors were small for large models. Expect trouble on small models (prompt tuning catches up
with full fine-tuning only around 10B parameters), on tasks that need knowledge
or skills the model lacks, on multi-step reasoning, and when you need to read
the prompt: its vectors usually map to no sensible words.
"""),
        ("W7", "Reading a benchmark table", """
QLoRA trains against a 4-bit approximation of the base, so the forward pass
differs slightly from the 16-bit one the model was trained in; the QLoRA paper
found NF4 with double quantization close to 16-bit LoRA, and a 0.3-point gap like
this one is within run-to-run noise. (The table in the lecture notes gives no
source; treat it as an illustration.) Prompt tuning is worth a small loss when
storage per task must be tiny, when one batch must serve many tasks (each row can
carry its own prompt), when nothing in the model may change, or on very large
models where the gap closes.
"""),
        ("W8", "Beyond fixed ranks", """
AdaLoRA (Zhang et al. 2023) writes each update in an SVD-like form and prunes its
least important singular values during training, so a fixed parameter budget
moves to the layers and matrices that need more rank. LoRA+ (Hayou et al. 2024)
keeps LoRA as is but gives `B` a larger learning rate than `A` (about 16x): with
one learning rate, wide layers learn slowly and suboptimally (exercise 9.22).
"""),
    ]


def design(n, f):
    gb, mb, num = f["gb"], f["mb"], f["num"]
    q13 = 13e9 * n["dq_bits"] / 8
    per_hour = 3600 * 1e14 / (4 * 175e9)                   # tokens per GPU-hour at 1e14 op/s
    lora7_file = 2 * n["lora7"]
    return [
        ("D1", "A startup with five tasks", f"""
An fp16 13B model needs 26 GB for its weights alone, so train with **QLoRA**: the
NF4 base is about {gb(q13)}, leaving room for activations on a 16 GB GPU. Train five
LoRA adapters (for a 13B model, width 5120 and 40 layers, `r = 16` on `W_q` and
`W_v` is {num(n['d1_lora'])} parameters, {mb(2 * n['d1_lora'])} in fp16) over the one quantized base.
Serve the base once and choose the adapter per request; do not merge into the
4-bit weights (exercise 9.18 shows the rounding can erase the update).
"""),
        ("D2", "A research lab", """
LoRA, used as a probe: train adapters restricted to one layer or one kind of
projection at a time (`LoraConfig(layers_to_transform=[i])`, `target_modules`) and
compare the task scores; after a full LoRA run compare the size and rank of the
learned `B @ A` per layer. AdaLoRA's rank allocation and (IA)3's scaling vectors
give similar per-layer signals with a single run.
"""),
        ("D3", "One hundred customers", f"""
One base and 100 LoRA adapters. For a 7B model: {gb(14e9)} of base weights plus
100 x {mb(lora7_file)} (`r = 8` on `W_q`, `W_v` in fp16) = {gb(14e9 + 100 * lora7_file)}, instead of
{gb(100 * 14e9)} for 100 copies. Keep the base loaded once and the adapters
unmerged: one batch can then mix requests for different adapters, each row using
its own `A`, `B` (the extra products cost little, 9.2); merge only for a replica
that serves a single customer. Soft prompts would be even smaller and batch just
as easily, at some cost in quality.
"""),
        ("D4", "Prefix or prompt for a support chatbot", """
A prefix gives every attention layer its own learned context, so it can steer the
model's behaviour at every depth (tone, policy, domain); a soft prompt acts only
at the input and must survive the whole network. Prefix tuning is therefore more
expressive and works on smaller models (Li & Liang 2021 matched fine-tuning on
generation tasks with 0.1% of the parameters); the price is `P` extra keys and
values per layer at inference.
"""),
        ("D5", "A multilingual support assistant", f"""
*Technique:* LoRA with a bf16 base: {gb(n['lora7_mem']['total'])} of weights and training state fits an
A100 (40 GB) with room for activations; QLoRA if you need long contexts or large
batches. *Languages:* one shared adapter trained on all five (they share a
lot), or a shared adapter plus one small adapter per language; check that the
tokenizer covers Chinese efficiently. *Speed:* merge the adapter for a
single-adapter deployment (no overhead, 9.2), avoid serial adapters and long
prefixes or prompts, use the KV cache and stream tokens (200 ms is realistic for
the first token, not a whole answer); quantize the served model if needed.
*New languages:* train another adapter; the base and the other adapters are not
touched, so nothing already working is forgotten, and `add_weighted_adapter` can
blend adapters if one model must serve several.
"""),
        ("D6", "175B on a budget", f"""
Full fine-tuning is out ({gb(n['full175']['total'])} of state, A1). QLoRA brings the base to
{gb(175e9 * n['dq_bits'] / 8)}: two 80 GB GPUs. At about 4 operations per parameter per token
(A2), each token costs {4 * 175e9:.2g} operations; at an effective 10^14 per second a GPU
processes about {per_hour / 1e6:.2f} million tokens per hour. If a GPU rents for about $2 an
hour, $1000 buys 500 GPU-hours (250 hours on the pair): about {500 * per_hour / 1e6:,.0f} million
training tokens -- enough for instruction tuning on a good dataset, not for
teaching the model broad new knowledge. A realistic plan:
prototype with QLoRA on a 7-13B model first (most of the gain, a fraction of the
cost), then spend the budget on one well-prepared QLoRA run of the large model.
You give up full fine-tuning, long contexts, large datasets and hyperparameter
sweeps.
"""),
    ]
