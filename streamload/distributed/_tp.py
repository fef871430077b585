"""The tensor-parallel plan (pure: headers and config only): which tensors a stage's ranks
split, along which dimension, and which each rank holds whole.

A plan maps module-name globs to a style (``*`` is one dotted segment; a glob matches a module
or a parameter by its trailing segments, so ``"layers.*.self_attn.q_proj"`` matches
``model.layers.3.self_attn.q_proj.weight``):

- ``"colwise"``: split the output features (dim 0 of a Linear weight, and its bias);
- ``"rowwise"``: split the input features (dim 1; the bias is added once after the
  all-reduce, so every rank holds it whole);
- ``"vocab"``: split an embedding's rows (dim 0);
- ``"replicate"``: every rank holds the whole tensor.

Where several globs match a tensor, the one with the most segments wins. Tensors no glob
matches are replicated. The default plan is the model's transformers config class's
``base_model_tp_plan`` (when transformers is installed; its style names are mapped onto these),
else ``BUILTIN_PLANS``, which holds the same values for the llama family; both add ``lm_head``
``colwise`` (as transformers' causal-LM classes do) and split mixture-of-experts layers stored
per expert (Mixtral, Qwen-MoE) expert by expert. Experts no glob matches are replicated, with
a warning.

GQA: when ``num_key_value_heads < tensor_parallel_size``, the K and V projections are
replicated (each rank computes every KV head); heads that are more than the ranks but do not
divide among them, or any split dimension not divisible by the size, are a ``PlanError``
naming the tensor, as is a glob of an explicit ``tp_plan`` that matches no tensor.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from streamload.errors import PlanError
from streamload.model import ModelSpec

__all__ = [
    "BUILTIN_PLANS",
    "NO_EXPERT_PLAN",
    "STYLES",
    "Shard",
    "Style",
    "TensorParallel",
    "default_tp_plan",
    "resolve_tp",
]

Style = Literal["colwise", "rowwise", "replicate", "vocab"]
STYLES: tuple[Style, ...] = ("colwise", "rowwise", "replicate", "vocab")


@dataclass(frozen=True, slots=True)
class Shard:
    """What a rank holds of one tensor: part ``index`` of ``count`` equal parts along ``dim``;
    ``dim=None``: the whole tensor (``Shard(None, 0, 1)``)."""

    dim: int | None
    index: int
    count: int


WHOLE = Shard(None, 0, 1)
NO_EXPERT_PLAN = "no tensor-parallel plan splits these experts: every rank holds them whole"


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """How each stage's tensors split over its ``size`` ranks: ``dims`` names every split
    tensor and the dimension it splits along (every other tensor is held whole);
    ``replicated`` names tensors held whole against the plan's style or for want of one,
    with why (GQA heads, experts without a plan); ``ties`` maps a tied head to its source,
    whose split it shares."""

    size: int = 1
    dims: Mapping[str, int] = field(default_factory=dict)
    replicated: tuple[tuple[str, str], ...] = ()
    ties: Mapping[str, str] = field(default_factory=dict)

    def shard(self, name: str, index: int) -> Shard:
        """Rank ``index``'s part of tensor ``name`` (``index`` within its stage)."""
        dim = self.dims.get(self.ties.get(name, name))
        return WHOLE if dim is None else Shard(dim, index, self.size)


