"""A frozen embedding table stored in NF4: the last big float array of a QLoRA base.

QLoRA quantizes the linear layers (``quantization.quantize_model``); the token
embedding stays in 16 bits there, and on GPT-2 small it is 31 % of the weights
(50,257 x 768 of 124 M). Stored as NF4 too, the whole base takes about 4.1 bits per
parameter instead of 32. What changes:

* a lookup dequantizes only the rows it needs: with ``blocksize`` dividing the
  width, row ``i``'s codes and block scales are a contiguous slice;
* a tied LM head reads ``weight``, which dequantizes the whole table for that
  matmul and lets it go (a transient array, like ``QuantizedLinear``'s);
* nothing trains it: no weight parameter, no gradient (``wants_grad`` is False),
  and ``backward`` has nothing to pass on, since token ids have no gradient.
"""
from __future__ import annotations

import numpy as np

from nf4 import NF4_CODEBOOK, quantize_nf4, unpack_4bit
from nn import Embedding, Module, embedding_ids, set_submodule


class QuantizedEmbedding(Module):
    """``forward(ids) = W[ids]`` with ``W`` ``(num_embeddings, dim)`` held as an ``NF4Tensor``."""

    def __init__(self, embedding: Embedding, blocksize: int = 64, double_quant: bool = True):
        super().__init__()
        if embedding.dim % blocksize:
            raise ValueError(f"blocksize={blocksize} must divide the embedding width {embedding.dim} "
                             f"so that a row is whole blocks")
        self.num_embeddings, self.dim = embedding.num_embeddings, embedding.dim
        self.compute_dtype = embedding.weight.dtype
        self.quant_state = quantize_nf4(embedding.weight, blocksize, double_quant)

    @property
    def weight(self) -> np.ndarray:
        """The whole table, dequantized (fresh, read-only): for a tied head's matmul."""
        w = self.quant_state.dequantize(self.compute_dtype)
        w.setflags(write=False)
        return w

    def wants_grad(self, name: str) -> bool:
        return False                                        # 4-bit and frozen: never a gradient

    def forward(self, ids):
        """Rows ``ids`` (any shape) -> ``(*ids.shape, dim)``: only their blocks are decoded."""
        ids = embedding_ids(ids, self.num_embeddings)
        self.ids = ids
        q, D = self.quant_state, self.dim
        rows = ids.reshape(-1)                                              # (N,)
        packed = q.packed.reshape(self.num_embeddings, D // 2)[rows]        # (N, D/2) two codes a byte
        codes = unpack_4bit(packed.reshape(-1), rows.size * D).reshape(rows.size, D // q.blocksize, -1)
        scale = q.block_absmax().reshape(self.num_embeddings, -1)[rows]     # (N, D/bs)
        out = NF4_CODEBOOK.astype(self.compute_dtype)[codes] * scale[..., None].astype(self.compute_dtype)
        return out.reshape(*ids.shape, D)                                   # (..., D)

    def backward(self, dout):
        return None                                         # ids have no gradient; W is frozen


def quantize_embeddings(model, blocksize: int = 64) -> list:
    """Replace every ``nn.Embedding`` of ``model`` by a ``QuantizedEmbedding`` in place.

    Returns the replaced paths. Use after ``quantize_model`` for an all-4-bit base.
    """
    paths = [p for p, m in model.named_modules() if isinstance(m, Embedding)]
    for path in paths:
        set_submodule(model, path, QuantizedEmbedding(model.get_submodule(path), blocksize))
    return paths
