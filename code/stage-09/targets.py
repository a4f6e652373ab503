"""Which modules a PEFT config touches: ``target_modules`` matching as in Hugging Face ``peft``.

* a list (or tuple/set) of names matches a module whose dotted name equals an entry
  or ends with ``"." + entry`` (so ``"q_proj"`` matches ``layers.0.self_attn.q_proj``);
* a string is a full regular-expression match on the dotted name, except
  ``"all-linear"``: every linear layer of the model but the output layer, as in
  ``peft`` (the mini GPT's head is tied to the embedding; a loaded OPT may have an
  untied ``lm_head``, which is left out);
* ``layers_to_transform`` (ints) keeps only modules under ``layers.{i}.`` (GPT-2: ``h.{i}.``).
"""
from __future__ import annotations

import re

from nn import Linear, Module

ALL_LINEAR = "all-linear"


def matches(name: str, target_modules) -> bool:
    if target_modules == ALL_LINEAR:
        return name != "lm_head"                            # an untied head is the output layer
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def layer_index(name: str):
    m = re.match(r"(?:.*\.)?(?:layers|h)\.(\d+)\.", name)     # OPT/ours: layers.i, GPT-2: h.i
    return int(m.group(1)) if m else None


def find_targets(model: Module, target_modules, layers_to_transform=None,
                 layer_types=(Linear,)) -> list[str]:
    """Dotted names of the modules of ``layer_types`` that the config targets.

    Raises ``ValueError`` listing the model's candidate module names when nothing matches.
    """
    if target_modules is None or (not isinstance(target_modules, str) and len(target_modules) == 0):
        raise ValueError("target_modules is empty: name the modules to adapt, e.g. ['q_proj', 'v_proj']")
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules={target_modules!r} is a string, so a regular "
                             f"expression, but it does not compile: {err}") from None
    elif not all(isinstance(t, str) for t in target_modules):
        raise ValueError(f"target_modules must be module names (strings) or one regular "
                         f"expression, got {target_modules!r}")
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    candidates = [n for n, m in model.named_modules() if n and isinstance(m, layer_types)]
    n_layers = len({layer_index(n) for n in candidates} - {None})
    bad = [i for i in layers_to_transform or [] if not 0 <= i < n_layers] if n_layers else []
    if bad:
        raise ValueError(f"layers_to_transform={layers_to_transform!r}: layer(s) {bad} out of range; "
                         f"the model has layers 0..{n_layers - 1}")
    found = [n for n in candidates if matches(n, target_modules)
             and (layers_to_transform is None or layer_index(n) in layers_to_transform)]
    if not found:
        short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ValueError(
            f"target_modules={target_modules!r} (layers_to_transform={layers_to_transform!r}) "
            f"matched no module. Module names you can target: {', '.join(short)}; "
            f"full names look like {candidates[0] if candidates else '(none)'!r}")
    return found
