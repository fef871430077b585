"""What a distributed load delivers: the ``StageAssigned`` event, each rank's ``RankSummary``,
and this rank's ``DistributedModel``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch

from streamload.distributed._stages import DistributedPlan, Stage, placement_fields
from streamload.distributed._tp import Shard
from streamload.engine._loaded import LoadedModel, Releasable
from streamload.events import DeviceReport, Event, Replanned

__all__ = ["DistributedEventCallback", "DistributedModel", "RankSummary", "StageAssigned"]


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
    ``replans`` the rank's ``Replanned`` events (stage-local layer numbers). ``tp_rank`` /
    ``tp_size``: the rank's place among its stage's ranks; ``stored_bytes`` the bytes of its
    tensors (its slices) as stored, ``read_bytes`` what it read from storage for them (more
    where a strided slice reads through other ranks' bytes, less for memory-mapped tensors),
    ``nbytes`` what it placed.
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
    read_bytes: int = 0
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def gb_per_s(self) -> float:
        return self.stored_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            **placement_fields(self),
            "layer_devices": list(self.layer_devices),
            "devices": [
                {"device": d.device, "nbytes": d.nbytes, "layers": d.layers, "seconds": d.seconds}
                for d in self.devices
            ],
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "nbytes": self.nbytes,
            "stored_bytes": self.stored_bytes,
            "read_bytes": self.read_bytes,
            "tensors": self.tensors,
            "seconds": self.seconds,
            "gb_per_s": self.gb_per_s,
            "replans": [
                {"device": r.device, "reason": r.reason, "at_layer": r.at_layer}
                for r in self.replans
            ],
        }


class DistributedModel(Releasable):
    """This rank's part of a distributed load.

    ``tensors`` (checkpoint names, each on its device), ``device_map`` (Hugging Face form, this
    stage's modules only) and ``local`` (the engine's ``LoadedModel``: stage-local ``plan`` and
    ``report``) describe this rank; ``plan`` (every stage) and ``ranks`` (every rank's
    ``RankSummary``) are the same on every rank. ``shards[name]`` says what this rank holds of
    each tensor: ``Shard(dim, index, count)``, part ``index`` of ``count`` along ``dim``, or
    ``Shard(None, 0, 1)`` for a whole tensor (a tied head shares its source's split).

    ``release()`` drops every reference the library holds; ``async with`` releases on exit.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        plan: DistributedPlan,
        local: LoadedModel,
        ranks: tuple[RankSummary, ...],
        shards: dict[str, Shard] | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.plan = plan
        self.stage = plan.stage(rank)
        self.local = local
        self.ranks = ranks
        self.shards = shards if shards is not None else {}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.local.tensors

    @property
    def device_map(self) -> dict[str, str]:
        return self.local.device_map

    def release(self) -> None:
        """Drop every tensor reference the library holds (idempotent)."""
        self.local.release()
        self.shards.clear()

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
        read_bytes=model.read_bytes,
        tp_rank=stage.tp_rank,
        tp_size=stage.tp_size,
    )
