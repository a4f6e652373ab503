"""A mini GPT in NumPy with exact, hand-written backward passes.

    tokens (B, T)
      -> embed_tokens + embed_positions            (B, T, D)
      -> n_layers x Block:
             x = x + self_attn(ln_1(x))            causal, optional prefix K/V
             x = x + mlp(ln_2(x))                  fc1 -> GELU -> fc2
      -> ln_f -> logits = h @ embed_tokens.weight.T (B, T, V)   (tied LM head)

Module names follow Hugging Face OPT/LLaMA (``layers.0.self_attn.q_proj``), so
``target_modules=["q_proj", "v_proj"]`` reads exactly as it does in ``peft``.
Every PEFT method in this stage wraps one of these modules; none rewrites them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from generate import generate
from nn import (ACTIVATIONS, Dropout, Embedding, LayerNorm, Linear, Module, ModuleList,
                on_one_blas_thread)
from validate import as_array, check_int, positive_int


@dataclass
class GPTConfig:
    vocab_size: int = 64
    context_length: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.0
    dtype: type = np.float32
    # what a loaded Hugging Face checkpoint may differ in (hf_import.py); defaults: ours
    activation: str = "gelu_new"        # MLP activation: "gelu_new" (tanh GELU) or "relu" (OPT)
    layer_norm_eps: float = 1e-5
    d_ff: int | None = None             # MLP width; None means 4 * d_model
    bias: bool = True                   # biases in the linear layers
    tie_word_embeddings: bool = True    # LM head = embed_tokens.weight, else its own lm_head

    def __post_init__(self):
        for field in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            positive_int(getattr(self, field), field, f"GPTConfig.{field}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float, np.floating)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        try:
            dtype = None if self.dtype is None else np.dtype(self.dtype)   # (np.dtype(None): float64)
        except TypeError:
            dtype = None
        if dtype not in (np.float32, np.float64):           # float16 overflows -1e30 masks
            raise ValueError(f"GPTConfig.dtype must be float32 or float64, got {self.dtype!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation!r}")
        if self.d_ff is not None:
            positive_int(self.d_ff, "d_ff", "GPTConfig.d_ff")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def ffn_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["dtype"] = np.dtype(self.dtype).name
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        d = dict(d)
        d["dtype"] = np.dtype(d.get("dtype", "float32")).type
        return cls(**d)


_MASKED = -1e30  # added to masked scores: exp(-1e30 - max) is exactly 0 in float32 and float64


def _normal_linear(d_in, d_out, rng, dtype, std=0.02, bias=True):
    """GPT-2 initialisation: weights N(0, std^2), biases zero."""
    layer = Linear(d_in, d_out, bias=bias, rng=rng, dtype=dtype)
    layer.weight = (rng.standard_normal((d_out, d_in)) * std).astype(dtype)
    layer.bias = np.zeros(d_out, dtype=dtype) if bias else None
    return layer


class CausalSelfAttention(Module):
    """Multi-head causal self-attention with optional key/value prefixes.

    ``prefix = (prefix_k, prefix_v)``, each ``(P, H, d_head)`` (shared by the batch)
    or ``(B, P, H, d_head)``, is prepended to the keys and values. Every query may
    attend to every prefix slot (prefixes are never causally masked, nor hidden by
    the padding mask); among the real tokens the usual causal mask applies.
    After ``backward`` the prefix gradient is in ``self.prefix_grad`` (same shapes).

    Reading copy: ``attention_reference.py`` holds the same layer as textbook pure
    functions (``(B, H, T, S)`` scores, no ``out=`` views) with the derivation of
    every backward line; ``tests/test_attention_reference.py`` proves the two equal,
    forward and backward. Read that file first, then this one.

    Speed (the maths is the textbook one): the weights are stored key-major,
    ``att[s, b, h, t]``, so the softmax's max and sum reduce over the first axis,
    which NumPy vectorises across all rows at once (over a short last axis they are
    several times slower); ``self.att`` is the usual ``(B, H, T, P+T)`` view of it.
    Matmuls write through ``out=`` views straight into these layouts, so merging
    heads is a free reshape; ``q`` is scaled before ``k q^T`` (fewer numbers than
    the scores).
    The per-head matmuls (``B * H`` BLAS calls of ``T x d_head`` each) run on one BLAS
    thread (``nn.one_blas_thread``): split over threads, each call would pay a hand-off.
    """

    def __init__(self, config: GPTConfig, rng):
        super().__init__()
        D, dt = config.d_model, config.dtype
        self.n_heads, self.d_head = config.n_heads, config.d_head
        self.scale = 1.0 / math.sqrt(self.d_head)
        b = config.bias
        self.q_proj = _normal_linear(D, D, rng, dt, bias=b)
        self.k_proj = _normal_linear(D, D, rng, dt, bias=b)
        self.v_proj = _normal_linear(D, D, rng, dt, bias=b)
        self.out_proj = _normal_linear(D, D, rng, dt, std=0.02 / math.sqrt(2 * config.n_layers), bias=b)
        self.prefix_grad = None

    def _split(self, t, B, T):
        return t.reshape(B, T, self.n_heads, self.d_head).transpose(0, 2, 1, 3)  # (B, H, T, dh)

    @staticmethod
    def build_mask(T, P, attention_mask=None):
        """Boolean ``(B|1, 1, T, P+T)``: True where a query may look."""
        causal = np.tril(np.ones((T, T), dtype=bool))
        allowed = np.concatenate([np.ones((T, P), dtype=bool), causal], axis=1)[None, None]
        if attention_mask is not None:                      # hide padded keys
            keys = np.concatenate([np.ones((attention_mask.shape[0], P), dtype=bool),
                                   attention_mask.astype(bool)], axis=1)
            allowed = allowed & keys[:, None, None, :]
        return allowed

    def check_prefix(self, prefix, B):
        """``(prefix_k, prefix_v)`` must be ``(P, H, d_head)`` or ``(B, P, H, d_head)`` each."""
        pk, pv = (np.asarray(p) for p in prefix)
        H, dh = self.n_heads, self.d_head
        ok = (pk.shape == pv.shape and pk.ndim in (3, 4) and pk.shape[-2:] == (H, dh)
              and (pk.ndim == 3 or pk.shape[0] == B))
        if not ok:
            raise ValueError(f"prefix keys {pk.shape} and values {pv.shape} must both be "
                             f"(P, {H}, {dh}) or ({B}, P, {H}, {dh}) = (P, n_heads, d_head)")
        return pk, pv

    def forward(self, x, attention_mask=None, prefix=None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)   # (B, T, D) each
        return self.out_proj(self.attend(q, k, v, attention_mask, prefix))

    @on_one_blas_thread                                     # B * H small matmuls each
    def attend(self, q, k, v, attention_mask=None, prefix=None):
        """Causal attention of projected ``q, k, v (B, T, D)``; merged heads ``(B, T, D)``."""
        B, T, D = q.shape
        H, dh = self.n_heads, self.d_head
        q = self._split(q * self.scale, B, T)               # (B, H, T, dh), scaled by 1/sqrt(dh)
        k = k.reshape(B, T, H, dh)                          # (B, T, H, dh)
        v = v.reshape(B, T, H, dh)                          # (B, T, H, dh)
        P = 0
        self.prefix_batched = False
        self.prefix_grad = None
        if prefix is not None:
            pk, pv = self.check_prefix(prefix, B)
            P = pk.shape[-3]
            self.prefix_batched = pk.ndim == 4
            k = np.concatenate([np.broadcast_to(pk.astype(k.dtype), (B, P, H, dh)), k], axis=1)
            v = np.concatenate([np.broadcast_to(pv.astype(v.dtype), (B, P, H, dh)), v], axis=1)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)   # (B, H, P+T, dh) views
        allowed = self.build_mask(T, P, attention_mask)     # (B|1, 1, T, P+T)
        zero, masked = q.dtype.type(0), q.dtype.type(_MASKED)
        # attention_reference.attention_forward, in the key-major layout att[s, b, h, t]:
        att = np.empty_like(q, shape=(P + T, B, H, T), order="C")   # key-major: att[s, b, h, t]
        np.matmul(k, q.swapaxes(-1, -2), out=att.transpose(1, 2, 0, 3))   # k q^T (B, H, P+T, T)
        att += np.where(allowed, zero, masked).transpose(3, 0, 1, 2)  # masked keys -> -1e30
        att -= att.max(axis=0)                              # softmax over the keys, in place
        np.exp(att, out=att)
        att /= att.sum(axis=0)                              # (P+T, B, H, T)
        blind = ~allowed.any(-1)                            # (B|1, 1, T): sees no key at all
        if blind.any():
            # a padded query with no visible key would spread uniformly over masked
            # keys (future ones included); give it zero weights instead
            att *= ~blind
        y = np.empty_like(q, shape=(B, T, H, dh), order="C")        # heads merge by a free reshape
        np.matmul(att.transpose(1, 2, 3, 0), v, out=y.transpose(0, 2, 1, 3))  # (B, H, T, dh)
        self.q, self.k, self.v, self.P = q, k, v, P
        self.att = att.transpose(1, 2, 3, 0)                # (B, H, T, P+T) view, for reading
        return y.reshape(B, T, D)

    def backward(self, dout):
        dq, dk, dv = self.attend_backward(self.out_proj.backward(dout))   # (B, T, D) each
        dx = self.q_proj.backward(dq)
        dx += self.k_proj.backward(dk)
        dx += self.v_proj.backward(dv)
        return dx

    @on_one_blas_thread
    def attend_backward(self, dy):
        """Backward of ``attend``: ``dy (B, T, D)`` -> ``(dq, dk, dv)``, each ``(B, T, D)``."""
        B, T, D = dy.shape
        H, dh = self.n_heads, self.d_head
        q, k, v, P = self.q, self.k, self.v, self.P
        att = self.att.transpose(3, 0, 1, 2)                # (P+T, B, H, T), key-major again
        S, dt = P + T, att.dtype
        dy = self._split(dy, B, T)                          # (B, H, T, dh)
        empty = lambda *shape: np.empty_like(dy, shape=shape, dtype=dt, order="C")  # noqa: E731
        dscores = empty(S, B, H, T)                         # key-major, like att
        # attention_reference.attention_backward, line by line, in the key-major layout:
        np.matmul(v, dy.swapaxes(-1, -2), out=dscores.transpose(1, 2, 0, 3))  # datt^T = v dy^T
        # softmax backward: dscores = att * (datt - sum_s(datt * att))
        dscores -= np.einsum("sbht,sbht->bht", dscores, att)
        dscores *= att                                      # (P+T, B, H, T)
        dq = empty(B, T, H, dh)                             # (B, T, H, dh) layouts:
        dk, dv = empty(B, S, H, dh), empty(B, S, H, dh)     # heads merge by a reshape
        np.matmul(dscores.transpose(1, 2, 3, 0), k, out=dq.transpose(0, 2, 1, 3))  # dscores k
        dq *= self.scale                                    # forward scaled q
        np.matmul(dscores.transpose(1, 2, 0, 3), q, out=dk.transpose(0, 2, 1, 3))  # dscores^T q
        np.matmul(att.transpose(1, 2, 0, 3), dy, out=dv.transpose(0, 2, 1, 3))     # att^T dy
        if P:
            dpk, dpv = dk[:, :P].copy(), dv[:, :P].copy()   # (B, P, H, dh)
            if not self.prefix_batched:
                dpk, dpv = dpk.sum(0), dpv.sum(0)           # (P, H, dh)
            self.prefix_grad = (dpk, dpv)
            dk, dv = dk[:, P:], dv[:, P:]                   # (B, T, H, dh)
        return dq.reshape(B, T, D), dk.reshape(B, T, D), dv.reshape(B, T, D)


class MLP(Module):
    def __init__(self, config: GPTConfig, rng):
        super().__init__()
        D, F, dt, b = config.d_model, config.ffn_dim, config.dtype, config.bias
        self.fc1 = _normal_linear(D, F, rng, dt, bias=b)
        self.act = ACTIVATIONS[config.activation]()
        self.fc2 = _normal_linear(F, D, rng, dt, std=0.02 / math.sqrt(2 * config.n_layers), bias=b)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))              # (B, T, D)

    def backward(self, dout):
        return self.fc1.backward(self.act.backward(self.fc2.backward(dout)))


class Block(Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig, rng):
        super().__init__()
        self.ln_1 = LayerNorm(config.d_model, eps=config.layer_norm_eps, dtype=config.dtype)
        self.self_attn = CausalSelfAttention(config, rng)
        self.drop_1 = Dropout(config.dropout, rng=np.random.default_rng(rng.integers(2**31)))
        self.ln_2 = LayerNorm(config.d_model, eps=config.layer_norm_eps, dtype=config.dtype)
        self.mlp = MLP(config, rng)
        self.drop_2 = Dropout(config.dropout, rng=np.random.default_rng(rng.integers(2**31)))

    def forward(self, x, attention_mask=None, prefix=None):
        x = x + self.drop_1(self.self_attn(self.ln_1(x), attention_mask=attention_mask, prefix=prefix))
        return x + self.drop_2(self.mlp(self.ln_2(x)))

    def backward(self, dout):
        dx = dout + self.ln_2.backward(self.mlp.backward(self.drop_2.backward(dout)))
        return dx + self.ln_1.backward(self.self_attn.backward(self.drop_1.backward(dx)))


class GPT(Module):
    """The mini GPT. ``forward(tokens)`` -> logits ``(B, T, vocab_size)``.

    The forward pass is split in two halves so PEFT methods can reach the seam:
    ``embed`` (ids -> vectors) and ``forward_embeds`` (vectors -> logits).
    ``backward`` mirrors it and returns the gradient w.r.t. the embedding output.
    """

    def __init__(self, config: GPTConfig, seed: int = 0):
        super().__init__()
        self.config = config
        rng = np.random.default_rng(seed)
        dt = config.dtype
        self.embed_tokens = Embedding(config.vocab_size, config.d_model, rng=rng, dtype=dt)
        self.embed_positions = Embedding(config.context_length, config.d_model, rng=rng, dtype=dt)
        self.drop = Dropout(config.dropout, rng=np.random.default_rng(rng.integers(2**31)))
        self.layers = ModuleList(Block(config, rng) for _ in range(config.n_layers))
        self.ln_f = LayerNorm(config.d_model, eps=config.layer_norm_eps, dtype=dt)
        self.lm_head = None if config.tie_word_embeddings else _normal_linear(
            config.d_model, config.vocab_size, rng, dt, bias=False)   # untied head (OPT can be)

    # ---- input checks ----------------------------------------------------
    def check_tokens(self, tokens, extra_positions: int = 0):
        tokens = as_array("tokens", tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got rank {tokens.ndim} "
                             f"shape {tokens.shape}; for one sequence use tokens[None]")
        if 0 in tokens.shape:
            raise ValueError(f"tokens must hold at least one sequence of at least one token, "
                             f"got shape {tokens.shape} (batch, seq)")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        T, limit = tokens.shape[1] + extra_positions, self.config.context_length
        if T > limit:
            raise ValueError(f"tokens: sequence length {T} exceeds context_length {limit}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            bad = tokens.min() if tokens.min() < 0 else tokens.max()
            raise ValueError(f"tokens: token id {bad} out of range: valid ids are "
                             f"0..{self.config.vocab_size - 1}")
        return tokens

    def check_positions(self, position_ids, shape):
        """``position_ids`` must be integers of shape ``(T,)`` or ``(B, T)``, each < context_length."""
        position_ids = np.asarray(position_ids)
        if position_ids.shape not in ((shape[1],), tuple(shape)) \
                or (position_ids.size and not np.issubdtype(position_ids.dtype, np.integer)):
            raise ValueError(f"position_ids must be integers of shape ({shape[1]},) or {tuple(shape)} "
                             f"(the tokens' (seq,) or (batch, seq)), got {position_ids.dtype} "
                             f"of shape {position_ids.shape}")
        limit = self.config.context_length
        if position_ids.size and (position_ids.min() < 0 or position_ids.max() >= limit):
            bad = position_ids.min() if position_ids.min() < 0 else position_ids.max()
            raise ValueError(f"position_ids: position id {bad} out of range: valid positions "
                             f"are 0..{limit - 1}")
        return position_ids

    @staticmethod
    def check_mask(attention_mask, shape):
        if attention_mask is None:
            return None
        attention_mask = as_array("attention_mask", attention_mask)
        if attention_mask.shape != tuple(shape):
            raise ValueError(f"attention_mask shape {attention_mask.shape} must equal "
                             f"the tokens' shape {tuple(shape)}")
        if not np.isin(attention_mask, (0, 1)).all():
            raise ValueError(f"attention_mask must hold 0 (padding) and 1 (token) only, got "
                             f"values {np.unique(attention_mask)[:6].tolist()}")
        return attention_mask

    # ---- forward ---------------------------------------------------------
    def embed(self, tokens, position_ids=None):
        """Token + position embeddings ``(B, T, D)``; positions default to ``0..T-1``."""
        tokens = self.check_tokens(tokens)
        T = tokens.shape[1]
        position_ids = np.arange(T) if position_ids is None else self.check_positions(position_ids, tokens.shape)
        x = self.embed_tokens(tokens) + self.embed_positions(position_ids)   # (B, T, D)
        return self.drop(x)

    def forward_embeds(self, x, attention_mask=None, prefixes=None):
        """Run the blocks, final LayerNorm and tied head on embeddings ``x (B, T, D)``."""
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"embeddings must be (batch, seq, {self.config.d_model}), got {x.shape}")
        if x.shape[1] > self.config.context_length:
            raise ValueError(f"sequence length {x.shape[1]} exceeds context_length "
                             f"{self.config.context_length}")
        if prefixes is not None and len(prefixes) != len(self.layers):
            raise ValueError(f"got {len(prefixes)} layer prefixes for {len(self.layers)} layers: "
                             f"give one (prefix_k, prefix_v) pair per layer")
        for i, block in enumerate(self.layers):
            x = block(x, attention_mask=attention_mask,
                      prefix=None if prefixes is None else prefixes[i])
        self.h = self.ln_f(x)                               # (B, T, D)
        if self.lm_head is not None:
            return self.lm_head(self.h)                     # (B, T, V), untied head
        B, T, D = self.h.shape
        logits = self.h.reshape(B * T, D) @ self.embed_tokens.weight.T   # (B*T, V), one matmul
        return logits.reshape(B, T, -1)                     # (B, T, V)

    def forward(self, tokens, attention_mask=None, prefixes=None, position_ids=None):
        tokens = self.check_tokens(tokens)
        attention_mask = self.check_mask(attention_mask, tokens.shape)
        return self.forward_embeds(self.embed(tokens, position_ids), attention_mask, prefixes)

    # ---- backward --------------------------------------------------------
    def backward_embeds(self, dlogits):
        """Backward through head, ``ln_f`` and blocks; returns dL/dx ``(B, T, D)``."""
        V, D = self.config.vocab_size, self.config.d_model
        self.check_backward(dlogits, "h", lambda h: (*h.shape[:-1], V))
        if self.lm_head is not None:
            dh = self.lm_head.backward(dlogits)             # (B, T, D), untied head
        else:
            if self.embed_tokens.wants_grad("weight"):      # the tied head's share
                self.embed_tokens._accumulate(
                    "weight", dlogits.reshape(-1, V).T @ self.h.reshape(-1, D))
            dh = dlogits.reshape(-1, V) @ self.embed_tokens.weight     # (B*T, D)
        dx = self.ln_f.backward(dh.reshape(self.h.shape))   # (B, T, D)
        for block in reversed(self.layers):
            dx = block.backward(dx)
        return dx

    def backward_embed(self, dx):
        """Backward into the token and position embedding tables."""
        dx = self.drop.backward(dx)
        self.embed_tokens.backward(dx)
        if self.embed_positions.wants_grad("weight"):
            per_batch = self.embed_positions.ids.ndim == 2   # position_ids (B, T) or (T,)
            self.embed_positions.backward(dx if per_batch else dx.sum(0))

    def backward(self, dlogits):
        """Fill every trainable gradient; return dL/d(embedding output)."""
        dx = self.backward_embeds(dlogits)
        self.backward_embed(dx)
        return dx

    # ---- generation ------------------------------------------------------
    def generate(self, tokens, max_new_tokens, eos_id=None, forward=None, **sampling):
        """Greedy decoding (``sampling``: ``temperature``, ``top_k``, ``seed``, ``use_cache``,
        see ``generate.generate``). Returns only the new tokens ``(B, <= max_new_tokens)``.

        ``forward`` lets a wrapper decode through itself (then without the cache).
        Sequences that reached ``eos_id`` keep emitting it.
        """
        check_int("max_new_tokens", max_new_tokens, 0)
        if eos_id is not None:
            check_int("eos_id", eos_id, 0, self.config.vocab_size - 1)
        seq = as_array("tokens", tokens)
        self.check_tokens(seq[:, -self.config.context_length:] if seq.ndim == 2 else seq)
        return generate(self, seq, max_new_tokens, eos_id=eos_id, forward=forward, **sampling)
