"""Tests for ``streamload.checkpoint``: golden bytes, one test per bad input, sharded indexes,
agreement with ``safetensors.safe_open``, and a fuzzer over ``parse_header``."""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from streamload.checkpoint import (
    DTYPE_SIZES,
    INDEX_NAME,
    MAX_HEADER_BYTES,
    Checkpoint,
    ShardHeader,
    TensorEntry,
    open_checkpoint,
    parse_header,
    read_shard_header,
)
from streamload.errors import (
    CheckpointError,
    CorruptHeaderError,
    IndexMismatchError,
    MissingShardError,
    StreamloadError,
    TruncatedDataError,
    UnsupportedDtypeError,
)

FUZZ_PATH = Path("fuzz.safetensors")


def golden(header: Mapping[str, Any] | bytes, data: bytes = b"") -> bytes:
    """File bytes built by hand: ``u64`` little-endian length, header, data region."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write(directory: Path, name: str, blob: bytes) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


def assert_names(exc: CheckpointError, path: Path, tensor: str | None) -> None:
    """The message names the file, and the tensor when one is involved."""
    message = str(exc)
    assert str(path) in message
    assert path == exc.path
    assert tensor == exc.tensor
    if tensor is not None:
        assert f"tensor {tensor!r}" in message


# --- golden bytes ---------------------------------------------------------------------------


def test_parse_header_golden_bytes() -> None:
    """Entries come back sorted by offset with absolute offsets, exact dtype, shape and size."""
    header = {
        "b": entry("BF16", [2, 3], 16, 28),
        "__metadata__": {"format": "pt"},
        "a": entry("F32", [4], 0, 16),
        "c": entry("U8", [], 28, 29),
    }
    blob = golden(header, bytes(29))
    header_len = len(blob) - 29
    path = Path("golden.safetensors")
    expected = ShardHeader(
        path=path,
        file_size=len(blob),
        data_offset=header_len,
        tensors=(
            TensorEntry("a", path, "F32", (4,), header_len, 16),
            TensorEntry("b", path, "BF16", (2, 3), header_len + 16, 12),
            TensorEntry("c", path, "U8", (), header_len + 28, 1),
        ),
        metadata={"format": "pt"},
    )

    actual = parse_header(blob, path=path, file_size=len(blob))

    assert expected == actual


def test_parse_header_ignores_data_after_the_header() -> None:
    """``data`` may hold more than prefix + header (e.g. a whole file): only the header is read."""
    blob = golden({"a": entry("I64", [1], 0, 8)}, b"\x01" * 8)
    path = Path("x.safetensors")

    actual = parse_header(blob, path=path, file_size=len(blob))

    assert (TensorEntry("a", path, "I64", (1,), len(blob) - 8, 8),) == actual.tensors


def test_parse_header_zero_sized_tensors_and_padding() -> None:
    """Zero-element tensors sit at their offset without overlap; space padding is accepted."""
    text = json.dumps(
        {"e": entry("F16", [0, 5], 4, 4), "a": entry("F32", [1], 0, 4), "z": entry("I8", [0], 0, 0)}
    ).encode()
    text += b" " * (-len(text) % 8)
    blob = golden(text, bytes(4))
    path = Path("p.safetensors")
    start = 8 + len(text)

    actual = parse_header(blob, path=path, file_size=len(blob))

    expected = (
        TensorEntry("z", path, "I8", (0,), start, 0),
        TensorEntry("a", path, "F32", (1,), start, 4),
        TensorEntry("e", path, "F16", (0, 5), start + 4, 0),
    )
    assert expected == actual.tensors
    assert {} == actual.metadata


def test_parse_header_empty_object_is_an_empty_file() -> None:
    """``{}`` is a valid header with no tensors (safetensors writes it for an empty dict)."""
    blob = golden(b"{}")

    actual = parse_header(blob, path=FUZZ_PATH, file_size=len(blob))

    assert ((), 10) == (actual.tensors, actual.data_offset)


def test_parse_header_null_metadata_is_empty() -> None:
    """``"__metadata__": null`` reads as no metadata, like the reference implementation."""
    blob = golden({"__metadata__": None})

    assert {} == parse_header(blob, path=FUZZ_PATH, file_size=len(blob)).metadata


@pytest.mark.parametrize(
    "text",
    ["{}", "  {}", "{}   ", "{} \t\n\r", "\n{}\n", "{}\x0c", "{} x", "{}{}", "\ufeff{}", "", "  "],
    ids=["plain", "leading-space", "padding", "json-space", "newlines", "form-feed",
         "trailing-text", "two-objects", "bom", "empty", "only-space"],
)  # fmt: skip
def test_header_json_reads_as_json_loads_does(text: str) -> None:
    """Whitespace around the object is accepted exactly where ``json.loads`` accepts it, and
    anything else is refused with ``json.loads``'s own reason."""
    blob = golden(text.encode())
    try:
        json.loads(text)
        expected = None
    except json.JSONDecodeError as exc:
        expected = f"header is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"

    try:
        parse_header(blob, path=FUZZ_PATH, file_size=len(blob))
        actual = None
    except CorruptHeaderError as exc:
        actual = exc.problem

    assert expected == actual


