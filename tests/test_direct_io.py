"""``LoadParams.direct_io``: O_DIRECT reads, exact bytes, alignment of every direct read, the
page-cache fallback where a filesystem refuses, ``"auto"``, and cancellation."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import streamload
from streamload.devices import resolve_devices
from streamload.engine import _direct
from streamload.engine._destinations import layout
from streamload.engine._direct import DIRECT_ALIGN, DirectReads
from streamload.engine._reader import Files, host_view
from streamload.engine._units import Chunk, Piece
from streamload.events import DirectIOFallback, Event, LoadCancelled
from streamload.testing import SimulatedGPU
from tests.engine_support import (
    assert_identical,
    evict,
    llama_config,
    llama_tensors,
    load_cancelled_after,
    open_fds_under,
    params,
    reference,
    write_checkpoint,
)

pytestmark = pytest.mark.anyio

LAYERS = 3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _single_file(directory: Path) -> Path:
    directory.mkdir(parents=True)
    tensors = llama_tensors(LAYERS)
    safetensors.torch.save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(llama_config(LAYERS)))
    return directory


@pytest.fixture(params=["single", "sharded"])
def ckpt(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "single":
        return _single_file(tmp_path / "ckpt")
    return write_checkpoint(tmp_path / "ckpt", llama_tensors(LAYERS), llama_config(LAYERS))


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


@dataclass
class Reads:
    """Every ``os.preadv`` call: (O_DIRECT?, offset, [(address, length), ...]) (any thread)."""

    calls: list[tuple[bool, int, list[tuple[int, int]]]] = field(default_factory=list)

    def direct(self) -> list[tuple[int, list[tuple[int, int]]]]:
        return [(offset, bufs) for is_direct, offset, bufs in self.calls if is_direct]

    def buffered(self) -> list[tuple[int, list[tuple[int, int]]]]:
        return [(offset, bufs) for is_direct, offset, bufs in self.calls if not is_direct]


def _address(view: Any) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    record = Reads()
    real = os.preadv

    def preadv(fd: int, buffers: list[Any], offset: int) -> int:
        bufs = [(_address(b), memoryview(b).nbytes) for b in buffers]
        record.calls.append((_is_direct(fd), offset, bufs))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    return record


def _assert_aligned(reads: Reads) -> None:
    """Every O_DIRECT read: 4 KiB-aligned offset, buffer addresses and lengths."""
    for offset, bufs in reads.direct():
        assert 0 == offset % DIRECT_ALIGN
        assert [(0, 0)] * len(bufs) == [(a % DIRECT_ALIGN, n % DIRECT_ALIGN) for a, n in bufs]


def _unaligned_offsets(directory: Path) -> int:
    spec = streamload.inspect(directory)
    return sum(1 for e in spec.checkpoint.tensors.values() if e.offset % DIRECT_ALIGN)


def _device(kind: str) -> Any:
    if kind == "cpu":
        return "cpu"
    return SimulatedGPU("sim:0", total_bytes=2**30, staged=kind == "sim-staged")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("kind", ["cpu", "sim-staged", "sim-unstaged"])
async def test_direct_io_loads_exact_bytes_with_aligned_reads_only(
    ckpt: Path, kind: str, dtype: torch.dtype | None, reads: Reads
) -> None:
    """With ``direct_io=True`` every byte comes through aligned O_DIRECT reads (no buffered
    read at all), though most tensors start at unaligned offsets, and the tensors equal
    safetensors' own load bit for bit (converted where a dtype is asked for)."""
    assert _unaligned_offsets(ckpt) > 10
    events: list[Event] = []
    model = await streamload.load(
        ckpt, params([_device(kind)], direct_io=True, dtype=dtype), on_event=events.append
    )
    assert_identical(model.tensors, reference(ckpt), dtype)
    assert [] == reads.buffered()
    assert reads.direct()
    _assert_aligned(reads)
    assert [] == [e for e in events if isinstance(e, DirectIOFallback)]
    model.release()


@pytest.mark.parametrize("chunk_bytes", [3 * DIRECT_ALIGN + 100, 2**20])
async def test_cpu_destinations_take_the_aligned_middle_in_place(
    ckpt: Path, chunk_bytes: int, reads: Reads
) -> None:
    """CPU tensors are laid out co-aligned with the file modulo 4 KiB, so direct reads land in
    the loaded tensors' own memory (only partial blocks go through a bounce buffer)."""
    load_params = params(
        ["cpu"], direct_io=True, chunk_bytes=chunk_bytes, staging_bytes=4 * chunk_bytes
    )
    model = await streamload.load(ckpt, load_params)
    assert_identical(model.tensors, reference(ckpt), None)
    spans: list[tuple[int, int]] = []  # the tensors' memory, adjacent tensors merged
    for lo, hi in sorted(
        (t.data_ptr(), t.data_ptr() + t.nbytes) for t in model.tensors.values() if t.nbytes
    ):
        if spans and spans[-1][1] == lo:
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))
    inside = 0
    for _, bufs in reads.direct():
        for address, nbytes in bufs:
            if any(lo <= address and address + nbytes <= hi for lo, hi in spans):
                inside += nbytes
    stored = model.report.stored_bytes
    assert inside > stored // 2
    _assert_aligned(reads)
    model.release()


