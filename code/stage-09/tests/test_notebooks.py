"""The notebooks: each one runs top to bottom, and the committed copies show their outputs.

* ``test_notebook_runs``: executes every notebook in a fresh ``python3`` kernel in
  quick mode (``PEFT_NOTEBOOK_QUICK=1``: short runs and sweeps), working directory
  ``notebooks/``; any cell that raises fails the test, naming the cell.
* ``test_committed_notebook_is_executed``: the committed file carries the outputs
  of a *full* run (every code cell executed, the set-up cell says "full mode"),
  with no error output and nothing on stderr, so it reads well on a repository page.
  Refresh them with ``python notebooks/viz.py notebooks/*.ipynb --write``.
* ``test_generated_conclusions_are_shown``: notebooks 02 and 06 state their real-text
  conclusions in Markdown generated from the numbers; the committed copies show it.
* ``test_notebook_trains_with_the_runners_settings``: no notebook sets a learning
  rate, step count, batch size or training-set size of its own; every training run
  goes through ``viz.finetune(method, ...)`` with a method of ``compare.METHODS``,
  which takes them from ``compare.run_spec`` (one table, by import).
"""
import ast
import os
import sys

import nbformat
import pytest

import compare

NB_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "notebooks")
sys.path.insert(0, os.path.abspath(NB_DIR))        # the notebooks' helper module lives there
from viz import run_notebook  # noqa: E402
EXPECTED = ["01_the_finetuning_problem", "02_lora", "03_adapters", "04_prefix_and_prompt_tuning",
            "05_qlora", "06_choosing_a_method", "07_peft_on_real_text", "08_bring_a_real_model"]
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


# Notebooks whose conclusions are generated from the numbers (a code cell's Markdown output,
# never typed into prose), with a phrase each committed copy must show.
GENERATED_PROSE = {"02_lora": "**What the measurement shows.**",
                   "06_choosing_a_method": "| your concern | choose | measured | runner-up |"}


@pytest.mark.parametrize("name, phrase", GENERATED_PROSE.items(), ids=list(GENERATED_PROSE))
def test_generated_conclusions_are_shown(name, phrase):
    path = os.path.join(NB_DIR, name + ".ipynb")
    shown = [o.data["text/markdown"] for c in code_cells(path) for o in c.outputs
             if o.output_type == "display_data" and "text/markdown" in o.data]
    assert any(phrase in text for text in shown), f"{name}: no generated Markdown output with {phrase!r}"


SETTINGS = {"lr", "learning_rate", "steps", "batch_size", "n_train", "warmup_steps"}


def settings_problems(source):
    """Where a notebook's code would train with settings of its own, in words."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg in SETTINGS and isinstance(node.value, ast.Constant):
            problems.append(f"{node.arg}={node.value.value!r} typed in")
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and any(
                isinstance(t, ast.Name) and t.id.lower() in SETTINGS | {"lr_", "rate"} for t in node.targets):
            problems.append(f"{ast.unparse(node)} typed in")
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in ("train", "train.train", "viz.train"):
                problems.append(f"{name}(...) instead of viz.finetune (compare.py's loop)")
            if name == "viz.finetune":
                method = node.args[0] if node.args else None
                # a variable is looked up by compare.run_spec when the notebook runs (unknown: KeyError)
                if not (isinstance(method, ast.Name) or isinstance(method, ast.Constant)
                        and method.value in compare.METHODS):
                    problems.append(f"viz.finetune({ast.unparse(method) if method else ''}...) does "
                                    f"not name a compare.METHODS row")
                if len(node.args) > 3 or any(k.arg not in ("config", "seed", "test_examples")
                                             for k in node.keywords):
                    problems.append(f"{ast.unparse(node)[:60]}... passes settings of its own")
            if name == "AdamW" and not any(k.arg == "lr" and "spec.lr" in ast.unparse(k.value)
                                           for k in node.keywords):
                problems.append("AdamW(...) without lr=spec.lr (the runner's rate)")
    return problems


# notebooks that train something outside compare.py's table, with the reason they give
OWN_SETTINGS = {"08_bring_a_real_model": "GPT-2 small on Shakespeare, not a compare.py method x task"}


@pytest.mark.parametrize("path", [p for p, n in zip(NOTEBOOKS, EXPECTED) if n not in OWN_SETTINGS],
                         ids=[n for n in EXPECTED if n not in OWN_SETTINGS])
def test_notebook_trains_with_the_runners_settings(path):
    source = "\n".join(c.source for c in code_cells(path))
    problems = settings_problems(source)
    assert not problems, f"{os.path.basename(path)}: {problems}"


def test_settings_check_catches_typed_in_settings():
    """The check above on the kinds of line it must refuse (notebook 04 before the fix)."""
    assert settings_problems('viz.finetune(PrefixTuningConfig(), TASK, STEPS, 1e-2)')
    assert settings_problems('LR = 3e-3')
    assert settings_problems('res = viz.finetune("prefix", TASK, lr=0.01)')
    assert settings_problems('opt = AdamW(model, lr=1e-3)')
    assert settings_problems('history = train(model, data, 300, lr=s.lr)')
    assert not settings_problems('res = viz.finetune("prefix", TASK, test_examples=tests)')
    assert not settings_problems('opt = AdamW(model, lr=spec.lr)')
