"""A catalogue of bad inputs to the public API, and a judge of what each one did.

Each ``Case`` is one argument of one public function (or config) fed one kind of
bad value (a string for an integer, NaN for a learning rate, a ragged token list,
...); hypothesis draws the concrete values. ``outcome`` runs the call on a fresh
model and sorts what happened into

* ``clear``: an exception whose message names the argument (and, for a scalar, its
  value), the model left exactly as it was;
* ``unclear``: an exception that names neither (a NumPy or Python internal);
* ``silent``: no exception at all;
* ``data lost``: the model changed although the call failed (or did not fail);
* ``hung``: (only when tallying) still running after a time limit.

``tests/test_bad_input_properties.py`` asserts ``clear`` for every case; running
``python tests/bad_inputs.py`` prints the tally.
"""
from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from typing import Callable

import numpy as np
from hypothesis import strategies as st

from accounting import compare_peft_methods, compute_parameter_efficiency, estimate_finetune_memory
from data_parallel import DataParallel
from gradcheck import numerical_gradient
from minigpt import GPT, GPTConfig
from nn import Dropout, Embedding, LayerNorm, Linear, cross_entropy
from optim import SGD, AdamW, clip_grad_norm
from peft_model import (BottleneckConfig, LoraConfig, PrefixTuningConfig,  # noqa: I001
                        get_peft_model)
from quantization import quantize_model, quantize_tensor
from tasks import MixtureSampler, fixed_test_set, make_batch, make_examples
from train import eval_loss, evaluate, train

CFG = GPTConfig(vocab_size=16, context_length=8, d_model=8, n_layers=1, n_heads=2)
V, C = CFG.vocab_size, CFG.context_length


def fresh() -> GPT:
    return GPT(CFG, seed=0)


@dataclass(frozen=True)
class Case:
    api: str                      # the function or config called
    argument: str                 # the argument given a bad value
    kind: str                     # which kind of bad value
    strategy: st.SearchStrategy
    call: Callable                # call(value, model)
    expect: str | None = None     # words the message must hold (default: the argument)
    make: Callable | None = None  # builds the model the call gets (default: ``fresh``)

    @property
    def id(self) -> str:
        return f"{self.api}-{self.argument}-{self.kind}"


# ---- kinds of bad scalar values ---------------------------------------------------------
NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf])
STRINGS = st.one_of(st.sampled_from(["1", "0.5", "", "ten", "1e-3", "None"]), st.text(max_size=4))
LISTS = st.lists(st.integers(-3, 3), min_size=0, max_size=3)
FRACTIONS = st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: not float(x).is_integer())


def int_kinds(low, high=None, none_ok=False):
    kinds = {"below": st.integers(low - 10**6, low - 1), "fraction": FRACTIONS,
             "nonfinite": NONFINITE, "string": STRINGS, "bool": st.booleans(), "list": LISTS}
    if high is not None:
        kinds["above"] = st.integers(high + 1, high + 10**6)
    if not none_ok:
        kinds["none"] = st.none()
    return kinds


def number_kinds(low, inclusive=True, high=None, high_inclusive=True, none_ok=False):
    below = st.floats(max_value=low, exclude_max=inclusive, allow_nan=False, allow_infinity=False,
                      min_value=low - 1e6)
    kinds = {"below": below, "nonfinite": NONFINITE, "string": STRINGS, "bool": st.booleans(),
             "list": LISTS}
    if high is not None:
        kinds["above"] = st.floats(min_value=high, exclude_min=high_inclusive, max_value=high + 1e6,
                                   allow_nan=False)
    if not none_ok:
        kinds["none"] = st.none()
    return kinds


def _train(**kwargs):
    def call(v, m):
        args = dict(steps=1, batch_size=2, progress=False)
        args.update({k: v for k in kwargs})
        train(m, "copy", **args)
    return call


def _gpt_config(field, **others):
    return lambda v, m: GPTConfig(**{**others, field: v})


def _param_names(m):
    return [n for n, _ in m.named_parameters()]


