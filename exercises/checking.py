"""The checker toolkit: run a learner's code and explain, in plain words, what is wrong.

Every exercise's checker takes the learner's module (their ``exNN_*.py``, loaded
fresh) and a ``Trace``; it calls the learner's functions on random float64
inputs and compares the results with the library in ``code/stage-09`` (or with
central differences, for gradients). The first disagreement stops the check with
an ``ExerciseFailure`` whose message is meant to be read by the learner:

    grad_A: right shape, wrong values: worst index (2, 5), yours 0.118, expected 0.473

``run_check`` turns the outcome into a ``Result``: ``passed``, ``not_implemented``
(the learner's code raised ``NotImplementedError``: the untouched stub),
``failed`` (a check failed, or the learner's code raised), or ``error`` (the
checker itself broke: a bug to report, never the learner's fault).
"""
from __future__ import annotations

import importlib.util
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EXERCISES_DIR = Path(__file__).resolve().parent
LIBRARY_DIR = EXERCISES_DIR.parent / "code" / "stage-09"
for _p in (str(LIBRARY_DIR), str(EXERCISES_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from gradcheck import numerical_gradient, rel_error  # noqa: E402  (the library's)


class ExerciseFailure(AssertionError):
    """A check failed; the message is written for the learner."""


@dataclass
class Trace:
    """The checks passed so far (printed before a failure, so progress shows)."""
    passed: list = field(default_factory=list)

    def ok(self, what: str) -> None:
        self.passed.append(what)


@dataclass
class Result:
    status: str                  # passed | not_implemented | failed | error
    message: str = ""
    passed: list = field(default_factory=list)


# ---------------------------------------------------------------- loading code
def load_module(path: Path, name: str):
    """Import the file at ``path`` as a fresh module (edits are always picked up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop(name, None)
    spec.loader.exec_module(module)
    return module


def _learner_frame(tb, path: Path):
    """The deepest traceback frame inside the learner's file, or None."""
    frames = [f for f in traceback.extract_tb(tb) if Path(f.filename).resolve() == path.resolve()]
    return frames[-1] if frames else None


def run_check(checker, path: Path | None, module_name: str, wrap=None, module=None) -> Result:
    """Load ``path`` and run ``checker(module, trace)``; never raises.

    ``wrap(module)`` -> what the checker sees instead of the module (the sandbox's
    recording proxy); ``module`` skips loading (the sandbox's replay)."""
    trace = Trace()
    loaded = None
    try:
        if module is None:
            loaded = module = load_module(path, module_name)
            if wrap is not None:
                module = wrap(module)
        checker(module, trace)
    except NotImplementedError as exc:
        return Result("not_implemented", f"not implemented yet: {exc}", trace.passed)
    except ExerciseFailure as exc:
        return Result("failed", str(exc), trace.passed)
    except Exception as exc:  # noqa: BLE001 -- anything the learner's code may raise
        if isinstance(exc, AttributeError) and loaded is not None and exc.obj is loaded:
            return Result("failed", f"your file does not define `{exc.name}`, which the "
                          f"exercise asks for (is the file empty, or was `{exc.name}` renamed "
                          "or deleted?). The stub defines it; to start over, move your file "
                          "away and run `python exercises/make_stubs.py`", trace.passed)
        frame = getattr(exc, "learner_frame", None)
        if frame is None and path is not None:
            found = _learner_frame(exc.__traceback__, path)
            frame = (found.lineno, found.line) if found is not None else None
        if frame is not None or isinstance(exc, SyntaxError):
            where = (f" at {Path(path).name if path else 'your file'} line {frame[0]}: "
                     f"`{frame[1]}`" if frame is not None else "")
            return Result("failed", f"your code raised {type(exc).__name__}{where}\n  {exc}",
                          trace.passed)
        return Result("error", "the checker itself crashed (please report this):\n"
                      + "".join(traceback.format_exception(exc)), trace.passed)
    return Result("passed", "", trace.passed)


# ------------------------------------------------------------- array checks
def fmt_index(idx) -> str:
    return str(tuple(int(i) for i in idx)) if len(idx) != 1 else f"({int(idx[0])},)"


def as_array(name: str, value, like=None) -> np.ndarray:
    """``value`` as a float array, or a learner-facing failure explaining why not."""
    if value is None:
        raise ExerciseFailure(f"{name} is None: did you forget to return it (or to set it)?")
    if isinstance(value, (list, tuple)) and like is not None and np.ndim(like) > 0:
        raise ExerciseFailure(f"{name} should be a NumPy array, got a {type(value).__name__}")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ExerciseFailure(f"{name} should be a NumPy array of numbers, "
                              f"got {type(value).__name__}") from None
    return arr


def expect_shape(name: str, value, shape, context: str = "") -> np.ndarray:
    arr = as_array(name, value)
    shape = tuple(shape)
    if arr.shape == shape:
        return arr
    msg = f"{name} has shape {arr.shape}, expected {shape}{context}"
    if arr.shape == shape[::-1] and len(shape) == 2:
        msg += ": it looks transposed"
    elif arr.size == int(np.prod(shape)):
        msg += ": same number of elements, so a reshape went wrong somewhere"
    elif len(arr.shape) < len(shape) and arr.shape == shape[len(shape) - len(arr.shape):]:
        msg += ": the leading (batch) axes are missing"
    elif len(arr.shape) > len(shape) and arr.shape[len(arr.shape) - len(shape):] == shape:
        msg += ": sum over the extra leading (batch) axes"
    raise ExerciseFailure(msg)


def expect_close(name: str, value, expected, atol: float = 1e-9, rtol: float = 1e-7,
                 factors=(), mistakes=(), context: str = "") -> np.ndarray:
    """Compare with the reference; on failure, say *how* it differs.

    ``factors``: ``[(value, explanation), ...]`` or ``[(value, label, explanation), ...]``
    -- classic mistakes that scale the answer by a known constant (a missing ``alpha / r``).
    ``mistakes``: ``[(wrong_answer, explanation), ...]`` -- what a classic mistake
    computes (e.g. the output without the residual); matched before anything else.
    """
    expected = np.asarray(expected, dtype=np.float64)
    arr = expect_shape(name, value, expected.shape, context)
    if not np.all(np.isfinite(arr)):
        idx = np.argwhere(~np.isfinite(arr))[0]
        raise ExerciseFailure(f"{name} contains {arr[tuple(idx)]} at index {fmt_index(idx)}")
    if np.allclose(arr, expected, atol=atol, rtol=rtol):
        return arr
    for wrong, why in mistakes:
        wrong = np.asarray(wrong, dtype=np.float64)
        if wrong.shape == arr.shape and np.allclose(arr, wrong, atol=atol, rtol=rtol):
            raise ExerciseFailure(f"{name} is not right: {why}")
    raise ExerciseFailure(diagnose(name, arr, expected, atol, rtol, factors))


def diagnose(name, arr, expected, atol, rtol, factors) -> str:
    close = lambda a, b: np.allclose(a, b, atol=atol, rtol=rtol)  # noqa: E731
    scale = np.max(np.abs(expected), initial=0.0)
    if not np.any(arr) and scale > 0:
        return (f"{name} is zero everywhere, but the expected values are not "
                f"(largest |expected| = {scale:.3g})")
    if arr.ndim == 2 and arr.shape[0] == arr.shape[1] and close(arr.T, expected):
        return f"{name} is the transpose of the expected array"
    if close(-arr, expected):
        return f"{name} has the wrong sign (yours = -expected)"
    denom = float(np.sum(expected * expected))
    if denom > 0:
        c = float(np.sum(arr * expected)) / denom
        if c != 0 and close(arr, c * expected):
            for value, *label, why in factors:
                if abs(c - value) <= 1e-6 * abs(value):
                    named = f"{label[0]} = {value:.4g}" if label else f"{value:.4g}"
                    return f"{name} is off by a factor of {named}: {why}"
            return f"{name} is off by a constant factor: yours = {c:.4g} x expected"
    idx = np.unravel_index(np.argmax(np.abs(arr - expected)), expected.shape)
    return (f"{name}: right shape, wrong values: worst index {fmt_index(idx)}, "
            f"yours {arr[idx]:.6g}, expected {expected[idx]:.6g} "
            f"(relative error {rel_error(arr, expected):.2e})")


def expect_equal(name: str, value, expected, context: str = "") -> None:
    """Exact comparison of scalars, strings, ints (counts)."""
    if isinstance(expected, (int, np.integer)) and not isinstance(expected, bool):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
    if value != expected:
        raise ExerciseFailure(f"{name} is {value!r}, expected {expected!r}{context}")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise ExerciseFailure(message)


def expect_tuple(function: str, out, fields: str) -> tuple:
    """``out`` must be a tuple with one item per name in ``fields`` (``"grad_A, grad_B"``);
    otherwise the message says what came back instead."""
    n = len(fields.split(","))
    if not (isinstance(out, tuple) and len(out) == n):
        got = "None (a missing return?)" if out is None else type(out).__name__
        if isinstance(out, (tuple, list)):
            got += f" of length {len(out)}"
        raise ExerciseFailure(f"{function} must return a tuple ({fields}), got {got}")
    return out


def expect_raises(exc_types, fn, message: str) -> BaseException:
    """``fn()`` must raise one of ``exc_types`` (input validation a learner wrote); returns
    the exception, whose message a checker may inspect."""
    try:
        fn()
    except NotImplementedError:
        raise
    except exc_types as exc:
        return exc
    except Exception as exc:  # noqa: BLE001
        raise ExerciseFailure(f"{message} (it raised {type(exc).__name__}: {exc})") from None
    raise ExerciseFailure(message + " (nothing was raised)")


def expect_grad(name: str, analytic, loss, array: np.ndarray, tol: float = 1e-7) -> None:
    """Compare a learner's gradient with central differences of ``loss()`` w.r.t. ``array``."""
    arr = expect_shape(name, analytic, array.shape, " (a gradient has its parameter's shape)")
    numeric = numerical_gradient(loss, array)
    if np.max(np.abs(arr) + np.abs(numeric), initial=0.0) < 1e-12:
        return
    err = rel_error(arr, numeric)
    if err <= tol:
        return
    if not np.any(arr):
        raise ExerciseFailure(f"{name} is zero everywhere, but the numerical gradient is not")
    idx = np.unravel_index(np.argmax(np.abs(arr - numeric)), numeric.shape)
    raise ExerciseFailure(
        f"{name} disagrees with the numerical gradient (central differences of "
        f"sum(output * G) for a random G): relative error {err:.2e}; worst index "
        f"{fmt_index(idx)}: yours {arr[idx]:.6g}, numerical {numeric[idx]:.6g}")


def expect_unchanged(name: str, before: np.ndarray, after: np.ndarray) -> None:
    if not np.array_equal(before, after):
        raise ExerciseFailure(f"your code modified {name} in place; compute new arrays "
                              f"instead (the caller still needs the original)")


def rng_for(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def randn(rng, *shape, scale: float = 1.0) -> np.ndarray:
    return rng.standard_normal(shape) * scale


def expect_number(name: str, value, expected, rtol: float = 1e-9, context: str = "") -> float:
    """A scalar close to ``expected`` (relative tolerance), with both shown on failure."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ExerciseFailure(f"{name} should be a number, got {value!r}") from None
    if expected == float("inf"):
        ok = number == float("inf")
    else:
        ok = abs(number - expected) <= rtol * max(abs(expected), 1e-300) or number == expected
    if not ok:
        raise ExerciseFailure(f"{name} is {number:.6g}, expected {expected:.6g}{context}")
    return number


def tiny_gpt(seed: int = 0, d_model: int = 8, n_layers: int = 2, well_scaled: bool = False):
    """A float64 mini GPT (vocab 11, context 12, 2 heads). ``well_scaled`` redraws every
    parameter ~ N(0, 1/fan_in) so central differences can resolve its gradients."""
    from minigpt import GPT, GPTConfig
    cfg = GPTConfig(vocab_size=11, context_length=12, d_model=d_model, n_layers=n_layers,
                    n_heads=2, dtype=np.float64)
    model = GPT(cfg, seed=seed)
    if well_scaled:
        rng = np.random.default_rng(seed)
        for _, p in model.named_parameters():
            p[...] = rng.standard_normal(p.shape) / np.sqrt(p.shape[-1])
    return model
