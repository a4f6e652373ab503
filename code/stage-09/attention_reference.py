r"""Textbook multi-head causal self-attention, forward and backward, as pure functions.

This is the reading copy of ``minigpt.CausalSelfAttention``: the same maths in the
layout of the papers and of nanoGPT, every tensor ``(B, H, T, S)`` with the query
axis before the key axis, no ``out=`` views, no in-place updates. The library's
layer is the speed-tuned form of exactly these lines (scores stored key-major,
matmuls written into preallocated layouts); ``tests/test_attention_reference.py``
proves the two agree, forward and backward, with prefixes and padding masks, and
gradient-checks this file numerically.

Shapes: ``B`` batch, ``H`` heads, ``T`` queries (real tokens), ``P`` prefix slots,
``S = P + T`` keys, ``dh = d_model / H``.

The derivation, one scalar loss ``L`` and its upstream gradient ``dout = dL/dout``:

    forward                                  backward (reverse order)
    scores = q k^T / sqrt(dh)   (B,H,T,S)    dq = dscores k / sqrt(dh)
                                             dk = dscores^T q / sqrt(dh)
    masked: scores = -inf where not allowed  (masked entries get no gradient:
                                             their att is 0, so dscores is 0)
    att = softmax over the keys (B,H,T,S)    dscores = att * (datt - sum_s datt * att)
    out = att v                 (B,H,T,dh)   datt = dout v^T,  dv = att^T dout

The softmax line: for one row ``a = softmax(s)``, ``da_i/ds_j = a_i (delta_ij - a_j)``,
so ``ds_j = sum_i da_i a_i (delta_ij - a_j) = a_j (da_j - sum_i da_i a_i)``.

Masks: a query may look at every prefix slot, at real keys up to its own position
(causal), and never at a padded key. A query that may look at nothing (a padded
position with no visible key) gets all-zero weights, as in the library.
"""
from __future__ import annotations

import numpy as np


def attention_mask(T, P=0, padding_mask=None):
    """Boolean ``(B|1, 1, T, P+T)``: ``allowed[b, 0, t, s]`` is True where query ``t`` may see key ``s``.

    Key ``s < P`` is a prefix slot (always visible); key ``s >= P`` is real token
    ``s - P``, visible when ``s - P <= t`` and not padded (``padding_mask[b, s - P] == 1``).
    """
    t = np.arange(T)[:, None]                               # (T, 1) query positions
    s = np.arange(P + T)[None, :]                           # (1, S) key slots
    allowed = (s < P) | (s - P <= t)                        # (T, S) prefix or causal
    allowed = allowed[None, None]                           # (1, 1, T, S)
    if padding_mask is not None:
        pad = np.asarray(padding_mask).astype(bool)         # (B, T)
        key_ok = np.concatenate([np.ones((pad.shape[0], P), bool), pad], axis=1)   # (B, S)
        allowed = allowed & key_ok[:, None, None, :]        # (B, 1, T, S)
    return allowed


def softmax_masked(scores, allowed):
    """Row softmax over the last axis among allowed entries; rows with none allowed -> 0."""
    scores = np.where(allowed, scores, -np.inf)             # (B, H, T, S)
    row_max = scores.max(axis=-1, keepdims=True)            # (B, H, T, 1)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # an empty row has max -inf
    e = np.exp(scores - row_max)                            # exp(-inf) = 0 where masked
    total = e.sum(axis=-1, keepdims=True)                   # (B, H, T, 1)
    return e / np.where(total > 0, total, 1.0)


def attention_forward(q, k, v, allowed):
    """Scaled dot-product attention.

    q: (B, H, T, dh); k, v: (B, H, S, dh); allowed: bool, broadcastable to (B, H, T, S).
    Returns ``out`` (B, H, T, dh) and ``cache`` for ``attention_backward``.
    """
    scale = 1.0 / np.sqrt(q.shape[-1])
    scores = (q @ k.swapaxes(-1, -2)) * scale               # (B, H, T, S)
    att = softmax_masked(scores, allowed)                   # (B, H, T, S)
    out = att @ v                                           # (B, H, T, dh)
    return out, (q, k, v, att, scale)