# (api, argument, low, high, none_ok, call)
INT_FIELDS = [
    ("GPTConfig", "vocab_size", 1, None, False, _gpt_config("vocab_size")),
    ("GPTConfig", "context_length", 1, None, False, _gpt_config("context_length")),
    ("GPTConfig", "d_model", 1, None, False, _gpt_config("d_model", n_heads=1)),
    ("GPTConfig", "n_layers", 1, None, False, _gpt_config("n_layers")),
    ("GPTConfig", "n_heads", 1, None, False, _gpt_config("n_heads")),
    ("train", "steps", 0, None, False, _train(steps=1)),
    ("train", "batch_size", 1, None, False, _train(batch_size=1)),
    ("train", "warmup_steps", 0, None, False, _train(warmup_steps=1)),
    ("train", "eval_every", 1, None, True, _train(eval_every=1)),
    ("train", "processes", 1, None, False, _train(processes=1)),
    ("train", "seed", 0, None, False, _train(seed=1)),
    ("GPT.generate", "max_new_tokens", 0, None, False, lambda v, m: m.generate(np.zeros((1, 2), int), v)),
    ("GPT.generate", "eos_id", 0, V - 1, True, lambda v, m: m.generate(np.zeros((1, 2), int), 2, eos_id=v)),
    ("evaluate", "batch_size", 1, None, False,
     lambda v, m: evaluate(m, make_examples("copy", 2, max_len=2), batch_size=v)),
    ("eval_loss", "batch_size", 1, None, False,
     lambda v, m: eval_loss(m, make_examples("copy", 2, max_len=2), batch_size=v)),
    ("nn.Linear", "in_features", 1, None, False, lambda v, m: Linear(v, 4)),
    ("nn.Linear", "out_features", 1, None, False, lambda v, m: Linear(4, v)),
    ("nn.Embedding", "num_embeddings", 1, None, False, lambda v, m: Embedding(v, 4)),
    ("nn.Embedding", "dim", 1, None, False, lambda v, m: Embedding(4, v)),
    ("nn.LayerNorm", "dim", 1, None, False, lambda v, m: LayerNorm(v)),
    ("make_examples", "n", 0, None, False, lambda v, m: make_examples("copy", v)),
    ("make_examples", "seed", 0, None, False, lambda v, m: make_examples("copy", 2, seed=v)),
    ("make_examples", "min_len", 1, None, False, lambda v, m: make_examples("copy", 2, min_len=v)),
    ("make_examples", "max_len", 1, None, False, lambda v, m: make_examples("copy", 2, min_len=1, max_len=v)),
    ("fixed_test_set", "n", 0, None, False, lambda v, m: fixed_test_set("copy", v)),
    ("make_batch", "context_length", 1, None, True,
     lambda v, m: make_batch([([3, 20, 1], [20])], context_length=v)),
    ("MixtureSampler", "seed", 0, None, False, lambda v, m: MixtureSampler("copy", seed=v)),
    ("MixtureSampler", "min_len", 1, None, False, lambda v, m: MixtureSampler("copy", min_len=v)),
    ("MixtureSampler.__call__", "n", 0, None, False, lambda v, m: MixtureSampler("copy")(v)),
    ("quantize_model", "blocksize", 1, None, False, lambda v, m: quantize_model(m, blocksize=v)),
    ("quantize_tensor", "bits", 2, 8, False, lambda v, m: quantize_tensor(np.ones(4), bits=v)),
    ("DataParallel", "processes", 1, None, True, lambda v, m: DataParallel(m, processes=v)),
    ("estimate_finetune_memory", "num_params", 1, None, False,
     lambda v, m: estimate_finetune_memory(v, "full")),
    ("estimate_finetune_memory", "trainable_params", 0, None, True,
     lambda v, m: estimate_finetune_memory(10**6, "lora", trainable_params=v)),
    ("compute_parameter_efficiency", "total", 1, None, False,
     lambda v, m: compute_parameter_efficiency(0, v)),
    ("compare_peft_methods", "num_layers", 1, None, False, lambda v, m: compare_peft_methods(num_layers=v)),
    ("compare_peft_methods", "lora_rank", 1, None, False, lambda v, m: compare_peft_methods(lora_rank=v)),
]