def test_read_shard_header_reads_file_and_resolves_path(tmp_path: Path) -> None:
    """Reading from disk gives the same entries as parsing, with the path resolved."""
    target = write(
        tmp_path, "real/model.safetensors", golden({"w": entry("F64", [2], 0, 16)}, bytes(16))
    )
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)

    actual = read_shard_header(link)

    size = target.stat().st_size
    expected = ShardHeader(
        path=target.resolve(),
        file_size=size,
        data_offset=size - 16,
        tensors=(TensorEntry("w", target.resolve(), "F64", (2,), size - 16, 16),),
        metadata={},
    )
    assert expected == actual


@pytest.mark.parametrize("tensors", [1, 48, 400], ids=["small", "across-a-page", "many-pages"])
def test_read_shard_header_of_any_length_equals_parse(tmp_path: Path, tensors: int) -> None:
    """Headers shorter and longer than a page read from disk as parsing the whole file does."""
    header = {
        f"model.layers.{i}.weight": entry("F32", [2], 8 * i, 8 * i + 8) for i in range(tensors)
    }
    blob = golden(header, bytes(8 * tensors))
    path = write(tmp_path, "model.safetensors", blob)

    actual = read_shard_header(path)

    assert parse_header(blob, path=path.resolve(), file_size=len(blob)) == actual


def test_entries_match_safe_open(tmp_path: Path) -> None:
    """For a file from ``save_file``, dtype, shape and the bytes at ``offset`` match safetensors."""
    tensors = {
        "f32": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "bf16": torch.linspace(-1, 1, 10, dtype=torch.bfloat16),
        "f16": torch.ones(2, 2, 2, dtype=torch.float16),
        "i64": torch.tensor([1, -2, 3], dtype=torch.int64),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.arange(7, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "fp8": torch.tensor([0.5, 2.0], dtype=torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.float32),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})

    header = read_shard_header(path)

    expected = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            view = handle.get_slice(name)
            expected[name] = (view.get_dtype(), tuple(view.get_shape()), _raw(tensors[name]))
    raw = path.read_bytes()
    actual = {
        e.name: (e.dtype, e.shape, raw[e.offset : e.offset + e.nbytes]) for e in header.tensors
    }
    assert expected == actual
    assert {"format": "pt"} == header.metadata


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# --- one test per bad header ----------------------------------------------------------------


class Bad(NamedTuple):
    blob: bytes
    error: type[CheckpointError]
    tensor: str | None


