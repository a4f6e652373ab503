"""Helpers the notebooks share (not part of the course module): run sizes, one
fine-tuning run, timing, spectra, plots, and executing the notebooks.

The notebooks in ``notebooks/`` stay thin: they import the library in
``code/stage-09``, explain, measure and plot. What they need beyond the library's
own API lives here:

* ``quick_mode`` / ``pick``: ``PEFT_NOTEBOOK_QUICK=1`` shrinks every run so the
  test suite can execute the notebooks in seconds (the committed outputs come
  from a full run);
* ``load_base``: the shipped pretrained mini GPT (``pretrain.PRETRAINED_DIR``);
* ``settings`` / ``finetune``: one fine-tuning run *with the comparison's settings*
  (``compare.run_spec``: the method's validation-chosen learning rate for the task,
  steps, batch, training set, seed) and its training loop (``compare.finetune``);
  a notebook may swap the method's config for a variant (another rank, bottleneck,
  prompt length) but not the settings;
* ``time_interleaved``: median wall time of several functions timed in turn
  (A B C A B C ...), so a shared machine that slows down slows all of them alike;
* ``effective_rank`` / ``entropy_effective_rank`` / ``energy_captured``: how many
  directions a weight update really uses; ``low_rank`` (its best rank-r part) and
  ``random_like`` (a structureless matrix of the same shape and norm) to compare with;
* ``ShiftedPositions``: the base model reading its tokens at positions
  ``shift..shift+T-1`` (what prompt tuning's ``"shift"`` convention does to it);
* plots: one colour and marker per method (``method_style``, shared with
  ``report.py``'s figures), attention with prefix columns and a colorbar, the NF4
  levels over a weight histogram.

Run ``python notebooks/viz.py notebooks/*.ipynb --write`` to re-execute the notebooks.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "code", "stage-09")
if os.path.abspath(CODE_DIR) not in map(os.path.abspath, sys.path):
    sys.path.insert(0, os.path.abspath(CODE_DIR))

from data_parallel import environment  # noqa: E402
from report import method_style  # noqa: E402,F401  (re-exported for the notebooks)

QUICK_ENV = "PEFT_NOTEBOOK_QUICK"
BASE_ENV = "PEFT_PRETRAINED_DIR"          # another base directory (development only)
RESULTS_ENV = "PEFT_RESULTS_JSON"         # another comparison results file (development only)


# ---- run sizes ------------------------------------------------------------------
def quick_mode() -> bool:
    """True when ``PEFT_NOTEBOOK_QUICK=1``: notebooks shrink their runs (tests)."""
    return os.environ.get(QUICK_ENV, "") not in ("", "0")


def pick(full, quick):
    """``quick`` in quick mode, else ``full`` (steps, sweep values, test-set sizes)."""
    return quick if quick_mode() else full


# ---- the pretrained base --------------------------------------------------------
def base_dir() -> str:
    from pretrain import PRETRAINED_DIR
    return os.environ.get(BASE_ENV) or PRETRAINED_DIR


def load_base():
    """A fresh copy of the shipped pretrained mini GPT (every call loads a new one)."""
    from checkpoint import load_model
    directory = base_dir()
    if not os.path.exists(os.path.join(directory, "model.safetensors")):
        raise FileNotFoundError(f"no pretrained base in {directory}; "
                                f"run `python code/stage-09/pretrain.py` to make it")
    return load_model(directory)


def results_path() -> str:
    """The comparison runner's ``results/results.json`` (``compare.py`` writes it)."""
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results",
                           "results.json")
    return os.path.abspath(os.environ.get(RESULTS_ENV) or default)


# ---- one fine-tuning run ----------------------------------------------------------
def settings(method, task, seed=0, **overrides):
    """``compare.run_spec`` for this mode: the comparison's settings for ``method`` on
    ``task`` (in quick mode the runner's own ``--quick`` sizes)."""
    import compare
    return compare.run_spec(method, task, seed, quick=quick_mode(), **overrides)


def finetune(method, task, config=None, seed=0, test_examples=None):
    """Fine-tune the pretrained base as the comparison does; returns a dict.

    ``method`` names a row of ``compare.METHODS`` and fixes every setting (learning
    rate, steps, batch, training set; QLoRA's NF4 base). ``config`` replaces the
    method's PEFT config with a variant of it (another rank, placement, prompt
    length), trained with the same settings. The dict holds ``model`` (the trained
    ``PeftModel``), ``spec`` (the ``RunSpec``), ``accuracy`` (exact match on the
    task's test set or on ``test_examples``), ``trainable`` and ``total``
    parameters, ``losses``, ``seconds`` and ``ms_per_step`` (median).
    """
    import compare
    from tasks import fixed_test_set
    from train import evaluate
    spec = settings(method, task, seed)
    model, _, losses, times = compare.finetune(spec, config)
    tests = test_examples if test_examples is not None else fixed_test_set(task, spec.n_test)
    trainable, total = model.get_nb_trainable_parameters()
    return {"model": model, "spec": spec, "accuracy": evaluate(model, tests),
            "trainable": trainable, "total": total, "losses": losses, "seconds": float(sum(times)),
            "ms_per_step": 1000 * float(np.median(times)) if times else float("nan")}


