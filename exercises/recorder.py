"""The child process of the grader: run a checker on the learner's file, record what crosses.

    python -I recorder.py --child 9.6 FILE RECORD      (started by ``sandbox.run_child``)

``Recorder`` wraps the learner's module, and every object of the learner's that
reaches the checker, in a ``Proxy``: attribute reads, attribute writes and calls
go to the real object and are written down (``transcript.Encoder``), with what the
learner's code did in place to the checker's arrays and library objects. The
record is pickled as plain data to RECORD. Before the learner's file is loaded,
the process caps its own memory, file sizes and CPU time (``limit_resources``).
Nothing here is trusted by the grader: ``sandbox.replay`` decides.
"""
from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from checking import run_check  # noqa: E402
from transcript import Encoder, Forwarding, _is_learner, describe_exception, leaves  # noqa: E402

TIMEOUT = float(os.environ.get("EXERCISE_TIMEOUT", 120))
MEMORY_LIMIT = 4 * 2 ** 30               # bytes of address space for the learner's process
KINDS = (Exception, SystemExit, KeyboardInterrupt)


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
        return _is_learner(value, self.enc.learner) or isinstance(value, (tuple, list, dict)) \
            and any(self._needs(v) for v in (value.values() if isinstance(value, dict) else value))

    def unwrap(self, value):
        if isinstance(value, Proxy):
            return self.enc.objects[object.__getattribute__(value, "_hid")]
        if isinstance(value, (tuple, list)) and any(isinstance(v, (Proxy, tuple, list, dict)) for v in value):
            items = [self.unwrap(v) for v in value]
            return tuple(items) if isinstance(value, tuple) else items
        if isinstance(value, dict) and any(isinstance(v, (Proxy, tuple, list, dict)) for v in value.values()):
            return {k: self.unwrap(v) for k, v in value.items()}
        return value

    def register(self, args) -> tuple[list, list]:
        """Bind the checker's objects inside ``args`` to oids; return (bindings, objects)."""
        regs, objs = [], []
        for path, leaf in leaves(args):
            oid = self.enc.oid(leaf)
            regs.append((path, oid))
            if isinstance(leaf, np.ndarray):
                self.watched.setdefault(oid, (leaf, leaf.copy()))
            else:
                objs.append(leaf)
        return regs, objs

    def updates(self, objs) -> list:
        """The watched arrays that changed since the last event, and ``objs`` as they are now."""
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


class Proxy(Forwarding):
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
    from catalog import find
    limit_resources()
    (ex,) = find(ex_id)
    record = record_run(ex, Path(path))
    tmp = record_path + ".part"
    with open(tmp, "wb") as f:
        pickle.dump(record, f, protocol=4)
    os.replace(tmp, record_path)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:])
    else:
        sys.exit("usage: recorder.py --child EXERCISE FILE RECORD (started by check.py)")
