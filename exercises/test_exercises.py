"""The exercises' own tests.

Default run (CI): every reference solution passes its checker (graded as a
learner's file is, in a child process); every untouched stub reports "not
implemented yet" without crashing the checker; the committed stubs equal what
``make_stubs.py`` generates, and the generated stubs contain no solution line;
the committed ``answers.md`` equals what ``make_answers.py`` generates.

A learner who works in this checkout edits the stubs: ``make test`` then skips
the checks of the untouched stubs for the files they edited, with a note that
says how to grade their work (``-ra`` prints it), instead of failing.

``pytest exercises --learner -k ex9_6``: grade the learner's own file instead.
"""
from __future__ import annotations

import pytest

import check
import make_stubs
from catalog import all_exercises

EXERCISES = all_exercises()
IDS = [e.slug for e in EXERCISES]


def your_work_note(ex, path=None) -> str | None:
    """A friendly note when ``path`` (the exercise file) holds the learner's edits, else None."""
    path = path or ex.stub_path
    if not path.exists() or not make_stubs.learner_edited(path.read_text()):
        return None
    return (f"{path.name} holds your own work (you edited it), so the check that the "
            f"untouched exercise file says 'not implemented yet' does not apply to it. Grade "
            f"your work with `python exercises/check.py {ex.id}` (or `all`)")


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_reference_solution_passes(ex):
    result = check.grade(ex, solutions=True)
    assert result.status == "passed", check.report(ex, result, ex.solution_path)


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_untouched_stub_reports_not_implemented(ex):
    note = your_work_note(ex)
    if note:
        pytest.skip(note)
    result = check.grade(ex, isolated=False)
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
    expected = make_stubs.expected_stubs()
    yours = [p.name for p in expected if p.exists() and make_stubs.learner_edited(p.read_text())]
    stale = [p.name for p, text in expected.items()
             if p.name not in yours and (not p.exists() or p.read_text() != text)]
    assert not stale, (f"stale or missing stubs: {stale}. Regenerate with "
                       f"`python exercises/make_stubs.py` (it never overwrites a file you edited)")
    if yours:
        pytest.skip(f"{len(yours)} exercise files hold your own work ({', '.join(yours)}); "
                    "their freshness is not checked. Grade them with "
                    "`python exercises/check.py all`")


def test_edited_stub_gets_a_note_not_a_failure(tmp_path):
    (ex,) = [e for e in EXERCISES if e.id == "9.6"]
    path = tmp_path / ex.stub_path.name
    path.write_text(make_stubs.make_stub(ex.solution_path))
    assert your_work_note(ex, path) is None                 # untouched: the CI checks apply
    path.write_text(ex.solution_path.read_text())            # solved in place
    note = your_work_note(ex, path)
    assert "holds your own work" in note and "python exercises/check.py 9.6" in note


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_stub_leaks_no_solution_line(ex):
    solution = ex.solution_path.read_text().splitlines()
    stub = make_stubs.make_stub(ex.solution_path)           # what the learner is given
    stub_lines = {line.strip() for line in stub.splitlines()}
    assert "BEGIN SOLUTION" not in stub and "END SOLUTION" not in stub
    regions = make_stubs.solution_regions("\n".join(solution))
    inside = {i for begin, end, _, _ in regions for i in range(begin, end + 1)}
    given = {line.strip() for i, line in enumerate(solution) if i not in inside}
    for i in sorted(inside):
        code = solution[i].strip()
        if len(code) > 12 and not code.startswith("#") and code not in given:
            assert code not in stub_lines, f"the generated {ex.stub_path.name} gives away {code!r}"


def test_stub_markers_are_validated():
    bad = ["    # BEGIN SOLUTION\n  # END SOLUTION\n", "# BEGIN SOLUTION\n",
           "# END SOLUTION\n", "x = 1\n", "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n"]
    for text in bad:
        with pytest.raises(make_stubs.StubError):
            make_stubs.solution_regions(text)


def test_check_command_line(capsys, tmp_path):
    (ex,) = [e for e in EXERCISES if e.id == "9.6"]
    assert check.main(["9.6", "--solutions"]) == 0
    stub = tmp_path / ex.stub_path.name
    stub.write_text(make_stubs.make_stub(ex.solution_path))
    assert check.main(["9.6", "--file", str(stub)]) == 1
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


def test_answers_quote_the_numbers_the_nf4_checker_prints():
    import re

    import make_answers
    (ex,) = [e for e in EXERCISES if e.id == "9.21"]
    result = check.grade(ex, solutions=True, isolated=False)
    (line,) = [p for p in result.passed if "mean error" in p]
    nf4_err, int4_err = re.search(r"mean error (\S+) vs (\S+) for", line).groups()
    assert f"error of {nf4_err} against {int4_err}" in " ".join(make_answers.ANSWERS.read_text().split())


def test_readme_example_is_what_the_checker_prints(tmp_path):
    """exercises/README.md opens with a report: the checker's real output for 9.6 with
    the scaling forgotten in grad_B."""
    import re
    (ex,) = [e for e in EXERCISES if e.id == "9.6"]
    path = tmp_path / ex.solution_path.name
    source = ex.solution_path.read_text()
    path.write_text(source.replace("grad_B = scaling * dy.T", "grad_B = dy.T"))
    report = check.report(ex, check.grade(ex, path=path, isolated=False), path)
    readme = (make_stubs.EXERCISES_DIR / "README.md").read_text()
    example = re.search(r"```\n(Exercise 9\.6 .*?)\n```", readme, re.S).group(1)
    assert example == report
