"""PEFT configurations, named and shaped like Hugging Face ``peft``'s.

A config is a dataclass that says *what* to train; ``peft_model.get_peft_model``
does the wrapping. Every config validates itself on construction and raises
``ValueError`` naming the field and the bad value. ``to_dict``/``from_dict`` give
the ``adapter_config.json`` written next to saved adapter weights.

Configs marked "not in Hugging Face peft" (bottleneck adapters, BitFit, full
fine-tuning) exist so the comparison runner can treat every method alike.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
from dataclasses import dataclass, field
from typing import ClassVar

from validate import annotated_type, one_of, positive_int, positive_number, probability

DEFAULT_LORA_TARGETS = ["q_proj", "v_proj"]          # Hugging Face's default for OPT
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
CONFIG_TYPES: dict[str, type] = {}


class TaskType(str, enum.Enum):
    """Hugging Face ``peft``'s task types. The mini GPT is a causal language model, so
    ``CAUSAL_LM`` is the one a config accepts; the others need heads it does not have."""
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def _positive_int(cls_name, name, value):
    positive_int(value, name, f"{cls_name}.{name}")


def _choice(cls_name, name, value, allowed):
    one_of(value, name, allowed, f"{cls_name}.{name}")


def _task_type(cls_name, value):
    """``None`` or ``"CAUSAL_LM"`` (``TaskType.CAUSAL_LM`` is the same string)."""
    if value is None:
        return None
    if value != TaskType.CAUSAL_LM.value:
        known = [t.value for t in TaskType]
        detail = ("the mini GPT is a causal language model (a decoder with a tied LM head); "
                  "it has no classification, sequence-to-sequence or extraction head"
                  if value in known else f"known task types: {known}")
        raise ValueError(f"{cls_name}.task_type must be 'CAUSAL_LM' (or None), "
                         f"got task_type={value!r}: {detail}")
    return TaskType.CAUSAL_LM.value


@dataclass
class PeftConfig:
    peft_type: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    # which part of the model the method touches; two methods may share a model
    # only if their touch points differ (e.g. LoRA + prompt tuning)
    touch_point: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.peft_type:
            CONFIG_TYPES[cls.peft_type] = cls

    # None or "CAUSAL_LM" (TaskType.CAUSAL_LM); keyword-only, so it never takes a
    # subclass's positional argument
    task_type: str | None = field(default=None, kw_only=True)

    def __post_init__(self):
        for f in dataclasses.fields(self):          # types first: "false" is not False
            annotated_type(getattr(self, f.name), f.type, f.name, f"{type(self).__name__}.{f.name}")
        self.task_type = _task_type(type(self).__name__, self.task_type)
        self.validate()

    def validate(self):
        pass

    def to_dict(self) -> dict:
        d = {"peft_type": self.peft_type}
        d.update(dataclasses.asdict(self))
        return d

    @staticmethod
    def from_dict(d: dict, source="config") -> "PeftConfig":
        d = dict(d)
        peft_type = d.pop("peft_type", None)
        if not isinstance(peft_type, str) or peft_type not in CONFIG_TYPES:
            raise ValueError(f"{source}: unknown peft_type {peft_type!r}; known: {sorted(CONFIG_TYPES)}")
        cls = CONFIG_TYPES[peft_type]
        check_keys(d, cls, source)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


#: Every field of peft 0.21's LoRA, (IA)3, prefix and prompt configs: a file written by
#: peft may hold any of them (we ignore those we have no use for); any *other* key is
#: a mistake, most often a misspelling, and is refused.
PEFT_FIELDS = frozenset("""
    alora_invocation_tokens alpha_pattern arrow_config auto_mapping base_model_name_or_path
    bias corda_config encoder_hidden_size ensure_weight_tying eva_config exclude_modules
    fan_in_fan_out feedforward_modules inference_mode init_ia3_weights init_lora_weights
    init_weights kasa_config layer_replication layers_pattern layers_to_transform loftq_config
    lora_alpha lora_bias lora_dropout lora_ga_config megatron_config megatron_core
    modules_to_save monteclora_config num_attention_heads num_layers num_transformer_submodules
    num_virtual_tokens peft_type peft_version prefix_projection prompt_tuning_init
    prompt_tuning_init_text qalora_group_size r rank_pattern revision runtime_config
    target_modules target_parameters task_type token_dim tokenizer_kwargs tokenizer_name_or_path
    trainable_token_indices use_bdlora use_dora use_qalora use_rslora velora_config
