"""The notebooks: each one runs top to bottom, and the committed copies show their outputs.

* ``test_notebook_runs``: executes every notebook in a fresh ``python3`` kernel in
  quick mode (``PEFT_NOTEBOOK_QUICK=1``: short runs and sweeps), working directory
  ``notebooks/``; any cell that raises fails the test, naming the cell.
* ``test_committed_notebook_is_executed``: the committed file carries the outputs
  of a *full* run (every code cell executed, the set-up cell says "full mode"),
  with no error output and nothing on stderr, so it reads well on a repository page.
  Refresh them with ``python code/stage-09/viz.py notebooks/*.ipynb --write``.
"""
import os

import nbformat
import pytest

from viz import run_notebook

NB_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "notebooks")
EXPECTED = ["01_the_finetuning_problem", "02_lora", "03_adapters", "04_prefix_and_prompt_tuning",
            "05_qlora", "06_choosing_a_method", "08_bring_a_real_model"]
NOTEBOOKS = [os.path.join(NB_DIR, name + ".ipynb") for name in EXPECTED]
QUICK_TIMEOUT = 300          # seconds per cell; quick mode needs a few seconds per notebook


def code_cells(path):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_every_notebook_is_there():
    found = sorted(f[:-len(".ipynb")] for f in os.listdir(NB_DIR) if f.endswith(".ipynb"))
    assert found == EXPECTED, f"notebooks/ holds {found}, expected {EXPECTED}"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=EXPECTED)
def test_notebook_runs(path):
    nb, seconds = run_notebook(path, quick=True, timeout=QUICK_TIMEOUT)
    setup = next(c for c in nb.cells if c.cell_type == "code")
    first = "".join(o.get("text", "") for o in setup.outputs if o.output_type == "stream")
    assert "quick mode" in first, f"{os.path.basename(path)} did not switch to quick mode: {first!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=EXPECTED)
def test_committed_notebook_is_executed(path):
    cells = code_cells(path)
    name = os.path.basename(path)
    assert cells, f"{name} has no code cells"
    not_run = [i for i, c in enumerate(cells) if c.execution_count is None]
    assert not not_run, f"{name}: code cells {not_run} were never executed; commit it with outputs"
    counts = [c.execution_count for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{name}: cells not run in order once each: {counts}"
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(cells)
              for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name} was committed with errors: {errors}"
    stderr = [(i, o.text[:200]) for i, c in enumerate(cells)
              for o in c.outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, f"{name} was committed with stderr output: {stderr}"
    setup = "".join(o.get("text", "") for o in cells[0].outputs if o.output_type == "stream")
    assert "full mode" in setup, f"{name}: the committed outputs are not from a full run ({setup!r})"
    assert any(o.output_type == "display_data" for c in cells for o in c.outputs), \
        f"{name} has no figure"