# The llama family's plan, as transformers' config classes state it (``base_model_tp_plan``),
# plus what their causal-LM classes add (``lm_head``).
_ATTENTION: dict[str, Style] = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "lm_head": "colwise",
}
_NORMS: dict[str, Style] = {
    "layers.*.self_attn.q_norm": "replicate",
    "layers.*.self_attn.k_norm": "replicate",
}
_LLAMA: dict[str, Style] = {
    **_ATTENTION,
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
_QWEN3: dict[str, Style] = {**_LLAMA, **_NORMS}

BUILTIN_PLANS: Mapping[str, Mapping[str, Style]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _QWEN3,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "mixtral": _ATTENTION,  # its experts: ``_EXPERTS``
    "qwen2_moe": _LLAMA,
    "qwen3_moe": _QWEN3,
}

# Mixture-of-experts layers stored one expert at a time, split expert by expert as
# transformers' per-expert plans did: consulted for tensors no other glob matches.
_EXPERTS: dict[str, Style] = {
    "layers.*.block_sparse_moe.experts.*.w1": "colwise",
    "layers.*.block_sparse_moe.experts.*.w3": "colwise",
    "layers.*.block_sparse_moe.experts.*.w2": "rowwise",
    "layers.*.mlp.experts.*.gate_proj": "colwise",
    "layers.*.mlp.experts.*.up_proj": "colwise",
    "layers.*.mlp.experts.*.down_proj": "rowwise",
}

_OURS: Mapping[str, Style] = {style: style for style in STYLES}

# transformers' style names (and ours) -> the one that says how the weights split (``None``: a style
# streamload cannot split, such as a fused gate/up projection).
_TRANSFORMERS_STYLES: Mapping[str, Style | None] = {
    "colwise": "colwise",
    "colwise_rep": "colwise",
    "colwise_gather_output": "colwise",
    "local_colwise": "colwise",
    "rowwise": "rowwise",
    "rowwise_rep": "rowwise",
    "local_rowwise": "rowwise",
    "embedding_rowwise": "vocab",
    "replicate": "replicate",
    "replicated_with_grad_allreduce": "replicate",
    "local": "replicate",
    "gather": "replicate",
    "isolated": "replicate",
    "sequence_parallel": "replicate",
    "moe_tp_experts": "replicate",
    "ep_router": "replicate",
    "vocab": "vocab",
}


def default_tp_plan(spec: ModelSpec) -> dict[str, str]:
    """The model's default plan: its transformers config class's ``base_model_tp_plan`` (when
    transformers is importable and has one), else ``BUILTIN_PLANS``; ``lm_head`` colwise in
    both; ``{}`` (everything replicated) for an architecture neither knows."""
    model_type = spec.facts.text_model_type or spec.facts.model_type
    found = _transformers_plan(model_type)
    if found is None:
        return dict(BUILTIN_PLANS.get(model_type, {}))
    return {**found, "lm_head": "colwise"}


def _transformers_plan(model_type: str) -> dict[str, str] | None:
    try:
        auto = importlib.import_module("transformers.models.auto.configuration_auto")
        config_class = auto.CONFIG_MAPPING[model_type]
    except Exception:  # not installed, or an architecture it does not know
        return None
    plan = getattr(config_class, "base_model_tp_plan", None)
    return dict(plan) if isinstance(plan, Mapping) and plan else None


@dataclass(frozen=True, slots=True)
class _Rule:
    glob: str
    style: str
    pattern: re.Pattern[str]
    explicit: bool  # given by the caller: must match a tensor

    @property
    def segments(self) -> int:
        return self.glob.count(".") + 1


def _rule(glob: str, style: str, explicit: bool) -> _Rule:
    body = r"\.".join("[^.]+" if seg == "*" else re.escape(seg) for seg in glob.split("."))
    return _Rule(glob, style, re.compile(rf"(?:^|.*\.){body}(\.[^.]+)?$"), explicit)


def resolve_tp(
    spec: ModelSpec, size: int, tp_plan: Mapping[str, str] | None = None
) -> TensorParallel:
    """The split of ``spec``'s tensors over ``size`` ranks per stage under ``tp_plan`` (the
    default plan when ``None``); ``PlanError`` naming the tensor or glob that cannot split."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {size}")
    if size == 1:
        return TensorParallel()
    explicit = tp_plan is not None
    given = dict(tp_plan) if tp_plan is not None else default_tp_plan(spec)
    rules = [_rule(glob, style, explicit) for glob, style in given.items()]
    for bad in (r for r in rules if explicit and r.style not in STYLES):
        raise PlanError(
            f"tp_plan[{bad.glob!r}] = {bad.style!r}: expected one of {', '.join(STYLES)}"
        )
    experts = [_rule(glob, style, False) for glob, style in _EXPERTS.items()]
    dims: dict[str, int] = {}
    replicated: list[tuple[str, str]] = []
    used: set[str] = set()
    ties = dict(spec.tied)
    for name in spec.checkpoint.tensors:
        rule: _Rule | None = _best(rules, name)
        if rule is not None:
            used.add(rule.glob)
        if name in ties:
            continue  # a tied head shares its source's split
        if rule is None and not explicit:
            rule = _best(experts, name)
        if rule is None:
            if _is_expert(name):
                replicated.append((name, NO_EXPERT_PLAN))
            continue
        used.add(rule.glob)
        dim = _dim(spec, name, rule, size, replicated)
        if dim is not None:
            dims[name] = dim
    for rule in rules:
        if rule.explicit and rule.glob not in used:
            raise PlanError(f"tp_plan names {rule.glob!r}, which matches no tensor of the model")
    return TensorParallel(size, dims, tuple(replicated), ties)


def _best(rules: Iterable[_Rule], name: str) -> _Rule | None:
    found = [rule for rule in rules if rule.pattern.match(name)]
    return max(found, key=lambda rule: rule.segments, default=None)


def _is_expert(name: str) -> bool:
    return ".experts." in name


def _style(rule: _Rule, name: str) -> Style:
    style = (_OURS if rule.explicit else _TRANSFORMERS_STYLES).get(rule.style)
    if style is None:
        raise PlanError(
            f"{name}: the default plan's style {rule.style!r} (for {rule.glob!r}) cannot be "
            "split by streamload; pass tp_plan= naming a style for it"
        )
    return style


def _dim(
    spec: ModelSpec, name: str, rule: _Rule, size: int, replicated: list[tuple[str, str]]
) -> int | None:
    """The dimension ``name`` splits along (``None``: held whole); checks it divides."""
    style = _style(rule, name)
    if style == "replicate":
        return None
    entry = spec.checkpoint.tensors[name]
    param = name.rsplit(".", 1)[-1]
    at_param = rule.pattern.match(name).group(1) is None  # type: ignore[union-attr]
    ndim = len(entry.shape)
    if param == "bias" and not at_param:
        dim = None if style == "rowwise" else ndim - 1
    elif param == "weight" or at_param:
        if ndim >= 2:
            dim = {"colwise": ndim - 2, "rowwise": ndim - 1, "vocab": 0}[style]
        else:  # a vector splits with the output features; a rowwise one stays whole
            dim = 0 if ndim == 1 and style != "rowwise" else None
    elif math.prod(entry.shape) <= 1:
        return None  # a scalar side tensor (a quantization scale): the same on every rank
    else:
        raise PlanError(
            f"{name}: {rule.glob!r} is {style}, but tensor-parallel loading splits only a "
            f"module's weight and bias, not {param!r} (shape {list(entry.shape)}); pass "
            "tp_plan= replicating the module"
        )
    if dim is None:
        return None
    heads = _heads_rule(spec, name, size)
    if heads == "replicate":
        replicated.append((name, _gqa_reason(spec, size)))
        return None
    if heads is not None:
        raise PlanError(f"{name}: {heads}")
    if entry.shape[dim] % size:
        raise PlanError(
            f"{name}: dimension {dim} of shape {list(entry.shape)} does not divide into "
            f"{size} tensor-parallel parts ({style})"
        )
    return dim


_Q_OR_O = re.compile(r"\.(q_proj|o_proj)\.[^.]+$")
_K_OR_V = re.compile(r"\.(k_proj|v_proj)\.[^.]+$")


def _heads_rule(spec: ModelSpec, name: str, size: int) -> str | None:
    """For attention projections: ``"replicate"`` (GQA with fewer KV heads than ranks), a
    problem (heads that do not divide), or ``None`` (no head rule applies)."""
    facts = spec.facts
    if facts.kv_kind != "standard" or facts.num_attention_heads <= 0:
        return None
    if _Q_OR_O.search(name):
        heads = facts.num_attention_heads
        if heads % size:
            return f"{heads} attention heads do not divide among {size} ranks"
        return None
    if _K_OR_V.search(name):
        kv = facts.num_key_value_heads
        if kv < size:
            return "replicate"
        if kv % size:
            return f"{kv} key/value heads do not divide among {size} ranks"
    return None


def _gqa_reason(spec: ModelSpec, size: int) -> str:
    kv = spec.facts.num_key_value_heads
    return f"{kv} key/value heads < {size} tensor-parallel ranks: every rank holds them all"
