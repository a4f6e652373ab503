"""LoRA, the course's way: a pure forward/backward pair, the layer, and its wrapper.

    x ──┬──────────── W (frozen, out x in) ──────────────┐
        │                                                 (+)──> h
        └─ dropout ─> A (r x in) ─> B (out x r) ─> * s ───┘

    h = W0 x + s B A x,    s = alpha / r    (Hu et al. 2021, §4.1)

``lora_forward`` / ``lora_backward`` are the maths alone (exercise 9.6 asks for
the same pair); ``LoRALayer`` owns ``A``, ``B`` and the dropout and calls them;
``LoRALinear`` wraps a frozen linear layer (an array in the course, an
``nn.Linear`` or a 4-bit ``QuantizedLinear`` inside the mini GPT).

Gradients. The course's standalone form, ``LoRALayer.forward(x, W)`` then
``backward(dout)``, *sets* ``A_grad`` and ``B_grad``, so the course's loop
(forward, backward, ``A -= lr * A_grad``, no zeroing) trains correctly. Inside
a model (``delta`` / ``delta_backward``, which ``LoRALinear`` calls) gradients
*accumulate*, as every module of the model does (``module.py``'s protocol).

Merging, and which verbs change something::

    merge_weights(W)      pure: returns W + s B A          (course API)
    unmerge_weights(W')   pure: returns W' - s B A
    LoRALinear.merge()    pure: returns (W + s B A, b)     (course API)
    merge_in_place()      changes the base layer's weight, flags the wrapper merged
    unmerge_in_place()    undoes it
"""
from __future__ import annotations

import math

import numpy as np

from nn import Dropout, Linear, Module, on_one_blas_thread
from validate import positive_int, positive_number, probability


# ----------------------------------------------------------- the maths, pure
def lora_forward(x, A, B, scaling):
    """``out = scaling * (x @ A.T) @ B.T``.

    x ``(..., in)``, A ``(r, in)``, B ``(out, r)`` -> out ``(..., out)``, cache.
    Rows are flattened so each product is one 2-D matmul, and the scaling is
    applied on the rank-``r`` side, where it costs ``N*r`` multiplications.
    """
    r, d_in = A.shape
    x2 = x.reshape(-1, d_in)                                # (N, in)
    ax = x2 @ A.T                                           # (N, r)   A x: the input at rank r
    out = (ax * scaling) @ B.T                              # (N, out)
    return out.reshape(*x.shape[:-1], B.shape[0]), (x2, ax, A, B, scaling)


def lora_backward(dout, cache, weight_grads=True):
    """Backward of ``lora_forward``: dout ``(..., out)`` -> ``(dx, dA, dB)``.

    Forward was ``ax = x A^T``, ``out = s ax B^T``; walking it back::

        dB  = s dout^T ax        (out, r)
        dax = s dout B           (N, r)
        dA  = dax^T x            (r, in)
        dx  = dax A              (..., in)

    ``dA`` and ``dB`` sum over every row (batch and sequence). With
    ``weight_grads=False`` (both factors frozen) they are ``None`` and their
    matmuls are skipped.
    """
    x2, ax, A, B, s = cache
    d2 = dout.reshape(-1, B.shape[0])                       # (N, out)
    dB = (d2.T @ ax) * s if weight_grads else None          # (out, r)
    dax = (d2 @ B) * s                                      # (N, r)
    dA = dax.T @ x2 if weight_grads else None               # (r, in)
    dx = (dax @ A).reshape(*dout.shape[:-1], A.shape[1])    # (..., in)
    return dx, dA, dB


