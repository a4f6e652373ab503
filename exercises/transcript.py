"""A record of everything a checker received from the learner's code, and its replay.

The grader (``sandbox.py``) runs a checker twice. First in a child process, on the
learner's real module wrapped in ``Recorder`` proxies: every attribute read, call
and exception that crosses from the learner's code to the checker is written
down, with the values encoded in plain data (tuples, strings, numbers, bytes).
Then in the grader's own process, on ``Replayer`` proxies that hand the checker
those recorded values instead of running the learner's code. The verdict is the
second run's: it uses the grader's own, unpatched checking helpers, so a file
that monkeypatches ``checking`` in the child changes nothing but the child.

Encoding (child -> parent), only builtins, so the record unpickles with no class
lookup at all (``load_record`` refuses every global):

    ("t"|"l"|"s", [items])        tuple, list, set         ("d", [(key, value), ...])  dict
    ("a", oid, dtype, shape, bytes)  ndarray                ("n", dtype, bytes)         NumPy scalar
    ("v", oid, base oid, dtype, shape, strides, offset)     a view of an array met before
    ("o", oid, module, qualname, [(attr, value), ...])      an object of a library class
    ("g", oid, state)             np.random.Generator      ("f"|"c", module, qualname) library function / class
    ("h", hid)                    the learner's object     ("r", oid) an object met earlier in this value
    ("j", real, imag)             complex                  ("x", type name)            anything else (opaque)

``oid`` keeps identity: the same child object always has the same oid, and the
parent maps it to one object, updated in place each time it is met again. The
arrays and library objects the checker hands to the learner's code are bound to
the parent's own objects by their position in the call's arguments, so what the
learner's code does to them in place (a modified input, a wrapped model) reaches
the parent's copies too.
"""
from __future__ import annotations

import builtins
import importlib
import inspect
import io
import pickle
import traceback
from pathlib import Path

import numpy as np

LIBRARY_DIR = Path(__file__).resolve().parent.parent / "code" / "stage-09"
LIBRARY_MODULES = frozenset(p.stem for p in LIBRARY_DIR.glob("*.py"))
FUNCTION_MODULES = LIBRARY_MODULES | {"numpy", "math", "builtins"}
# never handed to the checker by name from a record: modules that read or write files
UNSAFE_NAMES = {"checkpoint", "peft_io", "hf_export", "compare", "report", "viz", "bench",
                "bench_peft", "pretrain", "torch_reference", "data_parallel", "os", "sys",
                "subprocess", "shutil", "pickle", "io"}
MAX_RECORD_BYTES = 64 * 2 ** 20


class Divergence(BaseException):
    """The replay asked for something the record does not hold: the two runs differ.
    (A ``BaseException``, so no checker's ``except Exception`` can swallow it.)"""


def _is_learner(value, learner: str) -> bool:
    """An object the checker must not see directly: the learner's functions, classes
    and instances (or anything from a module that is neither NumPy nor the library)."""
    if isinstance(value, (tuple, list, dict, set, frozenset, np.ndarray, np.generic, int, float,
                          complex, str, bytes)):
        return False                        # data, even of a class of the learner's (namedtuple)
    kind = value if isinstance(value, type) else type(value)
    module = getattr(kind, "__module__", "") or ""
    if callable(value) and not isinstance(value, type):
        module = getattr(value, "__module__", None) or module
    if module == learner:
        return True
    top = module.split(".")[0]
    return callable(value) and top not in FUNCTION_MODULES and not isinstance(value, np.generic)


def leaves(value, path=()):
    """``(path, leaf)`` for the arrays, generators and library objects inside call arguments:
    the objects of the checker's that the learner's code may change in place."""
    if isinstance(value, (np.ndarray, np.random.Generator)) or \
            type(value).__module__ in LIBRARY_MODULES and hasattr(value, "__dict__"):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from leaves(v, path + (i,))
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, (str, int)):
                yield from leaves(v, path + (k,))


