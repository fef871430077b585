"""The stage split (pure: no probing, no collectives): contiguous layer stages, one per group of
``tensor_parallel_size`` consecutive ranks, balanced by the groups' GPU budgets, each rank with
its forecast local plan; and a rank's stage as a ``ModelSpec`` of its own for the engine."""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Protocol

from streamload import planner
from streamload.checkpoint import DTYPE_SIZES
from streamload.distributed._failure import _Failure
from streamload.distributed._slices import shard_spec
from streamload.distributed._tp import TensorParallel
from streamload.errors import PlanError
from streamload.model import ModelSpec, PartSpec, layer_kv_bytes
from streamload.params import LoadParams
from streamload.planner import DeviceCapacity, Plan, estimate_activations

__all__ = [
    "DistributedPlan",
    "RankCapacity",
    "Stage",
    "is_input_part",
    "split_stages",
    "stage_spec",
]


@dataclass(frozen=True, slots=True)
class RankCapacity:
    """What one rank reports before the split: its host and its devices' live capacities, in
    fill order (the CPU, if any, last)."""

    rank: int
    host: str
    devices: tuple[DeviceCapacity, ...]


@dataclass(frozen=True, slots=True)
class Stage:
    """Rank ``rank``'s share of the model: layers ``start..stop-1``, the non-mapped ``parts``
    (whole), and ``tied_sources``: tensors of other stages' parts that a tied head here reads
    (the input embedding, for a tied ``lm_head`` on the last stage).

    ``plan`` is the rank-local plan forecast from the capacities the rank reported: its layer
    ``i`` is model layer ``start + i`` (the load itself plans again on live numbers).
    ``cpu_memory_bytes`` is the host budget given to this rank when several ranks share a host
    and ``LoadParams.cpu_memory_bytes`` was not set (their host's available memory, split
    evenly), else ``None``. ``tp_rank`` is the rank's place among the ``tp_size`` ranks that
    share the stage (tensor parallelism; the stage's ranks are consecutive): it loads part
    ``tp_rank`` of every split tensor.
    """

    rank: int
    host: str
    start: int
    stop: int
    parts: tuple[str, ...]
    tied_sources: tuple[str, ...]
    plan: Plan
    cpu_memory_bytes: int | None = None
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def pp_rank(self) -> int:
        """The stage's place in the pipeline."""
        return self.rank // self.tp_size

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    def describe_layers(self) -> str:
        """``"4-7"`` (or ``"4"``, or ``"none"``)."""
        return _span(self.start, self.stop)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            **placement_fields(self),
            "plan": self.plan.to_dict(),
            "cpu_memory_bytes": self.cpu_memory_bytes,
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
        }


class _Placed(Protocol):
    """What a stage and a rank's summary both say about where a rank's share of a model is."""

    @property
    def rank(self) -> int: ...
    @property
    def host(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def stop(self) -> int: ...
    @property
    def parts(self) -> tuple[str, ...]: ...
    @property
    def tied_sources(self) -> tuple[str, ...]: ...


def placement_fields(item: _Placed) -> dict[str, Any]:
    """The JSON-ready fields saying which rank holds which layers and parts."""
    return {
        "rank": item.rank,
        "host": item.host,
        "start": item.start,
        "stop": item.stop,
        "parts": list(item.parts),
        "tied_sources": list(item.tied_sources),
    }


@dataclass(frozen=True, slots=True)
class DistributedPlan:
    """Every rank's stage, in rank order, and how the tensors split within a stage
    (``tensor_parallel``); the same object on every rank."""

    stages: tuple[Stage, ...]
    tensor_parallel: TensorParallel = field(default_factory=TensorParallel)

    @property
    def layer_ranks(self) -> tuple[int, ...]:
        """``layer_ranks[i]``: the (first) rank holding model layer ``i``."""
        return tuple(s.rank for s in self.stages if s.tp_rank == 0 for _ in s.layers)

    def stage(self, rank: int) -> Stage:
        return self.stages[rank]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "stages": [stage.to_dict() for stage in self.stages],
            "tensor_parallel_size": self.tensor_parallel.size,
        }


# Last path segments of parts that feed the first layer (besides towers and projectors).
_INPUT_SEGMENTS = frozenset(
    {
        "embed_tokens",
        "embed_in",
        "embeddings",
        "embedding",
        "word_embeddings",
        "tok_embeddings",
        "wte",
        "wpe",
        "embed_positions",
        "position_embeddings",
    }
)


