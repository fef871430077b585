"""``FakeCuda``: a recording fake of the CUDA runtime, for ``CudaDevice(runtime=...)``.

It implements ``streamload.devices.CudaRuntime`` over host memory and keeps the semantics of
torch's CUDA runtime that a loader can get wrong (each written down in
``streamload.devices._runtime``):

- **a current device per host thread**, 0 in every new thread; ``device(i)`` exchanges it
  like ``torch.cuda.device`` (entering creates ``i``'s context; leaving restores the previous
  device without creating one there); ``stream(s)`` behaves like ``torch.cuda.stream``,
  including the ``cudaSetDevice`` its exit makes when the thread's current device is another
  one; ``set_device`` creates the device's context;
- **contexts cost memory**: creating one (by ``set_device``, the first allocation,
  ``mem_get_info``, a stream) charges ``context_bytes`` to that GPU, and is recorded;
- **a caching allocator**: freed tensor memory stays reserved (counted as used by the NVML
  fake and ``mem_get_info``) until ``empty_cache()``; pinned buffers likewise until
  ``host_empty_cache()``;
- **streams and events with their flags**: copies and conversions are queued on the current
  stream of the destination's device and run only when something waits for them (an event
  recorded after them is synchronised or queried, the stream is synchronised, a blocking copy
  is made); until then the destination holds what it held before, so a missing wait shows as
  wrong bytes; ``hang()`` makes the GPU stop: queries say "not done" and a blocking wait is
  recorded and fails instead of returning;
- **every call recorded** (``calls``) with the thread's current device at the time.

Tensors it hands out are host tensors; ``nvml_api()`` gives an ``NvmlApi`` over the same
memory ledger, so ``CudaDevice`` reads live free memory as it would from NVML.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import threading
import uuid as uuid_module
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pynvml
import torch

__all__ = ["FakeCall", "FakeCuda", "FakeEvent", "FakeStream"]


@dataclass(frozen=True, slots=True)
class FakeCall:
    """One call into the fake: its name, the calling thread's current device, and details."""

    name: str
    current_device: int
    thread: int
    detail: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class _Props:
    total_memory: int
    uuid: str
    name: str = "FakeCuda GPU"


@dataclass(slots=True)
class _Gpu:
    total: int
    others: int = 0  # bytes other processes hold
    context: bool = False
    allocated: int = 0
    cached: int = 0  # freed by tensors, still reserved by the caching allocator


def _nothing() -> None:
    return None


@dataclass(slots=True)
class _Op:
    run: Callable[[], None]
    done: bool = False


class FakeStream:
    """A stream of the fake: ops queued in order, run when something waits for them."""

    def __init__(self, cuda: FakeCuda, device: int, *, default: bool) -> None:
        self._cuda = cuda
        self.device = device
        self.default = default
        self.ops: list[_Op] = []
        self._running = threading.RLock()  # one op at a time, in order, as on a real stream

    def _enqueue(self, run: Callable[[], None]) -> int:
        with self._cuda._lock:
            self.ops.append(_Op(run))
            return len(self.ops)

    def _run_to(self, position: int) -> bool:
        """Run the first ``position`` ops (False when the GPU hangs)."""
        with self._running:
            while True:
                with self._cuda._lock:
                    if self._cuda._hung:
                        return False
                    op = next((op for op in self.ops[:position] if not op.done), None)
                if op is None:
                    return True
                op.run()
                op.run = _nothing  # drop the tensors the op held, as a finished copy does
                op.done = True

    def wait_event(self, event: Any) -> None:
        assert isinstance(event, FakeEvent)
        self._cuda._record("stream.wait_event", self.device, event.blocking)
        mark = event._mark

        def wait() -> None:
            if mark is not None:
                mark[0]._run_to(mark[1])

        self._enqueue(wait)

    def wait_stream(self, stream: Any) -> None:
        assert isinstance(stream, FakeStream)
        self._cuda._record("stream.wait_stream", self.device, stream.default)
        position = len(stream.ops)

        def wait() -> None:
            stream._run_to(position)

        self._enqueue(wait)

    def synchronize(self) -> None:
        self._cuda._record("stream.synchronize", self.device)
        if not self._run_to(len(self.ops)):
            self._cuda._blocked("stream.synchronize")

    def __repr__(self) -> str:
        return f"FakeStream(device={self.device}, default={self.default})"