class Forwarding:
    """For the proxies of both sides: Python looks special methods up on the class, so
    the common ones are forwarded as an attribute read and a call, which the child
    records and the parent replays alike. (Attributes and ``__dict__``: the proxies.)"""
    __slots__ = ()

    def __len__(self):
        return self.__getattr__("__len__")()

    def __getitem__(self, key):
        return self.__getattr__("__getitem__")(key)

    def __contains__(self, item):
        return self.__getattr__("__contains__")(item)


# ---------------------------------------------------------------- the child's side
class Encoder:
    """Turns values into plain data; remembers oids (identity) and learner handles."""

    def __init__(self, learner: str):
        self.learner = learner
        self.oids: dict[int, int] = {}
        self.keep: list = []                 # strong references: ids are never reused
        self.handles: dict[int, int] = {}
        self.objects: list = []              # hid -> the learner's object

    def oid(self, obj) -> int:
        key = id(obj)
        if key not in self.oids:
            self.oids[key] = len(self.keep)
            self.keep.append(obj)
        return self.oids[key]

    def handle(self, obj) -> int:
        key = id(obj)
        if key not in self.handles:
            self.handles[key] = len(self.objects)
            self.objects.append(obj)
        return self.handles[key]

    def encode(self, value, _seen=None):
        seen = set() if _seen is None else _seen
        enc = lambda v: self.encode(v, seen)  # noqa: E731
        if value is None or type(value) in (bool, int, float, str, bytes):
            return value                    # exactly these types: np.float64 is a float too
        if type(value) is complex:
            return ("j", value.real, value.imag)
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                return ("x", "ndarray of Python objects")
            base = value.base
            if isinstance(base, np.ndarray) and id(base) in self.oids and base.flags.c_contiguous:
                start = value.__array_interface__["data"][0] - base.__array_interface__["data"][0]
                return ("v", self.oid(value), self.oids[id(base)], value.dtype.str, value.shape,
                        value.strides, start)
            arr = np.ascontiguousarray(value)
            return ("a", self.oid(value), arr.dtype.str, arr.shape, arr.tobytes())
        if isinstance(value, np.generic):
            return ("n", value.dtype.str, np.asarray(value).tobytes())
        if isinstance(value, np.dtype):
            return ("n", "dtype", value.str.encode())
        if isinstance(value, (tuple, list, set, frozenset)):   # subclasses too (namedtuple)
            tag = "t" if isinstance(value, tuple) else "l" if isinstance(value, list) else "s"
            return (tag, [enc(v) for v in value])
        if isinstance(value, dict):
            return ("d", [(enc(k), enc(v)) for k, v in value.items()])
        if isinstance(value, (type({}.keys()), type({}.values()), type({}.items()), range)):
            return ("l", [enc(v) for v in value])       # read as a list on the other side
        if isinstance(value, np.random.Generator):
            return ("g", self.oid(value), enc(value.bit_generator.state))
        if _is_learner(value, self.learner):
            return ("h", self.handle(value))
        if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
            module = getattr(value, "__module__", "") or ""
            top = module.split(".")[0]
            if top in FUNCTION_MODULES:
                return ("c" if isinstance(value, type) else "f", module, value.__qualname__)
            return ("x", type(value).__name__)
        kind = type(value)
        if kind.__module__ in LIBRARY_MODULES and hasattr(value, "__dict__"):
            oid = self.oid(value)
            if oid in seen:
                return ("r", oid)
            seen.add(oid)
            return ("o", oid, kind.__module__, kind.__qualname__,
                    [(k, enc(v)) for k, v in vars(value).items()])
        return ("x", kind.__name__)


