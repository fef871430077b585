"""The synchronous entry points: ``inspect`` and ``plan`` (headers only, no tensor data)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from streamload import model, planner
from streamload.devices import capacities, resolve_devices
from streamload.model import ModelSpec
from streamload.params import LoadParams, parse_dtype_code
from streamload.planner import Plan

if TYPE_CHECKING:
    import torch

__all__ = ["inspect", "plan"]


def inspect(path: str | Path, dtype: torch.dtype | str | None = None) -> ModelSpec:
    """The checkpoint's inventory: layers, non-mapped parts, bytes (in ``dtype`` if given),
    architecture facts. Reads ``config.json`` and the safetensors headers only; without a
    ``config.json``, the headers alone (layers grouped by tensor names, ``spec.config`` empty,
    no architecture facts)."""
    return model.inspect(path, target_dtype=parse_dtype_code(dtype), config_optional=True)


def plan(path: str | Path, params: LoadParams | None = None) -> Plan:
    """The device map a load of ``path`` with ``params`` would start from.

    Synchronous and cheap: reads headers and ``config.json``, probes the devices ``params``
    names (live free memory), and runs the planner. No tensor data is touched.
    """
    params = params or LoadParams()
    spec = model.inspect(path, target_dtype=params.target_code)
    devices = resolve_devices(params.devices)
    return planner.plan(spec, capacities(devices, caps=params.memory_caps), params)
