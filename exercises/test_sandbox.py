"""The grader cannot be fooled: each way a file might try is tried, and fails.

Two kinds of tests. Files run through the real child process (``grade_isolated``):
exiting early, looping forever, printing without end, being empty, patching the
checking helpers / the library / NumPy, printing a fake verdict, forging the
record. And the replay's fidelity, in-process on trusted code (fast): for every
reference solution and every classic mistake of ``test_mistakes.py``, the grader's
own re-run on the recorded values reaches the same verdict as the checker did
on the live code -- so the grade never depends on the child's word for a pass.
"""
from __future__ import annotations

import pickle

import pytest

from catalog import all_exercises, find
from recorder import record_run
from sandbox import OUTPUT_LIMIT, grade_isolated, replay
from test_mistakes import MISTAKES, _case_id
from transcript import load_record

EXERCISES = all_exercises()
(LORA_BACKWARD,) = find("9.6")
SOLUTION = LORA_BACKWARD.solution_path.read_text()
FIRST_LINE = "    r, d_in = A.shape\n"                   # the first line of lora_backward's body
WRONG = SOLUTION.replace("grad_B = scaling * dy.T", "grad_B = 2 * scaling * dy.T")
assert FIRST_LINE in SOLUTION and WRONG != SOLUTION


def grade(tmp_path, text, timeout=60):
    path = tmp_path / "ex9_6_lora_backward.py"
    path.write_text(text)
    return grade_isolated(LORA_BACKWARD, path, timeout=timeout)


def test_the_solution_passes_and_a_wrong_answer_fails(tmp_path):
    assert grade(tmp_path, SOLUTION).status == "passed"
    result = grade(tmp_path, WRONG)
    assert result.status == "failed" and "grad_B for x of shape (5, 8) is off by a constant factor" in result.message


@pytest.mark.parametrize("where", ["import", "call"])
@pytest.mark.parametrize("how", ["sys.exit(0)", "os._exit(0)", "raise SystemExit(0)"])
def test_exiting_early_fails(tmp_path, how, where):
    line = f"import os, sys; {how}\n"
    text = line + WRONG if where == "import" else WRONG.replace(FIRST_LINE, "    " + line)
    result = grade(tmp_path, text)
    assert result.status == "failed"
    assert "ended the process (exit status 0) before the checks finished" in result.message


def test_an_infinite_loop_is_stopped(tmp_path):
    result = grade(tmp_path, SOLUTION.replace(FIRST_LINE, "    while True:\n        pass\n"),
                   timeout=4)
    assert result.status == "failed" and "no result after 4 seconds" in result.message
    assert "infinite loop" in result.message


def test_endless_output_is_bounded(tmp_path):
    noisy = WRONG.replace(FIRST_LINE, "    print('spam ' * 200_000)\n" + FIRST_LINE)
    result = grade(tmp_path, noisy)
    assert result.status == "failed" and "grad_B for x of shape (5, 8) is off" in result.message
    assert f"first {OUTPUT_LIMIT} of" in result.message
    assert len(result.message) < 2 * OUTPUT_LIMIT


def test_an_empty_file_gets_a_learner_message(tmp_path):
    result = grade(tmp_path, "")
    assert result.status == "failed", result.message
    assert "your file does not define `lora_backward`" in result.message
    assert "checker itself crashed" not in result.message


PATCH_HELPERS = """
import sys
for _m in list(sys.modules.values()):
    if getattr(_m, "__name__", "") == "checking" or getattr(_m, "__name__", "").startswith("checks_"):
        for _n in list(vars(_m)):
            if _n.startswith("expect"):
                setattr(_m, _n, lambda *a, **k: a[1] if len(a) > 1 else None)
"""
PATCH_LIBRARY = """
import peft
_orig = peft.LoRALayer.delta_backward
def _doubled(self, dout):
    out = _orig(self, dout)
    self.B_grad = 2 * self.B_grad
    return out
peft.LoRALayer.delta_backward = _doubled
"""
PATCH_NUMPY = """
import numpy
numpy.allclose = lambda *a, **k: True
numpy.array_equal = lambda *a, **k: True
"""
PATCH_RUN_CHECK = """
import checking
from checking import Result
checking.run_check = lambda *a, **k: Result("passed")
"""


@pytest.mark.parametrize("patch", [PATCH_HELPERS, PATCH_LIBRARY, PATCH_NUMPY, PATCH_RUN_CHECK],
                         ids=["checking-helpers", "library", "numpy", "run_check"])
def test_patching_the_checker_does_not_pass_a_wrong_answer(tmp_path, patch):
    result = grade(tmp_path, WRONG + patch)
    assert result.status == "failed", result.message
    assert "grad_B" in result.message or "changed how the checks ran" in result.message


