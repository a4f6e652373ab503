"""What every PEFT method shares: the ``Method`` protocol, its registry and the helpers.

A method is one ``Method`` object, registered for its config type::

    @register(IA3Config)
    class IA3Method(Method):
        def inject(self, peft_model, config, rng) -> AdapterState: ...

``inject`` adds the method's modules to ``peft_model.base_model`` and returns an
``AdapterState`` saying what it added: *slots* (wrapper path -> the module that
sits in the wrapper's slot), an *encoder* (prefix / prompt tuning) or the names
of base parameters it makes *trainable* (BitFit). ``PeftModel`` does the rest
(activating, switching, merging, saving) from that record alone.

This module imports no method and no ``PeftModel``: the methods import it, and
``peft_model`` imports the methods, so every method is registered as soon as
``peft_model`` is imported, whatever was imported before.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nn import LayerNorm, Linear, Module, set_submodule
from peft_config import PeftConfig
from quantization import QuantizedLinear
from targets import find_targets

METHODS: dict[str, "Method"] = {}       # peft_type -> the Method that injects it


@dataclass
class AdapterState:
    """Everything one named adapter added to a model."""
    config: PeftConfig
    slots: dict = field(default_factory=dict)       # wrapper path -> module for its slot
    encoder: Module | None = None                   # prefix / prompt encoder
    trainable: list = field(default_factory=list)   # base parameter names it trains


class Method:
    """How one PEFT method attaches to a model. Subclasses fill ``inject``.

    ``encoder_attr``: the attribute name under which ``PeftModel`` exposes the
    method's encoder (``"prefix_encoder"``, ``"prompt_encoder"``), or ``None``.
    """
    encoder_attr = None

    def inject(self, peft_model, config, rng) -> AdapterState:
        raise NotImplementedError

    def merge_and_unload_module(self, wrapper):
        """The plain module that replaces ``wrapper`` with the update folded in
        (a float ``nn.Linear``, even over a 4-bit base)."""
        if not hasattr(wrapper, "merged_linear"):
            raise ValueError(f"{type(self).__name__} cannot be merged into the weights")
        return wrapper.merged_linear()


def register(config_cls):
    """Class decorator: ``METHODS[config_cls.peft_type] = method_cls()``."""
    def deco(method_cls):
        METHODS[config_cls.peft_type] = method_cls()
        return method_cls
    return deco


def method_for(peft_type: str) -> Method:
    """The registered ``Method`` for ``peft_type``, or a ``ValueError`` naming the known ones."""
    if peft_type not in METHODS:
        raise ValueError(f"no PEFT method is registered for peft_type={peft_type!r}; "
                         f"registered: {sorted(METHODS)} (import peft_model to register them all)")
    return METHODS[peft_type]


def wrap_or_reuse(model, path, wrapper_cls, make_wrapper):
    """The wrapper at ``path``: the existing one, or a new one wrapping the module there.

    ``make_wrapper(module)`` builds the wrapper; its slot starts empty (``None``):
    ``PeftModel.set_adapter`` fills the slots.
    """
    module = model.get_submodule(path)
    if isinstance(module, wrapper_cls):
        return module
    wrapper = make_wrapper(module)
    setattr(wrapper, wrapper.adapter_attr, None)
    set_submodule(model, path, wrapper)
    return wrapper


def linear_types():
    """Module types a LoRA-like wrapper may wrap (float or 4-bit quantized linears)."""
    return (Linear, QuantizedLinear)


def find_linear_targets(model, target_modules, layers_to_transform, wrapper_cls):
    """Targeted linears; a module already wrapped by ``wrapper_cls`` counts as its base."""
    names = find_targets(model, target_modules, layers_to_transform,
                         layer_types=linear_types() + (wrapper_cls,))
    return [n for n in names if not n.endswith(".base_layer")]


def bias_names(model, paths=None, include_layernorm=True):
    """Dotted names of bias parameters (of the modules under ``paths`` if given)."""
    names = []
    for path, module in model.named_modules():
        if paths is not None and not any(path == p or path.startswith(p + ".") for p in paths):
            continue
        if isinstance(module, LayerNorm) and not include_layernorm:
            continue
        if "bias" in module.param_names and getattr(module, "bias", None) is not None:
            names.append(f"{path}.bias")
    return names
