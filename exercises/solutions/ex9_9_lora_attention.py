"""Exercise 9.9 (challenge) -- LoRA on multi-head attention: targets, merging, counting.

Attention has four projections, each a frozen ``(d_model, d_model)`` weight::

    q = x Wq^T    k = x Wk^T    v = x Wv^T    ->  heads  ->  y  ->  out = y Wo^T

LoRA can adapt any subset of them (``target_modules``, among ``"q", "k", "v",
"o"``; Hu et al. 2021, §7.1 found ``q`` and ``v`` together a good default for a
fixed budget). A targeted projection becomes ``x W^T + scaling * (x A^T) B^T``;
the others stay plain frozen matrix products.

Your tasks: ``__init__`` (validate the targets, create one ``A``/``B`` pair per
target), ``project``, ``forward``, ``merge`` and ``num_trainable_parameters``.
The attention itself (heads, causal mask, softmax) is given: ``causal_attention``.

Check your work:  ``python exercises/check.py 9.9``
"""
import numpy as np

TARGETS = ("q", "k", "v", "o")


def causal_attention(q, k, v, n_heads):
    """Given: ``(B, T, D)`` queries, keys, values -> ``(B, T, D)``, causal, multi-head."""
    B, T, D = q.shape
    dh = D // n_heads
    split = lambda t: t.reshape(B, T, n_heads, dh).transpose(0, 2, 1, 3)  # noqa: E731 (B, H, T, dh)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(dh)                         # (B, H, T, T)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    att = np.exp(scores - scores.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    return (att @ v).transpose(0, 2, 1, 3).reshape(B, T, D)               # (B, T, D)


class LoRAAttention:
    """Multi-head causal self-attention with LoRA on the projections in ``target_modules``."""

    def __init__(self, wq, wk, wv, wo, n_heads, rank=8, alpha=16.0, target_modules=("q", "v"),
                 rng=None):
        """Attributes to set:

            weights   ``{"q": wq, "k": wk, "v": wv, "o": wo}``, the frozen ``(D, D)`` arrays
            n_heads, rank, alpha, scaling (= alpha / rank)
            target_modules  a list, in the order given
            lora_A    ``{name: (rank, D) array}`` for each target, uniform in +-1/sqrt(D)
            lora_B    ``{name: (D, rank) zeros}`` for each target

        Raise ``ValueError`` naming the valid choices if a target is not one of
        ``q, k, v, o``.
        """
        rng = rng if rng is not None else np.random.default_rng(0)
        # BEGIN SOLUTION validate target_modules; store the weights; one (A, B) pair per target
        unknown = [t for t in target_modules if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; choose among {list(TARGETS)}")
        self.weights = {"q": wq, "k": wk, "v": wv, "o": wo}
        self.n_heads, self.rank, self.alpha = n_heads, rank, alpha
        self.scaling = alpha / rank
        self.target_modules = list(target_modules)
        D = wq.shape[1]
        bound = 1.0 / np.sqrt(D)
        self.lora_A = {t: rng.uniform(-bound, bound, (rank, D)) for t in self.target_modules}
        self.lora_B = {t: np.zeros((wq.shape[0], rank)) for t in self.target_modules}
        # END SOLUTION

    def project(self, name, x):
        """Projection ``name`` of ``x (..., D)``: ``x W^T``, plus the LoRA term if targeted."""
        # BEGIN SOLUTION frozen product, plus scaling * (x @ A.T) @ B.T for a target
        out = x @ self.weights[name].T                                      # (..., D)
        if name in self.lora_A:
            out = out + self.scaling * (x @ self.lora_A[name].T) @ self.lora_B[name].T
        return out
        # END SOLUTION

    def forward(self, x):
        """``x (B, T, D)`` -> ``(B, T, D)``: project q, k, v; attend; project with o."""
        # BEGIN SOLUTION four projections around the given causal_attention
        q, k, v = (self.project(n, x) for n in ("q", "k", "v"))            # (B, T, D) each
        return self.project("o", causal_attention(q, k, v, self.n_heads))
        # END SOLUTION

    def merge(self):
        """``{"q": ..., "k": ..., "v": ..., "o": ...}``: the weights with the updates folded in.

        Targets get a new array ``W + scaling * B @ A``; the other entries are the
        original (untouched) arrays. Nothing in ``self.weights`` is modified.
        """
        # BEGIN SOLUTION a new dict; merged arrays for the targets only
        merged = dict(self.weights)
        for t in self.target_modules:
            merged[t] = self.weights[t] + self.scaling * self.lora_B[t] @ self.lora_A[t]
        return merged
        # END SOLUTION

    def num_trainable_parameters(self):
        """Total size of all ``A`` and ``B`` arrays (``len(targets) * rank * 2D`` here)."""
        # BEGIN SOLUTION sum the sizes over the targets
        return sum(self.lora_A[t].size + self.lora_B[t].size for t in self.target_modules)
        # END SOLUTION
