"""Generation: greedy or sampled (temperature, top-k, seed), with a key/value cache.

``generate(model, tokens, n)`` works for the plain ``GPT`` and for a ``PeftModel``
with any method: LoRA (merged or not), DoRA, (IA)3, adapters, prefix and prompt
tuning, BitFit, full fine-tuning, and inside ``disable_adapter()``. ``GPT.generate``
and ``PeftModel.generate`` call it. It needs only the model's protocol (``forward``,
``embed``, ``forward_embeds``, the attention's stored keys and values), so it
imports nothing from the project but ``nn.one_blas_thread``. ``sample_text.py`` is
its command line.

**The cache.** A full forward pass for every new token recomputes the keys and
values of every earlier token, at every layer, although they cannot change (the
attention is causal: a token never sees what comes after it). So keep them. After
one full forward over the prompt each layer's attention holds its keys and values,
``(B, H, S, d_head)``, for all ``S`` positions it attended to -- prefix tuning's
virtual tokens and prompt tuning's soft prompt included. Each next step runs only
the newest token, at its position, and hands every layer its cache as the
attention's key/value *prefix*: the attention lets every query see every prefix
slot, which is exactly causal attention for the newest token. Its keys and values
join the cache. Methods that change a linear layer (LoRA, (IA)3, ...) act on the
newest token's projections, so the cache holds the adapted keys and values.

**Where the cache stops.** The model has ``context_length`` positions. While the
sequence fits, the cached step computes what the full forward would. Once it is
longer, a full forward sees only the last ``limit`` tokens at positions starting
again from the first: every earlier key would have to move, so from there on each
step is a full forward on the window (a sliding window), exactly as without cache.
``limit`` is the context minus the positions the method's virtual tokens occupy
(``window_limit``, the rule ``PeftModel`` checks its inputs with too); what the
method does is read from one probe forward of one token, so it is right for
every method and position convention.

**Sampling.** ``temperature`` divides the logits (0 means greedy: the argmax);
``top_k`` keeps the ``k`` largest logits (ties with the ``k``-th included); the draw
uses ``np.random.default_rng(seed)``, one uniform number per sequence per step, so
the same seed gives the same text with or without the cache.

**One BLAS thread.** Decoding multiplies a few token vectors by every weight matrix,
one product after another: each is small and bound by reading the weights, and a
hand-off between BLAS threads on every one of them costs more than a second thread
saves (on a shared 2-core machine, many times more). So ``generate`` runs on one.
"""
from __future__ import annotations

import time

import numpy as np

from nn import one_blas_thread


def _base(model):
    """The plain ``GPT`` under a ``PeftModel`` (or the model itself)."""
    return getattr(model, "base_model", model)


def window_limit(context_length, virtual_tokens, first_position) -> int:
    """How many real tokens one forward takes: the context less the positions the
    method's virtual tokens occupy. The one rule, for ``generate``'s window and
    ``PeftModel.position_budget`` (and so ``PeftModel.forward``'s check) alike.

    Virtual tokens take positions in one of two ways: they sit in the sequence
    (a soft prompt: the blocks see ``virtual_tokens + T`` vectors), or they move the
    real tokens' positions up (``position_convention="shift"``: the first real token
    is at ``first_position``), or both at once (a shifted prompt: ``P`` vectors at
    ``0..P-1``, the tokens from ``P``). Either way they occupy
    ``max(virtual_tokens, first_position)`` of the ``context_length`` positions.
    """
    return context_length - max(virtual_tokens, first_position)


def window_layout(model, forward=None) -> tuple[int, int]:
    """``(limit, offset)``: how many real tokens one forward takes, and the position of the first.

    Probed with one token (so a ``forward`` wrapper that moves positions is seen too):
    the blocks' input length gives the virtual tokens in the sequence, the position
    ids the offset; ``window_limit`` turns them into the limit.
    """
    base = _base(model)
    (forward or model.forward)(np.zeros((1, 1), dtype=np.int64))
    offset = int(np.asarray(base.embed_positions.ids).reshape(-1)[0])
    virtual = base.h.shape[1] - 1                           # blocks saw (1, 1 + virtual, D)
    return window_limit(base.config.context_length, virtual, offset), offset


def read_cache(model) -> list:
    """Each layer's keys and values of the last forward, as prefixes ``(B, S, H, d_head)``."""
    return [(block.self_attn.k.transpose(0, 2, 1, 3), block.self_attn.v.transpose(0, 2, 1, 3))
            for block in _base(model).layers]


