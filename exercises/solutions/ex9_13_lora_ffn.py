"""Exercise 9.13 (suggested) -- LoRA on the feed-forward layers.

The transformer's MLP is ``fc1 -> GELU -> fc2`` with ``fc1: (4D, D)`` and
``fc2: (D, 4D)``: two thirds of a block's weights live here, and adapting them
often helps more than adapting attention alone (QLoRA §4 applies LoRA to every
linear layer). Here both projections are frozen and each targeted one gets a
LoRA update::

    x (..., D) ── fc1 (+ LoRA) ──> h (..., 4D) ── GELU ──> a ── fc2 (+ LoRA) ──> y (..., D)

Notice the factors are *not square*: for ``fc1``, ``A`` is ``(r, D)`` and ``B``
``(4D, r)``; for ``fc2``, ``A`` is ``(r, 4D)`` and ``B`` ``(D, r)``.

Your tasks: ``__init__``, ``forward``, ``backward`` (gradients of every ``A``
and ``B``, and ``dL/dx``), ``merge`` and ``num_trainable_parameters``. GELU and
its derivative are given.

Check your work:  ``python exercises/check.py 9.13``
"""
import numpy as np

_C = np.sqrt(2 / np.pi)


def gelu(z):
    """Given: GELU, tanh form (as GPT-2 and the library)."""
    return 0.5 * z * (1.0 + np.tanh(_C * (z + 0.044715 * z * z * z)))


def gelu_grad(z):
    """Given: d gelu / dz."""
    t = np.tanh(_C * (z + 0.044715 * z * z * z))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _C * (1.0 + 3 * 0.044715 * z * z)


class LoRAMLP:
    """``y = fc2(gelu(fc1(x)))`` with frozen weights and LoRA on ``target_modules``."""

    def __init__(self, fc1_weight, fc1_bias, fc2_weight, fc2_bias, rank=8, alpha=16.0,
                 target_modules=("fc1", "fc2"), rng=None):
        """Attributes to set:

            weights   ``{"fc1": (W, b), "fc2": (W, b)}``, frozen (never modified)
            rank, scaling (= alpha / rank), target_modules (a list)
            lora_A    ``{name: (rank, in_features)}`` uniform in +-1/sqrt(in_features)
            lora_B    ``{name: (out_features, rank)}`` zeros
        for each name in ``target_modules`` (``ValueError`` for a name other than
        ``"fc1"`` / ``"fc2"``).
        """
        rng = rng if rng is not None else np.random.default_rng(0)
        # BEGIN SOLUTION validate the targets; store the frozen weights; one (A, B) per target
        unknown = [t for t in target_modules if t not in ("fc1", "fc2")]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; choose among ['fc1', 'fc2']")
        self.weights = {"fc1": (fc1_weight, fc1_bias), "fc2": (fc2_weight, fc2_bias)}
        self.rank, self.scaling = rank, alpha / rank
        self.target_modules = list(target_modules)
        self.lora_A, self.lora_B = {}, {}
        for name in self.target_modules:
            d_out, d_in = self.weights[name][0].shape
            bound = 1.0 / np.sqrt(d_in)
            self.lora_A[name] = rng.uniform(-bound, bound, (rank, d_in))   # (r, in)
            self.lora_B[name] = np.zeros((d_out, rank))                     # (out, r)
        # END SOLUTION

    def _linear(self, name, x):
        """One projection with its LoRA update (a helper you may use)."""
        W, b = self.weights[name]
        out = x @ W.T + b
        if name in self.lora_A:
            out = out + self.scaling * (x @ self.lora_A[name].T) @ self.lora_B[name].T
        return out

    def forward(self, x):
        """``x (..., D)`` -> ``(..., D)``. Cache what backward needs."""
        # BEGIN SOLUTION fc1 (with LoRA), GELU, fc2 (with LoRA); cache x, h and a
        self.x = x                                          # (..., D)
        self.h = self._linear("fc1", x)                     # (..., 4D)
        self.a = gelu(self.h)                               # (..., 4D)
        return self._linear("fc2", self.a)                  # (..., D)
        # END SOLUTION

    def _linear_backward(self, name, x, dout):
        """dL/d(input) of one projection; stores its LoRA gradients if targeted."""
        # BEGIN SOLUTION frozen path dout @ W, plus the LoRA backward of exercise 9.6 if targeted
        W, _ = self.weights[name]
        dx = dout @ W                                       # (..., in)
        if name in self.lora_A:
            A, B, r = self.lora_A[name], self.lora_B[name], self.rank
            h = x @ A.T                                     # (..., r)
            self.lora_B_grad[name] = self.scaling * dout.reshape(-1, B.shape[0]).T @ h.reshape(-1, r)
            dh = self.scaling * dout @ B                    # (..., r)
            self.lora_A_grad[name] = dh.reshape(-1, r).T @ x.reshape(-1, A.shape[1])
            dx = dx + dh @ A
        return dx
        # END SOLUTION

    def backward(self, grad_output):
        """Set ``self.lora_A_grad`` and ``self.lora_B_grad`` (dicts keyed like
        ``lora_A``) and return ``dL/dx (..., D)``. Walk the forward in reverse."""
        self.lora_A_grad, self.lora_B_grad = {}, {}
        # BEGIN SOLUTION fc2 backward, GELU backward (gelu_grad at h), fc1 backward
        da = self._linear_backward("fc2", self.a, grad_output)      # (..., 4D)
        dh = da * gelu_grad(self.h)                                 # (..., 4D)
        return self._linear_backward("fc1", self.x, dh)             # (..., D)
        # END SOLUTION

    def merge(self):
        """``{"fc1": (W', b), "fc2": (W', b)}`` with ``W' = W + scaling * B @ A`` for
        targets (new arrays) and the original ``W`` otherwise."""
        # BEGIN SOLUTION fold each target's update into a new weight; biases unchanged
        merged = {}
        for name, (W, b) in self.weights.items():
            if name in self.lora_A:
                W = W + self.scaling * self.lora_B[name] @ self.lora_A[name]
            merged[name] = (W, b)
        return merged
        # END SOLUTION

    def num_trainable_parameters(self):
        """Total size of the ``A`` and ``B`` arrays: ``r * (D + 4D)`` per target here."""
        # BEGIN SOLUTION sum over the targets
        return sum(self.lora_A[n].size + self.lora_B[n].size for n in self.target_modules)
        # END SOLUTION
