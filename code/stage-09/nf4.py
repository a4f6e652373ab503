"""NF4: the 4-bit NormalFloat data type of QLoRA, with double quantization and packing.

QLoRA (Dettmers et al. 2023, §3) stores a frozen weight in 4 bits per value::

    weight (out, in) --flatten--> blocks of 64 --/ absmax per block--> values in [-1, 1]
        --nearest of 16 NF4 levels--> 4-bit codes --two per byte--> packed uint8

and dequantizes on the fly: ``w ~= NF4_CODEBOOK[code] * absmax[block]``.

Why these 16 levels: pretrained weights are close to normally distributed, so
levels placed at quantiles of N(0, 1) give every level about the same number of
weights -- the information-theoretically best use of 16 values for that
distribution (§3 "4-bit NormalFloat Quantization"). The type is asymmetric so that
zero is exactly representable: 8 positive levels, 7 negative, and 0.

Double quantization (§3 "Double Quantization") then shrinks the per-block fp32
absmax constants -- 32/64 = 0.5 extra bits per weight -- by quantizing them again to
8 bits in blocks of 256, after subtracting their mean (they are all positive, so
centring them uses the signed 8-bit range fully). Cost per weight drops to
``8/64 + 32/(64*256) ~= 0.127`` bits, so about 4.127 bits in total instead of 4.5.

This file depends on NumPy and ``math`` only: the normal quantile function is
computed here, not taken from SciPy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from validate import positive_int


def require_finite(name: str, array: np.ndarray) -> None:
    """Raise ``ValueError`` if ``array`` holds a NaN or an infinity (it would poison
    every scale computed from it, and with it every other value of its block)."""
    bad = ~np.isfinite(array)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} must be finite: found {array[idx]} at index {idx}")


# ---- the normal quantile function -------------------------------------------
def normal_cdf(x: float) -> float:
    """``Phi(x) = P(Z <= x)`` for ``Z ~ N(0, 1)``, via ``erfc`` (accurate in both tails)."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def normal_ppf(p: float) -> float:
    """Inverse of :func:`normal_cdf` (the quantile function), to ~1e-15.

    Newton's method on ``Phi(x) - p`` from ``x = 0``. For ``p > 1/2`` the root is
    positive, where ``Phi`` is concave: every tangent lies above the curve, so each
    Newton step lands at or left of the root and the iterates climb to it without
    overshooting, then converge quadratically. ``p < 1/2`` uses the symmetry
    ``ppf(p) = -ppf(1 - p)``.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"normal_ppf needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -normal_ppf(1.0 - p)
    x = 0.0
    for _ in range(100):
        pdf = math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        step = (normal_cdf(x) - p) / pdf
        x -= step
        if abs(step) < 1e-15 * max(1.0, abs(x)):
            break
    return x


# ---- the codebook --------------------------------------------------------------
#: bitsandbytes' outermost probability. ``ppf(1)`` is infinite, so the largest level
#: sits at this quantile instead; numerically it is ``1 - (1/32 + 1/30) / 2``
#: rounded to seven decimals.
NF4_OFFSET = 0.9677083


def create_normal_map(offset: float = NF4_OFFSET) -> np.ndarray:
    """The 16 NF4 levels, ascending, normalised to ``[-1, 1]``.

    Follows bitsandbytes' ``create_normal_map`` (QLoRA §3 and its appendix):
    8 positive quantiles at probabilities evenly spaced from ``offset`` down to
    (but excluding) 1/2, 7 negative ones mirrored from a 7-step spacing, and an
    exact 0; then everything is divided by the largest value.
    """
    pos = [normal_ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]     # 8 levels > 0
    neg = [-normal_ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]    # 7 levels < 0
    levels = np.sort(np.array(pos + [0.0] + neg))                       # (16,)
    return (levels / levels.max()).astype(np.float32)


NF4_CODEBOOK = create_normal_map()
NF4_CODEBOOK.setflags(write=False)
#: decision boundaries: a value goes to the level whose midpoint interval holds it
_NF4_MIDPOINTS = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2                # (15,)


# ---- 4-bit packing ---------------------------------------------------------------
def pack_4bit(codes) -> np.ndarray:
    """Two 4-bit codes per byte: ``codes (n,)`` in 0..15 -> ``uint8 (ceil(n/2),)``.

    Element ``2i`` goes to the high nibble of byte ``i`` and ``2i+1`` to the low
    nibble (bitsandbytes' order); an odd length is padded with one zero nibble.
    """
    codes = np.asarray(codes).reshape(-1)
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"4-bit codes must be integers, got dtype {codes.dtype}")
    out_of_range = codes[(codes < 0) | (codes > 15)]
    if out_of_range.size:
        raise ValueError(f"4-bit codes must be in 0..15, got {out_of_range[0]}")
    codes = codes.astype(np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    return (codes[0::2] << 4) | codes[1::2]                 # (ceil(n/2),) uint8


def unpack_4bit(packed, n: int) -> np.ndarray:
    """Inverse of :func:`pack_4bit`: the first ``n`` codes as ``uint8 (n,)``."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if not 2 * packed.size - 1 <= n <= 2 * packed.size:
        raise ValueError(f"{packed.size} packed bytes hold {2 * packed.size - 1} or "
                         f"{2 * packed.size} codes, not n={n}")
    codes = np.empty(2 * packed.size, dtype=np.uint8)
    codes[0::2] = packed >> 4                               # high nibbles
    codes[1::2] = packed & 0x0F                             # low nibbles
    return codes[:n]


# ---- double quantization of the block constants -------------------------------
def _quantize_constants(absmax: np.ndarray, blocksize: int = 256):
    """Second-level quantization (QLoRA §3): fp32 constants -> int8 codes.

    Subtract the mean, then symmetric absmax int8 in blocks of ``blocksize``
    (the last block may be shorter). Returns ``(codes int8 (n,), scale fp32
    (ceil(n/blocksize),), mean fp32 ())``. bitsandbytes uses a non-uniform 8-bit
    map here; uniform int8 is a simplification with the same storage cost.
    """
    mean = np.float32(absmax.mean())
    centred = (absmax - mean).astype(np.float32)            # (n,)
    n_blocks = -(-centred.size // blocksize)
    padded = np.zeros(n_blocks * blocksize, dtype=np.float32)
    padded[:centred.size] = centred
    blocks = padded.reshape(n_blocks, blocksize)            # (n2, 256)
    scale = np.abs(blocks).max(axis=1) / 127                # (n2,)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.round(blocks / scale[:, None]), -127, 127).astype(np.int8)
    return codes.reshape(-1)[:centred.size], scale, np.array(mean, dtype=np.float32)


def _dequantize_constants(codes, scale, mean, blocksize: int = 256) -> np.ndarray:
    """Inverse of :func:`_quantize_constants`: fp32 constants ``(n,)``."""
    block = np.arange(codes.size) // blocksize              # (n,) which scale
    return (codes.astype(np.float32) * scale[block] + mean).astype(np.float32)


# ---- the NF4 tensor -----------------------------------------------------------
@dataclass(frozen=True, eq=False)
class NF4Tensor:
    """A weight stored in NF4. Holds only what would be on the device.

    ``packed``: uint8 ``(numel/2,)``; ``absmax``: fp32 ``(n_blocks,)`` without double
    quantization, else ``None`` and the constants live in ``absmax_codes`` (int8
    ``(n_blocks,)``), ``absmax_scale`` (fp32 per 256 constants) and ``absmax_mean``
    (one fp32). All arrays are read-only: a frozen base weight never changes.
    """

    packed: np.ndarray
    shape: tuple
    blocksize: int
    absmax: np.ndarray | None = None
    absmax_codes: np.ndarray | None = None
    absmax_scale: np.ndarray | None = None
    absmax_mean: np.ndarray | None = None
    dq_blocksize: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def stored_arrays(self) -> dict:
        names = ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_mean")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def nbytes(self) -> int:
        """Real stored bytes: the sum of ``.nbytes`` of the stored arrays."""
        return sum(a.nbytes for a in self.stored_arrays().values())

    def bits_per_parameter(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def block_absmax(self) -> np.ndarray:
        """The per-block scales ``(n_blocks,)`` fp32 (decoded if double-quantized)."""
        if not self.double_quant:
            return self.absmax
        return _dequantize_constants(self.absmax_codes, self.absmax_scale,
                                     self.absmax_mean, self.dq_blocksize)

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """``codebook[code] * absmax[block]``, reshaped to ``shape``, in ``dtype``."""
        codes = unpack_4bit(self.packed, self.numel).reshape(-1, self.blocksize)  # (nb, bs)
        scale = self.block_absmax().astype(dtype)[:, None]                        # (nb, 1)
        values = NF4_CODEBOOK.astype(dtype)[codes] * scale                        # (nb, bs)
        return values.reshape(self.shape)

    def __repr__(self) -> str:
        return (f"NF4Tensor(shape={self.shape}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, nbytes={self.nbytes}, "
                f"bits/param={self.bits_per_parameter():.3f})")


def check_blocksize(blocksize, numel: int) -> None:
    positive_int(blocksize, "blocksize")
    if numel % blocksize:
        raise ValueError(f"blocksize={blocksize} does not divide the weight's {numel} "
                         f"elements; choose a divisor (64 divides every d_model here)")


def quantize_nf4(weight, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Blockwise NF4 quantization of ``weight`` (any shape, flattened row-major).

    Each block of ``blocksize`` consecutive values is divided by its absmax (so the
    block spans ``[-1, 1]``, like the codebook) and each value is mapped to the
    nearest level: ``searchsorted`` on the 15 midpoints between levels.
    """
    weight = np.asarray(weight)
    if weight.size == 0:
        raise ValueError(f"cannot quantize an empty weight (shape {weight.shape})")
    if weight.dtype == bool or not np.issubdtype(weight.dtype, np.number) \
            or np.issubdtype(weight.dtype, np.complexfloating):
        raise ValueError(f"weight must hold real numbers, got dtype {weight.dtype}")
    if not isinstance(double_quant, (bool, np.bool_)):
        raise ValueError(f"double_quant must be True or False, got {double_quant!r}")
    require_finite("weight", weight)
    check_blocksize(blocksize, weight.size)
    blocks = weight.astype(np.float32).reshape(-1, blocksize)           # (nb, bs)
    absmax = np.abs(blocks).max(axis=1)                                 # (nb,)
    safe = np.where(absmax > 0, absmax, 1.0)                            # all-zero block
    normed = blocks / safe[:, None]                                     # (nb, bs) in [-1, 1]
    codes = np.searchsorted(_NF4_MIDPOINTS, normed)                     # (nb, bs) in 0..15
    packed = pack_4bit(codes.reshape(-1))                               # (numel/2,) uint8
    state = dict(packed=packed, shape=tuple(weight.shape), blocksize=int(blocksize))
    if double_quant:
        codes8, scale, mean = _quantize_constants(absmax.astype(np.float32))
        state.update(absmax_codes=codes8, absmax_scale=scale, absmax_mean=mean)
    else:
        state.update(absmax=absmax.astype(np.float32))
    for name in ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_mean"):
        if state.get(name) is not None:
            state[name].setflags(write=False)
    return NF4Tensor(**state)
