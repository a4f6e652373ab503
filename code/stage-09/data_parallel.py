"""Data parallelism on one machine: every core runs a whole training step on a slice of the batch.

Why. NumPy runs each elementwise operation (GELU, LayerNorm, softmax, AdamW) on one
core. PyTorch splits every such operation across threads, which pays when one
operation takes milliseconds; on the teaching model one takes tens of
microseconds, and handing half of it to a Python thread costs about as much as it
saves (we measured a thread pool over rows: the step got slower). So use the cores
the way PyTorch's ``DistributedDataParallel`` does instead: ``N`` processes, each
running the complete forward and backward pass on ``B/N`` sequences with
single-threaded BLAS, and the gradients added up. Nothing per operation has to be
shared, so the overhead is one message per process per step.

How. At start the model is copied into ``processes - 1`` worker processes, and
every parameter of every copy -- the main model's included -- is moved into one
block of shared memory that all of them map. So when the optimizer updates a
weight in place in the main process, the workers see the new value at once, with
nothing copied. Each worker writes its gradients into a second shared block, and
the main process adds them to its own::

    with DataParallel(model, processes=2) as dp:
        for inputs, targets in batches:
            optimizer.zero_grad()
            loss = dp.forward_backward(inputs, targets)   # the mean loss of the whole batch
            clip_grad_norm(model, 1.0)                    # optional: sees the summed gradients
            optimizer.step()                              # updates the shared weights in place

The gradients equal those of ``model.forward`` + ``cross_entropy`` + ``model.backward``
on the whole batch (up to float rounding): each slice's ``dlogits`` is scaled by its
share of the counted target tokens, so a slice with more ``-100`` targets weighs less.

What the workers copy once, at start: the module structure, the trainable flags,
the active adapters, everything that is not a parameter. Change any of those
(freeze a layer, switch or merge an adapter) and build a new ``DataParallel``:
``forward_backward`` compares the model with what the workers copied and refuses
to run on a changed one, instead of returning the old model's gradients.
In-place changes to parameter values are shared.

All or nothing: when a slice fails (bad targets in a worker's slice, a worker that
died), the gradients are put back as they were before the call. A worker that does
not answer within ``timeout`` seconds is killed and the ``DataParallel`` closed with
a clear error, instead of the step hanging for ever. Dropout draws its masks from each
process's own generator, so with dropout > 0 the random masks differ from a
single-process run. During ``forward_backward`` the main process's BLAS runs on one
thread (the other cores are busy with the workers); ``close()`` gives the model
ordinary arrays again.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import time
import traceback
import warnings
from contextlib import contextmanager
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from nn import IGNORE_INDEX, blas_controller, cross_entropy, parameter_owner
from validate import check_int, check_number

_ALIGN = 64                      # bytes: each array starts on its own cache line
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextmanager
def environment(variables: dict):
    """Set environment ``variables`` for the block (a child process started in it
    inherits them), then restore what was there before."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _blas_controller():
    """threadpoolctl's handle on this process's BLAS, or ``None`` (with a warning) when the
    package is missing: the step is then still correct, only slower, because this
    process's BLAS threads compete with the workers for the cores."""
    blas = blas_controller()
    if blas is None:
        warnings.warn("threadpoolctl is not installed, so this process's BLAS keeps all its "
                      "threads beside the data-parallel workers (slower, not wrong); "
                      "`pip install threadpoolctl`, or re-run `make test` / `pip install -e .`",
                      RuntimeWarning, stacklevel=3)
    return blas