def _lora(**fields):
    def call(v, m):
        get_peft_model(m, LoraConfig(**{"r": 2, "target_modules": ["q_proj"], **{k: v for k in fields}}))
    return call


INT_FIELDS += [
    ("LoraConfig", "r", 1, 8, False, _lora(r=1)),          # (8 = d_model: the layer's rank)
    ("PrefixTuningConfig", "num_virtual_tokens", 1, None, False,
     lambda v, m: get_peft_model(m, PrefixTuningConfig(num_virtual_tokens=v))),
    ("BottleneckConfig", "bottleneck_size", 1, 8, True,
     lambda v, m: get_peft_model(m, BottleneckConfig(bottleneck_size=v))),
]

# (api, argument, call): fields that take True or False only
BOOL_FIELDS = [
    ("LoraConfig", "use_rslora", _lora(use_rslora=False)),
    ("LoraConfig", "use_dora", _lora(use_dora=False)),
    ("PrefixTuningConfig", "prefix_projection",
     lambda v, m: get_peft_model(m, PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=v))),
    ("quantize_model", "double_quant", lambda v, m: quantize_model(m, double_quant=v)),
]
BOOL_KINDS = {"string": STRINGS, "int": st.integers(-5, 5), "float": st.floats(allow_nan=True),
              "none": st.none(), "list": LISTS}

# (api, argument, low, inclusive, high, high_inclusive, none_ok, call)
NUMBER_FIELDS = [
    ("GPTConfig", "dropout", 0.0, True, 1.0, False, False, _gpt_config("dropout")),
    ("nn.Dropout", "p", 0.0, True, 1.0, False, False, lambda v, m: Dropout(v)),
    ("nn.LayerNorm", "eps", 0.0, False, None, True, False, lambda v, m: LayerNorm(4, eps=v)),
    ("AdamW", "lr", 0.0, False, None, True, False, lambda v, m: AdamW(m, lr=v)),
    ("AdamW", "weight_decay", 0.0, True, None, True, False, lambda v, m: AdamW(m, weight_decay=v)),
    ("AdamW", "eps", 0.0, False, None, True, False, lambda v, m: AdamW(m, eps=v)),
    ("AdamW", "betas", 0.0, True, 1.0, False, False, lambda v, m: AdamW(m, betas=(0.9, v))),
    ("AdamW.param_groups", "lr", 0.0, False, None, True, False,
     lambda v, m: AdamW(m, param_groups=[{"names": _param_names(m), "lr": v}])),
    ("SGD", "lr", 0.0, False, None, True, False, lambda v, m: SGD(m, lr=v)),
    ("SGD", "momentum", 0.0, True, 1.0, False, False, lambda v, m: SGD(m, momentum=v)),
    ("SGD", "weight_decay", 0.0, True, None, True, False, lambda v, m: SGD(m, weight_decay=v)),
    ("Optimizer.set_lr_scale", "scale", 0.0, True, None, True, False,
     lambda v, m: AdamW(m).set_lr_scale(v)),
    ("clip_grad_norm", "max_norm", 0.0, False, None, True, False, lambda v, m: clip_grad_norm(m, v)),
    ("train", "lr", 0.0, False, None, True, False, _train(lr=1e-3)),
    ("train", "weight_decay", 0.0, True, None, True, False, _train(weight_decay=0.0)),
    ("train", "grad_clip", 0.0, False, None, True, True, _train(grad_clip=1.0)),
    ("DataParallel", "timeout", 0.0, False, None, True, False, lambda v, m: DataParallel(m, 1, timeout=v)),
    ("numerical_gradient", "h", 0.0, False, 1e-2, True, False,
     lambda v, m: numerical_gradient(lambda: 0.0, np.zeros(2), h=v)),
    ("LoraConfig", "lora_alpha", 0.0, False, None, True, False, _lora(lora_alpha=1.0)),
    ("LoraConfig", "lora_dropout", 0.0, True, 1.0, False, False, _lora(lora_dropout=0.0)),
    ("MixtureSampler", "weights", 0.0, True, None, True, False,
     lambda v, m: MixtureSampler(["copy", "sort"], weights=[v, 1.0])),
]


