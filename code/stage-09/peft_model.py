"""``get_peft_model`` and ``PeftModel``: the Hugging Face-style API over the mini GPT.

    model = GPT(config)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peft_model.print_trainable_parameters()
    logits = peft_model(tokens); peft_model.backward(dlogits)   # only LoRA params get grads

Each method plugs in through one ``Method`` object (``peft_base.py``, registered per
config type when this module imports the methods) that says where it touches the
model (docs/ARCHITECTURE.md's table):

* layer methods (LoRA, DoRA, (IA)3, bottleneck adapters) wrap modules of the base
  model; the wrapper keeps the base module as ``base_layer`` and exposes one
  *slot* attribute (``lora``, ``ia3``, ``adapter``) holding the active adapter's
  module, or ``None``. Several named adapters can live on one model; switching
  swaps what sits in the slots.
* model methods (prefix tuning, prompt tuning) own an encoder module that
  ``PeftModel.forward`` calls at the embedding seam or inside attention.
* parameter methods (BitFit, LoRA's ``bias`` modes, full fine-tuning) only
  change which base parameters are trainable.

Merging, unloading, ``disable_adapter`` and ``add_weighted_adapter`` come from
``peft_merge.MergeMixin``; saving and loading are ``peft_io``'s.
"""
from __future__ import annotations

import contextlib

import numpy as np

import bottleneck  # noqa: F401  (registers BottleneckMethod)
import ia3  # noqa: F401  (registers IA3Method)
import peft_io
import peft_methods  # noqa: F401  (registers LoRA, prefix, prompt, BitFit, full)
from generate import generate, window_limit
from nn import Module, parameter_owner, set_submodule
from validate import adapter_name as check_adapter_name
from optim import AdamW
from peft_base import AdapterState, method_for  # noqa: F401  (AdapterState re-exported)
from peft_config import (BitFitConfig, BottleneckConfig, FullFineTuningConfig, IA3Config,  # noqa: F401
                         LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig, TaskType)
from peft_merge import MergeMixin