def is_input_part(part: PartSpec) -> bool:
    """Whether a non-mapped part feeds the first layer (token and position embeddings, vision
    and audio towers and their projectors: the first stage holds it) rather than reading the
    last layer's output (final norm, ``lm_head``, pooler, extra layers: the last stage)."""
    return part.sub_model is not None or part.name.rsplit(".", 1)[-1] in _INPUT_SEGMENTS


def split_stages(
    spec: ModelSpec,
    ranks: Sequence[RankCapacity],
    params: LoadParams,
    *,
    tensor_parallel: TensorParallel | None = None,
) -> DistributedPlan:
    """Cut ``spec``'s layers into contiguous stages, one per group of ``tensor_parallel.size``
    consecutive ranks (one per rank by default) in rank order, and forecast each rank's local
    plan (pure: no probing, no collectives; rank 0 runs it for everyone).

    Balance: every stage gets at least one layer; the split minimises the largest ratio of a
    stage's bytes (weights + non-paged KV of its layers, plus the parts it holds; a rank's
    slices of them under tensor parallelism) to its group's GPU budget (free - reserve -
    activations, summed over a rank's GPUs; the smallest rank's in a group; the host budgets
    when no rank has a GPU). Ranks on one host share its memory: when
    ``params.cpu_memory_bytes`` is unset, each gets an even share of the host's available
    memory as its CPU budget.

    ``PlanError`` if there are fewer layers than stages, or ranks that do not form whole
    groups; ``RankFailedError`` naming the rank and device if a stage does not fit its rank
    (the planner's breakdown in the message).
    """
    tp = tensor_parallel or TensorParallel()
    _check_ranks(spec, ranks, tp.size)
    groups = [list(ranks[i : i + tp.size]) for i in range(0, len(ranks), tp.size)]
    k = len(groups)
    sliced = [shard_spec(spec, tp, index) for index in range(tp.size)]
    base = sliced[0]  # every rank's slices have the sizes of rank 0's
    inputs = tuple(part.name for part in base.non_mapped if is_input_part(part))
    outputs = tuple(part.name for part in base.non_mapped if not is_input_part(part))
    tied = _tied_sources(base, outputs + (inputs if k == 1 else ()))
    shares = _cpu_shares(ranks, params)
    part_bytes = {part.name: part.nbytes for part in base.non_mapped}
    fixed = [0] * k
    fixed[0] += sum(part_bytes[name] for name in inputs)
    fixed[-1] += sum(part_bytes[name] for name in outputs)
    fixed[-1] += _part_of(base, "tied sources", tied).nbytes
    budgets = _budgets(base, ranks, params, shares)
    group_budgets = [min(budgets[r.rank] for r in group) for group in groups]
    counts = _split(_layer_costs(base, params), fixed, group_budgets)
    stages = []
    starts = list(accumulate(counts, initial=0))
    for g, (group, count) in enumerate(zip(groups, counts, strict=True)):
        parts = (inputs if g == 0 else ()) + (outputs if g == k - 1 else ())
        for member in group:
            stage = _forecast(
                sliced[member.rank % tp.size],
                member,
                params,
                start=starts[g],
                stop=starts[g] + count,
                parts=parts,
                tied=tied if g == k - 1 else (),
                share=shares[member.rank],
            )
            stages.append(
                dataclasses.replace(stage, tp_rank=member.rank % tp.size, tp_size=tp.size)
            )
    return DistributedPlan(tuple(stages), tp)


def stage_spec(
    spec: ModelSpec, stage: Stage, tensor_parallel: TensorParallel | None = None
) -> ModelSpec:
    """The stage as a ``ModelSpec`` of its own, which the engine loads like a whole model.

    Its layers are ``spec.layers[start:stop]`` renumbered from 0 (names unchanged), its
    non-mapped parts the stage's ``parts`` plus one part per tied source (holding only that
    tensor), its checkpoint the stage's tensors only (under ``tensor_parallel``: the rank's
    slices of the split ones). Ties are kept where the
    stage holds the head (the last); the logits estimate applies only to the last stage, the
    vision estimate only to the stage holding a tower.
    """
    if tensor_parallel is not None:
        spec = shard_spec(spec, tensor_parallel, stage.tp_rank)
    return _sub_spec(spec, stage.start, stage.stop, stage.parts, stage.tied_sources)