class FakeEvent:
    """``torch.cuda.Event(blocking=...)`` of the fake."""

    def __init__(self, cuda: FakeCuda, *, blocking: bool) -> None:
        self._cuda = cuda
        self.blocking = blocking
        self._mark: tuple[FakeStream, int] | None = None

    def record(self, stream: Any = None) -> None:
        if stream is None:
            stream = self._cuda.current_stream(self._cuda.current_device())
        assert isinstance(stream, FakeStream)
        self._cuda._record("event.record", stream.device)
        with self._cuda._lock:
            self._mark = (stream, len(stream.ops))

    def query(self) -> bool:
        self._cuda._record("event.query", None)
        mark = self._mark
        return mark is None or mark[0]._run_to(mark[1])

    def synchronize(self) -> None:
        self._cuda._record("event.synchronize", None, self.blocking)
        if not self.blocking:
            self._cuda.spin_waits += 1
        mark = self._mark
        if mark is not None and not mark[0]._run_to(mark[1]):
            self._cuda._blocked("event.synchronize")


class _Ledger:
    """The fake's memory: per-GPU contexts, allocations and the caching allocator's reserve,
    pinned host buffers and their cache; tensors are host memory whose release is credited
    when their storage dies (on whatever thread)."""

    def __init__(self, totals: Sequence[int], context_bytes: int) -> None:
        self._lock = threading.RLock()
        self._gpus = [_Gpu(total) for total in totals]
        self.context_bytes = context_bytes
        # storage address -> (block token, GPU or -1 for pinned host)
        self._owners: dict[int, tuple[int, int]] = {}
        self._tokens = itertools.count(1)
        self._pinned_live = 0
        self._pinned_cached = 0
        self.contexts: list[tuple[int, str]] = []  # (GPU, the call that created it)

    def _create_context(self, ordinal: int, call: str) -> None:
        with self._lock:
            gpu = self._gpus[ordinal]
            if gpu.context:
                return
            gpu.context = True
            self.contexts.append((ordinal, call))

    def _driver_free(self, ordinal: int) -> int:
        with self._lock:
            gpu = self._gpus[ordinal]
            context = self.context_bytes if gpu.context else 0
            return max(gpu.total - gpu.others - context - gpu.allocated - gpu.cached, 0)

    def _host_tensor(
        self, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int, owner: int
    ) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        block = mmap.mmap(-1, nbytes)
        flat = torch.frombuffer(block, dtype=torch.uint8, count=nbytes)
        address = flat.untyped_storage().data_ptr()
        with self._lock:
            token = next(self._tokens)
            self._owners[address] = (token, owner)
        weakref.finalize(block, self._freed, address, token, owner, nbytes).atexit = False
        return flat.view(dtype).view(shape)

    def _freed(self, address: int, block: int, owner: int, nbytes: int) -> None:
        # Finalisers run on whatever thread dropped the last reference (the RLock allows one
        # inside the fake's own critical section), after the mapping is gone: another block
        # may already have its address.
        with self._lock:
            if self._owners.get(address, (None, None))[0] == block:
                del self._owners[address]
            if owner < 0:
                self._pinned_live -= nbytes
                self._pinned_cached += nbytes
            else:
                self._gpus[owner].allocated -= nbytes
                self._gpus[owner].cached += nbytes

    def _owner(self, tensor: torch.Tensor) -> int:
        """The GPU a tensor's memory is on (-1: pinned host; -2: ordinary host memory)."""
        with self._lock:
            return self._owners.get(tensor.untyped_storage().data_ptr(), (0, -2))[1]


