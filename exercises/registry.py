"""Every exercise with a checker: its number, its file, its title and where it comes from.

``kind`` says who sets the exercise:

* ``course``: the course's exercises page (9.5-9.12);
* ``suggested``: the course's implementation page ("try next" suggestions);
* ``ours``: added by this module (backward passes and methods the course skips).

Checkers register themselves with ``@exercise(...)`` in the ``checks_*.py`` files;
``catalog.all_exercises()`` imports them and returns the list in order (this
module imports no checker, so the checkers can import it without a cycle).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import checking

EXERCISES_DIR = checking.EXERCISES_DIR
SOLUTIONS_DIR = EXERCISES_DIR / "solutions"


@dataclass(frozen=True)
class Exercise:
    id: str                      # "9.6"
    slug: str                    # "ex9_6_lora_backward" (the file name, and the pytest id)
    title: str
    kind: str                    # course | suggested | ours
    check: Callable

    @property
    def stub_path(self) -> Path:
        return EXERCISES_DIR / f"{self.slug}.py"

    @property
    def solution_path(self) -> Path:
        return SOLUTIONS_DIR / f"{self.slug}.py"


_REGISTRY: dict[str, Exercise] = {}


def exercise(id: str, slug: str, title: str, kind: str):
    """Decorator: register ``check(module, trace)`` as the checker of exercise ``id``."""
    if kind not in ("course", "suggested", "ours"):
        raise ValueError(f"kind must be course, suggested or ours, got {kind!r}")

    def deco(check):
        _REGISTRY[id] = Exercise(id, slug, title, kind, check)
        return check
    return deco


def order_key(ex: Exercise):
    return tuple(int(part) for part in ex.id.split("."))


def registered() -> list[Exercise]:
    """The exercises whose checker modules have been imported so far (see ``catalog``)."""
    return list(_REGISTRY.values())