def keep_freed_memory() -> bool:
    """Let glibc's ``malloc`` keep freed memory for reuse instead of handing it back.

    A training step allocates and frees the same few-megabyte arrays every time. By
    default glibc serves big requests with fresh ``mmap`` pages and gives them back
    on ``free``, and trims the heap's free top, so the next step pays a page fault
    (and the kernel's zeroing) for every 4 KB page again: on the teaching config
    that was 23 ms instead of 30 ms for the same step, depending only on the
    allocator's history. Raising both thresholds keeps the pages in the process.
    glibc caps the mmap threshold at 32 MB, so arrays larger than that (GPT-2 small's
    logits, 1024 x 50257 floats, are 206 MB) would still get fresh pages every step;
    ``M_MMAP_MAX = 0`` serves them from the reusable heap as well.
    Costs: the process keeps its peak memory. Returns ``False`` (changing nothing)
    where the C library has no ``mallopt`` (macOS, Windows).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
    return (bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) & bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
            & bool(mallopt(M_MMAP_MAX, 0)))


# ---- parameters in shared memory ---------------------------------------------
def _layout(arrays):
    """``[(name, shape, dtype, offset)]`` packing ``arrays`` (name -> ndarray), and the total bytes."""
    layout, offset = [], 0
    for name, value in arrays:
        layout.append((name, value.shape, value.dtype.str, offset))
        offset += -(-value.nbytes // _ALIGN) * _ALIGN
    return layout, max(offset, _ALIGN)


def _views(buffer, layout):
    """``{name: ndarray}`` views into ``buffer``, one per ``layout`` entry."""
    return {name: np.ndarray(shape, np.dtype(dtype), buffer=buffer, offset=offset)
            for name, shape, dtype, offset in layout}


def _bind(model, views, copy_values):
    """Make each parameter of ``model`` the view of the same name (copying its value in
    first when ``copy_values``); returns ``[(module, attr, name, view)]``, looked up once."""
    bound = []
    for name, view in views.items():
        module, attr = parameter_owner(model, name)
        if copy_values:
            view[...] = getattr(module, attr)
        setattr(module, attr, view)
        bound.append((module, attr, name, view))
    return bound


def _grad_slots(model, views):
    """``[(module, attr, view)]``: where each shared gradient view belongs in ``model``."""
    return [(*parameter_owner(model, name), view) for name, view in views.items()]


def _release(bound):
    """Give the bound parameters private copies (so the shared block can close)."""
    for module, attr, *_ in bound:
        setattr(module, attr, np.array(getattr(module, attr)))


# ---- what the workers copied ----------------------------------------------------
_STATE_ATTRS = ("merged", "disabled", "_disabled", "active_adapters")


def structure(model) -> list[tuple]:
    """What a worker copied at start and cannot see change: per module its path, its
    identity (a replaced module or a swapped adapter is a new object), its frozen
    names and its adapter flags (merged, disabled, active adapters)."""
    out = []
    for path, module in model.named_modules():
        flags = tuple((a, repr(getattr(module, a))) for a in _STATE_ATTRS if hasattr(module, a))
        out.append((path or "(the model)", id(module), type(module).__name__,
                    tuple(sorted(getattr(module, "frozen", ()))), flags))
    return out


def describe_change(before, after) -> str:
    """The first difference between two ``structure`` lists, in words."""
    for old, new in zip(before, after):
        if old == new:
            continue
        path = old[0]
        if old[0] != new[0]:
            return f"the module tree changed at {path} (now {new[0]})"
        if old[1] != new[1]:
            return f"module {path} was replaced ({old[2]} -> {new[2]}; another adapter set?)"
        if old[3] != new[3]:
            return f"the frozen parameters of {path} changed ({list(old[3])} -> {list(new[3])})"
        return f"the adapter state of {path} changed ({dict(old[4])} -> {dict(new[4])})"
    return f"the model now has {len(after)} modules instead of {len(before)}"


# ---- one slice of a batch ------------------------------------------------------
def _count(targets, ignore_index=IGNORE_INDEX) -> int:
    return int(np.count_nonzero(np.asarray(targets) != ignore_index))


def slice_forward_backward(model, inputs, targets, total, attention_mask=None) -> float:
    """Forward, cross-entropy and backward on one slice of a batch of ``total`` counted targets.

    Scales this slice's ``dlogits`` by ``count / total`` so that the slices' gradients
    add up to the gradient of the whole batch's mean loss; returns ``loss * count``
    (the slices' returns add up to ``mean loss * total``).
    """
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    logits = model.forward(inputs, **kwargs)                # (b, T, V)
    loss, dlogits = cross_entropy(logits, targets)
    count = _count(targets)
    dlogits *= dlogits.dtype.type(count / total)
    model.backward(dlogits)
    return loss * count if count else 0.0                   # (an all-ignored slice: NaN * 0)


def _worker(conn, model, param_name, param_layout, grad_name, grad_layout):
    """A worker's life: map the shared blocks, then answer one slice per message."""
    keep_freed_memory()
    # (a spawned worker shares its parent's resource tracker, which already knows
    # these blocks: attaching registers nothing new, and the parent unlinks them)
    params, grads = SharedMemory(name=param_name), SharedMemory(name=grad_name)
    bound, slots = [], []
    try:
        bound = _bind(model, _views(params.buf, param_layout), copy_values=False)
        slots = _grad_slots(model, _views(grads.buf, grad_layout))
        conn.send("ready")
        while True:
            message = conn.recv()
            if message is None:                             # close()
                break
            training, (inputs, targets, total, attention_mask) = message
            try:
                model.train(training)
                model.zero_grad()
                loss_sum = slice_forward_backward(model, inputs, targets, total, attention_mask)
                for module, attr, view in slots:
                    grad = getattr(module, attr + "_grad", None)
                    view[...] = 0 if grad is None else grad
                conn.send(("ok", loss_sum))
            except Exception as error:                      # report, keep serving
                conn.send(("error", (error, traceback.format_exc())))
    finally:
        _release(bound)
        bound = slots = None                                # no view may outlive its block
        params.close()
        grads.close()


class DataParallel:
    """Split each batch across ``processes`` processes; sum their gradients into ``model``.

    ``processes`` defaults to the usable cores. With one process (or a batch of one
    sequence) everything runs here, in this process, as a plain training step would.
    With workers it also calls ``keep_freed_memory()`` here and in each of them.
    """

    def __init__(self, model, processes: int | None = None, timeout: float = 600.0):
        processes = usable_cores() if processes is None else check_int("processes", processes, 1)
        self.timeout = check_number("timeout", timeout, 0.0, inclusive=False)
        self.model, self.processes = model, processes
        self._structure = structure(model)
        self._closed = None                         # why it was closed, once it is
        self._workers, self._conns, self._blocks = [], [], []
        self._shared, self._grad_slots = [], []     # [(module, attr, name, view)], per worker
        self._blas = None
        if processes > 1:
            keep_freed_memory()
            try:
                self._start(processes - 1)
            except BaseException:
                self.close()
                raise

    def _start(self, n_workers):
        param_layout, size = _layout(self.model.named_parameters())
        grad_layout, grad_size = _layout(self.model.named_parameters(trainable_only=True))
        shared = SharedMemory(create=True, size=size)
        self._blocks.append(shared)
        self._shared = _bind(self.model, _views(shared.buf, param_layout), copy_values=True)
        ctx = mp.get_context("spawn")                       # a clean interpreter: no inherited threads
        with environment({k: "1" for k in _THREAD_VARS}):  # the workers' BLAS: one thread each
            for _ in range(n_workers):
                grads = SharedMemory(create=True, size=grad_size)
                self._blocks.append(grads)
                self._grad_slots.append(_grad_slots(self.model, _views(grads.buf, grad_layout)))
                here, there = ctx.Pipe()
                worker = ctx.Process(target=_worker, daemon=True,
                                     args=(there, self.model, shared.name, param_layout,
                                           grads.name, grad_layout))
                worker.start()
                there.close()
                self._workers.append(worker)
                self._conns.append(here)
        for conn, worker in zip(self._conns, self._workers):
            self._await_ready(conn, worker)
        self._blas = _blas_controller()

    @staticmethod
    def _await_ready(conn, worker, timeout=120.0):
        deadline = time.monotonic() + timeout
        while not conn.poll(0.05):                          # (also True once the pipe is closed)
            if time.monotonic() > deadline:
                raise RuntimeError(f"data-parallel worker {worker.pid} did not start in {timeout:.0f} s")
        try:
            if conn.recv() == "ready":
                return
        except EOFError:
            pass
        worker.join(timeout=5)
        raise RuntimeError(
            f"data-parallel worker {worker.pid} exited with code {worker.exitcode} before it "
            f"started (its error is printed above). Workers are spawned: each imports your "
            f"main script again, so code that builds a DataParallel must sit under "
            f"`if __name__ == '__main__':`")

    def _talk(self, i, message=None):
        """Send ``message`` to worker ``i`` (``None``: wait at most ``timeout`` seconds
        for its reply instead). A worker that died or stopped answering closes this
        ``DataParallel`` (the others would be out of step) and raises ``RuntimeError``."""
        conn, worker = self._conns[i], self._workers[i]
        try:
            if message is not None:
                return conn.send(message)
            deadline = time.monotonic() + self.timeout
            while not conn.poll(min(1.0, self.timeout)):
                if not worker.is_alive():
                    raise EOFError
                if time.monotonic() > deadline:
                    worker.kill()                           # (SIGTERM would wait for a stopped one)
                    self._fail(f"data-parallel worker {worker.pid} did not answer within "
                               f"timeout={self.timeout:g} s (stopped, swapping or stuck)")
            return conn.recv()
        except (EOFError, OSError):
            worker.join(timeout=1)
            self._fail(f"data-parallel worker {worker.pid} died (exit code {worker.exitcode})")

    def _fail(self, reason):
        self.close()
        self._closed = reason
        raise RuntimeError(f"{reason}; this DataParallel is now closed: build a new one") from None

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    # ---- one step ----------------------------------------------------------
    def forward_backward(self, inputs, targets, attention_mask=None) -> float:
        """Forward and backward of the mean cross-entropy on the whole batch; returns it.

        Gradients are *added* to the model's (zero them first, as for ``backward``).
        All or nothing: if any slice fails (here or in a worker), the gradients are
        put back as they were before the call and the error is raised here. A batch
        whose targets are all ignored returns NaN, as ``cross_entropy`` does.
        """
        inputs, targets = self._check_batch(inputs, targets, attention_mask)
        counted = _count(targets)
        total = max(counted, 1)
        pieces = min(len(self._workers) + 1, len(inputs))   # this process + its workers
        bounds = np.linspace(0, len(inputs), pieces + 1).round().astype(int)
        slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

        def part(s):
            mask = None if attention_mask is None else np.asarray(attention_mask)[s]
            return inputs[s], targets[s], total, mask

        self._check_shared()
        training = bool(getattr(self.model, "training", True))
        saved = self._save_grads()
        try:
            loss_sum = self._run(slices, part, training)
        except BaseException:
            self._restore_grads(saved)
            raise
        return float(loss_sum / total) if counted else float("nan")

    def _run(self, slices, part, training):
        sent = 0
        try:
            for i, s in enumerate(slices[1:]):              # the workers take slices 1..
                self._talk(i, (training, part(s)))
                sent += 1
            if self._blas is None:
                loss_sum = slice_forward_backward(self.model, *part(slices[0]))
            else:                                           # the other cores are busy
                with self._blas.limit(limits=1):
                    loss_sum = slice_forward_backward(self.model, *part(slices[0]))
        finally:
            replies = [self._talk(i) for i in range(sent)]  # always drain, even on an error
        for i, (status, payload) in enumerate(replies):
            if status == "error":
                error, text = payload
                message = (f"{error} (in data-parallel worker {self._workers[i].pid}; "
                           f"its traceback:\n{text})")
                try:
                    again = type(error)(message)            # the same type, with the worker's story
                except Exception:
                    again = RuntimeError(message)
                raise again from None
        for i, (_, payload) in enumerate(replies):          # every slice succeeded: add them up
            loss_sum += payload
            for module, attr, view in self._grad_slots[i]:
                module._accumulate(attr, view)              # X_grad += the worker's
        return loss_sum

    def _check_batch(self, inputs, targets, attention_mask):
        """Refuse, before anything runs, a closed ``DataParallel``, a model that changed
        under it, and a batch that is not ``(B >= 1, T >= 1)`` with targets of its shape."""
        if self._closed:
            raise RuntimeError(f"this DataParallel was closed ({self._closed}); build a new one")
        now = structure(self.model)
        if now != self._structure:
            raise RuntimeError(f"the model changed since this DataParallel started its workers: "
                               f"{describe_change(self._structure, now)}. The workers still hold "
                               f"the old one; close() it and build a new DataParallel")
        inputs, targets = np.asarray(inputs), np.asarray(targets)
        if inputs.ndim != 2 or inputs.shape[0] < 1 or inputs.shape[1] < 1:
            raise ValueError(f"inputs must be a (batch, seq) array of token ids with batch >= 1 "
                             f"and seq >= 1, got shape {inputs.shape}")
        if targets.shape != inputs.shape:
            raise ValueError(f"inputs {inputs.shape} and targets {targets.shape} must have the "
                             f"same shape (they share the batch axis, axis 0, and the sequence axis)")
        if attention_mask is not None and np.shape(attention_mask) != inputs.shape:
            raise ValueError(f"attention_mask shape {np.shape(attention_mask)} must equal "
                             f"the inputs' shape {inputs.shape}")
        return inputs, targets

    def _save_grads(self):
        """``[(module, attr, copy or None)]`` of every trainable gradient (to undo a failed step)."""
        saved = []
        for name, _ in self.model.named_parameters(trainable_only=True):
            module, attr = parameter_owner(self.model, name)
            grad = getattr(module, attr + "_grad", None)
            saved.append((module, attr, None if grad is None else grad.copy()))
        return saved

    @staticmethod
    def _restore_grads(saved):
        for module, attr, grad in saved:
            setattr(module, attr + "_grad", grad)

    def _check_shared(self):
        """Every parameter must still be its shared view. An optimizer that assigns a
        new array (``m.weight = m.weight - lr * g``) instead of updating in place
        (``m.weight -= lr * g``) would leave the workers with the old weights: copy
        the new value into the shared block and point the parameter there again."""
        for module, attr, name, view in self._shared:
            value = getattr(module, attr)
            if value is view:
                continue
            value = np.asarray(value)
            if value.shape != view.shape:
                raise ValueError(f"parameter {name} was replaced by an array of shape "
                                 f"{value.shape}, but the workers hold {view.shape}: after "
                                 f"changing the model's structure, build a new DataParallel")
            view[...] = value
            setattr(module, attr, view)

    # ---- the end -----------------------------------------------------------
    def close(self) -> None:
        """Stop the workers, give the model private arrays again, free the shared memory."""
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=2)
            if worker.is_alive():                           # stopped (SIGSTOP) or deaf to SIGTERM
                worker.kill()
                worker.join()
        for conn in self._conns:
            conn.close()
        self._workers, self._conns = [], []
        _release(self._shared)
        self._shared, self._grad_slots = [], []
        for block in self._blocks:
            try:
                block.close()
            except BufferError:        # an array still views it: the mapping lives on with it
                pass
            block.unlink()
        self._blocks = []
        self._closed = getattr(self, "_closed", None) or "close() was called"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_blocks", None):
            try:
                self.close()
            except Exception:
                pass
