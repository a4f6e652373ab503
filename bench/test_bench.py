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



BUDGET_MINUTES = 20        # the limit for the whole main job on 2 cores
MARGIN = 0.8               # planned to fit in 80% of it: a busier machine, a slower one


def test_the_planned_main_job_fits_its_budget_on_two_idle_cores(tmp_path):
    """``job_costs.py --plan`` replays the planned runs, at the CPU seconds measured for
    each kind (the runners' cost constants), through the job's schedule on 2 workers."""
    done = subprocess.run([sys.executable, os.path.join(HERE, "job_costs.py"), "--plan"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    projected = float(done.stdout.split("projected ")[1].split(" min")[0])
    assert projected <= MARGIN * BUDGET_MINUTES, done.stdout