def test_a_printed_verdict_is_not_a_verdict(tmp_path):
    result = grade(tmp_path, "print('Exercise 9.6: PASSED')\nimport sys\nsys.exit(0)\n")
    assert result.status == "failed" and "ended the process" in result.message


FORGE = """
import atexit, pickle, sys
def _forge():
    record = {"status": "passed", "message": "", "passed": ["everything"], "events": EVENTS}
    with open(sys.argv[-1], "wb") as f:
        pickle.dump(record, f)
atexit.register(_forge)
sys.exit(0)
"""


@pytest.mark.parametrize("events, phrase", [
    ("[]", "changed how the checks ran"),
    ("[('get', 0, 'lora_backward', ('ok', None))]", "the checks could not run on what your file returned"),
    ("[('get', 0, 'lora_backward', ('ok', ('h', 0)))] * 9", "changed how the checks ran")])
def test_a_forged_record_fails(tmp_path, events, phrase):
    result = grade(tmp_path, FORGE.replace("EVENTS", events))
    assert result.status == "failed" and phrase in result.message, result.message


def test_a_record_naming_a_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"""
import atexit, os, pickle, sys
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
atexit.register(lambda: pickle.dump({{"status": "passed", "events": [Evil()]}}, open(sys.argv[-1], "wb")))
sys.exit(0)
"""
    result = grade(tmp_path, evil)
    assert result.status == "failed" and "not readable" in result.message
    assert not marker.exists()
    with pytest.raises(BaseException, match="names posix.system|names os.system"):
        load_record(pickle.dumps(__import__("os").system))


# ---- the replay decides as the live checker does (in-process, trusted code) -------
def _replayed(ex, path):
    record = load_record(pickle.dumps(record_run(ex, path)))   # as the child writes it
    return record, replay(ex.check, record["events"])


@pytest.mark.parametrize("ex", EXERCISES, ids=[e.slug for e in EXERCISES])
def test_replay_passes_every_reference_solution(ex):
    record, result = _replayed(ex, ex.solution_path)
    assert record["status"] == "passed", record["message"]
    assert result.status == "passed", result.message
    assert result.passed == record["passed"]


@pytest.mark.parametrize("case", MISTAKES, ids=[_case_id(c) for c in MISTAKES])
def test_replay_alone_catches_every_classic_mistake(case, tmp_path):
    ex_id, old, new, phrase = case
    (ex,) = find(ex_id)
    path = tmp_path / ex.solution_path.name
    path.write_text(ex.solution_path.read_text().replace(old, new))
    record, result = _replayed(ex, path)
    assert record["status"] == "failed"
    assert (result.status, result.message) == (record["status"], record["message"])
    assert phrase in result.message


def test_the_record_cannot_name_a_dangerous_function():
    import numpy as np

    from transcript import Decoder, Divergence
    dec = Decoder(None)
    for enc in [("f", "builtins", "eval"), ("f", "builtins", "open"), ("f", "numpy", "save"),
                ("f", "numpy", "load"), ("f", "checkpoint", "save_model"), ("c", "os", "PathLike"),
                ("f", "peft", "np.save"), ("c", "subprocess", "Popen"), ("f", "numpy._core", "x")]:
        with pytest.raises(Divergence):
            dec.decode(enc)
    assert dec.decode(("f", "numpy", "tanh")) is np.tanh
    assert dec.decode(("c", "numpy", "float64")) is np.float64


def test_a_memory_hog_fails_with_a_message(tmp_path):
    # np.empty only reserves address space: without the limit this allocation would succeed
    # (and the test fail) without touching 8 GB of the machine's memory
    hog = SOLUTION.replace(FIRST_LINE, "    hog = np.empty(2 ** 30)\n" + FIRST_LINE)
    result = grade(tmp_path, hog)
    assert result.status == "failed" and "MemoryError" in result.message, result.message


def test_processes_the_file_starts_are_stopped(tmp_path):
    import os
    import signal
    import time
    from pathlib import Path
    marker = tmp_path / "pid"
    later = (f"import os, pathlib, time; pathlib.Path({str(marker)!r}).write_text(str(os.getpid())); "
             "time.sleep(60)")
    spawn = (f"import os, subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {later!r}])\n"
             f"while not os.path.exists({str(marker)!r}):\n    time.sleep(0.05)\n")
    assert grade(tmp_path, spawn + SOLUTION).status == "passed"   # it had started by then
    pid = int(marker.read_text())
    deadline = time.time() + 10

    def alive():
        status = Path(f"/proc/{pid}/status")
        return status.exists() and "\nState:\tZ" not in status.read_text()
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    try:
        assert not alive(), "a process the learner's file started outlived the check"
    finally:
        if alive():
            os.kill(pid, signal.SIGKILL)