""".split())


def check_keys(raw: dict, cls, source="config") -> None:
    """Refuse a key that is neither ``cls``'s field nor peft's, naming the closest field
    (a misspelt ``lora_alhpa`` silently dropped would change the scaling)."""
    ours = {f.name for f in dataclasses.fields(cls)}
    known = ours | PEFT_FIELDS | {"peft_type", "base_model_config"}
    for key in raw:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), sorted(ours | {"peft_type"}), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; {cls.__name__} fields: {sorted(ours)}"
        raise ValueError(f"{source}: unknown key {key!r} for {cls.__name__}{hint}")


@dataclass
class LoraConfig(PeftConfig):
    """LoRA (Hu et al. 2021); ``use_rslora`` (Kalajdzievski 2023); ``use_dora`` (Liu et al. 2024).

    ``bias``: ``"none"`` (no bias trains), ``"all"`` (every bias in the model
    trains too), ``"lora_only"`` (biases of the adapted layers train).
    """
    peft_type: ClassVar[str] = "LORA"
    mergeable: ClassVar[bool] = True
    touch_point: ClassVar[str] = "linear"
    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None    # names, a regex, or "all-linear"
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True             # True, False or "gaussian"
    layers_to_transform: list[int] | int | None = None
    # peft's flag for weights stored (in, out) (GPT-2's Conv1D); ours are all (out, in),
    # so it is recorded for the files and changes nothing here (hf_names.fan_in_fan_out)
    fan_in_fan_out: bool = False

    def validate(self):
        _positive_int("LoraConfig", "r", self.r)
        positive_number(self.lora_alpha, "lora_alpha", "LoraConfig.lora_alpha")
        probability(self.lora_dropout, "lora_dropout", "LoraConfig.lora_dropout")
        _choice("LoraConfig", "bias", self.bias, ("none", "all", "lora_only"))
        _choice("LoraConfig", "init_lora_weights", self.init_lora_weights, (True, False, "gaussian"))
        _choice("LoraConfig", "fan_in_fan_out", self.fan_in_fan_out, (True, False))
        if self.target_modules is None:
            self.target_modules = list(DEFAULT_LORA_TARGETS)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)


@dataclass
class IA3Config(PeftConfig):
    """(IA)3 (Liu et al. 2022): learned vectors that rescale activations.

    Outputs of the non-feed-forward targets (``k_proj``, ``v_proj``) are scaled;
    for ``feedforward_modules`` (``fc2``) the *input* is scaled, as in the paper.
    """
    peft_type: ClassVar[str] = "IA3"
    mergeable: ClassVar[bool] = True
    touch_point: ClassVar[str] = "linear"
    target_modules: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "fc2"])
    feedforward_modules: list[str] | str | None = field(default_factory=lambda: ["fc2"])
    layers_to_transform: list[int] | int | None = None

    def validate(self):
        if isinstance(self.target_modules, (list, tuple)) and isinstance(self.feedforward_modules,
                                                                         (list, tuple)):
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                raise ValueError(f"IA3Config.feedforward_modules {extra} are not among "
                                 f"target_modules {list(self.target_modules)}")


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021). Not in Hugging
    Face ``peft`` (AdapterHub's ``adapters`` library has them).

    ``placement``: ``"houlsby"`` (after attention and after the MLP, before each
    residual add), ``"pfeiffer"`` (after the MLP only), ``"parallel"`` (beside each
    sublayer, added to its output; He et al. 2022). Give ``bottleneck_size`` or
    ``reduction_factor`` (bottleneck = d_model // reduction_factor); neither: 16 units,
    or d_model where the model is narrower. A bottleneck wider than d_model is refused.
    """
    peft_type: ClassVar[str] = "BOTTLENECK"
    touch_point: ClassVar[str] = "sublayer"
    bottleneck_size: int | None = None
    reduction_factor: int | None = None
    activation: str = "relu"
    placement: str = "houlsby"
    bias: bool = True

    def validate(self):
        _choice("BottleneckConfig", "placement", self.placement, ("houlsby", "pfeiffer", "parallel"))
        _choice("BottleneckConfig", "activation", self.activation, ("relu", "gelu"))
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ValueError("BottleneckConfig: give bottleneck_size or reduction_factor, not both")
        if self.bottleneck_size is not None:
            _positive_int("BottleneckConfig", "bottleneck_size", self.bottleneck_size)
        elif self.reduction_factor is not None:
            _positive_int("BottleneckConfig", "reduction_factor", self.reduction_factor)


