"""Distributed loading: one pipeline stage per rank of a ``torch.distributed`` process group.

    import torch.distributed as dist
    from streamload.distributed import load_distributed

    dist.init_process_group("nccl")          # or "gloo"; torchrun sets RANK, WORLD_SIZE, ...
    model = await load_distributed("path/to/checkpoint", streamload.LoadParams(devices=[...]))
    model.tensors                            # this rank's stage, each tensor on its device

Every rank calls ``load_distributed`` with the same checkpoint (a shared file system or a copy
per node) and the same parameters, apart from ``params.devices``, which name the rank's own
devices. What the ranks agree on, and what each decides alone:

1. *Survey* (collective). Each rank reads the checkpoint's headers, probes its devices and
   sends its capacities (``all_gather_object``), with a fingerprint of the checkpoint and of
   its parameters: a rank that sees another checkpoint, other settings, or cannot read or
   probe at all makes every rank fail alike.
2. *Split* (rank 0, broadcast with ``broadcast_object_list``). ``split_stages`` cuts the layers
   into contiguous stages, one per rank in rank order, balanced by the ranks' GPU capacities,
   and forecasts each rank's local plan with the usual planner. The first stage also holds the
   input-side parts (embeddings, vision/audio towers and projectors), the last stage the
   output-side parts (final norm, lm_head, pooler, extra layers such as MTP heads); a head tied
   to the input embedding makes the last stage load the embedding tensor too. Every rank gets
   the same ``DistributedPlan``, or the same error.
3. *Load* (local). Each rank streams its stage's tensors with the engine onto its own devices
   (``stage_spec``: the stage as a ``ModelSpec`` of its own). Rechecks, re-plans after
   under-delivery and OOM, and the paged-attention fallback happen inside the rank, over its
   devices only; its layer indices count from the stage's first layer.
4. *Outcome* (collective). The ranks exchange a summary, or the error that stopped them. If
   any rank failed, every rank releases what it placed and raises the same ``RankFailedError``
   naming the first failed rank, its host and device.

Collectives run in worker threads (``anyio.to_thread.run_sync``), so the event loop never
blocks; they use a gloo group made for the load (``peer_timeout`` seconds per exchange), so a
dead peer (its sockets close) fails the others at once and a hung peer within
``peer_timeout``. Layer placements are logged by the engine as usual; ``structlog`` context
variables carry ``rank`` (merged into log lines by the default structlog configuration).

Errors::

    StreamloadError
    └── DistributedError        a distributed load failed (``rank``, ``host``, ``device``)
        ├── RankFailedError     a rank could not survey, plan or load its stage: raised on every
        │                       rank with the same message
        └── CollectiveError     an exchange did not complete: a peer died, hung past
                                ``peer_timeout``, or the process group is unusable

The module is also a command (run under ``torchrun``)::

    torchrun --nproc-per-node 2 -m streamload.distributed load PATH [--device sim:0=24GiB ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import inspect as pyinspect
import json
import os
import socket
import sys
import threading
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, TypeAlias, TypeVar

import anyio
import anyio.to_thread
import structlog
import torch
import torch.distributed as dist

from streamload import planner
from streamload._cmdline import (
    Parser,
    UsageError,
    arg_type,
    configured_logging,
    parse_device,
    parse_size,
)
from streamload.checkpoint import DTYPE_SIZES
from streamload.devices import resolve_devices
from streamload.engine import LoadedModel, capacities, load
from streamload.errors import (
    CollectiveError,
    DeviceError,
    DistributedError,
    DoesNotFitError,
    LoadError,
    PlanError,
    RankFailedError,
    StreamloadError,
    format_bytes,
)
from streamload.events import DeviceReport, Event, LayerPlaced, Replanned
from streamload.model import ModelSpec, PartSpec, inspect, layer_kv_bytes
from streamload.params import LoadParams
from streamload.planner import DeviceCapacity, Plan, estimate_activations

__all__ = [
    "CollectiveError",
    "DistributedError",
    "DistributedEventCallback",
    "DistributedModel",
    "DistributedPlan",
    "RankCapacity",
    "RankFailedError",
    "RankSummary",
    "Stage",
    "StageAssigned",
    "is_input_part",
    "load_distributed",
    "main",
    "report_table",
    "split_stages",
    "stage_spec",
]

T = TypeVar("T")

DEFAULT_TIMEOUT = 600.0  # seconds; NCCL's default process-group timeout
_GRACE = 5.0  # seconds past a group's own timeout before a wait is abandoned

logger = structlog.get_logger("streamload")


# --------------------------------------------------------------------------------------------
# Failures as data


@dataclass(frozen=True, slots=True)
class _Failure:
    """A rank's error as plain data (sent between ranks; exceptions do not pickle reliably)."""

    rank: int
    host: str
    phase: str
    problem: str
    device: str | None
    error_type: str

    @classmethod
    def of(cls, exc: BaseException, *, rank: int, host: str, phase: str) -> _Failure:
        return cls(rank, host, phase, str(exc), _device_of(exc), type(exc).__name__)

    def error(self) -> RankFailedError:
        return RankFailedError(
            self.problem,
            rank=self.rank,
            host=self.host,
            phase=self.phase,
            device=self.device,
            error_type=self.error_type,
        )


