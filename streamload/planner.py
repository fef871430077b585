"""The automatic device map: a pure function from a model spec and device capacities to a plan.

Descends from mistral.rs's ``get_device_layers`` (fill devices in order; the first also holds the
non-mapped parts; each layer costs weights + KV; the rest goes to the CPU; paged attention that
needs the CPU falls back to non-paged sizing), with the faults listed in DESIGN §4 fixed.
The planner never probes hardware: capacities are passed in.

Devices
    ``capacities`` are filled in the order given. The first is the *primary*: it holds the
    non-mapped parts. At most one non-GPU device (the CPU) may appear, and only last; anything
    else (a CPU in the middle, two CPUs, repeated names, an empty list, negative bytes) is a
    caller bug and raises ``ValueError`` before any planning.

Budgets (what a device may spend on this model)
    GPU: ``free_bytes`` minus ``params.reserve_for(total_bytes)`` (a fraction of the *total*,
    with a minimum). CPU: ``params.cpu_memory_bytes`` if set, else ``free_bytes``, minus
    ``params.host_reserve_bytes``. A row's ``capacity_bytes`` is that base before the reserve,
    and every row satisfies ``need_bytes <= capacity_bytes``. A device that ends up holding
    nothing is charged nothing, reserve included.

Costs
    Weights are the spec's sizes in the target dtype (``LayerSpec.nbytes``, ``PartSpec.nbytes``).
    On the CPU with ``cpu_policy="mmap"`` only ``converted_bytes`` are charged (the rest is
    memory-mapped from the checkpoint and reported as ``DevicePlan.mmap_bytes``); the policy
    applies to the non-mapped parts too when the CPU is the primary. KV cache and activations
    always count, on every device.

    KV per layer, in the cache dtype (``PagedAttention.cache_dtype`` when paged and set, else
    ``spec.activation_dtype``; sizes from ``checkpoint.DTYPE_SIZES``):

    - non-paged: ``kv_elems_per_token x max_batch_size x min(max_seq_len, sliding_window)``;
    - paged: ``kv_elems_per_token x blocks x block_size``. The pool is shared by every sequence
      and one block table indexes all layers, so a sliding window does not shrink it (the
      window caps each sequence's live tokens, not the pool).

    Activations come from ``model.activation_bytes`` (or the ``activations=`` override): the
    primary is charged ``max(mapped, non_mapped)`` whether or not it holds layers; every other
    device ``mapped`` if it holds at least one layer, else nothing.

Placement
    The primary must hold the non-mapped parts + its activations within its budget, else
    ``DoesNotFitError`` saying so. Then each device in order takes the longest run of the next
    layers that fits (greedy prefix; layers are contiguous per device and devices are used in
    order). A device that fits zero layers gets zero layers and a ``note`` with the reason
    (there is no seed-style ordinal shuffle and no "everything fits" shortcut: the greedy gives
    the same answer). Layers left after the last device raise ``DoesNotFitError`` listing every
    device's capacity and need (and, for the CPU, the host budget).

    Invariant (tested): the number of layers placed on GPUs is the end of a greedy prefix fill,
    and each device's end index is non-decreasing both in where it starts and in its budget.
    Hence, for any layer sizes, raising one GPU's ``free_bytes`` (its ``total_bytes``
    unchanged) never decreases the number of layers on GPUs and never turns a plan that fits
    into one that does not; when both plans use the same KV sizing (the paged fallback can
    switch it), every earlier device keeps its layers and the raised one holds at least as
    many. (Raising ``total_bytes`` can *lower* the budget: the reserve is a fraction of it.)

Paged attention (``params.paged_attention``), mirroring mistral.rs's memory modes
    The paged cache does not run on the CPU, so the paged plan fills the GPUs only. If layers
    are left over and a CPU is listed (or the primary is the CPU), the planner plans again with
    non-paged KV sizing over all devices and records ``paged_attention=False`` with a
    ``paged_attention_reason`` naming the layers that would have gone to the CPU; the cache
    dtype then is the activation dtype (``cache_dtype`` is a paged-cache setting). Without a
    CPU, leftover layers are a ``DoesNotFitError`` under paged sizing: the fallback exists
    because paged attention cannot use the CPU, not as a general rescue. Block counts:

    - ``memory=None``: ``ContextSize(max_seq_len x max_batch_size)``;
    - ``ContextSize(tokens)``: ``ceil(tokens / block_size)`` blocks;
    - ``MbAmount(mib)``: one pool for all layers, ``floor(mib x 2**20 / (block_size x sum of
      per-token KV bytes over all layers))`` blocks; zero blocks is a ``PlanError`` (never a
      silent zero);
    - ``Utilization(f)``: each GPU may spend ``min(f x total, free - reserve)`` on weights,
      activations and KV. Layers are placed with the ``ContextSize`` default pool, then
      ``blocks = min`` over GPUs holding layers of ``floor((budget - weights - activations) /
      (block_size x per-token KV bytes of its layers))``. Because placement already reserved
      the default pool, the result is at least the default and never zero.

    ``MbAmount`` and ``Utilization`` on a model with no KV cache at all (encoder-only) are a
    ``PlanError``: there is nothing to size the pool by.

Re-plan (``replan``)
    See its docstring: placed layers and non-mapped parts never move; live capacities exclude
    already-loaded weights; KV and activations are not allocated yet and are charged again.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any

from streamload.checkpoint import DTYPE_SIZES
from streamload.errors import DeviceNeed, DoesNotFitError, PlanError, format_bytes
from streamload.model import Activations, ModelSpec, activation_bytes, layer_kv_bytes
from streamload.params import (
    ContextSize,
    LoadParams,
    PagedAttention,
    Utilization,
    dtype_code,
    parse_dtype,
)

__all__ = [
    "DeviceCapacity",
    "DevicePlan",
    "Plan",
    "estimate_activations",
    "plan",
    "replan",
]

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
    reads the same in both. ``note`` says why a device holds
    no (further) layers.
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

    @property
    def need_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + self.reserve_bytes

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
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """The device map actually used.

    ``layer_devices[i]`` is layer i's device; ``primary`` holds the non-mapped parts;
    ``layer_kv_bytes[i]`` the KV cache budgeted for layer i (in ``kv_cache_dtype``);
    ``paged_blocks`` the paged pool's block count per layer (``None`` when not paged).
    ``loaded_layers`` is how many leading layers were already loaded when this plan was made
    (0 for ``plan``, ``placed`` for ``replan``).
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
        )


