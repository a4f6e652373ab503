"""Bottleneck adapters, the course's way: a pure forward/backward pair and the layer.

    x ──┬──────────────────────────────────────────────┐
        └─ W_down (d x b) ─> f ─> W_up (b x d) ────────(+)──> y = x + f(x W_down + b_down) W_up + b_up

(Houlsby et al. 2019, §2.1.) ``adapter_forward`` / ``adapter_backward`` compute the
*branch* (everything but the residual), the part exercise 9.7 and the parallel
adapter (He et al. 2022) need; ``Adapter`` owns the weights and adds the residual.
The weights are ``(in, out)`` here, applied as ``x @ W_down``, as the course writes them.

Gradients. The standalone ``Adapter.forward`` / ``backward`` *set* ``W_down_grad``
and ``W_up_grad`` (the course's loop never zeroes them). Inside a model
(``bottleneck.BottleneckWrapper`` calls ``branch`` / ``branch_backward``) they
*accumulate*, as every module of the model does.
"""
from __future__ import annotations

import math

import numpy as np

from nn import ACTIVATIONS, Module
from validate import one_of, positive_int


# ----------------------------------------------------------- the maths, pure
def adapter_forward(x, W_down, b_down, W_up, b_up, act):
    """The branch ``f(x W_down + b_down) W_up + b_up`` (biases may be ``None``).

    x ``(..., d)``, W_down ``(d, b)``, W_up ``(b, d)``, ``act`` an activation module
    (``nn.ReLU()`` / ``nn.GELU()``; it keeps its own cache) -> out ``(..., d)``, cache.
    """
    d, b = W_down.shape
    x2 = x.reshape(-1, d)                                   # (N, d)
    z = x2 @ W_down                                         # (N, b) pre-activation
    if b_down is not None:
        z = z + b_down
    a = act(z)                                              # (N, b)
    out = a @ W_up                                          # (N, d)
    if b_up is not None:
        out = out + b_up
    return out.reshape(x.shape), (x2, a, W_down, W_up, act)


def adapter_backward(dout, cache, weight_grads=True):
    """Backward of ``adapter_forward``: dout ``(..., d)`` -> ``(dx, dW_down, db_down, dW_up, db_up)``.

    Forward was ``z = x W_down + b_down``, ``a = f(z)``, ``out = a W_up + b_up``::

        dW_up = a^T dout     db_up = sum_rows dout     da = dout W_up^T
        dz = f'(z) * da      dW_down = x^T dz          db_down = sum_rows dz
        dx = dz W_down^T     (the residual's dout is added by the caller)

    With ``weight_grads=False`` (a frozen adapter) only ``dx`` is computed; the four
    weight gradients are ``None``.
    """
    x2, a, W_down, W_up, act = cache
    d2 = dout.reshape(-1, W_up.shape[1])                    # (N, d)
    dz = act.backward(d2 @ W_up.T)                          # (N, b)
    dx = (dz @ W_down.T).reshape(dout.shape)                # (..., d)
    if not weight_grads:
        return dx, None, None, None, None
    dW_up = a.T @ d2                                        # (b, d)
    db_up = d2.sum(0)                                       # (d,)
    dW_down = x2.T @ dz                                     # (d, b)
    db_down = dz.sum(0)                                     # (b,)
    return dx, dW_down, db_down, dW_up, db_up


# ------------------------------------------------------------------ the layer
class Adapter(Module):
    """A bottleneck adapter: ``x + f(x W_down + b_down) W_up + b_up``.

    ``W_up`` starts at zero, so the adapter starts as the identity and the adapted
    model starts exactly at the pretrained one (Houlsby et al. use a near-zero
    init for the same reason). Biases only with ``bias=True``.
    """

    param_names = ("W_down", "b_down", "W_up", "b_up")

    def __init__(self, d_model, bottleneck_dim=64, activation="relu", bias=False, rng=None,
                 dtype=np.float32):
        super().__init__()
        positive_int(bottleneck_dim, "bottleneck_dim")
        one_of(activation, "activation", sorted(ACTIVATIONS))
        rng = rng if rng is not None else np.random.default_rng(0)
        self.d_model, self.bottleneck_dim, self.activation = d_model, bottleneck_dim, activation
        bound = 1.0 / math.sqrt(d_model)
        self.W_down = rng.uniform(-bound, bound, (d_model, bottleneck_dim)).astype(dtype)
        self.W_up = np.zeros((bottleneck_dim, d_model), dtype=dtype)
        self.b_down = np.zeros(bottleneck_dim, dtype=dtype) if bias else None
        self.b_up = np.zeros(d_model, dtype=dtype) if bias else None
        self.act = ACTIVATIONS[activation]()

    # ---- inside a model: the branch alone; gradients accumulate --------------
    def branch(self, x):
        """The adapter path without the residual: ``(..., d)`` -> ``(..., d)``."""
        out, self.cache = adapter_forward(x, self.W_down, self.b_down, self.W_up, self.b_up,
                                          self.act)
        return out

    def branch_backward(self, dout):
        """Backward of ``branch``: adds into the weights' gradients; returns dx ``(..., d)``."""
        names = ("W_down", "b_down", "W_up", "b_up")
        wanted = [n for n in names if self.wants_grad(n)]
        dx, *grads = adapter_backward(dout, self.cache, weight_grads=bool(wanted))
        for name, grad in zip(names, grads):
            if name in wanted:
                self._accumulate(name, grad)
        return dx

    # ---- the course's standalone form: gradients are set ----------------------
    def forward(self, x):
        return x + self.branch(x)

    def backward(self, grad_output):
        """dx = residual + adapter path; *sets* ``W_down_grad``, ``W_up_grad`` (and the biases')."""
        self.clear_grads()
        return grad_output + self.branch_backward(grad_output)
