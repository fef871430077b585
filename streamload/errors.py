"""The exceptions streamload raises.

Every error the library raises on purpose derives from one root, so a server can catch
``streamload.StreamloadError`` and know the load failed cleanly (nothing left placed)::

    StreamloadError
    ├── CheckpointError            a safetensors file or index is wrong (names the file, tensor)
    │   ├── CorruptHeaderError     header unreadable: length, JSON, UTF-8, shape, offsets
    │   ├── UnsupportedDtypeError  a dtype code streamload does not know
    │   ├── TruncatedDataError     the file is shorter than its tensors (also: shrank mid-load)
    │   ├── MissingShardError      the index names a shard that is not there
    │   ├── IndexMismatchError     index and shards disagree (missing or duplicated tensor)
    │   └── ChecksumError          a file's bytes do not hash to the checksum its source records
    ├── SourceError                a hub id or object-store URL cannot be resolved or read
    │   │                          (names the id and revision, or the URL, and the object)
    │   ├── SourceUnreachableError the hub or the endpoint did not answer (refused, timed out)
    │   └── ObjectChangedError     an object changed while it was being read (its ETag moved)
    ├── ConfigError                config.json missing, invalid, or lacking a field we need
    ├── PlanError                  no valid placement exists
    │   └── DoesNotFitError        with a per-device breakdown of capacity and need
    ├── DeviceError                a device could not be found, probed or used
    ├── LoadError                  streaming failed (names the layer, tensor, device)
    │   └── ReplanLimitError       devices kept under-delivering past the re-plan bound
    └── DistributedError           a multi-rank load (``streamload.distributed``) failed
        │                          (names the ``rank``, its ``host`` and ``device``)
        ├── RankFailedError        a rank could not survey, plan or load its stage: every
        │                          rank raises the same message
        └── CollectiveError        an exchange did not complete: a peer died, hung past
                                   ``peer_timeout``, or the process group is unusable

Foreign exceptions (``json``, ``struct``, ``OSError``, ``pynvml.NVMLError``,
``torch.OutOfMemoryError``) are translated where they are first met, always with
``raise ... from exc``; each constructor builds its message from its fields.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CheckpointError",
    "ChecksumError",
    "CollectiveError",
    "ConfigError",
    "CorruptHeaderError",
    "DeviceError",
    "DeviceNeed",
    "DistributedError",
    "DoesNotFitError",
    "IndexMismatchError",
    "LoadError",
    "MissingShardError",
    "ObjectChangedError",
    "PlanError",
    "RankFailedError",
    "ReplanLimitError",
    "SourceError",
    "SourceUnreachableError",
    "StreamloadError",
    "TruncatedDataError",
    "UnsupportedDtypeError",
    "format_bytes",
    "location",
]

# An object-store URL carried in a ``Path`` (``Path("s3://b/k")`` reads ``s3:/b/k``): local
# checkpoint paths are absolute, so a relative path that starts with a scheme is a URL.
_URL_IN_PATH = re.compile(r"^([a-z][a-z0-9+.-]*):/(?!/)")


def location(path: str | Path) -> str:
    """How messages name a file: a local path as it is, an object's URL with its ``//``."""
    text = str(path)
    return _URL_IN_PATH.sub(r"\1://", text, count=1)


def format_bytes(n: int) -> str:
    """``1536 -> '1.50 KiB'``; binary units, two decimals, for messages and tables."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class StreamloadError(Exception):
    """Root of every error streamload raises on purpose."""


class CheckpointError(StreamloadError):
    """A checkpoint file or its index is not what it claims to be."""

    def __init__(self, path: str | Path, problem: str, *, tensor: str | None = None) -> None:
        self.path = Path(path)
        self.tensor = tensor
        self.problem = problem
        where = location(self.path)
        where = where if tensor is None else f"{where}: tensor {tensor!r}"
        super().__init__(f"{where}: {problem}")


class CorruptHeaderError(CheckpointError):
    """The safetensors header cannot be read or is inconsistent with itself or the file."""


class UnsupportedDtypeError(CheckpointError):
    """A tensor's dtype code is not one streamload knows."""


class TruncatedDataError(CheckpointError):
    """The file holds fewer bytes than its header promises (or shrank after planning)."""


class MissingShardError(CheckpointError):
    """``model.safetensors.index.json`` names a shard file that does not exist."""


class IndexMismatchError(CheckpointError):
    """The index and the shards disagree about which tensors exist and where."""


