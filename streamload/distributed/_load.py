"""The load across ranks: survey (collective), split (rank 0, broadcast), the local load of
this rank's stage, and the exchange of outcomes (see the ``streamload.distributed`` docstring)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect as pyinspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import structlog
import torch.distributed as dist

from streamload._api import resolve_source, spec_of
from streamload.devices import Device, capacities, resolve_devices
from streamload.distributed._channel import _GRACE, DEFAULT_TIMEOUT, _Channel
from streamload.distributed._failure import _Failure
from streamload.distributed._results import (
    DistributedEventCallback,
    DistributedModel,
    RankSummary,
    StageAssigned,
    _summary,
)
from streamload.distributed._stages import (
    DistributedPlan,
    RankCapacity,
    Stage,
    _layers_text,
    split_stages,
    stage_spec,
)
from streamload.distributed._tp import NO_EXPERT_PLAN, TensorParallel, resolve_tp
from streamload.engine import LoadedModel, load
from streamload.errors import DistributedError, RankFailedError
from streamload.events import ExpertsReplicated, emit
from streamload.model import ModelSpec
from streamload.params import LoadParams

__all__ = ["load_distributed"]

logger = structlog.get_logger("streamload")


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
    gpu: Device | None = None  # the rank's first GPU: collectives run with it current


async def load_distributed(
    path: str | Path,
    params: LoadParams | None = None,
    *,
    tensor_parallel_size: int = 1,
    tp_plan: Mapping[str, str] | None = None,
    group: dist.ProcessGroup | None = None,
    on_event: DistributedEventCallback | None = None,
    peer_timeout: float = DEFAULT_TIMEOUT,
) -> DistributedModel:
    """Load this rank's stage of the checkpoint at ``path`` (see the module docstring).

    ``path``: a local checkpoint, a hub repo id or an object-store URL, as for
    ``streamload.load``. Every rank of the (initialised) default process group calls it with
    the same ``path``, ``params``, ``tensor_parallel_size`` and ``tp_plan``, apart from
    ``params.devices``: the rank's own devices.

    ``tensor_parallel_size``: the ranks form pipeline stages of that many consecutive ranks
    each; within a stage, each rank loads its part of every tensor ``tp_plan`` splits
    (module-name globs -> ``"colwise"``, ``"rowwise"``, ``"vocab"``, ``"replicate"``; by
    default the model's plan, see ``streamload.distributed._tp``), reading only that part's
    bytes where the layout allows, and the whole of every other tensor. A plan that cannot
    split is a ``PlanError`` naming the tensor, raised on every rank before any tensor byte is
    read. ``DistributedModel.shards`` says what each loaded tensor is a part of.

    ``group``: a process
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
    tp = _TpRequest(tensor_parallel_size, None if tp_plan is None else dict(tp_plan))
    channel = await _Channel.open(group, peer_timeout)
    try:
        with structlog.contextvars.bound_contextvars(rank=channel.rank):
            return await _run(channel, path, params, tp, on_event)
    finally:
        await channel.close()


@dataclass(frozen=True, slots=True)
class _TpRequest:
    """What the caller asked of tensor parallelism (every rank must ask the same)."""

    size: int
    plan: dict[str, str] | None


async def _run(
    channel: _Channel,
    path: str | Path,
    params: LoadParams,
    request: _TpRequest,
    on_event: DistributedEventCallback | None,
) -> DistributedModel:
    local = await anyio.to_thread.run_sync(
        _survey, path, params, request, channel.rank, channel.host
    )
    channel.device = local.gpu
    surveys = await channel.all_gather("the exchange of capacities", local.survey)
    _agree(surveys)
    assert local.spec is not None  # every rank surveyed successfully (else _agree raised)
    # Every rank agreed on the checkpoint and the request: each resolves the same split (or
    # raises the same PlanError) on its own, before any tensor byte is read.
    tp = resolve_tp(local.spec, request.size, request.plan)
    await _deliver_replicated(on_event, tp, path)
    plan = await _agree_on_plan(channel, local, surveys, params, tp)
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
    shards = {name: plan.tensor_parallel.shard(name, stage.tp_rank) for name in model.tensors}
    return DistributedModel(channel.rank, channel.world, plan, model, summaries, shards)


def _survey(
    path: str | Path, params: LoadParams, request: _TpRequest, rank: int, host: str
) -> _Local:
    """Read the headers, probe the devices (blocking: runs in a worker thread)."""
    settings = _settings(params, request)
    phase = "reading the checkpoint's headers"
    try:
        spec = spec_of(resolve_source(path, params), params.target_code)
        phase = "probing its devices"
        devices = resolve_devices(params.devices)
        for device in devices:
            device.prepare()  # a GPU's context takes memory: before its capacity is read
        caps = tuple(capacities(devices, caps=params.memory_caps))
    except Exception as exc:  # every rank must hear of it, whatever it is
        failure = _Failure.of(exc, rank=rank, host=host, phase=phase)
        return _Local(_Survey(rank, host, None, "", settings, failure), None)
    capacity = RankCapacity(rank, host, caps)
    gpu = next((device for device in devices if device.is_gpu), None)
    return _Local(_Survey(rank, host, capacity, _fingerprint(spec), settings, None), spec, gpu)


def _fingerprint(spec: ModelSpec) -> str:
    """A digest of every tensor's name, dtype and shape, and of the config."""
    digest = hashlib.sha256(json.dumps(spec.config, sort_keys=True, default=str).encode())
    for name, entry in spec.checkpoint.tensors.items():
        digest.update(f"{name}|{entry.dtype}|{entry.shape}\n".encode())
    return digest.hexdigest()


def _settings(params: LoadParams, request: _TpRequest) -> dict[str, str]:
    """The parameters every rank must share (all but its devices), as text."""
    settings = {
        field.name: repr(getattr(params, field.name))
        for field in dataclasses.fields(params)
        if field.name != "devices"
    }
    if request.size != 1 or request.plan is not None:
        settings["tensor_parallel_size"] = repr(request.size)
        settings["tp_plan"] = repr(request.plan)
    return settings


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
    channel: _Channel,
    local: _Local,
    surveys: Sequence[_Survey],
    params: LoadParams,
    tp: TensorParallel,
) -> DistributedPlan:
    """Rank 0 splits; every rank receives the same plan or the same failure."""
    result: DistributedPlan | _Failure | None = None
    if channel.rank == 0:
        assert local.spec is not None
        ranks = [survey.capacity for survey in surveys if survey.capacity is not None]
        result = await anyio.to_thread.run_sync(_split_or_failure, local.spec, ranks, params, tp)
    received = await channel.broadcast("the broadcast of the plan", result)
    if isinstance(received, _Failure):
        raise received.error()
    assert isinstance(received, DistributedPlan)
    return received