F32_2 = entry("F32", [2], 0, 8)
BAD_HEADERS: dict[str, Bad] = {
    "empty-file": Bad(b"", CorruptHeaderError, None),
    "shorter-than-prefix": Bad(b"\x02\x00\x00\x00\x00\x00\x00", CorruptHeaderError, None),
    "header-length-past-eof": Bad(struct.pack("<Q", 100) + b"{}", CorruptHeaderError, None),
    "header-length-over-limit": Bad(
        struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", CorruptHeaderError, None
    ),
    "header-length-2**64-1": Bad(b"\xff" * 8 + b"{}", CorruptHeaderError, None),
    "not-utf8": Bad(golden(b'{"\xff": 1}'), CorruptHeaderError, None),
    "not-json": Bad(golden(b"{not json"), CorruptHeaderError, None),
    "json-but-array": Bad(golden(b"[1, 2]"), CorruptHeaderError, None),
    "json-nested-too-deep": Bad(golden(b"[" * 200_000), CorruptHeaderError, None),
    "json-integer-too-long": Bad(
        golden(b'{"a": {"dtype": "U8", "shape": [' + b"9" * 5000 + b"]}}"), CorruptHeaderError, None
    ),
    "entry-not-object": Bad(golden({"a": [0, 8]}), CorruptHeaderError, "a"),
    "entry-lacks-dtype": Bad(
        golden({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8)), CorruptHeaderError, "a"
    ),
    "entry-lacks-shape": Bad(
        golden({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8)), CorruptHeaderError, "a"
    ),
    "entry-lacks-data-offsets": Bad(
        golden({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), CorruptHeaderError, "a"
    ),
    "metadata-not-object": Bad(golden({"__metadata__": ["x"]}), CorruptHeaderError, None),
    "metadata-value-not-string": Bad(
        golden({"__metadata__": {"format": 1}}), CorruptHeaderError, None
    ),
    "dtype-unknown": Bad(golden({"a": entry("F4", [2], 0, 1)}, b"\0"), UnsupportedDtypeError, "a"),
    "dtype-not-string": Bad(golden({"a": entry(4, [2], 0, 8)}, bytes(8)), CorruptHeaderError, "a"),  # type: ignore[arg-type]
    "shape-negative": Bad(
        golden({"a": entry("F32", [-2], 0, 8)}, bytes(8)), CorruptHeaderError, "a"
    ),
    "shape-float": Bad(golden({"a": entry("F32", [2.0], 0, 8)}, bytes(8)), CorruptHeaderError, "a"),
    "shape-bool": Bad(golden({"a": entry("F32", [True], 0, 4)}, bytes(4)), CorruptHeaderError, "a"),
    "shape-not-list": Bad(golden({"a": entry("F32", 2, 0, 8)}, bytes(8)), CorruptHeaderError, "a"),  # type: ignore[arg-type]
    "offsets-one-int": Bad(
        golden({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1]}}, b"\0"),
        CorruptHeaderError,
        "a",
    ),
    "offsets-three-ints": Bad(
        golden({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, b"\0"),
        CorruptHeaderError,
        "a",
    ),
    "offsets-negative": Bad(golden({"a": entry("U8", [1], -1, 0)}, b"\0"), CorruptHeaderError, "a"),
    "offsets-bool": Bad(
        golden({"a": entry("U8", [1], False, True)}, b"\0"), CorruptHeaderError, "a"
    ),
    "offsets-float": Bad(golden({"a": entry("U8", [1], 0.0, 1.0)}, b"\0"), CorruptHeaderError, "a"),
    "offsets-beyond-u64": Bad(
        golden({"a": entry("U8", [1], 2**64, 2**64 + 1)}, b"\0"), CorruptHeaderError, "a"
    ),
    "offsets-reversed": Bad(golden({"a": entry("U8", [0], 1, 0)}, b"\0"), CorruptHeaderError, "a"),
    "offsets-overlap": Bad(
        golden({"a": F32_2, "b": entry("F32", [2], 4, 12)}, bytes(12)), CorruptHeaderError, "b"
    ),
    "offsets-hole-between": Bad(
        golden({"a": F32_2, "b": entry("F32", [2], 12, 20)}, bytes(20)), CorruptHeaderError, "b"
    ),
    "offsets-hole-at-start": Bad(
        golden({"a": entry("F32", [2], 4, 12)}, bytes(12)), CorruptHeaderError, "a"
    ),
    "bytes-not-elements-x-size": Bad(
        golden({"a": entry("F32", [3], 0, 8)}, bytes(8)), CorruptHeaderError, "a"
    ),
    "bytes-not-elements-x-size-empty": Bad(
        golden({"a": entry("F32", [0], 0, 4)}, bytes(4)), CorruptHeaderError, "a"
    ),
    "data-past-eof": Bad(
        golden({"a": F32_2, "b": entry("F32", [2], 8, 16)}, bytes(12)), TruncatedDataError, "b"
    ),
    "data-past-eof-no-data": Bad(golden({"a": F32_2}), TruncatedDataError, "a"),
    "trailing-bytes-after-last-tensor": Bad(
        golden({"a": F32_2}, bytes(9)), CorruptHeaderError, None
    ),
}


