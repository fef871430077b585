"""Process-wide state, all of it in one place (structlog's ``_config`` is the model).

Everything streamload keeps for the life of the process rather than per load lives in
``STATE``:

- ``reservations``: the ledger of device bytes in-flight loads have spoken for, so two loads
  in one process never count the same free memory twice (``ReservationBook``), and
  ``planning``, the lock a load holds from reading capacities until its plan is reserved, so
  two loads that start together plan one after the other, and ``ledger``, held around a live
  reading and around an allocation with the update of its reservation, so a reading never
  counts an allocation and its reservation both;
- ``nvml``: the process's NVML wrapper (``streamload.devices.default_nvml`` makes it on first
  use; NVML is initialised once and never shut down, ``nvmlInit`` being reference-counted);
- ``probes``: feature probes of the host that cannot change under a running process, each read
  once (whether transparent huge pages can be asked for, whether ``cachestat`` works, where this
  process's memory cgroup directories are).

``reset()`` puts all of it back to a fresh process's state; tests call it, nothing else does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["STATE", "Probes", "ReservationBook", "State", "reset"]


class ReservationBook:
    """Process-wide ledger of device bytes that in-flight loads have spoken for.

    Two loads in one process both see a GPU's live free memory; each reserves what it still
    needs and subtracts ``held_by_others`` from live readings, so the same free bytes are not
    counted twice. Thread-safe. Owners are compared by identity and kept referenced until
    released: call ``release_all(owner)`` in a ``finally``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, tuple[object, dict[str, int]]] = {}

    def reserve(self, owner: object, device: str, nbytes: int) -> None:
        """Add ``nbytes`` on ``device`` to ``owner``'s reservations."""
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative number of bytes ({nbytes})")
        with self._lock:
            _, held = self._held.setdefault(id(owner), (owner, {}))
            held[device] = held.get(device, 0) + nbytes

    def replace(self, owner: object, held: dict[str, int]) -> None:
        """Make ``held`` (device -> bytes) all that ``owner`` holds, in one step: another
        thread never sees the owner between its old and its new reservations."""
        if any(nbytes < 0 for nbytes in held.values()):
            raise ValueError(f"cannot reserve a negative number of bytes ({held})")
        kept = {device: nbytes for device, nbytes in held.items() if nbytes}
        with self._lock:
            if kept:
                self._held[id(owner)] = (owner, kept)
            else:
                self._held.pop(id(owner), None)

    def release_all(self, owner: object) -> None:
        """Drop every reservation of ``owner`` (no-op for an unknown owner)."""
        with self._lock:
            self._held.pop(id(owner), None)

    def held_by_others(self, owner: object, device: str) -> int:
        """Bytes every owner except ``owner`` holds on ``device`` (``owner=None``: everyone's,
        unless ``None`` itself reserved)."""
        with self._lock:
            return sum(
                held.get(device, 0) for key, (_, held) in self._held.items() if key != id(owner)
            )


@dataclass(slots=True)
class Probes:
    """Host facts read once per process (``None``: not read yet)."""

    huge_pages: bool | None = None  # THP is not "never" (``_hostmem.huge_pages_available``)
    cachestat: bool = True  # the ``cachestat`` syscall has not been refused yet
    # (cgroup fs root, /proc/self/cgroup text) -> this process's memory cgroup directories.
    cgroup_levels: dict[tuple[Path, str], tuple[tuple[Path, bool], ...]] = field(
        default_factory=dict
    )


@dataclass(slots=True)
class State:
    """What a process holds; see the module docstring."""

    reservations: ReservationBook = field(default_factory=ReservationBook)
    planning: threading.Lock = field(default_factory=threading.Lock)
    ledger: threading.RLock = field(default_factory=threading.RLock)
    nvml: Any = None  # a ``streamload.devices.Nvml`` once ``default_nvml()`` made one
    probes: Probes = field(default_factory=Probes)
    lock: threading.Lock = field(default_factory=threading.Lock)


STATE = State()


def reset() -> None:
    """Forget everything ``STATE`` holds, as in a fresh process (for tests)."""
    with STATE.lock:
        STATE.reservations = ReservationBook()
        STATE.planning = threading.Lock()
        STATE.ledger = threading.RLock()
        STATE.nvml = None
        STATE.probes = Probes()
