"""Quantization for QLoRA: affine int-k, absmax int8, NF4, and the quantized frozen linear.

Three ways to store a float weight in k bits, simplest first:

* **Affine (asymmetric)**, any width 2..8 bits -- the course's formulas::

      scale = (max - min) / (2^bits - 1)        zero_point = round(-min / scale)
      q     = clip(round(x / scale + zero_point), 0, 2^bits - 1)
      x    ~= scale * (q - zero_point)          (error <= scale / 2 per element)

  per tensor (``axis=None``) or per channel (``axis=0``: one scale per output row).
* **Absmax (symmetric)**: ``q = round(x / absmax * (2^(bits-1) - 1))``, no zero point.
* **NF4** (``nf4.py``): 16 levels at normal quantiles, blockwise absmax, double
  quantization of the block constants, two codes per byte (QLoRA §3).

``QuantizedLinear`` is a frozen linear layer whose weight exists only as NF4 and
is dequantized on the fly, in forward and again in backward, to the compute
dtype. LoRA then wraps it exactly as it wraps a float ``Linear``: gradients flow
*through* the 4-bit weight to the input (and to the adapters), never *into* it.

Paged optimizers (QLoRA §3, the third ingredient) are deliberately absent. On a
GPU, bitsandbytes allocates the optimizer states in CUDA unified memory, so when
a long sequence with gradient checkpointing spikes GPU memory, those pages are
evicted to CPU RAM and brought back when the optimizer step touches them --
training slows down for a moment instead of dying out of memory. That needs two
memories, one small and fast and one large. Here NumPy arrays already live in
CPU RAM, the only memory there is, so there is nothing to page to; an imitation
would be a copy that changes nothing measurable, and we do not fake it.
"""
from __future__ import annotations

import numpy as np

from nf4 import (NF4_CODEBOOK, NF4Tensor, check_blocksize, create_normal_map,  # noqa: F401
                 normal_ppf, pack_4bit, quantize_nf4, require_finite, unpack_4bit)
from nn import Linear, Module, set_submodule
from targets import find_targets

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


# ---- affine and absmax quantization -------------------------------------------
def _check_bits(bits) -> int:
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return int(bits)


def _prepare(tensor, axis):
    """Float array (finite) and the axes to reduce over (all but ``axis``)."""
    tensor = np.asarray(tensor)
    if tensor.size == 0:
        raise ValueError("cannot quantize an empty tensor")
    tensor = tensor.astype(np.result_type(tensor.dtype, np.float32), copy=False)
    require_finite("tensor", tensor)
    if axis is None:
        return tensor, None
    if not -tensor.ndim <= axis < tensor.ndim:
        raise ValueError(f"axis={axis} out of range for a tensor of shape {tensor.shape}")
    return tensor, tuple(i for i in range(tensor.ndim) if i != axis % tensor.ndim)


def quantize_tensor(tensor, bits: int = 8, axis=None):
    """Affine quantization -> ``(quantized uint8, scale, zero_point int32)``; the scale
    has the input's float dtype (at least float32).

    ``axis=None``: one scale for the tensor (0-d arrays). ``axis=0``: one per
    output row, kept as shape ``(out, 1)`` so that ``scale * (q - zero_point)``
    broadcasts. The range is widened to include 0 (as PyTorch's observers do):
    zero is then exact and ``zero_point`` always lies in ``[0, 2^bits - 1]``,
    whereas with an all-positive tensor the clipped zero point of the plain
    formula would clip every value. A constant-zero range gets ``scale = 1``.
    """
    qmax = 2 ** _check_bits(bits) - 1
    x, reduce = _prepare(tensor, axis)
    lo = np.minimum(x.min(axis=reduce, keepdims=reduce is not None), 0)
    hi = np.maximum(x.max(axis=reduce, keepdims=reduce is not None), 0)
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0)                    # () or (out, 1, ...)
    zero_point = np.clip(np.round(-lo / scale), 0, qmax)
    q = np.clip(np.round(x / scale + zero_point), 0, qmax)              # x.shape
    return q.astype(np.uint8), scale.astype(x.dtype), zero_point.astype(np.int32)


