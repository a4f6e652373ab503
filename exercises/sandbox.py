"""Grade a learner's file without trusting it: a child process, a time limit, a replay.

    grade_isolated(ex, path)  ->  Result

1. A child process (``python -I sandbox.py --child 9.6 FILE RECORD``) loads the
   learner's file and runs the exercise's checker on it, with the module and
   every object it hands out wrapped in ``Recorder`` proxies. It writes a record:
   the checker's verdict and everything the learner's code gave the checker.
   The child has a time limit (an infinite loop is stopped) and its printed
   output is kept only up to ``OUTPUT_LIMIT`` bytes.
2. No record, or a record that does not unpickle as plain data, is a failure
   with a message saying why (the file exited, timed out, crashed Python).
   The child's exit status is never read as a verdict: ``sys.exit(0)`` fails.
3. A child verdict "not implemented" or "failed" is reported as it is (a file
   can only lose by forging one). A child verdict "passed" is not believed: the
   grader runs the same checker again in its own process, on ``Replayer``
   proxies that return the recorded values, with its own checking helpers and
   its own library. That run's verdict is the grade. A file that patched the
   checking helpers, NumPy or the library in the child changed only the child:
   the replay either fails on the recorded (wrong) values, or asks for a value
   the record does not have (``Divergence``: the runs differed).

What the replay cannot see: effects that never cross the proxies, such as an
array the learner's object shares with one the checker mutates later. Those
checks run in the child only; a hostile file can skip them, but every value the
learner's code returns is checked by the grader's own code.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from checking import Result, run_check  # noqa: E402
from transcript import Decoder, Divergence, Encoder, describe_exception, load_record, \
    rebuild_exception  # noqa: E402

TIMEOUT = float(os.environ.get("EXERCISE_TIMEOUT", 120))
OUTPUT_LIMIT = 16_000
MEMORY_LIMIT = 4 * 2 ** 30               # bytes of address space for the learner's process
KINDS = (Exception, SystemExit, KeyboardInterrupt)


def _walk(value, path=()):
    """(path, leaf) for the arrays, generators and library objects inside call arguments."""
    import numpy as np
    from transcript import LIBRARY_MODULES
    if isinstance(value, (np.ndarray, np.random.Generator)) or \
            type(value).__module__ in LIBRARY_MODULES and hasattr(value, "__dict__"):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _walk(v, path + (i,))
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, (str, int)):
                yield from _walk(v, path + (k,))


# ---------------------------------------------------------------- child: recording
class Recorder:
    """Wraps the learner's module; every crossing from its code to the checker is recorded."""

    def __init__(self, module, path: Path):
        self.enc = Encoder(module.__name__)
        self.path = str(path)
        self.events: list = []
        self.proxies: dict[int, Proxy] = {}
        self.watched: dict[int, tuple] = {}        # oid -> (array, snapshot)
        self.root = self.wrap(module)

    def wrap(self, value):
        from transcript import _is_learner
        if isinstance(value, Proxy):
            return value
        if _is_learner(value, self.enc.learner) or isinstance(value, types.ModuleType) \
                and value.__name__ == self.enc.learner:
            hid = self.enc.handle(value)
            if hid not in self.proxies:
                self.proxies[hid] = Proxy(self, hid)
            return self.proxies[hid]
        if isinstance(value, tuple) and any(self._needs(v) for v in value):
            return tuple(self.wrap(v) for v in value)
        if isinstance(value, list) and any(self._needs(v) for v in value):
            return [self.wrap(v) for v in value]
        if isinstance(value, dict) and any(self._needs(v) for v in value.values()):
            return {k: self.wrap(v) for k, v in value.items()}
        return value

    def _needs(self, value) -> bool:
        from transcript import _is_learner
        return _is_learner(value, self.enc.learner) or isinstance(value, (tuple, list, dict)) \
            and any(self._needs(v) for v in (value.values() if isinstance(value, dict) else value))

    def unwrap(self, value):
        if isinstance(value, Proxy):
            return self.enc.objects[object.__getattribute__(value, "_hid")]
        if isinstance(value, (tuple, list)) and any(isinstance(v, (Proxy, tuple, list, dict)) for v in value):
            return type(value)(self.unwrap(v) for v in value)
        if isinstance(value, dict) and any(isinstance(v, (Proxy, tuple, list, dict)) for v in value.values()):
            return {k: self.unwrap(v) for k, v in value.items()}
        return value

    def register(self, args) -> tuple[list, list]:
        """Bind the checker's objects inside ``args`` to oids; return (bindings, objects)."""
        import numpy as np
        regs, objs = [], []
        for path, leaf in _walk(args):
            oid = self.enc.oid(leaf)
            regs.append((path, oid))
            if isinstance(leaf, np.ndarray):
                self.watched.setdefault(oid, (leaf, leaf.copy()))
            else:
                objs.append(leaf)
        return regs, objs

    def updates(self, objs) -> list:
        import numpy as np
        out = []
        for oid, (arr, snap) in list(self.watched.items()):
            if arr.shape != snap.shape or not np.array_equal(arr, snap, equal_nan=arr.dtype.kind in "fc"):
                out.append(self.enc.encode(arr))
                self.watched[oid] = (arr, arr.copy())
        return out + [self.enc.encode(o) for o in objs]

    def outcome(self, fn):
        try:
            value = fn()
        except KINDS as exc:
            return ("err", describe_exception(exc, self.path)), exc
        return ("ok", self.enc.encode(value)), value


