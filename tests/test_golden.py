"""Golden tests: what a load does, pinned scenario by scenario, so the engine can be rebuilt
and shown to behave the same.

Each scenario loads a small checkpoint written by the test and compares three records with
``tests/golden/<scenario>.json``:

- ``events``: the plan (``Plan.to_dict()`` from ``PlanComputed``), then every event delivered to
  ``on_event``, each as its dataclass fields, ending with the ``LoadFinished`` report. Timings
  (every field named ``seconds`` or ``*_seconds``) are left out; the host's free memory (CPU
  ``free_before``/``free_after``, the CPU row's capacity and headroom in a plan) reads
  ``"<host>"``, since it is whatever the machine has; paths are relative to the checkpoint.
  Simulated GPUs keep exact ledgers, so their numbers are kept exactly, but for readings
  taken while another thread changes the ledger (``"<racy>"``, ``_event`` says which and why).
- ``devices``: per simulated GPU, every ``empty`` call in order (``dtype[shape]``, with
  ``huge_pages`` when asked and ``OOM`` when it raised), ``peak_allocated_bytes`` (bounded,
  not pinned, where the load converts dtypes), and
  ``allocated_bytes`` while the model is held and after it is released.
- ``preadv`` and ``posix_fadvise``: every call, as ``file@offset``, the lengths of the buffers
  and each buffer's address modulo 64 (``preadv``), or the length and the advice
  (``posix_fadvise``). Reader lanes and staged reads run concurrently, so the calls are compared
  as a sorted list (a multiset); the chunking and the alignment in each call are exact.

Every scenario also checks that the loaded tensors equal ``safetensors``' own load, byte for
byte (floats converted as ``Tensor.to`` does when a dtype is asked for).

After an intended change of behaviour, regenerate the files and review their diff::

    STREAMLOAD_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import streamload
from streamload import _hostmem
from streamload.events import Event, LayerPlaced, LoadFinished, PlanComputed
from streamload.planner import Plan
from streamload.testing import SimulatedGPU
from tests.engine_support import (
    SLOW_COPY,
    assert_identical,
    llama_config,
    llama_tensors,
    params,
    reference,
    sized_gpu,
    three_way,
    write_checkpoint,
)

pytestmark = pytest.mark.anyio

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("STREAMLOAD_UPDATE_GOLDEN") == "1"
HOST = "<host>"
RACY = "<racy>"
LAYERS = 6
MiB = 2**20
# Field names that hold timings: they differ from run to run.
_TIMING = re.compile(r"^(.*_)?seconds$|gb_per_s|throughput")
_ADVICE = {
    getattr(os, name): name.removeprefix("POSIX_FADV_")
    for name in dir(os)
    if name.startswith("POSIX_FADV_")
}

Hook = Callable[[Event], None]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- checkpoints --------------------------------------------------------------------------------


def _llama(directory: Path) -> Path:
    return write_checkpoint(directory, llama_tensors(LAYERS), llama_config(LAYERS))


def _big(directory: Path) -> Path:
    """Three layers, each with an F32 tensor of 2 MiB + 4 bytes: every layer's host block is
    over 2 MiB, so ``huge_pages`` decides what the report's ``huge_page_bytes`` counts."""
    tensors = llama_tensors(3)
    gen = torch.Generator().manual_seed(1)
    for i in range(3):
        tensors[f"model.layers.{i}.mlp.big"] = torch.randn(2 * MiB // 4 + 1, generator=gen)
    return write_checkpoint(directory, tensors, llama_config(3), shards=2)


# -- scenarios ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One load: devices for the checkpoint, ``LoadParams`` overrides, and an optional
    ``on_event`` hook built from the devices and the checkpoint (it may change the world)."""

    devices: Callable[[Path], list[Any]]
    overrides: dict[str, Any] = field(default_factory=dict)
    checkpoint: Callable[[Path], Path] = _llama
    hook: Callable[[list[Any], Path], Hook] | None = None
    # What the page-cache probe answers for a unit's file ranges (``huge_pages="auto"``).
    cached: Callable[[Path, list[tuple[int, int, int]]], float] | None = None
    dtype: torch.dtype | None = None
    # Reads whose chunking and alignment are also checked by rule (``_check_reads``).
    reads: str | None = None


def _cpu(ckpt: Path) -> list[Any]:
    return ["cpu"]


def _gpu(ckpt: Path) -> list[Any]:
    return [SimulatedGPU("sim:0", total_bytes=2**30)]


def _unstaged_gpu(ckpt: Path) -> list[Any]:
    return [SimulatedGPU("sim:0", total_bytes=2**30, staged=False)]


def _three_way_slow_copies(ckpt: Path) -> list[Any]:
    """``three_way`` with slow copies (``SLOW_COPY``) for the steal and allocation-failure
    scenarios, so each file pins one order of a placement and the next unit's recheck, not
    the scheduler's."""
    return three_way(ckpt, SLOW_COPY)


def _gpu_then_cpu(ckpt: Path) -> list[Any]:
    return [sized_gpu("sim:0", ckpt, 1.5, primary=True), "cpu"]


def _steal_after(layer: int) -> Callable[[list[Any], Path], Hook]:
    """After ``layer`` is placed, a tenant takes all of the second GPU's free memory but what
    the layers allocated there so far (up to ``layer + 1``) still need: their KV cache and the
    device's activations. The layers after that re-plan onto the CPU."""

    def build(devices: list[Any], ckpt: Path) -> Hook:
        gpu = devices[1]
        first = streamload.plan(ckpt, params(devices))

        def on_event(event: Event) -> None:
            if isinstance(event, LayerPlaced) and event.layer == layer:
                mine = [
                    i for i, d in enumerate(first.layer_devices) if d == gpu.name and i <= layer + 1
                ]
                keep = sum(first.layer_kv_bytes[i] for i in mine)
                if mine:
                    keep += first.device(gpu.name).activation_bytes
                gpu.steal(max(gpu.free_bytes - keep, 0))

        return on_event

    return build


def _fail_on_second_gpu(after: int) -> Callable[[list[Any], Path], Hook]:
    """Once the plan is computed, the second GPU's allocation ``after + 1`` from then on raises
    ``torch.OutOfMemoryError`` (``after=0``: its first; larger: inside its first unit)."""

    def build(devices: list[Any], ckpt: Path) -> Hook:
        gpu = devices[1]

        def on_event(event: Event) -> None:
            if isinstance(event, PlanComputed):
                gpu.fail_allocations(1, after=after)

        return on_event

    return build


def _odd_layers_cold(ckpt: Path, ranges: list[tuple[int, int, int]]) -> float:
    """The page cache holds every unit's bytes but those of layers 1, 3, ... (``"auto"`` then
    gives huge pages to the others only)."""
    cold = []
    for name, entry in streamload.inspect(ckpt).checkpoint.tensors.items():
        match = re.match(r"model\.layers\.(\d+)\.", name)
        if match and int(match.group(1)) % 2:
            cold.append((entry.path.resolve(), entry.offset, entry.end))
    hit = any(
        _fd_path(fd) == path and low < start + length and start < high
        for fd, start, length in ranges
        for path, low, high in cold
    )
    return 0.0 if hit else 1.0


def _fd_path(fd: int) -> Path:
    """The file an open descriptor of this process refers to (Linux ``/proc/self/fd``)."""
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


_HUGE = {"chunk_bytes": 256 * 1024, "staging_bytes": 4 * 256 * 1024}

SCENARIOS: dict[str, Scenario] = {
    "cpu_copy": Scenario(_cpu, reads="direct"),
    "cpu_mmap": Scenario(_cpu, {"cpu_policy": "mmap"}),
    "cpu_bf16": Scenario(_cpu, dtype=torch.bfloat16),
    "gpu_staged": Scenario(_gpu, reads="staged"),
    "gpu_staged_bf16": Scenario(_gpu, dtype=torch.bfloat16),
    "gpu_unstaged": Scenario(_unstaged_gpu),
    "three_way": Scenario(three_way),
    **{
        f"steal_after_layer_{i}": Scenario(_three_way_slow_copies, hook=_steal_after(i))
        for i in range(LAYERS)
    },
    "fail_first_allocation": Scenario(_three_way_slow_copies, hook=_fail_on_second_gpu(0)),
    "fail_mid_unit_allocation": Scenario(_three_way_slow_copies, hook=_fail_on_second_gpu(5)),
    "paged_attention_fallback": Scenario(
        _gpu_then_cpu, {"paged_attention": streamload.PagedAttention(block_size=4)}
    ),
    "huge_pages_true": Scenario(_gpu_then_cpu, {"huge_pages": True, **_HUGE}, checkpoint=_big),
    "huge_pages_false": Scenario(_gpu_then_cpu, {"huge_pages": False, **_HUGE}, checkpoint=_big),
    "huge_pages_auto": Scenario(
        _gpu_then_cpu,
        {"huge_pages": "auto", **_HUGE},
        checkpoint=_big,
        cached=_odd_layers_cold,
    ),
}


# -- recording ----------------------------------------------------------------------------------


def _relative(value: str, ckpt: Path) -> str:
    for root in (str(ckpt), str(ckpt.resolve())):
        if value == root:
            return "."
        if value.startswith(root + os.sep):
            return value[len(root) + 1 :]
    return value


def _plain(value: Any, ckpt: Path) -> Any:
    """``value`` as JSON: dataclasses as their fields without timings, paths relative."""
    if isinstance(value, Plan):
        return _plan(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {"type": type(value).__name__}
        for f in dataclasses.fields(value):
            if not _TIMING.search(f.name):
                out[f.name] = _plain(getattr(value, f.name), ckpt)
        return out
    if isinstance(value, tuple | list):
        return [_plain(v, ckpt) for v in value]
    if isinstance(value, Path):
        return _relative(str(value), ckpt)
    if isinstance(value, str):
        return _relative(value, ckpt)
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def _plan(plan: Plan) -> dict[str, Any]:
    data = plan.to_dict()
    for row in data["devices"]:
        if not row["is_gpu"]:
            # The host budget is the machine's available memory.
            row["capacity_bytes"] = row["headroom_bytes"] = HOST
            if row["note"] is not None:
                row["note"] = HOST
    return data


def _event(event: Event, ckpt: Path, converts: bool) -> dict[str, Any]:
    """``event`` as JSON, host readings and thread-timed readings replaced (``converts``: the
    load changes dtypes)."""
    data: dict[str, Any] = _plain(event, ckpt)
    if isinstance(event, LayerPlaced):
        if event.device == "cpu":
            data["free_before"] = data["free_after"] = HOST
        else:
            if converts:
                # The unit before frees its conversion buffers on the event loop while this
                # unit's reading is taken in a worker thread: seen to differ by that unit's
                # buffers about once in thirty loads.
                data["free_before"] = RACY
            # Read in a worker thread while the stream allocates the next unit in another one
            # (and while a finished read's thread may still hold its last chunk's buffer):
            # whether the reading includes those bytes is thread timing, seen to vary by a
            # whole unit between runs. ``free_before`` is read before the unit's allocation,
            # and the ledger is pinned exactly below (allocation order, peak, held bytes).
            data["free_after"] = RACY
    replans = data["report"]["replans"] if isinstance(event, LoadFinished) else [data]
    for replan in replans:
        if replan.get("type") == "Replanned" and replan["device"] == "cpu":
            replan["live_free"] = HOST
    return data


def _record_allocations(
    gpu: SimulatedGPU, monkeypatch: pytest.MonkeyPatch, calls: list[str], sizes: list[int]
) -> None:
    """Wrap ``gpu.empty`` (on the instance) to log each call, in order, and the bytes of each
    successful one."""
    real = gpu.empty

    def empty(
        shape: tuple[int, ...], dtype: torch.dtype, *, huge_pages: bool = False
    ) -> torch.Tensor:
        what = f"{str(dtype).removeprefix('torch.')}{list(shape)}"
        if huge_pages:
            what += " huge_pages"
        try:
            tensor = real(shape, dtype, huge_pages=huge_pages)
        except torch.OutOfMemoryError:
            calls.append(f"{what} OOM")
            raise
        calls.append(what)
        sizes.append(tensor.nbytes)
        return tensor

    monkeypatch.setattr(gpu, "empty", empty)


def _address(buffer: Any) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _record_io(
    ckpt: Path,
    monkeypatch: pytest.MonkeyPatch,
    preadv: list[tuple[Any, ...]],
    fadvise: list[tuple[Any, ...]],
) -> None:
    """Wrap ``os.preadv`` and ``os.posix_fadvise`` to log each call (from any thread)."""
    real_preadv = os.preadv
    real_fadvise = os.posix_fadvise

    def name(fd: int) -> str:
        return _relative(str(_fd_path(fd)), ckpt)

    def recording_preadv(fd: int, buffers: Any, offset: int, *flags: int) -> int:
        views = list(buffers)
        lengths = [memoryview(b).nbytes for b in views]
        leads = [_address(b) % 64 for b in views]
        preadv.append((name(fd), offset, lengths, leads))
        return real_preadv(fd, views, offset, *flags)

    def recording_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        fadvise.append((name(fd), offset, length, _ADVICE.get(advice, advice)))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "preadv", recording_preadv)
    monkeypatch.setattr(os, "posix_fadvise", recording_fadvise)


# -- the test -----------------------------------------------------------------------------------


def _check_reads(kind: str, preadv: list[tuple[Any, ...]], chunk_bytes: int) -> None:
    """The rules the recorded reads follow. ``direct`` (into CPU tensors): a chunk of at most
    ``chunk_bytes``, each buffer at its file bytes' position modulo 64. ``staged``: one buffer
    per read, at the file offset's position modulo 64 in its slot, 64 bytes short of
    ``chunk_bytes`` to make room for that."""
    assert preadv
    for _, offset, lengths, leads in preadv:
        if kind == "staged":
            assert 1 == len(lengths)
            assert lengths[0] <= chunk_bytes - 64
            assert [offset % 64] == leads
        else:
            assert sum(lengths) <= chunk_bytes
            starts = [offset + sum(lengths[:i]) for i in range(len(lengths))]
            assert [start % 64 for start in starts] == leads


def _compare(name: str, actual: dict[str, Any]) -> None:
    """``actual`` against ``golden/<name>.json`` (written first when updating), record by
    record so that a failure names the one that changed."""
    path = GOLDEN / f"{name}.json"
    text = json.dumps(actual, indent=2, sort_keys=True) + "\n"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    expected = json.loads(path.read_text())
    actual = json.loads(text)
    for key in sorted(expected.keys() | actual.keys()):
        assert expected.get(key) == actual.get(key), f"{name}: {key} differ from {path.name}"
    assert expected == actual


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_golden(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = SCENARIOS[name]
    ckpt = scenario.checkpoint(tmp_path / "ckpt")
    devices = scenario.devices(ckpt)
    hook = scenario.hook(devices, ckpt) if scenario.hook is not None else None
    # Machine facts the engine reads, fixed so every machine records the same load: huge pages
    # are available (a refused ``madvise`` changes no recorded value: the report counts the
    # bytes advised), the page cache holds the checkpoint as just written (or what the scenario
    # says), and the staging ring's size comes from two usable CPUs.
    cached = scenario.cached
    monkeypatch.setattr(_hostmem, "huge_pages_available", lambda: True)
    monkeypatch.setattr(
        _hostmem,
        "cached_fraction",
        (lambda ranges: 1.0) if cached is None else (lambda ranges: cached(ckpt, ranges)),
    )
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)

    allocations: dict[str, list[str]] = {}
    allocated_bytes: dict[str, list[int]] = {}
    gpus = [d for d in devices if isinstance(d, SimulatedGPU)]
    for gpu in gpus:
        _record_allocations(
            gpu,
            monkeypatch,
            allocations.setdefault(gpu.name, []),
            allocated_bytes.setdefault(gpu.name, []),
        )
    preadv: list[tuple[Any, ...]] = []
    fadvise: list[tuple[Any, ...]] = []
    _record_io(ckpt, monkeypatch, preadv, fadvise)
    events: list[dict[str, Any]] = []

    def on_event(event: Event) -> None:
        events.append(_event(event, ckpt, converts))
        if hook is not None:
            hook(event)

    converts = scenario.dtype is not None
    load_params = params(devices, dtype=scenario.dtype, **scenario.overrides)
    async with await streamload.load(ckpt, load_params, on_event=on_event) as model:
        assert_identical(model.tensors, reference(ckpt), scenario.dtype)
        held = {gpu.name: gpu.allocated_bytes for gpu in gpus}
    monkeypatch.undo()
    if scenario.reads is not None:
        _check_reads(scenario.reads, preadv, load_params.chunk_bytes)
    peaks: dict[str, Any] = {gpu.name: gpu.peak_allocated_bytes for gpu in gpus}
    if converts:
        # Conversion buffers of one unit are freed while the next is allocated, in another
        # thread (``_event``): the peak is bounded exactly, and the allocations pinned in order.
        for gpu in gpus:
            assert held[gpu.name] <= peaks[gpu.name] <= sum(allocated_bytes[gpu.name])
            peaks[gpu.name] = RACY

    actual = {
        "events": events,
        "devices": {
            gpu.name: {
                "allocations": allocations[gpu.name],
                "peak_allocated_bytes": peaks[gpu.name],
                "allocated_bytes_loaded": held[gpu.name],
                "allocated_bytes_released": gpu.allocated_bytes,
            }
            for gpu in gpus
        },
        "preadv": [
            f"{file}@{offset} lengths={lengths} mod64={leads}"
            for file, offset, lengths, leads in sorted(preadv)
        ],
        "posix_fadvise": [
            f"{file}@{offset} length={length} {advice}"
            for file, offset, length, advice in sorted(fadvise)
        ],
    }
    _compare(name, actual)
