"""The automatic device map: a pure function from a model spec and device capacities to a plan.

Descends from mistral.rs's ``get_device_layers`` (fill devices in order; the first also holds the
non-mapped parts; each layer costs weights + KV; the rest goes to the CPU; paged attention that
needs the CPU falls back to non-paged sizing), with the faults listed in DESIGN §4 fixed.
The planner never probes hardware: capacities are passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streamload.model import ModelSpec
from streamload.params import LoadParams

__all__ = ["DeviceCapacity", "DevicePlan", "Plan", "plan", "replan"]


@dataclass(frozen=True, slots=True)
class DeviceCapacity:
    """A device as the planner sees it: a name, whether it is a GPU, total and free bytes now.

    For the CPU, ``free_bytes`` is the host's available memory (the planner subtracts
    ``params.host_reserve_bytes``); for GPUs, live free memory (the planner subtracts
    ``params.reserve_for(total_bytes)``).
    """

    name: str
    is_gpu: bool
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """One device's row of the plan: what it holds and what that costs."""

    device: str
    is_gpu: bool
    layers: tuple[int, ...]
    holds_non_mapped: bool
    weight_bytes: int
    kv_bytes: int
    activation_bytes: int
    reserve_bytes: int
    capacity_bytes: int
    note: str | None = None

    @property
    def need_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.capacity_bytes - self.need_bytes


@dataclass(frozen=True, slots=True)
class Plan:
    """The device map actually used.

    ``layer_devices[i]`` is layer i's device; ``primary`` holds the non-mapped parts;
    ``layer_kv_bytes[i]`` the KV cache budgeted for layer i (in ``kv_cache_dtype``);
    ``paged_blocks`` the paged pool's block count per layer (``None`` when not paged).
    """

    layer_devices: tuple[str, ...]
    primary: str
    paged_attention: bool
    paged_attention_reason: str | None
    devices: tuple[DevicePlan, ...]
    layer_kv_bytes: tuple[int, ...]
    kv_cache_dtype: str
    paged_blocks: int | None
    cpu_policy: str

    def device(self, name: str) -> DevicePlan:
        for row in self.devices:
            if row.device == name:
                return row
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (plain str/int/bool/None/list/dict)."""
        raise NotImplementedError


def plan(spec: ModelSpec, capacities: Sequence[DeviceCapacity], params: LoadParams) -> Plan:
    """Place every layer; ``DoesNotFitError`` (per-device breakdown) if impossible."""
    raise NotImplementedError


def replan(
    spec: ModelSpec,
    previous: Plan,
    *,
    placed: int,
    capacities: Sequence[DeviceCapacity],
    params: LoadParams,
) -> Plan:
    """Re-place layers ``placed..`` on live capacities; layers ``< placed`` and the non-mapped
    parts stay where ``previous`` put them (already loaded)."""
    raise NotImplementedError