def dequantize_tensor(quantized, scale, zero_point) -> np.ndarray:
    """``scale * (quantized - zero_point)``, in the scale's float dtype (at least float32)."""
    scale = np.asarray(scale)
    dtype = np.result_type(scale.dtype, np.float32)
    q = np.asarray(quantized).astype(dtype)
    return scale.astype(dtype) * (q - np.asarray(zero_point).astype(dtype))


def quantize_absmax(tensor, bits: int = 8, axis=None):
    """Symmetric quantization -> ``(q int8 in [-(2^(bits-1)-1), 2^(bits-1)-1], scale fp32)``.

    ``scale = absmax / (2^(bits-1) - 1)``; no zero point, so 0 is exact and the
    grid is the same on both sides. An all-zero tensor (or row) gets ``scale = 1``.
    """
    qmax = 2 ** (_check_bits(bits) - 1) - 1
    x, reduce = _prepare(tensor, axis)
    absmax = np.abs(x).max(axis=reduce, keepdims=reduce is not None)
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    q = np.clip(np.round(x / scale), -qmax, qmax)
    return q.astype(np.int8), scale.astype(x.dtype)


def dequantize_absmax(quantized, scale) -> np.ndarray:
    """``quantized * scale``, in the scale's float dtype (at least float32)."""
    scale = np.asarray(scale)
    dtype = np.result_type(scale.dtype, np.float32)
    return np.asarray(quantized).astype(dtype) * scale.astype(dtype)


def quantize_to_4bit(tensor, axis=None):
    """Exercise 9.12: 4-bit affine quantization, codes 0..15 (one code per uint8 here;
    :func:`pack_4bit` fits two per byte)."""
    return quantize_tensor(tensor, bits=4, axis=axis)


def dequantize_4bit(quantized, scale, zero_point) -> np.ndarray:
    """Exercise 9.12: inverse of :func:`quantize_to_4bit`."""
    return dequantize_tensor(quantized, scale, zero_point)


def blockwise_absmax_roundtrip(weight, bits: int = 4, blocksize: int = 64) -> np.ndarray:
    """Uniform symmetric int-``bits`` over blocks, quantized and dequantized at once:
    the baseline NF4 is compared against (same blocks, same one scale per block)."""
    flat = np.asarray(weight, dtype=np.float32).reshape(-1)
    check_blocksize(blocksize, flat.size)
    blocks = flat.reshape(-1, blocksize)                                # (nb, bs)
    q, scale = quantize_absmax(blocks, bits=bits, axis=0)               # scale (nb, 1)
    return dequantize_absmax(q, scale).reshape(np.shape(weight))


