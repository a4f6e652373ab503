"""The layers every model in Stage 9 is built from: ``Linear``, ``Embedding``,
``LayerNorm``, ``GELU``, ``ReLU``, ``Dropout``, softmax and cross-entropy.

Each follows the module protocol of ``module.py`` (re-exported here, so
``from nn import Module`` keeps working): ``forward`` keeps what ``backward``
needs, ``backward`` returns ``dx`` and adds into the trainable parameters'
gradients, a frozen parameter's gradient matmul is skipped.
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager

import numpy as np

from module import Module, ModuleList, Parameter, parameter_owner, set_submodule  # noqa: F401
from validate import as_array, check_int, check_number


# ---- BLAS threads -------------------------------------------------------------
_BLAS = []      # threadpoolctl's handle on NumPy's BLAS, made on first use


def blas_controller():
    """threadpoolctl's handle on NumPy's BLAS, or ``None`` when threadpoolctl is missing."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    if not _BLAS:
        _BLAS.append(ThreadpoolController().select(user_api="blas"))
    return _BLAS[0]


@contextmanager
def one_blas_thread():
    """Run the matmuls inside on one BLAS thread (without threadpoolctl: as they are).

    A matmul split over BLAS threads pays a hand-off between them on every call. For a
    big product (a projection over every token of the batch) that is nothing; for a
    stacked one -- ``np.matmul`` on ``(B, H, T, d_head)`` arrays is ``B * H`` separate
    BLAS calls -- and for LoRA's rank-``r`` products it is most of the time, and on a
    machine whose other core is busy each hand-off can wait for the scheduler.
    """
    blas = blas_controller()
    if blas is None:
        yield
        return
    with blas.limit(limits=1):
        yield


def on_one_blas_thread(method):
    """Decorator: ``method`` runs inside ``one_blas_thread()``."""
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with one_blas_thread():
            return method(*args, **kwargs)
    return wrapped


# ---- layers ---------------------------------------------------------------------
class Linear(Module):
    """``y = x @ W.T + b`` with ``W`` of shape ``(out_features, in_features)``.

    Initialised like PyTorch: uniform in ``±1/sqrt(in_features)``.
    """

    param_names = ("weight", "bias")

    def __init__(self, in_features, out_features, bias=True, rng=None, dtype=np.float32):
        super().__init__()
        check_int("in_features", in_features, 1)
        check_int("out_features", out_features, 1)
        rng = rng if rng is not None else np.random.default_rng(0)
        bound = 1.0 / math.sqrt(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = rng.uniform(-bound, bound, (out_features, in_features)).astype(dtype)
        self.bias = rng.uniform(-bound, bound, out_features).astype(dtype) if bias else None

    # Both passes flatten the leading axes first: one (N, in) @ (in, out) matmul is a
    # single BLAS call, while a (B, T, in) @ (in, out) matmul is B small ones.
    def forward(self, x):
        self.x = x                                          # (..., in)
        y = x.reshape(-1, self.in_features) @ self.weight.T  # (N, out)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features)  # (..., out)

    def backward(self, dout):
        self.check_backward(dout, "x", lambda x: (*x.shape[:-1], self.out_features))
        d2 = dout.reshape(-1, self.out_features)            # (N, out)
        if self.wants_grad("weight"):                       # skipped when frozen
            self._accumulate("weight", d2.T @ self.x.reshape(-1, self.in_features))  # (out, in)
        if self.wants_grad("bias"):
            self._accumulate("bias", d2.sum(0))             # (out,)
        return (d2 @ self.weight).reshape(*dout.shape[:-1], self.in_features)  # (..., in)


def scatter_add_rows(ids, rows, num_rows):
    """``out[i] = sum of rows[j] over every j with ids[j] == i``, shape ``(num_rows, dim)``.

    Equal to ``out = zeros(...); np.add.at(out, ids, rows)`` (up to the order of
    the float additions), but several times faster: ``add.at`` handles one row at a
    time, while here the ids are sorted once and every run of equal ids is summed
    by one ``np.add.reduceat``.
    """
    ids = np.asarray(ids).reshape(-1)                       # (N,)
    rows = rows.reshape(len(ids), -1)                       # (N, dim)
    out = np.zeros((num_rows, rows.shape[1]), dtype=rows.dtype)
    if ids.size == 0:
        return out
    order = np.argsort(ids, kind="stable")                  # (N,)
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])  # run starts
    out[sorted_ids[starts]] = np.add.reduceat(rows[order], starts, axis=0)
    return out