def _warm(directory: Path) -> None:
    for path in directory.glob("*.safetensors"):
        path.read_bytes()


async def test_auto_reads_cold_staged_units_direct_and_cached_ones_through_the_cache(
    ckpt: Path, reads: Reads
) -> None:
    """``direct_io="auto"``, bound for a staged device: files evicted from the page cache are
    read with O_DIRECT (most of them: reading the headers brings the kernel's read-ahead of the
    first bytes into the cache, and units found there are copied from it); the same files once
    cached are copied from the cache (no O_DIRECT read)."""
    evict(ckpt)
    model = await streamload.load(ckpt, params([_device("sim-staged")], direct_io="auto"))
    assert_identical(model.tensors, reference(ckpt), None)
    stored = model.report.stored_bytes
    model.release()
    direct = sum(n for _, bufs in reads.direct() for _, n in bufs)
    assert direct > stored // 2
    _assert_aligned(reads)

    reads.calls.clear()
    _warm(ckpt)
    model = await streamload.load(ckpt, params([_device("sim-staged")], direct_io="auto"))
    assert_identical(model.tensors, reference(ckpt), None)
    assert [] == reads.direct()
    assert reads.buffered()
    model.release()


@pytest.mark.parametrize("kind", ["cpu", "sim-unstaged"])
async def test_auto_reads_cold_host_destinations_direct_and_cached_ones_through_the_cache(
    ckpt: Path, kind: str, reads: Reads
) -> None:
    """``direct_io="auto"`` reads units bound for host memory (the CPU, an unstaged device)
    with O_DIRECT when their files are evicted (the page cache's pages would be fresh memory
    beside the tensors'), and copies them from the cache once cached."""
    evict(ckpt)
    model = await streamload.load(ckpt, params([_device(kind)], direct_io="auto"))
    assert_identical(model.tensors, reference(ckpt), None)
    stored = model.report.stored_bytes
    model.release()
    assert sum(n for _, bufs in reads.direct() for _, n in bufs) > stored // 2
    _assert_aligned(reads)

    reads.calls.clear()
    _warm(ckpt)
    model = await streamload.load(ckpt, params([_device(kind)], direct_io="auto"))
    assert_identical(model.tensors, reference(ckpt), None)
    assert [] == reads.direct()
    assert reads.buffered()
    model.release()


@pytest.mark.parametrize("kind", ["cpu", "sim-staged"])
def test_auto_gives_objects_no_direct_layout(kind: str) -> None:
    """An object (``s3://`` and the like; the page cache answers ``None`` for it) is never
    opened with O_DIRECT: under ``"auto"`` its units keep the buffered layout; a local cold
    unit gets the direct one, a cached one not."""
    device = resolve_devices([_device(kind)])[0]
    auto = streamload.LoadParams(devices=[_device(kind)])
    assert not layout(device, auto, lambda: None).direct_io
    assert layout(device, auto, lambda: False).direct_io
    assert not layout(device, auto, lambda: True).direct_io


async def test_auto_leaves_mapped_cpu_units_to_the_page_cache(ckpt: Path, reads: Reads) -> None:
    """``cpu_policy="mmap"`` maps the checkpoint: under ``"auto"`` nothing is read with
    O_DIRECT even cold (the maps' pages come through the page cache)."""
    evict(ckpt)
    model = await streamload.load(
        ckpt, params([_device("cpu")], direct_io="auto", cpu_policy="mmap")
    )
    assert_identical(model.tensors, reference(ckpt), None)
    assert [] == reads.direct()
    model.release()


def test_auto_is_the_default() -> None:
    assert "auto" == streamload.LoadParams().direct_io


@pytest.mark.parametrize("kind", ["cpu", "sim-staged"])
async def test_warm_files_are_read_through_the_page_cache_by_default(
    ckpt: Path, kind: str, reads: Reads
) -> None:
    """By default (``"auto"``) files in the page cache are copied from it: no O_DIRECT read."""
    _warm(ckpt)
    model = await streamload.load(ckpt, params([_device(kind)]))
    assert_identical(model.tensors, reference(ckpt), None)
    assert [] == reads.direct()
    model.release()


