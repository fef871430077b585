"""Host destinations in transparent huge pages, and the page-cache probe that decides them."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import streamload
from streamload import _hostmem
from streamload.testing import SimulatedGPU
from tests.engine_support import llama_config, llama_tensors, params, reference, write_checkpoint

MiB = 2**20

linux_only = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc")


def _mappings() -> Iterator[tuple[int, int, list[str]]]:
    """(start, end, VmFlags) of every mapping of this process."""
    current: tuple[int, int] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                current = (low, high)
            elif current is not None and head == "VmFlags:":
                yield current[0], current[1], line.split()[1:]


def _mapping(address: int) -> tuple[int, int, list[str]] | None:
    """(start, end, VmFlags) of the mapping of this process that holds ``address``."""
    return next((m for m in _mappings() if m[0] <= address < m[1]), None)


def _flags(address: int) -> list[str]:
    got = _mapping(address)
    assert got is not None, f"no mapping holds {address:#x}"
    return got[2]


def _huge_advised(tensor: torch.Tensor) -> bool:
    return "hg" in _flags(tensor.data_ptr())


@linux_only
def test_empty_gives_big_tensors_an_aligned_mapping_in_huge_pages() -> None:
    nbytes = 5 * MiB + 12  # two whole huge pages and a tail
    tensor = _hostmem.empty((nbytes // 4,), torch.float32)
    start = tensor.data_ptr()

    assert start % _hostmem.HUGE_PAGE == 0
    assert tensor.untyped_storage().nbytes() == nbytes  # the storage is exactly the tensor
    assert "hg" in _flags(start)
    assert "hg" in _flags(start + 4 * MiB - 1)
    assert "hg" not in _flags(start + 4 * MiB)  # the tail under 2 MiB stays in 4 KiB pages
    tensor.copy_(torch.arange(tensor.numel(), dtype=torch.float32))
    assert float(tensor[-1]) == tensor.numel() - 1

    del tensor
    gc.collect()
    assert _mapping(start) is None  # unmapped with its last tensor


@linux_only
def test_empty_leaves_small_tensors_to_torch() -> None:
    small = _hostmem.empty((MiB // 4,), torch.float32)
    assert "hg" not in _flags(small.data_ptr())
    assert small.shape == (MiB // 4,)


@linux_only
def test_huge_tensors_behave_like_any_tensor() -> None:
    """Views, dtype views, pickling, shared memory and Parameters work as on ``torch.empty``."""
    tensor = _hostmem.empty((1024, 1024), torch.bfloat16)
    tensor.fill_(1.5)
    param = torch.nn.Parameter(tensor, requires_grad=False)
    assert float(param.view(torch.int16).view(torch.bfloat16)[3, 4]) == 1.5
    clone = tensor.clone()
    tensor.share_memory_()  # type: ignore[no-untyped-call]
    assert tensor.is_shared()  # type: ignore[no-untyped-call]
    assert torch.equal(tensor, clone)


def _huge_ranges() -> list[tuple[int, int]]:
    """(start, end) of every mapping of this process advised into huge pages."""
    return [(low, high) for low, high, flags in _mappings() if "hg" in flags]


def _in_huge(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> int:
    """Bytes of ``tensor`` inside ``ranges``."""
    start = tensor.data_ptr()
    end = start + tensor.nbytes
    return sum(max(0, min(end, high) - max(start, low)) for low, high in ranges)


def test_pack_puts_each_run_at_its_lead_one_after_another() -> None:
    positions, total = _hostmem.pack([(100, 56), (64, 36), (8, 36), (10, 0), (0, 8)])
    assert positions == [56, 164, 228, 256, 328]
    assert total == 328
    assert _hostmem.pack([]) == ([], 0)
    assert [_hostmem.lead(o, torch.float32) for o in (5240, 5244, 5246, 64)] == [56, 60, 0, 0]
    assert _hostmem.lead(5243, torch.uint8) == 59


@linux_only
@pytest.mark.parametrize("huge_pages", [True, False])
def test_host_block_lays_tensors_out_in_one_mapping(huge_pages: bool) -> None:
    if huge_pages and not _hostmem.huge_pages_available():
        pytest.skip("transparent huge pages are off on this machine")
    nbytes = 5 * MiB + 120
    block = _hostmem.HostBlock(nbytes, huge_pages=huge_pages)
    first = block.tensor(56, (MiB // 4,), torch.float32)
    second = block.tensor(56 + MiB, ((4 * MiB + 64) // 2,), torch.bfloat16)
    empty = block.tensor(nbytes, (0, 3), torch.float32)
    assert first.data_ptr() % 64 == 56
    assert second.data_ptr() == first.data_ptr() + MiB
    assert first.untyped_storage().nbytes() == MiB  # each storage is exactly its bytes
    assert empty.shape == (0, 3)
    assert block.huge_bytes == (4 * MiB if huge_pages else 0)
    start = first.data_ptr() - 56
    if huge_pages:
        assert start % _hostmem.HUGE_PAGE == 0
    assert _in_huge(first, _huge_ranges()) == (MiB if huge_pages else 0)
    first.copy_(torch.arange(first.numel(), dtype=torch.float32))
    second.fill_(2.5)
    assert float(first[-1]) == first.numel() - 1  # the two do not overlap
    assert float(second[0]) == 2.5
    for at, shape, dtype in [(nbytes - 4, (2,), torch.float32), (2, (4,), torch.float32)]:
        with pytest.raises(ValueError, match="do not fit"):
            block.tensor(at, shape, dtype)
    del block, second, empty
    gc.collect()
    assert _mapping(start) is not None  # ``first`` still holds the mapping
    del first
    gc.collect()
    assert _mapping(start) is None  # unmapped with its last tensor


def _write(path: Path, nbytes: int) -> int:
    path.write_bytes(os.urandom(nbytes))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    return fd


def _evicted(fd: int, nbytes: int) -> bool:
    gc.collect()  # unmaps files a dropped safetensors load still mapped
    os.fsync(fd)  # dirty pages are not dropped
    os.posix_fadvise(fd, 0, nbytes, os.POSIX_FADV_DONTNEED)
    return _hostmem.cached_bytes(fd, 0, nbytes) == 0


@linux_only
@pytest.mark.parametrize("way", ["cachestat", "mincore"])
def test_cached_fraction_tells_read_from_evicted_ranges(
    tmp_path: Path, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if way == "mincore":
        monkeypatch.setattr(_hostmem, "_cachestat", lambda fd, start, length: None)
    elif _hostmem._cachestat(0, 0, 1) is None:
        pytest.skip("cachestat needs Linux 6.5")
    nbytes = 16 * MiB
    fd = _write(tmp_path / "data.bin", nbytes)
    try:
        if not _evicted(fd, nbytes):
            pytest.skip("this filesystem keeps its pages (posix_fadvise DONTNEED ignored)")
        assert _hostmem.cached_fraction([(fd, 0, nbytes)]) == 0.0
        os.pread(fd, 4 * MiB, 6 * MiB)
        assert _hostmem.cached_bytes(fd, 6 * MiB, 4 * MiB) == 4 * MiB
        assert _hostmem.cached_bytes(fd, 0, 4 * MiB) == 0
        assert _hostmem.cached_fraction([(fd, 6 * MiB, 4 * MiB)]) == 1.0
        whole = _hostmem.cached_fraction([(fd, 0, nbytes)])
        assert whole is not None
        assert 0.1 < whole < 0.4  # sampled: about a quarter
        os.pread(fd, nbytes, 0)
        assert _hostmem.cached_fraction([(fd, 0, nbytes)]) == 1.0
    finally:
        os.close(fd)


# -- the engine ---------------------------------------------------------------------------------

LAYERS = 4


@pytest.fixture
def big_ckpt(tmp_path: Path) -> Path:
    """A small Llama with one F32 tensor of 5 MiB + 4 bytes per layer and a 4 MiB embedding."""
    tensors = llama_tensors(LAYERS)
    gen = torch.Generator().manual_seed(1)
    tensors["model.embed_tokens.weight"] = torch.randn(4096, 256, generator=gen)
    for i in range(LAYERS):
        tensors[f"model.layers.{i}.mlp.big"] = torch.randn(5 * MiB // 4 + 1, generator=gen)
    return write_checkpoint(tmp_path / "ckpt", tensors, llama_config(LAYERS), shards=2)


def big_params(devices: list[Any], **overrides: Any) -> streamload.LoadParams:
    return params(devices, chunk_bytes=MiB, staging_bytes=4 * MiB, **overrides)


def _big(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in tensors.items() if t.nbytes >= _hostmem.HUGE_PAGE}


def _assert_same(loaded: dict[str, torch.Tensor], ckpt: Path) -> None:
    ref = reference(ckpt)
    assert sorted(ref) == sorted(loaded)
    for name, want in ref.items():
        assert torch.equal(want.view(-1).view(torch.uint8), loaded[name].view(-1).view(torch.uint8))


@linux_only
@pytest.mark.anyio
@pytest.mark.parametrize("setting", [True, False])
async def test_huge_pages_on_and_off(big_ckpt: Path, setting: bool) -> None:
    if setting and not _hostmem.huge_pages_available():
        pytest.skip("transparent huge pages are off on this machine")
    async with await streamload.load(big_ckpt, big_params(["cpu"], huge_pages=setting)) as model:
        _assert_same(model.tensors, big_ckpt)
        big = _big(model.tensors)
        assert len(big) == LAYERS + 1
        assert all(_huge_advised(t) is setting for t in big.values())
        ranges = _huge_ranges()
        in_huge = sum(_in_huge(t, ranges) for t in model.tensors.values())
        assert model.report.huge_page_bytes == in_huge
        assert (in_huge > sum(t.nbytes for t in big.values()) / 2) is setting


@pytest.mark.anyio
@pytest.mark.parametrize("setting", [True, False])
async def test_cpu_destinations_start_where_their_file_bytes_do_in_a_cache_line(
    big_ckpt: Path, setting: bool
) -> None:
    """Tensors read straight into CPU memory start at their file offset modulo 64 (the kernel's
    copy out of the page cache then runs co-aligned), unless that position does not suit their
    dtype; a simulated GPU's tensors are its allocator's."""
    if setting and not _hostmem.huge_pages_available():
        pytest.skip("transparent huge pages are off on this machine")
    entries = streamload.inspect(big_ckpt).checkpoint.tensors
    leads: list[int] = []
    async with await streamload.load(big_ckpt, big_params(["cpu"], huge_pages=setting)) as model:
        _assert_same(model.tensors, big_ckpt)
        for name, tensor in model.tensors.items():
            lead = entries[name].offset % 64
            if tensor.nbytes and lead % tensor.element_size() == 0:
                assert tensor.data_ptr() % 64 == lead, name
                leads.append(lead)
            else:
                assert tensor.data_ptr() % tensor.element_size() == 0, name
    assert any(leads), "the checkpoint has tensors off a cache-line boundary"
    gpu = SimulatedGPU("sim:0", total_bytes=2**30, staged=False)
    load = big_params([gpu], huge_pages=setting)
    async with await streamload.load(big_ckpt, load) as model:
        _assert_same(model.tensors, big_ckpt)
        big = _big(model.tensors)
        assert all(t.data_ptr() % 64 == 0 for t in big.values())


@linux_only
@pytest.mark.anyio
async def test_huge_pages_apply_to_converted_tensors(big_ckpt: Path) -> None:
    if not _hostmem.huge_pages_available():
        pytest.skip("transparent huge pages are off on this machine")
    load = big_params(["cpu"], huge_pages=True, dtype=torch.bfloat16)
    async with await streamload.load(big_ckpt, load) as model:
        for name, want in reference(big_ckpt).items():
            got = model.tensors[name]
            floats = (torch.float32, torch.float16, torch.bfloat16)
            expect = want.to(torch.bfloat16) if want.dtype in floats else want
            assert torch.equal(expect.view(-1).view(torch.uint8), got.view(-1).view(torch.uint8))
        big = _big(model.tensors)
        assert {f"model.layers.{i}.mlp.big" for i in range(LAYERS)} <= set(big)
        assert all(_huge_advised(t) for t in big.values())


@linux_only
@pytest.mark.anyio
async def test_auto_follows_the_page_cache_per_unit_before_read_ahead(
    big_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``"auto"`` gives huge pages to the units whose bytes were cached when first probed, and
    probes a unit before the load's own read-ahead (``POSIX_FADV_WILLNEED``) of its range."""
    if not _hostmem.huge_pages_available():
        pytest.skip("transparent huge pages are off on this machine")
    cold_layers = {1, 3}
    cold_ranges: list[tuple[int, int]] = []
    calls: list[tuple[str, int]] = []
    index = streamload.inspect(big_ckpt).checkpoint.tensors
    for i in cold_layers:
        entry = index[f"model.layers.{i}.mlp.big"]
        cold_ranges.append((entry.offset, entry.end))

    def fraction(ranges: list[tuple[int, int, int]]) -> float:
        calls.extend(("probe", start) for _, start, _ in ranges)
        cold = any(
            low < start + length and start < high
            for _, start, length in ranges
            for low, high in cold_ranges
        )
        return 0.0 if cold else 1.0

    real_fadvise = os.posix_fadvise

    def fadvise(fd: int, start: int, length: int, advice: int) -> None:
        calls.append(("read-ahead", start))
        real_fadvise(fd, start, length, advice)

    monkeypatch.setattr(_hostmem, "cached_fraction", fraction)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    async with await streamload.load(big_ckpt, big_params(["cpu"], huge_pages="auto")) as model:
        _assert_same(model.tensors, big_ckpt)
        for i in range(LAYERS):
            big = model.tensors[f"model.layers.{i}.mlp.big"]
            assert _huge_advised(big) is (i not in cold_layers), i
        assert _huge_advised(model.tensors["model.embed_tokens.weight"])
        ranges = _huge_ranges()
        for name, tensor in model.tensors.items():
            if any(f".{i}." in name for i in cold_layers):
                assert _in_huge(tensor, ranges) == 0, name
        in_huge = sum(_in_huge(t, ranges) for t in model.tensors.values())
        assert model.report.huge_page_bytes == in_huge
    for kind, start in calls:
        if kind == "read-ahead":
            assert ("probe", start) in calls[: calls.index((kind, start))], start