def _device_of(exc: BaseException) -> str | None:
    """The device an error names: its ``device``, or the devices a does-not-fit overflows."""
    if isinstance(exc, RankFailedError | LoadError | DeviceError):
        return exc.device
    if isinstance(exc, DoesNotFitError):
        over = [row.device for row in exc.devices if row.need > row.capacity]
        names = over or [row.device for row in exc.devices]
        return ", ".join(names) or None
    return None


# --------------------------------------------------------------------------------------------
# The split: stages and the distributed plan (pure)


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
    evenly), else ``None``.
    """

    rank: int
    host: str
    start: int
    stop: int
    parts: tuple[str, ...]
    tied_sources: tuple[str, ...]
    plan: Plan
    cpu_memory_bytes: int | None = None

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    def describe_layers(self) -> str:
        """``"4-7"`` (or ``"4"``, or ``"none"``)."""
        return _span(self.start, self.stop)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "rank": self.rank,
            "host": self.host,
            "start": self.start,
            "stop": self.stop,
            "parts": list(self.parts),
            "tied_sources": list(self.tied_sources),
            "plan": self.plan.to_dict(),
            "cpu_memory_bytes": self.cpu_memory_bytes,
        }


@dataclass(frozen=True, slots=True)
class DistributedPlan:
    """The stages of every rank, in rank order; the same object on every rank."""

    stages: tuple[Stage, ...]

    @property
    def layer_ranks(self) -> tuple[int, ...]:
        """``layer_ranks[i]``: the rank holding model layer ``i``."""
        return tuple(stage.rank for stage in self.stages for _ in stage.layers)

    def stage(self, rank: int) -> Stage:
        return self.stages[rank]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"stages": [stage.to_dict() for stage in self.stages]}


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
    spec: ModelSpec, ranks: Sequence[RankCapacity], params: LoadParams
) -> DistributedPlan:
    """Cut ``spec``'s layers into contiguous stages, one per rank in rank order, and forecast
    each rank's local plan (pure: no probing, no collectives; rank 0 runs it for everyone).

    Balance: every stage gets at least one layer; the split minimises the largest ratio of a
    stage's bytes (weights + non-paged KV of its layers, plus the parts it holds) to its rank's
    GPU budget (free - reserve - activations, summed over its GPUs; the host budgets when no
    rank has a GPU). Ranks on one host share its memory: when ``params.cpu_memory_bytes`` is
    unset, each gets an even share of the host's available memory as its CPU budget.

    ``PlanError`` if there are fewer layers than ranks; ``RankFailedError`` naming the rank
    and device if a stage does not fit its rank (the planner's breakdown in the message).
    """
    _check_ranks(spec, ranks)
    k = len(ranks)
    inputs = tuple(part.name for part in spec.non_mapped if is_input_part(part))
    outputs = tuple(part.name for part in spec.non_mapped if not is_input_part(part))
    tied = _tied_sources(spec, outputs + (inputs if k == 1 else ()))
    shares = _cpu_shares(ranks, params)
    part_bytes = {part.name: part.nbytes for part in spec.non_mapped}
    fixed = [0] * k
    fixed[0] += sum(part_bytes[name] for name in inputs)
    fixed[-1] += sum(part_bytes[name] for name in outputs)
    fixed[-1] += _part_of(spec, "tied sources", tied).nbytes
    counts = _split(_layer_costs(spec, params), fixed, _budgets(spec, ranks, params, shares))
    stages = []
    starts = list(accumulate(counts, initial=0))
    for rank, count in zip(ranks, counts, strict=True):
        i = rank.rank
        parts = (inputs if i == 0 else ()) + (outputs if i == k - 1 else ())
        stage = _forecast(
            spec,
            rank,
            params,
            start=starts[i],
            stop=starts[i] + count,
            parts=parts,
            tied=tied if i == k - 1 else (),
            share=shares[i],
        )
        stages.append(stage)
    return DistributedPlan(tuple(stages))


def stage_spec(spec: ModelSpec, stage: Stage) -> ModelSpec:
    """The stage as a ``ModelSpec`` of its own, which the engine loads like a whole model.

    Its layers are ``spec.layers[start:stop]`` renumbered from 0 (names unchanged), its
    non-mapped parts the stage's ``parts`` plus one part per tied source (holding only that
    tensor), its checkpoint the stage's tensors only. Ties are kept where the
    stage holds the head (the last); the logits estimate applies only to the last stage, the
    vision estimate only to the stage holding a tower.
    """
    return _sub_spec(spec, stage.start, stage.stop, stage.parts, stage.tied_sources)


def _check_ranks(spec: ModelSpec, ranks: Sequence[RankCapacity]) -> None:
    if not ranks:
        raise ValueError("no ranks to split over")
    order = [rank.rank for rank in ranks]
    if order != list(range(len(ranks))):
        raise ValueError(f"ranks must be 0..{len(ranks) - 1} in order, got {order}")
    if len(spec.layers) < len(ranks):
        raise PlanError(
            f"{len(spec.layers)} layers cannot be split into {len(ranks)} stages: every rank "
            f"needs at least one layer (use at most {len(spec.layers)} ranks)"
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
    """The stage with its local plan, planned as the engine will (conversion scratch kept
    free on GPUs); ``RankFailedError`` if it does not fit the rank."""
    sub = _sub_spec(spec, start, stop, parts, tied)
    scratch = _scratch(sub)
    caps = [
        dataclasses.replace(cap, free_bytes=max(cap.free_bytes - scratch, 0)) if cap.is_gpu else cap
        for cap in rank.devices
    ]
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


def _scratch(spec: ModelSpec) -> int:
    """The engine's conversion scratch: twice the largest unit's bytes that change dtype."""
    if spec.target_dtype is None:
        return 0
    entries = spec.checkpoint.tensors
    units = [part.tensors for part in spec.non_mapped] + [layer.tensors for layer in spec.layers]
    raw = (
        sum(entries[n].nbytes for n in unit if spec.placed_dtype(n) != entries[n].dtype)
        for unit in units
    )
    return 2 * max(raw, default=0)


def _span(start: int, stop: int) -> str:
    if stop <= start:
        return "none"
    return str(start) if stop == start + 1 else f"{start}-{stop - 1}"


def _layers_text(start: int, stop: int) -> str:
    """``"layers 4-7"``, ``"layer 4"``, ``"no layers"``."""
    if stop <= start:
        return "no layers"
    return f"layer {start}" if stop == start + 1 else f"layers {start}-{stop - 1}"


# --------------------------------------------------------------------------------------------
# Events and results


@dataclass(frozen=True, slots=True)
class StageAssigned:
    """The plan every rank agreed on and this rank's stage; delivered before the load starts.

    The engine's events that follow (``PlanComputed``, ``LayerPlaced``, ``Replanned``, ...)
    number layers from the stage's first layer: add ``stage.start`` for the model's index.
    """

    plan: DistributedPlan
    stage: Stage


DistributedEventCallback: TypeAlias = Callable[[Event | StageAssigned], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class RankSummary:
    """What one rank loaded, as every rank learns it after the load (``parts`` whole, and
    ``tied_sources``: single tensors of other stages' parts, see ``Stage``).

    ``layer_devices[i]`` is the device of model layer ``start + i`` (after any re-plan);
    ``replans`` the rank's ``Replanned`` events (stage-local layer numbers).
    """

    rank: int
    host: str
    start: int
    stop: int
    parts: tuple[str, ...]
    tied_sources: tuple[str, ...]
    layer_devices: tuple[str, ...]
    devices: tuple[DeviceReport, ...]
    nbytes: int
    stored_bytes: int
    tensors: int
    seconds: float
    replans: tuple[Replanned, ...]

    @property
    def gb_per_s(self) -> float:
        return self.stored_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "rank": self.rank,
            "host": self.host,
            "start": self.start,
            "stop": self.stop,
            "parts": list(self.parts),
            "tied_sources": list(self.tied_sources),
            "layer_devices": list(self.layer_devices),
            "devices": [
                {"device": d.device, "nbytes": d.nbytes, "layers": d.layers, "seconds": d.seconds}
                for d in self.devices
            ],
            "nbytes": self.nbytes,
            "stored_bytes": self.stored_bytes,
            "tensors": self.tensors,
            "seconds": self.seconds,
            "gb_per_s": self.gb_per_s,
            "replans": [
                {"device": r.device, "reason": r.reason, "at_layer": r.at_layer}
                for r in self.replans
            ],
        }


class DistributedModel:
    """This rank's part of a distributed load.

    ``tensors`` (checkpoint names, each on its device), ``device_map`` (Hugging Face form, this
    stage's modules only) and ``local`` (the engine's ``LoadedModel``: stage-local ``plan`` and
    ``report``) describe this rank; ``plan`` (every stage) and ``ranks`` (every rank's
    ``RankSummary``) are the same on every rank.

    ``release()`` drops every reference the library holds; ``async with`` releases on exit.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        plan: DistributedPlan,
        local: LoadedModel,
        ranks: tuple[RankSummary, ...],
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.plan = plan
        self.stage = plan.stage(rank)
        self.local = local
        self.ranks = ranks

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.local.tensors

    @property
    def device_map(self) -> dict[str, str]:
        return self.local.device_map

    def release(self) -> None:
        """Drop every tensor reference the library holds (idempotent)."""
        self.local.release()

    async def __aenter__(self) -> DistributedModel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"DistributedModel(rank={self.rank}/{self.world_size}, "
            f"layers {self.stage.describe_layers()}, {len(self.tensors)} tensors)"
        )


