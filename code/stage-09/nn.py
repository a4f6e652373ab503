"""The module protocol and the layers every model in Stage 9 is built from.

The protocol (one mechanism for every module, PEFT wrappers included):

* ``forward(x)`` computes the output and keeps on the module what ``backward``
  needs. ``backward(dout)`` returns ``dx`` and *adds* (``+=``) into the gradient
  of every trainable parameter. Neither ever modifies ``dout`` or a cache in place.
* Parameters are plain ``np.ndarray`` attributes listed in ``param_names``.
  The gradient of parameter ``X`` lives in the attribute ``X_grad``.
* Every parameter has a trainable flag. A frozen parameter gets no gradient
  and its gradient matmul is skipped -- that skipped matmul is exactly the compute
  PEFT saves -- but its module still returns ``dx`` so earlier layers learn.
* A model is a tree of modules; parameters are addressed by dotted names such as
  ``layers.0.self_attn.q_proj.weight``. Saving, counting, freezing and the
  optimizers all walk these names.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from validate import as_array, check_int, check_number


class Module:
    """Base class: parameter bookkeeping, freezing, train/eval and traversal."""

    param_names: tuple[str, ...] = ()
    lists_frozen_parameters = True          # does parameters() list frozen arrays by default?

    def __init__(self):
        self.training = True
        self.frozen: set[str] = set()

    # ---- traversal -------------------------------------------------------
    def children(self) -> Iterator[tuple[str, "Module"]]:
        """Direct sub-modules, in the order they were assigned."""
        for name, value in vars(self).items():
            if isinstance(value, Module) and not name.startswith("_"):
                yield name, value

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self.children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def own_parameters(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.param_names:
            value = getattr(self, name, None)
            if value is not None:
                yield name, value

    def named_parameters(self, prefix: str = "", trainable_only: bool = False):
        """Yield ``(dotted_name, array)`` for every parameter below this module."""
        for path, module in self.named_modules(prefix):
            for name, value in module.own_parameters():
                if trainable_only and name in module.frozen:
                    continue
                yield (f"{path}.{name}" if path else name), value

    def parameters(self, trainable_only: bool | None = None) -> list[np.ndarray]:
        """The parameter arrays below this module, in ``named_parameters`` order.

        ``trainable_only=None`` takes the class's default: every parameter, except
        for wrappers whose ``lists_frozen_parameters`` is False (the course's
        ``LoRALinear`` lists ``[A, B]``, not the frozen weight it wraps).
        """
        if trainable_only is None:
            trainable_only = not self.lists_frozen_parameters
        return [Parameter.of(value, name not in module.frozen)
                for _, module in self.named_modules() for name, value in module.own_parameters()
                if not (trainable_only and name in module.frozen)]

    def gradients(self, trainable_only: bool | None = None) -> list:
        """``X_grad`` for each array of ``parameters(trainable_only)`` (``None`` if none yet)."""
        if trainable_only is None:
            trainable_only = not self.lists_frozen_parameters
        return [self.get_grad(n) for n, _ in self.named_parameters(trainable_only=trainable_only)]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """How many numbers the parameters hold (the trainable ones with ``trainable_only``)."""
        return sum(p.size for _, p in self.named_parameters(trainable_only=trainable_only))

    def get_submodule(self, path: str) -> "Module":
        module = self
        for part in path.split(".") if path else []:
            child = getattr(module, part, None)
            if not isinstance(child, Module):
                known = [n for n, _ in self.named_modules() if n]
                raise AttributeError(f"no submodule {path!r} (stuck at {part!r}); "
                                     f"modules are: {', '.join(known)}")
            module = child
        return module

    def get_parameter(self, name: str) -> np.ndarray:
        module, attr = parameter_owner(self, name)
        if attr not in module.param_names:
            raise AttributeError(f"{name.rpartition('.')[0] or 'model'} has no parameter {attr!r}; "
                                 f"it has {list(module.param_names)}")
        return getattr(module, attr)

    def get_grad(self, name: str):
        module, attr = parameter_owner(self, name)
        return getattr(module, attr + "_grad", None)

    # ---- trainable flags -------------------------------------------------
    def is_trainable(self, name: str) -> bool:
        return name not in self.frozen

    def requires_grad_(self, flag: bool = True, names=None) -> "Module":
        """Set the trainable flag of this module's own parameters (all or ``names``)."""
        for name in names if names is not None else self.param_names:
            if name not in self.param_names:
                raise ValueError(f"{type(self).__name__} has no parameter {name!r}")
            if flag:
                self.frozen.discard(name)
            else:
                self.frozen.add(name)
                setattr(self, name + "_grad", None)
        return self

    def freeze(self) -> "Module":
        """Freeze every parameter below this module (no gradients, still returns dx)."""
        for _, module in self.named_modules():
            module.requires_grad_(False)
        return self

    def unfreeze(self) -> "Module":
        for _, module in self.named_modules():
            module.requires_grad_(True)
        return self

    def zero_grad(self) -> None:
        """Gradients of trainable parameters become zeros; frozen ones stay ``None``."""
        for _, module in self.named_modules():
            for name, value in module.own_parameters():
                trainable = name not in module.frozen
                setattr(module, name + "_grad", np.zeros_like(value) if trainable else None)

    def clear_grads(self) -> None:
        """Forget this module's own gradients (``X_grad = None``), so that the next
        backward *sets* them: the course's standalone layers do this, the model never."""
        for name in self.param_names:
            setattr(self, name + "_grad", None)

    def _accumulate(self, name: str, grad: np.ndarray) -> None:
        """``X_grad += grad`` (allocating on first use)."""
        current = getattr(self, name + "_grad", None)
        if current is None or current.shape != grad.shape:
            setattr(self, name + "_grad", grad.astype(getattr(self, name).dtype, copy=True))
        else:
            current += grad

    def check_backward(self, dout, cache: str, shape_of=None) -> None:
        """Refuse a ``backward`` with no ``forward`` before it (the attribute ``cache`` is
        missing) or whose ``dout`` does not have the shape of the forward's output."""
        saved = getattr(self, cache, None)
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward "
                               f"(nothing cached to differentiate)")
        expected = tuple(shape_of(saved)) if shape_of else saved.shape
        if np.shape(dout) != expected:
            raise ValueError(f"{type(self).__name__}.backward: dout has shape {np.shape(dout)}, "
                             f"but the forward's output had shape {expected}")

    def wants_grad(self, name: str) -> bool:
        return name not in self.frozen and getattr(self, name, None) is not None

    # ---- modes -----------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def astype(self, dtype) -> "Module":
        """Cast every parameter (e.g. to float64 for gradient checks)."""
        for _, module in self.named_modules():
            for name, value in module.own_parameters():
                setattr(module, name, value.astype(dtype))
                setattr(module, name + "_grad", None)
        return self

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class Parameter(np.ndarray):
    """What ``Module.parameters()`` returns: a *view* of a parameter array (same memory,
    so ``p -= lr * g`` updates the model) that also answers PyTorch's two questions,
    ``p.numel()`` and ``p.requires_grad``, so Hugging Face-style counting code runs::

        sum(p.numel() for p in model.parameters() if p.requires_grad)

    ``requires_grad`` is read when the view is made; freeze with ``requires_grad_``.
    """

    @classmethod
    def of(cls, array, requires_grad):
        view = array.view(cls)
        view.requires_grad = bool(requires_grad)
        return view

    def __array_finalize__(self, obj):
        self.requires_grad = False          # results computed from a parameter are not one

    def numel(self) -> int:
        return self.size