def embedding_ids(ids, num_embeddings):
    """``ids`` as an array, refused with the offending index when a row does not exist."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= num_embeddings):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise ValueError(f"index {bad} out of range for an embedding of "
                         f"{num_embeddings} rows (valid: 0..{num_embeddings - 1})")
    return ids


class Embedding(Module):
    """Row lookup ``weight[ids]``; backward scatters rows back (``scatter_add_rows``)."""

    param_names = ("weight",)

    def __init__(self, num_embeddings, dim, rng=None, dtype=np.float32, std=0.02):
        super().__init__()
        check_int("num_embeddings", num_embeddings, 1)
        check_int("dim", dim, 1)
        rng = rng if rng is not None else np.random.default_rng(0)
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = (rng.standard_normal((num_embeddings, dim)) * std).astype(dtype)

    def forward(self, ids):
        ids = embedding_ids(ids, self.num_embeddings)
        self.ids = ids
        return self.weight[ids]                             # (*ids.shape, dim)

    def backward(self, dout):
        self.check_backward(dout, "ids", lambda ids: (*ids.shape, self.dim))
        if self.wants_grad("weight"):                       # np.add.at, only faster
            self._accumulate("weight", scatter_add_rows(self.ids, dout.reshape(-1, self.dim),
                                                        self.num_embeddings))
        return None  # integer ids have no gradient


class LayerNorm(Module):
    """Normalise the last axis to mean 0, variance 1, then scale and shift.

    Backward (forward was ``xhat = (x - mu) * rstd; y = xhat * w + b``):
    ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))``.

    Row sums and row dot products use ``np.einsum``: over a short last axis
    (D = 64) it is several times faster than ``.sum(-1)`` / ``.mean(-1)``.
    """

    param_names = ("weight", "bias")

    def __init__(self, dim, eps=1e-5, dtype=np.float32):
        super().__init__()
        check_int("dim", dim, 1)
        check_number("eps", eps, 0.0, inclusive=False)
        self.dim, self.eps = dim, eps
        self.weight = np.ones(dim, dtype=dtype)
        self.bias = np.zeros(dim, dtype=dtype)

    def forward(self, x):
        D = self.dim
        mu = np.einsum("...i->...", x)[..., None] / D       # (..., 1)
        xc = x - mu                                         # (..., D)
        var = np.einsum("...i,...i->...", xc, xc)[..., None] / D   # (..., 1)
        self.rstd = 1.0 / np.sqrt(var + self.eps)           # (..., 1)
        xc *= self.rstd                                     # xhat, in place: xc is ours
        self.xhat = xc                                      # (..., D)
        y = xc * self.weight                                # (..., D)
        y += self.bias
        return y

    def backward(self, dout):
        self.check_backward(dout, "xhat")
        D, xhat = self.dim, self.xhat
        if self.wants_grad("weight"):                       # sum over rows of dout * xhat
            self._accumulate("weight", np.einsum("ni,ni->i", dout.reshape(-1, D),
                                                 xhat.reshape(-1, D)))   # (D,)
        if self.wants_grad("bias"):
            self._accumulate("bias", dout.reshape(-1, D).sum(0))   # (D,)
        dxhat = dout * self.weight                          # (..., D)
        proj = np.einsum("...i,...i->...", dxhat, xhat)[..., None] / D   # mean(dxhat * xhat)
        mean = np.einsum("...i->...", dxhat)[..., None] / D              # mean(dxhat)
        dx = xhat * proj                                    # (..., D)
        dx += mean
        np.subtract(dxhat, dx, out=dx)                      # dxhat - mean - xhat * proj
        dx *= self.rstd
        return dx


_GELU_C = math.sqrt(2.0 / math.pi)


_GELU_A = 0.044715


class GELU(Module):
    """GELU, tanh approximation (GPT-2's ``gelu_new``):
    ``0.5 x (1 + tanh(c (x + 0.044715 x^3)))`` with ``c = sqrt(2/pi)``.

    Written as ``y = x * s`` with the gate ``s = 0.5 (1 + tanh(u))``,
    ``u = c (x + a x^3)``. Backward: ``dy/dx = s + x s'``, and since
    ``tanh' = 1 - tanh^2``, ``s' = 0.5 (1 - t^2) u' = 2 s (1 - s) u'`` with
    ``u' = c (1 + 3 a x^2)``. Each step is one in-place pass over the array
    (``x*x*x``, never ``x**3``, which is ~30x slower on float32).
    """

    def forward(self, x):
        self.x = x                                          # (..., F)
        u = x * x                                           # x^2
        u *= _GELU_C * _GELU_A
        u += _GELU_C
        u *= x                                              # u = c (x + a x^3)
        s = np.tanh(u, out=u)                               # t = tanh(u), in place
        s += 1.0
        s *= 0.5                                            # s = 0.5 (1 + t)
        self.s = s
        return x * s                                        # (..., F)

    def backward(self, dout):
        self.check_backward(dout, "x")
        x, s = self.x, self.s
        g = x * x                                           # x^2
        g *= 2 * 3 * _GELU_A * _GELU_C
        g += 2 * _GELU_C                                    # 2 u'
        g *= x                                              # 2 x u'
        w = 1.0 - s
        w *= s                                              # s (1 - s)
        g *= w                                              # x s' = 2 x u' s (1 - s)
        g += s                                              # dy/dx = s + x s'
        g *= dout
        return g                                            # (..., F)


class ReLU(Module):
    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dout):
        self.check_backward(dout, "mask")
        return dout * self.mask


class Dropout(Module):
    """Inverted dropout: zero with probability ``p`` and scale the rest by ``1/(1-p)``
    during training, so evaluation needs no rescaling. Identity in ``eval()``."""

    def __init__(self, p=0.0, rng=None):
        super().__init__()
        check_number("p", p, 0.0, 1.0, high_inclusive=False, where=" (the dropout probability)")
        self.p = p
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.mask = None

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self.mask = None
            return x
        self.mask = (self.rng.random(x.shape) >= self.p).astype(x.dtype) / (1.0 - self.p)
        return x * self.mask

    def backward(self, dout):
        return dout if self.mask is None else dout * self.mask


ACTIVATIONS = {"relu": ReLU, "gelu": GELU, "gelu_new": GELU}   # gelu_new: Hugging Face's name


def softmax(x, axis=-1):
    """Numerically stable softmax (subtracts the max along ``axis``); a new array.

    Reductions over a short contiguous last axis are slow in NumPy; where the
    layout is free, put the softmax axis first (the attention stores its scores
    key-major and does this in place over axis 0).
    """
    e = x - x.max(axis=axis, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


IGNORE_INDEX = -100    # a target equal to it is not counted (Hugging Face's label padding)


def cross_entropy(logits, targets, ignore_index=IGNORE_INDEX):
    """Mean token cross-entropy and its gradient.

    logits ``(..., V)``, targets ``(...)`` of ints; positions whose target equals
    ``ignore_index`` add nothing. The loss is averaged over the other positions
    (as ``torch.nn.functional.cross_entropy``). Returns ``(loss, dlogits)``.
    When *every* target is ignored there is nothing to average: the loss is NaN
    and ``dlogits`` is zero, exactly as in PyTorch (never a perfect-looking 0.0).
    """
    logits = as_array("logits", logits)
    targets = as_array("targets", targets)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a class axis (..., V) with V >= 1, got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(f"logits must be floats, got dtype {logits.dtype}")
    if targets.size and not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer class ids, got dtype {targets.dtype}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} disagree: "
                         f"targets must have shape {logits.shape[:-1]}")
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)                            # (N, V)
    t = targets.reshape(-1)                                 # (N,)
    keep = t != ignore_index
    bad = t[keep & ((t < 0) | (t >= V))]
    if bad.size:
        raise ValueError(f"target {bad[0]} out of range for {V} classes")
    count = max(int(keep.sum()), 1)
    rows, safe_t = np.arange(len(t)), np.where(keep, t, 0)
    # With z = logits - max (the log-sum-exp trick), p = e^z / sum(e^z):
    #   nll = log(sum e^z) - z[target],   dL/dlogits = w (p - onehot(target)),
    # where w = keep / count is each row's share of the mean. At GPT-2 size (N, V) is
    # 1024 x 50257 = 206 MB in float32, so the gradient is built in *one* new array,
    # in four passes over it: z, e^z in place, the row sums, one scaling by w / sum.
    dlogits = flat - flat.max(-1, keepdims=True)            # (N, V) z, the one new array
    picked = dlogits[rows, safe_t]                          # (N,) z[target], before exp overwrites it
    np.exp(dlogits, out=dlogits)                            # (N, V) e^z
    sumexp = np.einsum("nv->n", dlogits)                    # (N,), row sums (fast einsum)
    nll = np.log(sumexp) - picked                           # -log p(target)
    loss = float((nll * keep).sum() / count) if keep.any() else float("nan")
    w = keep / count                                        # (N,) 0 for ignored rows
    dlogits *= (w / sumexp)[:, None].astype(flat.dtype)     # w p: softmax and share in one pass
    dlogits[rows, safe_t] -= w.astype(flat.dtype)           # w (p - onehot)
    return loss, dlogits.reshape(logits.shape).astype(logits.dtype, copy=False)