@pytest.mark.parametrize("case", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_bad_header_raises_named_error(case: Bad, tmp_path: Path) -> None:
    """Each malformed file raises its specific error, naming the file (and tensor)."""
    path = write(tmp_path, "bad.safetensors", case.blob)

    with pytest.raises(CheckpointError) as caught:
        read_shard_header(path)

    assert case.error is type(caught.value)
    assert_names(caught.value, path, case.tensor)


@pytest.mark.parametrize("case", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_bad_header_same_error_from_parse_header(case: Bad) -> None:
    """The pure parser raises what the file reader raises, given the same bytes."""
    with pytest.raises(CheckpointError) as caught:
        parse_header(case.blob, path=FUZZ_PATH, file_size=len(case.blob))

    assert case.error is type(caught.value)
    assert_names(caught.value, FUZZ_PATH, case.tensor)


def test_header_length_over_limit_in_a_large_file(tmp_path: Path) -> None:
    """The 100 MB cap holds even when the file is long enough to contain such a header."""
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", MAX_HEADER_BYTES + 8) + b"{}")
        file.truncate(MAX_HEADER_BYTES + 64)  # a hole: no disk used

    with pytest.raises(CorruptHeaderError) as caught:
        read_shard_header(path)

    assert_names(caught.value, path, None)
    assert "limit" in str(caught.value)


def test_parse_header_short_data_for_announced_header() -> None:
    """``data`` shorter than the header it announces is an error, not an IndexError."""
    blob = golden({"a": F32_2}, bytes(8))

    with pytest.raises(CorruptHeaderError) as caught:
        parse_header(blob[:12], path=FUZZ_PATH, file_size=len(blob))

    assert_names(caught.value, FUZZ_PATH, None)


def test_read_shard_header_missing_file(tmp_path: Path) -> None:
    """A missing file raises ``CheckpointError`` naming it, chained from the ``OSError``."""
    path = tmp_path / "nope.safetensors"

    with pytest.raises(CheckpointError) as caught:
        read_shard_header(path)

    assert CheckpointError is type(caught.value)
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    assert_names(caught.value, path, None)


def test_read_shard_header_directory(tmp_path: Path) -> None:
    """Reading a directory as a shard raises ``CheckpointError`` naming it."""
    with pytest.raises(CheckpointError) as caught:
        read_shard_header(tmp_path)

    assert isinstance(caught.value.__cause__, OSError)
    assert_names(caught.value, tmp_path, None)


# --- checkpoints: single files and directories ----------------------------------------------


def one_tensor_file(directory: Path, name: str, tensor: str = "w") -> Path:
    return write(directory, name, golden({tensor: entry("F32", [2], 0, 8)}, bytes(8)))


def test_open_single_file(tmp_path: Path) -> None:
    """A ``.safetensors`` path opens that file; ``root`` is its directory."""
    path = one_tensor_file(tmp_path, "weights.safetensors")

    checkpoint = open_checkpoint(str(path))

    header = read_shard_header(path)
    assert Checkpoint(tmp_path.resolve(), (header,), {"w": header.tensors[0]}) == checkpoint
    assert 8 == checkpoint.total_bytes


def test_open_symlinked_file_keeps_root_of_the_link(tmp_path: Path) -> None:
    """A file that links elsewhere (HF cache) keeps ``root`` at the link's directory."""
    blob_dir, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    target = one_tensor_file(blob_dir, "abc123")
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to(target)

    checkpoint = open_checkpoint(snapshot)

    assert (snapshot.resolve(), target.resolve()) == (
        checkpoint.root,
        checkpoint.tensors["w"].path,
    )


def test_open_directory_prefers_model_safetensors(tmp_path: Path) -> None:
    """Beside other files, ``model.safetensors`` is the one opened."""
    one_tensor_file(tmp_path, "model.safetensors", "chosen")
    one_tensor_file(tmp_path, "consolidated.safetensors", "other")

    checkpoint = open_checkpoint(tmp_path)

    assert ["chosen"] == list(checkpoint.tensors)


def test_open_directory_with_one_other_file(tmp_path: Path) -> None:
    """A directory with exactly one ``*.safetensors`` opens it, whatever its name."""
    one_tensor_file(tmp_path, "adapter.safetensors")
    (tmp_path / "notes.txt").write_text("not a checkpoint")

    checkpoint = open_checkpoint(tmp_path)

    assert [tmp_path.resolve() / "adapter.safetensors"] == [s.path for s in checkpoint.shards]


def test_open_missing_path(tmp_path: Path) -> None:
    """A path that does not exist raises ``CheckpointError`` naming it."""
    path = tmp_path / "missing"

    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)

    assert CheckpointError is type(caught.value)
    assert_names(caught.value, path, None)


def test_open_directory_without_safetensors(tmp_path: Path) -> None:
    """A directory with no ``*.safetensors`` and no index raises ``CheckpointError``."""
    (tmp_path / "config.json").write_text("{}")

    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(tmp_path)

    assert CheckpointError is type(caught.value)
    assert_names(caught.value, tmp_path, None)


def test_open_directory_with_several_files_and_no_index(tmp_path: Path) -> None:
    """Several candidates without an index raise an error naming each of them."""
    one_tensor_file(tmp_path, "a.safetensors")
    one_tensor_file(tmp_path, "b.safetensors")

    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(tmp_path)

    assert CheckpointError is type(caught.value)
    assert_names(caught.value, tmp_path, None)
    assert "a.safetensors" in str(caught.value)
    assert "b.safetensors" in str(caught.value)


def test_open_directory_with_corrupt_file(tmp_path: Path) -> None:
    """Header errors propagate from ``open_checkpoint`` unchanged, naming the file."""
    path = write(tmp_path, "model.safetensors", golden(b"nope"))

    with pytest.raises(CorruptHeaderError) as caught:
        open_checkpoint(tmp_path)

    assert_names(caught.value, path, None)


# --- sharded checkpoints --------------------------------------------------------------------


def write_index(directory: Path, weight_map: Any, *, raw: bytes | None = None) -> Path:
    document = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    return write(directory, INDEX_NAME, raw if raw is not None else json.dumps(document).encode())


def shard(directory: Path, name: str, tensors: list[str]) -> Path:
    """A shard holding one F32[2] tensor per name, in the given order."""
    header = {t: entry("F32", [2], 8 * i, 8 * i + 8) for i, t in enumerate(tensors)}
    return write(directory, name, golden(header, bytes(8 * len(tensors))))


def test_open_sharded(tmp_path: Path) -> None:
    """Shards are read in name order; tensors come in shard order, then offset order."""
    second = shard(tmp_path, "model-00002-of-00002.safetensors", ["c", "a"])
    first = shard(tmp_path, "model-00001-of-00002.safetensors", ["z", "b"])
    shard(tmp_path, "consolidated.safetensors", ["everything"])  # not named: ignored
    write_index(
        tmp_path,
        {
            "a": second.name,
            "b": first.name,
            "c": second.name,
            "z": first.name,
        },
    )

    checkpoint = open_checkpoint(tmp_path)

    assert tmp_path.resolve() == checkpoint.root
    assert [first.resolve(), second.resolve()] == [s.path for s in checkpoint.shards]
    assert ["z", "b", "c", "a"] == list(checkpoint.tensors)
    assert 32 == checkpoint.total_bytes
    assert checkpoint.shards[1].tensors[1] == checkpoint.tensors["a"]


def test_open_index_file_directly(tmp_path: Path) -> None:
    """Naming the index file opens the sharded checkpoint around it."""
    shard(tmp_path, "s1.safetensors", ["a"])
    shard(tmp_path, "sub/s2.safetensors", ["b"])
    index = write_index(tmp_path, {"a": "s1.safetensors", "b": "sub/s2.safetensors"})

    checkpoint = open_checkpoint(index)

    assert (tmp_path.resolve(), ["a", "b"]) == (checkpoint.root, list(checkpoint.tensors))


def test_index_names_missing_shard(tmp_path: Path) -> None:
    """A shard named by the index but absent raises ``MissingShardError`` naming it."""
    shard(tmp_path, "s1.safetensors", ["a"])
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})

    with pytest.raises(MissingShardError) as caught:
        open_checkpoint(tmp_path)

    assert_names(caught.value, tmp_path / "s2.safetensors", None)


