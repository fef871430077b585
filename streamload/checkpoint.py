"""Safetensors headers and sharded indexes -> validated tensor entries.

Reads only headers: no tensor data is touched. Standard library only.

File format (https://github.com/huggingface/safetensors): 8 bytes little-endian ``u64`` header
length ``N``, then ``N`` bytes of UTF-8 JSON object mapping tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data region that
starts at ``8 + N``), plus an optional ``"__metadata__"`` string map. Tensors must tile the data
region exactly: sorted by offset, no gaps, no overlap, starting at 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DTYPE_SIZES",
    "FLOAT_CODES",
    "INDEX_NAME",
    "MAX_HEADER_BYTES",
    "Checkpoint",
    "ShardHeader",
    "TensorEntry",
    "open_checkpoint",
    "parse_header",
    "read_shard_header",
]

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000

# Bytes per element for every safetensors dtype code streamload knows.
DTYPE_SIZES: Mapping[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

# Floating codes that a load with ``dtype=`` converts. FP8 is treated as quantized data and kept.
FLOAT_CODES: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor's bytes live: ``path`` at absolute byte ``offset``, ``nbytes`` long."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True, slots=True)
class ShardHeader:
    """One safetensors file's parsed header; ``tensors`` sorted by offset."""

    path: Path
    file_size: int
    data_offset: int
    tensors: tuple[TensorEntry, ...]
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A whole checkpoint: one file or the shards named by its index.

    ``root`` is the directory holding ``config.json``; ``tensors`` maps every name to its entry
    (insertion order = shard order, then offset order).
    """

    root: Path
    shards: tuple[ShardHeader, ...]
    tensors: Mapping[str, TensorEntry]

    @property
    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.tensors.values())


def parse_header(data: bytes, *, path: Path, file_size: int) -> ShardHeader:
    """Parse and validate a header from the first bytes of a file (pure; used by the fuzzer).

    ``data`` holds at least the 8-byte length prefix and the header it announces; ``file_size``
    is the file's length, checked against the last tensor's end.
    """
    raise NotImplementedError


def read_shard_header(path: Path) -> ShardHeader:
    """Read and validate one file's header (two small reads; no tensor data)."""
    raise NotImplementedError


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint directory (index + shards, or one ``model.safetensors``, or exactly one
    ``*.safetensors``) or a single ``.safetensors`` file, and validate every header."""
    raise NotImplementedError