def describe_exception(exc: BaseException, learner_path: str | None) -> dict:
    """What the parent needs to raise the same kind of exception, with the learner's line."""
    bases = [k.__name__ for k in type(exc).__mro__ if getattr(builtins, k.__name__, None) is k]
    frame = None
    if learner_path:
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if Path(f.filename).resolve() == Path(learner_path).resolve()]
        if frames:
            frame = (frames[-1].lineno, frames[-1].line or "")
    simple = all(type(a) in (str, int, float, bool) for a in exc.args) and len(exc.args) <= 4
    args = [a[:4000] if isinstance(a, str) else a for a in exc.args] if simple else [str(exc)[:4000]]
    return {"name": type(exc).__name__, "bases": bases, "args": args, "frame": frame}


# ---------------------------------------------------------------- the parent's side
def load_record(data: bytes):
    """Unpickle a record that may come from a hostile process: no global is ever resolved."""
    if len(data) > MAX_RECORD_BYTES:
        raise Divergence(f"the record is {len(data)} bytes (limit {MAX_RECORD_BYTES})")

    class NoGlobals(pickle.Unpickler):
        def find_class(self, module, name):
            raise Divergence(f"the record names {module}.{name}")

    try:
        return NoGlobals(io.BytesIO(data)).load()
    except Divergence:
        raise
    except Exception as exc:  # noqa: BLE001 -- any malformed record
        raise Divergence(f"unreadable record ({type(exc).__name__})") from None


def _resolve(module: str, qualname: str):
    """A library or NumPy class or function by name (never one that touches files,
    never a builtin function such as ``eval`` or ``open``)."""
    parts = module.split(".")
    if parts[0] not in FUNCTION_MODULES or UNSAFE_NAMES & set(parts) or \
            any(p.startswith("_") and p not in ("_core",) for p in parts[1:]):
        raise Divergence(f"{module}.{qualname} is not a name the record may carry")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        if part.startswith("__") or part == "<locals>" or part in UNSAFE_NAMES:
            raise Divergence(f"cannot resolve {module}.{qualname}")
        obj = getattr(obj, part, None)
    owner = getattr(obj, "__module__", None)
    if isinstance(obj, np.ufunc):
        return obj
    if not (isinstance(obj, type) or inspect.isfunction(obj) and parts[0] in LIBRARY_MODULES) \
            or owner != module:
        raise Divergence(f"{module}.{qualname} is not a name the record may carry")
    return obj


