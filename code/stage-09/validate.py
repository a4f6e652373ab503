"""Argument checks shared by every layer, config and course class.

One function per kind of check, so a value is accepted or refused the same way
everywhere, with a message that names the argument, the value and the limit.
``True`` is not a positive integer here, although ``isinstance(True, int)``
holds in Python: ``LoRALayer(rank=True)`` would otherwise build a rank-1 layer
by accident.
"""
from __future__ import annotations

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
            or not value > 0:
        raise ValueError(f"{what or name} must be > 0, got {name}={value!r}")
    return value
