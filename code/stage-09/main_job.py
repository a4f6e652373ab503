"""The main job (``make run``): the digit comparison and the real-text comparison, one pool.

    python code/stage-09/main_job.py            # results/ and results/text/, README blocks
    python code/stage-09/main_job.py --quick    # results/quick/ and results/text_quick/ only

The same runs as ``compare.py`` then ``compare_text.py`` (each still runs alone, with
the same settings and files), but every run of both goes into one pool of
``--workers`` processes, longest first (``jobs.py``): neither comparison's last long
run leaves a core idle. Each comparison writes its own results (the full job also
refreshes both generated blocks of the README); both record the whole job's cost:
wall and CPU minutes, the load before and after, and the projection to idle cores.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")     # small matmuls; runs go in parallel
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402

import compare  # noqa: E402
import compare_text  # noqa: E402
import jobs  # noqa: E402


def parts(quick=False, workers=2, command="python code/stage-09/main_job.py"):
    """The two comparisons' parsed settings, as ``compare.py [--quick]`` and
    ``compare_text.py [--quick]`` would have them, each recording ``command``."""
    flags = (["--quick"] if quick else []) + ["--workers", str(workers)]
    digits, text = compare.parse_args(flags), compare_text.parse_args(flags)
    digits.command = text.command = command
    return digits, text


def main(argv=None):
    p = argparse.ArgumentParser(description="The digit and real-text comparisons in one pool.")
    p.add_argument("--quick", action="store_true", help="both comparisons' --quick (<= 2 min); "
                   "writes results/quick/ and results/text_quick/ only")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    command = " ".join(["python code/stage-09/main_job.py"] + list(
        argv if argv is not None else sys.argv[1:]))
    digits, text = parts(a.quick, a.workers, command)
    return jobs.run_jobs([compare.comparison_job(digits), compare_text.comparison_job(text)],
                         a.workers, command)


if __name__ == "__main__":
    main()
