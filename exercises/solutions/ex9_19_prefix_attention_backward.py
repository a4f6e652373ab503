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
    # BEGIN SOLUTION broadcast the prefix, concatenate, score, mask (prefix always visible), softmax
    B, H, T, dh = q.shape
    P = prefix_k.shape[0]
    pk = np.broadcast_to(prefix_k.swapaxes(0, 1), (B, H, P, dh))
    pv = np.broadcast_to(prefix_v.swapaxes(0, 1), (B, H, P, dh))
    k_all = np.concatenate([pk, k], axis=2)                 # (B, H, P+T, dh)
    v_all = np.concatenate([pv, v], axis=2)                 # (B, H, P+T, dh)
    scores = q @ k_all.swapaxes(-1, -2) / np.sqrt(dh)       # (B, H, T, P+T)
    allowed = np.concatenate([np.ones((T, P), dtype=bool), np.tril(np.ones((T, T), dtype=bool))], axis=1)
    scores = np.where(allowed, scores, -np.inf)
    att = np.exp(scores - scores.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)                       # (B, H, T, P+T)
    out = att @ v_all                                       # (B, H, T, dh)
    cache = {"q": q, "k_all": k_all, "v_all": v_all, "scores": scores, "att": att, "P": P}
    return out, cache
    # END SOLUTION


def prefix_attention_backward(dout, cache):
    """``dout (B, H, T, dh)`` -> dict with ``"dq"``, ``"dk"``, ``"dv"`` ``(B, H, T, dh)``,
    ``"dprefix_k"``, ``"dprefix_v"`` ``(P, H, dh)``, and the intermediates ``"datt"``
    and ``"dscores"`` ``(B, H, T, P+T)``. Do not modify ``dout`` or the cache in place.
    """
    # BEGIN SOLUTION datt, dv_all, softmax backward, dq, dk_all; split at P and sum prefixes over B
    q, k_all, v_all, att, P = cache["q"], cache["k_all"], cache["v_all"], cache["att"], cache["P"]
    dh = q.shape[-1]
    datt = dout @ v_all.swapaxes(-1, -2)                    # (B, H, T, P+T)
    dv_all = att.swapaxes(-1, -2) @ dout                    # (B, H, P+T, dh)
    dscores = att * (datt - np.sum(datt * att, axis=-1, keepdims=True))
    dq = dscores @ k_all / np.sqrt(dh)                      # (B, H, T, dh)
    dk_all = dscores.swapaxes(-1, -2) @ q / np.sqrt(dh)     # (B, H, P+T, dh)
    return {"dq": dq, "dk": dk_all[:, :, P:], "dv": dv_all[:, :, P:],
            "dprefix_k": dk_all[:, :, :P].sum(0).swapaxes(0, 1),     # (P, H, dh)
            "dprefix_v": dv_all[:, :, :P].sum(0).swapaxes(0, 1),
            "datt": datt, "dscores": dscores}
    # END SOLUTION