# ---- the quantized frozen linear ------------------------------------------------
class QuantizedLinear(Module):
    """A frozen ``Linear`` whose weight is stored as NF4 (QLoRA §3).

    ``forward(x) = x @ W.T + b`` with ``W = quant_state.dequantize(compute_dtype)``
    built on the fly; ``backward(dout)`` dequantizes again and returns
    ``dout @ W``. There is no weight parameter, so no weight gradient is ever
    computed -- the ``d2.T @ x2`` matmul a float frozen ``Linear`` skips simply
    does not exist here. Only ``bias`` is a parameter (frozen by default; it can
    be unfrozen, e.g. for BitFit on a quantized base).

    It has a ``Linear``'s surface (``forward``, ``backward``, ``in_features``,
    ``out_features``, ``weight``, ``bias``), so a LoRA wrapper takes it as its base
    layer unchanged. It is deliberately *not* a ``Linear`` subclass: code that
    writes into ``layer.weight`` of a ``Linear`` (merging, optimizers) must not be
    fooled. ``weight`` returns a fresh, read-only dequantized array, so such a
    write fails loudly instead of vanishing; assign a new ``quant_state`` instead.
    """

    param_names = ("bias",)

    def __init__(self, quant_state: NF4Tensor, bias=None, compute_dtype=np.float32):
        super().__init__()
        if not isinstance(quant_state, NF4Tensor) or len(quant_state.shape) != 2:
            raise ValueError(f"QuantizedLinear needs a 2-D NF4Tensor (out, in), got {quant_state!r}")
        self.out_features, self.in_features = quant_state.shape
        self._quant_state = quant_state
        self.compute_dtype = np.dtype(compute_dtype)
        if bias is not None:
            bias = np.array(bias, dtype=self.compute_dtype)
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias shape {bias.shape} must be ({self.out_features},)")
        self.bias = bias
        self.requires_grad_(False)                          # the base model is frozen

    @classmethod
    def from_linear(cls, linear: Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype=None) -> "QuantizedLinear":
        """Quantize a float ``Linear``; ``compute_dtype=None`` keeps its weight dtype."""
        if not isinstance(linear, Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        dtype = linear.weight.dtype if compute_dtype is None else compute_dtype
        state = quantize_nf4(linear.weight, blocksize=blocksize, double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.copy()
        return cls(state, bias=bias, compute_dtype=dtype)

    @property
    def quant_state(self) -> NF4Tensor:
        return self._quant_state

    @quant_state.setter
    def quant_state(self, state: NF4Tensor) -> None:
        expected = (self.out_features, self.in_features)
        if not isinstance(state, NF4Tensor):
            raise ValueError(f"quant_state must be an NF4Tensor, got {type(state).__name__}")
        if tuple(state.shape) != expected:
            raise ValueError(f"quantized weight has shape {tuple(state.shape)}, but this layer "
                             f"is (out_features, in_features) = {expected}")
        self._quant_state = state

    @property
    def weight(self) -> np.ndarray:
        """The dequantized ``(out, in)`` weight in the compute dtype (fresh, read-only)."""
        w = self._quant_state.dequantize(self.compute_dtype)
        w.setflags(write=False)
        return w

    @property
    def nbytes_weight(self) -> int:
        return self._quant_state.nbytes

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        x = x.astype(self.compute_dtype, copy=False)        # bnb's compute dtype
        return Linear.forward(self, x)      # one 2-D matmul, W dequantized now; bias in place

    def backward(self, dout):
        return Linear.backward(self, dout)  # dx = dout @ W (dequantized again), bias grad if trained

    def wants_grad(self, name: str) -> bool:
        return name != "weight" and super().wants_grad(name)   # packed: never a weight gradient

    def __repr__(self) -> str:
        return (f"QuantizedLinear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._quant_state!r})")


def quantize_model(model, quant_type: str = "nf4", target_modules=None, blocksize: int = 64,
                   double_quant: bool = True):
    """Replace the targeted ``Linear`` modules by ``QuantizedLinear`` in place, freeze
    the whole model and return it -- the state a QLoRA run starts from (like loading
    with ``BitsAndBytesConfig(load_in_4bit=True)`` and then
    ``prepare_model_for_kbit_training``). Default targets: every linear of the
    blocks. The tied embedding / LM head stays in float, as in QLoRA.
    """
    if quant_type != "nf4":
        raise ValueError(f"quant_type must be 'nf4' (the only 4-bit type here), got {quant_type!r}")
    if not isinstance(double_quant, (bool, np.bool_)):
        raise ValueError(f"double_quant must be True or False, got {double_quant!r}")
    targets = DEFAULT_TARGET_MODULES if target_modules is None else target_modules
    # All or nothing: quantize every target first (a NaN, a bad blocksize raise here,
    # naming the layer), and only then swap them in, so a failure changes nothing.
    replacements = {}
    for name in find_targets(model, targets, layer_types=(Linear, QuantizedLinear)):
        module = model.get_submodule(name)
        if isinstance(module, QuantizedLinear):             # quantizing twice is a no-op
            continue
        try:
            replacements[name] = QuantizedLinear.from_linear(
                module, blocksize=blocksize, double_quant=double_quant)
        except ValueError as err:
            raise ValueError(f"cannot quantize {name} (nothing was quantized): {err}") from None
    for name, layer in replacements.items():
        set_submodule(model, name, layer)
    return model.freeze()


def quantized_nbytes(model) -> dict:
    """Stored bytes of the quantized weights vs the float32 bytes they replace.

    Returns ``{"num_quantized", "numel", "quantized_bytes", "float32_bytes", "ratio",
    "bits_per_parameter"}``. Biases stay in float and are not counted.
    """
    layers = [m for _, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    numel = sum(m.quant_state.numel for m in layers)
    stored = sum(m.nbytes_weight for m in layers)
    return {"num_quantized": len(layers), "numel": numel, "quantized_bytes": stored,
            "float32_bytes": 4 * numel, "ratio": stored / (4 * numel) if numel else 0.0,
            "bits_per_parameter": 8 * stored / numel if numel else 0.0}