def _summary(stage: Stage, model: LoadedModel) -> RankSummary:
    report = model.report
    return RankSummary(
        rank=stage.rank,
        host=stage.host,
        start=stage.start,
        stop=stage.stop,
        parts=stage.parts,
        tied_sources=stage.tied_sources,
        layer_devices=model.plan.layer_devices,
        devices=report.devices,
        nbytes=report.nbytes,
        stored_bytes=model.spec.stored_bytes,
        tensors=len(model.tensors),
        seconds=report.seconds,
        replans=report.replans,
    )


# --------------------------------------------------------------------------------------------
# The control channel: object collectives in worker threads, each with a bounded wait


class _Channel:
    """Object collectives over a gloo group, run in worker threads with bounded waits.

    A wait that outlives ``timeout`` + a grace, or is cancelled, is abandoned (the thread ends
    when the group's own timeout fires, or completes the exchange if the peers arrive in
    time); the group is then left alone rather than destroyed under that thread.
    """

    def __init__(self, group: dist.ProcessGroup, *, owned: bool, timeout: float, host: str) -> None:
        self.group = group
        self.owned = owned
        self.timeout = timeout
        self.host = host
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.root = dist.get_process_group_ranks(group)[0]
        self.abandoned = False

    @classmethod
    async def open(cls, group: dist.ProcessGroup | None, peer_timeout: float) -> _Channel:
        host = socket.gethostname()
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError(
                "torch.distributed is not initialised: call dist.init_process_group() first "
                "(torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
            )
        if group is not None:
            return cls(group, owned=False, timeout=peer_timeout, host=host)
        rank = dist.get_rank()
        made = await _bounded(
            lambda: dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=peer_timeout)
            ),
            peer_timeout,
            on_timeout=lambda: CollectiveError(
                "making the load's gloo group", _late(peer_timeout), rank=rank, host=host
            ),
            on_error=lambda exc: CollectiveError(
                "making the load's gloo group", _first_line(exc), rank=rank, host=host
            ),
        )
        assert isinstance(made, dist.ProcessGroup)
        return cls(made, owned=True, timeout=peer_timeout, host=host)

    async def all_gather(self, exchange: str, item: T) -> list[T]:
        def run() -> list[T]:
            out: list[Any] = [None] * self.world
            dist.all_gather_object(out, item, group=self.group)
            return out

        return await self._run(exchange, run)

    async def broadcast(self, exchange: str, item: T | None) -> T:
        def run() -> T:
            box: list[Any] = [item]
            dist.broadcast_object_list(box, src=self.root, group=self.group)
            result: T = box[0]
            return result

        return await self._run(exchange, run)

    async def _run(self, exchange: str, fn: Callable[[], T]) -> T:
        finished = threading.Event()

        def run() -> T:
            try:
                return fn()
            finally:
                finished.set()

        try:
            return await self._wait(exchange, run)
        finally:
            # A wait given up (timeout, cancellation) leaves the thread inside the collective.
            self.abandoned = self.abandoned or not finished.is_set()

    async def _wait(self, exchange: str, fn: Callable[[], T]) -> T:
        return await _bounded(
            fn,
            self.timeout,
            on_timeout=lambda: CollectiveError(
                exchange, _late(self.timeout), rank=self.rank, host=self.host
            ),
            on_error=lambda exc: CollectiveError(
                exchange,
                f"{_first_line(exc)} (a peer failed, left, or did not answer)",
                rank=self.rank,
                host=self.host,
            ),
        )

    async def close(self) -> None:
        """Destroy the group this channel made (never one the caller passed in)."""
        if not self.owned or self.abandoned:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(_GRACE):
            await anyio.to_thread.run_sync(
                dist.destroy_process_group, self.group, abandon_on_cancel=True
            )


