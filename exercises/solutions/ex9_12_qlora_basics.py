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
    # BEGIN SOLUTION range including 0, then scale, zero point, rounded and clipped codes
    tensor = np.asarray(tensor, dtype=np.float64)
    lo, hi = min(float(tensor.min()), 0.0), max(float(tensor.max()), 0.0)
    scale = (hi - lo) / QMAX if hi > lo else 1.0
    zero_point = int(np.clip(np.round(-lo / scale), 0, QMAX))
    q = np.clip(np.round(tensor / scale + zero_point), 0, QMAX).astype(np.uint8)
    return q, scale, zero_point
    # END SOLUTION


def dequantize_4bit(q, scale, zero_point):
    """``scale * (q - zero_point)`` as float64. Careful: ``q`` is uint8, and uint8
    arithmetic wraps around (``np.uint8(2) - 3 == 255``) -- convert first."""
    # BEGIN SOLUTION convert q to float before subtracting
    return scale * (np.asarray(q, dtype=np.float64) - zero_point)
    # END SOLUTION


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
        # BEGIN SOLUTION quantize the weight, keep only the codes; create the LoRA factors
        self.qweight, self.scale, self.zero_point = quantize_to_4bit(weight)
        self.out_features, self.in_features = np.shape(weight)
        self.bias = None if bias is None else np.array(bias, dtype=np.float64)
        self.rank, self.scaling = rank, alpha / rank
        bound = 1.0 / np.sqrt(self.in_features)
        self.A = rng.uniform(-bound, bound, (rank, self.in_features))    # (r, in)
        self.B = np.zeros((self.out_features, rank))                      # (out, r)
        # END SOLUTION

    def dequantized_weight(self):
        """The ``(out, in)`` float weight, rebuilt from the 4-bit codes."""
        # BEGIN SOLUTION dequantize the stored codes
        return dequantize_4bit(self.qweight, self.scale, self.zero_point)
        # END SOLUTION

    def forward(self, x):
        """``x (..., in)`` -> ``(..., out)``; dequantize here, do not store the result."""
        # BEGIN SOLUTION dequantized frozen path (+ bias) plus the LoRA path; cache x
        self.x = x                                                   # (..., in)
        y = x @ self.dequantized_weight().T                          # (..., out)
        if self.bias is not None:
            y = y + self.bias
        return y + self.scaling * (x @ self.A.T) @ self.B.T          # (..., out)
        # END SOLUTION

    def backward(self, grad_output):
        """Set ``A_grad``, ``B_grad``; return ``dL/dx`` through both paths (the frozen
        path dequantizes again). No gradient for the 4-bit weight or the bias."""
        # BEGIN SOLUTION the LoRA backward of 9.6, plus grad_output @ W_deq for the frozen path
        x, r = self.x, self.rank
        h = x @ self.A.T                                             # (..., r)
        self.B_grad = self.scaling * grad_output.reshape(-1, self.out_features).T @ h.reshape(-1, r)
        dh = self.scaling * grad_output @ self.B                     # (..., r)
        self.A_grad = dh.reshape(-1, r).T @ x.reshape(-1, self.in_features)
        return grad_output @ self.dequantized_weight() + dh @ self.A  # (..., in)
        # END SOLUTION
