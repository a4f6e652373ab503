"""Trainable tokens: train only a few rows of the embedding table (Hugging Face's
``LoraConfig(trainable_token_indices=...)``).

LoRA, adapters and the other methods leave the embedding table alone, so a
character the base never saw (a row still at its random start) stays noise
however long the adapter trains. Training the whole table would cost
``vocab_size x d_model`` numbers and touch every character; this trains only
the listed rows::

    W_eff = W  with rows ``token_indices`` replaced by ``trainable_tokens_delta``   (V, D)

``trainable_tokens_delta (n, D)`` starts as a copy of those rows (the model is
unchanged at initialisation) and is the only new parameter; it is saved with
the adapter, the indices in its config. The mini GPT's output layer is tied to
the embedding, so the new rows act in both places, as in ``peft`` with tied
weights.

Backward: with ``W_eff[i] = delta[k]`` for ``i = token_indices[k]``,
``dL/d delta[k] = dL/dW_eff[i]``. The input lookup contributes the summed
upstream rows of every position holding token ``i``; the tied head contributes
row ``i`` of ``dlogits^T h``. ``GPT.backward_embeds`` hands the head's share to
``embed_tokens._accumulate("weight", ...)``, which this wrapper routes to the
delta rows; the base table itself stays frozen.
"""
from __future__ import annotations

import numpy as np

from nn import Embedding, Module, scatter_add_rows


class TrainableTokensLayer(Module):
    """The adapter's part: the new values of the listed embedding rows."""

    param_names = ("trainable_tokens_delta",)

    def __init__(self, token_indices, base_weight):
        super().__init__()
        self.token_indices = check_indices(token_indices, base_weight.shape[0])
        self.trainable_tokens_delta = np.array(base_weight[self.token_indices])   # (n, D)


def check_indices(token_indices, num_embeddings) -> np.ndarray:
    idx = np.asarray(list(token_indices))
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"trainable_token_indices must be a non-empty list of ints, got {token_indices!r}")
    if idx.min() < 0 or idx.max() >= num_embeddings:
        bad = idx.min() if idx.min() < 0 else idx.max()
        raise ValueError(f"trainable_token_indices: index {bad} out of range for an embedding of "
                         f"{num_embeddings} rows (valid: 0..{num_embeddings - 1})")
    if len(np.unique(idx)) != len(idx):
        raise ValueError(f"trainable_token_indices has repeated indices: {idx.tolist()}")
    return idx.astype(np.int64)


class TrainableTokensWrapper(Module):
    """An ``Embedding`` whose listed rows come from the active ``token_adapter``.

    ``weight`` is the effective table ``W_eff`` (the tied head reads it too);
    ``disabled`` or no active adapter gives exactly the base table.
    """

    adapter_attr = "token_adapter"
    peft_type = "LORA"

    def __init__(self, base_layer: Embedding):
        super().__init__()
        self.base_layer = base_layer
        self.base_layer.freeze()
        self.num_embeddings, self.dim = base_layer.num_embeddings, base_layer.dim
        self.token_adapter = None
        self.disabled = False
        self.merged = False

    def active(self) -> bool:
        return self.token_adapter is not None and not self.disabled and not self.merged

    @property
    def weight(self) -> np.ndarray:
        """``W_eff (V, D)``: a copy with the adapter's rows when active, else the base table."""
        if not self.active():
            return self.base_layer.weight
        w = self.base_layer.weight.copy()                                   # (V, D)
        w[self.token_adapter.token_indices] = self.token_adapter.trainable_tokens_delta
        return w

    def forward(self, ids):
        out = self.base_layer(ids)                                          # (*ids, D), checks ids
        if self.active():
            return self.weight[self.base_layer.ids]
        return out

    def wants_grad(self, name: str) -> bool:
        """The tied head asks for ``weight``: only the adapter's rows want it."""
        return (name == "weight" and self.active()
                and self.token_adapter.wants_grad("trainable_tokens_delta"))

    def _accumulate(self, name: str, grad: np.ndarray) -> None:
        """A full ``(V, D)`` gradient of ``W_eff``: keep the adapter's rows."""
        self.token_adapter._accumulate("trainable_tokens_delta", grad[self.token_adapter.token_indices])

    def backward(self, dout):
        """dL/d delta[k] += sum of ``dout`` over the positions holding ``token_indices[k]``."""
        if self.wants_grad("weight"):
            full = scatter_add_rows(self.base_layer.ids, dout.reshape(-1, self.dim),
                                    self.num_embeddings)                    # (V, D)
            self._accumulate("weight", full)
        return None

    # ---- merging: write the rows into the base table, or take them back out --------
    def check_merge(self, merging: bool):
        """The wrappers' protocol (``PeftModel`` asks every wrapper before merging any)."""
        if merging and self.merged:
            raise ValueError("these trainable tokens are already merged; unmerge them first")
        if not merging and not self.merged:
            raise ValueError("these trainable tokens are not merged; nothing to unmerge")

    def set_base_weights(self, W, b=None):
        """Write the saved table back in place (an embedding has no bias)."""
        self.base_layer.weight[...] = W

    def merge_in_place(self):
        self.check_merge(True)
        idx = self.token_adapter.token_indices
        self._saved_rows = self.base_layer.weight[idx].copy()
        self.base_layer.weight[idx] = self.token_adapter.trainable_tokens_delta
        self.merged = True

    def unmerge_in_place(self):
        self.check_merge(False)
        self.base_layer.weight[self.token_adapter.token_indices] = self._saved_rows
        self.merged = False

    def merged_linear(self) -> Embedding:
        """A plain ``Embedding`` holding ``W_eff`` (the name is the wrappers' protocol that
        ``PeftModel.merge_and_unload`` calls; here the plain module is an embedding)."""
        merged = Embedding(self.num_embeddings, self.dim, dtype=self.base_layer.weight.dtype)
        merged.weight = np.array(self.base_layer.weight if self.merged else self.weight)
        return merged


def token_targets(trainable_token_indices) -> dict:
    """``{module path: indices}``: a list means the token embedding (``embed_tokens``),
    as in Hugging Face; a dict names the embedding module(s)."""
    if isinstance(trainable_token_indices, dict):
        return {k: list(v) for k, v in trainable_token_indices.items()}
    return {"embed_tokens": list(trainable_token_indices)}
