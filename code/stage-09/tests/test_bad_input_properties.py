"""Property: every bad input to the public API gets a clear error and changes nothing.

The cases (one argument of one function, one kind of bad value) are catalogued in
``tests/bad_inputs.py``; hypothesis draws the values. For each drawn value the call
must raise, the message must name the argument (and a scalar value as given), and
the model it was called on must be exactly as before: same modules, same trainable
flags, same parameter values, same gradients.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bad_inputs import CASES, outcome


def test_the_catalogue_has_at_least_200_distinct_cases():
    ids = [case.id for case in CASES]
    assert len(set(ids)) == len(ids) >= 200


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
@settings(max_examples=4, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_bad_input_gets_a_clear_error_and_changes_nothing(case, data):
    value = data.draw(case.strategy, label=case.argument)
    category, message = outcome(case, value)
    assert category == "clear", f"{case.id} with {value!r:.80}: {category} ({message})"