class FakeCuda(_Ledger):
    """A fake CUDA runtime with GPUs of ``totals`` bytes (see the module docstring).

    ``context_bytes``: what each GPU's primary context costs. ``uuids``: the GPUs' UUIDs
    (random by default), as ``get_device_properties(i).uuid`` gives them (no ``GPU-``).
    """

    def __init__(
        self,
        totals: Sequence[int],
        *,
        context_bytes: int = 0,
        uuids: Sequence[str] | None = None,
    ) -> None:
        super().__init__(totals, context_bytes)
        self._uuids = (
            list(uuids) if uuids is not None else [str(uuid_module.uuid4()) for _ in totals]
        )
        self._local = threading.local()
        self._defaults = [FakeStream(self, i, default=True) for i in range(len(totals))]
        self._streams = list(self._defaults)
        self._hung = False
        self.calls: list[FakeCall] = []
        self.events: list[FakeEvent] = []
        self.spin_waits = 0  # synchronize() on non-blocking events
        self.blocked_waits: list[str] = []  # blocking waits made while the GPU hung

    # -- simulation controls ---------------------------------------------------------------

    def hang(self) -> None:
        """The GPU stops: nothing queued runs any more."""
        with self._lock:
            self._hung = True

    def take(self, ordinal: int, nbytes: int) -> None:
        """Another process takes ``nbytes`` on GPU ``ordinal``."""
        with self._lock:
            self._gpus[ordinal].others += nbytes

    def reserved(self, ordinal: int) -> int:
        """Bytes this process holds on the GPU: its allocator's reserve and its context."""
        with self._lock:
            gpu = self._gpus[ordinal]
            return gpu.allocated + gpu.cached + (self.context_bytes if gpu.context else 0)

    @property
    def pinned_bytes(self) -> int:
        """Pinned host bytes live or cached."""
        with self._lock:
            return self._pinned_live + self._pinned_cached

    def names(self) -> list[str]:
        """The recorded calls' names, in order."""
        with self._lock:
            return [call.name for call in self.calls]

    def nvml_api(self) -> _FakeNvml:
        """An ``NvmlApi`` over this fake's GPUs (UUIDs ``GPU-...``, free from the ledger)."""
        return _FakeNvml(self)

    # -- CudaRuntime ------------------------------------------------------------------------

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return len(self._gpus)

    def get_device_properties(self, ordinal: int) -> Any:
        self._record("get_device_properties", ordinal)
        return _Props(self._gpus[ordinal].total, self._uuids[ordinal])

    def has_primary_context(self, ordinal: int) -> bool:
        with self._lock:
            return self._gpus[ordinal].context

    def mem_get_info(self, ordinal: int) -> tuple[int, int]:
        self._record("mem_get_info", ordinal)
        with self._guard(ordinal, "mem_get_info"):
            return self._driver_free(ordinal), self._gpus[ordinal].total

    def memory_reserved(self, ordinal: int) -> int:
        with self._lock:
            gpu = self._gpus[ordinal]
            return gpu.allocated + gpu.cached

    def memory_allocated(self, ordinal: int) -> int:
        with self._lock:
            return self._gpus[ordinal].allocated

    def empty_cache(self) -> None:
        # The caching allocator synchronises the events of blocks still in use by streams
        # before it frees them: the queued work runs first.
        self._record("empty_cache", None)
        self._drain()
        with self._lock:
            for gpu in self._gpus:
                gpu.cached = 0

    def host_empty_cache(self) -> None:
        self._record("host_empty_cache", None)
        self._drain()
        with self._lock:
            self._pinned_cached = 0

    @contextlib.contextmanager
    def device(self, ordinal: int) -> Iterator[None]:
        self._record("device.enter", ordinal)
        previous = self._exchange_device(ordinal)
        try:
            yield
        finally:
            self._record("device.exit", previous)
            self._maybe_exchange_device(previous)

    @contextlib.contextmanager
    def stream(self, stream: Any) -> Iterator[None]:
        # torch.cuda.StreamContext, step by step.
        assert isinstance(stream, FakeStream)
        self._record("stream.enter", stream.device)
        src_prev = self.current_stream(self.current_device())
        dst_prev = None
        if src_prev.device != stream.device:
            with self.device(stream.device):
                dst_prev = self.current_stream(stream.device)
        self._set_stream(stream)
        try:
            yield
        finally:
            self._record("stream.exit", stream.device)
            if dst_prev is not None:
                self._set_stream(dst_prev)
            self._set_stream(src_prev)

    def new_stream(self, ordinal: int) -> FakeStream:
        self._record("new_stream", ordinal)
        with self.device(ordinal):
            stream = FakeStream(self, ordinal, default=False)
        with self._lock:
            self._streams.append(stream)
        return stream

    def new_event(self, *, blocking: bool) -> FakeEvent:
        self._record("new_event", None, blocking)
        event = FakeEvent(self, blocking=blocking)
        with self._lock:
            self.events.append(event)
        return event

    def current_stream(self, ordinal: int) -> FakeStream:
        streams: dict[int, FakeStream] = self._thread().streams
        return streams.get(ordinal, self._defaults[ordinal])

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, ordinal: int) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        self._record("empty", ordinal, nbytes)
        with self._guard(ordinal, "empty"), self._lock:
            gpu = self._gpus[ordinal]
            reuse = min(gpu.cached, nbytes)
            if nbytes - reuse > self._driver_free(ordinal):
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory (fake): tried to allocate {nbytes} bytes on GPU {ordinal}"
                )
            gpu.cached -= reuse
            gpu.allocated += nbytes
        return self._host_tensor(shape, dtype, nbytes, ordinal)

    def pinned_empty(self, nbytes: int) -> torch.Tensor:
        self._record("pinned_empty", None, nbytes)
        with self._lock:
            reuse = min(self._pinned_cached, nbytes)
            self._pinned_cached -= reuse
            self._pinned_live += nbytes
        return self._host_tensor((nbytes,), torch.uint8, nbytes, -1)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, *, non_blocking: bool) -> None:
        target = self._owner(dst)
        source = self._owner(src)
        self._record("copy", target, non_blocking, source)
        if target < 0:
            raise AssertionError("the fake copies into its GPUs only")
        stream = self.current_stream(target)

        def run() -> None:
            dst.copy_(src)

        position = stream._enqueue(run)
        # A blocking host-to-device copy synchronises its stream before returning; a copy
        # between GPU tensors never waits for the host.
        if source < 0 and not non_blocking and not stream._run_to(position):
            self._blocked("copy")

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        assert isinstance(stream, FakeStream)
        self._record("record_stream", stream.device)

    # -- internals --------------------------------------------------------------------------

    def current_device(self) -> int:
        device: int = self._thread().device
        return device

    def set_device(self, ordinal: int) -> None:
        """``cudaSetDevice``: makes ``ordinal`` current and creates its context."""
        self._record("set_device", ordinal)
        self._thread().device = ordinal
        self._create_context(ordinal, "set_device")

    def _thread(self) -> Any:
        local = self._local
        if not hasattr(local, "device"):
            local.device = 0
            local.streams = {}
        return local

    def _drain(self) -> None:
        """Run everything queued on every stream (not on a hung GPU)."""
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream._run_to(len(stream.ops))

    def _exchange_device(self, ordinal: int) -> int:
        previous = self.current_device()
        if ordinal != previous:
            self.set_device(ordinal)
        return previous

    def _maybe_exchange_device(self, ordinal: int) -> None:
        if ordinal == self.current_device():
            return
        if self.has_primary_context(ordinal):
            self.set_device(ordinal)
        else:
            self._thread().device = ordinal  # deferred: no context is created

    def _set_stream(self, stream: FakeStream) -> None:
        # torch._C._cuda_setStream: sets the stream's device first when it is not current.
        if self.current_device() != stream.device:
            self.set_device(stream.device)
        self._thread().streams[stream.device] = stream

    @contextlib.contextmanager
    def _guard(self, ordinal: int, call: str) -> Iterator[None]:
        """A C++ device guard: the device's context exists inside; the thread's current
        device is restored without creating a context."""
        self._create_context(ordinal, call)
        yield

    def _record(self, name: str, device: int | None, *detail: Any) -> None:
        call = FakeCall(name, self.current_device(), threading.get_ident(), (device, *detail))
        with self._lock:
            self.calls.append(call)

    def _blocked(self, call: str) -> None:
        with self._lock:
            self.blocked_waits.append(call)
        raise AssertionError(f"{call} on a hung GPU would never return")


@dataclass(frozen=True, slots=True)
class _Memory:
    total: int
    free: int
    used: int


@dataclass
class _FakeNvml:
    """``pynvml`` over a ``FakeCuda``'s GPUs (NVML index = CUDA ordinal). ``fail`` maps a call
    name (``"memory"``) to the ``pynvml.NVMLError`` it raises from now on."""

    cuda: FakeCuda
    fail: dict[str, pynvml.NVMLError] = field(default_factory=dict)

    def nvmlInit(self) -> None:
        return None

    def nvmlDeviceGetCount(self) -> int:
        return self.cuda.device_count()

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any:
        for index, known in enumerate(self.cuda._uuids):
            if uuid == f"GPU-{known}":
                return index
        raise pynvml.NVMLError_NotFound()

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return f"GPU-{self.cuda._uuids[handle]}"

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        if "memory" in self.fail:
            raise self.fail["memory"]
        total = self.cuda._gpus[handle].total
        free = self.cuda._driver_free(handle)
        return _Memory(total, free, total - free)

    def nvmlDeviceGetMigMode(self, handle: Any) -> Sequence[int]:
        raise pynvml.NVMLError_NotSupported()