# ------------------------------------------------------------------ the layer
class LoRALayer(Module):
    """The low-rank update ``delta(x) = scaling * B (A x)`` with ``A``, ``B`` trainable.

    ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski
    2023), so changing ``r`` does not change the size of the update and the
    learning rate can stay. ``B`` starts at zero so training starts exactly at
    the pretrained model; ``A`` is random so the gradient of ``B`` is not zero at
    step one.

    ``init_lora_weights``: ``True`` (A uniform in ±1/sqrt(in_features), as
    Hugging Face's Kaiming-uniform with a=sqrt(5)), ``"gaussian"`` (A ~ N(0, 1/r^2)),
    ``False`` (A and B both random: the output no longer starts at the base model;
    for debugging and gradient checks only).
    """

    param_names = ("A", "B")

    def __init__(self, in_features, out_features, rank=8, alpha=16.0, dropout=0.0,
                 init_lora_weights=True, use_rslora=False, rng=None, dtype=np.float32):
        super().__init__()
        positive_int(rank, "r", "LoRALayer's rank r")
        positive_number(alpha, "lora_alpha")
        probability(dropout, "lora_dropout")
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
                             f"got init_lora_weights={init_lora_weights!r}")

    # ---- inside a model: the update alone; gradients accumulate --------------
    @on_one_blas_thread                                     # rank-r products: small
    def delta(self, x):
        """``scaling * dropout(x) @ A.T @ B.T``: ``(..., in)`` -> ``(..., out)``."""
        out, self.cache = lora_forward(self.dropout(x), self.A, self.B, self.scaling)
        return out

    @on_one_blas_thread
    def delta_backward(self, dout):
        """Backward of ``delta``: adds into ``A_grad``, ``B_grad``; returns dx ``(..., in)``."""
        dx, dA, dB = lora_backward(dout, self.cache, self.wants_grad("A") or self.wants_grad("B"))
        if self.wants_grad("A"):
            self._accumulate("A", dA)
        if self.wants_grad("B"):
            self._accumulate("B", dB)
        return self.dropout.backward(dx)

    # ---- the course's standalone form: W passed in; gradients are set --------
    def forward(self, x, W):
        """``x @ W.T + scaling * (x @ A.T) @ B.T``; ``W`` is the frozen ``(out, in)`` weight."""
        self.W = W
        return x @ W.T + self.delta(x)

    def backward(self, grad_output):
        """dx through both paths; *sets* ``A_grad``, ``B_grad`` (as the course); never W's."""
        self.clear_grads()
        return grad_output @ self.W + self.delta_backward(grad_output)

    # ---- how a wrapping LoRALinear uses the update (DoRA overrides these) -----
    def adapt(self, x, base_out, layer):
        """The adapted output given the frozen layer's output: ``base_out + delta(x)``
        (added in place: ``base_out`` is a fresh array the frozen layer does not keep)."""
        base_out += self.delta(x)
        return base_out

    def adapt_backward(self, dout):
        """``(gradient for the frozen layer's output, dx through the LoRA path)``."""
        return dout, self.delta_backward(dout)

    # ---- the update as a matrix ------------------------------------------------
    def delta_weight(self):
        """The update as a dense ``(out, in)`` matrix: ``scaling * B @ A``."""
        return self.scaling * (self.B @ self.A)

    def merge_weights(self, W):
        """Pure: ``W + scaling * B @ A`` (``W`` is not changed)."""
        return W + self.delta_weight().astype(W.dtype)

    def unmerge_weights(self, W_merged, scale=None):
        """Pure: ``W_merged - scaling * B @ A`` (``scale``: DoRA's, unused by LoRA)."""
        return W_merged - self.delta_weight().astype(W_merged.dtype)

    def merge_scale(self, W):
        """What an unmerge needs besides the merged weight: nothing for LoRA (DoRA: its
        row scale)."""
        return None

    def compression_ratio(self):
        return self.num_parameters() / (self.in_features * self.out_features)


