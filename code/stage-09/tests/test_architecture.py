"""The structure itself: imports run one way, methods register themselves, the docs agree.

* The import graph of the project's own modules (``code/stage-09``, ``exercises``,
  ``exercises/solutions``; imports inside functions count) has no cycle, and the
  PEFT core imports only downwards through the layers of docs/ARCHITECTURE.md.
* Importing ``peft_model`` registers every method, whatever was imported before
  (checked in fresh interpreters), and ``PeftModel(model, config)`` works directly.
* docs/ARCHITECTURE.md's table of where each method touches the model matches
  the registered methods, and its worked example (a new method) runs.
"""
import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt import GPT, GPTConfig

STAGE = Path(__file__).resolve().parents[1]
ROOT = STAGE.parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"

# The PEFT core's layers, bottom to top (docs/ARCHITECTURE.md): a module may import
# only from its own layer or below.
CORE_LAYERS = [
    ["validate", "module", "nn", "targets", "nf4", "gradcheck", "attention_reference", "generate"],
    ["minigpt", "gpt2", "quantization", "quantized_embedding", "optim", "accounting", "qat"],
    ["lora", "adapters", "soft_prompts", "dora", "trainable_tokens", "peft_config"],
    ["peft_base", "peft_methods", "ia3", "bottleneck"],
    ["checkpoint", "hf_names", "peft_io", "hf_tokenizer"],
    ["peft_merge", "peft_model"],
    ["hf_export", "peft", "hf_import"],
]


def project_modules():
    """``{module id: path}``: code/stage-09/*.py, exercises/*.py, exercises/solutions/*.py."""
    modules = {p.stem: p for p in STAGE.glob("*.py")}
    modules.update({p.stem: p for p in (ROOT / "exercises").glob("*.py")})
    modules.update({f"solutions.{p.stem}": p for p in (ROOT / "exercises" / "solutions").glob("*.py")})
    return modules


def imported_names(path):
    """Every module name an ``import`` statement anywhere in the file names (functions too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def import_graph():
    modules = project_modules()
    library = {m for m in modules if not m.startswith("solutions.")}
    return {m: sorted(imported_names(p) & library - {m}) for m, p in modules.items()}


def find_cycle(graph):
    """One import cycle as a list ``[a, b, ..., a]``, or ``None`` (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_no_import_cycle_in_the_project():
    graph = import_graph()
    assert {"peft", "peft_model", "lora", "checks_lora"} <= set(graph)      # the walk sees them
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_peft_core_imports_only_downwards():
    graph, layer_of = import_graph(), {}
    for i, layer in enumerate(CORE_LAYERS):
        layer_of.update({m: i for m in layer})
    assert set(layer_of) <= set(graph), sorted(set(layer_of) - set(graph))
    upward = [f"{m} (layer {layer_of[m]}) imports {d} (layer {layer_of[d]})"
              for m in layer_of for d in graph[m] if layer_of.get(d, -1) > layer_of[m]]
    assert upward == []


@pytest.mark.parametrize("first", ["import peft_model", "import peft", "import peft_io",
                                   "import ia3", "import bottleneck", "import hf_export",
                                   "from peft import LoraConfig, get_peft_model, PeftModel, "
                                   "PromptTuningConfig, PrefixTuningConfig, IA3Config, TaskType"])
def test_every_method_is_registered_whatever_was_imported_first(first):
    code = (f"{first}\nimport peft_model, peft_base, peft_config\n"
            f"print(sorted(peft_base.METHODS) == sorted(peft_config.CONFIG_TYPES))")
    out = subprocess.run([sys.executable, "-c", code], cwd=STAGE, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def test_peft_model_built_directly():
    from peft_model import LoraConfig, PeftModel, PromptTuningConfig
    cfg = GPTConfig(vocab_size=11, context_length=8, d_model=8, n_layers=2, n_heads=2)
    tokens = np.zeros((1, 4), int)
    for config in (LoraConfig(r=2), PromptTuningConfig(num_virtual_tokens=2)):
        model = PeftModel(GPT(cfg), config)
        assert model(tokens).shape == (1, 4, 11) and model.num_parameters(only_trainable=True) > 0


# ------------------------------------------------------------------ the docs
def doc_table():
    """``{peft_type: {"config", "touch", "trains"}}`` from ARCHITECTURE.md's method table."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"`[A-Z_0-9]+`", cells[0]):
            rows[cells[0].strip("`")] = {"config": cells[1].strip("`"), "touch": cells[2].strip("`"),
                                         "trains": set(re.findall(r"`([^`]+)`", cells[4]))}
    return rows


def trained_names(config):
    """What a default adapter of ``config`` trains, as the table names it."""
    from peft_model import get_peft_model
    cfg = GPTConfig(vocab_size=11, context_length=16, d_model=8, n_layers=2, n_heads=2)
    model = get_peft_model(GPT(cfg), config)
    state = model.adapters["default"]
    names = set()
    for path, module in state.slots.items():
        attr = model.base_model.get_submodule(path).adapter_attr
        names.update(f"{attr}.{n}" for n, _ in module.named_parameters())
    if state.encoder is not None:
        attr = dict((v, k) for k, v in model.children())[state.encoder]
        names.update(f"{attr}.{n}" for n, _ in state.encoder.named_parameters())
    base = [n for n, _ in model.base_model.named_parameters()]
    names.update(["everything"] if sorted(state.trainable) == sorted(base)
                 else {n.rsplit(".", 1)[-1] for n in state.trainable})
    return names


def test_the_method_table_matches_the_registered_methods():
    import peft_model  # noqa: F401  (registers every method)
    from peft_base import METHODS
    from peft_config import CONFIG_TYPES, LoraConfig, PrefixTuningConfig
    rows = doc_table()
    assert sorted(rows) == sorted(METHODS), "ARCHITECTURE.md's table lists other methods"
    extra = {"LORA": [LoraConfig(use_dora=True)],
             "PREFIX_TUNING": [PrefixTuningConfig(prefix_projection=True)]}
    for peft_type, row in rows.items():
        cls = CONFIG_TYPES[peft_type]
        assert row["config"] == cls.__name__ and row["touch"] == cls.touch_point, (peft_type, row)
        trains = set().union(*(trained_names(c) for c in [cls()] + extra.get(peft_type, [])))
        assert row["trains"] == trains, (peft_type, row["trains"], trains)


def test_the_worked_example_runs():
    """The "add a method" example, run as written; it unregisters itself afterwards."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    example = [b for b in blocks if "@register(" in b]
    assert len(example) == 1
    from peft_base import METHODS
    from peft_config import CONFIG_TYPES
    before = (dict(METHODS), dict(CONFIG_TYPES))
    try:
        exec(compile(example[0], str(DOC), "exec"), {"__name__": "architecture_example"})
    finally:
        METHODS.clear(), METHODS.update(before[0])
        CONFIG_TYPES.clear(), CONFIG_TYPES.update(before[1])
