"""Optimizers over a model's *trainable* parameters, addressed by dotted name.

Why names and not array references: parameters are plain ``np.ndarray``
attributes, and a PEFT wrapper (or a learner: ``lora.B = ...``) may replace an
array with a new one. The optimizer therefore looks every parameter up again at
each ``step`` -- ``module, attr = nn.parameter_owner(model, name)``, the array is
``getattr(module, attr)`` and its gradient ``attr + "_grad"`` -- and updates it
in place.

Only trainable parameters get optimizer state. That is the memory PEFT saves
besides gradients: AdamW keeps two extra arrays (``m``, ``v``) per trained
weight, so full fine-tuning needs about 3x the weights' memory on top of the
weights, while LoRA needs it only for ``A`` and ``B`` (see ``state_nbytes``).

Parameter groups (as in ``torch.optim``) give subsets their own ``lr`` and
``weight_decay``; LoRA+ (Hayou et al. 2024) uses them to train ``B`` with a
larger learning rate than ``A``.
"""
from __future__ import annotations

import math

import numpy as np

from nn import parameter_owner
from validate import check_number


class Optimizer:
    """Parameter-group bookkeeping shared by ``SGD`` and ``AdamW``."""

    def __init__(self, model, defaults: dict, param_groups=None):
        self.model, self.defaults = model, dict(defaults)
        trainable = [n for n, _ in model.named_parameters(trainable_only=True)]
        if param_groups is None:
            param_groups = [{"names": trainable}]
        self.param_groups = self._build_groups(param_groups, trainable)
        self.state: dict[str, dict[str, np.ndarray]] = {}
        for group in self.param_groups:
            for name in group["names"]:
                self.state[name] = self._init_state(getattr(*parameter_owner(model, name)))

    def _build_groups(self, param_groups, trainable):
        every, allowed = {n for n, _ in self.model.named_parameters()}, set(trainable)
        seen, groups = {}, []
        if isinstance(param_groups, dict) or not isinstance(param_groups, (list, tuple)):
            raise ValueError(f"param_groups must be a list of dicts, got {type(param_groups).__name__}")
        for i, group in enumerate(param_groups):
            if not isinstance(group, dict) or isinstance(group.get("names"), str):
                raise ValueError(f"param group {i} must be a dict with a list of parameter "
                                 f"'names', got {group!r:.80}")
            unknown_keys = set(group) - {"names", *self.defaults}
            if "names" not in group or unknown_keys:
                raise ValueError(f"param group {i} needs 'names' and may set {sorted(self.defaults)}; "
                                 f"got keys {sorted(group)}")
            for name in group["names"]:
                self._check_name(name, i, every, allowed, seen)
                seen[name] = i
            merged = {**self.defaults, **group, "names": list(group["names"])}
            where = f" (param group {i})"
            check_number("lr", merged["lr"], 0.0, inclusive=False,
                         where=where if "lr" in group else "")
            check_number("weight_decay", merged["weight_decay"], 0.0,
                         where=where if "weight_decay" in group else "")
            if "momentum" in group:
                check_number("momentum", merged["momentum"], 0.0, 1.0, high_inclusive=False, where=where)
            if "eps" in group:
                check_number("eps", merged["eps"], 0.0, inclusive=False, where=where)
            if "betas" in group:
                betas = merged["betas"]
                if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                    raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}{where}")
                for b in betas:
                    check_number("betas", b, 0.0, 1.0, high_inclusive=False, where=where)
            merged["initial_lr"] = merged["lr"]
            groups.append(merged)
        missing = [n for n in trainable if n not in seen]
        if missing:
            raise ValueError(f"trainable parameters in no param group: {', '.join(missing)}")
        return groups

    @staticmethod
    def _check_name(name, i, every, trainable, seen):
        if name not in every:
            raise ValueError(f"param group {i}: {name!r} is not a parameter of the model")
        if name not in trainable:
            raise ValueError(f"param group {i}: {name!r} is frozen; only trainable "
                             f"parameters can be optimized")
        if name in seen:
            raise ValueError(f"{name!r} is in param groups {seen[name]} and {i}; "
                             f"each parameter belongs to exactly one group")

    # ---- public API ------------------------------------------------------
    def zero_grad(self) -> None:
        self.model.zero_grad()

    def step(self) -> None:
        """Update every parameter that has a gradient, in place."""
        for group in self.param_groups:
            for name in group["names"]:
                module, attr = parameter_owner(self.model, name)
                param, grad = getattr(module, attr), getattr(module, attr + "_grad", None)
                if grad is None:
                    continue
                if grad.shape != param.shape:
                    raise ValueError(f"{name}: gradient shape {grad.shape} != parameter shape {param.shape}")
                self._update(name, param, grad, group)

    def state_nbytes(self) -> int:
        """Bytes held by optimizer state (not counting parameters or gradients)."""
        return sum(a.nbytes for s in self.state.values() for a in s.values()
                   if isinstance(a, np.ndarray))

    def set_lr_scale(self, scale: float) -> None:
        """Set every group's ``lr`` to ``scale * initial_lr`` (for schedules)."""
        check_number("scale", scale, 0.0)
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * scale

    def _init_state(self, param):
        raise NotImplementedError

    def _update(self, name, param, grad, group):
        raise NotImplementedError