def _check_ranks(spec: ModelSpec, ranks: Sequence[RankCapacity], tp_size: int = 1) -> None:
    if not ranks:
        raise ValueError("no ranks to split over")
    order = [rank.rank for rank in ranks]
    if order != list(range(len(ranks))):
        raise ValueError(f"ranks must be 0..{len(ranks) - 1} in order, got {order}")
    if len(ranks) % tp_size:
        raise PlanError(
            f"{len(ranks)} ranks do not form stages of tensor_parallel_size={tp_size} "
            "consecutive ranks: the world size must be a multiple of it"
        )
    stages = len(ranks) // tp_size
    if len(spec.layers) < stages:
        raise PlanError(
            f"{len(spec.layers)} layers cannot be split into {stages} stages: every "
            + ("rank" if tp_size == 1 else "stage")
            + f" needs at least one layer (use at most {len(spec.layers)} "
            + ("ranks)" if tp_size == 1 else "stages)")
        )


def _tied_sources(spec: ModelSpec, home: Sequence[str]) -> tuple[str, ...]:
    """Tied heads' source tensors that are not in a part of ``home`` (the head's stage)."""
    owner = {name: part.name for part in spec.non_mapped for name in part.tensors}
    sources = []
    for source in spec.tied.values():
        if owner.get(source) not in home and source in owner and source not in sources:
            sources.append(source)
    return tuple(sources)


