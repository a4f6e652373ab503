"""Bottleneck adapters in the mini GPT: serial (Houlsby, Pfeiffer) and parallel.

Not in Hugging Face ``peft``: AdapterHub's ``adapters`` library has them, under
the names used here (``houlsby``, ``pfeiffer``, ``parallel``). Each adapter is the
course's ``adapters.Adapter``: ``h + f(h W_down + b_down) W_up + b_up`` with
``W_up = 0`` at the start, so the adapted model starts *exactly* at the base model
(Houlsby et al. 2019, §2.1 use a near-identity init for the same reason).

Where an adapter sits in a pre-LN block ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``::

    houlsby   x + adapter(attn(ln_1 x)),   x + adapter(mlp(ln_2 x))    (Houlsby §2.1)
    pfeiffer  x + attn(ln_1 x),            x + adapter(mlp(ln_2 x))    (Pfeiffer et al. 2021)
    parallel  x + attn(h) + branch(h),     x + mlp(h) + branch(h)      (He et al. 2022, §3)

``adapter(h) = h + branch(h)`` is serial: it reads the sublayer's output, before
the residual add. The parallel adapter reads the sublayer's *input* ``h`` and its
branch is added to the sublayer's output. Both are implemented by one wrapper
module, ``BottleneckWrapper``, placed where the block keeps ``self_attn`` and
``mlp``; the block itself is unchanged.
"""
from __future__ import annotations

import numpy as np

from adapters import Adapter
from nn import Module
from peft_base import AdapterState, Method, register, wrap_or_reuse
from peft_config import BottleneckConfig

PLACEMENTS = {"houlsby": ("self_attn", "mlp"), "pfeiffer": ("mlp",), "parallel": ("self_attn", "mlp")}


class BottleneckWrapper(Module):
    """A block sublayer plus the adapter in slot ``adapter`` (``None``: base only).

    ``forward(x, **kwargs)`` is ``h + adapter.branch(h)`` with ``h = sublayer(x, **kwargs)``
    for a serial adapter and ``sublayer(x, **kwargs) + adapter.branch(x)`` for a parallel one
    (``adapter.parallel``; a plain ``Adapter`` is serial). Keyword arguments
    (attention's ``attention_mask`` and ``prefix``) go to the sublayer untouched.
    ``disabled`` gives the base sublayer.

    The wrapper is *transparent*: the sublayer's modules keep their names
    (``layers.0.self_attn.q_proj``, not ``...self_attn.base_layer.q_proj``), so a
    LoRA adapter, BitFit's bias names and checkpoints see the same model whether or
    not adapters are attached, in whichever order methods were added. Its children
    are the sublayer's children plus ``adapter``; attributes it lacks are read from
    the sublayer (``block.self_attn.prefix_grad`` for prefix tuning, ``.att``), and
    replacing one of the sublayer's modules through it (``set_submodule``, as LoRA
    does) replaces it inside the sublayer. The wrapped sublayer must keep all its
    parameters in sub-modules (true of attention and the MLP).
    """

    adapter_attr = "adapter"
    peft_type = "BOTTLENECK"

    def __init__(self, base_layer: Module):
        if next(base_layer.own_parameters(), None) is not None:
            raise ValueError(f"{type(base_layer).__name__} holds parameters itself; a bottleneck "
                             f"wrapper only wraps a sublayer whose parameters live in sub-modules")
        super().__init__()
        self.base_layer = base_layer
        self.adapter = None
        self.disabled = False

    def children(self):
        yield from self.base_layer.children()               # q_proj, ... keep their names
        if self.adapter is not None:
            yield "adapter", self.adapter

    def __getattr__(self, name):
        # only called for attributes not found normally; never for dunders or the base itself
        if name.startswith("__") or name == "base_layer":
            raise AttributeError(name)
        return getattr(self.base_layer, name)

    def __setattr__(self, name, value):
        base = self.__dict__.get("base_layer")
        if base is not None and isinstance(vars(base).get(name), Module):
            setattr(base, name, value)                      # e.g. LoRA wrapping q_proj
        else:
            super().__setattr__(name, value)

    def forward(self, x, **kwargs):
        self._mode = ("off" if self.adapter is None or self.disabled
                      else "parallel" if getattr(self.adapter, "parallel", False) else "serial")
        h = self.base_layer(x, **kwargs)                    # (B, T, D) the sublayer
        if self._mode == "serial":
            return h + self.adapter.branch(h)               # the adapter reads the output
        if self._mode == "parallel":
            return h + self.adapter.branch(x)               # branch reads the sublayer input
        return h

    def backward(self, dout):
        if self._mode == "serial":
            return self.base_layer.backward(dout + self.adapter.branch_backward(dout))
        dx = self.base_layer.backward(dout)                 # (B, T, D)
        if self._mode == "parallel":
            dx = dx + self.adapter.branch_backward(dout)
        return dx


def bottleneck_dim(config: BottleneckConfig, d_model: int) -> int:
    """``bottleneck_size`` (at most ``d_model``), or ``d_model // reduction_factor`` (which
    must be >= 1); neither given: ``min(16, d_model)``."""
    if config.bottleneck_size is None and config.reduction_factor is None:
        return min(16, d_model)
    if config.bottleneck_size is not None:
        if config.bottleneck_size > d_model:
            raise ValueError(f"BottleneckConfig.bottleneck_size={config.bottleneck_size} is wider "
                             f"than the model (d_model={d_model}): a bottleneck must be at most "
                             f"d_model units")
        return config.bottleneck_size
    size = d_model // config.reduction_factor
    if size < 1:
        raise ValueError(f"BottleneckConfig.reduction_factor={config.reduction_factor} is larger "
                         f"than d_model={d_model}: the bottleneck would have 0 units")
    return size


def make_adapter(config: BottleneckConfig, d_model, rng, dtype) -> Adapter:
    """One ``adapters.Adapter`` (bias per the config) marked serial or parallel."""
    adapter = Adapter(d_model, bottleneck_dim(config, d_model), config.activation,
                      bias=config.bias, rng=rng, dtype=dtype)
    adapter.parallel = config.placement == "parallel"
    return adapter


def bottleneck_param_count(config: BottleneckConfig, d_model: int, n_layers: int) -> int:
    """Closed form: ``layers * sites * (2 d b [+ b + d with biases])``."""
    b = bottleneck_dim(config, d_model)
    per_adapter = 2 * d_model * b + ((b + d_model) if config.bias else 0)
    return n_layers * len(PLACEMENTS[config.placement]) * per_adapter


@register(BottleneckConfig)
class BottleneckMethod(Method):
    """Wrap each block's ``self_attn`` / ``mlp`` (per ``placement``) and give it an adapter."""

    def inject(self, peft_model, config: BottleneckConfig, rng):
        model = peft_model.base_model
        c = model.config
        state = AdapterState(config)
        for i in range(c.n_layers):
            for sub in PLACEMENTS[config.placement]:
                path = f"layers.{i}.{sub}"
                wrap_or_reuse(model, path, BottleneckWrapper, BottleneckWrapper)
                state.slots[path] = make_adapter(config, c.d_model, rng, c.dtype)
        return state
