"""The catalogue of exercises: every checker module imported, every exercise in order.

Importing this module imports the ``checks_*.py`` files, whose ``@exercise(...)``
decorators fill ``registry``'s table; ``registry`` itself imports no checker, so
the imports run one way (checkers -> registry, catalog -> checkers).
"""
from __future__ import annotations

import checks_adapters  # noqa: F401  (each import registers its checkers)
import checks_lora  # noqa: F401
import checks_lora_variants  # noqa: F401
import checks_prefix  # noqa: F401
import checks_quant  # noqa: F401
import checks_tools  # noqa: F401
from registry import Exercise, order_key, registered  # noqa: F401  (Exercise re-exported)


def all_exercises() -> list[Exercise]:
    return sorted(registered(), key=order_key)


def find(selector: str) -> list[Exercise]:
    """``"9.6"``, ``"ex9_6"``, ``"lora_backward"`` or ``"all"`` -> the matching exercises."""
    exercises = all_exercises()
    if selector == "all":
        return exercises
    exact = [e for e in exercises if selector in (e.id, e.slug)]
    if exact:
        return exact
    return [e for e in exercises if selector.replace("-", "_") in e.slug]