def _cpu_shares(ranks: Sequence[RankCapacity], params: LoadParams) -> list[int | None]:
    """Per rank: an even share of its host's available memory when ranks share a host."""
    per_host: dict[str, int] = {}
    for rank in ranks:
        per_host[rank.host] = per_host.get(rank.host, 0) + 1
    shares: list[int | None] = []
    for rank in ranks:
        cpu = next((cap for cap in rank.devices if not cap.is_gpu), None)
        if cpu is None or params.cpu_memory_bytes is not None or per_host[rank.host] == 1:
            shares.append(None)
        else:
            shares.append(cpu.free_bytes // per_host[rank.host])
    return shares


def _budgets(
    spec: ModelSpec,
    ranks: Sequence[RankCapacity],
    params: LoadParams,
    shares: Sequence[int | None],
) -> list[int]:
    """What each rank can hold: GPU free - reserve - activations, summed; host budgets when no
    rank has GPU room."""
    acts = estimate_activations(spec, params).mapped
    gpu = [
        sum(
            max(cap.free_bytes - params.reserve_for(cap.total_bytes) - acts, 0)
            for cap in rank.devices
            if cap.is_gpu
        )
        for rank in ranks
    ]
    if any(gpu):
        return gpu
    hosts = []
    for rank, share in zip(ranks, shares, strict=True):
        cpu = next((cap for cap in rank.devices if not cap.is_gpu), None)
        base = 0 if cpu is None else share or params.cpu_memory_bytes or cpu.free_bytes
        hosts.append(max(base - params.host_reserve_bytes, 0))
    return hosts


def _layer_costs(spec: ModelSpec, params: LoadParams) -> list[int]:
    """Weights + non-paged KV of each layer (the balance's measure; the planner is exact)."""
    itemsize = DTYPE_SIZES[spec.activation_dtype]
    return [
        layer.nbytes
        + layer_kv_bytes(
            layer, tokens=params.max_seq_len, batch=params.max_batch_size, itemsize=itemsize
        )
        for layer in spec.layers
    ]


def _split(costs: Sequence[int], fixed: Sequence[int], budgets: Sequence[int]) -> list[int]:
    """Layer counts per rank (contiguous, in order, each >= 1) minimising the largest
    ``(fixed + layer costs) / budget`` over ranks.

    For a fill ratio ``t``, each rank but the last greedily takes the longest run of layers
    that keeps it within ``t x budget`` (at least one, leaving one for each later rank); ``t``
    is feasible if the last rank's rest fits too. Feasibility grows with ``t``, so ``t`` is
    found by bisection. When no ``t`` works (the last rank has no budget), the split at the
    largest ``t`` is returned and the rank's own planner decides (CPU, or a clear error).
    """
    n, k = len(costs), len(budgets)
    if not any(budgets):
        budgets = [1] * k
    prefix = list(accumulate(costs, initial=0))

    def attempt(t: float) -> tuple[list[int], bool]:
        counts = []
        cursor = 0
        for r in range(k - 1):
            room = t * budgets[r] - fixed[r]
            end = bisect_right(prefix, prefix[cursor] + room, lo=cursor) - 1
            end = max(cursor + 1, min(end, n - (k - 1 - r)))
            counts.append(end - cursor)
            cursor = end
        counts.append(n - cursor)
        return counts, fixed[-1] + prefix[n] - prefix[cursor] <= t * budgets[-1]

    lowest = min(b for b in budgets if b > 0)
    lo, hi = 0.0, (prefix[n] + sum(fixed)) / lowest + 1.0
    best, ok = attempt(hi)
    if not ok:
        return best
    for _ in range(64):
        mid = (lo + hi) / 2
        counts, ok = attempt(mid)
        if ok:
            hi, best = mid, counts
        else:
            lo = mid
    return best


def _forecast(
    spec: ModelSpec,
    rank: RankCapacity,
    params: LoadParams,
    *,
    start: int,
    stop: int,
    parts: tuple[str, ...],
    tied: tuple[str, ...],
    share: int | None,
) -> Stage:
    """The stage with its local plan, planned as the engine will; ``RankFailedError`` if it
    does not fit the rank."""
    sub = _sub_spec(spec, start, stop, parts, tied)
    caps = list(rank.devices)
    local = params if share is None else dataclasses.replace(params, cpu_memory_bytes=share)
    try:
        plan = planner.plan(sub, caps, local)
    except PlanError as exc:
        raise _Failure.of(
            exc, rank=rank.rank, host=rank.host, phase=f"planning {_layers_text(start, stop)}"
        ).error() from exc
    return Stage(rank.rank, rank.host, start, stop, parts, tied, plan, share)


def _sub_spec(
    spec: ModelSpec, start: int, stop: int, parts: Sequence[str], tied: Sequence[str]
) -> ModelSpec:
    layers = tuple(
        dataclasses.replace(layer, index=i) for i, layer in enumerate(spec.layers[start:stop])
    )
    non_mapped = []
    for part in spec.non_mapped:
        if part.name in parts:
            non_mapped.append(part)
        elif any(name in tied for name in part.tensors):
            non_mapped.append(_part_of(spec, part.name, [n for n in part.tensors if n in tied]))
    groups = [layer.tensors for layer in layers] + [part.tensors for part in non_mapped]
    names = {name for group in groups for name in group}
    last = stop == len(spec.layers)
    ties = {alias: source for alias, source in spec.tied.items() if last and source in names}
    names.update(ties)
    checkpoint = spec.checkpoint
    tensors = {name: entry for name, entry in checkpoint.tensors.items() if name in names}
    towers = any(part.sub_model is not None for part in non_mapped)
    return dataclasses.replace(
        spec,
        checkpoint=dataclasses.replace(checkpoint, tensors=tensors),
        facts=spec.facts if towers else dataclasses.replace(spec.facts, vision=None),
        layers=layers,
        non_mapped=tuple(non_mapped),
        tied=ties,
        has_lm_head=spec.has_lm_head and last,
    )


def _part_of(spec: ModelSpec, name: str, tensors: Sequence[str]) -> PartSpec:
    """A part named ``name`` holding only ``tensors``, sized as the spec sizes tensors."""
    nbytes = stored = converted = 0
    for tensor in tensors:
        entry = spec.checkpoint.tensors[tensor]
        placed = spec.placed_dtype(tensor)
        size = entry.nbytes if placed == entry.dtype else entry.numel * DTYPE_SIZES[placed]
        nbytes += size
        stored += entry.nbytes
        converted += size if placed != entry.dtype else 0
    return PartSpec(name, tuple(tensors), nbytes, stored, converted, None)


def _span(start: int, stop: int) -> str:
    if stop <= start:
        return "none"
    return str(start) if stop == start + 1 else f"{start}-{stop - 1}"


def _layers_text(start: int, stop: int) -> str:
    """``"layers 4-7"``, ``"layer 4"``, ``"no layers"``."""
    if stop <= start:
        return "no layers"
    return f"layer {start}" if stop == start + 1 else f"layers {start}-{stop - 1}"