# ---- timing -------------------------------------------------------------------
def time_interleaved(fns: dict, repeats=30, warmup=3) -> dict:
    """Time each ``fn()`` in ``fns`` in turn, round after round (A B C A B C ...).

    Returns ``{name: {"median_ms", "min_ms", "ratio"}}``; ``ratio`` is the median over
    rounds of this function's time divided by the *first* function's time in the
    same round. Interleaving, and taking ratios within a round, keeps a shared
    machine whose speed drifts from favouring whichever function ran last (the
    same method as ``bench.py``).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - start))
    ref = np.array(next(iter(times.values())))
    return {name: {"median_ms": float(np.median(t)), "min_ms": float(np.min(t)),
                   "ratio": float(np.median(np.array(t) / ref))}
            for name, t in times.items()}


# ---- spectra ------------------------------------------------------------------
def effective_rank(singular_values, energy=0.9) -> int:
    """Fewest singular directions holding ``energy`` of the squared Frobenius norm."""
    s2 = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1] ** 2
    if s2.sum() == 0:
        return 0
    return int(np.searchsorted(np.cumsum(s2) / s2.sum(), energy) + 1)


def entropy_effective_rank(singular_values) -> float:
    """``exp(H(p))`` with ``p = s / sum(s)`` (Roy & Vetterli 2007): between 1 (one
    direction) and ``len(s)`` (all singular values equal)."""
    s = np.asarray(singular_values, dtype=np.float64)
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def energy_captured(singular_values, r) -> float:
    """Fraction of ``||M||_F^2 = sum s_i^2`` held by the top ``r`` singular directions:
    how much of the matrix its best rank-``r`` approximation keeps (Eckart-Young)."""
    s2 = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1] ** 2
    return float(s2[:r].sum() / s2.sum()) if s2.sum() > 0 else 0.0


def low_rank(matrix, r):
    """The best rank-``r`` approximation of ``matrix (d, k)`` in the Frobenius norm:
    ``U[:, :r] diag(s[:r]) V[:r]`` (``r=None``: the matrix itself), float64."""
    m = np.asarray(matrix, dtype=np.float64)
    if r is None:
        return m
    U, s, Vt = np.linalg.svd(m, full_matrices=False)   # (d, q) (q,) (q, k), q = min(d, k)
    return (U[:, :r] * s[:r]) @ Vt[:r]                   # (d, k), rank <= r


def random_like(matrix, rng):
    """A Gaussian matrix of ``matrix``'s shape and Frobenius norm: no structure, the same size."""
    g = rng.standard_normal(np.shape(matrix))
    return g * (np.linalg.norm(matrix) / np.linalg.norm(g))


# ---- the base model at shifted positions ----------------------------------------
class ShiftedPositions:
    """The base model reading its real tokens at positions ``shift..shift+T-1``.

    That is exactly what prompt tuning's ``"shift"`` convention does to the real
    tokens, minus the prompt: evaluating this wrapper measures how much a small
    model trained only at positions ``0..T-1`` is hurt by the move alone.
    It has what ``train.evaluate`` needs: ``forward``, ``generate``, ``train``/``eval``.
    """

    def __init__(self, model, shift: int):
        self.model, self.shift = model, int(shift)

    @property
    def training(self):
        return self.model.training

    def train(self, mode=True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def forward(self, tokens):
        T = np.asarray(tokens).shape[1]
        if self.shift + T > self.model.config.context_length:
            raise ValueError(f"shift {self.shift} + length {T} exceeds the context length")
        return self.model.forward(tokens, position_ids=np.arange(self.shift, self.shift + T))

    def generate(self, tokens, max_new_tokens, eos_id=None):
        return self.model.generate(tokens, max_new_tokens, eos_id, forward=self.forward)


# ---- plots --------------------------------------------------------------------
def plot_attention(ax, att, labels, num_prefix=0, title="", vmax=None):
    """Heatmap of one head's attention ``att (T, P+T)``; the prefix columns are marked.

    ``labels``: the ``T`` query token names; the key axis shows ``p0..`` for the
    prefix slots followed by the same token names. ``vmax`` fixes the top of the
    colour scale (give several panels the same one, and one colorbar); returns the image.
    """
    T = len(labels)
    top = max(float(att.max()), 1e-9) if vmax is None else vmax
    im = ax.imshow(att, cmap="viridis", vmin=0, vmax=top, aspect="auto")
    keys = [f"p{i}" for i in range(num_prefix)] + list(labels)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=90, fontsize=8)
    ax.set_yticks(range(T))
    ax.set_yticklabels(labels, fontsize=8)
    if num_prefix:
        ax.axvline(num_prefix - 0.5, color="white", lw=1.5)
    ax.set(xlabel="key (prefix slots | real tokens)", ylabel="query", title=title)
    return im


