"""Before collecting anything: are the packages the suite needs installed in this Python?

Run with a Python that lacks them (a system ``python3 -m pytest``), every test module
would fail to import, one traceback each; instead the run stops at once with one message
naming what is missing and the command that installs it. The list is ``pyproject.toml``'s
own (the project's dependencies and its ``dev`` extra), not a copy.
"""
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def missing_requirements() -> list[str]:
    """The requirements of ``pyproject.toml`` (dependencies + dev) not installed here."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    missing = []
    for requirement in wanted:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(requirement)
    return missing


def pytest_configure(config):
    missing = missing_requirements()
    if missing:
        venv = ROOT / ".venv" / "bin" / "python"
        hint = f" ({venv} -m pytest, if .venv is already made)" if venv.exists() else ""
        raise pytest.UsageError(
            f"{sys.executable} lacks {', '.join(missing)} (pyproject.toml). Run the suite with "
            f"`make test`{hint}: it creates .venv and installs them. Or install them into this "
            f"Python with `pip install -e \".[dev]\"`.")
