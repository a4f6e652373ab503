# Exercise 9.19: your file to edit. Generated from solutions/ex9_19_prefix_attention_backward.py by make_stubs.py (body sha256 f5f0cd0dfa52).
"""Exercise 9.19 (ours) -- the attention backward pass with a prefix.

Prefix tuning prepends ``P`` learned keys and values to every attention layer.
Every query may look at every prefix slot; among the real tokens the usual
causal mask applies. Per head (``q, k, v: (B, H, T, dh)``; prefix ``(P, H, dh)``,
shared by the whole batch)::

    k_all  = [prefix_k ; k]                 (B, H, P+T, dh)
    v_all  = [prefix_v ; v]                 (B, H, P+T, dh)
    scores = q @ k_all^T / sqrt(dh)         (B, H, T, P+T)
    scores[..., t, P + s] = -inf  for s > t (causal among real tokens only)
    att    = softmax(scores, axis=-1)       (B, H, T, P+T)
    out    = att @ v_all                    (B, H, T, dh)

Backward, in reverse, one named intermediate at a time (compare each with the
checker's output as you go)::

    datt     = dout @ v_all^T                              (B, H, T, P+T)
    dv_all   = att^T @ dout                                (B, H, P+T, dh)
    dscores  = att * (datt - sum(datt * att, axis=-1))     softmax backward
    dq       = dscores @ k_all / sqrt(dh)
    dk_all   = dscores^T @ q / sqrt(dh)
    then split dk_all, dv_all at P: the first P slots belong to the prefix, and
    since every sequence of the batch used the same prefix, sum them over the batch.

Your tasks: ``prefix_attention_forward`` and ``prefix_attention_backward``.

Check your work:  ``python exercises/check.py 9.19``
"""
import numpy as np


def prefix_attention_forward(q, k, v, prefix_k, prefix_v):
    """Returns ``(out (B, H, T, dh), cache)``. ``cache`` is a dict with at least
    ``"k_all"``, ``"v_all"``, ``"scores"`` (after masking; use ``-np.inf``) and
    ``"att"``, plus whatever your backward needs.

    Hint: a prefix ``(P, H, dh)`` becomes ``(B, H, P, dh)`` with ``swapaxes(0, 1)``
    and ``np.broadcast_to``.
    """
    raise NotImplementedError("Exercise 9.19: broadcast the prefix, concatenate, score, mask (prefix always visible), softmax")


def prefix_attention_backward(dout, cache):
    """``dout (B, H, T, dh)`` -> dict with ``"dq"``, ``"dk"``, ``"dv"`` ``(B, H, T, dh)``,
    ``"dprefix_k"``, ``"dprefix_v"`` ``(P, H, dh)``, and the intermediates ``"datt"``
    and ``"dscores"`` ``(B, H, T, P+T)``. Do not modify ``dout`` or the cache in place.
    """
    raise NotImplementedError("Exercise 9.19: datt, dv_all, softmax backward, dq, dk_all; split at P and sum prefixes over B")
