"""The benchmarks run from anywhere: they find the course module in code/stage-09 themselves.

Only the command lines are checked here (a timing run takes
minutes); ``make bench`` runs them for real.
"""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("script", ["bench.py", "bench_peft.py"])
def test_benchmark_starts_from_another_directory(script, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(HERE, script), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--no-torch" in done.stdout

