"""(IA)3: learned vectors that rescale activations (Liu et al. 2022, §3.3).

"Infused Adapter by Inhibiting and Amplifying Inner Activations" trains one
vector per targeted linear and nothing else:

    keys, values (k_proj, v_proj)   y = l_out * (x W^T + b)      l_out (out,)  scales the OUTPUT
    feed-forward (fc2)              y = (l_in * x) W^T + b       l_in  (in,)   scales the INPUT

In the mini GPT ``fc2``'s input is the GELU output, so scaling it is exactly the
paper's ``l_ff * gelu(W_1 x)``. The vectors start at ones, so the adapted model
starts exactly at the base model. Both scalings fold into the weight, so (IA)3 adds
no inference cost once merged:

    output scaling   W' = diag(l) W,  b' = l * b
    input scaling    W' = W diag(l),  b' = b

and unmerging divides back (exact up to float rounding). It trains ``2 d + d_ff``
numbers per block: for a 7B model (d = 4096, 32 blocks, d_ff = 4 d) 786,432, about
0.01 % of the weights.
"""
from __future__ import annotations

import numpy as np

from lora import LinearWrapper
from nn import Module
from peft_base import AdapterState, Method, find_linear_targets, linear_types, register, wrap_or_reuse
from peft_config import IA3Config
from targets import layer_index, matches


class IA3Vector(Module):
    """The slot module: one learned scale ``ia3_l`` (Hugging Face's name), ones at start.

    ``forward(t)`` returns ``t * ia3_l`` over the last axis; ``backward(dout)``
    accumulates ``ia3_l_grad = sum(dout * t)`` over all leading axes and returns
    ``dout * ia3_l``. ``is_feedforward`` says whether it scales its layer's input.
    """

    param_names = ("ia3_l",)

    def __init__(self, features, is_feedforward=False, dtype=np.float32):
        super().__init__()
        self.features, self.is_feedforward = features, is_feedforward
        self.ia3_l = np.ones(features, dtype=dtype)        # (features,)

    def forward(self, t):
        self.t = t                                          # (..., features)
        return t * self.ia3_l                               # (..., features)

    def backward(self, dout):
        if self.wants_grad("ia3_l"):
            self._accumulate("ia3_l", (dout * self.t).reshape(-1, self.features).sum(0))
        return dout * self.ia3_l                            # (..., features)


def ia3_merged(weight, bias, l, is_feedforward):
    """``(W', b')`` with the scale folded in (see the module docstring)."""
    l = l.astype(weight.dtype, copy=False)
    if is_feedforward:
        return weight * l[None, :], bias                    # W diag(l)
    return weight * l[:, None], (None if bias is None else bias * l)   # diag(l) W, l * b


class IA3Linear(LinearWrapper):
    """A frozen linear (``nn.Linear`` or ``quantization.QuantizedLinear``) with an (IA)3 scale.

    The wrapper protocol of ``PeftModel``: the wrapped layer is ``base_layer``, the
    slot ``ia3`` holds the active ``IA3Vector`` or ``None``, ``disabled`` gives the
    base layer's output, ``merged`` says the scale sits in the weight.
    """

    adapter_attr = "ia3"
    peft_type = "IA3"

    def __init__(self, base_layer: Module):
        super().__init__()
        self.base_layer = base_layer.freeze()
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.ia3 = None
        self.disabled = False
        self.merged = False

    def forward(self, x):
        self._mode = ("off" if not self.active()
                      else "input" if self.ia3.is_feedforward else "output")
        if self._mode == "input":
            return self.base_layer(self.ia3(x))             # (..., out) = (l * x) W^T + b
        y = self.base_layer(x)                              # (..., out)
        return self.ia3(y) if self._mode == "output" else y

    def backward(self, dout):
        if self._mode == "input":
            return self.ia3.backward(self.base_layer.backward(dout))
        if self._mode == "output":
            dout = self.ia3.backward(dout)                  # dL/d(base output) = l * dout
        return self.base_layer.backward(dout)

    # ---- merging ---------------------------------------------------------
    def merged_weights(self):
        """Pure: ``(W', b')`` with the scale folded in (see the module docstring)."""
        return ia3_merged(self.weight, self.bias, self.ia3.ia3_l, self.ia3.is_feedforward)

    def adapter_dtype(self):
        return self.ia3.ia3_l.dtype

    def merge_in_place(self):
        """``W <- W'``, ``b <- b'``; refuses a zero scale (unmerging would divide by 0)."""
        self.check_merge(True)
        l = self.ia3.ia3_l
        if np.any(l == 0):
            raise ValueError(f"ia3_l has {int(np.sum(l == 0))} zero entries: merging in place "
                             f"could not be undone; use merge_and_unload()")
        self.set_base_weights(*self.merged_weights())
        self.merged = True

    def unmerge_in_place(self):
        """Divide the scale back out: ``W = W' / l`` (exact up to rounding)."""
        self.check_merge(False)
        self.set_base_weights(*ia3_merged(self.weight, self.bias, 1.0 / self.ia3.ia3_l,
                                          self.ia3.is_feedforward))
        self.merged = False


def feedforward_paths(model, config: IA3Config, targets):
    """Targeted paths whose input is scaled; every feed-forward module must be a target."""
    ff = config.feedforward_modules or []
    if not ff:
        return set()
    layers = config.layers_to_transform
    layers = [layers] if isinstance(layers, int) else layers
    layer_types = linear_types() + (IA3Linear,)
    candidates = [n for n, m in model.named_modules()
                  if isinstance(m, layer_types) and not n.endswith(".base_layer") and matches(n, ff)
                  and (layers is None or layer_index(n) in layers)]
    stray = [n for n in candidates if n not in targets]
    if stray:
        raise ValueError(f"IA3Config.feedforward_modules={ff!r} matches {stray[:3]}, which "
                         f"target_modules={config.target_modules!r} does not target")
    return {n for n in candidates if n in targets}


@register(IA3Config)
class IA3Method(Method):
    """Wrap each targeted linear in ``IA3Linear``; the slot is an ``IA3Vector`` of ones."""

    def inject(self, peft_model, config: IA3Config, rng):
        model = peft_model.base_model
        targets = find_linear_targets(model, config.target_modules, config.layers_to_transform,
                                      IA3Linear)
        ff = feedforward_paths(model, config, targets)
        state = AdapterState(config)
        for path in targets:
            wrapper = wrap_or_reuse(model, path, IA3Linear, IA3Linear)
            size = wrapper.in_features if path in ff else wrapper.out_features
            state.slots[path] = IA3Vector(size, path in ff, dtype=wrapper.weight.dtype)
        return state


def ia3_param_count(d_model, n_layers, d_ff=None):
    """Closed form for the default targets: ``layers * (d + d + d_ff)`` (k, v outputs; fc2 input)."""
    return n_layers * (2 * d_model + (4 * d_model if d_ff is None else d_ff))