def test_index_lists_tensor_its_shard_lacks(tmp_path: Path) -> None:
    """The index placing a tensor in a shard that lacks it is an ``IndexMismatchError``."""
    shard(tmp_path, "s1.safetensors", ["a"])
    write_index(tmp_path, {"a": "s1.safetensors", "ghost": "s1.safetensors"})

    with pytest.raises(IndexMismatchError) as caught:
        open_checkpoint(tmp_path)

    assert_names(caught.value, tmp_path / "s1.safetensors", "ghost")


def test_tensor_in_two_shards(tmp_path: Path) -> None:
    """A tensor stored in two shards is an ``IndexMismatchError`` naming both shards."""
    shard(tmp_path, "s1.safetensors", ["a", "dup"])
    shard(tmp_path, "s2.safetensors", ["dup", "b"])
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors", "dup": "s2.safetensors"})

    with pytest.raises(IndexMismatchError) as caught:
        open_checkpoint(tmp_path)

    assert_names(caught.value, tmp_path / "s2.safetensors", "dup")
    assert "s1.safetensors" in str(caught.value)


def test_shard_holds_tensor_the_index_does_not_list(tmp_path: Path) -> None:
    """Extra tensors in a shard are an ``IndexMismatchError``: the index must be complete."""
    shard(tmp_path, "s1.safetensors", ["a", "extra"])
    write_index(tmp_path, {"a": "s1.safetensors"})

    with pytest.raises(IndexMismatchError) as caught:
        open_checkpoint(tmp_path)

    assert_names(caught.value, tmp_path / "s1.safetensors", "extra")


def test_shard_holds_tensor_the_index_places_elsewhere(tmp_path: Path) -> None:
    """A tensor found in a shard other than the one the index names is a mismatch."""
    shard(tmp_path, "s1.safetensors", ["a", "moved"])
    shard(tmp_path, "s2.safetensors", ["b"])
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors", "moved": "s2.safetensors"})

    with pytest.raises(IndexMismatchError) as caught:
        open_checkpoint(tmp_path)

    assert "moved" == caught.value.tensor
    assert str(tmp_path / "s1.safetensors") in str(caught.value)


def test_shard_corrupt_inside_sharded_checkpoint(tmp_path: Path) -> None:
    """A bad shard header raises the header's error naming that shard."""
    shard(tmp_path, "s1.safetensors", ["a"])
    bad = write(tmp_path, "s2.safetensors", golden({"b": entry("X9", [1], 0, 1)}, b"\0"))
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})

    with pytest.raises(UnsupportedDtypeError) as caught:
        open_checkpoint(tmp_path)

    assert_names(caught.value, bad, "b")


