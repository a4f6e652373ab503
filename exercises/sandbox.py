"""Grade a learner's file without trusting it: a child process, a time limit, a replay.

    grade_isolated(ex, path)  ->  Result

1. A child process (``python -I recorder.py --child 9.6 FILE RECORD``) loads the
   learner's file and runs the exercise's checker on it, with the module and
   every object it hands out wrapped in ``Recorder`` proxies. It writes a record:
   the checker's verdict and everything the learner's code gave the checker.
   The child has a time limit (an infinite loop is stopped) and its printed
   output is kept only up to ``OUTPUT_LIMIT`` bytes.
2. No record, or a record that does not unpickle as plain data, is a failure
   with a message saying why (the file exited, timed out, crashed Python). So
   is a change to the code files of the checkers or the library during the run
   (the grader imports some of them only later, while replaying).
   The child's exit status is never read as a verdict: ``sys.exit(0)`` fails.
3. A child verdict "not implemented" or "failed" is reported as it is (a file
   can only lose by forging one). A child verdict "passed" is not believed: the
   grader runs the same checker again in its own process, on ``Replayer``
   proxies that return the recorded values, with its own checking helpers and
   its own library. That run's verdict is the grade. A file that patched the
   checking helpers, NumPy or the library in the child changed only the child:
   the replay either fails on the recorded (wrong) values, or asks for a value
   the record does not have (``Divergence``: the runs differed).

What crosses besides return values: every array the checker handed the learner's
code is watched, and its new contents travel with the next event in which it
changed; a library object passed as an argument comes back as it is after the
call; a view the learner's code keeps of a checker's array is rebuilt as a view
of the grader's copy. What the replay cannot see: a library object (not an
array) the checker handed over in an earlier call and the learner's code
changes later. Checks of that kind run in the child only, where a hostile file
could skip them; every value the learner's code returns is checked here.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from checking import Result, run_check  # noqa: E402
from recorder import TIMEOUT  # noqa: E402
from transcript import LIBRARY_DIR, Decoder, Divergence, Forwarding, leaves, load_record, \
    rebuild_exception  # noqa: E402

OUTPUT_LIMIT = 16_000


# ---------------------------------------------------------------- parent: replaying
class Replayer:
    """Hands the checker the recorded values, in order, and checks the order matches."""

    def __init__(self, events: list):
        if not isinstance(events, list):
            raise Divergence("the record has no event list")
        self.events, self.pos = events, 0
        self.dec = Decoder(self)
        self.proxies: dict[int, ReplayObject] = {}

    def proxy(self, hid) -> ReplayObject:
        if not isinstance(hid, int):
            raise Divergence("a malformed handle")
        if hid not in self.proxies:
            self.proxies[hid] = ReplayObject(self, hid)
        return self.proxies[hid]

    def next(self, kind: str, hid: int, name=None) -> tuple:
        if self.pos >= len(self.events):
            raise Divergence(f"the checker needed more from your code than the record holds "
                             f"(a {kind} of {name or 'an object'})")
        event = self.events[self.pos]
        self.pos += 1
        if not (isinstance(event, tuple) and len(event) >= 3 and event[0] == kind
                and event[1] == hid and (name is None or event[2] == name)):
            raise Divergence(f"event {self.pos}: expected a {kind} of {name or 'an object'}, the "
                             f"record has {str(event[:3])[:80]}")
        return event

    def bind(self, regs, args) -> None:
        if not isinstance(regs, list):
            raise Divergence("malformed bindings")
        found = dict(leaves(args))
        for item in regs:
            if not (isinstance(item, tuple) and len(item) == 2 and item[0] in found):
                raise Divergence("the arguments differ between the two runs")
            self.dec.bind(item[1], found[item[0]])

    def result(self, outcome):
        if not (isinstance(outcome, tuple) and len(outcome) == 2):
            raise Divergence("a malformed outcome")
        if outcome[0] == "err" and isinstance(outcome[1], dict):
            raise rebuild_exception(outcome[1])
        if outcome[0] != "ok":
            raise Divergence("a malformed outcome")
        return self.dec.decode(outcome[1])

    def finished(self) -> bool:
        return self.pos == len(self.events)


class ReplayObject(Forwarding):
    """The checker's view of one of the learner's objects, in the grader's process."""
    __slots__ = ("_rep", "_hid")

    def __init__(self, rep: Replayer, hid: int):
        object.__setattr__(self, "_rep", rep)
        object.__setattr__(self, "_hid", hid)

    def __getattr__(self, name):
        rep = object.__getattribute__(self, "_rep")
        event = rep.next("get", self._hid, name)
        return rep.result(event[3] if len(event) == 4 else None)

    @property
    def __dict__(self):
        return self.__getattr__("__dict__")

    def __setattr__(self, name, value):
        event = self._rep.next("set", self._hid, name)
        self._rep.bind(event[3] if len(event) == 4 else None, (value,))

    def __call__(self, *args, **kwargs):
        rep = self._rep
        event = rep.next("call", self._hid)
        if len(event) != 5:
            raise Divergence("a malformed call")
        rep.bind(event[2], (args, kwargs))
        for update in event[4] if isinstance(event[4], list) else []:
            rep.dec.decode(update)
        return rep.result(event[3])


