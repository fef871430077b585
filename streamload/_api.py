"""The synchronous entry points: ``inspect`` and ``plan`` (headers only, no tensor data)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from streamload import model, planner, sources
from streamload.devices import capacities, resolve_devices
from streamload.errors import SourceError
from streamload.model import ModelSpec
from streamload.params import LoadParams, parse_dtype_code
from streamload.planner import Plan

if TYPE_CHECKING:
    import torch

__all__ = ["inspect", "plan", "resolve_source", "spec_of"]


def inspect(
    path: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    *,
    params: LoadParams | None = None,
) -> ModelSpec:
    """The checkpoint's inventory: layers, non-mapped parts, bytes (in ``dtype`` if given),
    architecture facts. Reads ``config.json`` and the safetensors headers only; without a
    ``config.json``, the headers alone (layers grouped by tensor names, ``spec.config`` empty,
    no architecture facts).

    ``path`` is a local path, a hub repo id ``org/name`` or an object-store URL
    (``streamload.sources``); ``params`` gives the revision, storage options and connect timeout.
    """
    source = resolve_source(path, params or LoadParams(), config_optional=True)
    return spec_of(source, parse_dtype_code(dtype))


def plan(path: str | os.PathLike[str], params: LoadParams | None = None) -> Plan:
    """The device map a load of ``path`` with ``params`` would start from.

    Synchronous and cheap: reads headers and ``config.json``, probes the devices ``params``
    names (live free memory), and runs the planner. No tensor data is touched. ``path`` as for
    ``inspect``.
    """
    params = params or LoadParams()
    source = resolve_source(path, params)
    spec = spec_of(source, params.target_code)
    devices = resolve_devices(params.devices)
    return planner.plan(spec, capacities(devices, caps=params.memory_caps), params)


def resolve_source(
    path: str | os.PathLike[str],
    params: LoadParams,
    cancelled: Callable[[], None] | None = None,
    *,
    config_optional: bool = False,
) -> sources.Source:
    """``sources.resolve`` with ``params``' source settings; an object-store source under
    ``cpu_policy="mmap"`` is refused (objects cannot be memory-mapped, and the plan would not
    charge the CPU what a copy costs)."""
    source = sources.resolve(
        path,
        revision=params.revision,
        storage_options=params.storage_options,
        connect_timeout=params.connect_timeout,
        verify=params.verify,
        cancelled=cancelled,
        config_optional=config_optional,
    )
    if not source.local and params.cpu_policy == "mmap":
        raise SourceError(
            source.name, "cpu_policy='mmap' maps local files; load objects with cpu_policy='copy'"
        )
    return source


def spec_of(source: sources.Source, target_dtype: str | None) -> ModelSpec:
    """The model spec of a resolved source (from the headers alone when it has no config)."""
    if not source.config:
        return model.headers_spec(source.checkpoint, target_dtype=target_dtype)
    return model.build_spec(source.checkpoint, source.config, target_dtype=target_dtype)