@pytest.mark.parametrize(("direct_io", "level"), [(True, "warning"), ("auto", "info")])
async def test_a_refused_o_direct_is_a_warning_only_when_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_io: bool | str, level: str
) -> None:
    """The fallback is a warning in the log when ``direct_io=True`` asked for direct reads,
    and an info line under ``"auto"`` (the default), where the page cache is simply the other
    way to read; ``DirectIOFallback.requested`` says which."""
    import structlog.testing

    ckpt = write_checkpoint(tmp_path / "ckpt", llama_tensors(LAYERS), llama_config(LAYERS))
    evict(ckpt)
    monkeypatch.setattr(_direct, "open_direct", _refusing_open([]))
    events: list[Event] = []
    with structlog.testing.capture_logs() as logs:
        model = await streamload.load(
            ckpt, params([_device("sim-staged")], direct_io=direct_io), on_event=events.append
        )
    assert_identical(model.tensors, reference(ckpt), None)
    (fallback,) = [e for e in events if isinstance(e, DirectIOFallback)]
    assert (direct_io is True) == fallback.requested
    (line,) = [entry for entry in logs if entry["event"] == "direct_io_fallback"]
    assert level == line["log_level"]
    model.release()


def _refusing_open(opened: list[Path]) -> Callable[[Path], int]:
    def opener(path: Path) -> int:
        opened.append(path)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))

    return opener