# --------------------------------------------------------------------------------------------
# Public entry points


def plan(
    spec: ModelSpec,
    capacities: Sequence[DeviceCapacity],
    params: LoadParams,
    *,
    activations: Activations | None = None,
) -> Plan:
    """Place every layer; ``DoesNotFitError`` (per-device breakdown) if impossible.

    ``activations`` overrides the estimate from ``model.activation_bytes`` (for callers that
    measured their peak, and for tests). The rules are in the module docstring.
    """
    _check_capacities(capacities)
    acts = estimate_activations(spec, params) if activations is None else activations
    slots = tuple(
        _slot(spec, cap, params, primary=i == 0, loaded=(), already_loaded=False, eligible=True)
        for i, cap in enumerate(capacities)
    )
    return _solve(spec, slots, params, acts, start=0, paged=params.paged_attention, reason=None)


def replan(
    spec: ModelSpec,
    previous: Plan,
    *,
    placed: int,
    capacities: Sequence[DeviceCapacity],
    params: LoadParams,
    activations: Activations | None = None,
) -> Plan:
    """Re-place layers ``placed..`` on live capacities; layers ``< placed`` and the non-mapped
    parts stay where ``previous`` put them (already loaded).

    - ``capacities`` are live readings for every device of ``previous``, in the same order
      (else ``ValueError``). Weights already loaded are *not* in the live free bytes, so they
      are not subtracted again; each row's ``capacity_bytes`` is live free plus them (for the
      CPU with ``cpu_memory_bytes`` set: that budget, which the loaded weights count against).
    - KV caches and activations are not allocated yet: a device's room for new layers is live
      free - reserve - activations (if it is the primary or holds or will hold layers) - the KV
      of its already-placed layers. If those fixed charges alone no longer fit a device,
      ``DoesNotFitError`` names it.
    - Eligible for new layers: the device holding layer ``placed - 1`` (the primary when
      ``placed == 0``) and every device after it; earlier devices get nothing new.
    - Paged attention: if ``previous`` used it, the same mode is tried again (``Utilization``
      recomputes the block count on live numbers); if the new plan needs the CPU, it falls back
      to non-paged sizing for *all* layers, placed ones included. A plan that already fell back
      stays non-paged and keeps its reason.
    - ``params`` (and ``activations``) must be those ``previous`` was made with.
    - With live capacities equal to the ones ``previous`` was planned on minus the weights
      already loaded, the result equals ``previous`` except for ``loaded_layers`` and the rows'
      ``loaded_bytes`` and notes (tested).

    ``DoesNotFitError`` if the remaining layers fit nowhere.
    """
    _check_replan(spec, previous, placed, capacities)
    acts = estimate_activations(spec, params) if activations is None else activations
    names = [row.device for row in previous.devices]
    first = names.index(previous.layer_devices[placed - 1]) if placed else 0
    slots = tuple(
        _slot(
            spec,
            cap,
            params,
            primary=i == 0,
            loaded=tuple(j for j in range(placed) if previous.layer_devices[j] == cap.name),
            already_loaded=True,
            eligible=i >= first,
        )
        for i, cap in enumerate(capacities)
    )
    paged = params.paged_attention if previous.paged_attention else None
    return _solve(
        spec,
        slots,
        params,
        acts,
        start=placed,
        paged=paged,
        reason=previous.paged_attention_reason,
    )


