"""Exercise 9.21 (ours) -- NF4: blockwise 4-bit NormalFloat quantization.

QLoRA stores frozen weights in NF4 (Dettmers et al. 2023, §3)::

    weight (out, in) ─ flatten (row-major) ─> blocks of `blocksize` values
      ─ divide each block by its absmax ─> values in [-1, 1]
      ─ nearest of the 16 NF4 levels ─> 4-bit codes 0..15 ─ two per byte ─> packed uint8
    dequantize:  w ~= NF4_CODEBOOK[code] * absmax[block]

Why it beats the uniform 4-bit grid of exercise 9.12 on weights: the 16 levels sit
at quantiles of a normal distribution, where pretrained weights actually are,
and one scale per small block keeps an outlier from flattening every other
weight of the tensor.

The nearest level: the boundaries between levels are the 15 midpoints
``(NF4_CODEBOOK[i] + NF4_CODEBOOK[i+1]) / 2``; ``np.searchsorted(midpoints, value)``
gives the index of the nearest level (a value exactly on a midpoint goes down).

Storage: 4 bits per weight plus one fp32 absmax per block (``32 / blocksize``
bits per weight). With double quantization (§3) the absmax values are themselves
stored as int8 with one fp32 scale per ``dq_blocksize`` of them:
``8 / blocksize + 32 / (blocksize * dq_blocksize)`` bits per weight.

Your tasks: ``nf4_quantize``, ``nf4_dequantize``, ``pack_4bit``, ``unpack_4bit``,
``nf4_bits_per_parameter``. The codebook is the library's.

Check your work:  ``python exercises/check.py 9.21``
"""
import sys
from pathlib import Path

import numpy as np

for _parent in Path(__file__).resolve().parents:      # the library: code/stage-09 of the repository
    if (_parent / "code" / "stage-09").is_dir():
        sys.path.insert(0, str(_parent / "code" / "stage-09"))
        break
from nf4 import NF4_CODEBOOK  # noqa: E402  (16 ascending levels in [-1, 1], 0 exactly included)


def nf4_quantize(weight, blocksize=64):
    """``weight`` (any shape) -> ``(codes uint8 (numel,), absmax float32 (numel // blocksize,))``.

    Raise ``ValueError`` if ``blocksize`` does not divide ``weight.size``. An
    all-zero block has absmax 0: divide it by 1 instead (its codes point at level 0.0).
    """
    # BEGIN SOLUTION flatten into (n_blocks, blocksize), absmax per block, normalise, nearest level
    weight = np.asarray(weight, dtype=np.float32)
    if weight.size % blocksize:
        raise ValueError(f"blocksize {blocksize} does not divide the {weight.size} elements")
    blocks = weight.reshape(-1, blocksize)                          # (nb, bs)
    absmax = np.abs(blocks).max(axis=1)                             # (nb,)
    normed = blocks / np.where(absmax > 0, absmax, 1.0)[:, None]    # (nb, bs) in [-1, 1]
    midpoints = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2          # (15,)
    codes = np.searchsorted(midpoints, normed)                      # (nb, bs) in 0..15
    return codes.reshape(-1).astype(np.uint8), absmax.astype(np.float32)
    # END SOLUTION


def nf4_dequantize(codes, absmax, shape, blocksize=64):
    """Inverse of ``nf4_quantize``: float32 array of ``shape``."""
    # BEGIN SOLUTION look the codes up in the codebook, scale each block by its absmax
    values = NF4_CODEBOOK[np.asarray(codes).reshape(-1, blocksize)]  # (nb, bs)
    return (values * np.asarray(absmax, dtype=np.float32)[:, None]).reshape(shape)
    # END SOLUTION


def pack_4bit(codes):
    """``codes (n,)`` in 0..15 -> ``uint8 (ceil(n / 2),)``: code ``2i`` in the high nibble
    of byte ``i``, code ``2i+1`` in the low nibble; an odd ``n`` is padded with a 0."""
    # BEGIN SOLUTION pad to even length, then high << 4 | low
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    return (codes[0::2] << 4) | codes[1::2]
    # END SOLUTION


def unpack_4bit(packed, n):
    """Inverse of ``pack_4bit``: the first ``n`` codes, ``uint8 (n,)``."""
    # BEGIN SOLUTION split each byte into its high and low nibble, interleave, cut to n
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.empty(2 * packed.size, dtype=np.uint8)
    codes[0::2], codes[1::2] = packed >> 4, packed & 0x0F
    return codes[:n]
    # END SOLUTION


def nf4_bits_per_parameter(blocksize=64, double_quant=False, dq_blocksize=256):
    """Storage per weight in bits (large tensors: ignore the single fp32 mean of
    double quantization): ``4 + 32 / blocksize``, or with double quantization
    ``4 + 8 / blocksize + 32 / (blocksize * dq_blocksize)``."""
    # BEGIN SOLUTION the code bits plus the per-block constant's share
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * dq_blocksize)
    return 4 + 32 / blocksize
    # END SOLUTION
