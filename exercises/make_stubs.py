"""Write the learner's exercise files (stubs) from the reference solutions.

One source of truth: ``solutions/exN_M_name.py`` holds the complete code, with
each part the learner writes between two marker lines::

        # BEGIN SOLUTION <hint shown to the learner>
        ...reference code...
        # END SOLUTION

The stub ``exN_M_name.py`` is the same file with every such region replaced by
one line, at the indentation of the ``BEGIN`` line::

        raise NotImplementedError("Exercise N.M: <hint shown to the learner>")

Usage (from the repository root)::

    python exercises/make_stubs.py            # write stubs that are missing or untouched
    python exercises/make_stubs.py --check    # exit 1 if a committed stub is stale
    python exercises/make_stubs.py --force    # overwrite every stub (loses learner edits)

A stub records the hash of its own generated body in its first line, so a stub
the learner has edited is never overwritten without ``--force``.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

EXERCISES_DIR = Path(__file__).resolve().parent
SOLUTIONS_DIR = EXERCISES_DIR / "solutions"
BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION\b ?(?P<hint>.*)$")
END = re.compile(r"^(?P<indent>[ \t]*)# END SOLUTION\s*$")
HEADER = ("# Exercise {id}: your file to edit. Generated from solutions/{name} by "
          "make_stubs.py (body sha256 {digest}).\n")
HEADER_RE = re.compile(r"^# Exercise .*\(body sha256 (?P<digest>[0-9a-f]{12})\)\.\n")


class StubError(ValueError):
    pass


def exercise_id(path: Path) -> str:
    """``ex9_6_lora_backward.py`` -> ``"9.6"``."""
    match = re.match(r"ex(\d+)_(\d+)_", path.name)
    if not match:
        raise StubError(f"{path.name}: exercise files are named exN_M_name.py")
    return f"{match.group(1)}.{match.group(2)}"


def solution_regions(text: str, name: str = "<solution>"):
    """``[(begin_line, end_line, indent, hint), ...]`` (0-based, inclusive); validates markers."""
    regions, open_at = [], None
    for i, line in enumerate(text.splitlines()):
        begin, end = BEGIN.match(line), END.match(line)
        if begin:
            if open_at is not None:
                raise StubError(f"{name}:{i + 1}: BEGIN SOLUTION inside the region opened at "
                                f"line {open_at[0] + 1}")
            open_at = (i, begin.group("indent"), begin.group("hint").strip())
        elif end:
            if open_at is None:
                raise StubError(f"{name}:{i + 1}: END SOLUTION without a BEGIN SOLUTION")
            if end.group("indent") != open_at[1]:
                raise StubError(f"{name}:{i + 1}: END SOLUTION is not indented like its BEGIN")
            regions.append((open_at[0], i, open_at[1], open_at[2]))
            open_at = None
        elif "SOLUTION" in line and re.search(r"#\s*(BEGIN|END)\b", line):
            raise StubError(f"{name}:{i + 1}: malformed marker {line.strip()!r}")
    if open_at is not None:
        raise StubError(f"{name}:{open_at[0] + 1}: BEGIN SOLUTION is never closed")
    if not regions:
        raise StubError(f"{name}: no BEGIN SOLUTION / END SOLUTION region")
    return regions


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_stub(solution: Path) -> str:
    """The stub text for one solution file (header line + body)."""
    text = solution.read_text()
    ex_id = exercise_id(solution)
    lines = text.splitlines(keepends=True)
    out, pos = [], 0
    for begin, end, indent, hint in solution_regions(text, solution.name):
        out.extend(lines[pos:begin])
        message = f"Exercise {ex_id}: {hint}" if hint else f"Exercise {ex_id}: your code here"
        out.append(f"{indent}raise NotImplementedError({_quote(message)})\n")
        pos = end + 1
    out.extend(lines[pos:])
    body = "".join(out)
    digest = hashlib.sha256(body.encode()).hexdigest()[:12]
    return HEADER.format(id=ex_id, name=solution.name, digest=digest) + body


def learner_edited(stub_text: str) -> bool:
    """True when the stub's body no longer matches the hash in its header."""
    match = HEADER_RE.match(stub_text)
    if not match:
        return True
    body = stub_text[match.end():]
    return hashlib.sha256(body.encode()).hexdigest()[:12] != match.group("digest")


def solution_files() -> list[Path]:
    return sorted(SOLUTIONS_DIR.glob("ex*_*.py"))


def expected_stubs() -> dict[Path, str]:
    """Every stub path and the text it should have, generated in memory."""
    return {EXERCISES_DIR / s.name: make_stub(s) for s in solution_files()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    parser.add_argument("--force", action="store_true", help="overwrite edited stubs too")
    args = parser.parse_args(argv)
    stale = 0
    for path, text in expected_stubs().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            print(f"stale: {path.name} (run python exercises/make_stubs.py)")
            stale += 1
        elif current is not None and learner_edited(current) and not args.force:
            print(f"kept:  {path.name} has your edits; not overwritten (--force discards them)")
        else:
            path.write_text(text)
            print(f"wrote: {path.name}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
