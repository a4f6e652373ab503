"""Saving and loading weights: safetensors + a JSON config, atomic, validated.

Layout of a saved model (the Hugging Face layout, so a learner recognises it)::

    directory/
        config.json          GPTConfig.to_dict()
        model.safetensors    every parameter by dotted name (the tied LM head is
                             stored once, as embed_tokens.weight)

Three promises, each tested:

* **No code execution on load.** safetensors is a JSON header plus raw bytes;
  nothing is ever unpickled (no ``pickle``, no ``np.load(allow_pickle=True)``).
* **Atomic writes.** Bytes go to a temporary file in the target directory, are
  fsync'ed, then ``os.replace``'d over the target: a crash leaves either the old
  file or the new one, never half of each.
* **Validate, then copy.** A load checks every name, shape and dtype (and the
  config) before touching the model, and says which tensor is wrong; a failed
  load leaves the model exactly as it was.

``save_tensors`` / ``load_tensors`` are the low-level pair, ``validate_tensors``
the one check of names, shapes and dtypes and ``load_json`` the one JSON-config
reader; PEFT adapters (``peft_io``) use the same four.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import numpy as np
import safetensors.numpy

from minigpt import GPT, GPTConfig
from nn import parameter_owner

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# ---- atomic files --------------------------------------------------------------
def default_mode(directory=False) -> int:
    """``0o666`` (a directory: ``0o777``) less the process's umask: the mode ``open(path,
    "w")`` or ``os.mkdir`` would give. ``mkstemp``/``mkdtemp`` create ``0o600``/``0o700``,
    which would hide a shared checkpoint from its group."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _fsync_directory(directory) -> None:
    """Make a rename inside ``directory`` durable (where the OS allows opening a directory)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsync'ed temporary file and ``os.replace``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write the file {path}: it is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), default_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)                 # make the rename itself durable


# ---- atomic directories ----------------------------------------------------------
def _exchange(a, b) -> bool:
    """Swap two directory entries in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
    ``False`` where the C library or the file system does not offer it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _carry_over(old, new) -> None:
    """Hard-link (or copy) into ``new`` every entry of ``old`` that ``new`` does not have,
    so swapping the directories keeps the user's other files (a README, an adapter)."""
    for entry in os.listdir(old):
        src, dst = os.path.join(old, entry), os.path.join(new, entry)
        if os.path.lexists(dst) or entry.startswith(".") and entry.endswith(".tmp"):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
    return dst


@contextmanager
def atomic_directory(directory):
    """Write a directory of several files all at once: ``with atomic_directory(d) as tmp:``
    write every file into ``tmp``; when the block ends without an error, ``tmp`` takes
    ``d``'s place in one rename (an exchange where ``d`` exists: files of ``d`` the block
    did not write are carried over). An error -- or a crash -- inside the block leaves
    ``d`` exactly as it was: the previous save stays whole and loadable, never new
    weights beside an old config. Where the OS has no atomic exchange, the old
    directory is moved aside for the moment between two renames and restored on failure.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"cannot save into {directory}: it is a file, not a directory")
    directory = os.path.realpath(directory)     # a symlinked directory: replace its target
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(directory) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, default_mode(directory=True))
        yield tmp                               # (the files written there are fsync'ed)
        if not os.path.exists(directory):
            os.rename(tmp, directory)
        else:
            _carry_over(directory, tmp)
            if not _exchange(tmp, directory):
                _swap_by_two_renames(tmp, directory)
        _fsync_directory(parent)
    finally:
        if os.path.isdir(tmp):                  # the block failed, or the old directory
            shutil.rmtree(tmp, ignore_errors=True)   # (after the exchange) is now here


def _swap_by_two_renames(new, directory):
    aside = new + ".old"
    os.rename(directory, aside)
    try:
        os.rename(new, directory)
    except BaseException:
        os.rename(aside, directory)
        raise
    os.rename(aside, new)                       # removed with the temporary directory


def atomic_write_text(path, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text (JSON configs, model cards)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_json(path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (corrupt or truncated?): {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


# ---- tensors -------------------------------------------------------------------
def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``{name: array}`` (and string ``metadata``) as one safetensors file, atomically."""
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray):
            raise ValueError(f"tensors must map str -> np.ndarray; {name!r} is {type(value).__name__}")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"safetensors metadata must map str -> str; {key!r} is {type(value).__name__}")
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    atomic_write_bytes(path, safetensors.numpy.save(arrays, metadata=metadata))


def _read(path):
    """``(tensors, metadata)`` of a safetensors file; corrupt files raise ``ValueError``."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as err:                # safetensors' SafetensorError and friends
        raise ValueError(f"{path} is corrupt or truncated (not a readable safetensors file): "
                         f"{err}") from None
    header_len = int.from_bytes(data[:8], "little")  # valid: safetensors just parsed it
    metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    return tensors, metadata


def load_metadata(path) -> dict:
    """The ``__metadata__`` strings stored in a safetensors file's header."""
    return _read(path)[1]


