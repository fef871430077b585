"""The synchronous entry points: ``inspect`` and ``plan`` (headers only, no tensor data)."""

from __future__ import annotations

from pathlib import Path

import torch

from streamload import model, planner
from streamload.devices import capacities, resolve_devices
from streamload.model import ModelSpec
from streamload.params import LoadParams, dtype_code, parse_dtype
from streamload.planner import Plan

__all__ = ["inspect", "plan"]


def inspect(path: str | Path, dtype: torch.dtype | str | None = None) -> ModelSpec:
    """The checkpoint's inventory: layers, non-mapped parts, bytes (in ``dtype`` if given),
    architecture facts. Reads ``config.json`` and the safetensors headers only."""
    parsed = parse_dtype(dtype)
    return model.inspect(path, target_dtype=None if parsed is None else dtype_code(parsed))


def plan(path: str | Path, params: LoadParams | None = None) -> Plan:
    """The device map a load of ``path`` with ``params`` would start from.

    Synchronous and cheap: reads headers and ``config.json``, probes the devices ``params``
    names (live free memory), and runs the planner. No tensor data is touched.
    """
    params = params or LoadParams()
    spec = model.inspect(path, target_dtype=params.target_code)
    devices = resolve_devices(params.devices)
    return planner.plan(spec, capacities(devices, caps=params.memory_caps), params)
