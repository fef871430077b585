"""The control channel: object collectives over a gloo group, in worker threads, each wait
bounded (``peer_timeout`` + a grace), so the event loop never blocks and a dead or hung peer
fails the others with a ``CollectiveError``."""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import torch.distributed as dist

from streamload.devices import Device
from streamload.errors import CollectiveError, DistributedError

__all__ = ["DEFAULT_TIMEOUT"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 600.0  # seconds; NCCL's default process-group timeout

_GRACE = 5.0  # seconds past a group's own timeout before a wait is abandoned


class _Channel:
    """Object collectives over a gloo group, run in worker threads with bounded waits.

    Once ``device`` is set (the rank's first GPU), each collective runs with it as the worker
    thread's current device: a worker thread starts on device 0, and a group whose backend
    stages objects on the current device (NCCL, when the caller passes one) would put every
    rank's exchange on GPU 0.

    A wait that outlives ``timeout`` + a grace, or is cancelled, is abandoned (the thread ends
    when the group's own timeout fires, or completes the exchange if the peers arrive in
    time); the group is then left alone rather than destroyed under that thread.
    """

    def __init__(self, group: dist.ProcessGroup, *, owned: bool, timeout: float, host: str) -> None:
        self.group = group
        self.owned = owned
        self.timeout = timeout
        self.host = host
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.root = dist.get_process_group_ranks(group)[0]
        self.abandoned = False
        self.device: Device | None = None

    @classmethod
    async def open(cls, group: dist.ProcessGroup | None, peer_timeout: float) -> _Channel:
        host = socket.gethostname()
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError(
                "torch.distributed is not initialised: call dist.init_process_group() first "
                "(torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
            )
        if group is not None:
            return cls(group, owned=False, timeout=peer_timeout, host=host)
        rank = dist.get_rank()
        made = await _bounded(
            lambda: dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=peer_timeout)
            ),
            peer_timeout,
            on_timeout=lambda: CollectiveError(
                "making the load's gloo group", _late(peer_timeout), rank=rank, host=host
            ),
            on_error=lambda exc: CollectiveError(
                "making the load's gloo group", _first_line(exc), rank=rank, host=host
            ),
        )
        assert isinstance(made, dist.ProcessGroup)
        return cls(made, owned=True, timeout=peer_timeout, host=host)

    async def all_gather(self, exchange: str, item: T) -> list[T]:
        def run() -> list[T]:
            out: list[Any] = [None] * self.world
            dist.all_gather_object(out, item, group=self.group)
            return out

        return await self._run(exchange, run)

    async def broadcast(self, exchange: str, item: T | None) -> T:
        def run() -> T:
            box: list[Any] = [item]
            dist.broadcast_object_list(box, src=self.root, group=self.group)
            result: T = box[0]
            return result

        return await self._run(exchange, run)

    async def _run(self, exchange: str, fn: Callable[[], T]) -> T:
        finished = threading.Event()

        device = self.device

        def run() -> T:
            try:
                with contextlib.nullcontext() if device is None else device.current():
                    return fn()
            finally:
                finished.set()

        try:
            return await self._wait(exchange, run)
        finally:
            # A wait given up (timeout, cancellation) leaves the thread inside the collective.
            self.abandoned = self.abandoned or not finished.is_set()

    async def _wait(self, exchange: str, fn: Callable[[], T]) -> T:
        return await _bounded(
            fn,
            self.timeout,
            on_timeout=lambda: CollectiveError(
                exchange, _late(self.timeout), rank=self.rank, host=self.host
            ),
            on_error=lambda exc: CollectiveError(
                exchange,
                f"{_first_line(exc)} (a peer failed, left, or did not answer)",
                rank=self.rank,
                host=self.host,
            ),
        )

    async def close(self) -> None:
        """Destroy the group this channel made (never one the caller passed in)."""
        if not self.owned or self.abandoned:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(_GRACE):
            await anyio.to_thread.run_sync(
                dist.destroy_process_group, self.group, abandon_on_cancel=True
            )


async def _bounded(
    fn: Callable[[], T],
    seconds: float,
    *,
    on_timeout: Callable[[], DistributedError],
    on_error: Callable[[Exception], DistributedError],
) -> T:
    """Run blocking ``fn`` in a worker thread; give up waiting after ``seconds`` + a grace."""
    try:
        with anyio.fail_after(seconds + _GRACE):
            return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)
    except TimeoutError:
        raise on_timeout() from None
    except (RuntimeError, ValueError, OSError) as exc:  # gloo and the store raise these
        raise on_error(exc) from exc


def _late(timeout: float) -> str:
    return f"no answer within {timeout:g} s (a peer died, hung, or is still busy)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else exc!r}"
