"""The prose of ``answers.md``; every number comes from ``make_answers.numbers()``.

``sections(n, f)`` returns ``[(section title, [(id, heading, markdown), ...]), ...]``;
``n`` is the dict of numbers, ``f`` the formatters (``gb``, ``mb``, ``num``, ``pct``).
The quizzes, "why" questions and design scenarios are in ``answers_text_more.py``.
"""
from __future__ import annotations


def course(n, f):
    gb, mb, num, pct = f["gb"], f["mb"], f["num"], f["pct"]
    fm, fu, lo, q = n["full7_mixed"], n["full7"], n["lora7_mem"], n["qlora7_mem"]
    l4096 = n["l4096"]
    rank_rows = "\n".join(f"| {r} | {num(p)} | {pct(p / n['N7'])} |" for r, p in n["ranks"].items())
    method_rows = "\n".join(f"| {name} | `{tp}` | {'yes' if m else 'no'} |" for name, tp, m in n["methods"])
    return [
        ("9.1", "Fine-tuning a 7B model in fp16", f"""
**(a)** Per parameter: fp16 weights (2 bytes) and gradients (2 bytes), AdamW's two
fp32 moments (8 bytes), and, with mixed precision, an fp32 master copy (4 bytes):

| | weights | gradients | master copy | AdamW states | total |
|---|---|---|---|---|---|
| mixed precision | {gb(fm['weights'])} | {gb(fm['gradients'])} | {gb(fm['master_weights'])} | {gb(fm['optimizer_states'])} | **{gb(fm['total'])}** ({fm['bytes_per_param']:.0f} bytes/param) |
| fp16 only | {gb(fu['weights'])} | {gb(fu['gradients'])} | - | {gb(fu['optimizer_states'])} | **{gb(fu['total'])}** ({fu['bytes_per_param']:.0f} bytes/param) |

Left out: the activations kept for the backward pass (they grow with batch size,
sequence length and depth, and are often the largest item), temporary buffers and
framework overhead. Even without them, no single 80 GB GPU holds this: full
fine-tuning of 7B needs several GPUs with sharded optimizer states, or an 8-bit
optimizer.

**(b)** LoRA with {num(n['lora7'])} trainable parameters and an fp16 frozen base:
weights {gb(lo['weights'])} (the base, plus the fp32 adapter), gradients
{mb(lo['gradients'])}, AdamW states {mb(lo['optimizer_states'])}: **{gb(lo['total'])}**.
The frozen weights are almost all of it. QLoRA stores the base in 4 bits:
**{gb(q['total'])}** (block constants not counted; they add about
{pct((n['dq_bits'] - 4) / 4, 1)} to the base, see A3).

**(c)** Catastrophic forgetting: training on the new task moves the weights that
also encoded everything else, and the model loses abilities it had (a model tuned
only on code may write worse prose). With PEFT the pretrained weights are not
touched: disabling the adapter gives back the base model exactly, and the update
itself is small or low-rank, which limits how far the adapted model drifts
(W5). It does not make the *adapted* model immune: it can still get worse at
other tasks while the adapter is on.
"""),
        ("9.2", "LoRA on one 4096 x 4096 projection", f"""
`r * (in + out) = 8 * (4096 + 4096) =` **{num(l4096)}** trainable parameters, against
{num(4096 * 4096)} in the weight: **{pct(l4096 / 4096 ** 2, 2)}** (`LoRALayer(4096, 4096, 8)`
reports `compression_ratio() = {l4096 / 4096 ** 2:.6f}`). In fp16 the adapter is
{num(2 * l4096)} bytes, 128 KiB, against 32 MiB for the weight.

Merging: `W' = W + (alpha / r) * B @ A` (`merge_weights`). `W'` has the shape of `W`,
so the merged layer is one matrix product, exactly the cost of the base model:
**no added latency**. Unmerged, the update costs two thin products per token,
`r * (in + out)` = {num(l4096)} multiply-adds against {num(4096 * 4096)} for `W`
({pct(l4096 / 4096 ** 2, 2)} more arithmetic, plus an extra kernel launch on a GPU).
Undo it with `W = W' - (alpha / r) * B @ A` (`unmerge_weights`); in low precision the
round trip is not bit-exact, so keep the original weights if you need them exactly.
To switch tasks: unmerge one adapter, merge the other.
"""),
        ("9.3", "Comparing methods", f"""
What the library records for each method (where it touches the model, and
whether its update can be folded into the weights):

| method | touch point | mergeable |
|---|---|---|
{method_rows}

**(a) Inference cost.** Bottleneck adapters add two matrix products and a
nonlinearity per site, in sequence with the layer, and cannot be merged (W3).
Prefix tuning makes every attention layer attend to `P` more keys and values
(and store them). Prompt tuning adds `P` tokens to every sequence, through the
whole network, and uses `P` positions of the context window. LoRA and (IA)3 cost
nothing once merged (a little unmerged); BitFit changes only values, never shapes.

**(b) Combining.** Methods that touch different places work together: LoRA with a
soft prompt (exercise 9.17), LoRA with a prefix. The library enforces this rule:
two adapters may be active together only if their touch points differ. Several
LoRA adapters combine exactly into one by stacking their ranks (exercise 9.11,
`add_weighted_adapter`). LoRA and (IA)3 both wrap the same linear layers, so the
library refuses to stack them.

**(c) Architecture.** Adapters insert new layers (a new computation graph). Prefix
tuning adds inputs to every attention layer and prompt tuning lengthens the input;
neither adds weight matrices, but both change what the model computes over. A
merged LoRA or (IA)3 model has exactly the original architecture and shapes; BitFit
never changed it.
"""),
        ("9.4", "Choosing the rank", f"""
Trainable parameters grow linearly with `r`. LoRA on `W_q` and `W_v` of a 7B-class
model (32 layers, width 4096), from `compare_peft_methods(lora_rank=r)`:

| r | trainable | of 7B |
|---|---|---|
{rank_rows}

The scaling `alpha / r` keeps the size of the update roughly independent of `r`,
so changing `r` does not force a new learning rate (Hu et al. 2021, §4.1;
`common_mistakes.md`, mistake 3, measures it on a small layer).
For large ranks rsLoRA's `alpha / sqrt(r)` (`use_rslora=True`) keeps it from
shrinking as `r` grows (Kalajdzievski 2023).

(a) A sentiment classifier is a small change of behaviour: `r` of 4-8 on the
attention projections is plenty; the LoRA paper found ranks as low as 1-2
competitive on GPT-3. (b) A new programming language is a large shift in what the
model knows: use a much larger rank (64-256), adapt every linear layer including
the MLP, or consider full fine-tuning: full fine-tuning learns updates of far
higher rank (W5). Signs that `r` is too small: the training loss plateaus above
what a larger `r` reaches; validation improves noticeably when you double `r`;
the learned `B @ A` uses all `r` singular values at similar strength (no spare
capacity). Treat `r` as a quality/size knob and sweep it: 8, 16, 32, 64.
"""),
    ]


