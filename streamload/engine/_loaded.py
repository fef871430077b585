"""What a load hands back: ``LoadedModel``, its tensors, plan, report and device map."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Self

import torch

from streamload.devices import Device
from streamload.events import LoadReport
from streamload.model import ModelSpec
from streamload.planner import Plan

__all__ = ["LoadedModel", "Releasable"]


class Releasable:
    """A load's result: ``release()`` drops every reference the library holds, and
    ``async with`` releases on exit (``LoadedModel``, ``DistributedModel``)."""

    def release(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class LoadedModel(Releasable):
    """A loaded checkpoint: ``tensors`` by checkpoint name, each on its final device.

    ``plan`` is the plan actually used (after any re-plan), ``report`` what the load did.
    ``device_map`` is the placement in Hugging Face form, module prefix -> *torch* device
    (``{"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", ..., "lm_head": "cuda:0"}``),
    accepted as-is by ``accelerate.dispatch_model`` and ``from_pretrained(device_map=...)``.
    Tensors on a ``SimulatedGPU`` live in host memory, so their modules map to ``"cpu"`` there;
    ``placement`` gives the same keys with streamload's device names (``"sim:0"``).

    ``release()`` drops every reference the library holds; device memory returns once the
    caller's own references to the tensors are gone too (a tensor the caller kept, or a model
    built on them, keeps its memory). Freed CUDA memory then stays in torch's caching
    allocator, reusable by this process only; ``release(empty_cache=True)`` hands what is free
    back to the driver. ``async with await load(...) as m:`` releases on exit.

    ``read_bytes`` counts the tensor bytes read from storage (less than ``report.stored_bytes``
    where tensors were memory-mapped; more where a strided slice read through the holes
    between its rows).
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        plan: Plan,
        report: LoadReport,
        spec: ModelSpec,
        devices: Sequence[Device] = (),
        *,
        read_bytes: int = 0,
    ) -> None:
        self.tensors = tensors
        self.read_bytes = read_bytes
        self.devices = tuple(devices)
        self.plan = plan
        self.report = report
        self.spec = spec
        self.placement = _placement(spec, plan)
        self.device_map = _torch_device_map(spec, self.placement, tensors)

    def release(self, *, empty_cache: bool = False) -> None:
        """Drop every tensor reference the library holds (idempotent). ``empty_cache``: then
        return the memory this frees from the devices' caches to the system
        (``Device.release_cache``; blocking, a few milliseconds per GPU)."""
        self.tensors.clear()
        if empty_cache:
            for device in self.devices:
                device.release_cache()

    def __repr__(self) -> str:
        return (
            f"LoadedModel({self.report.path!r}, tensors={len(self.tensors)}, "
            f"devices={[d.device for d in self.report.devices]})"
        )


def _placement(spec: ModelSpec, plan: Plan) -> dict[str, str]:
    mapping = {part.name: plan.primary for part in spec.non_mapped}
    for layer in spec.layers:
        mapping[layer.prefix] = plan.layer_devices[layer.index]
    return mapping


def _torch_device_map(
    spec: ModelSpec, placement: dict[str, str], tensors: dict[str, torch.Tensor]
) -> dict[str, str]:
    """Module -> the torch device its tensors are on (``"cuda:0"``, ``"cpu"``)."""
    first: dict[str, str] = {}
    for part in spec.non_mapped:
        if part.tensors:
            first[part.name] = part.tensors[0]
    for layer in spec.layers:
        if layer.tensors:
            first[layer.prefix] = layer.tensors[0]
    mapping = {}
    for module, device in placement.items():
        name = first.get(module)
        mapping[module] = str(tensors[name].device) if name in tensors else device
    return mapping