class BadIndex(NamedTuple):
    raw: bytes
    tensor: str | None


def index_bytes(weight_map: Any) -> bytes:
    return json.dumps({"weight_map": weight_map}).encode()


BAD_INDEXES: dict[str, BadIndex] = {
    "not-utf8": BadIndex(b'{"weight_map": {"\xff": "s1.safetensors"}}', None),
    "not-json": BadIndex(b'{"weight_map": ', None),
    "not-object": BadIndex(b'["weight_map"]', None),
    "no-weight-map": BadIndex(b'{"metadata": {}}', None),
    "weight-map-not-object": BadIndex(index_bytes(["a", "s1.safetensors"]), None),
    "weight-map-empty": BadIndex(index_bytes({}), None),
    "weight-map-value-not-string": BadIndex(index_bytes({"a": 1}), "a"),
    "weight-map-value-empty": BadIndex(index_bytes({"a": ""}), "a"),
    "shard-outside-directory": BadIndex(index_bytes({"a": "../s1.safetensors"}), None),
    "shard-absolute-path": BadIndex(index_bytes({"a": "/etc/passwd"}), None),
}


@pytest.mark.parametrize("case", BAD_INDEXES.values(), ids=BAD_INDEXES.keys())
def test_bad_index_raises_corrupt_header(case: BadIndex, tmp_path: Path) -> None:
    """A malformed index raises ``CorruptHeaderError`` naming the index (and tensor)."""
    shard(tmp_path, "s1.safetensors", ["a"])
    index = write_index(tmp_path, None, raw=case.raw)

    with pytest.raises(CorruptHeaderError) as caught:
        open_checkpoint(tmp_path)

    assert CorruptHeaderError is type(caught.value)
    assert_names(caught.value, index, case.tensor)


def test_unreadable_index(tmp_path: Path) -> None:
    """An index that cannot be read (here: a directory) raises ``CheckpointError`` naming it."""
    index = tmp_path / "weights.index.json"
    index.mkdir()

    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(index)

    assert_names(caught.value, index, None)


def test_open_many_shards_is_fast(tmp_path: Path) -> None:
    """170 shards of ~10 tensors each open in well under a second (a few ms per shard)."""
    names = [f"model.layers.{i // 10}.t{i % 10}" for i in range(1700)]
    weight_map = {}
    for s in range(170):
        shard_name = f"model-{s + 1:05d}-of-00170.safetensors"
        shard(tmp_path, shard_name, names[s * 10 : s * 10 + 10])
        weight_map.update(dict.fromkeys(names[s * 10 : s * 10 + 10], shard_name))
    write_index(tmp_path, weight_map)
    open_checkpoint(tmp_path)  # warm the page cache

    best = min(_timed(lambda: open_checkpoint(tmp_path)) for _ in range(3))

    assert best < 0.5, f"opening 170 shards took {best * 1000:.1f} ms"


def test_open_sharded_symlinked_shards_carry_their_targets(tmp_path: Path) -> None:
    """Shards that link elsewhere (HF cache snapshots) carry the resolved blob paths, while a
    plain shard beside them carries its own path and errors name the link."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    first = shard(blobs, "1111", ["a"])
    second = shard(blobs, "2222", ["b"])
    snapshot.mkdir()
    (snapshot / "s1.safetensors").symlink_to(first)
    (snapshot / "s2.safetensors").symlink_to(second)
    plain = shard(snapshot, "s3.safetensors", ["c"])
    write_index(snapshot, {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s3.safetensors"})

    checkpoint = open_checkpoint(snapshot)

    assert snapshot.resolve() == checkpoint.root
    assert [first.resolve(), second.resolve(), plain.resolve()] == [
        checkpoint.tensors[name].path for name in ("a", "b", "c")
    ]
    assert [s.path for s in checkpoint.shards] == [
        checkpoint.tensors[name].path for name in ("a", "b", "c")
    ]


def test_open_sharded_symlinks_found_without_a_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory that cannot be listed (only searched) still resolves symlinked shards."""
    target = shard(tmp_path / "blobs", "1111", ["a"])
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "s1.safetensors").symlink_to(target)
    plain = shard(snapshot, "s2.safetensors", ["b"])
    write_index(snapshot, {"a": "s1.safetensors", "b": "s2.safetensors"})

    def refuse(path: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("os.scandir", refuse)
    checkpoint = open_checkpoint(snapshot)

    assert [target.resolve(), plain.resolve()] == [s.path for s in checkpoint.shards]


def test_open_sharded_symlinked_shard_error_names_the_link(tmp_path: Path) -> None:
    """A corrupt shard reached through a symlink is reported under the name the index gives."""
    target = write(tmp_path / "blobs", "bad", golden(b"nope"))
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "s1.safetensors").symlink_to(target)
    write_index(snapshot, {"a": "s1.safetensors"})

    with pytest.raises(CorruptHeaderError) as caught:
        open_checkpoint(snapshot)

    assert_names(caught.value, snapshot / "s1.safetensors", None)


