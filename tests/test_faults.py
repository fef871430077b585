"""Host blocks the disk must fill, faulted in ahead of their reads (``engine/_faults``), and the
deeper window they are allocated in (``_load.room_for``): what the worker faults in and what it
passes over, its single worker, cancellation, and real cold and warm loads to the CPU."""

from __future__ import annotations

import gc
import os
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.to_thread
import pytest
import torch

import streamload
from streamload import _hostmem
from streamload.engine import _load
from streamload.engine._faults import FaultAhead
from streamload.engine._flight import InFlight
from streamload.engine._load import COLD_WINDOW, room_for
from streamload.engine._units import Chunk, Piece
from streamload.events import LoadCancelled
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

MiB = 2**20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def faulted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every ``_hostmem.prefault`` call: (address, bytes), from any thread."""
    calls: list[tuple[int, int]] = []

    def prefault(tensor: torch.Tensor) -> None:
        calls.append((tensor.data_ptr(), tensor.numel() * tensor.element_size()))

    monkeypatch.setattr(_hostmem, "prefault", prefault)
    return calls


def _flight(*pieces: list[tuple[torch.Tensor, int]]) -> InFlight:
    """A unit in flight with one chunk per argument, each of (destination, fault_from)
    pieces (only what the worker looks at is real)."""
    chunks = [
        Chunk(Path("x"), 0, pieces=[Piece(dst, 0, "t", fault_from) for dst, fault_from in chunk])
        for chunk in pieces
    ]
    return InFlight(cast(Any, None), cast(Any, None), {}, {}, chunks, 0, 0.0, 0, 0)


def _bytes(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def _spans(dst: torch.Tensor, start: int = 0) -> list[tuple[int, int]]:
    """``dst[start:]`` as the worker asks for it: in order, at most a prefault piece each."""
    out = []
    end = dst.numel()
    while start < end:
        stop = min(start + _hostmem.PREFAULT_PIECE, end)
        out.append((dst.data_ptr() + start, stop - start))
        start = stop
    return out


async def test_faults_every_queued_unit_in_order_a_piece_at_a_time(
    faulted: list[tuple[int, int]],
) -> None:
    """Units in the order queued, each piece from its ``fault_from`` on (a huge-page stretch
    before it is left alone, a piece with nothing after it skipped), in calls of at most
    ``PREFAULT_PIECE`` bytes; one worker: only the first ``put`` while it runs starts one."""
    a0, a1, a2, b0 = (_bytes(n) for n in (5 * MiB, 3 * MiB + 5, 100, MiB))
    faults = FaultAhead()
    assert faults.put(_flight([(a0, 1000)], [(a1, 0), (a2, 100)]))
    assert not faults.put(_flight([(b0, 0)]))
    await anyio.to_thread.run_sync(faults.run)
    want = _spans(a0, 1000) + _spans(a1) + _spans(b0)
    assert want == faulted
    assert sum(n for _, n in want) == faults.faulted_bytes
    # The worker ended with the queue empty: the next unit starts another.
    assert faults.put(_flight([(_bytes(10), 0)]))


async def test_a_unit_put_as_the_worker_ends_gets_exactly_one_new_worker(
    faulted: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit put just after the worker found the queue empty (its last look, under the lock)
    starts one new worker, and the ending worker does not take that one's place: a unit put
    while the new one runs starts none."""
    faults = FaultAhead()
    step = FaultAhead._step
    answers: list[bool] = []

    def step_then_put(self: FaultAhead) -> bool:
        more = step(self)
        if not more and not answers:
            answers.append(faults.put(_flight([(_bytes(10), 0)])))  # another thread, here
        return more

    monkeypatch.setattr(FaultAhead, "_step", step_then_put)
    assert faults.put(_flight([(_bytes(10), 0)]))
    await anyio.to_thread.run_sync(faults.run)
    assert [True] == answers  # the caller starts a new worker for it...
    assert not faults.put(_flight([(_bytes(10), 0)]))  # ...which holds the place


async def test_passes_over_units_read_failed_or_dropped(faulted: list[tuple[int, int]]) -> None:
    done, failed, dropped, live = (_bytes(MiB) for _ in range(4))
    flights = [_flight([(t, 0)]) for t in (done, failed, dropped, live)]
    flights[0].done.set()
    flights[1].error = OSError("read failed")
    flights[2].drop()
    faults = FaultAhead()
    for flight in flights:
        faults.put(flight)
    await anyio.to_thread.run_sync(faults.run)
    assert _spans(live) == faulted


