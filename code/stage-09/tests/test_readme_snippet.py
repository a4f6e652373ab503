"""The README's quick-start snippet runs from the repository root as written, and prints
what the README says it prints (the ``# ...`` lines after the code)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def runnable_snippets(text):
    """``[(code, printed lines)]`` for each python block of ``text`` that ends with the
    output it prints, as ``# ...`` comment lines."""
    out = []
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        lines = block.rstrip("\n").split("\n")
        n = len(lines)
        while n and lines[n - 1].startswith("# "):
            n -= 1
        if n < len(lines):
            out.append(("\n".join(lines[:n]) + "\n", [line[2:] for line in lines[n:]]))
    return out


def test_readme_snippet_runs_from_the_root_and_prints_what_it_says():
    snippets = runnable_snippets((ROOT / "README.md").read_text())
    assert snippets, "README.md has no python block ending with its printed output"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for code, printed in snippets:
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"the README snippet fails from {ROOT}:\n{run.stderr[-2000:]}"
        assert run.stdout.splitlines() == printed, (run.stdout, printed)


def test_snippet_parser_splits_code_from_output():
    text = "```python\nprint(1)\n# 1\n```\n```python\nx = 2\n```\n"
    assert runnable_snippets(text) == [("print(1)\n", ["1"])]