@dataclass
class PromptLearningConfig(PeftConfig):
    """What prefix and prompt tuning share, with Hugging Face's field names.

    ``token_dim``, ``num_layers``, ``num_attention_heads`` describe the model; ``peft``
    fills them in from the model, and so do we: when given, they must agree with the
    model (checked when the adapter is attached). ``num_transformer_submodules`` is 1
    for a decoder; ``peft`` uses 2 for encoder-decoder models (and ignores it for
    prefix tuning); we accept 1 or 2 and, having one decoder, use one.
    """
    num_virtual_tokens: int = 10
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def validate(self):
        name = type(self).__name__
        _positive_int(name, "num_virtual_tokens", self.num_virtual_tokens)
        for f in ("token_dim", "num_attention_heads", "num_layers"):
            if getattr(self, f) is not None:
                _positive_int(name, f, getattr(self, f))
        if self.num_transformer_submodules is not None:
            _choice(name, "num_transformer_submodules", self.num_transformer_submodules, (1, 2))
        _choice(name, "position_convention", self.position_convention, ("keep", "shift"))

    def check_model(self, model_config):
        """Refuse a config that describes another model than ``model_config`` (a GPTConfig)."""
        for field_name, ours in (("token_dim", model_config.d_model),
                                 ("num_layers", model_config.n_layers),
                                 ("num_attention_heads", model_config.n_heads)):
            given = getattr(self, field_name)
            if given is not None and given != ours:
                raise ValueError(f"{type(self).__name__}.{field_name}={given} does not match the "
                                 f"model, which has {ours}")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang 2021). With ``prefix_projection`` the table comes
    from embedding -> Linear -> tanh -> Linear (§4.3), which trains more stably.

    ``position_convention``: ``"keep"`` (ours: the prefix has no position, the real
    tokens keep 0..T-1) or ``"shift"`` (Hugging Face ``peft``, where the prefix acts as
    a cache of P earlier tokens, so the real tokens sit at P..P+T-1).
    """
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    touch_point: ClassVar[str] = "attention_kv"
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    position_convention: str = "keep"

    def validate(self):
        super().validate()
        if self.encoder_hidden_size is not None:
            _positive_int("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size)


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al. 2021): a soft prompt before the token embeddings.

    ``position_convention``: ``"keep"`` (our default: real tokens keep positions
    0..T-1, the prompt gets no position embedding, so a small pretrained model sees
    its tokens where it always saw them) or ``"shift"`` (Hugging Face: the prompt
    takes positions 0..P-1 and the real tokens move to P..P+T-1).
    """
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    touch_point: ClassVar[str] = "input_embeddings"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_token_ids: list[int] | None = None
    position_convention: str = "keep"

    def validate(self):
        super().validate()
        _choice("PromptTuningConfig", "prompt_tuning_init", self.prompt_tuning_init,
                ("RANDOM", "SAMPLE_VOCAB", "TEXT"))
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_token_ids:
            raise ValueError("PromptTuningConfig.prompt_tuning_init='TEXT' needs "
                             "prompt_tuning_init_token_ids (a non-empty list of token ids)")
        if self.prompt_tuning_init_token_ids is not None:
            self.prompt_tuning_init_token_ids = [int(t) for t in self.prompt_tuning_init_token_ids]


@dataclass
class BitFitConfig(PeftConfig):
    """BitFit (Ben Zaken et al. 2022): only bias terms train. Not in Hugging Face ``peft``."""
    peft_type: ClassVar[str] = "BITFIT"
    touch_point: ClassVar[str] = "biases"
    include_layernorm: bool = True


@dataclass
class FullFineTuningConfig(PeftConfig):
    """Every parameter trains (the baseline; not a PEFT method)."""
    peft_type: ClassVar[str] = "FULL"
    touch_point: ClassVar[str] = "everything"