async def test_a_unit_dropped_while_faulted_in_is_let_go_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The orchestrator drops a unit (a failed or cancelled load) while the worker is in it:
    the worker faults in nothing more of it and goes on with the next."""
    first, second = _bytes(8 * MiB), _bytes(MiB)
    flights = [_flight([(first, 0)], [(first, 0)]), _flight([(second, 0)])]
    calls: list[int] = []

    def prefault(tensor: torch.Tensor) -> None:
        calls.append(tensor.data_ptr())
        flights[0].drop()

    monkeypatch.setattr(_hostmem, "prefault", prefault)
    faults = FaultAhead()
    for flight in flights:
        faults.put(flight)
    await anyio.to_thread.run_sync(faults.run)
    assert [first.data_ptr(), second.data_ptr()] == calls


@pytest.fixture
def no_collector() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def test_a_cancelled_worker_stops_between_pieces_and_holds_no_tensor(
    monkeypatch: pytest.MonkeyPatch, no_collector: None
) -> None:
    """Cancelled, the worker ends at its next piece, and once the load closes it nothing of
    the units' memory is kept alive (with the cycle collector off: no reference cycle
    either)."""
    calls: list[int] = []

    def prefault(tensor: torch.Tensor) -> None:
        calls.append(tensor.numel())
        time.sleep(0.005)

    monkeypatch.setattr(_hostmem, "prefault", prefault)
    memory = _bytes(64 * MiB)
    gone = weakref.ref(memory)
    faults = FaultAhead()
    flight = _flight([(memory, 0)])
    assert faults.put(flight)
    with anyio.move_on_after(0.05) as scope:
        await anyio.to_thread.run_sync(faults.run)
    assert scope.cancelled_caught
    assert 0 < len(calls) < 64 * MiB // _hostmem.PREFAULT_PIECE
    faults.close()
    assert not faults.put(flight)  # closed: nothing more is taken
    del flight, memory
    assert gone() is None


def _room(unplaced: int, reading: int, *, gpu: bool = False, raw: int = 0, depth: int = 2) -> bool:
    return room_for(unplaced=unplaced, to_gpu=gpu, reading=reading, raw=raw, scratch=0, depth=depth)


def test_the_window_is_depth_units_being_read_for_host_units_and_two_for_gpus() -> None:
    # Two units in flight are always allowed; depth 2 is the page-cache window.
    assert _room(1, 1)
    assert _room(2, 1)
    assert not _room(2, 2)
    assert not _room(3, 1)
    assert _room(COLD_WINDOW, COLD_WINDOW - 1, depth=COLD_WINDOW)
    assert not _room(COLD_WINDOW, COLD_WINDOW, depth=COLD_WINDOW)
    assert not _room(COLD_WINDOW + 1, 0, depth=COLD_WINDOW)
    assert not _room(3, 1, raw=1, depth=COLD_WINDOW)  # conversion buffers beyond the scratch
    # A GPU unit waits for the placement two before it, whatever the depth.
    assert _room(1, 1, gpu=True, depth=COLD_WINDOW)
    assert not _room(2, 0, gpu=True, depth=COLD_WINDOW)


LAYERS = 8


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt", llama_tensors(LAYERS), llama_config(LAYERS))


class Watch:
    """What a load's orchestrator and fault-ahead worker did: every ``room_for`` answer and
    every ``FaultAhead`` made, with the units put to it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.windows: list[tuple[int, int, bool]] = []  # depth, units being read, allowed
        self.faults: list[FaultAhead] = []
        self.put: list[InFlight] = []
        real_room, real_init, real_put = _load.room_for, FaultAhead.__init__, FaultAhead.put

        def room(**kwargs: Any) -> bool:
            allowed = real_room(**kwargs)
            self.windows.append((kwargs.get("depth", 2), kwargs["reading"], allowed))
            return allowed

        def init(faults: FaultAhead) -> None:
            real_init(faults)
            self.faults.append(faults)

        def put(faults: FaultAhead, flight: InFlight) -> bool:
            self.put.append(flight)
            return real_put(faults, flight)

        monkeypatch.setattr(_load, "room_for", room)
        monkeypatch.setattr(FaultAhead, "__init__", init)
        monkeypatch.setattr(FaultAhead, "put", put)


@pytest.fixture
def slow_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read takes 2 ms longer, as a disk would, so units are still being read when the
    next ones are allocated."""
    real = os.preadv

    def preadv(fd: int, buffers: list[Any], offset: int) -> int:
        time.sleep(0.002)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)


async def test_a_cold_load_to_the_cpu_faults_ahead_in_a_deeper_window(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, slow_reads: None
) -> None:
    """Files evicted from the page cache: the CPU's units are put to the fault-ahead worker,
    which faults their memory in, and are allocated up to ``COLD_WINDOW`` units being read
    at once (never more); the tensors are exact."""
    watch = Watch(monkeypatch)
    evict(ckpt)
    model = await streamload.load(ckpt, params(["cpu"]))
    assert_identical(model.tensors, reference(ckpt), None)
    stored = model.report.stored_bytes
    model.release()
    assert 1 == len(watch.faults)
    assert len(watch.put) >= LAYERS // 2
    assert 0 < watch.faults[0].faulted_bytes <= 2 * stored  # pages: whole 4 KiB ones
    deeper = [reading for depth, reading, allowed in watch.windows if allowed and reading >= 2]
    assert deeper, "no unit was allocated while two or more were being read"
    assert all(
        depth == COLD_WINDOW
        for depth, reading, allowed in watch.windows
        if reading >= 2 and allowed
    )
    assert max(deeper) < COLD_WINDOW


async def test_a_warm_load_to_the_cpu_keeps_the_shallow_window(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files in the page cache: no unit is faulted ahead (the copies keep both CPUs busy; the
    reader faults pages in as it copies) and at most two units are read at once."""
    watch = Watch(monkeypatch)
    for path in ckpt.glob("*.safetensors"):
        path.read_bytes()
    model = await streamload.load(ckpt, params(["cpu"]))
    assert_identical(model.tensors, reference(ckpt), None)
    model.release()
    assert [] == watch.put
    assert {2} == {depth for depth, _, _ in watch.windows}


@pytest.mark.parametrize("after", [None, 0, 3])
async def test_cancelling_a_cold_load_stops_the_worker_and_releases_everything(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, slow_reads: None, after: int | None
) -> None:
    """Cancelled while units are faulted in ahead, the load ends with the worker closed (it
    takes no more units) and no file open."""
    watch = Watch(monkeypatch)
    evict(ckpt)
    cancelled, events = await load_cancelled_after(ckpt, params(["cpu"]), after)
    assert cancelled
    assert isinstance(events[-1], LoadCancelled)
    assert [] == open_fds_under(ckpt)
    assert 1 == len(watch.faults)
    assert not watch.faults[0].put(_flight())  # closed with the load
