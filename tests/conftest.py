"""Shared fixtures."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sniffio
import structlog

from streamload import _state

_BLOCKING = ("open", "read", "pread", "preadv", "fstat", "stat", "lseek", "posix_fadvise")


class BlockingIOGuard:
    """Records ``os`` file calls made on the event loop's thread while ``watch()`` is active."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.watching = False
        self.violations: list[str] = []

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        self.watching = True
        try:
            yield
        finally:
            self.watching = False

    def check(self, name: str, args: tuple[Any, ...]) -> None:
        if not self.watching or threading.get_ident() != self.loop_thread:
            return
        try:
            sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            return
        self.violations.append(f"os.{name}{args[:1]!r}")


@pytest.fixture
def no_blocking_io(monkeypatch: pytest.MonkeyPatch) -> Iterator[BlockingIOGuard]:
    """Fail the test if file I/O runs on the event loop's thread inside ``guard.watch()``.

    Wraps the ``os`` calls a loader makes (open, read, pread, preadv, fstat, stat, ...); a call
    from the thread running the event loop is recorded and the test fails at teardown.
    """
    guard = BlockingIOGuard()

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            guard.check(name, args)
            return real(*args, **kwargs)

        return wrapper

    for name in _BLOCKING:
        real = getattr(os, name, None)
        if real is not None:
            monkeypatch.setattr(os, name, wrap(name, real))
    yield guard
    assert [] == guard.violations, "blocking file I/O ran on the event loop"


@pytest.fixture(autouse=True)
def fresh_process_state() -> Iterator[None]:
    """Every test starts and ends with the process-wide state of a fresh process
    (``streamload._state``): a reservation a failed test leaked cannot shrink the next test's
    capacities."""
    _state.reset()
    yield
    _state.reset()


@pytest.fixture(autouse=True)
def restore_structlog_config() -> Iterator[None]:
    """structlog's configuration is process-wide and ``capture_logs`` leaves it configured:
    every test ends with the configuration it started with, unconfigured where it was."""
    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    yield
    if was_configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()