@pytest.mark.parametrize("kind", ["cpu", "sim-staged", "sim-unstaged"])
async def test_a_filesystem_refusing_o_direct_at_open_is_read_buffered_and_reported_once(
    tmp_path: Path, kind: str, reads: Reads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL when opening with O_DIRECT (as filesystems without it answer): the load reads
    every file through the page cache, exact bytes, and one ``DirectIOFallback`` names the
    first file; the other files on that filesystem are not tried again."""
    ckpt = write_checkpoint(tmp_path / "ckpt", llama_tensors(LAYERS), llama_config(LAYERS))
    opened: list[Path] = []
    monkeypatch.setattr(_direct, "open_direct", _refusing_open(opened))
    events: list[Event] = []
    model = await streamload.load(
        ckpt, params([_device(kind)], direct_io=True), on_event=events.append
    )
    assert_identical(model.tensors, reference(ckpt), None)
    fallbacks = [e for e in events if isinstance(e, DirectIOFallback)]
    assert 1 == len(fallbacks)
    assert 1 == len(opened)
    assert str(opened[0]) == fallbacks[0].file
    assert "open" in fallbacks[0].reason
    assert str(ckpt) == fallbacks[0].path
    assert [] == reads.direct()
    assert reads.buffered()
    assert [] == open_fds_under(ckpt)
    model.release()


@pytest.mark.parametrize("kind", ["cpu", "sim-staged"])
async def test_a_filesystem_refusing_the_first_direct_read_is_read_buffered(
    ckpt: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL at the first O_DIRECT read (a filesystem that opens but will not read so): that
    chunk and every later one are read through the page cache; reported once."""
    real = os.preadv
    refused: list[int] = []
    lock = threading.Lock()

    def preadv(fd: int, buffers: list[Any], offset: int) -> int:
        if _is_direct(fd):
            with lock:
                refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    events: list[Event] = []
    model = await streamload.load(
        ckpt, params([_device(kind)], direct_io=True), on_event=events.append
    )
    assert_identical(model.tensors, reference(ckpt), None)
    fallbacks = [e for e in events if isinstance(e, DirectIOFallback)]
    assert 1 == len(fallbacks)
    assert "read" in fallbacks[0].reason
    # Reads already under way in other threads may be refused too; none starts afterwards.
    assert 1 <= len(refused) <= 3  # params(): 3 reader threads
    model.release()


@pytest.mark.parametrize("after", [None, 0, 1])
@pytest.mark.parametrize("kind", ["cpu", "sim-staged"])
async def test_cancelling_a_direct_load_releases_everything(
    tmp_path: Path, kind: str, after: int | None
) -> None:
    """Cancelled after a unit, a direct load leaves no tensor charged and no file open (the
    O_DIRECT descriptors included)."""
    ckpt = write_checkpoint(tmp_path / "ckpt", llama_tensors(LAYERS), llama_config(LAYERS))
    device = _device(kind)
    cancelled, events = await load_cancelled_after(ckpt, params([device], direct_io=True), after)
    assert cancelled
    assert isinstance(events[-1], LoadCancelled)
    assert [] == open_fds_under(ckpt)
    if isinstance(device, SimulatedGPU):
        assert 0 == device.allocated_bytes


def test_direct_io_takes_true_false_or_auto() -> None:
    for value in (True, False, "auto"):
        assert value == streamload.LoadParams(direct_io=value).direct_io
    with pytest.raises(ValueError, match="direct_io"):
        streamload.LoadParams(direct_io="always")  # type: ignore[arg-type]


# -- the reads themselves, byte by byte -------------------------------------------------------

GUARD = 0xA5


@pytest.fixture
def shard(tmp_path: Path) -> tuple[Files, Path, bytes]:
    """A real one-tensor checkpoint of 5 blocks and a bit, its ``Files`` and its bytes."""
    directory = tmp_path / "raw"
    directory.mkdir()
    data = torch.randint(0, 256, (5 * DIRECT_ALIGN + 777,), dtype=torch.uint8)
    safetensors.torch.save_file({"blob": data}, directory / "model.safetensors")
    path = directory / "model.safetensors"
    files = Files(streamload.inspect(directory))
    return files, path, path.read_bytes()


def _guarded(nbytes: int, shift: int) -> torch.Tensor:
    """A page-aligned buffer of ``nbytes`` guard bytes plus room for a ``shift``."""
    import mmap

    area = mmap.mmap(-1, nbytes + 3 * DIRECT_ALIGN, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer = torch.frombuffer(area, dtype=torch.uint8)
    buffer.fill_(GUARD)
    return buffer[shift:]


@pytest.mark.parametrize("co_aligned", [True, False])
@pytest.mark.parametrize(
    ("start", "nbytes"), [(8, 100), (8, 3 * DIRECT_ALIGN), (DIRECT_ALIGN - 3, 2 * DIRECT_ALIGN + 9)]
)
def test_read_pieces_places_exactly_the_chunks_bytes(
    shard: tuple[Files, Path, bytes], co_aligned: bool, start: int, nbytes: int
) -> None:
    """A chunk at any offset, into memory co-aligned with the file (the aligned middle read in
    place) or not (through a bounce buffer): exactly its bytes land, not one byte around it."""
    files, path, data = shard
    reads = DirectReads(files)
    offset = 100 + start  # past the header
    shift = offset % DIRECT_ALIGN if co_aligned else (offset + 1) % DIRECT_ALIGN
    memory = _guarded(nbytes + 2 * DIRECT_ALIGN, shift)
    dst = memory[DIRECT_ALIGN : DIRECT_ALIGN + nbytes]
    half = nbytes // 2
    chunk = Chunk(
        path, offset, nbytes, [Piece(dst[:half], 0, "blob"), Piece(dst[half:], half, "b")]
    )
    try:
        assert reads.read_pieces(chunk)
    finally:
        reads.close()
        files.close()
    assert data[offset : offset + nbytes] == bytes(dst.numpy())
    assert {GUARD} == set(memory[:DIRECT_ALIGN].tolist())
    assert {GUARD} == set(memory[DIRECT_ALIGN + nbytes :].tolist())
    assert nbytes == reads.bytes_read


def test_read_staged_puts_the_aligned_span_in_the_slot(shard: tuple[Files, Path, bytes]) -> None:
    """A staged chunk is read as the aligned span around it from the slot's first aligned byte;
    the returned position is where the chunk's first byte is."""
    files, path, data = shard
    reads = DirectReads(files)
    slot = _guarded(8 * DIRECT_ALIGN, 40)  # a slot that starts 40 bytes past a page
    aligned = -slot.data_ptr() % DIRECT_ALIGN
    offset, nbytes = 100 + DIRECT_ALIGN + 5, 2 * DIRECT_ALIGN
    view = host_view(slot)
    chunk = Chunk(path, offset, nbytes, [Piece(slot[:0], 0, "blob")])
    try:
        at = reads.read_staged(chunk, view, aligned)
    finally:
        view.release()
        reads.close()
        files.close()
    assert at is not None
    assert (slot.data_ptr() + at) % DIRECT_ALIGN == offset % DIRECT_ALIGN
    assert data[offset : offset + nbytes] == bytes(slot[at : at + nbytes].numpy())


def test_a_refused_filesystem_is_not_tried_again(shard: tuple[Files, Path, bytes]) -> None:
    """After a refusal, later reads of the file return ``False`` (read buffered) without
    opening again, and the refusal is a notice exactly once."""
    files, path, _ = shard
    opened: list[Path] = []
    reads = DirectReads(files, opener=_refusing_open(opened))
    memory = _guarded(DIRECT_ALIGN, 0)
    chunk = Chunk(path, 200, 64, [Piece(memory[:64], 0, "blob")])
    try:
        assert not reads.read_pieces(chunk)
        assert not reads.read_pieces(chunk)
        notices = reads.take_notices()
        assert [] == reads.take_notices()
    finally:
        reads.close()
        files.close()
    assert [path] == opened
    assert [str(path)] == [n.file for n in notices]
    assert 0 == reads.bytes_read
