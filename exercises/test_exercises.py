"""The exercises' own tests.

Default run (CI): every reference solution passes its checker; every untouched
stub reports "not implemented yet" without crashing the checker; the committed
stubs equal what ``make_stubs.py`` generates and contain no solution line; the
committed ``answers.md`` equals what ``make_answers.py`` generates.

``pytest exercises --learner -k ex9_6``: grade the learner's own file instead.
"""
from __future__ import annotations

import pytest

import check
import make_stubs
from catalog import all_exercises

EXERCISES = all_exercises()
IDS = [e.slug for e in EXERCISES]


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_reference_solution_passes(ex):
    result = check.grade(ex, solutions=True)
    assert result.status == "passed", check.report(ex, result, ex.solution_path)


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_untouched_stub_reports_not_implemented(ex):
    result = check.grade(ex)
    assert result.status == "not_implemented", check.report(ex, result, ex.stub_path)
    assert f"Exercise {ex.id}:" in result.message


@pytest.mark.learner
@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_learner(ex):
    """Grades exercises/<slug>.py; only collected with --learner."""
    result = check.grade(ex)
    if result.status != "passed":
        pytest.fail(check.report(ex, result, ex.stub_path), pytrace=False)


def test_every_solution_has_a_checker_and_a_stub():
    solutions = {p.stem for p in make_stubs.solution_files()}
    assert solutions == set(IDS), ("solutions without a checker: "
                                   f"{sorted(solutions - set(IDS))}; checkers without a "
                                   f"solution: {sorted(set(IDS) - solutions)}")
    for ex in EXERCISES:
        assert ex.id == make_stubs.exercise_id(ex.solution_path), ex.slug


def test_committed_stubs_are_fresh():
    stale = [p.name for p, text in make_stubs.expected_stubs().items()
             if not p.exists() or p.read_text() != text]
    assert not stale, (f"stale or missing stubs: {stale}. Regenerate with "
                       f"`python exercises/make_stubs.py --force` (after saving any edits of yours)")


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_stub_leaks_no_solution_line(ex):
    solution = ex.solution_path.read_text().splitlines()
    stub = ex.stub_path.read_text()
    stub_lines = {line.strip() for line in stub.splitlines()}
    assert "BEGIN SOLUTION" not in stub and "END SOLUTION" not in stub
    regions = make_stubs.solution_regions("\n".join(solution))
    inside = {i for begin, end, _, _ in regions for i in range(begin, end + 1)}
    given = {line.strip() for i, line in enumerate(solution) if i not in inside}
    for i in sorted(inside):
        code = solution[i].strip()
        if len(code) > 12 and not code.startswith("#") and code not in given:
            assert code not in stub_lines, f"{ex.stub_path.name} contains solution line {code!r}"


def test_stub_markers_are_validated():
    bad = ["    # BEGIN SOLUTION\n  # END SOLUTION\n", "# BEGIN SOLUTION\n",
           "# END SOLUTION\n", "x = 1\n", "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n"]
    for text in bad:
        with pytest.raises(make_stubs.StubError):
            make_stubs.solution_regions(text)


def test_check_command_line(capsys):
    assert check.main(["9.6", "--solutions"]) == 0
    assert check.main(["9.6"]) == 1
    assert "NOT IMPLEMENTED YET" in capsys.readouterr().out
    assert check.main(["no-such-exercise"]) == 2


def test_committed_answers_are_fresh():
    import make_answers
    assert make_answers.ANSWERS.read_text() == make_answers.generate(), (
        "answers.md is stale: run `python exercises/make_answers.py`")


def test_every_conceptual_question_has_an_answer():
    import re

    import make_answers
    heading = re.compile(r"^### (\S+) ", re.M)
    questions = heading.findall((make_answers.HERE / "conceptual.md").read_text())
    answers = heading.findall(make_answers.ANSWERS.read_text())
    assert questions == answers, f"questions {questions} vs answers {answers}"
    assert {"9.1", "9.2", "9.3", "9.4"} <= set(questions)


def test_readme_lists_every_exercise():
    readme = (make_stubs.EXERCISES_DIR / "README.md").read_text()
    missing = [e.slug for e in EXERCISES if f"`{e.slug}.py`" not in readme]
    assert not missing, f"exercises/README.md does not list {missing}"
