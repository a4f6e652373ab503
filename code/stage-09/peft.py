"""Parameter-efficient fine-tuning, from scratch: the course's classes.

Every method here freezes a pretrained weight and trains something small beside it:

    method          trains                      touches the model at
    LoRA            A (r, in), B (out, r)       a Linear:  h = W0 x + (alpha/r) B A x
    Adapter         W_down, W_up                a sublayer output: h + f(h W_down) W_up
    PrefixTuning    prefix (L, 2, P, H, d_head) each attention's keys and values
    PromptTuning    prompt (P, d_model)         the embedding output, before the blocks

These classes are the ones the mini GPT uses (``peft_model.get_peft_model`` wraps
the model's layers with them); the Hugging Face-style API lives in ``peft_model.py``,
quantization in ``quantization.py``. Run ``python peft.py`` for a tour.

Conventions: weights are ``(out_features, in_features)`` and a layer computes
``x @ W.T``; inputs are ``(batch, seq, features)`` or ``(seq, features)``; the
gradient of attribute ``X`` lands in ``X_grad`` after ``backward``.
"""
from __future__ import annotations

import math

import numpy as np

from nn import ACTIVATIONS, Dropout, Linear, Module
from accounting import (compare_peft_methods, compute_parameter_efficiency,  # noqa: F401
                        count_frozen_parameters, count_trainable_parameters,
                        estimate_finetune_memory, llama_parameter_count, memory_report)


