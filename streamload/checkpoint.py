"""Safetensors headers and sharded indexes -> validated tensor entries.

Reads only headers: no tensor data is touched. Standard library only.

File format (https://github.com/huggingface/safetensors): 8 bytes little-endian ``u64`` header
length ``N``, then ``N`` bytes of UTF-8 JSON object mapping tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data region that
starts at ``8 + N``), plus an optional ``"__metadata__"`` string map. Tensors must tile the data
region exactly: sorted by offset, no gaps, no overlap, starting at 0.

What is rejected, and as what (every message names the file, and the tensor when one is
involved; foreign errors are chained with ``raise ... from``):

- ``CorruptHeaderError``: a file under 8 bytes; a header length over ``MAX_HEADER_BYTES`` or
  past the end of the file; a header that is not UTF-8, not JSON, not an object; an entry that
  is not an object or lacks ``dtype``/``shape``/``data_offsets``; a non-string dtype; a shape
  that is not a list of non-negative integers (``true`` is not an integer); offsets that are not
  two integers in ``[0, 2**64)``, are reversed, overlap, leave a hole, or span a byte count other
  than elements x dtype size; bytes after the last tensor (as the reference implementation,
  which requires the file to end exactly there); an ``__metadata__`` that is not a string map
  (``null`` reads as empty). A malformed ``*.index.json`` is reported the same way.
- ``UnsupportedDtypeError``: a dtype code not in ``DTYPE_SIZES``.
- ``TruncatedDataError``: a tensor that ends past the end of the file.
- ``MissingShardError``, ``IndexMismatchError``: see ``open_checkpoint``.
- ``CheckpointError``: a path that does not exist or cannot be read; a directory without a
  checkpoint, or with several ``*.safetensors`` and no index.
"""

from __future__ import annotations

import json
import math
import operator
import os
import reprlib
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

from streamload.errors import (
    CheckpointError,
    CorruptHeaderError,
    IndexMismatchError,
    MissingShardError,
    TruncatedDataError,
    UnsupportedDtypeError,
)

