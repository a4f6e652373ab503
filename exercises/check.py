"""Grade an exercise: ``python exercises/check.py 9.6``.

    python exercises/check.py 9.6              your exercises/ex9_6_lora_backward.py
    python exercises/check.py lora_backward    the same, by name
    python exercises/check.py all              every exercise
    python exercises/check.py 9.6 --file my/copy.py   a copy of the exercise elsewhere
    python exercises/check.py all --solutions  the reference solutions (all must pass)
    python exercises/check.py --list           the exercises, their numbers and files

Exit status 0 when every selected exercise passed, 1 otherwise.

Your file runs in a separate process with a time limit (``--timeout``, default
120 s, or ``EXERCISE_TIMEOUT``); what it prints is kept up to 16 KB. The grade is
decided in this process, by re-running the checks on the values your code
returned (``sandbox.py``), so a file cannot grade itself.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checking import Result, run_check  # noqa: E402
from catalog import Exercise, all_exercises, find  # noqa: E402
from sandbox import TIMEOUT, grade_isolated  # noqa: E402

LABEL = {"passed": "PASSED", "not_implemented": "NOT IMPLEMENTED YET", "failed": "FAILED",
         "error": "CHECKER ERROR"}


def grade(ex: Exercise, solutions: bool = False, path: Path | None = None,
          isolated: bool = True, timeout: float = TIMEOUT) -> Result:
    """Run ``ex``'s checker on the learner's file (or the solution, or ``path``).

    ``isolated`` (the default): in a child process, the verdict decided here
    (``sandbox.grade_isolated``). ``isolated=False`` runs the file in this
    process: only for code you trust (the reference solutions, the tests' mutants)."""
    path = path or (ex.solution_path if solutions else ex.stub_path)
    if not path.exists():
        return Result("failed", f"{path} does not exist: to get the exercise file back, run "
                      "`python exercises/make_stubs.py`")
    if isolated:
        return grade_isolated(ex, path, timeout)
    prefix = "solution" if solutions else "learner"
    return run_check(ex.check, path, f"{prefix}_{ex.slug}")


def report(ex: Exercise, result: Result, path: Path) -> str:
    lines = [f"Exercise {ex.id}  {ex.title}  ({path.name}): {LABEL[result.status]}"]
    lines += [f"  ok    {step}" for step in result.passed]
    if result.message:
        first, *rest = result.message.splitlines()
        tag = "todo " if result.status == "not_implemented" else "FAIL "
        lines.append(f"  {tag} {first}")
        lines += [f"        {line}" for line in rest]
    return "\n".join(textwrap.shorten(line, 2000) if len(line) > 2000 else line for line in lines)


def list_exercises() -> str:
    rows = [f"  {e.id:6s} {e.kind:10s} {e.slug + '.py':40s} {e.title}" for e in all_exercises()]
    return "\n".join(["  number kind       file                                     title"] + rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Grade PEFT exercises.",
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", help="exercise number (9.6), name, or 'all'")
    parser.add_argument("--solutions", action="store_true", help="check the reference solutions")
    parser.add_argument("--file", type=Path, help="grade this file instead of exercises/exN_M_*.py")
    parser.add_argument("--list", action="store_true", help="list the exercises")
    parser.add_argument("--timeout", type=float, default=TIMEOUT,
                        help=f"seconds per exercise before the check is stopped (default {TIMEOUT:g})")
    args = parser.parse_args(argv)
    if args.list or not args.which:
        print(list_exercises())
        return 0
    selected = find(args.which)
    if not selected:
        print(f"no exercise matches {args.which!r}; try --list")
        return 2
    if args.file and len(selected) != 1:
        print("--file grades one exercise: give its number, e.g. check.py 9.6 --file my.py")
        return 2
    counts: dict[str, int] = {}
    for ex in selected:
        path = args.file.resolve() if args.file else (ex.solution_path if args.solutions
                                                      else ex.stub_path)
        result = grade(ex, args.solutions, path, timeout=args.timeout)
        counts[result.status] = counts.get(result.status, 0) + 1
        print(report(ex, result, path))
    if len(selected) > 1:
        print("\n" + ", ".join(f"{n} {LABEL[s].lower()}" for s, n in counts.items()))
    return 0 if counts.get("passed", 0) == len(selected) else 1


if __name__ == "__main__":
    sys.exit(main())