async def _bounded(
    fn: Callable[[], T],
    seconds: float,
    *,
    on_timeout: Callable[[], DistributedError],
    on_error: Callable[[Exception], DistributedError],
) -> T:
    """Run blocking ``fn`` in a worker thread; give up waiting after ``seconds`` + a grace."""
    try:
        with anyio.fail_after(seconds + _GRACE):
            return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)
    except TimeoutError:
        raise on_timeout() from None
    except (RuntimeError, ValueError, OSError) as exc:  # gloo and the store raise these
        raise on_error(exc) from exc


def _late(timeout: float) -> str:
    return f"no answer within {timeout:g} s (a peer died, hung, or is still busy)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else exc!r}"


# --------------------------------------------------------------------------------------------
# The load


@dataclass(frozen=True, slots=True)
class _Survey:
    """What a rank sends before the split: its capacities, or why it cannot take part."""

    rank: int
    host: str
    capacity: RankCapacity | None
    checkpoint: str
    settings: Mapping[str, str]
    failure: _Failure | None


@dataclass(frozen=True, slots=True)
class _Local:
    """What only this rank keeps from the survey."""

    survey: _Survey
    spec: ModelSpec | None


async def load_distributed(
    path: str | Path,
    params: LoadParams | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    on_event: DistributedEventCallback | None = None,
    peer_timeout: float = DEFAULT_TIMEOUT,
) -> DistributedModel:
    """Load this rank's stage of the checkpoint at ``path`` (see the module docstring).

    Every rank of the (initialised) default process group calls it with the same ``path`` and
    ``params``, apart from ``params.devices``: the rank's own devices. ``group``: a process
    group over the ranks taking part, able to exchange Python objects (gloo, or NCCL with the
    current CUDA device set); by default a gloo group over all ranks is made for the load,
    with ``peer_timeout`` (seconds) as its collectives' timeout. ``peer_timeout`` bounds every
    wait for the other ranks, the wait for the slowest rank to finish loading included: set it
    above the largest difference in load time between ranks. A dead peer is noticed at once
    (its sockets close).

    ``on_event`` receives ``StageAssigned``, then the engine's events for this rank's load.

    Cancellation: the local load releases everything it placed, the rank tries for a few
    seconds (shielded) to tell the others, so that they fail with a ``RankFailedError``
    instead of waiting out ``peer_timeout``, and the cancellation propagates. Failure anywhere:
    every rank releases what it placed and raises the same ``RankFailedError``, or a
    ``CollectiveError`` when a peer is gone or silent.
    """
    params = params or LoadParams()
    channel = await _Channel.open(group, peer_timeout)
    try:
        with structlog.contextvars.bound_contextvars(rank=channel.rank):
            return await _run(channel, Path(path), params, on_event)
    finally:
        await channel.close()