class PeftModel(MergeMixin, Module):
    """The base model with PEFT adapters; behaves like the base model.

    Parameter names are the base model's (``layers.0.self_attn.q_proj.lora.A``,
    ``prompt_encoder.prompt``), so ``named_parameters``, ``get_submodule``, the
    optimizers and the checkpoints all work unchanged.
    """

    def __init__(self, model, peft_config: PeftConfig, adapter_name="default", seed=0):
        super().__init__()
        self.base_model = model
        self.adapters: dict[str, AdapterState] = {}
        self.active_adapters: list[str] = []
        self._disabled = False
        self.seed = seed
        with all_or_nothing(model):         # a bad config leaves the model as it was
            model.freeze()
            self.add_adapter(adapter_name, peft_config)
            self.set_adapter(adapter_name)

    # ---- the module tree: the base model's, plus active encoders -----------
    def children(self):
        yield from self.base_model.children()
        for name in self.active_adapters:
            enc = self.adapters[name].encoder
            if enc is not None:
                yield method_for(self.adapters[name].config.peft_type).encoder_attr, enc

    def __getattr__(self, name):
        if name in ("base_model", "adapters", "active_adapters") or name.startswith("__"):
            raise AttributeError(name)
        for adapter in self.active_adapters:
            state = self.adapters[adapter]
            method = method_for(state.config.peft_type)
            if state.encoder is not None and method.encoder_attr == name:
                return state.encoder
        return getattr(self.base_model, name)

    @property
    def config(self):
        return self.base_model.config

    @property
    def peft_config(self) -> dict:
        return {name: s.config for name, s in self.adapters.items()}

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    def _encoder(self, attr):
        if self._disabled:
            return None
        for name in self.active_adapters:
            state = self.adapters[name]
            if state.encoder is not None and method_for(state.config.peft_type).encoder_attr == attr:
                return state.encoder
        return None

    # ---- forward / backward ------------------------------------------------
    def forward(self, tokens, attention_mask=None):
        base = self.base_model
        tokens = base.check_tokens(tokens)
        attention_mask = base.check_mask(attention_mask, tokens.shape)
        self._check_fits(tokens.shape[1])
        prompt, prefix = self._encoder("prompt_encoder"), self._encoder("prefix_encoder")
        self._prompt_len = 0
        if prompt is None:                  # a shifted prefix moves the tokens to P..P+T-1
            first, T = self._first_position(), tokens.shape[1]
            x = base.embed(tokens, np.arange(first, first + T) if first else None)
        else:
            x, attention_mask = prompt.embed_with_prompt(base, tokens, attention_mask)
            self._prompt_len = prompt.prompt_length
        prefixes = prefix.layer_prefixes() if prefix is not None else None
        logits = base.forward_embeds(x, attention_mask, prefixes)
        return logits[:, self._prompt_len:] if self._prompt_len else logits

    def _check_fits(self, T):
        """``T`` real tokens and the virtual tokens' positions must fit the context
        (``position_budget``); checked before anything runs."""
        limit, budget = self.base_model.config.context_length, self.position_budget()
        if T > budget:                      # (T <= limit: check_tokens saw to that)
            taken = limit - budget
            what, why = (("virtual tokens", "") if self._virtual_tokens()
                         else ("prefix positions", " (position_convention='shift')"))
            raise ValueError(f"{taken} {what} + sequence length {T} = {taken + T} exceeds "
                             f"context_length {limit}{why}")

    def backward(self, dlogits):
        if any(getattr(w, "merged", False) for _, w in self.wrappers()):
            raise ValueError("cannot train while an adapter is merged into the weights; "
                             "call unmerge_adapter() first")
        base, P = self.base_model, self._prompt_len
        if P:
            B, T, V = dlogits.shape
            dlogits = np.concatenate([np.zeros((B, P, V), dlogits.dtype), dlogits], axis=1)
        dx = base.backward_embeds(dlogits)
        prefix = self._encoder("prefix_encoder")
        if prefix is not None:
            prefix.backward_from_layers(base.layers)
        prompt = self._encoder("prompt_encoder")
        if P and prompt is not None:
            dx = prompt.backward_with_prompt(base, dx)
        base.backward_embed(dx)
        return dx

    def generate(self, tokens, max_new_tokens, eos_id=None, **sampling):
        """Greedy (or sampled) continuation through the adapters, with a key/value
        cache; the window fits the method's virtual tokens (``generate.generate``)."""
        return generate(self, tokens, max_new_tokens, eos_id=eos_id, **sampling)

    def _virtual_tokens(self):
        """How many soft-prompt vectors ``forward`` puts in front of the tokens."""
        prompt = self._encoder("prompt_encoder")
        return prompt.prompt_length if prompt is not None else 0

    def _first_position(self):
        """The first real token's position in ``forward``: a soft prompt's or (without
        one) a prefix's length under ``position_convention="shift"``, else 0. The one
        place that says it, for ``forward``'s positions and ``position_budget``."""
        prompt, prefix = self._encoder("prompt_encoder"), self._encoder("prefix_encoder")
        if prompt is not None:
            return prompt.prompt_length if prompt.position_convention == "shift" else 0
        if prefix is not None and prefix.position_convention == "shift":
            return prefix.prefix_length
        return 0

    def position_budget(self) -> int:
        """How many real tokens fit: the context less the positions the active adapters
        take, by ``generate.window_limit`` -- the rule ``generate``'s window uses too."""
        return window_limit(self.base_model.config.context_length, self._virtual_tokens(),
                            self._first_position())

    # ---- adapters: add, switch, delete --------------------------------------
    def wrappers(self):
        """``(path, wrapper)`` for every PEFT wrapper module in the base model."""
        return [(p, m) for p, m in self.base_model.named_modules() if hasattr(m, "adapter_attr")]

    def add_adapter(self, adapter_name, peft_config: PeftConfig):
        check_adapter_name(adapter_name)
        if not isinstance(peft_config, PeftConfig):
            raise ValueError(f"expected a PEFT config (LoraConfig, ...), got {type(peft_config).__name__}")
        if adapter_name in self.adapters:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; "
                             f"adapters: {sorted(self.adapters)}")
        for other, state in self.adapters.items():
            same_place = state.config.touch_point == peft_config.touch_point
            if same_place and state.config.peft_type != peft_config.peft_type:
                raise ValueError(
                    f"cannot mix {peft_config.peft_type} with {state.config.peft_type} "
                    f"(adapter {other!r}) on one model: both wrap the same kind of module")
        rng = np.random.default_rng([self.seed, len(self.adapters)])
        active = list(self.active_adapters)
        with all_or_nothing(self.base_model):
            self._deactivate()
            try:
                self.adapters[adapter_name] = method_for(peft_config.peft_type).inject(
                    self, peft_config, rng)
            finally:
                self._activate(active)

    def set_adapter(self, adapter_name):
        """Make ``adapter_name`` (or a list of names with different touch points) active."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.adapters:
                raise ValueError(f"unknown adapter {n!r}; known adapters: {sorted(self.adapters)}")
        places = [self.adapters[n].config.touch_point for n in names]
        if len(set(places)) != len(places):
            raise ValueError(f"adapters {names} touch the same part of the model and cannot be "
                             f"active together; combine LoRA adapters with add_weighted_adapter")
        if any(getattr(w, "merged", False) for _, w in self.wrappers()):
            raise ValueError("unmerge_adapter() before switching adapters")
        self._deactivate()
        self._activate(names)

    def _deactivate(self):
        for _, wrapper in self.wrappers():
            setattr(wrapper, wrapper.adapter_attr, None)
        self.base_model.freeze()
        self.active_adapters = []

    def _activate(self, names):
        for n in names:
            state = self.adapters[n]
            for path, module in state.slots.items():
                wrapper = self.base_model.get_submodule(path)
                setattr(wrapper, wrapper.adapter_attr, module.train(self.training))
            if state.encoder is not None:
                state.encoder.train(self.training)
            for pname in state.trainable:
                module, attr = parameter_owner(self.base_model, pname)
                module.requires_grad_(True, [attr])
        self.active_adapters = list(names)

    def delete_adapter(self, adapter_name):
        if adapter_name not in self.adapters:
            raise ValueError(f"unknown adapter {adapter_name!r}; known adapters: {sorted(self.adapters)}")
        if len(self.adapters) == 1:
            raise ValueError(f"{adapter_name!r} is the only adapter; use unload() to remove it")
        if self._merged_wrappers():
            raise ValueError(f"cannot delete adapter {adapter_name!r} while an adapter is merged "
                             f"into the base weights (its update would stay baked in); call "
                             f"unmerge_adapter() first")
        active = [n for n in self.active_adapters if n != adapter_name]
        self._deactivate()
        del self.adapters[adapter_name]
        self._unwrap_unused()
        self._activate(active or [next(iter(self.adapters))])

    def _unwrap_unused(self):
        used = {p for s in self.adapters.values() for p in s.slots}
        for path, wrapper in self.wrappers():
            if path not in used:
                set_submodule(self.base_model, path, wrapper.base_layer)

    # ---- counting ----------------------------------------------------------
    def get_nb_trainable_parameters(self):
        trainable = total = 0
        for _, module in self.named_modules():
            quant = getattr(module, "quant_state", None)    # a 4-bit weight is still parameters
            total += quant.numel if quant is not None else 0
            for name, value in module.own_parameters():
                total += value.size
                trainable += 0 if name in module.frozen else value.size
        return trainable, total

    def print_trainable_parameters(self):
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def num_parameters(self, only_trainable=False):
        """Hugging Face's ``model.num_parameters(only_trainable=True)``: trainable or all
        (a 4-bit weight counts as the numbers it stores)."""
        trainable, total = self.get_nb_trainable_parameters()
        return trainable if only_trainable else total

    def get_base_model(self):
        """The wrapped model itself (its targeted layers are wrapped; see ``unload``)."""
        return self.base_model

    # ---- saving and loading (see peft_io.py) -------------------------------
    def adapter_state_dict(self, adapter_name=None):
        return peft_io.adapter_state_dict(self, adapter_name)

    def save_pretrained(self, directory, adapter_name=None):
        peft_io.save_pretrained(self, directory, adapter_name)

    def load_adapter(self, directory, adapter_name, is_trainable=False):
        peft_io.load_adapter(self, directory, adapter_name, is_trainable)

    @classmethod
    def from_pretrained(cls, model, directory, adapter_name="default", is_trainable=False):
        return peft_io.from_pretrained(cls, model, directory, adapter_name, is_trainable)


def create_loraplus_optimizer(model, lr, loraplus_lr_ratio=16.0, weight_decay=0.0,
                              optimizer_cls=None, **kwargs):
    """LoRA+ (Hayou et al. 2024): ``B`` learns ``loraplus_lr_ratio`` times faster than ``A``.

    With ``B`` starting at zero and ``A`` random, equal learning rates make ``B``
    the slow factor for wide layers; a larger rate for ``B`` speeds up training.
    Every other trainable parameter uses ``lr``.
    """
    if not loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0, got {loraplus_lr_ratio!r}")
    names = [n for n, _ in model.named_parameters(trainable_only=True)]
    b_names = [n for n in names if n.endswith("lora.B")]
    others = [n for n in names if n not in set(b_names)]
    groups = [{"names": others, "lr": lr, "weight_decay": weight_decay},
              {"names": b_names, "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay}]
    groups = [g for g in groups if g["names"]]
    return (optimizer_cls or AdamW)(model, lr=lr, weight_decay=weight_decay, param_groups=groups,
                                    **kwargs)


def _tree(model):
    """``[(path, module, frozen names, merged/disabled flags)]``, parents first."""
    return [(p, m, set(m.frozen), {a: getattr(m, a) for a in ("merged", "disabled") if hasattr(m, a)})
            for p, m in model.named_modules()]


@contextlib.contextmanager
def all_or_nothing(model):
    """Run the block; if it raises, put ``model``'s module tree (wrapped modules back in
    their places), trainable flags and adapter flags back as they were."""
    before = _tree(model)
    try:
        yield
    except BaseException:
        for path, module, frozen, flags in before:
            if path and model.get_submodule(path) is not module:
                set_submodule(model, path, module)
            module.frozen = frozen
            for attr, value in flags.items():
                setattr(module, attr, value)
        raise


def get_peft_model(model, peft_config: PeftConfig, adapter_name="default", seed=0) -> PeftModel:
    """Freeze ``model`` and attach a PEFT adapter described by ``peft_config``.

    The model is modified in place (its targeted modules are wrapped); use
    ``unload()`` or ``merge_and_unload()`` to get a plain model back.
    """
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; use add_adapter() for another adapter")
    return PeftModel(model, peft_config, adapter_name, seed)


__all__ = ["get_peft_model", "PeftModel", "LoraConfig", "IA3Config", "BottleneckConfig",
           "PrefixTuningConfig", "PromptTuningConfig", "BitFitConfig", "FullFineTuningConfig",
           "TaskType", "create_loraplus_optimizer"]
