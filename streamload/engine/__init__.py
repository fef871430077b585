"""The async load: plan, stream tensors layer by layer, recheck live memory, re-plan, report.

``load`` runs on the caller's event loop and never blocks it: header parsing, device probes,
allocations, file reads, copies and dtype conversions all run in worker threads.

Which module to open for which behaviour:

- ``_units``: the order of units and how they are cut into reads (pure);
- ``_budget``: what a device's plan still needs, the live recheck, reservations and re-plans
  (it returns the events they cause);
- ``_destinations``: one layout decision per unit, allocation, completion (waits, conversions);
- ``_reader``: shard files, the staging ring, the read queue and its lanes, the prefetch and
  the page-cache probe;
- ``_boundary``: the one place foreign exceptions become ``StreamloadError``;
- ``_flight``: a unit between its allocation and its placement;
- ``_load``: the orchestrator: the window of units in flight, placement in order, the only
  emitter of events;
- ``_loaded``: ``LoadedModel``, what a load hands back.

Per unit: *recheck* (GPUs) against the budget, re-planning the layers not yet placed when the
device under-delivers; *allocate* final tensors in the target dtype and raw buffers in the
stored dtype for tensors that convert (``torch.OutOfMemoryError`` frees the unit's buffers and
re-plans too); *read* (staged through the ring, or straight into host memory, or memory-mapped
under ``cpu_policy="mmap"``); *finish*: wait the copies, convert, emit ``LayerPlaced``.

Cancellation and failure: every tensor the load placed is released (a simulated GPU's ledger
returns to where it was), reader threads finish (they are not abandoned), every file descriptor
is closed, reservations are dropped; a ``LoadFailed`` event is emitted; cancellation propagates
unchanged and any other error surfaces as a ``StreamloadError``.
"""

from streamload.engine._load import load
from streamload.engine._loaded import LoadedModel

__all__ = ["LoadedModel", "load"]