class ChecksumError(CheckpointError):
    """A file read in full does not hash to the sha256 its source records for it."""

    def __init__(self, path: str | Path, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(path, f"sha256 {actual} does not match the recorded {expected}")


class SourceError(StreamloadError):
    """A model source (a hub repo id at a revision, an object-store URL) cannot be used.

    ``source`` is the id or URL as given, ``revision`` the hub revision (``None`` for URLs).
    """

    def __init__(self, source: str, problem: str, *, revision: str | None = None) -> None:
        self.source = source
        self.revision = revision
        self.problem = problem
        where = source if revision is None else f"{source} (revision {revision!r})"
        super().__init__(f"{where}: {problem}")


class SourceUnreachableError(SourceError):
    """The hub or the object store's endpoint refused the connection or did not answer in time."""


class ObjectChangedError(SourceError):
    """An object's ETag changed between planning and reading: it was overwritten mid-load."""


class ConfigError(StreamloadError):
    """``config.json`` is missing, is not valid JSON, or lacks a field the estimate needs."""

    def __init__(self, path: str | Path, problem: str, *, field: str | None = None) -> None:
        self.path = Path(path)
        self.field = field
        self.problem = problem
        where = location(self.path)
        where = where if field is None else f"{where}: field {field!r}"
        super().__init__(f"{where}: {problem}")


class PlanError(StreamloadError):
    """No valid placement exists for this model on these devices with these parameters."""


@dataclass(frozen=True, slots=True)
class DeviceNeed:
    """One row of a does-not-fit breakdown: what a device offers and what was asked of it."""

    device: str
    capacity: int
    need: int
    detail: str = ""

    def describe(self) -> str:
        text = (
            f"{self.device}: capacity {format_bytes(self.capacity)}, "
            f"needs {format_bytes(self.need)}"
        )
        return f"{text} ({self.detail})" if self.detail else text


class DoesNotFitError(PlanError):
    """The model (or a required part of it) does not fit; lists every device's capacity and need."""

    def __init__(self, reason: str, devices: Sequence[DeviceNeed]) -> None:
        self.reason = reason
        self.devices = tuple(devices)
        rows = "".join(f"\n  - {row.describe()}" for row in self.devices)
        super().__init__(f"{reason}{rows}")


class DeviceError(StreamloadError):
    """A device could not be discovered, probed or used."""

    def __init__(self, device: str, problem: str) -> None:
        self.device = device
        self.problem = problem
        super().__init__(f"device {device}: {problem}")


class LoadError(StreamloadError):
    """Streaming the checkpoint failed; every tensor the load had placed was released."""

    def __init__(
        self,
        problem: str,
        *,
        layer: int | None = None,
        device: str | None = None,
        tensor: str | None = None,
        path: str | Path | None = None,
    ) -> None:
        self.problem = problem
        self.layer = layer
        self.device = device
        self.tensor = tensor
        self.path = None if path is None else Path(path)
        parts = []
        if self.path is not None:
            parts.append(location(self.path))
        if tensor is not None:
            parts.append(f"tensor {tensor!r}")
        if layer is not None:
            parts.append(f"layer {layer}")
        if device is not None:
            parts.append(f"device {device}")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {problem}" if prefix else problem)


class ReplanLimitError(LoadError):
    """Devices kept under-delivering after the configured number of re-plans."""


class DistributedError(StreamloadError):
    """A distributed load failed; ``rank``, ``host`` and ``device`` say where, when known."""

    def __init__(
        self,
        problem: str,
        *,
        rank: int | None = None,
        host: str | None = None,
        device: str | None = None,
    ) -> None:
        self.problem = problem
        self.rank = rank
        self.host = host
        self.device = device
        where = [] if rank is None else [f"rank {rank}" + (f" ({host})" if host else "")]
        if device is not None:
            where.append(f"device {device}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)


class RankFailedError(DistributedError):
    """A rank could not survey, plan or load its stage; every rank raises this same error.

    ``phase`` is what the rank was doing; ``error_type`` the class name of the rank's own error.
    """

    def __init__(
        self,
        problem: str,
        *,
        rank: int,
        host: str,
        phase: str,
        device: str | None = None,
        error_type: str = "",
    ) -> None:
        self.phase = phase
        self.error_type = error_type
        super().__init__(f"{phase}: {problem}", rank=rank, host=host, device=device)
        self.problem = problem


class CollectiveError(DistributedError):
    """An exchange between ranks did not complete (a peer died, hung, or left the group).

    ``rank`` is the rank that raised it; ``exchange`` names the exchange.
    """

    def __init__(self, exchange: str, problem: str, *, rank: int, host: str) -> None:
        self.exchange = exchange
        super().__init__(f"{exchange} failed: {problem}", rank=rank, host=host)