@linux_only
@pytest.mark.anyio
async def test_auto_on_a_truly_evicted_checkpoint_uses_small_pages(big_ckpt: Path) -> None:
    """The real probe: right after writing, the files are cached (huge pages); after
    ``POSIX_FADV_DONTNEED``, they are not (4 KiB pages)."""
    if not _hostmem.huge_pages_available():
        pytest.skip("transparent huge pages are off on this machine")
    files = sorted(big_ckpt.glob("*.safetensors"))
    reference(big_ckpt)  # read every byte: cached
    auto = big_params(["cpu"], huge_pages="auto")
    async with await streamload.load(big_ckpt, auto) as model:
        assert all(_huge_advised(t) for t in _big(model.tensors).values())
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            if not _evicted(fd, path.stat().st_size):
                pytest.skip("this filesystem keeps its pages (posix_fadvise DONTNEED ignored)")
        finally:
            os.close(fd)
    async with await streamload.load(big_ckpt, auto) as model:
        _assert_same(model.tensors, big_ckpt)
        assert not any(_huge_advised(t) for t in _big(model.tensors).values())
        assert model.report.huge_page_bytes == 0


@linux_only
def test_simulated_gpu_memory_in_huge_pages_when_asked_and_credited() -> None:
    gpu = SimulatedGPU("sim:0", total_bytes=64 * MiB)
    plain = gpu.empty((3 * MiB + 4,), torch.uint8)
    huge = gpu.empty((3 * MiB + 4,), torch.uint8, huge_pages=True)
    assert not _huge_advised(plain)
    assert huge.data_ptr() % _hostmem.HUGE_PAGE == 0
    assert _huge_advised(huge)
    assert huge.untyped_storage().nbytes() == 3 * MiB + 4
    assert gpu.allocated_bytes == 2 * (3 * MiB + 4)
    del plain, huge
    gc.collect()
    assert gpu.allocated_bytes == 0


