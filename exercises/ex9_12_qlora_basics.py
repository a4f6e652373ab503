# Exercise 9.12: your file to edit. Generated from solutions/ex9_12_qlora_basics.py by make_stubs.py (body sha256 29713802c073).
"""Exercise 9.12 (challenge) -- QLoRA basics: 4-bit quantization and a layer that
dequantizes on the fly.

Affine (asymmetric) 4-bit quantization maps a float range onto the 16 integers 0..15::

    scale      = (hi - lo) / 15                 the float step between two codes
    zero_point = round(-lo / scale)             the code that stands for 0.0
    q          = clip(round(x / scale + zero_point), 0, 15)
    x         ~= scale * (q - zero_point)       error at most scale / 2 per value

with ``lo = min(x.min(), 0)`` and ``hi = max(x.max(), 0)``: widening the range to
include 0 (as PyTorch's observers do) makes 0.0 exact and keeps ``zero_point`` in
0..15. A tensor whose range is empty (all zeros) gets ``scale = 1``.

QLoRA (Dettmers et al. 2023) keeps the frozen base weight *only* in 4 bits and
dequantizes it whenever it is needed; the LoRA factors stay in full precision and
are the only thing trained. Gradients flow *through* the 4-bit weight (to ``x``
and to the factors), never *into* it. (QLoRA proper uses NF4 blocks:
exercise 9.21.)

Check your work:  ``python exercises/check.py 9.12``
"""
import numpy as np

QMAX = 15


def quantize_to_4bit(tensor):
    """``tensor`` (any shape, float) -> ``(q, scale, zero_point)``.

    ``q``: uint8 array of ``tensor``'s shape with values in 0..15; ``scale``: a
    float; ``zero_point``: an int. Follow the formulas in the module docstring.
    """
    raise NotImplementedError("Exercise 9.12: range including 0, then scale, zero point, rounded and clipped codes")


def dequantize_4bit(q, scale, zero_point):
    """``scale * (q - zero_point)`` as float64. Careful: ``q`` is uint8, and uint8
    arithmetic wraps around (``np.uint8(2) - 3 == 255``) -- convert first."""
    raise NotImplementedError("Exercise 9.12: convert q to float before subtracting")


class QLoRALinear:
    """A frozen linear layer stored in 4 bits, plus a full-precision LoRA update.

    ``forward(x) = x @ W_deq.T + bias + scaling * (x @ A.T) @ B.T`` where
    ``W_deq = dequantize_4bit(qweight, scale, zero_point)`` is rebuilt on the fly.
    """

    def __init__(self, weight, bias=None, rank=8, alpha=16.0, rng=None):
        """Quantize ``weight (out, in)`` and forget it. Attributes to set:

            qweight, scale, zero_point   from ``quantize_to_4bit(weight)``
            bias                         a float copy, or None
            in_features, out_features, rank, scaling (= alpha / rank)
            A  (rank, in) uniform in +-1/sqrt(in);   B  (out, rank) zeros

        Do NOT keep ``weight`` (or any float copy of it) on ``self``: holding the
        float weight is exactly the memory QLoRA saves.
        """
        rng = rng if rng is not None else np.random.default_rng(0)
        raise NotImplementedError("Exercise 9.12: quantize the weight, keep only the codes; create the LoRA factors")

    def dequantized_weight(self):
        """The ``(out, in)`` float weight, rebuilt from the 4-bit codes."""
        raise NotImplementedError("Exercise 9.12: dequantize the stored codes")

    def forward(self, x):
        """``x (..., in)`` -> ``(..., out)``; dequantize here, do not store the result."""
        raise NotImplementedError("Exercise 9.12: dequantized frozen path (+ bias) plus the LoRA path; cache x")

    def backward(self, grad_output):
        """Set ``A_grad``, ``B_grad``; return ``dL/dx`` through both paths (the frozen
        path dequantizes again). No gradient for the 4-bit weight or the bias."""
        raise NotImplementedError("Exercise 9.12: the LoRA backward of 9.6, plus grad_output @ W_deq for the frozen path")