def test_values_survive_the_record():
    import numpy as np

    from transcript import Decoder, Encoder
    gen = np.random.default_rng(3)
    gen.standard_normal(5)
    values = [None, True, 3, 2.5, 1 + 2j, "s", b"b", np.float64(0.1), np.float32(0.2),
              np.int64(7), np.bool_(True), np.dtype("float32"), (1, [2, {"k": (3,)}]), {4, 5},
              np.arange(6.0).reshape(2, 3), np.arange(4, dtype=np.uint8), gen, np.float64]
    encoded = pickle.dumps(Encoder("learner").encode(values))
    decoded = Decoder(None).decode(load_record(encoded))
    for before, after in zip(values, decoded):
        if isinstance(before, np.ndarray):
            assert after.dtype == before.dtype and np.array_equal(after, before)
        elif isinstance(before, np.random.Generator):
            assert after.standard_normal(3).tolist() == before.standard_normal(3).tolist()
        else:
            assert type(after) is type(before) and after == before, (before, after)


def test_numpy_scalars_from_the_learner_are_graded(tmp_path):
    (ex,) = find("9.21")
    source = ex.solution_path.read_text()
    assert source.count("    return 4 + 32 / blocksize\n") == 1
    path = tmp_path / ex.solution_path.name
    path.write_text(source.replace("    return 4 + 32 / blocksize\n",
                                   "    return np.float64(4 + 32 / blocksize)\n"))
    result = grade_isolated(ex, path)
    assert result.status == "passed", result.message


def test_len_indexing_and_membership_of_a_learner_object_replay(tmp_path):
    """A checker may use len(), [] and `in` on the learner's objects."""
    from registry import Exercise

    from checking import expect
    source = ("class Bag:\n    def __init__(self, items):\n        self.items = list(items)\n"
              "    def __len__(self):\n        return len(self.items)\n"
              "    def __getitem__(self, i):\n        return self.items[i]\n"
              "    def __contains__(self, x):\n        return x in self.items\n")

    def check(mod, t):
        bag = mod.Bag([3, 1, 2])
        expect(len(bag) == 3 and bag[1] == 1 and 2 in bag and 7 not in bag, "a Bag")
        t.ok("len, [] and in")

    ex = Exercise("0.1", "ex0_1_bag", "a bag", "ours", check)
    path = tmp_path / "ex0_1_bag.py"
    path.write_text(source)
    record = load_record(pickle.dumps(record_run(ex, path)))
    assert record["status"] == "passed", record["message"]
    assert replay(check, record["events"]).status == "passed"
    path.write_text(source.replace("return len(self.items)", "return 4"))
    record = load_record(pickle.dumps(record_run(ex, path)))
    assert replay(check, record["events"]).status == "failed"


def test_other_correct_styles_pass(tmp_path):
    """A namedtuple for the gradients, and properties for A and B, are as good as the
    solution's plain tuple and attributes."""
    named = SOLUTION.replace("    return grad_A, grad_B, grad_x",
                             "    from collections import namedtuple\n"
                             "    return namedtuple('Grads', 'A B x')(grad_A, grad_B, grad_x)")
    assert named != SOLUTION and grade(tmp_path, named).status == "passed"
    (ex,) = find("9.5")
    source = ex.solution_path.read_text()
    props = source + '''

class _Factors(LoRALayer):
    """The same layer, its factors kept in a dict behind properties."""
    def __init__(self, *args, **kwargs):
        object.__setattr__(self, "_f", {})
        super().__init__(*args, **kwargs)

    A = property(lambda self: self._f["A"], lambda self, v: self._f.__setitem__("A", v))
    B = property(lambda self: self._f["B"], lambda self, v: self._f.__setitem__("B", v))


LoRALayer = _Factors
'''
    path = tmp_path / ex.solution_path.name
    path.write_text(props)
    assert grade_isolated(ex, path).status == "passed"


def test_writing_into_the_course_files_fails(tmp_path):
    """The grader imports some library modules only while replaying: a file that writes
    code there would run code in the grader, so any change to them fails the check."""
    import os
    from pathlib import Path
    probe = Path(__file__).resolve().parent / f"zz_sandbox_probe_{os.getpid()}.py"
    try:
        result = grade(tmp_path, f"open({str(probe)!r}, 'w').write('import checking')\n" + SOLUTION)
        assert result.status == "failed" and "course's own files changed" in result.message
        assert probe.name in result.message
    finally:
        probe.unlink(missing_ok=True)