class SGD(Optimizer):
    """SGD with optional momentum and coupled (L2) weight decay, as ``torch.optim.SGD``:

    ``g = grad + wd * p``; ``buf = momentum * buf + g``; ``p -= lr * buf``.
    """

    def __init__(self, model, lr=1e-2, momentum=0.0, weight_decay=0.0, param_groups=None):
        check_number("momentum", momentum, 0.0, 1.0, high_inclusive=False)
        super().__init__(model, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay},
                         param_groups)

    def _init_state(self, param):
        return {"momentum": np.zeros_like(param)} if self.defaults["momentum"] else {}

    def _update(self, name, param, grad, group):
        g = grad + group["weight_decay"] * param if group["weight_decay"] else grad
        if group["momentum"]:
            buf = self.state[name].setdefault("momentum", np.zeros_like(param))
            buf *= group["momentum"]
            buf += g
            g = buf
        param -= group["lr"] * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, Alg. 2), as ``torch.optim.AdamW``.

    Per parameter, with step count ``t`` (counted per parameter, so a parameter
    that had no gradient for a while is not over-corrected)::

        p  -= lr * wd * p                       # decay, decoupled from the gradient
        m   = b1 * m + (1 - b1) * g
        v   = b2 * v + (1 - b2) * g^2
        p  -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    The bias corrections undo the zero initialisation of ``m`` and ``v`` (Kingma &
    Ba 2015, Sec. 3), which would otherwise shrink the first steps.
    """

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 param_groups=None):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        b1, b2 = (check_number(f"betas[{i}]", b, 0.0, 1.0, high_inclusive=False,
                               where=f" (betas={tuple(betas)})") for i, b in enumerate(betas))
        check_number("eps", eps, 0.0, inclusive=False)
        super().__init__(model, {"lr": lr, "betas": (b1, b2), "eps": eps,
                                 "weight_decay": weight_decay}, param_groups)
        self.steps = {name: 0 for name in self.state}

    def _init_state(self, param):
        return {"m": np.zeros_like(param), "v": np.zeros_like(param)}

    def _update(self, name, param, grad, group):
        (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
        s = self.state[name]
        self.steps[name] += 1
        t = self.steps[name]
        if group["weight_decay"]:
            param *= 1.0 - lr * group["weight_decay"]
        m, v = s["m"], s["v"]
        tmp = np.empty_like(m)                  # one scratch array: every pass is in place
        m *= b1
        m += np.multiply(grad, 1.0 - b1, out=tmp)           # m = b1 m + (1 - b1) g
        v *= b2
        np.multiply(grad, grad, out=tmp)
        tmp *= 1.0 - b2
        v += tmp                                            # v = b2 v + (1 - b2) g^2
        denom = np.sqrt(v, out=tmp)
        denom *= 1.0 / math.sqrt(1.0 - b2**t)
        denom += eps                                        # sqrt(v / (1 - b2^t)) + eps
        update = np.divide(m, denom, out=tmp)
        update *= lr / (1.0 - b1**t)                        # lr * m_hat / denom
        param -= update                                     # (m, v and tmp share param's dtype)


def trainable_grads(model):
    """``[(name, gradient)]`` of the trainable parameters that have one."""
    out = []
    for name, _ in model.named_parameters(trainable_only=True):
        module, attr = parameter_owner(model, name)
        g = getattr(module, attr + "_grad", None)
        if g is not None:
            out.append((name, g))
    return out


def grad_norm(model) -> float:
    """Global L2 norm of the trainable gradients (``inf``/``nan`` if any is non-finite)."""
    return math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for _, g in trainable_grads(model)))


def clip_grad_norm(model, max_norm: float) -> float:
    """Scale all trainable gradients so their global L2 norm is at most ``max_norm``.

    Returns the norm *before* clipping (worth logging: spikes show instability).
    As ``torch.nn.utils.clip_grad_norm_``, the scale is ``max_norm / (norm + 1e-6)``.
    A non-finite norm is returned without scaling anything (the caller decides).
    """
    check_number("max_norm", max_norm, 0.0, inclusive=False)
    total = grad_norm(model)
    if math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for _, g in trainable_grads(model):
            g *= scale
    return total


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, min_scale: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_scale``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_scale + (1.0 - min_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))
