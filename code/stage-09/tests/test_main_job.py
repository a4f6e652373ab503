"""The main job's runner: one pool, longest first, its cost recorded, quick never over full."""
import hashlib
import json
import os

import pytest

import compare
import compare_text
import jobs
import main_job

ROOT = os.path.normpath(os.path.join(os.path.dirname(compare.__file__), "..", ".."))


def test_list_schedule_hands_each_task_to_the_first_free_worker():
    assert jobs.list_schedule([3, 3, 2, 2, 2], 2) == 7       # 3+2+2 | 3+2
    assert jobs.list_schedule([2, 2, 2, 3, 3], 2) == 7       # 2+2+3 | 2+3
    assert jobs.list_schedule([5, 1, 1, 1, 1, 1], 2) == 5
    assert jobs.list_schedule([1, 1, 1, 1, 1, 5], 2) == 7    # the long task last: a core waits
    assert jobs.list_schedule([4, 1], 1) == 5


def test_longest_first_keeps_plan_order_among_equals():
    assert jobs.longest_first([1, 5, 3, 5]) == [1, 3, 2, 0]


@pytest.mark.parametrize("workers", [1, 2])
def test_execute_returns_in_call_order_with_cost_recorded(workers):
    calls = [(dict, {"i": i}) for i in range(5)]
    seen = []
    results, cpu = jobs.execute(calls, [0, 4, 1, 3, 2], workers, progress=False,
                                on_result=lambda i, r: seen.append(i))
    assert [r["i"] for r in results] == list(range(5))
    assert all(r["cpu_s"] >= 0 and r["wall_s"] >= 0 for r in results)
    assert len(cpu) == 5 and sorted(seen) == list(range(5))
    if workers == 1:                                          # one worker: exactly longest first
        assert seen == [1, 3, 4, 2, 0]


def test_full_and_quick_jobs_write_where_they_should():
    digits, text = main_job.parts(quick=False)
    assert (digits.out, text.out) == (compare.RESULTS_DIR, compare_text.RESULTS_DIR)
    assert digits.full and text.full
    digits, text = main_job.parts(quick=True)
    assert not digits.full and not text.full
    assert os.path.realpath(digits.out) == os.path.realpath(compare.QUICK_DIR)
    assert os.path.realpath(text.out) == os.path.realpath(compare_text.QUICK_DIR)
    with open(os.path.join(ROOT, ".gitignore")) as f:
        ignored = f.read().split()
    assert "/results/quick/" in ignored and "/results/text_quick/" in ignored


@pytest.mark.parametrize("argv", [["--quick"], ["--methods", "lora_all"], ["--steps", "5"],
                                  ["--lr-sweep", "--methods", "prompt"]])
def test_partial_text_runs_default_to_quick_and_refuse_the_full_results(argv):
    a = compare_text.parse_args(argv)
    assert not a.full
    assert os.path.realpath(a.out).startswith(os.path.realpath(compare_text.QUICK_DIR))
    for committed in (compare_text.RESULTS_DIR, os.path.join(compare_text.RESULTS_DIR, "lr_sweep")):
        with pytest.raises(SystemExit, match="may not overwrite the committed full results"):
            compare_text.parse_args(argv + ["--out", committed])


QUICK_DIRS = tuple(os.path.realpath(d) + os.sep for d in (compare.QUICK_DIR, compare_text.QUICK_DIR))


def _fingerprint():
    """``{path: sha256}`` of the README and every file under results/ but the quick folders."""
    paths = [os.path.join(ROOT, "README.md")]
    for here, _, files in os.walk(os.path.realpath(os.path.join(ROOT, "results"))):
        if not (here + os.sep).startswith(QUICK_DIRS):
            paths += [os.path.join(here, name) for name in files]
    out = {}
    for path in paths:
        with open(path, "rb") as f:
            out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_a_quick_job_leaves_the_full_results_alone():
    """Both comparisons' --quick in one pool (one method each, to stay short): the
    committed results and the README are byte for byte as before; the quick folders
    get the files, with each run's and the job's cost recorded."""
    committed = _fingerprint()
    digits = compare.parse_args(["--quick", "--methods", "prompt"])
    text = compare_text.parse_args(["--quick", "--methods", "prompt"])
    timing = jobs.run_jobs([compare.comparison_job(digits), compare_text.comparison_job(text)],
                           workers=2, command="test", progress=False)
    assert _fingerprint() == committed
    assert timing["parts"]["digit"]["runs"] == 1
    assert timing["parts"]["text"]["runs"] == 2              # Alice and the authorship task
    for out in (digits.out, text.out):
        with open(os.path.join(out, "results.json")) as f:
            meta = json.load(f)["meta"]
        assert meta["job"] == timing and meta["minutes"] == timing["wall_minutes"]
        assert not os.path.exists(os.path.join(out, "progress.jsonl"))
        with open(os.path.join(out, "runs.csv")) as f:
            assert {"cpu_s", "wall_s"} <= set(f.readline().strip().split(","))
    assert 0 < timing["projected_idle_minutes"] <= timing["cpu_minutes"] + 0.01
