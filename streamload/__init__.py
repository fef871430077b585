"""streamload: stream safetensors checkpoints onto GPUs and the CPU from async programs.

    model = await streamload.load("path/to/checkpoint", streamload.LoadParams())

See ``streamload.load`` (async), ``streamload.plan`` and ``streamload.inspect`` (sync, headers
only), ``streamload.events`` for what a load reports, and ``streamload.testing`` for simulated
GPUs and checkpoint writers.
"""

import sys
from typing import TYPE_CHECKING, Any

from streamload import events
from streamload._api import inspect, plan
from streamload.errors import (
    CheckpointError,
    ChecksumError,
    ConfigError,
    CorruptHeaderError,
    DeviceError,
    DoesNotFitError,
    IndexMismatchError,
    LoadError,
    MissingShardError,
    ObjectChangedError,
    PlanError,
    ReplanLimitError,
    SourceError,
    SourceUnreachableError,
    StreamloadError,
    TruncatedDataError,
    UnsupportedDtypeError,
)
from streamload.events import LoadReport
from streamload.model import ModelSpec
from streamload.params import (
    ContextSize,
    LoadParams,
    MbAmount,
    PagedAttention,
    Utilization,
    VisionParams,
)
from streamload.planner import DevicePlan, Plan

if TYPE_CHECKING:
    from streamload.engine import LoadedModel, load

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ChecksumError",
    "ConfigError",
    "ContextSize",
    "CorruptHeaderError",
    "DeviceError",
    "DevicePlan",
    "DoesNotFitError",
    "IndexMismatchError",
    "LoadError",
    "LoadParams",
    "LoadReport",
    "LoadedModel",
    "MbAmount",
    "MissingShardError",
    "ModelSpec",
    "ObjectChangedError",
    "PagedAttention",
    "Plan",
    "PlanError",
    "ReplanLimitError",
    "SourceError",
    "SourceUnreachableError",
    "StreamloadError",
    "TruncatedDataError",
    "UnsupportedDtypeError",
    "Utilization",
    "VisionParams",
    "events",
    "inspect",
    "load",
    "plan",
]


# The engine imports torch: it is imported when ``load`` or ``LoadedModel`` is first named, so
# that ``import streamload`` for ``plan`` and ``inspect`` never imports torch. Where torch is
# imported already (an inference server imports it first), importing the engine now costs no
# torch import, and its own import (tens of milliseconds of Python) is not left to the first
# ``await load(...)``, where it would hold up the event loop it runs on.
if "torch" in sys.modules:
    from streamload import engine as _engine  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in ("LoadedModel", "load"):
        from streamload import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
