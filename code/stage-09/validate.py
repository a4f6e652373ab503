"""Argument checks shared by every layer, config and course class.

One function per kind of check, so a value is accepted or refused the same way
everywhere, with a message that names the argument, the value and the limit.
``True`` is not a positive integer here, although ``isinstance(True, int)``
holds in Python: ``LoRALayer(rank=True)`` would otherwise build a rank-1 layer
by accident.
"""
from __future__ import annotations

import math

import numpy as np


def positive_int(value, name: str, what: str | None = None):
    """``value`` if it is a positive integer (NumPy integers too, ``bool`` never).

    Otherwise ``ValueError("<what> must be a positive integer, got <name>=<value>")``;
    ``what`` defaults to ``name`` (e.g. ``"LoraConfig.r"`` for ``name="r"``).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{what or name} must be a positive integer, got {name}={value!r}")
    return value


def one_of(value, name: str, allowed, what: str | None = None):
    """``value`` if it is among ``allowed``, else a ``ValueError`` listing them."""
    if value not in allowed:
        raise ValueError(f"{what or name} must be one of {list(allowed)}, got {name}={value!r}")
    return value


def probability(value, name: str, what: str | None = None):
    """``value`` if ``0 <= value < 1`` (a dropout rate), else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not 0.0 <= value < 1.0:
        raise ValueError(f"{what or name} must be in [0, 1), got {name}={value!r}")
    return value


def positive_number(value, name: str, what: str | None = None):
    """``value`` if it is a number > 0 (``bool`` never), else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{what or name} must be a finite number > 0, got {name}={value!r}")
    return value


# ---- with a range: the value, the limit, and where it came from
def check_number(name, value, low, high=math.inf, inclusive=True, high_inclusive=True,
                 where="") -> float:
    """``value`` as a float if it is a real, finite number in the range, else a
    ``ValueError`` naming ``name``, the value and the limit (a string ``"1e-3"`` from a
    config file, a NaN learning rate or ``lr=0`` are refused before anything changes)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r} "
                         f"({type(value).__name__}){where}")
    value = float(value)
    lo_ok = value >= low if inclusive else value > low
    hi_ok = value <= high if high_inclusive else value < high
    if not (math.isfinite(value) and lo_ok and hi_ok):
        limit = (f"{'>=' if inclusive else '>'} {low:g}" if high == math.inf else
                 f"in {'[' if inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}")
        raise ValueError(f"{name} must be a finite number {limit}, got {value!r}{where}")
    return value


def check_int(name, value, low, high=None, where="") -> int:
    """``value`` as an int if it is an integer (not a bool, not ``2.0``, not ``"2"``) in
    ``low..high``, else a ``ValueError`` naming ``name``, the value and the limit."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}){where}")
    if value < low or (high is not None and value > high):
        limit = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an integer {limit}, got {value}{where}")
    return int(value)


def as_array(name, value, dtype=None) -> np.ndarray:
    """``np.asarray(value)``, but a ragged nested list (rows of different lengths) or a
    non-numeric value raises a ``ValueError`` naming ``name`` instead of NumPy's own."""
    try:
        array = np.asarray(value, dtype=dtype)
    except (ValueError, TypeError) as err:
        lengths = ([len(r) if hasattr(r, "__len__") else "scalar" for r in value][:8]
                   if isinstance(value, (list, tuple)) else None)
        raise ValueError(f"{name} must be a rectangular array; got {type(value).__name__}"
                         + (f" with rows of lengths {lengths}" if lengths else "")
                         + f" ({err})") from None
    if array.dtype == object:
        raise ValueError(f"{name} must be a rectangular array of numbers, got an array of "
                         f"Python objects (a ragged list?) of shape {array.shape}")
    return array


def adapter_name(name) -> str:
    """An adapter name becomes a directory name in ``save_pretrained``: a non-empty string
    without path separators, ``..`` or a leading dot (``"../../x"`` would write outside)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise ValueError(f"adapter_name {name!r} may not contain '/', '\\' or '..' nor start "
                         f"with '.': it names a directory when the adapter is saved")
    return name


def annotated_type(value, annotation, name: str, what: str | None = None) -> None:
    """Check ``value`` against a dataclass field's annotation string (``"int"``,
    ``"bool"``, ``"float"``, ``"str"``, ``"list[...]"``, ``"None"``, joined by ``|``):
    a JSON ``"false"`` for a bool, ``"8"`` for an int or ``True`` for a rank is refused
    instead of being read as something else."""
    if not isinstance(annotation, str):             # a real type (no postponed annotations)
        annotation = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    parts = {p.strip().split("[")[0] for p in annotation.split("|")}
    if not parts & {"int", "float", "bool", "str", "list"}:
        return                                      # a type this check does not know
    is_bool = isinstance(value, (bool, np.bool_))
    ok = ((value is None and "None" in parts)
          or (is_bool and "bool" in parts)
          or (not is_bool and isinstance(value, (int, np.integer)) and parts & {"int", "float"})
          or (not is_bool and isinstance(value, (float, np.floating)) and "float" in parts)
          or (isinstance(value, str) and "str" in parts)
          or (isinstance(value, (list, tuple)) and "list" in parts))
    if not ok:
        raise ValueError(f"{what or name} must be {annotation.replace(' | ', ' or ')}, got "
                         f"{name}={value!r} ({type(value).__name__})")
