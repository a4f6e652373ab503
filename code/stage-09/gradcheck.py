"""Numerical gradient checking: the proof that every hand-written backward is right.

The recipe (the same in every test of this stage):

1. Work in float64 (float32 central differences are too noisy to trust).
2. Contract the output with a *random* upstream gradient ``G``: the scalar
   ``L = sum(f(x) * G)``. An all-ones ``G`` hides bugs that swap or mix
   positions, because every position then weighs the same.
3. Give zero-initialised parameters (LoRA ``B``, adapter up-projections, gates)
   random values first: at zero, many wrong backward formulas give the right
   (zero) answer.
4. Keep dropout *on* when the model trains with it, but replay its masks
   (``replayed_dropout``): a check with dropout off never runs its backward.
5. Compare with the relative error ``max|a-b| / max(|a|+|b|)``. Expect about
   1e-9 or smaller for one layer and below 1e-6 for a whole model; 1e-3 means a bug.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from nn import Dropout
from validate import check_number


def well_scaled(model, seed=0):
    """Re-draw every parameter ~ N(0, 1/fan_in) (in place) so gradients are large
    enough for central differences to resolve: with GPT-2's 0.02 init, key
    gradients are ~1e-6 and drown in the finite-difference noise. ``seed`` is an
    int or a ``np.random.Generator`` (whose stream is then used and advanced)."""
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        p[...] = rng.standard_normal(p.shape) / np.sqrt(p.shape[-1])
    return model


def rel_error(a, b) -> float:
    """``max|a-b| / max(|a|+|b|)`` (0 when both are exactly zero)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denom = np.max(np.abs(a) + np.abs(b))
    return 0.0 if denom == 0 else float(np.max(np.abs(a - b)) / denom)


def numerical_gradient(f, x, h=1e-5):
    """Central differences of the scalar function ``f()`` w.r.t. array ``x`` (in place).

    ``x`` must be a writable float64 array (the function perturbs it in place; in
    float32 a step of 1e-5 drowns in rounding), ``h`` a small positive number.
    """
    if not callable(f):
        raise ValueError(f"f must be a function of no arguments returning the loss, got {f!r:.60}")
    if not isinstance(x, np.ndarray) or x.dtype != np.float64:
        raise ValueError(f"x must be a float64 NumPy array (perturbed in place), got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if not x.flags.writeable:
        raise ValueError("x must be writable: it is perturbed in place (pass the live parameter)")
    check_number("h", h, 0.0, 1e-2, inclusive=False)
    grad = np.zeros_like(x, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        plus = f()
        x[i] = old - h
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad


class GradientMismatch(AssertionError):
    pass


def compare(name, analytic, numeric, tol):
    """Raise with the worst index and both values when the error exceeds ``tol``."""
    if analytic is None:
        raise GradientMismatch(f"{name}: backward produced no gradient (None); is it frozen?")
    analytic, numeric = np.asarray(analytic), np.asarray(numeric)
    if analytic.shape != numeric.shape:
        raise GradientMismatch(f"{name}: gradient shape {analytic.shape}, expected {numeric.shape}")
    # Both essentially zero (e.g. a key bias, which softmax ignores): nothing to compare.
    both_zero = np.max(np.abs(analytic) + np.abs(numeric), initial=0.0) < 1e-8
    err = 0.0 if both_zero else rel_error(analytic, numeric)
    if not err <= tol:
        idx = np.unravel_index(np.argmax(np.abs(analytic - numeric)), numeric.shape)
        raise GradientMismatch(
            f"{name}: relative error {err:.3e} > {tol:.0e}; worst index {tuple(map(int, idx))}: "
            f"analytic {analytic[idx]:.6g}, numerical {numeric[idx]:.6g}")
    return err


def check_module(module, inputs, params=None, tol=1e-7, seed=0, forward_kwargs=None,
                 input_grad=True):
    """Check a module's backward: w.r.t. ``inputs`` (float array) and each parameter.

    ``params``: names as in ``module.named_parameters()`` (default: all trainable).
    Returns ``{name: relative error}``; raises ``GradientMismatch`` on failure.
    """
    rng = np.random.default_rng(seed)
    kwargs = forward_kwargs or {}
    out = module.forward(inputs, **kwargs)
    G = rng.standard_normal(out.shape)
    loss = lambda: float(np.sum(module.forward(inputs, **kwargs) * G))  # noqa: E731
    module.zero_grad()
    module.forward(inputs, **kwargs)
    dx = module.backward(G)
    names = params if params is not None else [n for n, _ in module.named_parameters(trainable_only=True)]
    analytic = {n: np.array(module.get_grad(n), copy=True) if module.get_grad(n) is not None else None
                for n in names}
    errors = {}
    if input_grad:
        errors["input"] = compare("input", dx, numerical_gradient(loss, inputs), tol)
    for n in names:
        errors[n] = compare(n, analytic[n], numerical_gradient(loss, module.get_parameter(n)), tol)
    return errors


def check_model_loss(loss_and_backward, loss_only, arrays: dict, tol=1e-6, max_entries=None, seed=0):
    """Whole-model check of a scalar loss.

    ``loss_and_backward()`` runs forward + backward and returns ``{name: analytic grad}``;
    ``loss_only()`` returns the scalar loss; ``arrays`` maps names to the live arrays
    to perturb. ``max_entries`` samples that many random entries per array (speed).
    """
    rng = np.random.default_rng(seed)
    analytic = loss_and_backward()
    errors = {}
    for name, arr in arrays.items():
        a = analytic.get(name)
        if max_entries is None or arr.size <= max_entries:
            errors[name] = compare(name, a, numerical_gradient(loss_only, arr), tol)
            continue
        if a is None:
            raise GradientMismatch(f"{name}: backward produced no gradient (None)")
        flat_idx = rng.choice(arr.size, max_entries, replace=False)
        num = np.empty(max_entries)
        for j, fi in enumerate(flat_idx):
            i = np.unravel_index(fi, arr.shape)
            old = arr[i]
            arr[i] = old + 1e-5
            plus = loss_only()
            arr[i] = old - 1e-5
            minus = loss_only()
            arr[i] = old
            num[j] = (plus - minus) / 2e-5
        errors[name] = compare(name, np.asarray(a).reshape(-1)[flat_idx], num, tol)
    return errors


class _ReplayedDraws:
    """Stands in for a ``Dropout``'s generator: the first ``random(shape)`` draws from
    the real one, every later call returns that same array again."""

    def __init__(self, rng):
        self.rng, self.draw = rng, None

    def random(self, shape):
        if self.draw is None:
            self.draw = self.rng.random(shape)
        elif self.draw.shape != tuple(shape):
            raise ValueError(f"replayed dropout mask has shape {self.draw.shape}, the "
                             f"forward now asks for {tuple(shape)}")
        return self.draw


@contextmanager
def replayed_dropout(model):
    """Inside the block every ``Dropout`` of ``model`` (in training mode) draws its mask
    once and then reuses it, so the loss is a fixed, differentiable function of the
    weights and central differences can check dropout's backward. Yields the list of
    ``(name, Dropout)`` with ``p > 0``; restores the generators afterwards."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Dropout)]
    saved = [m.rng for _, m in layers]
    for _, m in layers:
        m.rng = _ReplayedDraws(m.rng)
    try:
        yield [(n, m) for n, m in layers if m.p > 0]
    finally:
        for (_, m), rng in zip(layers, saved):
            m.rng = rng