async def _run(
    channel: _Channel, path: Path, params: LoadParams, on_event: DistributedEventCallback | None
) -> DistributedModel:
    local = await anyio.to_thread.run_sync(_survey, path, params, channel.rank, channel.host)
    surveys = await channel.all_gather("the exchange of capacities", local.survey)
    _agree(surveys)
    plan = await _agree_on_plan(channel, local, surveys, params)
    assert local.spec is not None  # every rank surveyed successfully (else _agree raised)
    stage = plan.stage(channel.rank)
    _log_stage(stage)
    model, outcome = await _load_stage(channel, path, params, local.spec, plan, on_event)
    try:
        outcomes = await channel.all_gather("the exchange of outcomes", outcome)
        failures = [o for o in outcomes if isinstance(o, _Failure)]
        if failures:
            raise failures[0].error()
    except BaseException:
        if model is not None:
            model.release()
        raise
    assert model is not None
    summaries = tuple(o for o in outcomes if isinstance(o, RankSummary))
    return DistributedModel(channel.rank, channel.world, plan, model, summaries)


def _survey(path: Path, params: LoadParams, rank: int, host: str) -> _Local:
    """Read the headers, probe the devices (blocking: runs in a worker thread)."""
    settings = _settings(params)
    phase = "reading the checkpoint's headers"
    try:
        spec = inspect(path, target_dtype=params.target_code)
        phase = "probing its devices"
        devices = resolve_devices(params.devices)
        caps = tuple(capacities(devices, params))
    except Exception as exc:  # every rank must hear of it, whatever it is
        failure = _Failure.of(exc, rank=rank, host=host, phase=phase)
        return _Local(_Survey(rank, host, None, "", settings, failure), None)
    capacity = RankCapacity(rank, host, caps)
    return _Local(_Survey(rank, host, capacity, _fingerprint(spec), settings, None), spec)


