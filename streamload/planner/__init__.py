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

from streamload.planner._sizes import (
    SCRATCH_ALIGN,
    conversion_scratch,
    estimate_activations,
    raw_bytes,
)
from streamload.planner._solve import plan, replan
from streamload.planner._types import DeviceCapacity, DevicePlan, Plan

__all__ = [
    "SCRATCH_ALIGN",
    "DeviceCapacity",
    "DevicePlan",
    "Plan",
    "conversion_scratch",
    "estimate_activations",
    "plan",
    "raw_bytes",
    "replan",
]
