"""The module protocol: what every module of Stage 9, PEFT wrappers included, is.

The protocol (one mechanism for every module, PEFT wrappers included):

* ``forward(x)`` computes the output and keeps on the module what ``backward``
  needs. ``backward(dout)`` returns ``dx`` and *adds* (``+=``) into the gradient
  of every trainable parameter. Neither ever modifies ``dout`` or a cache in place.
* Parameters are plain ``np.ndarray`` attributes listed in ``param_names``.
  The gradient of parameter ``X`` lives in the attribute ``X_grad``.
* Every parameter has a trainable flag. A frozen parameter gets no gradient
  and its gradient matmul is skipped -- that skipped matmul is exactly the compute
  PEFT saves -- but its module still returns ``dx`` so earlier layers learn.
* A model is a tree of modules; parameters are addressed by dotted names such as
  ``layers.0.self_attn.q_proj.weight``. Saving, counting, freezing and the
  optimizers all walk these names.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


class Module:
    """Base class: parameter bookkeeping, freezing, train/eval and traversal."""

    param_names: tuple[str, ...] = ()
    lists_frozen_parameters = True          # does parameters() list frozen arrays by default?

    def __init__(self):
        self.training = True
        self.frozen: set[str] = set()

    # ---- traversal -------------------------------------------------------
    def children(self) -> Iterator[tuple[str, "Module"]]:
        """Direct sub-modules, in the order they were assigned."""
        for name, value in vars(self).items():
            if isinstance(value, Module) and not name.startswith("_"):
                yield name, value

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self.children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def own_parameters(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.param_names:
            value = getattr(self, name, None)
            if value is not None:
                yield name, value

    def named_parameters(self, prefix: str = "", trainable_only: bool = False):
        """Yield ``(dotted_name, array)`` for every parameter below this module."""
        for path, module in self.named_modules(prefix):
            for name, value in module.own_parameters():
                if trainable_only and name in module.frozen:
                    continue
                yield (f"{path}.{name}" if path else name), value

    def parameters(self, trainable_only: bool | None = None) -> list[np.ndarray]:
        """The parameter arrays below this module, in ``named_parameters`` order.

        ``trainable_only=None`` takes the class's default: every parameter, except
        for wrappers whose ``lists_frozen_parameters`` is False (the course's
        ``LoRALinear`` lists ``[A, B]``, not the frozen weight it wraps).
        """
        if trainable_only is None:
            trainable_only = not self.lists_frozen_parameters
        return [Parameter.of(value, name not in module.frozen)
                for _, module in self.named_modules() for name, value in module.own_parameters()
                if not (trainable_only and name in module.frozen)]

    def gradients(self, trainable_only: bool | None = None) -> list:
        """``X_grad`` for each array of ``parameters(trainable_only)`` (``None`` if none yet)."""
        if trainable_only is None:
            trainable_only = not self.lists_frozen_parameters
        return [self.get_grad(n) for n, _ in self.named_parameters(trainable_only=trainable_only)]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """How many numbers the parameters hold (the trainable ones with ``trainable_only``)."""
        return sum(p.size for _, p in self.named_parameters(trainable_only=trainable_only))

    def get_submodule(self, path: str) -> "Module":
        module = self
        for part in path.split(".") if path else []:
            child = getattr(module, part, None)
            if not isinstance(child, Module):
                known = [n for n, _ in self.named_modules() if n]
                raise AttributeError(f"no submodule {path!r} (stuck at {part!r}); "
                                     f"modules are: {', '.join(known)}")
            module = child
        return module

    def get_parameter(self, name: str) -> np.ndarray:
        module, attr = parameter_owner(self, name)
        if attr not in module.param_names:
            raise AttributeError(f"{name.rpartition('.')[0] or 'model'} has no parameter {attr!r}; "
                                 f"it has {list(module.param_names)}")
        return getattr(module, attr)

    def get_grad(self, name: str):
        module, attr = parameter_owner(self, name)
        return getattr(module, attr + "_grad", None)

    # ---- trainable flags -------------------------------------------------
    def is_trainable(self, name: str) -> bool:
        return name not in self.frozen

    def requires_grad_(self, flag: bool = True, names=None) -> "Module":
        """Set the trainable flag of this module's own parameters (all or ``names``)."""
        for name in names if names is not None else self.param_names:
            if name not in self.param_names:
                raise ValueError(f"{type(self).__name__} has no parameter {name!r}")
            if flag:
                self.frozen.discard(name)
            else:
                self.frozen.add(name)
                setattr(self, name + "_grad", None)
        return self

    def freeze(self) -> "Module":
        """Freeze every parameter below this module (no gradients, still returns dx)."""
        for _, module in self.named_modules():
            module.requires_grad_(False)
        return self

    def unfreeze(self) -> "Module":
        for _, module in self.named_modules():
            module.requires_grad_(True)
        return self

    def zero_grad(self) -> None:
        """Gradients of trainable parameters become zeros; frozen ones stay ``None``."""
        for _, module in self.named_modules():
            for name, value in module.own_parameters():
                trainable = name not in module.frozen
                setattr(module, name + "_grad", np.zeros_like(value) if trainable else None)

    def clear_grads(self) -> None:
        """Forget this module's own gradients (``X_grad = None``), so that the next
        backward *sets* them: the course's standalone layers do this, the model never."""
        for name in self.param_names:
            setattr(self, name + "_grad", None)

    def _accumulate(self, name: str, grad: np.ndarray) -> None:
        """``X_grad += grad`` (allocating on first use)."""
        current = getattr(self, name + "_grad", None)
        if current is None or current.shape != grad.shape:
            setattr(self, name + "_grad", grad.astype(getattr(self, name).dtype, copy=True))
        else:
            current += grad

    def check_backward(self, dout, cache: str, shape_of=None) -> None:
        """Refuse a ``backward`` with no ``forward`` before it (the attribute ``cache`` is
        missing) or whose ``dout`` does not have the shape of the forward's output."""
        saved = getattr(self, cache, None)
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward "
                               f"(nothing cached to differentiate)")
        expected = tuple(shape_of(saved)) if shape_of else saved.shape
        if np.shape(dout) != expected:
            raise ValueError(f"{type(self).__name__}.backward: dout has shape {np.shape(dout)}, "
                             f"but the forward's output had shape {expected}")

    def wants_grad(self, name: str) -> bool:
        return name not in self.frozen and getattr(self, name, None) is not None

    # ---- modes -----------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def astype(self, dtype) -> "Module":
        """Cast every parameter (e.g. to float64 for gradient checks)."""
        for _, module in self.named_modules():
            for name, value in module.own_parameters():
                setattr(module, name, value.astype(dtype))
                setattr(module, name + "_grad", None)
        return self

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class Parameter(np.ndarray):
    """What ``Module.parameters()`` returns: a *view* of a parameter array (same memory,
    so ``p -= lr * g`` updates the model) that also answers PyTorch's two questions,
    ``p.numel()`` and ``p.requires_grad``, so Hugging Face-style counting code runs::

        sum(p.numel() for p in model.parameters() if p.requires_grad)

    ``requires_grad`` is read when the view is made; freeze with ``requires_grad_``.
    """

    @classmethod
    def of(cls, array, requires_grad):
        view = array.view(cls)
        view.requires_grad = bool(requires_grad)
        return view

    def __array_finalize__(self, obj):
        self.requires_grad = False          # results computed from a parameter are not one

    def numel(self) -> int:
        return self.size


class ModuleList(Module):
    """A list of modules whose children are named ``0``, ``1``, ..."""

    def __init__(self, modules):
        super().__init__()
        self._items = list(modules)

    def children(self):
        for i, m in enumerate(self._items):
            yield str(i), m

    def __getattr__(self, name):
        if name.isdigit() and "_items" in self.__dict__ and int(name) < len(self._items):
            return self._items[int(name)]
        raise AttributeError(name)

    def __setitem__(self, i, module):
        self._items[i] = module

    def __getitem__(self, i):
        return self._items[i]

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(self._items)


def parameter_owner(model, name: str) -> tuple[Module, str]:
    """``(module, attr)`` holding the parameter ``name``: ``"layers.0.mlp.fc1.weight"`` ->
    the ``fc1`` module and ``"weight"``; its gradient is ``attr + "_grad"`` there.

    Needs only ``model.get_submodule``, so it works on any object that speaks the
    protocol (a ``PeftModel``, a wrapper), not just on a ``Module``.
    """
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def set_submodule(root: Module, path: str, module: Module) -> None:
    """Replace the module at dotted ``path`` (used by PEFT wrappers)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path)
    if isinstance(parent, ModuleList):
        parent[int(name)] = module
    else:
        setattr(parent, name, module)