def _fingerprint(spec: ModelSpec) -> str:
    """A digest of every tensor's name, dtype and shape, and of the config."""
    digest = hashlib.sha256(json.dumps(spec.config, sort_keys=True, default=str).encode())
    for name, entry in spec.checkpoint.tensors.items():
        digest.update(f"{name}|{entry.dtype}|{entry.shape}\n".encode())
    return digest.hexdigest()


def _settings(params: LoadParams) -> dict[str, str]:
    """The parameters every rank must share (all but its devices), as text."""
    return {
        field.name: repr(getattr(params, field.name))
        for field in dataclasses.fields(params)
        if field.name != "devices"
    }


def _agree(surveys: Sequence[_Survey]) -> None:
    """Raise the same error on every rank if any rank failed or disagrees with rank 0."""
    for survey in surveys:
        if survey.failure is not None:
            raise survey.failure.error()
    first = surveys[0]
    for survey in surveys[1:]:
        if survey.checkpoint != first.checkpoint:
            problem = "its checkpoint differs from rank 0's (other tensors, shapes or config)"
        elif survey.settings != first.settings:
            keys = [k for k in first.settings if survey.settings.get(k) != first.settings[k]]
            problem = f"its load parameters differ from rank 0's: {', '.join(keys)}"
        else:
            continue
        raise RankFailedError(
            problem, rank=survey.rank, host=survey.host, phase="agreeing on the load"
        )


async def _agree_on_plan(
    channel: _Channel, local: _Local, surveys: Sequence[_Survey], params: LoadParams
) -> DistributedPlan:
    """Rank 0 splits; every rank receives the same plan or the same failure."""
    result: DistributedPlan | _Failure | None = None
    if channel.rank == 0:
        assert local.spec is not None
        ranks = [survey.capacity for survey in surveys if survey.capacity is not None]
        result = await anyio.to_thread.run_sync(_split_or_failure, local.spec, ranks, params)
    received = await channel.broadcast("the broadcast of the plan", result)
    if isinstance(received, _Failure):
        raise received.error()
    assert isinstance(received, DistributedPlan)
    return received