# --------------------------------------------------------------------------------------------
# Input checks


def _check_capacities(capacities: Sequence[DeviceCapacity]) -> None:
    if not capacities:
        raise ValueError("no devices to plan on")
    names = [cap.name for cap in capacities]
    if len(set(names)) != len(names):
        raise ValueError(f"device names repeat: {names}")
    for cap in capacities:
        if cap.free_bytes < 0 or cap.total_bytes < 0:
            raise ValueError(f"device {cap.name}: negative bytes ({cap})")
    cpus = [i for i, cap in enumerate(capacities) if not cap.is_gpu]
    if len(cpus) > 1 or (cpus and cpus[0] != len(capacities) - 1):
        raise ValueError(f"the CPU may appear once and only last; devices in order: {names}")


def _check_replan(
    spec: ModelSpec, previous: Plan, placed: int, capacities: Sequence[DeviceCapacity]
) -> None:
    _check_capacities(capacities)
    names = [cap.name for cap in capacities]
    expected = [row.device for row in previous.devices]
    if names != expected:
        raise ValueError(f"re-plan needs live capacities for {expected} in that order, got {names}")
    if len(previous.layer_devices) != len(spec.layers):
        raise ValueError(
            f"previous plan has {len(previous.layer_devices)} layers, the spec {len(spec.layers)}"
        )
    if not 0 <= placed <= len(spec.layers):
        raise ValueError(f"placed must be in 0..{len(spec.layers)}, got {placed}")


# --------------------------------------------------------------------------------------------
# Sizes: activations, KV cache, weights


def estimate_activations(spec: ModelSpec, params: LoadParams) -> Activations:
    """``model.activation_bytes`` with the sequence, batch, chunk and vision settings of
    ``params``: what ``plan`` charges unless given ``activations=``."""
    vision = params.vision
    return activation_bytes(
        spec,
        max_seq_len=params.max_seq_len,
        max_batch_size=params.max_batch_size,
        chunk=params.attention_chunk,
        image_shape=None if vision is None else vision.max_image_shape,
        num_images=1 if vision is None else vision.max_num_images,
    )


@dataclass(frozen=True, slots=True)
class _Kv:
    """KV sizing of one planning attempt: bytes per layer, cache dtype, pool blocks if paged."""

    layer_bytes: tuple[int, ...]
    dtype: str
    blocks: int | None
    block_size: int | None


def _contiguous_kv(spec: ModelSpec, params: LoadParams) -> _Kv:
    """Non-paged: ``max_batch_size x min(max_seq_len, window)`` tokens per layer."""
    itemsize = DTYPE_SIZES[spec.activation_dtype]
    sizes = tuple(
        layer_kv_bytes(
            layer,
            tokens=params.max_seq_len,
            batch=params.max_batch_size,
            itemsize=itemsize,
            apply_window=True,
        )
        for layer in spec.layers
    )
    return _Kv(sizes, spec.activation_dtype, None, None)


def _pool_kv(spec: ModelSpec, dtype: str, blocks: int, block_size: int) -> _Kv:
    """Paged: ``blocks x block_size`` tokens in every layer, no window cap."""
    itemsize = DTYPE_SIZES[dtype]
    sizes = tuple(
        layer_kv_bytes(
            layer, tokens=blocks * block_size, batch=1, itemsize=itemsize, apply_window=False
        )
        for layer in spec.layers
    )
    return _Kv(sizes, dtype, blocks, block_size)