def scalar_cases() -> list[Case]:
    cases = []
    for api, arg, low, high, none_ok, call in INT_FIELDS:
        for kind, strategy in int_kinds(low, high, none_ok).items():
            cases.append(Case(api, arg, kind, strategy, call))
    for api, arg, call in BOOL_FIELDS:
        for kind, strategy in BOOL_KINDS.items():
            cases.append(Case(api, arg, kind, strategy, call))
    for api, arg, low, inc, high, hinc, none_ok, call in NUMBER_FIELDS:
        for kind, strategy in number_kinds(low, inc, high, hinc, none_ok).items():
            cases.append(Case(api, arg, kind, strategy, call))
    return cases


# ---- kinds of bad arrays ----------------------------------------------------------------
def ids(low=0, high=V - 1):
    return st.integers(low, high)


RAGGED = st.lists(st.lists(ids(), min_size=1, max_size=4), min_size=2, max_size=3).filter(
    lambda rows: len({len(r) for r in rows}) > 1)
OUT_OF_RANGE = st.one_of(st.integers(V, V + 1000), st.integers(-1000, -1))


def grid(B=2, T=4, elements=None):
    return st.lists(st.lists(ids() if elements is None else elements, min_size=T, max_size=T), min_size=B, max_size=B)


def with_bad_id(draw_ids=OUT_OF_RANGE):
    return st.tuples(grid(), draw_ids, st.integers(0, 1), st.integers(0, 3)).map(
        lambda t: [[t[1] if (i, j) == (t[2], t[3]) else x for j, x in enumerate(row)]
                   for i, row in enumerate(t[0])])


def forward(value, m, **kwargs):
    m.forward(value, **kwargs)


def forward_with(arg):
    return lambda v, m: m.forward(np.zeros((2, 4), int), **{arg: v})


def backward_after_forward(v, m):
    m.forward(np.zeros((2, 4), int))
    m.backward(np.asarray(v, dtype=np.float32))


def dp_step(tokens=None, targets=None):
    def call(v, m):
        with DataParallel(m, processes=1) as dp:
            dp.forward_backward(np.zeros((2, 4), int) if tokens is None else v,
                                np.zeros((2, 4), int) if targets is None else v)
    return call


EXAMPLE_KINDS = {
    "not-a-pair": st.lists(ids(), min_size=1, max_size=3).map(lambda p: [p]),
    "string-tokens": st.text(min_size=1, max_size=3).map(lambda s: [(s, [20])]),
    "id-out-of-range": st.one_of(st.integers(64, 1000), st.integers(-1000, -1)).map(
        lambda t: [([3, t, 1], [20])]),                  # (the tasks' vocabulary has 64 ids)
    "float-id": FRACTIONS.map(lambda t: [([3, t, 1], [20])]),
    "empty-prompt": st.lists(ids(), max_size=2).map(lambda a: [([], a)]),
    "not-a-list": st.one_of(st.text(min_size=1, max_size=3), st.integers(), st.none()),
}