def attention_backward(dout, cache):
    """dout: (B, H, T, dh) -> ``dq`` (B, H, T, dh), ``dk``, ``dv`` (B, H, S, dh)."""
    q, k, v, att, scale = cache
    # forward was: out = att @ v
    datt = dout @ v.swapaxes(-1, -2)                        # (B, H, T, S)
    dv = att.swapaxes(-1, -2) @ dout                        # (B, H, S, dh)
    # forward was: att = softmax(scores) over the keys
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))   # (B, H, T, S)
    # forward was: scores = q @ k^T * scale
    dq = (dscores @ k) * scale                              # (B, H, T, dh)
    dk = (dscores.swapaxes(-1, -2) @ q) * scale             # (B, H, S, dh)
    return dq, dk, dv


def _split_heads(x, H):
    B, T, D = x.shape
    return x.reshape(B, T, H, D // H).transpose(0, 2, 1, 3)   # (B, H, T, dh)


def _merge_heads(x):
    B, H, T, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * dh)   # (B, T, D)


def _prefix_heads(p, B):
    """A prefix ``(P, H, dh)`` (shared) or ``(B, P, H, dh)`` -> ``(B, H, P, dh)``."""
    p = np.asarray(p)
    if p.ndim == 3:
        p = np.broadcast_to(p, (B, *p.shape))
    return p.transpose(0, 2, 1, 3)


def self_attention_forward(x, params, n_heads, prefix=None, padding_mask=None):
    """The whole layer: projections, prefix keys/values, masked attention, output projection.

    x: (B, T, D); params: dict of ``q_proj.weight`` (D, D), ``q_proj.bias`` (D,) and the
    same for ``k_proj``, ``v_proj``, ``out_proj`` (weights ``(out, in)``, a layer computes
    ``x @ W.T + b``); prefix: ``(prefix_k, prefix_v)``, each ``(P, H, dh)`` or ``(B, P, H, dh)``;
    padding_mask: (B, T) of 0/1. Returns ``y`` (B, T, D) and ``cache``.
    """
    B, T, _ = x.shape
    lin = lambda name, a: a @ params[name + ".weight"].T + params[name + ".bias"]  # noqa: E731
    q = _split_heads(lin("q_proj", x), n_heads)             # (B, H, T, dh)
    k = _split_heads(lin("k_proj", x), n_heads)             # (B, H, T, dh)
    v = _split_heads(lin("v_proj", x), n_heads)             # (B, H, T, dh)
    P = 0
    if prefix is not None:
        pk, pv = (_prefix_heads(p, B) for p in prefix)      # (B, H, P, dh) each
        P = pk.shape[2]
        k = np.concatenate([pk, k], axis=2)                 # (B, H, S, dh)
        v = np.concatenate([pv, v], axis=2)                 # (B, H, S, dh)
    allowed = attention_mask(T, P, padding_mask)            # (B|1, 1, T, S)
    out, attn_cache = attention_forward(q, k, v, allowed)   # (B, H, T, dh)
    merged = _merge_heads(out)                              # (B, T, D)
    y = lin("out_proj", merged)                             # (B, T, D)
    shared = prefix is not None and np.asarray(prefix[0]).ndim == 3
    return y, (x, params, n_heads, P, shared, merged, attn_cache)


def self_attention_backward(dy, cache):
    """dy: (B, T, D) -> ``dx`` (B, T, D), ``grads`` (dict like ``params``), ``dprefix``.

    ``dprefix`` is ``(dprefix_k, dprefix_v)`` in the prefix's own shape, or None.
    """
    x, params, H, P, shared, merged, attn_cache = cache
    grads = {}

    def lin_backward(name, a, da):                          # forward was: a @ W.T + b
        grads[name + ".weight"] = da.reshape(-1, da.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        grads[name + ".bias"] = da.reshape(-1, da.shape[-1]).sum(axis=0)
        return da @ params[name + ".weight"]

    dmerged = lin_backward("out_proj", merged, dy)          # (B, T, D)
    dq, dk, dv = attention_backward(_split_heads(dmerged, H), attn_cache)
    dprefix = None
    if P:                                                   # forward was: concat([prefix, k])
        dpk, dpv = (d[:, :, :P].transpose(0, 2, 1, 3) for d in (dk, dv))   # (B, P, H, dh)
        dprefix = (dpk.sum(0), dpv.sum(0)) if shared else (dpk, dpv)
        dk, dv = dk[:, :, P:], dv[:, :, P:]                 # (B, H, T, dh)
    dx = lin_backward("q_proj", x, _merge_heads(dq))
    dx = dx + lin_backward("k_proj", x, _merge_heads(dk))
    dx = dx + lin_backward("v_proj", x, _merge_heads(dv))
    return dx, grads, dprefix