def _split_or_failure(
    spec: ModelSpec, ranks: Sequence[RankCapacity], params: LoadParams, tp: TensorParallel
) -> DistributedPlan | _Failure:
    try:
        return split_stages(spec, ranks, params, tensor_parallel=tp)
    except RankFailedError as exc:
        return _Failure(
            exc.rank or 0, exc.host or "", exc.phase, exc.problem, exc.device, exc.error_type
        )
    except Exception as exc:  # any other error must reach every rank, not only rank 0
        return _Failure.of(exc, rank=0, host=ranks[0].host, phase="splitting the model")


async def _load_stage(
    channel: _Channel,
    path: str | Path,
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
        sub = stage_spec(spec, stage, plan.tensor_parallel)
        model = await load(path, params, on_event=on_event, spec=sub)
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
        tp_rank=stage.tp_rank,
        tp_size=stage.tp_size,
        first_layer=stage.start,
        stop=stage.stop,
        parts=list(stage.parts),
        tied_sources=list(stage.tied_sources),
        layer_devices=list(stage.plan.layer_devices),
    )


async def _deliver_replicated(
    callback: DistributedEventCallback | None, tp: TensorParallel, path: str | Path
) -> None:
    """Warn (an ``ExpertsReplicated`` event) of experts every rank of a stage holds whole."""
    experts = tuple(name for name, why in tp.replicated if why == NO_EXPERT_PLAN)
    if experts:
        await emit(ExpertsReplicated(experts, NO_EXPERT_PLAN, tp.size, str(path)), callback)


async def _deliver(callback: DistributedEventCallback | None, event: StageAssigned) -> None:
    if callback is None:
        return
    result = callback(event)
    if pyinspect.isawaitable(result):
        await result