class Decoder:
    """Rebuilds values in the parent; updates objects it already knows in place."""

    def __init__(self, replayer):
        self.replayer = replayer
        self.objects: dict[int, object] = {}

    def bind(self, oid: int, obj) -> None:
        self.objects[oid] = obj

    def decode(self, enc, hint=None):
        if enc is None or type(enc) in (bool, int, float, str, bytes):
            return enc
        if not isinstance(enc, tuple) or not enc or not isinstance(enc[0], str):
            raise Divergence(f"malformed value {type(enc).__name__}")
        tag = enc[0]
        if tag in ("t", "l", "s"):
            hints = list(hint) if isinstance(hint, (list, tuple)) and len(hint) == len(enc[1]) \
                else [None] * len(enc[1])
            items = [self.decode(v, h) for v, h in zip(enc[1], hints)]
            return tuple(items) if tag == "t" else items if tag == "l" else set(items)
        if tag == "d":
            out = {}
            for k, v in enc[1]:
                key = self.decode(k)
                out[key] = self.decode(v, hint.get(key) if isinstance(hint, dict) else None)
            return out
        if tag == "j":
            return complex(float(enc[1]), float(enc[2]))
        if tag == "a":
            return self._array(*enc[1:], hint=hint)
        if tag == "v":
            return self._view(*enc[1:])
        if tag == "n":
            if enc[1] == "dtype":
                return np.dtype(enc[2].decode())
            return np.frombuffer(enc[2], dtype=np.dtype(enc[1]))[0]
        if tag == "g":
            return self._generator(enc[1], self.decode(enc[2]), hint)
        if tag == "o":
            return self._object(*enc[1:], hint=hint)
        if tag == "r":
            if enc[1] not in self.objects:
                raise Divergence("a reference to an unknown object")
            return self.objects[enc[1]]
        if tag in ("f", "c"):
            return _resolve(enc[1], enc[2])
        if tag == "h":
            return self.replayer.proxy(enc[1])
        if tag == "x":
            return Opaque(enc[1])
        raise Divergence(f"unknown tag {tag!r}")

    def _array(self, oid, dtype, shape, data, hint=None):
        value = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
        known = self.objects.get(oid)
        if known is None and isinstance(hint, np.ndarray) and hint.shape == value.shape \
                and hint.dtype == value.dtype and hint.flags.writeable:
            known = self.objects[oid] = hint
        if isinstance(known, np.ndarray):
            if known.shape == value.shape and known.dtype == value.dtype:
                if not np.array_equal(known, value, equal_nan=value.dtype.kind in "fc"):
                    if known.flags.writeable:
                        known[...] = value
                    else:
                        raise Divergence("a read-only array changed")
                return known
        arr = value.copy()
        self.objects[oid] = arr
        return arr

    def _view(self, oid, base_oid, dtype, shape, strides, offset):
        """The same view of the parent's array as the child's (so aliasing carries over)."""
        base = self.objects.get(base_oid)
        if not (isinstance(base, np.ndarray) and base.flags.c_contiguous):
            raise Divergence("a view of an unknown array")
        try:
            view = np.ndarray(tuple(shape), np.dtype(dtype), buffer=base, offset=int(offset),
                              strides=tuple(strides))
        except (TypeError, ValueError):
            raise Divergence("a view outside its array") from None
        self.objects[oid] = view
        return view

    def _generator(self, oid, state, hint=None):
        gen = self.objects.get(oid)
        if gen is None:
            gen = hint if isinstance(hint, np.random.Generator) else np.random.default_rng()
            self.objects[oid] = gen
        try:
            gen.bit_generator.state = state
        except Exception:  # noqa: BLE001
            raise Divergence("a random generator's state") from None
        return gen

    def _object(self, oid, module, qualname, attrs, hint=None):
        if module not in LIBRARY_MODULES:
            raise Divergence(f"{module} is not a library module")
        cls = _resolve(module, qualname)
        if not isinstance(cls, type):
            raise Divergence(f"{module}.{qualname} is not a class")
        obj = self.objects.get(oid)
        if obj is None:
            obj = hint if type(hint) is cls else cls.__new__(cls)
            self.objects[oid] = obj
        if type(obj) is not cls:
            raise Divergence(f"object {oid} changed class")
        old = dict(vars(obj))
        new = {self.decode(k): self.decode(v, old.get(k if isinstance(k, str) else None))
               for k, v in attrs}
        obj.__dict__.clear()
        obj.__dict__.update(new)
        return obj


class Opaque:
    """A value of a kind the record cannot carry (the checker will reject it)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __repr__(self) -> str:
        return f"<a {self.kind} object, which the grader cannot read: return arrays, numbers, " \
               "strings, lists, tuples or dicts>"


def rebuild_exception(info: dict) -> BaseException:
    """An exception of the recorded type (a builtin one, or a subclass of its builtin base)."""
    name, bases = str(info.get("name", "Exception")), list(info.get("bases", []))
    base = next((getattr(builtins, b) for b in bases
                 if isinstance(getattr(builtins, b, None), type)
                 and issubclass(getattr(builtins, b), Exception)), Exception)
    kind = base if base.__name__ == name else type(name, (base,), {})
    args = info.get("args")
    args = [a for a in args if type(a) in (str, int, float, bool)] if isinstance(args, list) else []
    exc = kind(*args)
    frame = info.get("frame")
    if isinstance(frame, (tuple, list)) and len(frame) == 2:
        exc.learner_frame = (int(frame[0]), str(frame[1]))
    return exc