def array_cases() -> list[Case]:
    tokens = {
        "ragged": RAGGED, "id-out-of-range": with_bad_id(),
        "float": grid(elements=st.floats(0, 15)).map(np.array),
        "rank-1": st.lists(ids(), min_size=1, max_size=4),
        "rank-3": st.lists(grid(), min_size=1, max_size=2),
        "empty-batch": st.just(np.zeros((0, 4), int)),
        "empty-sequence": st.integers(1, 3).map(lambda b: np.zeros((b, 0), int)),
        "too-long": st.integers(C + 1, C + 20).map(lambda t: np.zeros((1, t), int)),
        "strings": grid(elements=st.text(max_size=2)),
    }
    cases = [Case("GPT.forward", "tokens", k, s, forward, None) for k, s in tokens.items()]
    cases += [Case("GPT.generate", "tokens", k, s,
                   lambda v, m: m.generate(v, 2), None) for k, s in tokens.items()
              if k not in ("too-long",)]                   # generation crops long prompts
    masks = {"wrong-shape": st.integers(1, 3).map(lambda t: np.ones((2, t))),
             "not-0-or-1": st.sampled_from([2, -1, 0.5, 7]).map(lambda x: np.full((2, 4), x)),
             "ragged": RAGGED}
    cases += [Case("GPT.forward", "attention_mask", k, s, forward_with("attention_mask"))
              for k, s in masks.items()]
    positions = {"wrong-length": st.integers(1, 3).map(np.arange),
                 "wrong-batch": st.integers(3, 5).map(lambda b: np.zeros((b, 4), int)),
                 "float": st.just(np.arange(4.0)),
                 "out-of-range": st.integers(C, C + 50).map(lambda p: np.full(4, p))}
    cases += [Case("GPT.forward", "position_ids", k, s, forward_with("position_ids"))
              for k, s in positions.items()]
    cases += [
        Case("GPT.backward", "dlogits", "wrong-shape",
             st.sampled_from([(2, 4, V + 1), (2, 3, V), (1, 4, V), (8, V)]).map(np.zeros),
             backward_after_forward, "dout has shape"),
        Case("GPT.backward", "dlogits", "before-forward", st.just(np.zeros((2, 4, V))),
             lambda v, m: m.backward(v), "before forward"),
    ]
    logits = np.zeros((2, 4, V))
    cases += [
        Case("cross_entropy", "targets", "id-out-of-range", with_bad_id(st.integers(V, V + 99)),
             lambda v, m: cross_entropy(logits, np.asarray(v)), "target"),
        Case("cross_entropy", "targets", "wrong-shape", st.integers(1, 3).map(lambda t: np.zeros((2, t), int)),
             lambda v, m: cross_entropy(logits, v)),
        Case("cross_entropy", "targets", "float", grid(elements=st.floats(0, 15)).map(np.array),
             lambda v, m: cross_entropy(logits, v)),
        Case("cross_entropy", "targets", "ragged", RAGGED, lambda v, m: cross_entropy(logits, v)),
        Case("cross_entropy", "logits", "integers", grid(elements=st.integers(0, 9)).map(
            lambda g: np.array(g)[..., None]), lambda v, m: cross_entropy(v, np.zeros((2, 4), int))),
    ]
    cases += [Case("make_batch", "examples", k, s, lambda v, m: make_batch(v), "example")
              for k, s in EXAMPLE_KINDS.items()]
    cases += [Case("train", "data", "empty", st.just([]),
                   lambda v, m: train(m, v, steps=1, progress=False), "training data"),
              Case("evaluate", "examples", "empty", st.just([]), lambda v, m: evaluate(m, v), "example"),
              Case("make_examples", "task", "unknown", st.text(min_size=1, max_size=6).filter(
                  lambda t: t not in ("copy", "sort")), lambda v, m: make_examples(v, 2), "task"),
              Case("quantize_model", "target_modules", "misspelt",
                   st.sampled_from([["q_prj"], ["fc3"], ["layers.9.mlp.fc1"]]),
                   lambda v, m: quantize_model(m, target_modules=v, blocksize=8)),
              Case("quantize_model", "quant_type", "unknown", st.sampled_from(["fp4", "int4", "NF4", ""]),
                   lambda v, m: quantize_model(m, quant_type=v)),
              Case("DataParallel.forward_backward", "inputs", "empty",
                   st.sampled_from([np.zeros((0, 4), int), np.zeros((2, 0), int)]), dp_step(tokens=True),
                   "inputs"),
              Case("DataParallel.forward_backward", "targets", "wrong-shape",
                   st.integers(1, 3).map(lambda t: np.zeros((2, t), int)), dp_step(targets=True),
                   "targets"),
              Case("get_peft_model", "target_modules", "misspelt",
                   st.sampled_from([["q_prj"], ["fc3"], ["layers.9.mlp.fc1"], "q_proj[", [3]]),
                   lambda v, m: get_peft_model(m, LoraConfig(r=2, target_modules=v))),
              Case("get_peft_model", "layers_to_transform", "out-of-range",
                   st.lists(st.integers(1, 9), min_size=1, max_size=2),
                   lambda v, m: get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj"],
                                                             layers_to_transform=v))),
              Case("PeftModel.add_adapter", "adapter_name", "path-like",
                   st.one_of(st.sampled_from(["../x", "a/b", "..", ".h", "a\\b", ""]), st.integers(),
                             st.none()),
                   lambda v, m: m.add_adapter(v, LoraConfig(r=2, target_modules=["v_proj"])),
                   "adapter_name", make=lambda: get_peft_model(fresh(), LoraConfig(r=2))),
              Case("numerical_gradient", "x", "float32", st.just(np.zeros(3, np.float32)),
                   lambda v, m: numerical_gradient(lambda: 0.0, v)),
              Case("GPTConfig", "dtype", "unsupported",
                   st.sampled_from([np.float16, np.int64, np.bool_, "float16", "int8", np.complex64, None]),
                   _gpt_config("dtype"))]
    return cases