def cached_step(model, token, position, cache):
    """Logits ``(B, V)`` for ``token (B,)`` at ``position``, seeing ``cache``; returns the new cache too."""
    base = _base(model)
    x = base.embed(token[:, None], position_ids=np.array([position]))   # (B, 1, D)
    logits = base.forward_embeds(x, prefixes=cache)                    # (B, 1, V)
    return logits[:, -1], read_cache(model)


def pick(logits, temperature, top_k, rng):
    """Next tokens ``(B,)`` from ``logits (B, V)``: argmax, or a draw from the tempered top-k."""
    logits = np.asarray(logits, dtype=np.float64)           # (B, V)
    if temperature == 0:
        return logits.argmax(-1)
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k, None]          # (B, 1)
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)                             # (B, V), unnormalised
    u = rng.random(len(z))[:, None] * cdf[:, -1:]           # (B, 1)
    return np.minimum((cdf <= u).sum(-1), z.shape[-1] - 1)  # first index with cdf > u


def check_settings(max_new_tokens, temperature, top_k, vocab_size):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be None or an integer in 1..{vocab_size}, got {top_k!r}")


def generate(model, tokens, max_new_tokens, temperature=0.0, top_k=None, seed=0,
             use_cache=True, eos_id=None, forward=None):
    """Continue ``tokens (B, T)`` (or ``(T,)``) by ``max_new_tokens``; returns only the new ``(B, n)``.

    ``temperature=0`` is greedy. ``eos_id``: a sequence that produced it keeps
    producing it, and generation stops when all have. Runs in eval mode (no dropout)
    and restores the model's mode afterwards. ``forward``: decode through this
    function instead of ``model.forward`` (a wrapper that moves positions, say);
    the cache cannot know what it does, so it is not used then.
    """
    base = _base(model)
    seq = np.asarray(tokens)
    seq = seq[None] if seq.ndim == 1 else seq
    check_settings(max_new_tokens, temperature, top_k, base.config.vocab_size)
    if seq.ndim != 2 or seq.shape[1] < 1:
        raise ValueError(f"tokens must be (batch, seq) with seq >= 1 (a prompt of at least one "
                         f"token), got shape {np.asarray(tokens).shape}")
    base.check_tokens(seq[:, -1:])
    rng = np.random.default_rng(seed)
    was_training = getattr(model, "training", True)
    model.eval()
    try:
        with one_blas_thread():
            return _decode(model, seq.astype(np.int64), max_new_tokens, temperature, top_k, rng,
                           use_cache and forward is None, eos_id, forward or model.forward)
    finally:
        model.train(was_training)


def _decode(model, seq, max_new_tokens, temperature, top_k, rng, use_cache, eos_id, forward):
    limit, offset = window_layout(model, forward)
    done = np.zeros(len(seq), dtype=bool)
    out, cache = [], None
    for _ in range(max_new_tokens):
        L = seq.shape[1]
        if use_cache and cache is not None and L <= limit:  # keys of seq[:, :-1] are cached
            logits, cache = cached_step(model, seq[:, -1], offset + L - 1, cache)
        else:                                               # full forward on the window
            logits = forward(seq[:, -limit:])[:, -1]
            cache = read_cache(model) if use_cache and L <= limit else None
        nxt = pick(logits, temperature, top_k, rng)
        if eos_id is not None:
            nxt = np.where(done, eos_id, nxt)
            done |= nxt == eos_id
        out.append(nxt)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
        if eos_id is not None and done.all():
            break
    return np.stack(out, axis=1) if out else np.zeros((len(seq), 0), dtype=np.int64)


def complete(model, tokenizer, prompt: str, max_new_tokens=200, **kwargs) -> str:
    """The text ``generate`` continues ``prompt`` with (one sequence)."""
    return tokenizer.decode(generate(model, tokenizer.encode(prompt), max_new_tokens, **kwargs)[0])


def tokens_per_second(model, tokens, max_new_tokens, use_cache, repeats=3, **kwargs) -> float:
    """Best of ``repeats`` timings of ``generate`` (new tokens per second, whole batch)."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        new = generate(model, tokens, max_new_tokens, use_cache=use_cache, **kwargs)
        best = min(best, time.perf_counter() - start)
    return new.size / best