def _block_bytes(spec: ModelSpec, dtype: str, block_size: int) -> tuple[int, ...]:
    """Bytes one paged block costs in each layer."""
    return _pool_kv(spec, dtype, 1, block_size).layer_bytes


def _cache_dtype(spec: ModelSpec, paged: PagedAttention) -> str:
    dtype = parse_dtype(paged.cache_dtype)
    return spec.activation_dtype if dtype is None else dtype_code(dtype)


def _initial_blocks(spec: ModelSpec, params: LoadParams, paged: PagedAttention, dtype: str) -> int:
    """Blocks the paged pool starts with; for ``Utilization``, the default pool used to place."""
    memory = paged.memory
    bs = paged.block_size
    if isinstance(memory, ContextSize):
        return math.ceil(memory.tokens / bs)
    if memory is None:
        return math.ceil(params.max_seq_len * params.max_batch_size / bs)
    per_block = sum(_block_bytes(spec, dtype, bs))
    if per_block == 0:
        raise PlanError(
            f"paged attention with {memory} sizes a KV pool by memory, but this model caches no "
            "keys or values; use paged_attention=None or ContextSize"
        )
    if isinstance(memory, Utilization):
        return math.ceil(params.max_seq_len * params.max_batch_size / bs)
    blocks = memory.mib * _MIB // per_block
    if blocks == 0:
        raise PlanError(
            f"paged attention {memory} holds 0 blocks: one block of {bs} tokens costs "
            f"{format_bytes(per_block)} over all {len(spec.layers)} layers"
        )
    return blocks


def _charge(nbytes: int, converted: int, *, is_gpu: bool, policy: str) -> int:
    """Bytes a tensor group costs in the device's memory (CPU mmap: only converted bytes)."""
    return converted if not is_gpu and policy == "mmap" else nbytes


# --------------------------------------------------------------------------------------------
# Slots: a device as the fill sees it


@dataclass(frozen=True, slots=True)
class _Slot:
    """One device's budget and what it holds before the fill.

    ``limit`` is what weights + KV + activations may total (``capacity - reserve``, capped by a
    ``Utilization`` fraction). ``fixed_weight`` is weight there whatever the fill does (the
    non-mapped parts on the primary, layers placed before a re-plan); ``loaded_bytes`` the part
    of it already allocated (re-plan), which ``capacity`` includes.
    """

    name: str
    is_gpu: bool
    primary: bool
    total: int
    capacity: int
    reserve: int
    limit: int
    policy: str
    fixed_weight: int
    loaded_bytes: int
    loaded: tuple[int, ...]
    eligible: bool
    budget_text: str


def _slot(
    spec: ModelSpec,
    cap: DeviceCapacity,
    params: LoadParams,
    *,
    primary: bool,
    loaded: tuple[int, ...],
    already_loaded: bool,
    eligible: bool,
) -> _Slot:
    policy = params.cpu_policy
    parts = spec.non_mapped if primary else ()
    fixed = sum(
        _charge(p.nbytes, p.converted_bytes, is_gpu=cap.is_gpu, policy=policy) for p in parts
    ) + sum(
        _charge(
            spec.layers[i].nbytes, spec.layers[i].converted_bytes, is_gpu=cap.is_gpu, policy=policy
        )
        for i in loaded
    )
    loaded_bytes = fixed if already_loaded else 0
    live = cap.free_bytes + loaded_bytes
    if cap.is_gpu:
        capacity = live
        reserve = params.reserve_for(cap.total_bytes)
        text = (
            f"free {format_bytes(cap.free_bytes)}, reserve {format_bytes(reserve)} "
            f"(max({params.reserve_fraction} x total {format_bytes(cap.total_bytes)}, "
            f"{format_bytes(params.reserve_min_bytes)}))"
        )
    else:
        own = params.cpu_memory_bytes
        capacity = live if own is None else own
        reserve = params.host_reserve_bytes
        source = "available" if own is None else "cpu_memory_bytes"
        text = (
            f"host budget: {source} {format_bytes(capacity)} - host reserve "
            f"{format_bytes(reserve)}, cpu_policy={policy}"
        )
    if loaded_bytes:
        text += f", {format_bytes(loaded_bytes)} already loaded"
    return _Slot(
        name=cap.name,
        is_gpu=cap.is_gpu,
        primary=primary,
        total=cap.total_bytes,
        capacity=capacity,
        reserve=reserve,
        limit=capacity - reserve,
        policy=policy,
        fixed_weight=fixed,
        loaded_bytes=loaded_bytes,
        loaded=loaded,
        eligible=eligible,
        budget_text=text,
    )