def replay(checker, events) -> Result:
    """Run ``checker`` on the recorded values; ``Divergence`` becomes a failure."""
    try:
        rep = Replayer(events)
        result = run_check(checker, None, "", module=rep.proxy(0))
        if result.status == "passed" and not rep.finished():
            raise Divergence(f"the record holds {len(rep.events) - rep.pos} more events than "
                             f"the checks used")
    except Divergence as exc:
        return Result("failed", "your file changed how the checks ran, so its grade cannot be "
                      f"trusted ({exc}). A file may not patch the checker, the library or NumPy; "
                      "if yours does not, please report this")
    if result.status == "error":                    # the recorded values broke the checker
        return Result("failed", "the checks could not run on what your file returned (the "
                      "run that decides the grade crashed); run the check again, and report "
                      "this if your file does nothing unusual:\n" + result.message[-2000:],
                      result.passed)
    return result


# ---------------------------------------------------------------- parent: the child process
def _drain(stream, keep: bytearray, counter: list) -> None:
    for chunk in iter(lambda: stream.read(4096), b""):
        counter[0] += len(chunk)
        if len(keep) < OUTPUT_LIMIT:
            keep.extend(chunk[:OUTPUT_LIMIT - len(keep)])


def _printed(keep: bytearray, total: int) -> str:
    if not total:
        return ""
    text = keep.decode(errors="replace").strip()
    lines = text.splitlines()[-15:]
    more = f" (first {OUTPUT_LIMIT} of {total} bytes kept)" if total > OUTPUT_LIMIT else ""
    return "\nyour file printed" + more + ", ending with:\n" + "\n".join("  | " + ln[:300] for ln in lines)


def course_files(skip: Path) -> dict:
    """``{path: (size, mtime)}`` of every code file of the checkers and the library (and
    their bytecode caches), but ``skip``: the grader imports some of them only while
    replaying, so a file that rewrote one would be running code in the grader."""
    files = {}
    for root in (HERE, LIBRARY_DIR):
        for p in root.rglob("*"):
            if p.suffix in (".py", ".pyc", ".pth", ".so") and p != skip and p.is_file():
                st = p.stat()
                files[str(p)] = (st.st_size, st.st_mtime_ns)
    return files


def run_child(ex, path: Path, timeout: float = TIMEOUT):
    """Run the checker on ``path`` in a child process -> ``(record, printed)``, where
    ``record`` is the child's record (a dict) or a ``Result`` saying why there is none."""
    path = Path(path).resolve()
    before = course_files(path)
    record, printed = _run_child(ex, path, timeout)
    after = course_files(path)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        names = ", ".join(str(Path(c).relative_to(LIBRARY_DIR.parent.parent)) for c in changed[:5])
        return Result("failed", f"the course's own files changed while your file was being "
                      f"checked ({names}{', ...' if len(changed) > 5 else ''}), so the check "
                      "cannot be trusted. If your file writes files, make it stop; see what "
                      "changed with `git status` and restore with `git checkout -- FILE`"), printed
    return record, printed


def _run_child(ex, path: Path, timeout: float):
    with tempfile.TemporaryDirectory(prefix="exercise-") as tmp:
        record_path = Path(tmp) / "record.pkl"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
        proc = subprocess.Popen([sys.executable, "-I", "-B", str(HERE / "recorder.py"), "--child",
                                 ex.id, str(path), str(record_path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=tmp, env=env, start_new_session=True)
        keep, counter = bytearray(), [0]
        reader = threading.Thread(target=_drain, args=(proc.stdout, keep, counter), daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:                                    # the child and anything it started
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        reader.join(5)
        if code is None:
            printed = _printed(keep, counter[0])
            return Result("failed", f"no result after {timeout:g} seconds, so the check was "
                          "stopped: is there an infinite loop (a `while` whose condition never "
                          "turns false) or a very slow loop in your file?" + printed), printed
        printed = _printed(keep, counter[0])
        if not record_path.exists():
            why = ("your file ended the process (exit status 0) before the checks finished: "
                   "remove calls to `sys.exit()`, `exit()`, `quit()` or `os._exit()`" if code == 0
                   else f"the process running your file stopped with exit status {code} before "
                   "the checks finished (a `sys.exit(...)`/`os._exit(...)`, or Python itself "
                   "crashed: out of memory, a signal)")
            return Result("failed", why + printed), printed
        try:
            record = load_record(record_path.read_bytes())
        except Divergence as exc:
            return Result("failed", f"the record of your run is not readable ({exc}): does your "
                          "file write into the checker's files?"), printed
    if not (isinstance(record, dict) and record.get("status") in
            ("passed", "failed", "not_implemented", "error")):
        return Result("failed", "the record of your run is malformed: does your file write into "
                      "the checker's files?"), printed
    return record, printed


def grade_isolated(ex, path: Path, timeout: float = TIMEOUT) -> Result:
    """Grade ``path`` for exercise ``ex`` in a child process; the verdict is decided here."""
    record, printed = run_child(ex, path, timeout)
    if isinstance(record, Result):
        return record
    status = record["status"]
    if status != "passed":                          # a file can only lose by forging these
        message = str(record.get("message", ""))[:20_000]
        passed = [str(p)[:500] for p in record.get("passed", [])][:100] \
            if isinstance(record.get("passed"), list) else []
        return Result(status, message + ("" if status == "not_implemented" else printed), passed)
    return replay(ex.check, record.get("events"))