def _split_or_failure(
    spec: ModelSpec, ranks: Sequence[RankCapacity], params: LoadParams
) -> DistributedPlan | _Failure:
    try:
        return split_stages(spec, ranks, params)
    except RankFailedError as exc:
        return _Failure(
            exc.rank or 0, exc.host or "", exc.phase, exc.problem, exc.device, exc.error_type
        )
    except Exception as exc:  # any other error must reach every rank, not only rank 0
        return _Failure.of(exc, rank=0, host=ranks[0].host, phase="splitting the model")


async def _load_stage(
    channel: _Channel,
    path: Path,
    params: LoadParams,
    spec: ModelSpec,
    plan: DistributedPlan,
    on_event: DistributedEventCallback | None,
) -> tuple[LoadedModel | None, RankSummary | _Failure]:
    """Load the stage locally; a failure becomes this rank's outcome (the model is ``None``)."""
    stage = plan.stage(channel.rank)
    if stage.cpu_memory_bytes is not None:
        params = dataclasses.replace(params, cpu_memory_bytes=stage.cpu_memory_bytes)
    layers = _layers_text(stage.start, stage.stop)
    phase = f"loading {layers} (numbered from 0 within the stage: 0 is layer {stage.start})"
    try:
        await _deliver(on_event, StageAssigned(plan, stage))
        model = await load(path, params, on_event=on_event, spec=stage_spec(spec, stage))
    except anyio.get_cancelled_exc_class():
        cancelled = _Failure(channel.rank, channel.host, phase, "cancelled", None, "Cancelled")
        shield = anyio.CancelScope(shield=True)
        with shield, anyio.move_on_after(_GRACE), contextlib.suppress(DistributedError):
            await channel.all_gather("the exchange of outcomes", cancelled)
        raise
    except Exception as exc:
        return None, _Failure.of(exc, rank=channel.rank, host=channel.host, phase=phase)
    return model, _summary(stage, model)


def _log_stage(stage: Stage) -> None:
    logger.info(
        "stage_assigned",
        first_layer=stage.start,
        stop=stage.stop,
        parts=list(stage.parts),
        tied_sources=list(stage.tied_sources),
        layer_devices=list(stage.plan.layer_devices),
    )


async def _deliver(callback: DistributedEventCallback | None, event: StageAssigned) -> None:
    if callback is None:
        return
    result = callback(event)
    if pyinspect.isawaitable(result):
        await result


# --------------------------------------------------------------------------------------------
# The command: torchrun --nproc-per-node N -m streamload.distributed load PATH ...


class _Progress:
    """One line per placed layer or part on stdout, prefixed with the rank."""

    def __init__(self, rank: int, out: TextIO) -> None:
        self.rank = rank
        self.out = out
        self.start = 0

    def __call__(self, event: Event | StageAssigned) -> None:
        if isinstance(event, StageAssigned):
            self.start = event.stage.start
            stage = event.stage
            parts = ", ".join(stage.parts + stage.tied_sources) or "no parts"
            self.line(f"stage: {_layers_text(stage.start, stage.stop)}; {parts}")
        elif isinstance(event, LayerPlaced):
            what = event.part if event.layer is None else f"layer {self.start + event.layer}"
            self.line(
                f"{what} -> {event.device}  {format_bytes(event.nbytes)} "
                f"in {event.seconds:.3f} s, {format_bytes(event.free_after)} free after"
            )
        elif isinstance(event, Replanned):
            at = "" if event.at_layer is None else f" at layer {self.start + event.at_layer}"
            self.line(f"re-planned{at}: {event.device} {event.reason}")

    def line(self, text: str) -> None:
        print(f"[rank {self.rank}] {text}", file=self.out, flush=True)


