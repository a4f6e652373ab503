"""pytest options for the exercises.

    pytest exercises                     CI: reference solutions pass, untouched stubs
                                         report "not implemented", stubs and answers are fresh
    pytest exercises --learner -k ex9_6  grade YOUR exercises/ex9_6_*.py (fails with the
                                         checker's message until your code is right)
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser):
    parser.addoption("--learner", action="store_true", default=False,
                     help="exercises: grade your own files exercises/exN_M_*.py instead of "
                          "checking the reference solutions")


@pytest.fixture
def learner_mode(request):
    return request.config.getoption("--learner")


def pytest_collection_modifyitems(config, items):
    """Keep only the learner tests with --learner, and only the CI tests without it."""
    learner = config.getoption("--learner")
    here = Path(__file__).resolve().parent
    keep, drop = [], []
    for item in items:
        if Path(str(item.fspath)).resolve().parent != here:
            keep.append(item)
            continue
        is_learner_test = item.get_closest_marker("learner") is not None
        (keep if is_learner_test == learner else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_configure(config):
    config.addinivalue_line("markers", "learner: grades the learner's own exercise file")