def _paged_slot(slot: _Slot, paged: PagedAttention) -> _Slot:
    """The slot under paged attention: the CPU takes no layers; ``Utilization`` caps GPUs."""
    if not slot.is_gpu:
        return replace(slot, eligible=False)
    memory = paged.memory
    if not isinstance(memory, Utilization):
        return slot
    cap = int(memory.fraction * slot.total)
    if cap >= slot.limit:
        return slot
    text = f"{slot.budget_text}; capped at {memory.fraction} x total = {format_bytes(cap)}"
    return replace(slot, limit=cap, budget_text=text)


# --------------------------------------------------------------------------------------------
# Costs of one attempt


@dataclass(frozen=True, slots=True)
class _Problem:
    """What one planning attempt charges: the spec, activations and KV sizing."""

    spec: ModelSpec
    acts: Activations
    kv: _Kv


def _layer_weight(p: _Problem, slot: _Slot, i: int) -> int:
    layer = p.spec.layers[i]
    return _charge(layer.nbytes, layer.converted_bytes, is_gpu=slot.is_gpu, policy=slot.policy)


def _layer_cost(p: _Problem, slot: _Slot, i: int) -> int:
    return _layer_weight(p, slot, i) + p.kv.layer_bytes[i]


def _activation(p: _Problem, slot: _Slot, holds_layers: bool) -> int:
    if slot.primary:
        return max(p.acts.mapped, p.acts.non_mapped)
    return p.acts.mapped if holds_layers else 0


def _fixed(p: _Problem, slot: _Slot, holds_layers: bool) -> int:
    """Charges before any new layer: fixed weights, KV of placed layers, activations."""
    kv = sum(p.kv.layer_bytes[i] for i in slot.loaded)
    return slot.fixed_weight + kv + _activation(p, slot, holds_layers or bool(slot.loaded))


def _room(p: _Problem, slot: _Slot) -> int:
    """What is left for new layers once the slot holds at least one layer."""
    return slot.limit - _fixed(p, slot, True)


def _take(p: _Problem, slot: _Slot, start: int) -> int:
    """How many of layers ``start..`` fit on the slot, in order (greedy prefix)."""
    n = len(p.spec.layers)
    room = _room(p, slot)
    if not slot.eligible or start >= n or room < 0:
        return 0
    prefix = list(accumulate((_layer_cost(p, slot, i) for i in range(start, n)), initial=0))
    return bisect_right(prefix, room) - 1


def _fill(p: _Problem, slots: Sequence[_Slot], start: int) -> tuple[tuple[int, ...], ...]:
    """New layers per slot: each slot in order takes the longest run that fits."""
    taken: list[tuple[int, ...]] = []
    cursor = start
    for slot in slots:
        count = _take(p, slot, cursor)
        taken.append(tuple(range(cursor, cursor + count)))
        cursor += count
    return tuple(taken)


def _end(new: Sequence[tuple[int, ...]], start: int) -> int:
    return start + sum(len(layers) for layers in new)


# --------------------------------------------------------------------------------------------
# Solving: paged attempt, fallback, contiguous plan


@dataclass(frozen=True, slots=True)
class _Fallback:
    """The paged attempt needs the CPU: plan non-paged, for this reason."""

    reason: str


def _solve(
    spec: ModelSpec,
    slots: tuple[_Slot, ...],
    params: LoadParams,
    acts: Activations,
    *,
    start: int,
    paged: PagedAttention | None,
    reason: str | None,
) -> Plan:
    if paged is not None:
        attempt = _solve_paged(spec, slots, params, acts, start=start, paged=paged)
        if isinstance(attempt, Plan):
            return attempt
        reason = attempt.reason
    p = _Problem(spec, acts, _contiguous_kv(spec, params))
    _check_fixed(p, slots)
    new = _fill(p, slots, start)
    if _end(new, start) < len(spec.layers):
        raise _unplaced_error(p, slots, new, start)
    return _build(p, slots, new, start=start, reason=reason)