def plot_nf4_levels(ax_hist, ax_block, weight, blocksize=64, block=0):
    """Left: every block of ``weight`` divided by its absmax, with the 16 NF4 levels.
    Right: the raw values of one block with the levels scaled by that block's absmax."""
    from nf4 import NF4_CODEBOOK
    blocks = np.asarray(weight, dtype=np.float32).reshape(-1, blocksize)    # (nb, bs)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    normed = (blocks / np.where(absmax > 0, absmax, 1)).reshape(-1)
    ax_hist.hist(normed, bins=121, range=(-1.01, 1.01), color="0.6")
    for level in NF4_CODEBOOK:
        ax_hist.axvline(level, color="C3", lw=0.8)
    ax_hist.set(xlabel="weight / absmax of its block", ylabel="count",
                title=f"{normed.size:,} weights, blocks of {blocksize}; red: NF4 levels")
    values = blocks[block]
    ax_block.hist(values, bins=40, color="0.6")
    for level in NF4_CODEBOOK * absmax[block, 0]:
        ax_block.axvline(level, color="C3", lw=0.8)
    ax_block.set(xlabel="weight value", ylabel="count",
                 title=f"block {block}: levels scaled by its absmax {absmax[block, 0]:.3f}")


def log_x(ax, ticks=None, base=10):
    """Logarithmic x axis; with ``ticks``, label exactly those values (no minor labels)."""
    from matplotlib.ticker import NullFormatter
    ax.set_xscale("log", base=base)
    if ticks is not None:
        ax.set_xticks(list(ticks), [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def label_points(ax, xs, ys, names, fontsize=8):
    """Name each point; neighbours (in the given order) get different offsets so
    points at the same place (e.g. LoRA and QLoRA) stay readable."""
    offsets = [(5, 4, "left"), (5, -11, "left"), (-5, 6, "right"), (-5, -13, "right")]
    for i, (x, y, name) in enumerate(zip(xs, ys, names)):
        dx, dy, ha = offsets[i % len(offsets)]
        ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, ha=ha)


def bar_labels(ax, bars, fmt="{:.2f}", fontsize=8, rotation=0):
    """Write each bar's height above it (so a bar of height 0 is still read as 0)."""
    for bar in bars:
        ax.annotate(fmt.format(bar.get_height()), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize=fontsize, rotation=rotation)


# ---- executing the notebooks ------------------------------------------------------
def run_notebook(path, quick=False, timeout=900, write=False):
    """Execute the notebook at ``path`` top to bottom in a fresh ``python3`` kernel.

    The working directory is the notebook's folder (the notebooks add
    ``../code/stage-09`` to ``sys.path``); ``quick`` sets ``PEFT_NOTEBOOK_QUICK=1``
    for the kernel. A failing cell raises ``nbclient.exceptions.CellExecutionError``.
    With ``write`` the executed notebook (outputs included) replaces the file.
    Returns ``(notebook, seconds)``.
    """
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    # (jupyter_client runs the "python3" kernel with this interpreter, a venv's included)
    env = {QUICK_ENV: "1" if quick else "", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with environment(env):                  # the kernel inherits this process's environment
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}).execute()
    seconds = time.perf_counter() - start
    if write:
        nbformat.write(nb, path)
    return nb, seconds


def main(argv=None):
    """``python notebooks/viz.py notebooks/*.ipynb [--quick] [--write]``: execute notebooks
    and print their run times; ``--write`` saves the outputs into the files (do that in full mode)."""
    import argparse
    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--quick", action="store_true", help="PEFT_NOTEBOOK_QUICK=1 (short runs)")
    p.add_argument("--write", action="store_true", help="save the executed notebooks in place")
    a = p.parse_args(argv)
    for path in a.notebooks:
        _, seconds = run_notebook(path, quick=a.quick, write=a.write)
        print(f"{path}: {seconds:.0f} s ({'quick' if a.quick else 'full'} mode)", flush=True)


if __name__ == "__main__":
    main()