CASES = scalar_cases() + array_cases()


# ---- the judge --------------------------------------------------------------------------
def state(model) -> tuple:
    """Everything a failed call must not change: module tree, flags, values, gradients."""
    modules = tuple((n, id(m), tuple(sorted(m.frozen)), m.training) for n, m in model.named_modules())
    params = {n: p.copy() for n, p in model.named_parameters()}
    grads = {n: None if model.get_grad(n) is None else model.get_grad(n).copy() for n in params}
    return modules, params, grads


def same_state(a, b) -> bool:
    if a[0] != b[0] or a[1].keys() != b[1].keys():
        return False
    for x, y in ((a[1], b[1]), (a[2], b[2])):
        for n in x:
            if (x[n] is None) != (y[n] is None) or (x[n] is not None and not np.array_equal(
                    x[n], y[n], equal_nan=True)):
                return False
    return True


def names_value(message: str, value) -> bool:
    """Does ``message`` show the scalar ``value`` (as written, or as the float it became)?"""
    if not isinstance(value, (int, float, str, bool)) or value is None:
        return True                               # arrays, lists: the argument name suffices
    shown = {repr(value), str(value)}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        shown |= {repr(float(value)), f"{value:g}"}
    return any(s in message for s in shown)


class Hung(Exception):
    pass


def _alarm(signum, frame):
    raise Hung


def outcome(case: Case, value, time_limit: int = 0) -> tuple[str, str]:
    """``(category, what happened)`` for one call of ``case`` with ``value``; with a
    ``time_limit`` (seconds, POSIX only) a call still running then counts as ``hung``."""
    model = (case.make or fresh)()
    before = state(model)
    if time_limit:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(time_limit)
    try:
        with np.errstate(all="ignore"):
            case.call(value, model)
    except Hung:
        return "hung", f"still running after {time_limit} s"
    except Exception as error:                    # noqa: BLE001 -- judged below
        message = f"{type(error).__name__}: {error}"
        if not same_state(before, state(model)):
            return "data lost", message
        expected = case.expect or case.argument
        internal = isinstance(error, (AttributeError, KeyError, IndexError, ZeroDivisionError,
                                      OverflowError, np.exceptions.AxisError))
        if internal or expected.lower() not in str(error).lower() or not names_value(str(error), value):
            return "unclear", message
        return "clear", message
    finally:
        if time_limit:
            signal.alarm(0)
    if not same_state(before, state(model)):
        return "data lost", "no error, and the model changed"
    return "silent", "no error"


def tally(examples_per_case=5, time_limit=10):
    """Run every case on ``examples_per_case`` drawn values; ``{category: count}`` and the
    non-clear outcomes."""
    from hypothesis import HealthCheck, given, settings
    counts, bad = {"clear": 0, "unclear": 0, "silent": 0, "data lost": 0, "hung": 0}, []
    for case in CASES:
        seen = []

        @settings(max_examples=examples_per_case, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(case.strategy)
        def run(value):
            key = repr(value)
            if key in seen:
                return
            seen.append(key)
            try:
                category, message = outcome(case, value, time_limit)
            except Hung:                        # the alarm rang while the error was judged
                category, message = "hung", f"still running after {time_limit} s"
            finally:
                signal.alarm(0)
            counts[category] += 1
            if category != "clear":
                bad.append((case.id, key[:60], category, message[:160]))
        run()
    return counts, bad


if __name__ == "__main__":
    counts, bad = tally()
    print(f"{len(CASES)} cases, {sum(counts.values())} distinct calls:", counts)
    for row in bad:
        print(" | ".join(row))