@linux_only
@pytest.mark.anyio
@pytest.mark.parametrize("staged", [True, False])
@pytest.mark.parametrize("warm", [True, False])
async def test_simulated_gpu_memory_follows_the_same_rule(
    big_ckpt: Path, monkeypatch: pytest.MonkeyPatch, staged: bool, warm: bool
) -> None:
    """A simulated GPU's memory is host memory: under ``"auto"`` it gets huge pages for the
    units found in the page cache, like CPU tensors; its ledger still returns to zero."""
    if not _hostmem.huge_pages_available():
        pytest.skip("transparent huge pages are off on this machine")
    monkeypatch.setattr(_hostmem, "cached_fraction", lambda ranges: 1.0 if warm else 0.0)
    gpu = SimulatedGPU("sim:0", total_bytes=2**30, staged=staged)
    async with await streamload.load(big_ckpt, big_params([gpu], huge_pages="auto")) as model:
        _assert_same(model.tensors, big_ckpt)
        big = _big(model.tensors)
        assert len(big) == LAYERS + 1
        assert all(_huge_advised(t) is warm for t in big.values())
        ranges = _huge_ranges()
        in_huge = sum(_in_huge(t, ranges) for t in model.tensors.values())
        assert model.report.huge_page_bytes == in_huge
        assert (in_huge > 0) is warm
        del big
    gc.collect()
    assert gpu.allocated_bytes == 0