# ---------------------------------------------------------------- the wrapper
class LinearWrapper(Module):
    """What every wrapper around a frozen (possibly 4-bit) linear layer shares.

    The protocol ``PeftModel`` relies on: the wrapped layer is ``base_layer``; the
    *slot* attribute named by ``adapter_attr`` holds the active adapter's module
    or ``None``; ``disabled`` gives the base layer's output; ``merged`` says the
    update sits in the base weight. ``parameters()`` lists what trains (the
    frozen weight belongs to the base model), as the course's ``LoRALinear`` does.
    """

    adapter_attr = ""
    lists_frozen_parameters = False

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def active(self):
        return (getattr(self, self.adapter_attr) is not None and not self.disabled
                and not self.merged)

    def check_merge(self, merging: bool):
        """Can the update go into (``merging``) or out of the base weight in place? One
        question for every wrapper: the state must allow it and the base must be a float
        ``nn.Linear`` (a quantized weight cannot hold the update exactly)."""
        if merging and self.merged:
            raise ValueError(f"this {self.peft_type} layer is already merged; unmerge it first "
                             f"(merging twice would add the update twice)")
        if not merging and not self.merged:
            raise ValueError(f"this {self.peft_type} layer is not merged; nothing to unmerge")
        if not isinstance(self.base_layer, Linear):
            raise ValueError(f"cannot merge into a {type(self.base_layer).__name__} in place "
                             f"(a quantized weight cannot hold the update exactly); "
                             f"use merge_and_unload(), which returns a float model")

    def set_base_weights(self, W, b):
        """Write ``(W, b)`` into the base layer in place (``b`` None: bias unchanged)."""
        self.base_layer.weight[...] = W
        if b is not None:
            self.base_layer.bias[...] = b

    def merged_linear(self) -> Linear:
        """Pure: a new float ``nn.Linear`` computing what this wrapper computes now."""
        W, b = self.weight, self.bias
        if not self.merged:
            W, b = self.merged_weights()
        dtype = self.adapter_dtype()
        out = Linear(self.in_features, self.out_features, bias=b is not None, dtype=dtype)
        out.weight = np.array(W, dtype=dtype)
        out.bias = None if b is None else np.array(b, dtype=dtype)
        return out


class LoRALinear(LinearWrapper):
    """A frozen linear layer plus a LoRA update: ``y = x W^T + b + delta(x)``.

    ``weight`` is either the frozen ``(out, in)`` array (the course's form) or a
    base layer module (``nn.Linear``, ``quantization.QuantizedLinear``): that is
    how ``get_peft_model`` wraps the mini GPT's projections. The base layer is
    kept as ``base_layer`` (Hugging Face's name), so its parameters are named
    ``...q_proj.base_layer.weight`` and the LoRA ones ``...q_proj.lora.A``.

    ``lora`` is ``None`` when no adapter is active for this layer (several named
    adapters may share a model; ``PeftModel.set_adapter`` swaps them in; a model
    builds the wrapper empty with ``LoRALinear.around(base)``). ``disabled`` makes
    the layer behave exactly like its base (``disable_adapter``). Its ``backward``
    accumulates gradients, as the model path does.
    """

    adapter_attr = "lora"
    peft_type = "LORA"

    def __init__(self, weight, bias=None, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
                 init_lora_weights=True, use_rslora=False, rng=None):
        super().__init__()
        if isinstance(weight, Module):
            self.base_layer = weight
        else:
            weight = np.array(weight, copy=True)            # merging must not change the caller's W
            if weight.ndim != 2:
                raise ValueError(f"weight must be (out_features, in_features), got shape {weight.shape}")
            self.base_layer = Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                     dtype=weight.dtype)
            self.base_layer.weight = weight
            self.base_layer.bias = None if bias is None else np.array(bias, copy=True)
        self.base_layer.freeze()
        self.in_features = self.base_layer.in_features
        self.out_features = self.base_layer.out_features
        self.lora = None if lora_rank is None else LoRALayer(
            self.in_features, self.out_features, lora_rank, lora_alpha, lora_dropout,
            init_lora_weights, use_rslora, rng=rng, dtype=self.base_layer.weight.dtype)
        self.disabled = False
        self.merged = False

    @classmethod
    def around(cls, base_layer: Module) -> "LoRALinear":
        """The wrapper with an empty slot (no ``LoRALayer`` built, no random draws)."""
        return cls(base_layer, lora_rank=None)

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

    def merged_weights(self):
        """Pure: ``(W + scaling * B @ A, b)`` (DoRA: its rescaled weight)."""
        return self.lora.merge_weights(self.weight), self.bias

    def adapter_dtype(self):
        return self.lora.A.dtype

    def merge(self):
        """The course's merge (pure): ``(W + scaling * B @ A, bias)``; the layer is unchanged."""
        return self.merged_weights()

    def merge_in_place(self):
        """Fold the update into the base weight (zero-latency inference)."""
        self.check_merge(True)
        W = self.weight
        self._merge_scale = self.lora.merge_scale(W)        # kept by the layer that merged
        self.set_base_weights(self.lora.merge_weights(W), None)
        self.merged = True

    def unmerge_in_place(self):
        self.check_merge(False)
        self.set_base_weights(self.lora.unmerge_weights(self.weight, getattr(self, "_merge_scale", None)), None)
        self._merge_scale = None
        self.merged = False


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