# --------------------------------------------------------------------------- LoRA
class LoRALayer(Module):
    """The low-rank update ``delta(x) = scaling * B (A x)`` (Hu et al. 2021, §4.1).

        x ──┬──────────── W (frozen, out x in) ──────────────┐
            │                                                 (+)──> h
            └─ dropout ─> A (r x in) ─> B (out x r) ─> * s ───┘

    ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023), so
    changing ``r`` does not change the size of the update and the learning rate
    can stay. ``B`` starts at zero so training starts exactly at the pretrained
    model; ``A`` is random so the gradient of ``B`` is not zero at step one.

    ``init_lora_weights``: ``True`` (A uniform in ±1/sqrt(in_features), as
    Hugging Face's Kaiming-uniform with a=sqrt(5)), ``"gaussian"`` (A ~ N(0, 1/r^2)),
    ``False`` (A and B both random: the output no longer starts at the base model;
    for debugging and gradient checks only).
    """

    param_names = ("A", "B")

    def __init__(self, in_features, out_features, rank=8, alpha=16.0, dropout=0.0,
                 init_lora_weights=True, use_rslora=False, rng=None, dtype=np.float32):
        super().__init__()
        if not isinstance(rank, (int, np.integer)) or rank <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got r={rank!r}")
        if not alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got lora_alpha={alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got lora_dropout={dropout!r}")
        rng = rng if rng is not None else np.random.default_rng(0)
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout = Dropout(dropout, rng=np.random.default_rng(rng.integers(2**31)))
        self.B = np.zeros((out_features, rank), dtype=dtype)
        if init_lora_weights is True:
            bound = 1.0 / math.sqrt(in_features)
            self.A = rng.uniform(-bound, bound, (rank, in_features)).astype(dtype)
        elif init_lora_weights == "gaussian":
            self.A = (rng.standard_normal((rank, in_features)) / rank).astype(dtype)
        elif init_lora_weights is False:
            self.A = (rng.standard_normal((rank, in_features)) / math.sqrt(in_features)).astype(dtype)
            self.B = (rng.standard_normal((out_features, rank)) / math.sqrt(rank)).astype(dtype)
        else:
            raise ValueError(f"init_lora_weights must be True, 'gaussian' or False, "
                             f"got {init_lora_weights!r}")

    # the update alone: the form LoRALinear and the model use
    def delta(self, x):
        """``scaling * dropout(x) @ A.T @ B.T``: ``(..., in)`` -> ``(..., out)``.

        Rows are flattened so each product is one 2-D matmul, and the scaling is
        applied on the rank-``r`` side, where it costs ``N*r`` multiplications.
        """
        self.x_drop = self.dropout(x).reshape(-1, self.in_features)   # (N, in)
        self.h = self.x_drop @ self.A.T                     # (N, r)
        out = (self.h * self.scaling) @ self.B.T            # (N, out)
        return out.reshape(*x.shape[:-1], self.out_features)

    def delta_backward(self, dout):
        """Backward of ``delta``: accumulates ``A_grad``, ``B_grad``; returns dx."""
        d2 = dout.reshape(-1, self.out_features)            # (N, out)
        if self.wants_grad("B"):                            # dB = s * dout^T h
            self._accumulate("B", (d2.T @ self.h) * self.scaling)
        dh = (d2 @ self.B) * self.scaling                   # (N, r)
        if self.wants_grad("A"):                            # dA = dh^T x
            self._accumulate("A", dh.T @ self.x_drop)
        dx = (dh @ self.A).reshape(*dout.shape[:-1], self.in_features)   # (..., in)
        return self.dropout.backward(dx)

    # the course's standalone form: the frozen weight is passed in
    def forward(self, x, W):
        """``x @ W.T + scaling * (x @ A.T) @ B.T``; ``W`` is the frozen ``(out, in)`` weight."""
        self.W = W
        return x @ W.T + self.delta(x)

    def backward(self, grad_output):
        """Gradient w.r.t. ``x`` through both paths; sets ``A_grad``, ``B_grad``, never W's."""
        return grad_output @ self.W + self.delta_backward(grad_output)

    # how a wrapping LoRALinear uses the update (DoRA overrides these three)
    def adapt(self, x, base_out, layer):
        """The adapted output given the frozen layer's output: ``base_out + delta(x)``
        (added in place: ``base_out`` is a fresh array the frozen layer does not keep)."""
        base_out += self.delta(x)
        return base_out

    def adapt_backward(self, dout):
        """``(gradient for the frozen layer's output, dx through the LoRA path)``."""
        return dout, self.delta_backward(dout)

    def delta_weight(self):
        """The update as a dense ``(out, in)`` matrix: ``scaling * B @ A``."""
        return self.scaling * (self.B @ self.A)

    def merge_weights(self, W):
        return W + self.delta_weight().astype(W.dtype)

    def unmerge_weights(self, W_merged):
        return W_merged - self.delta_weight().astype(W_merged.dtype)

    def num_parameters(self):
        return self.A.size + self.B.size

    def compression_ratio(self):
        return self.num_parameters() / (self.in_features * self.out_features)

    def parameters(self, trainable_only=False):
        return [self.A, self.B]

    def gradients(self):
        return [getattr(self, "A_grad", None), getattr(self, "B_grad", None)]


class LinearWrapper(Module):
    """What every wrapper around a frozen (possibly 4-bit) linear layer shares:
    the base layer's ``weight``/``bias``, and whether its adapter slot is in use."""

    adapter_attr = ""

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def active(self):
        return (getattr(self, self.adapter_attr) is not None and not self.disabled
                and not self.merged)


class LoRALinear(LinearWrapper):
    """A frozen linear layer plus a LoRA update: ``y = x W^T + b + delta(x)``.

    ``weight`` is either the frozen ``(out, in)`` array (the course's form) or a
    base layer module (``nn.Linear``, ``quantization.QuantizedLinear``): that is
    how ``get_peft_model`` wraps the mini GPT's projections. The base layer is
    kept as ``base_layer`` (Hugging Face's name), so its parameters are named
    ``...q_proj.base_layer.weight`` and the LoRA ones ``...q_proj.lora.A``.

    ``lora`` is ``None`` when no adapter is active for this layer (several named
    adapters may share a model; ``PeftModel.set_adapter`` swaps them in).
    ``disabled`` makes the layer behave exactly like its base (``disable_adapter``).
    """

    adapter_attr = "lora"
    peft_type = "LORA"

    def __init__(self, weight, bias=None, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
                 init_lora_weights=True, use_rslora=False, rng=None):
        super().__init__()
        if isinstance(weight, Module):
            self.base_layer = weight
        else:
            weight = np.asarray(weight)
            if weight.ndim != 2:
                raise ValueError(f"weight must be (out_features, in_features), got shape {weight.shape}")
            self.base_layer = Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                     dtype=weight.dtype)
            self.base_layer.weight, self.base_layer.bias = weight, bias
        self.base_layer.freeze()
        self.in_features = self.base_layer.in_features
        self.out_features = self.base_layer.out_features
        self.lora = LoRALayer(self.in_features, self.out_features, lora_rank, lora_alpha,
                              lora_dropout, init_lora_weights, use_rslora, rng=rng,
                              dtype=self.base_layer.weight.dtype)
        self.disabled = False
        self.merged = False

    def forward(self, x):
        y = self.base_layer(x)                              # (..., out) frozen path
        if self.active():
            y = self.lora.adapt(x, y, self)                 # + low-rank path
        return y

    def backward(self, grad_output):
        if not self.active():
            return self.base_layer.backward(grad_output)    # dx only: W is frozen
        d_base, dx_lora = self.lora.adapt_backward(grad_output)
        return self.base_layer.backward(d_base) + dx_lora

    def merge(self):
        """The course's merge: ``(W + scaling * B @ A, bias)`` without changing the layer."""
        return self.lora.merge_weights(self.weight), self.bias

    def merge_in_place(self):
        """Fold the update into the base weight (zero-latency inference)."""
        if self.merged:
            raise ValueError("this LoRA layer is already merged; unmerge it first "
                             "(merging twice would add the update twice)")
        if not isinstance(self.base_layer, Linear):
            raise ValueError(f"cannot merge into a {type(self.base_layer).__name__} in place "
                             f"(a quantized weight cannot hold the update exactly); "
                             f"use merge_and_unload(), which returns a float model")
        self.base_layer.weight[...] = self.lora.merge_weights(self.weight)
        self.merged = True

    def unmerge_in_place(self):
        if not self.merged:
            raise ValueError("this LoRA layer is not merged; nothing to unmerge")
        self.base_layer.weight[...] = self.lora.unmerge_weights(self.weight)
        self.merged = False

    def parameters(self, trainable_only=False):
        return self.lora.parameters()

    def gradients(self):
        return self.lora.gradients()