@linux_only
@pytest.mark.anyio
@pytest.mark.parametrize("device", ["cpu", "staged"])
@pytest.mark.parametrize("setting", [True, False])
async def test_only_small_page_destinations_are_prefaulted(
    big_ckpt: Path, monkeypatch: pytest.MonkeyPatch, device: str, setting: bool
) -> None:
    """Destination bytes in 4 KiB pages are faulted in before their read (one call instead of
    a fault per page inside it); those in huge pages are left to the copy, 2 MiB a fault."""
    if setting and not _hostmem.huge_pages_available():
        pytest.skip("transparent huge pages are off on this machine")
    faulted: list[tuple[int, int]] = []
    real = _hostmem.prefault

    def record(tensor: torch.Tensor) -> None:
        faulted.append((tensor.data_ptr(), tensor.nbytes))
        real(tensor)

    monkeypatch.setattr(_hostmem, "prefault", record)
    target: Any = "cpu" if device == "cpu" else SimulatedGPU("sim:0", total_bytes=2**30)
    async with await streamload.load(big_ckpt, big_params([target], huge_pages=setting)) as model:
        _assert_same(model.tensors, big_ckpt)
        covered: dict[str, int] = {}
        for name, tensor in model.tensors.items():
            start = tensor.data_ptr()
            for address, nbytes in faulted:
                if start <= address < start + tensor.nbytes:
                    assert address + nbytes <= start + tensor.nbytes
                    covered[name] = covered.get(name, 0) + nbytes
        ranges = _huge_ranges()
        expect = {n: t.nbytes - _in_huge(t, ranges) for n, t in model.tensors.items()}
        assert covered == {n: b for n, b in expect.items() if b}
        assert any(_in_huge(t, ranges) for t in model.tensors.values()) is setting


def test_huge_pages_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="huge_pages"):
        streamload.LoadParams(huge_pages="yes")  # type: ignore[arg-type]
    # Off by default: fresh huge pages cost more than they save where users load
    # (``LoadParams`` docstring, benchmarks/results/measurements.md).
    assert streamload.LoadParams().huge_pages is False


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