__all__ = [
    "DTYPE_SIZES",
    "FLOAT_CODES",
    "INDEX_NAME",
    "MAX_HEADER_BYTES",
    "Checkpoint",
    "ShardHeader",
    "TensorEntry",
    "checked_checkpoint",
    "open_checkpoint",
    "parse_header",
    "parse_index",
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
    """Where one tensor's bytes live: ``path`` at absolute byte ``offset``, ``nbytes`` long.

    A slice of a stored tensor (a tensor-parallel shard split along a dimension other than the
    first) is strided: ``rows`` runs of ``row_bytes`` each, the first at ``offset``, each next
    one ``row_stride`` bytes after the one before. A whole tensor, or a slice along its first
    dimension, is one run (``rows == 1``).
    """

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    rows: int = 1
    row_stride: int = 0

    @property
    def row_bytes(self) -> int:
        """Bytes of one run (all of ``nbytes`` for a contiguous entry)."""
        return self.nbytes // self.rows if self.rows > 1 else self.nbytes

    @property
    def contiguous(self) -> bool:
        return self.rows == 1

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def end(self) -> int:
        """One past the entry's last byte in its file."""
        if self.rows > 1:
            return self.offset + (self.rows - 1) * self.row_stride + self.row_bytes
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
    is the file's length, checked against the last tensor's end. Entries carry ``path`` as
    given. Raises ``CorruptHeaderError``, ``UnsupportedDtypeError`` or ``TruncatedDataError``
    naming ``path`` (and the tensor, when one is involved); never any other exception.
    """
    return _parse(data, display=path, stored=path, file_size=file_size)


def read_shard_header(path: Path) -> ShardHeader:
    """Read and validate one file's header (two small reads; no tensor data).

    The returned paths are resolved (symlinks followed); error messages name ``path`` as given.
    A file that cannot be opened or read raises ``CheckpointError``.
    """
    return _read_shard(Path(path).absolute(), missing=CheckpointError)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint directory (index + shards, or one ``model.safetensors``, or exactly one
    ``*.safetensors``) or a single ``.safetensors`` file, and validate every header.

    ``path`` may also name an ``*.index.json`` file directly. With an index, the index is the
    source of truth and must agree with the shards exactly: a shard it names must exist
    (``MissingShardError``); every tensor it lists must be in the shard it names, no tensor may
    be in two shards, and no shard may hold a tensor the index does not list
    (``IndexMismatchError`` for all three). Files in the directory that the index does not name
    are ignored (e.g. a ``consolidated.safetensors`` beside the shards). Without an index,
    ``model.safetensors`` is used if present, else the directory's only ``*.safetensors``;
    several candidates raise ``CheckpointError`` naming them. The index's
    ``metadata.total_size`` is not checked (published checkpoints often get it wrong).
    Malformed index JSON raises ``CorruptHeaderError`` naming the index.
    """
    given = Path(path).absolute()
    try:
        mode = given.stat().st_mode
    except FileNotFoundError as exc:
        raise CheckpointError(given, "no such file or directory") from exc
    except OSError as exc:
        raise CheckpointError(given, f"cannot access: {_os_problem(exc)}") from exc
    if stat.S_ISDIR(mode):
        return _open_directory(given)
    if not stat.S_ISREG(mode):
        raise CheckpointError(given, "is neither a regular file nor a directory")
    if given.name.endswith(".index.json"):
        return _open_sharded(given.parent, given)
    return _single(given.parent, given)


# --- private helpers --------------------------------------------------------------------------

_PREFIX = struct.Struct("<Q")
_U64_MAX = 2**64 - 1
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_DECODER = json.JSONDecoder()
_JSON_SPACE = " \t\n\r"  # the whitespace JSON allows around a value
_FIRST_READ = 4096  # one page: the prefix and, for most shards, the whole header
# (begin, end) relative to the data region, then name: the order tensors are checked in.
_BY_SPAN = operator.attrgetter("offset", "nbytes", "name")
# (begin, end, name) of one entry, for the tiling check's messages.
_Span = tuple[int, int, str]


def _parse(data: bytes, *, display: Path, stored: Path, file_size: int) -> ShardHeader:
    """``parse_header`` with separate paths for messages (as given) and entries (resolved)."""
    if file_size < _PREFIX.size:
        what = "empty" if file_size == 0 else f"{file_size} bytes long"
        raise CorruptHeaderError(display, f"file is {what}; a safetensors file has at least 8")
    if len(data) < _PREFIX.size:
        raise CorruptHeaderError(display, f"only {len(data)} bytes of the 8-byte prefix read")
    (header_len,) = _PREFIX.unpack_from(data)
    if _not_safetensors(data, header_len, file_size):
        raise CorruptHeaderError(
            display,
            "not a safetensors file: it does not start with an 8-byte header length and a "
            f"JSON header, but with {_short(data[:16])}",
        )
    if header_len > MAX_HEADER_BYTES:
        raise CorruptHeaderError(
            display, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
        )
    data_offset = _PREFIX.size + header_len
    if data_offset > file_size:
        raise CorruptHeaderError(
            display, f"header length {header_len} runs past the end of the {file_size}-byte file"
        )
    if len(data) < data_offset:
        raise CorruptHeaderError(
            display, f"header is {header_len} bytes but only {len(data) - 8} were read"
        )
    document = _load_json(data[_PREFIX.size : data_offset], display, "header")
    if not isinstance(document, dict):
        raise CorruptHeaderError(display, f"header is a JSON {_kind(document)}, not an object")
    metadata = _metadata(document.pop("__metadata__", None), display)
    tensors = [_entry(name, info, display, stored, data_offset) for name, info in document.items()]
    if not _tiles(tensors, data_offset, file_size):  # writers list tensors in offset order
        tensors.sort(key=_BY_SPAN)  # zero-sized tensors sharing an offset go by name
        raws = [(e.offset - data_offset, e.end - data_offset, e.name) for e in tensors]
        _check_tiling(raws, display, region=file_size - data_offset, data_offset=data_offset)
    return ShardHeader(stored, file_size, data_offset, tuple(tensors), metadata)


def _not_safetensors(data: bytes, header_len: int, file_size: int) -> bool:
    """Whether the file is plainly something else (a ``config.json``, a pickle): its first 8
    bytes read as a header length that cannot be (over the limit or past the end of the file)
    and no JSON object follows them. Every safetensors writer puts ``{`` right after the
    length, so a file that has one there is reported as a corrupt safetensors file instead."""
    implausible = header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > file_size
    return implausible and data[_PREFIX.size : _PREFIX.size + 1] != b"{"


def _metadata(value: object, path: Path) -> dict[str, str]:
    """``__metadata__``: absent or null means empty; else a JSON object of strings to strings."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CorruptHeaderError(path, f"__metadata__ is a JSON {_kind(value)}, not an object")
    for key, item in value.items():
        if not isinstance(item, str):
            raise CorruptHeaderError(
                path, f"__metadata__[{key!r}] is a JSON {_kind(item)}, not a string"
            )
    return value


# Slot setters of ``TensorEntry``'s fields, in order (unpacking fails if a field is added).
_SET_NAME, _SET_PATH, _SET_DTYPE, _SET_SHAPE, _SET_OFFSET, _SET_NBYTES, _SET_ROWS, _SET_STRIDE = (
    getattr(TensorEntry, field.name).__set__ for field in fields(TensorEntry)
)


def _new_entry(
    name: str, path: Path, dtype: str, shape: tuple[int, ...], offset: int, nbytes: int
) -> TensorEntry:
    """``TensorEntry(name, path, dtype, shape, offset, nbytes)`` in half the time.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``; a big
    checkpoint has thousands of entries, so this sets the slots directly (``TensorEntry`` has
    no ``__post_init__`` to run).
    """
    entry = object.__new__(TensorEntry)
    _SET_NAME(entry, name)
    _SET_PATH(entry, path)
    _SET_DTYPE(entry, dtype)
    _SET_SHAPE(entry, shape)
    _SET_OFFSET(entry, offset)
    _SET_NBYTES(entry, nbytes)
    _SET_ROWS(entry, 1)
    _SET_STRIDE(entry, 0)
    return entry


def _entry(name: str, info: object, path: Path, stored: Path, data_offset: int) -> TensorEntry:
    """Validate one tensor entry on its own (types, dtype, byte length) and build it.

    The common case (a well-formed entry) takes a lean path; anything unusual goes through
    ``_checked_entry``, which names the exact problem. Messages name ``path``; the entry
    carries ``stored`` and the absolute offset.
    """
    if type(info) is dict:
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if type(dtype) is str and type(shape) is list and type(offsets) is list:
            nbytes = DTYPE_SIZES.get(dtype)
            if nbytes is not None and len(offsets) == 2:
                begin, end = offsets
                ok = type(begin) is int and type(end) is int and 0 <= begin <= end <= _U64_MAX
                for dim in shape:
                    if type(dim) is not int or dim < 0:
                        ok = False
                        break
                    nbytes *= dim
                if ok and end - begin == nbytes:
                    return _new_entry(
                        name, stored, dtype, tuple(shape), data_offset + begin, nbytes
                    )
    begin, end, dtype, shape = _checked_entry(name, info, path)
    return TensorEntry(name, stored, dtype, shape, data_offset + begin, end - begin)


def _checked_entry(name: str, info: object, path: Path) -> tuple[int, int, str, tuple[int, ...]]:
    """``_entry`` for entries that failed the lean path: raises naming the exact problem."""
    if not isinstance(info, dict):
        raise CorruptHeaderError(path, f"entry is a JSON {_kind(info)}, not an object", tensor=name)
    missing = [field for field in _ENTRY_FIELDS if field not in info]
    if missing:
        raise CorruptHeaderError(path, f"entry lacks {', '.join(missing)}", tensor=name)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if type(dtype) is not str:
        raise CorruptHeaderError(path, f"dtype is a JSON {_kind(dtype)}, not a string", tensor=name)
    itemsize = DTYPE_SIZES.get(dtype)
    if itemsize is None:
        known = ", ".join(DTYPE_SIZES)
        raise UnsupportedDtypeError(
            path, f"dtype {_short(dtype)} is not supported (known: {known})", tensor=name
        )
    if type(shape) is not list or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise CorruptHeaderError(
            path, f"shape {_short(shape)} is not a list of non-negative integers", tensor=name
        )
    if (
        type(offsets) is not list
        or len(offsets) != 2
        or not all(type(o) is int and 0 <= o <= _U64_MAX for o in offsets)
    ):
        raise CorruptHeaderError(
            path,
            f"data_offsets {_short(offsets)} are not two integers in [0, 2**64)",
            tensor=name,
        )
    begin, end = offsets
    if end < begin:
        raise CorruptHeaderError(
            path, f"data_offsets [{begin}, {end}] are reversed (end < begin)", tensor=name
        )
    expected = math.prod(shape) * itemsize
    if end - begin != expected:
        raise CorruptHeaderError(
            path,
            f"data_offsets [{begin}, {end}] span {end - begin} bytes but {dtype} "
            f"{tuple(shape)} needs {expected}",
            tensor=name,
        )
    return begin, end, dtype, tuple(shape)


def _tiles(tensors: list[TensorEntry], data_offset: int, file_size: int) -> bool:
    """Whether the entries, in the order given, cover the data region exactly, none of them
    empty (so they are in offset order and no two share one); ``_check_tiling`` decides the
    rest once they are sorted."""
    cursor = data_offset
    for entry in tensors:
        if entry.offset != cursor or not entry.nbytes:
            return False
        cursor += entry.nbytes
    return cursor == file_size


def _check_tiling(raws: list[_Span], path: Path, *, region: int, data_offset: int) -> None:
    """Sorted entries must cover ``[0, region)`` exactly: no hole, no overlap, no tail."""
    cursor = 0
    previous = ""
    for begin, end, name in raws:
        if begin < cursor:
            raise CorruptHeaderError(
                path,
                f"data_offsets [{begin}, {end}] overlap tensor {previous!r} (ends at {cursor})",
                tensor=name,
            )
        if begin > cursor:
            after = f"after tensor {previous!r}" if cursor else "at the start of the data region"
            raise CorruptHeaderError(
                path,
                f"{begin - cursor}-byte hole {after}: data_offsets [{begin}, {end}] "
                f"should begin at {cursor}",
                tensor=name,
            )
        cursor, previous = end, name
    if cursor > region:
        begin, end, name = next(raw for raw in raws if raw[1] > region)
        raise TruncatedDataError(
            path,
            f"ends at byte {data_offset + end} but the file has only {data_offset + region}",
            tensor=name,
        )
    if cursor < region:
        raise CorruptHeaderError(
            path, f"{region - cursor} bytes after the last tensor are not described by the header"
        )


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (fewer only at end of file)."""
    parts = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _read_shard(
    path: Path, *, missing: type[CheckpointError], stored: Path | None = None
) -> ShardHeader:
    """Open ``path`` (absolute, as the user named it), read prefix + header, validate.

    Entries carry ``stored``: a caller that knows ``path`` is no symlink passes its resolved
    directory joined with the file name (one resolve per directory, not per shard). ``None``:
    ``path`` resolved.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
        try:
            file_size = os.fstat(fd).st_size
            data = os.pread(fd, _FIRST_READ, 0)
            if len(data) >= _PREFIX.size:
                (header_len,) = _PREFIX.unpack_from(data)
                end = _PREFIX.size + header_len
                if header_len <= MAX_HEADER_BYTES and len(data) < end <= file_size:
                    data += _pread_all(fd, end - len(data), len(data))
        finally:
            os.close(fd)
        if stored is None:
            stored = path.resolve()
    except FileNotFoundError as exc:
        raise missing(path, "no such file") from exc
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {_os_problem(exc)}") from exc
    return _parse(data, display=path, stored=stored, file_size=file_size)


def _open_directory(directory: Path) -> Checkpoint:
    index = directory / INDEX_NAME
    if index.is_file():
        return _open_sharded(directory, index)
    try:
        with os.scandir(directory) as entries:
            names = sorted(
                entry.name
                for entry in entries
                if entry.name.endswith(".safetensors") and entry.is_file()
            )
    except OSError as exc:
        raise CheckpointError(directory, f"cannot list: {_os_problem(exc)}") from exc
    if not names:
        raise CheckpointError(directory, f"holds no *.safetensors file and no {INDEX_NAME}")
    if "model.safetensors" in names:
        return _single(directory, directory / "model.safetensors")
    if len(names) > 1:
        raise CheckpointError(
            directory,
            f"holds {len(names)} *.safetensors files ({', '.join(names)}) but no {INDEX_NAME} "
            "saying how they fit together; open one file directly or add the index",
        )
    return _single(directory, directory / names[0])


def _single(directory: Path, file: Path) -> Checkpoint:
    header = _read_shard(file, missing=CheckpointError)
    tensors = {entry.name: entry for entry in header.tensors}
    return Checkpoint(root=_resolve(directory), shards=(header,), tensors=tensors)


def _open_sharded(directory: Path, index: Path) -> Checkpoint:
    weight_map, shard_names = _read_index(index)
    root = _resolve(directory)
    resolved = root == directory
    listing = _listing(directory)
    headers = []
    for shard in shard_names:
        path = directory / shard
        if "/" in shard or "\\" in shard or _is_link(shard, path, listing):
            stored = None  # in a subdirectory, or a symlink: resolved on its own
        else:
            stored = path if resolved else root / shard
        headers.append(_read_shard(path, missing=MissingShardError, stored=stored))
    return checked_checkpoint(root, index, weight_map, shard_names, headers)


def checked_checkpoint(
    root: Path,
    index: Path,
    weight_map: Mapping[str, str],
    shard_names: list[str],
    headers: list[ShardHeader],
) -> Checkpoint:
    """The checkpoint of ``headers`` (of ``shard_names``, in that order), checked against the
    index's ``weight_map`` exactly as ``open_checkpoint`` checks a local one (pure: a source
    that fetched the index and the headers itself uses it too)."""
    directory = index.parent
    tensors = {entry.name: entry for header in headers for entry in header.tensors}
    placed = {
        e.name: shard for shard, h in zip(shard_names, headers, strict=True) for e in h.tensors
    }
    if placed != weight_map or len(tensors) != sum(len(h.tensors) for h in headers):
        _check_against_index(directory, index, weight_map, shard_names, headers)
    return Checkpoint(root=root, shards=tuple(headers), tensors=tensors)


def _check_against_index(
    directory: Path,
    index: Path,
    weight_map: Mapping[str, str],
    shard_names: list[str],
    headers: list[ShardHeader],
) -> None:
    """Name the first disagreement between index and shards (``_open_sharded`` found one)."""
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    tensors: dict[str, TensorEntry] = {}
    for shard, header in zip(shard_names, headers, strict=True):
        for entry in header.tensors:
            first = tensors.setdefault(entry.name, entry)
            if first is not entry:
                other = shard_names[[h.path for h in headers].index(first.path)]
                raise IndexMismatchError(
                    directory / shard,
                    f"tensor is stored in two shards: here and in {other}",
                    tensor=entry.name,
                )
    for shard, header in zip(shard_names, headers, strict=True):
        listed = by_shard[shard]
        held = {entry.name for entry in header.tensors}
        for name in listed:
            if name not in held:
                raise IndexMismatchError(
                    directory / shard,
                    f"{index.name} places the tensor in this shard, which does not hold it",
                    tensor=name,
                )
        if len(held) != len(listed):  # listed is a subset of held here
            extra = next(e.name for e in header.tensors if weight_map.get(e.name) != shard)
            problem = (
                f"shard holds a tensor that {index.name} does not list"
                if extra not in weight_map
                else f"shard holds a tensor that {index.name} places in {weight_map[extra]}"
            )
            raise IndexMismatchError(directory / shard, problem, tensor=extra)


def _listing(directory: Path) -> dict[str, bool] | None:
    """``{name: is a symlink}`` for ``directory`` (one listing, not a ``stat`` per shard);
    ``None`` if it cannot be listed (the shards may still be readable)."""
    try:
        with os.scandir(directory) as entries:
            return {entry.name: entry.is_symlink() for entry in entries}
    except OSError:
        return None


def _is_link(name: str, path: Path, listing: dict[str, bool] | None) -> bool:
    """Whether ``path`` (``directory / name``) is a symlink: from ``_listing`` when it has the
    name as given, else (no listing, or a file system that matches names loosely) asked."""
    link = None if listing is None else listing.get(name)
    return os.path.islink(path) if link is None else link


def _read_index(index: Path) -> tuple[dict[str, str], list[str]]:
    """Read ``*.index.json``; return its ``weight_map`` (tensor name -> shard file name) and the
    shard names it uses, sorted."""
    try:
        raw = index.read_bytes()
    except OSError as exc:
        raise CheckpointError(index, f"cannot read: {_os_problem(exc)}") from exc
    return parse_index(raw, index)


def parse_index(raw: bytes, index: Path) -> tuple[dict[str, str], list[str]]:
    """Parse the bytes of ``*.index.json`` (pure): its ``weight_map`` and the shard names it
    uses, sorted, each checked to stay inside the checkpoint. ``CorruptHeaderError`` naming
    ``index`` when malformed."""
    weight_map, shards = _parse_index(raw, index)
    for shard in shards:
        _check_shard_name(shard, index)
    return weight_map, shards


def _parse_index(raw: bytes, index: Path) -> tuple[dict[str, str], list[str]]:
    document = _load_json(raw, index, "index")
    if not isinstance(document, dict):
        raise CorruptHeaderError(index, f"index is a JSON {_kind(document)}, not an object")
    if "weight_map" not in document:
        raise CorruptHeaderError(index, "index has no 'weight_map'")
    weight_map = document["weight_map"]
    if not isinstance(weight_map, dict):
        raise CorruptHeaderError(index, f"weight_map is a JSON {_kind(weight_map)}, not an object")
    if not weight_map:
        raise CorruptHeaderError(index, "weight_map is empty")
    try:
        shards = set(weight_map.values())  # a few hundred names to check, not every tensor's
    except TypeError:  # an unhashable value: checked below
        shards = set()
    if not shards or not all(isinstance(shard, str) and shard for shard in shards):
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise CorruptHeaderError(
                    index, f"weight_map value {_short(shard)} is not a file name", tensor=name
                )
    return weight_map, sorted(shards)


def _check_shard_name(shard: str, index: Path) -> None:
    """A shard must be a relative path inside the checkpoint directory."""
    if "/" not in shard and "\\" not in shard and shard != "..":
        return  # a plain file name (almost always): nothing to split
    parts = PurePosixPath(shard.replace("\\", "/")).parts
    if shard.startswith(("/", "\\")) or os.path.isabs(shard) or ".." in parts:
        raise CorruptHeaderError(
            index, f"shard name {shard!r} points outside the checkpoint directory"
        )


def _load_json(raw: bytes, path: Path, what: str) -> object:
    """The one place JSON and UTF-8 failures become ``CorruptHeaderError``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptHeaderError(path, f"{what} is not UTF-8 (bad byte at {exc.start})") from exc
    try:
        document, end = _DECODER.raw_decode(text)  # json.loads less its per-call checks
        if end == len(text) or not text[end:].strip(_JSON_SPACE):
            return document
    except (ValueError, RecursionError):
        pass  # leading space, a BOM, a broken document: json.loads below decides, as before
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptHeaderError(
            path, f"{what} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except (ValueError, RecursionError) as exc:  # over-long integer literal, deep nesting
        raise CorruptHeaderError(path, f"{what} is not usable JSON: {exc}") from exc


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError as exc:
        raise CheckpointError(path, f"cannot resolve: {_os_problem(exc)}") from exc


def _os_problem(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _kind(value: object) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _short(value: object) -> str:
    """A bounded ``repr`` for messages (headers can hold arbitrarily large values)."""
    return reprlib.repr(value)