def apply_lora_to_attention(wq, wk, wv, wo, rank=8, alpha=16.0, target_modules=None):
    """Wrap the targeted attention projections (default ``['q', 'v']``) with LoRA.

    Returns ``{'q': ..., 'k': ..., 'v': ..., 'o': ...}``: a ``LoRALinear`` for each
    target, the unchanged array for the others.
    """
    targets = ["q", "v"] if target_modules is None else list(target_modules)
    unknown = set(targets) - {"q", "k", "v", "o"}
    if unknown:
        raise ValueError(f"unknown attention target(s) {sorted(unknown)}; choose from q, k, v, o")
    weights = {"q": wq, "k": wk, "v": wv, "o": wo}
    rng = np.random.default_rng(0)
    return {key: LoRALinear(w, lora_rank=rank, lora_alpha=alpha, rng=rng) if key in targets else w
            for key, w in weights.items()}


# ----------------------------------------------------------------------- Adapters
class Adapter(Module):
    """A bottleneck adapter (Houlsby et al. 2019, §2.1): ``x + f(x W_down) W_up``.

        x ──┬──────────────────────────────────────┐
            └─ W_down (d x b) ─> f ─> W_up (b x d) ─(+)──> y

    ``W_up`` starts at zero, so the adapter starts as the identity and the adapted
    model starts exactly at the pretrained one (Houlsby et al. use a near-zero
    init for the same reason). Note the weights are ``(in, out)`` here, applied as
    ``x @ W_down``, as the course writes them.
    """

    param_names = ("W_down", "b_down", "W_up", "b_up")

    def __init__(self, d_model, bottleneck_dim=64, activation="relu", bias=False, rng=None,
                 dtype=np.float32):
        super().__init__()
        if not isinstance(bottleneck_dim, (int, np.integer)) or bottleneck_dim <= 0:
            raise ValueError(f"bottleneck_dim must be a positive integer, got {bottleneck_dim!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        rng = rng if rng is not None else np.random.default_rng(0)
        self.d_model, self.bottleneck_dim, self.activation = d_model, bottleneck_dim, activation
        bound = 1.0 / math.sqrt(d_model)
        self.W_down = rng.uniform(-bound, bound, (d_model, bottleneck_dim)).astype(dtype)
        self.W_up = np.zeros((bottleneck_dim, d_model), dtype=dtype)
        self.b_down = np.zeros(bottleneck_dim, dtype=dtype) if bias else None
        self.b_up = np.zeros(d_model, dtype=dtype) if bias else None
        self.act = ACTIVATIONS[activation]()

    def branch(self, x):
        """The adapter path without the residual: ``f(x W_down + b) W_up + b``."""
        self.x = x                                          # (..., d)
        z = x @ self.W_down                                 # (..., b)
        if self.b_down is not None:
            z = z + self.b_down
        self.a = self.act(z)                                # (..., b)
        out = self.a @ self.W_up                            # (..., d)
        return out if self.b_up is None else out + self.b_up

    def branch_backward(self, dout):
        d, b = self.d_model, self.bottleneck_dim
        if self.wants_grad("W_up"):
            self._accumulate("W_up", self.a.reshape(-1, b).T @ dout.reshape(-1, d))
        if self.wants_grad("b_up"):
            self._accumulate("b_up", dout.reshape(-1, d).sum(0))
        dz = self.act.backward(dout @ self.W_up.T)          # (..., b)
        if self.wants_grad("W_down"):
            self._accumulate("W_down", self.x.reshape(-1, d).T @ dz.reshape(-1, b))
        if self.wants_grad("b_down"):
            self._accumulate("b_down", dz.reshape(-1, b).sum(0))
        return dz @ self.W_down.T                           # (..., d)

    def forward(self, x):
        return x + self.branch(x)

    def backward(self, grad_output):
        return grad_output + self.branch_backward(grad_output)   # residual + adapter path

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    def parameters(self, trainable_only=False):
        return [p for _, p in self.own_parameters()]

    def gradients(self):
        return [getattr(self, n + "_grad", None) for n, _ in self.own_parameters()]


# ------------------------------------------------------------ Prefix and prompts
class PrefixTuning(Module):
    """Learned keys and values prepended in every attention layer (Li & Liang 2021).

    ``prefix`` has shape ``(num_layers, 2, prefix_length, num_heads, d_head)``;
    index 0 holds keys, 1 values. Every query may attend to every prefix slot:
    the prefix acts like ``prefix_length`` virtual tokens that the model can read
    but never has to produce. ``prefix_grad`` is filled by ``PeftModel.backward``
    (or by ``accumulate_layer_grad`` when used standalone with an attention layer).
    """

    param_names = ("prefix",)

    def __init__(self, num_layers, num_heads, d_head, prefix_length=10, rng=None,
                 dtype=np.float32, std=0.5):
        super().__init__()
        if not isinstance(prefix_length, (int, np.integer)) or prefix_length <= 0:
            raise ValueError(f"prefix_length must be a positive integer, got {prefix_length!r}")
        rng = rng if rng is not None else np.random.default_rng(0)
        self.num_layers, self.num_heads, self.d_head = num_layers, num_heads, d_head
        self.prefix_length = prefix_length
        shape = (num_layers, 2, prefix_length, num_heads, d_head)
        self.prefix = (rng.standard_normal(shape) * std).astype(dtype)

    def get_prefix(self, layer_idx):
        """``(prefix_k, prefix_v)``, each ``(prefix_length, num_heads, d_head)``."""
        return self.prefix[layer_idx, 0], self.prefix[layer_idx, 1]

    def accumulate_layer_grad(self, layer_idx, grad_k, grad_v):
        grad = np.zeros_like(self.prefix)
        grad[layer_idx, 0], grad[layer_idx, 1] = grad_k, grad_v
        self._accumulate("prefix", grad)

    def num_parameters(self):
        return self.prefix.size

    def parameters(self, trainable_only=False):
        return [self.prefix]


class PromptTuning(Module):
    """A soft prompt: ``prompt_length`` learned vectors prepended to the input
    embeddings (Lester et al. 2021). With ``init_from_vocab`` (the ``(vocab, d_model)``
    embedding table) the prompt starts as copies of random vocabulary rows, which
    §3 of the paper found better than random vectors.
    """

    param_names = ("prompt",)

    def __init__(self, d_model, prompt_length=20, init_from_vocab=None, rng=None,
                 dtype=np.float32, std=0.5):
        super().__init__()
        if not isinstance(prompt_length, (int, np.integer)) or prompt_length <= 0:
            raise ValueError(f"prompt_length must be a positive integer, got {prompt_length!r}")
        rng = rng if rng is not None else np.random.default_rng(0)
        self.d_model, self.prompt_length = d_model, prompt_length
        if init_from_vocab is not None:
            vocab = np.asarray(init_from_vocab)
            if vocab.ndim != 2 or vocab.shape[1] != d_model:
                raise ValueError(f"init_from_vocab must be (vocab, {d_model}), got {vocab.shape}")
            rows = rng.integers(0, vocab.shape[0], prompt_length)
            self.prompt = vocab[rows].astype(dtype, copy=True)
        else:
            self.prompt = (rng.standard_normal((prompt_length, d_model)) * std).astype(dtype)

    def forward(self, input_embeds):
        """``(batch, seq, d_model)`` -> ``(batch, prompt_length + seq, d_model)``, prompt first."""
        if input_embeds.ndim != 3 or input_embeds.shape[-1] != self.d_model:
            raise ValueError(f"input_embeds must be (batch, seq, {self.d_model}), "
                             f"got {input_embeds.shape}")
        B = input_embeds.shape[0]
        prompt = np.broadcast_to(self.prompt, (B,) + self.prompt.shape)
        return np.concatenate([prompt.astype(input_embeds.dtype), input_embeds], axis=1)

    def backward(self, grad_output):
        """Split the gradient: the prompt's part (summed over the batch) and the input's."""
        P = self.prompt_length
        if self.wants_grad("prompt"):
            self._accumulate("prompt", grad_output[:, :P].sum(0))   # (P, d)
        return grad_output[:, P:]                                   # (B, seq, d)

    def num_parameters(self):
        return self.prompt.size

    def parameters(self, trainable_only=False):
        return [self.prompt]


# --------------------------------------------------------------------------- demo
def demo():
    rng = np.random.default_rng(0)
    print("LoRA on one 512 x 512 layer, r=8, alpha=16")
    W = rng.standard_normal((512, 512)).astype(np.float32) / np.sqrt(512)
    layer = LoRALinear(W, lora_rank=8, lora_alpha=16.0)
    print(f"  A {layer.lora.A.shape}, B {layer.lora.B.shape}, scaling {layer.lora.scaling}")
    print(f"  trainable {layer.lora.num_parameters():,} of {W.size:,} "
          f"(compression {layer.lora.compression_ratio():.4f})")
    x = rng.standard_normal((4, 10, 512)).astype(np.float32)
    y = layer.forward(x)
    print(f"  forward {x.shape} -> {y.shape}; equals the frozen layer at init: "
          f"{np.array_equal(y, x @ W.T)}")
    dx = layer.backward(rng.standard_normal(y.shape).astype(np.float32))
    print(f"  backward: dx {dx.shape}, A_grad {layer.lora.A_grad.shape}, "
          f"|A_grad| = {np.abs(layer.lora.A_grad).max():.3g} (0 because B = 0), "
          f"|B_grad| = {np.abs(layer.lora.B_grad).max():.3g}")
    adapter = Adapter(512, bottleneck_dim=64)
    print(f"Adapter 512 -> 64 -> 512: {adapter.num_parameters():,} parameters, "
          f"starts as identity: {np.allclose(adapter(x), x)}")
    prompt = PromptTuning(512, prompt_length=20)
    print(f"Soft prompt: {prompt.num_parameters():,} parameters, "
          f"{x.shape} -> {prompt.forward(x).shape}")
    total = llama_parameter_count()["total"]
    print("\nTrainable parameters at 7B scale (d_model 4096, 32 layers, 32 heads), counted the")
    print(f"course's way: % of the attention weights (the first row), not of all {total:,}:")
    table = compare_peft_methods()
    for name, row in table.items():
        print(f"  {name:17s} {row['params']:>15,}  {row['ratio']:9.5%}  {row['description']}")


if __name__ == "__main__":
    demo()