def load_tensors(path, expected: dict | None = None) -> dict:
    """Read a safetensors file into ``{name: array}`` (writable copies).

    ``expected`` maps every name the file must hold to ``(shape, dtype)``
    (either may be ``None`` for "any") or to ``None``; the file may then hold no
    other names. Any difference raises one ``ValueError`` listing all of them.
    """
    tensors, _ = _read(path)
    if expected is not None:
        validate_tensors(tensors, expected, source=os.fspath(path))
    return {name: np.array(value, copy=True) for name, value in tensors.items()}


def validate_tensors(tensors: dict, expected: dict, source="tensors", allow_missing=False,
                     labels: dict | None = None) -> None:
    """Raise ``ValueError`` naming every missing, unexpected, mis-shaped or mis-typed tensor.

    The one validator for model checkpoints and adapters (``peft_io``). ``labels``
    maps a name to how the message should show it (e.g. with its key in a
    Hugging Face file).
    """
    def label(name):
        return (labels or {}).get(name, name)

    problems = []
    missing = [n for n in expected if n not in tensors]
    unexpected = [label(n) for n in tensors if n not in expected]
    if missing and not allow_missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    for name, spec in expected.items():
        if spec is None or name not in tensors:
            continue
        shape, dtype = spec
        got = tensors[name]
        if shape is not None and tuple(got.shape) != tuple(shape):
            problems.append(f"{label(name)}: shape {tuple(got.shape)} in {source}, "
                            f"expected {tuple(shape)}")
        if dtype is not None and np.dtype(got.dtype) != np.dtype(dtype):
            problems.append(f"{label(name)}: dtype {np.dtype(got.dtype).name} in {source}, "
                            f"expected {np.dtype(dtype).name}")
    if problems:
        raise ValueError(f"{source} does not match:\n  " + "\n  ".join(problems))


# ---- models --------------------------------------------------------------------
def model_tensors(model, trainable_only=False) -> dict:
    """``{dotted name: array}`` for the model's parameters (views, not copies)."""
    return dict(model.named_parameters(trainable_only=trainable_only))


def expected_shapes(model, trainable_only=False) -> dict:
    return {n: (p.shape, p.dtype) for n, p in model.named_parameters(trainable_only=trainable_only)}


def copy_into(model, tensors: dict, source="tensors") -> None:
    """Copy ``tensors`` into the model's parameters of the same names, in place.

    A subset of the parameters is allowed (adapters); every given name must
    exist with the same shape and dtype. All are checked before any is copied.
    """
    validate_tensors(tensors, expected_shapes(model), source=source, allow_missing=True)
    for name, value in tensors.items():
        module, attr = parameter_owner(model, name)
        getattr(module, attr)[...] = value


def save_model(model, directory) -> None:
    """Write ``config.json`` and ``model.safetensors`` for a ``GPT`` into ``directory``.

    Atomic as a whole (``atomic_directory``): a save that fails half-way leaves the
    previous save in ``directory`` intact and loadable; other files there are kept.
    """
    if not isinstance(model, GPT):
        raise ValueError(f"save_model saves a minigpt.GPT, got {type(model).__name__} "
                         f"(a PeftModel saves its adapter with save_pretrained)")
    config = model.config.to_dict()
    with atomic_directory(directory) as tmp:
        save_tensors(os.path.join(tmp, WEIGHTS_NAME), model_tensors(model),
                     metadata={"format": "np", "config": json.dumps(config, sort_keys=True)})
        save_json(os.path.join(tmp, CONFIG_NAME), config)


def load_config(directory) -> GPTConfig:
    raw = load_json(os.path.join(directory, CONFIG_NAME))
    try:
        return GPTConfig.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{os.path.join(directory, CONFIG_NAME)} is not a valid GPTConfig: {err}") from None


def _config_diff(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def load_into(model, directory) -> None:
    """Load ``directory`` into an existing ``GPT``; on any error the model is unchanged."""
    config = load_config(directory).to_dict()
    diff = _config_diff(config, model.config.to_dict())
    if diff:
        raise ValueError(f"config mismatch between {directory} and the model (file vs model): "
                         + "; ".join(diff))
    path = os.path.join(directory, WEIGHTS_NAME)
    tensors, metadata = _read(path)
    if "config" in metadata:
        # through GPTConfig: a file from before a field existed reads as its default
        diff = _config_diff(GPTConfig.from_dict(json.loads(metadata["config"])).to_dict(), config)
        if diff:
            raise ValueError(f"config mismatch: {path} was saved with another config than "
                             f"{CONFIG_NAME} (weights vs json): " + "; ".join(diff))
    validate_tensors(tensors, expected_shapes(model), source=path)
    copy_into(model, tensors, source=path)


def load_model(directory) -> GPT:
    """Build a ``GPT`` from ``config.json`` and fill it from ``model.safetensors``."""
    model = GPT(load_config(directory))
    load_into(model, directory)
    model.name_or_path = os.fspath(directory)   # what adapters record as their base
    return model