def test_open_sharded_through_symlinked_directory(tmp_path: Path) -> None:
    """A checkpoint directory reached through a symlink gives resolved roots and paths."""
    real = tmp_path / "real"
    s1 = shard(real, "s1.safetensors", ["a"])
    s2 = shard(real, "s2.safetensors", ["b"])
    write_index(real, {"a": "s1.safetensors", "b": "s2.safetensors"})
    alias = tmp_path / "alias"
    alias.symlink_to(real, target_is_directory=True)

    checkpoint = open_checkpoint(alias)

    assert real.resolve() == checkpoint.root
    assert [s1.resolve(), s2.resolve()] == [s.path for s in checkpoint.shards]
    assert [s1.resolve(), s2.resolve()] == [e.path for e in checkpoint.tensors.values()]


@pytest.mark.parametrize(
    ("weight_map", "tensor"),
    [
        ({"a": ["s1.safetensors"]}, "a"),
        ({"a": "s1.safetensors", "b": {"file": "s1.safetensors"}}, "b"),
        ({"a": "s1.safetensors", "b": None, "c": ""}, "b"),
        ({"a": "s1.safetensors", "b": 0}, "b"),
    ],
)
def test_index_value_that_is_not_a_file_name(weight_map: Any, tensor: str, tmp_path: Path) -> None:
    """Any weight_map value that is not a non-empty string (unhashable ones included) raises
    ``CorruptHeaderError`` naming the index and the first such tensor."""
    shard(tmp_path, "s1.safetensors", ["a"])
    index = write_index(tmp_path, weight_map)

    with pytest.raises(CorruptHeaderError) as caught:
        open_checkpoint(tmp_path)

    assert_names(caught.value, index, tensor)
    assert "is not a file name" in str(caught.value)


def test_shard_names_plain_and_nested_are_accepted(tmp_path: Path) -> None:
    """Plain names, names with dots and names in a subdirectory are shards inside the directory."""
    shard(tmp_path, "..weights.safetensors", ["a"])
    shard(tmp_path, "sub/b.safetensors", ["b"])
    write_index(tmp_path, {"a": "..weights.safetensors", "b": "sub/b.safetensors"})

    checkpoint = open_checkpoint(tmp_path)

    assert ["a", "b"] == list(checkpoint.tensors)


@pytest.mark.parametrize("name", ["..", "../x.safetensors", "sub/../../x.safetensors", "..\\x"])
def test_shard_names_that_leave_the_directory(name: str, tmp_path: Path) -> None:
    """A shard name that climbs out of the checkpoint directory is refused, naming the index."""
    index = write_index(tmp_path, {"a": name})

    with pytest.raises(CorruptHeaderError) as caught:
        open_checkpoint(tmp_path)

    assert_names(caught.value, index, None)
    assert "points outside the checkpoint directory" in str(caught.value)


def test_parsed_entries_are_ordinary_tensor_entries() -> None:
    """Entries built by the parser compare, hash and refuse assignment like constructed ones."""
    blob = golden({"b": entry("BF16", [2, 3], 8, 20), "a": entry("I64", [1], 0, 8)}, bytes(20))
    path = Path("x.safetensors")
    start = len(blob) - 20
    expected = (
        TensorEntry("a", path, "I64", (1,), start, 8),
        TensorEntry("b", path, "BF16", (2, 3), start + 8, 12),
    )

    actual = parse_header(blob, path=path, file_size=len(blob)).tensors

    assert expected == actual
    assert [hash(e) for e in expected] == [hash(e) for e in actual]
    assert [repr(e) for e in expected] == [repr(e) for e in actual]
    with pytest.raises(dataclasses.FrozenInstanceError):
        actual[0].offset = 0  # type: ignore[misc]


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


# --- fuzzing --------------------------------------------------------------------------------


def assert_consistent(header: ShardHeader) -> None:
    """What a successful parse promises: tensors tile the data region exactly."""
    cursor = header.data_offset
    for tensor in header.tensors:
        assert cursor == tensor.offset
        assert tensor.numel * DTYPE_SIZES[tensor.dtype] == tensor.nbytes
        cursor = tensor.end
    assert header.file_size == cursor