def _solve_paged(
    spec: ModelSpec,
    slots: tuple[_Slot, ...],
    params: LoadParams,
    acts: Activations,
    *,
    start: int,
    paged: PagedAttention,
) -> Plan | _Fallback:
    if not slots[0].is_gpu:
        return _Fallback(
            f"paged attention disabled: the primary device {slots[0].name} is the CPU, where "
            "paged attention does not run; planned with non-paged KV sizing"
        )
    dtype = _cache_dtype(spec, paged)
    blocks = _initial_blocks(spec, params, paged, dtype)
    p = _Problem(spec, acts, _pool_kv(spec, dtype, blocks, paged.block_size))
    gpu_slots = tuple(_paged_slot(slot, paged) for slot in slots)
    _check_fixed(p, gpu_slots)
    new = _fill(p, gpu_slots, start)
    end = _end(new, start)
    if end < len(spec.layers):
        cpu = next((slot.name for slot in slots if not slot.is_gpu), None)
        if cpu is None:
            raise _unplaced_error(p, gpu_slots, new, start)
        return _Fallback(
            f"paged attention disabled: with a paged KV pool of {blocks} blocks x "
            f"{paged.block_size} tokens, layers {_span(range(end, len(spec.layers)))} do not fit "
            f"on the GPUs and would go to {cpu}, where paged attention does not run; "
            f"planned with non-paged KV sizing ({params.max_batch_size} x {params.max_seq_len} "
            "tokens per layer, capped by sliding windows)"
        )
    if isinstance(paged.memory, Utilization):
        blocks = _utilization_blocks(p, gpu_slots, new, paged.block_size)
        p = replace(p, kv=_pool_kv(spec, dtype, blocks, paged.block_size))
    return _build(p, gpu_slots, new, start=start, reason=None)