def arithmetic(n, f):
    gb, mb, num, pct = f["gb"], f["mb"], f["num"], f["pct"]
    a1, a1m = n["full175"], n["full175_mixed"]
    B = n["B"]
    prec = "\n".join(f"| {name} | {B[name] * 8:g} | {gb(1e9 * B[name])} | {B[name] / 4:.1%} |"
                     for name in ("fp32", "fp16", "int8", "int4"))
    q70, l70 = n["qlora70"], n["lora70_fp16"]
    fits = 24e9 * 8 / n["dq_bits"]
    return [
        ("A1", "Full fine-tuning of a 175B model", f"""
`estimate_finetune_memory(175e9, "full", dtype="fp16", optimizer="adamw")`:
weights **{gb(a1['weights'])}**, gradients **{gb(a1['gradients'])}**, optimizer states
**{gb(a1['optimizer_states'])}**, total **{gb(a1['total'])}** ({a1['bytes_per_param']:.0f} bytes per
parameter), before any activation. With an fp32 master copy (mixed precision)
it is {gb(a1m['total'])}.

Why 8 bytes: Adam keeps two numbers per parameter, the running mean of the
gradients (first moment) and of their squares (second moment), each in fp32
(4 bytes), because their small updates vanish in fp16.
"""),
        ("A2", "Compute for a 175B model", f"""
(a) `6 * 175e9 =` **{n['flops_token']:.3g}** operations per token.
(b) A batch of 32 x 512 = {num(n['tokens_batch'])} tokens: **{n['flops_batch']:.3g}** operations.
(c) At 10^14 operations per second: **{n['flops_batch'] / 1e14:.0f} s** per batch, at perfect
utilisation (real training reaches perhaps 40-50% of peak: about twice as long).
(d) 10^12 tokens: {n['flops_total']:.3g} operations, so `{n['flops_total']:.3g} / 1e18 * 0.1` =
**{n['flops_total'] / 1e18 * 0.1:,.0f} kWh**.

(e) Why 6: in the forward pass each weight does one multiply and one add per
token (2). The backward pass does it twice: once for the gradient with respect to
the layer's input (2) and once for the gradient with respect to the weight (2).
A frozen layer skips the weight gradient (the library's frozen `Linear` skips
exactly that product) but must still pass the input gradient down to the
adapters below it: **about 4 per parameter**. So PEFT saves up to a third of the
compute; its big saving is memory (W1). (The library has no FLOP calculator;
this answer computes `6 * parameters * tokens` directly.)
"""),
        ("A3", "Precision and memory", f"""
From `accounting.BYTES`, for 10^9 parameters:

| precision | bits | memory | vs fp32 |
|---|---|---|---|
{prec}
| NF4, blocks of 64 | {n['plain_bits']:g} | {gb(1e9 * n['plain_bits'] / 8)} | {n['plain_bits'] / 32:.1%} |
| NF4 + double quantization | {n['dq_bits']:.3f} | {gb(1e9 * n['dq_bits'] / 8)} | {n['dq_bits'] / 32:.1%} |

(The NF4 rows are measured from the library's stored arrays: 4-bit codes plus the
per-block constants.) Going from 16 to 4 bits shrinks a model **4x** (answer (b)
of the QLoRA quiz); from 32 bits, 8x. With the block constants, {16 / n['dq_bits']:.2f}x and
{32 / n['dq_bits']:.2f}x.
"""),
        ("A4", "LoRA on a 1024 x 1024 layer", f"""
**(b) {num(n['l1024'])}**: `r * (in + out) = 8 * 2048` (`LoRALayer(1024, 1024, 8).num_parameters()`),
{pct(n['l1024'] / 1024 ** 2, 2)} of the layer's {num(1024 ** 2)} weights.
"""),
        ("A5", "A LoRA parameter calculator", f"""
`16 * (4096 + 4096) * 96 =` **{num(n['snippet'])}**, which is **{pct(n['snippet'] / n['N175'])}** of
175 billion. The snippet adapts one square 4096-wide matrix per layer; GPT-3 is
12,288 wide. With LoRA on `W_q` and `W_v` of all 96 layers,
`compare_peft_methods(d_model=12288, num_layers=96, num_heads=96, lora_rank=r)` gives
**{num(n['gpt3'][1])}** at `r = 1` ({pct(n['gpt3'][1] / n['N175'])}) and **{num(n['gpt3'][8])}** at
`r = 8` ({pct(n['gpt3'][8] / n['N175'])}): the two sizes of the LoRA paper's GPT-3 runs.
"""),
        ("A6", "Auditing the overview's 7B table", f"""
Reproducible: **28 GB** is `7e9 x 4 bytes`, the fp32 weights alone (training needs
far more, 9.1). **~4M** is `compare_peft_methods()`'s LoRA count, {num(n['lora7'])}
(r=8 on `W_q` and `W_v` of 32 layers, width 4096). **~80K** is the prompt: 20 x 4096 =
{num(n['prompt7'])}.

Not reproducible as stated: with an fp16 base, LoRA training needs
{gb(n['lora7_mem']['total'])}; "~8 GB" matches an **int8** base
({gb(n['lora7_int8']['total'])}). "~2 GB" for prompt tuning cannot hold 7 billion
weights at any precision used in practice: fp16 needs {gb(n['prompt7_mem']['total'])}, int8 7 GB,
4-bit 3.5 GB. The prompt's own training state is tiny ({mb(16 * n['prompt7'])}); the base
model is what costs. Note too that `compare_peft_methods` reports ratios against
the attention weights only ({num(n['table7']['full_fine_tuning']['params'])}); against all 7B, LoRA
trains {pct(n['lora7'] / n['N7'], 3)} and the prompt {pct(n['prompt7'] / n['N7'])}.
"""),
        ("A7", "Auditing \"PEFT vs full fine-tuning\" at 175B", f"""
* Ratio: 1.75M / 175B = **{pct(1.75e6 / n['N175'], 3)}**, not 0.01%.
* Full fine-tuning memory: {gb(8 * n['N175'])} is the AdamW states alone (two fp32 numbers
  per parameter); with fp16 weights
  and gradients the total is {gb(a1['total'])} (A1).
* PEFT memory "~14 GB": the frozen 175B weights alone take {gb(2 * n['N175'])} in fp16 and
  {gb(n['N175'] * n['dq_bits'] / 8)} in NF4; 14 GB cannot hold them. The PEFT-specific state
  (fp32 weights, gradients and AdamW states of 1.75M parameters) is {mb(16 * 1.75e6)}.
* Storage per task: **correct**: 175B x 2 bytes = {gb(2 * n['N175'])}, and 1.75M x 2 bytes = {mb(2 * 1.75e6)}.
"""),
        ("A8", "Storing ten tasks", f"""
One base plus ten adapters: {gb(2 * n['N70'])} + 10 x {gb(100e6)} = **{gb(2 * n['N70'] + 10 * 100e6)}** instead of
{gb(10 * 2 * n['N70'])}, **{1 - (2 * n['N70'] + 10 * 100e6) / (10 * 2 * n['N70']):.1%} less** ("over 80%" is right). A 100 MB fp16 adapter
holds {100e6 / 2 / 1e6:.0f} million parameters, far more than a typical LoRA on a 70B model needs.
"""),
        ("A9", "A 70B model on one 24 GB GPU", f"""
(c) QLoRA is the intended answer and the only option that comes close, but check
it: `estimate_finetune_memory(70e9, "lora", dtype="nf4", trainable_params=4.2e7)` gives
{gb(q70['total'])} before activations, counting 4 bits per weight; with the block constants
({n['dq_bits']:.3f} bits) the weights alone are {gb(n['N70'] * n['dq_bits'] / 8)}. **It does not fit in 24 GB.** With an fp16 base
LoRA needs {gb(l70['total'])}; full fine-tuning over a terabyte; prompt tuning still
needs the whole base in memory. At {n['dq_bits']:.3f} bits, 24 GB holds the weights of at most
{fits / 1e9:.1f}B parameters with nothing left for activations: the
QLoRA paper fine-tunes 33B models on 24 GB GPUs and 65B on one 48 GB GPU. For 70B on
24 GB you would need about 2 bits per weight or offloading to CPU memory (slow).
"""),
        ("A10", "The 12-16 bytes rule", f"""
fp16 weights (2) + fp16 gradients (2) + AdamW moments in fp32 (8) = **12 bytes**;
add an fp32 master copy of the weights (4) for mixed precision: **16 bytes**
(`estimate_finetune_memory(...)["bytes_per_param"]` gives
{n['full7']['bytes_per_param']:.0f} and {n['full7_mixed']['bytes_per_param']:.0f}). Inference keeps only the
weights: 2 bytes per parameter in fp16 (plus the KV cache and activations).
"""),
    ]


def sections(n, f):
    from answers_text_more import design, quizzes, why
    return [("The course's exercises", course(n, f)), ("Arithmetic", arithmetic(n, f)),
            ("Quizzes", quizzes(n, f)), ("Why questions", why(n, f)),
            ("Design scenarios", design(n, f))]