class Proxy:
    """The checker's view of one of the learner's objects, in the child."""
    __slots__ = ("_rec", "_hid")

    def __init__(self, rec: Recorder, hid: int):
        object.__setattr__(self, "_rec", rec)
        object.__setattr__(self, "_hid", hid)

    def _target(self):
        return self._rec.enc.objects[self._hid]

    def __getattr__(self, name):
        rec = object.__getattribute__(self, "_rec")
        result, value = rec.outcome(lambda: getattr(self._target(), name))
        rec.events.append(("get", self._hid, name, result))
        if result[0] == "err":
            raise value
        return rec.wrap(value)

    @property
    def __dict__(self):
        return self.__getattr__("__dict__")

    def __setattr__(self, name, value):
        rec = self._rec
        raw = rec.unwrap(value)
        regs, _ = rec.register((raw,))
        setattr(self._target(), name, raw)
        rec.events.append(("set", self._hid, name, regs))

    def __call__(self, *args, **kwargs):
        rec = self._rec
        raw_args, raw_kwargs = rec.unwrap(args), rec.unwrap(kwargs)
        regs, objs = rec.register((raw_args, raw_kwargs))
        result, value = rec.outcome(lambda: self._target()(*raw_args, **raw_kwargs))
        rec.events.append(("call", self._hid, regs, result, rec.updates(objs)))
        if result[0] == "err":
            raise value
        return rec.wrap(value)


def record_run(ex, path: Path) -> dict:
    """Run ``ex``'s checker on ``path`` through ``Recorder`` proxies -> the record (the
    child's job; the tests also call it in-process on trusted files)."""
    holder = {}

    def wrap(module):
        holder["rec"] = Recorder(module, Path(path))
        return holder["rec"].root

    result = run_check(ex.check, Path(path), f"learner_{ex.slug}", wrap=wrap)
    rec = holder.get("rec")
    return {"status": result.status, "message": result.message, "passed": list(result.passed),
            "events": rec.events if rec is not None else []}


def limit_resources() -> None:
    """Before the learner's code runs: memory, file size and CPU time caps it cannot raise."""
    import resource
    for which, value in ((resource.RLIMIT_AS, MEMORY_LIMIT), (resource.RLIMIT_FSIZE, 2 * 2 ** 27),
                         (resource.RLIMIT_CPU, int(TIMEOUT) + 30)):
        soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


def child_main(ex_id: str, path: str, record_path: str) -> None:
    from registry import find
    limit_resources()
    (ex,) = find(ex_id)
    record = record_run(ex, Path(path))
    tmp = record_path + ".part"
    with open(tmp, "wb") as f:
        pickle.dump(record, f, protocol=4)
    os.replace(tmp, record_path)


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
        found = dict(_walk(args))
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


class ReplayObject:
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


def run_child(ex, path: Path, timeout: float = TIMEOUT):
    """Run the checker on ``path`` in a child process -> ``(record, printed)``, where
    ``record`` is the child's record (a dict) or a ``Result`` saying why there is none."""
    path = Path(path).resolve()
    with tempfile.TemporaryDirectory(prefix="exercise-") as tmp:
        record_path = Path(tmp) / "record.pkl"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
        proc = subprocess.Popen([sys.executable, "-I", str(Path(__file__).resolve()), "--child",
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


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:])
    else:
        sys.exit("usage: sandbox.py --child EXERCISE FILE RECORD (started by check.py)")