def _utilization_blocks(
    p: _Problem, slots: Sequence[_Slot], new: Sequence[tuple[int, ...]], block_size: int
) -> int:
    """The largest block count every GPU holding layers can afford within its budget."""
    per_block = _block_bytes(p.spec, p.kv.dtype, block_size)
    affordable = []
    for slot, extra in zip(slots, new, strict=True):
        layers = slot.loaded + extra
        block = sum(per_block[i] for i in layers)
        if not layers or block == 0:
            continue
        weights = slot.fixed_weight + sum(_layer_weight(p, slot, i) for i in extra)
        spare = slot.limit - weights - _activation(p, slot, True)
        affordable.append(spare // block)
    blocks = min(affordable)
    assert p.kv.blocks is not None
    assert blocks >= p.kv.blocks, "placement reserved the default pool"
    return blocks


# --------------------------------------------------------------------------------------------
# Results and errors


def _build(
    p: _Problem,
    slots: Sequence[_Slot],
    new: Sequence[tuple[int, ...]],
    *,
    start: int,
    reason: str | None,
) -> Plan:
    cursors = list(accumulate((len(layers) for layers in new), initial=start))
    rows = tuple(
        _row(p, slot, extra, cursor)
        for slot, extra, cursor in zip(slots, new, cursors, strict=False)
    )
    owner = {i: row.device for row in rows for i in row.layers}
    return Plan(
        layer_devices=tuple(owner[i] for i in range(len(p.spec.layers))),
        primary=slots[0].name,
        paged_attention=p.kv.blocks is not None,
        paged_attention_reason=reason,
        devices=rows,
        layer_kv_bytes=p.kv.layer_bytes,
        kv_cache_dtype=p.kv.dtype,
        paged_blocks=p.kv.blocks,
        cpu_policy=slots[0].policy,
        loaded_layers=start,
    )


def _row(p: _Problem, slot: _Slot, extra: tuple[int, ...], cursor: int) -> DevicePlan:
    layers = slot.loaded + extra
    holds = bool(layers)
    parts = p.spec.non_mapped if slot.primary else ()
    mmap = 0
    if not slot.is_gpu and slot.policy == "mmap":
        mmap = sum(p.spec.layers[i].nbytes - p.spec.layers[i].converted_bytes for i in layers)
        mmap += sum(part.nbytes - part.converted_bytes for part in parts)
    return DevicePlan(
        device=slot.name,
        is_gpu=slot.is_gpu,
        layers=layers,
        holds_non_mapped=slot.primary,
        weight_bytes=slot.fixed_weight + sum(_layer_weight(p, slot, i) for i in extra),
        kv_bytes=sum(p.kv.layer_bytes[i] for i in layers),
        activation_bytes=_activation(p, slot, holds),
        reserve_bytes=slot.reserve if holds or slot.primary else 0,
        capacity_bytes=slot.capacity,
        note=_note(p, slot, extra, cursor),
        mmap_bytes=mmap,
        loaded_bytes=slot.loaded_bytes,
    )


def _note(p: _Problem, slot: _Slot, extra: tuple[int, ...], cursor: int) -> str | None:
    """Why a device holds no (further) layers; ``None`` when it took some."""
    if extra:
        return None
    what = "no further layers" if slot.loaded else "0 layers"
    if cursor >= len(p.spec.layers):
        return (
            None if slot.loaded or slot.primary else "unused: every layer is on an earlier device"
        )
    if not slot.eligible:
        return f"takes {what}: it comes before the device being loaded when re-planning"
    room = _room(p, slot)
    layer = p.kv.layer_bytes[cursor]
    return (
        f"fits {what}: layer {cursor} costs {format_bytes(_layer_weight(p, slot, cursor))} "
        f"weights + {format_bytes(layer)} KV, but {format_bytes(max(room, 0))} is left of "
        f"{format_bytes(max(slot.limit, 0))} after fixed charges "
        f"({format_bytes(_fixed(p, slot, True))}: non-mapped parts, placed layers, "
        f"activations); {slot.budget_text}"
    )


def _span(layers: Sequence[int]) -> str:
    if not layers:
        return "none"
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def _kv_text(kv: _Kv) -> str:
    if kv.blocks is None:
        return f"non-paged KV cache in {kv.dtype}"
    return f"paged KV pool of {kv.blocks} blocks x {kv.block_size} tokens in {kv.dtype}"


def _breakdown(
    p: _Problem, slots: Sequence[_Slot], new: Sequence[tuple[int, ...]], start: int
) -> list[DeviceNeed]:
    cursors = list(accumulate((len(layers) for layers in new), initial=start))
    rows = [_row(p, s, x, c) for s, x, c in zip(slots, new, cursors, strict=False)]
    return [
        DeviceNeed(
            device=row.device,
            capacity=row.capacity_bytes,
            need=row.need_bytes,
            detail=(
                f"layers {_span(row.layers)}; weights {format_bytes(row.weight_bytes)}, "
                f"KV {format_bytes(row.kv_bytes)}, activations "
                f"{format_bytes(row.activation_bytes)}, reserve {format_bytes(row.reserve_bytes)}"
                f"; {slot.budget_text}"
            ),
        )
        for slot, row in zip(slots, rows, strict=True)
    ]


def _unplaced_error(
    p: _Problem, slots: Sequence[_Slot], new: Sequence[tuple[int, ...]], start: int
) -> DoesNotFitError:
    n = len(p.spec.layers)
    left = range(_end(new, start), n)
    weights = sum(p.spec.layers[i].nbytes for i in left)
    kv = sum(p.kv.layer_bytes[i] for i in left)
    reason = (
        f"the model does not fit: layers {_span(left)} ({len(left)} of {n}; weights "
        f"{format_bytes(weights)} + KV {format_bytes(kv)}) fit on no device, with "
        f"{_kv_text(p.kv)}"
    )
    return DoesNotFitError(reason, _breakdown(p, slots, new, start))


def _check_fixed(p: _Problem, slots: Sequence[_Slot]) -> None:
    """The primary's non-mapped parts, and placed layers' KV + activations, must fit."""
    for slot in slots:
        if not (slot.primary or slot.loaded):
            continue
        fixed = _fixed(p, slot, bool(slot.loaded))
        if fixed <= slot.limit:
            continue
        if slot.loaded:
            what = (
                f"device {slot.name} already holds layers {_span(slot.loaded)}, and their KV "
                "cache and the activations no longer fit"
            )
        else:
            what = (
                f"the primary device {slot.name} cannot hold the non-mapped parts: weights "
                f"{format_bytes(slot.fixed_weight)} + activations "
                f"{format_bytes(_activation(p, slot, False))} exceed its budget of "
                f"{format_bytes(slot.limit)}; put a device with more free memory first"
            )
        row = DeviceNeed(
            device=slot.name,
            capacity=slot.capacity,
            need=fixed + slot.reserve,
            detail=f"{slot.budget_text}; {_kv_text(p.kv)}",
        )
        raise DoesNotFitError(what, [row])
