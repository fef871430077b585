"""A load watched live: the plan when it is computed, a progress bar driven by ``LayerPlaced``
(rich's, or a plain status line), re-plans and fallbacks as they happen."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

import anyio

import streamload
from streamload import events
from streamload.cli._render import Output, _plural, _show_plan, replan_line
from streamload.errors import format_bytes

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

__all__ = ["LoadView"]


class _Bar(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, nbytes: int, description: str) -> None: ...
    def clear(self) -> None: ...
    def stop(self) -> None: ...


class _RichBar:
    """A rich progress bar (bytes placed / total, GB/s, current layer and device)."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self.progress: Progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            # Lines written to stderr go above the bar only when stderr is this terminal too;
            # otherwise (``--json-logs 2> file``) they must reach the file.
            redirect_stderr=sys.stderr.isatty(),
        )
        self.task = self.progress.add_task("planning", total=None)

    def start(self, total: int) -> None:
        self.progress.update(self.task, total=total, description="loading")
        self.progress.start()

    def advance(self, nbytes: int, description: str) -> None:
        self.progress.update(self.task, advance=nbytes, description=description)

    def clear(self) -> None:
        """Nothing to do: rich prints the console's lines above the bar."""

    def stop(self) -> None:
        self.progress.stop()


class _PlainBar:
    """Without rich: one rewritten status line on stderr, only when stderr is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.total = 0
        self.done = 0
        self.started = 0.0

    def start(self, total: int) -> None:
        self.total = total
        self.started = time.perf_counter()

    def advance(self, nbytes: int, description: str) -> None:
        self.done += nbytes
        if not self.live:
            return
        seconds = max(time.perf_counter() - self.started, 1e-9)
        percent = 100 * self.done / self.total if self.total else 100.0
        self.stream.write(
            f"\r{description}: {format_bytes(self.done)} / {format_bytes(self.total)} "
            f"({percent:.0f}%, {self.done / seconds / 1e9:.2f} GB/s)\x1b[K"
        )
        self.stream.flush()

    def clear(self) -> None:
        """Erase the status line, so that a line printed next starts at the margin."""
        if self.live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def stop(self) -> None:
        self.clear()


class LoadView:
    """The ``on_event`` callback of a CLI load: shows the plan when it is computed, drives the
    progress bar from ``LayerPlaced``, and prints re-plans and fallbacks as they happen."""

    def __init__(self, out: Output | None, total_bytes: int, layers: int, headline: str) -> None:
        self.out = out
        self.headline = headline
        self.total_bytes = total_bytes
        self.layers = layers
        console = None if out is None else out.console
        self.bar: _Bar = _PlainBar(sys.stderr) if console is None else _RichBar(console)
        self.running = False
        self.shown: str | None = None  # the fallback reason the plan's status line gave

    def __enter__(self) -> LoadView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.running:
            self.bar.stop()
            self.running = False

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.PlanComputed):
            if self.out is not None:
                self.out.line(self.headline)
                _show_plan(event.plan, self.out)
                self.shown = event.plan.paged_attention_reason
            self.bar.start(self.total_bytes)
            self.running = True
        elif isinstance(event, events.LayerPlaced):
            what = event.part if event.layer is None else f"layer {event.layer}/{self.layers - 1}"
            self.bar.advance(event.nbytes, f"{what} -> {event.device}")
        elif self.out is None:
            return
        elif isinstance(event, events.Replanned):
            self.line(replan_line(event))
        elif isinstance(event, events.PagedAttentionDisabled) and event.reason != self.shown:
            self.line(f"fallback: {event.reason}")

    def line(self, text: str) -> None:
        """Print a line while the load runs (the demo's tenant speaks through this too)."""
        if self.out is not None:
            self.bar.clear()
            self.out.line(text)


def _run_load(
    path: str | Path,
    params: streamload.LoadParams,
    out: Output | None,
    on_event: Callable[[events.Event, LoadView], None] | None = None,
) -> streamload.LoadedModel:
    """Load ``path`` with a live view (``out=None``: the progress bar only); ``on_event`` (the
    demo's tenant) runs after the view has shown each event, and may print through it."""
    spec = streamload.inspect(path, params.dtype, params=params)
    headline = (
        f"loading {path}: {spec.facts.model_type}, {_plural(len(spec.layers), 'layer')}, "
        f"{format_bytes(spec.total_bytes)} ({spec.target_dtype or 'as stored'})"
    )
    view = LoadView(out, spec.total_bytes, len(spec.layers), headline)

    def callback(event: events.Event) -> None:
        view(event)
        if on_event is not None:
            on_event(event, view)

    with view:
        return anyio.run(functools.partial(streamload.load, path, params, on_event=callback))
