"""The planner's values: what it is given (``DeviceCapacity``) and what it returns (``DevicePlan``
rows and the ``Plan``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DeviceCapacity", "DevicePlan", "Plan"]

_MIB = 2**20


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
    """One device's row of the plan: what it holds and what that costs.

    ``weight_bytes`` are the weights charged to the device's memory (the non-mapped parts
    included on the primary; on the CPU under ``cpu_policy="mmap"`` only bytes that need a dtype
    conversion, the rest being ``mmap_bytes``). ``capacity_bytes`` is the budget base before
    ``reserve_bytes``: free memory (GPU) or the host budget (CPU); in a re-plan, live free
    memory plus ``loaded_bytes``, the weights of this model already allocated there (the CPU
    with ``cpu_memory_bytes`` set keeps that budget), so that ``need_bytes <= capacity_bytes``
    reads the same in both. ``scratch_bytes`` is the conversion scratch a load takes on a GPU
    it places anything on (``planner.conversion_scratch``): with the weights, every byte a load
    allocates there. ``note`` says why a device holds no (further) layers.
    """

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
    mmap_bytes: int = 0
    loaded_bytes: int = 0
    scratch_bytes: int = 0

    @property
    def need_bytes(self) -> int:
        return (
            self.weight_bytes
            + self.kv_bytes
            + self.activation_bytes
            + self.scratch_bytes
            + self.reserve_bytes
        )

    @property
    def load_bytes(self) -> int:
        """What a load allocates on this device: its weights and conversion scratch."""
        return self.weight_bytes + self.scratch_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.capacity_bytes - self.need_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``need_bytes`` and ``headroom_bytes`` included for readers."""
        return {
            "device": self.device,
            "is_gpu": self.is_gpu,
            "layers": list(self.layers),
            "holds_non_mapped": self.holds_non_mapped,
            "weight_bytes": self.weight_bytes,
            "kv_bytes": self.kv_bytes,
            "activation_bytes": self.activation_bytes,
            "scratch_bytes": self.scratch_bytes,
            "reserve_bytes": self.reserve_bytes,
            "capacity_bytes": self.capacity_bytes,
            "need_bytes": self.need_bytes,
            "headroom_bytes": self.headroom_bytes,
            "note": self.note,
            "mmap_bytes": self.mmap_bytes,
            "loaded_bytes": self.loaded_bytes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DevicePlan:
        """Inverse of ``to_dict`` (derived keys are ignored)."""
        return cls(
            device=str(data["device"]),
            is_gpu=bool(data["is_gpu"]),
            layers=tuple(int(i) for i in data["layers"]),
            holds_non_mapped=bool(data["holds_non_mapped"]),
            weight_bytes=int(data["weight_bytes"]),
            kv_bytes=int(data["kv_bytes"]),
            activation_bytes=int(data["activation_bytes"]),
            reserve_bytes=int(data["reserve_bytes"]),
            capacity_bytes=int(data["capacity_bytes"]),
            note=None if data.get("note") is None else str(data["note"]),
            mmap_bytes=int(data.get("mmap_bytes", 0)),
            loaded_bytes=int(data.get("loaded_bytes", 0)),
            scratch_bytes=int(data.get("scratch_bytes", 0)),
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """The device map actually used.

    ``layer_devices[i]`` is layer i's device; ``primary`` holds the non-mapped parts;
    ``layer_kv_bytes[i]`` the KV cache budgeted for layer i (in ``kv_cache_dtype``);
    ``paged_blocks`` the paged pool's block count per layer (``None`` when not paged).
    ``loaded_layers`` is how many leading layers were already loaded when this plan was made
    (0 for ``plan``, ``placed`` for ``replan``). ``max_seq_len`` is the sequence length the KV
    cache and activations are sized for: ``LoadParams.max_seq_len``, held to the model's
    ``max_position_embeddings``.
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
    loaded_layers: int = 0
    max_seq_len: int = 0

    def device(self, name: str) -> DevicePlan:
        for row in self.devices:
            if row.device == name:
                return row
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (plain str/int/bool/None/list/dict)."""
        return {
            "layer_devices": list(self.layer_devices),
            "primary": self.primary,
            "paged_attention": self.paged_attention,
            "paged_attention_reason": self.paged_attention_reason,
            "devices": [row.to_dict() for row in self.devices],
            "layer_kv_bytes": list(self.layer_kv_bytes),
            "kv_cache_dtype": self.kv_cache_dtype,
            "paged_blocks": self.paged_blocks,
            "cpu_policy": self.cpu_policy,
            "loaded_layers": self.loaded_layers,
            "max_seq_len": self.max_seq_len,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of ``to_dict``: ``Plan.from_dict(p.to_dict()) == p``."""
        reason = data.get("paged_attention_reason")
        blocks = data.get("paged_blocks")
        return cls(
            layer_devices=tuple(str(d) for d in data["layer_devices"]),
            primary=str(data["primary"]),
            paged_attention=bool(data["paged_attention"]),
            paged_attention_reason=None if reason is None else str(reason),
            devices=tuple(DevicePlan.from_dict(row) for row in data["devices"]),
            layer_kv_bytes=tuple(int(b) for b in data["layer_kv_bytes"]),
            kv_cache_dtype=str(data["kv_cache_dtype"]),
            paged_blocks=None if blocks is None else int(blocks),
            cpu_policy=str(data["cpu_policy"]),
            loaded_layers=int(data.get("loaded_layers", 0)),
            max_seq_len=int(data.get("max_seq_len", 0)),
        )