def parse_or_reject(blob: bytes) -> None:
    """Parse; a ``StreamloadError`` is a fine outcome, any other exception fails the test."""
    error: StreamloadError | None = None
    try:
        assert_consistent(parse_header(blob, path=FUZZ_PATH, file_size=len(blob)))
    except StreamloadError as exc:
        error = exc
    if error is not None:
        assert isinstance(error, CheckpointError)
        assert str(FUZZ_PATH) in str(error)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def valid_headers(draw: st.DrawFn) -> dict[str, Any]:
    """A valid header document (tensors in random order) whose data region is all zeros."""
    count = draw(st.integers(0, 5))
    document: dict[str, Any] = {}
    begin = 0
    for i in range(count):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        end = begin + DTYPE_SIZES[dtype] * _prod(shape)
        document[f"t{i}"] = entry(dtype, shape, begin, end)
        begin = end
    if draw(st.booleans()):
        document["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
    keys = draw(st.permutations(list(document)))
    return {key: document[key] for key in keys}


def _prod(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def data_size(document: Mapping[str, Any]) -> int:
    ends = [v["data_offsets"][1] for k, v in document.items() if k != "__metadata__"]
    return max(ends, default=0)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_arbitrary_bytes(blob: bytes) -> None:
    """Arbitrary bytes never raise anything but ``StreamloadError``."""
    parse_or_reject(blob)


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_arbitrary_header_with_valid_prefix(text: bytes) -> None:
    """Arbitrary header bytes behind a correct length prefix never escape as a foreign error."""
    parse_or_reject(golden(text))


@FUZZ
@given(json_values, st.binary(max_size=32))
def test_fuzz_arbitrary_json_header(document: Any, data: bytes) -> None:
    """Any JSON document as a header is parsed or rejected with ``StreamloadError``."""
    parse_or_reject(golden(json.dumps(document).encode(), data))


@FUZZ
@given(valid_headers())
def test_fuzz_valid_headers_parse(document: dict[str, Any]) -> None:
    """Generated valid headers parse, and entries tile the data region."""
    blob = golden(document, bytes(data_size(document)))

    header = parse_header(blob, path=FUZZ_PATH, file_size=len(blob))

    assert_consistent(header)
    expected = sorted(k for k in document if k != "__metadata__")
    assert expected == sorted(t.name for t in header.tensors)


@FUZZ
@given(valid_headers())
def test_fuzz_valid_headers_entries_exact(document: dict[str, Any]) -> None:
    """Each entry is built from its own header fields, in (begin, end, name) order: zero-sized
    tensors sharing an offset sort by name."""
    blob = golden(document, bytes(data_size(document)))
    start = len(blob) - data_size(document)
    spans = sorted(
        (v["data_offsets"][0], v["data_offsets"][1], k, v["dtype"], tuple(v["shape"]))
        for k, v in document.items()
        if k != "__metadata__"
    )
    expected = tuple(
        TensorEntry(name, FUZZ_PATH, dtype, shape, start + begin, end - begin)
        for begin, end, name, dtype, shape in spans
    )

    actual = parse_header(blob, path=FUZZ_PATH, file_size=len(blob))

    assert (expected, document.get("__metadata__", {})) == (actual.tensors, actual.metadata)


@FUZZ
@given(valid_headers(), st.data())
def test_fuzz_mutated_valid_headers(document: dict[str, Any], data: st.DataObject) -> None:
    """Valid files with bytes flipped, cut, inserted, or a field replaced are parsed or
    rejected with ``StreamloadError``, never anything else."""
    blob = bytearray(golden(document, bytes(data_size(document))))
    mutation = data.draw(st.sampled_from(["flip", "cut", "insert", "field"]))
    if mutation == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(blob) - 1))
            blob[position] = data.draw(st.integers(0, 255))
    elif mutation == "cut":
        del blob[data.draw(st.integers(0, len(blob))) :]
    elif mutation == "insert":
        position = data.draw(st.integers(0, len(blob)))
        blob[position:position] = data.draw(st.binary(min_size=1, max_size=8))
    elif document:
        key = data.draw(st.sampled_from(list(document)))
        value = document[key]
        if isinstance(value, dict) and key != "__metadata__":
            field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            value = {**value, field: data.draw(json_values)}
        else:
            value = data.draw(json_values)
        blob = bytearray(golden({**document, key: value}, bytes(data_size(document))))
    parse_or_reject(bytes(blob))


def test_fuzz_env_sanity() -> None:
    """The fuzz helpers themselves accept a valid file and reject a broken one."""
    good = golden({"a": F32_2}, bytes(8))
    parse_or_reject(good)
    with pytest.raises(AssertionError):
        assert_consistent(
            ShardHeader(FUZZ_PATH, 100, 16, (TensorEntry("a", FUZZ_PATH, "F32", (2,), 16, 8),), {})
        )
