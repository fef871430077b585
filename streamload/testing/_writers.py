"""Checkpoint writers for tests, benchmarks and demos.

Three ways to put a checkpoint on disk:

- ``write_safetensors``: real tensors, one file, through ``safetensors.torch.save_file``.
- ``write_sparse_safetensors``: a real header for tensors described only by ``TensorShape``,
  and a data region that is a file hole, so a 70B- or 405B-shaped file costs no disk (it reads
  back as zeros).
- ``write_sharded``: a Hugging Face style directory (``model-00001-of-00004.safetensors`` ...,
  ``model.safetensors.index.json``, optional ``config.json``) in either form.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamload.checkpoint import DTYPE_SIZES, INDEX_NAME
from streamload.params import dtype_code, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = [
    "TensorShape",
    "dtype_code",
    "write_safetensors",
    "write_sharded",
    "write_sparse_safetensors",
]

_SHARD_METADATA: Mapping[str, str] = {"format": "pt"}


@dataclass(frozen=True, slots=True)
class TensorShape:
    """A tensor described without data: safetensors dtype code (``"BF16"``) and shape.

    Raises ``ValueError`` for a dtype code streamload does not know or a negative dimension.
    """

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"unknown dtype code {self.dtype!r}; known: {', '.join(DTYPE_SIZES)}")
        if any(dim < 0 for dim in self.shape):
            raise ValueError(f"shape {self.shape} has a negative dimension")

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in its dtype."""
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorShape:
        """The dtype code and shape of a real tensor."""
        return cls(dtype_code(tensor.dtype), tuple(tensor.shape))


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write real tensors to one safetensors file with ``safetensors.torch.save_file``.

    Tensors are made contiguous and moved to the CPU first; a tensor sharing storage with an
    earlier one (tied weights) is written as its own copy, so each name gets its own bytes.
    Creates missing parent directories; returns the file's path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        plain = tensor.detach().to("cpu").contiguous()
        if plain.numel():
            storage = plain.untyped_storage().data_ptr()
            if storage in storages:
                plain = plain.clone()
            storages.add(storage)
        prepared[name] = plain
    from safetensors.torch import save_file

    save_file(prepared, str(target), metadata=None if metadata is None else dict(metadata))
    return target


def write_sparse_safetensors(
    path: str | Path,
    shapes: Mapping[str, TensorShape],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a safetensors file whose data region is a file hole (reads back as zeros).

    The header is real and valid (padded with spaces to a multiple of 8 bytes, as
    ``safetensors`` does); tensors are laid out in the order of ``shapes``. The file is
    extended to its full size with ``truncate``, so on file systems with sparse files it takes
    almost no disk however large the model. Creates missing parent directories; returns the path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    header = _header_bytes(shapes, metadata)
    data_bytes = sum(shape.nbytes for shape in shapes.values())
    with open(target, "wb") as file:
        file.write(header)
        file.truncate(len(header) + data_bytes)
    return target


def write_sharded(
    directory: str | Path,
    shapes_or_tensors: Mapping[str, TensorShape | torch.Tensor],
    *,
    num_shards: int | None = None,
    max_shard_bytes: int | None = None,
    sparse: bool,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory in the Hugging Face layout; returns the directory.

    Tensors are split in the given order into contiguous shards: ``num_shards`` of about equal
    bytes (each non-empty), or as many as needed so that none exceeds ``max_shard_bytes``
    (a single tensor larger than that gets a shard of its own); with neither, one shard.
    Shards are named ``model-00001-of-00003.safetensors`` and listed in
    ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": ...}``);
    a single shard is written as plain ``model.safetensors`` with no index. ``config`` is
    written as ``config.json`` when given.

    ``sparse=True`` writes every tensor with ``write_sparse_safetensors`` (real tensors count
    only by dtype and shape). ``sparse=False`` writes real bytes with ``write_safetensors``;
    a ``TensorShape`` is then written as zeros, which costs its full size in memory and disk.
    """
    if num_shards is not None and max_shard_bytes is not None:
        raise ValueError("give num_shards or max_shard_bytes, not both")
    if not shapes_or_tensors:
        raise ValueError("a checkpoint needs at least one tensor")
    names = list(shapes_or_tensors)
    sizes = [_nbytes(value) for value in shapes_or_tensors.values()]
    if max_shard_bytes is not None:
        groups = _split_by_bytes(sizes, max_shard_bytes)
    else:
        groups = _split_by_count(sizes, 1 if num_shards is None else num_shards)

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    count = len(groups)
    weight_map: dict[str, str] = {}
    for number, (start, stop) in enumerate(groups, start=1):
        shard = (
            "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        )
        part = {name: shapes_or_tensors[name] for name in names[start:stop]}
        _write_shard(root / shard, part, sparse=sparse)
        weight_map.update(dict.fromkeys(part, shard))
    if count > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if config is not None:
        (root / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return root


def _write_shard(
    path: Path, part: Mapping[str, TensorShape | torch.Tensor], *, sparse: bool
) -> None:
    if sparse:
        shapes = {
            name: value if isinstance(value, TensorShape) else TensorShape.of(value)
            for name, value in part.items()
        }
        write_sparse_safetensors(path, shapes, _SHARD_METADATA)
        return
    tensors = {
        name: _zeros(value) if isinstance(value, TensorShape) else value
        for name, value in part.items()
    }
    write_safetensors(path, tensors, _SHARD_METADATA)


def _zeros(shape: TensorShape) -> torch.Tensor:
    import torch

    return torch.zeros(shape.shape, dtype=torch_dtype(shape.dtype))


def _nbytes(value: TensorShape | torch.Tensor) -> int:
    if isinstance(value, TensorShape):
        return value.nbytes
    return TensorShape.of(value).nbytes


def _header_bytes(shapes: Mapping[str, TensorShape], metadata: Mapping[str, str] | None) -> bytes:
    """Length prefix + JSON header (space-padded to 8 bytes), tensors in the given order."""
    document: dict[str, Any] = {}
    if metadata is not None:
        document["__metadata__"] = dict(metadata)
    begin = 0
    for name, shape in shapes.items():
        end = begin + shape.nbytes
        document[name] = {
            "dtype": shape.dtype,
            "shape": list(shape.shape),
            "data_offsets": [begin, end],
        }
        begin = end
    text = json.dumps(document, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _split_by_bytes(sizes: list[int], max_shard_bytes: int) -> list[tuple[int, int]]:
    """Greedy: start a new shard when the next tensor would push this one past the limit."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    groups: list[tuple[int, int]] = []
    start, used = 0, 0
    for i, size in enumerate(sizes):
        if i > start and used + size > max_shard_bytes:
            groups.append((start, i))
            start, used = i, 0
        used += size
    groups.append((start, len(sizes)))
    return groups


def _split_by_count(sizes: list[int], num_shards: int) -> list[tuple[int, int]]:
    """``num_shards`` contiguous non-empty groups; a group closes once it reaches its share of
    the total bytes, or when every remaining tensor is needed to fill the remaining shards."""
    if not 1 <= num_shards <= len(sizes):
        raise ValueError(f"num_shards must be in [1, {len(sizes)}] for {len(sizes)} tensors")
    total = sum(sizes)
    groups: list[tuple[int, int]] = []
    start, done = 0, 0
    for i, size in enumerate(sizes):
        opened = len(groups) + 1  # the group being filled
        still_needed = num_shards - opened
        if i > start and still_needed > 0:
            reached_share = done * num_shards >= total * opened
            if reached_share or len(sizes) - i == still_needed:
                groups.append((start, i))
                start = i
        done += size
    groups.append((start, len(sizes)))
    return groups