def report_table(summaries: Sequence[RankSummary]) -> str:
    """The per-rank report rank 0 prints: one row per rank."""
    header = ("rank", "host", "layers", "parts", "devices", "bytes", "tensors", "s", "replans")
    rows = [header]
    for s in summaries:
        devices = ", ".join(f"{d.device}:{d.layers}" for d in s.devices)
        rows.append(
            (
                str(s.rank),
                s.host,
                _span(s.start, s.stop),
                ", ".join([*s.parts, *(f"{t} (tied)" for t in s.tied_sources)]) or "-",
                devices or "-",
                format_bytes(s.nbytes),
                str(s.tensors),
                f"{s.seconds:.2f}",
                str(len(s.replans)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m streamload.distributed",
        description="Load one pipeline stage of a checkpoint per rank (run under torchrun).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="load PATH across the ranks and report per rank")
    load.add_argument("path", type=Path)
    load.add_argument(
        "--device",
        action="append",
        type=arg_type(parse_device),
        help="a rank's device, in fill order: NAME=SIZE is a simulated GPU (sim:0=24GiB), a "
        "bare NAME a real one (cuda:1); default: cuda:LOCAL_RANK where CUDA is available",
    )
    load.add_argument("--all-local-gpus", action="store_true", help="one rank per node: every GPU")
    load.add_argument("--no-cpu", action="store_true", help="do not spill layers to the CPU")
    load.add_argument("--cpu-memory", type=arg_type(parse_size), help="host budget per rank")
    load.add_argument("--dtype", help="target dtype for floating tensors (bf16, fp16, ...)")
    load.add_argument("--max-seq-len", type=int, default=4096)
    load.add_argument("--max-batch-size", type=int, default=1)
    load.add_argument(
        "--peer-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for the other ranks at each exchange (default: %(default)s)",
    )
    load.add_argument("--backend", default="gloo", help="process-group backend (gloo, nccl)")
    load.add_argument("--json-logs", action="store_true", help="JSON log lines on stderr")
    return parser


def _devices(args: argparse.Namespace, local_rank: int) -> list[Any]:
    from streamload.testing import SimulatedGPU

    devices: list[Any] = []
    for arg in args.device or []:
        if arg.total_bytes is None:
            devices.append(arg.name)
        else:
            devices.append(SimulatedGPU(arg.name, total_bytes=arg.total_bytes))
    if not devices and torch.cuda.is_available():
        if args.all_local_gpus:
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        else:
            devices = [f"cuda:{local_rank}"]
    if not args.no_cpu:
        devices.append("cpu")
    return devices


def main(argv: Sequence[str] | None = None) -> int:
    """``load PATH``: join the process group (from torchrun's environment), load this rank's
    stage, print a line per placed layer or part (prefixed with the rank) and, on rank 0, the
    per-rank report. ``--json-logs``: the events as JSON lines on stderr (each with its
    ``rank``) instead of the progress lines, and the report as one JSON object.

    Exit status: 0 on success; 2 for a bad argument or any ``StreamloadError``, the same one
    line on every rank's stderr when a rank failed; 130 when interrupted."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        return _fail(rank, str(exc))
    try:
        params = LoadParams(
            devices=_devices(args, int(os.environ.get("LOCAL_RANK", "0"))),
            dtype=args.dtype,
            max_seq_len=args.max_seq_len,
            max_batch_size=args.max_batch_size,
            cpu_memory_bytes=args.cpu_memory,
        )
        joined = _join(args.backend, args.peer_timeout)
    except (ValueError, StreamloadError) as exc:
        return _fail(rank, str(exc))
    rank = dist.get_rank()
    progress = None if args.json_logs else _Progress(rank, sys.stdout)
    try:
        with configured_logging(args.json_logs):
            model = anyio.run(_cli_load, args.path, params, progress, args.peer_timeout)
    except StreamloadError as exc:
        return _fail(rank, str(exc))
    except KeyboardInterrupt:
        return 130
    try:
        if rank == 0:
            if args.json_logs:
                data = {"plan": model.plan.to_dict(), "ranks": [s.to_dict() for s in model.ranks]}
                print(json.dumps(data), flush=True)
            else:
                print(report_table(model.ranks), flush=True)
    finally:
        model.release()
        if joined:
            dist.destroy_process_group()
    return 0


async def _cli_load(
    path: Path, params: LoadParams, progress: _Progress | None, peer_timeout: float
) -> DistributedModel:
    return await load_distributed(path, params, on_event=progress, peer_timeout=peer_timeout)


def _join(backend: str, timeout: float) -> bool:
    """Initialise the default process group from the environment; ``True`` if this call did."""
    if dist.is_initialized():
        return False
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise ValueError(f"run under torchrun: {', '.join(missing)} not set")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return True


def _fail(rank: int, message: str) -> int:
    print(f"streamload.distributed: error: [rank {rank}] {message}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