class ModuleList(Module):
    """A list of modules whose children are named ``0``, ``1``, ..."""

    def __init__(self, modules):
        super().__init__()
        self._items = list(modules)

    def children(self):
        for i, m in enumerate(self._items):
            yield str(i), m

    def __getattr__(self, name):
        if name.isdigit() and "_items" in self.__dict__ and int(name) < len(self._items):
            return self._items[int(name)]
        raise AttributeError(name)

    def __setitem__(self, i, module):
        self._items[i] = module

    def __getitem__(self, i):
        return self._items[i]

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(self._items)


def parameter_owner(model, name: str) -> tuple[Module, str]:
    """``(module, attr)`` holding the parameter ``name``: ``"layers.0.mlp.fc1.weight"`` ->
    the ``fc1`` module and ``"weight"``; its gradient is ``attr + "_grad"`` there.

    Needs only ``model.get_submodule``, so it works on any object that speaks the
    protocol (a ``PeftModel``, a wrapper), not just on a ``Module``.
    """
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def set_submodule(root: Module, path: str, module: Module) -> None:
    """Replace the module at dotted ``path`` (used by PEFT wrappers)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path)
    if isinstance(parent, ModuleList):
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


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
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise ValueError(f"index {bad} out of range for an embedding of "
                             f"{self.num_embeddings} rows (valid: 0..{self.num_embeddings - 1})")
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
    shifted = flat - flat.max(-1, keepdims=True)            # (N, V), log-sum-exp trick
    probs = np.exp(shifted)                                 # (N, V)
    sumexp = np.einsum("nv->n", probs)                      # (N,), row sums (fast einsum)
    nll = np.log(sumexp) - shifted[rows, safe_t]            # -log p(target)
    loss = float((nll * keep).sum() / count) if keep.any() else float("nan")
    probs /= sumexp[:, None]                                # softmax
    dlogits = probs                                         # dL/dlogits = (p - onehot) / count
    dlogits[rows, safe_t] -= 1.0
    dlogits *= (keep / count)[:, None].astype(flat.dtype)
    return loss, dlogits.reshape(logits.shape).astype(logits.dtype, copy=False)
