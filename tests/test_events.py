"""Events and their log sink: quiet unless asked, fields that explain a load, observers.

Where the lines go: nowhere in an application that configured nothing (a fresh process, so no
test runner's handlers are involved); through the application's structlog pipeline when it
configured structlog; to the stdlib ``streamload`` logger otherwise, so ``logging.basicConfig``
shows them.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import structlog

import streamload
from streamload.events import (
    Event,
    LayerPlaced,
    LoadCancelled,
    LoadFinished,
    LoadStarted,
    observers,
)
from streamload.testing import SimulatedGPU
from tests.engine_support import llama_config, llama_tensors, params, write_checkpoint

pytestmark = pytest.mark.anyio

LAYERS = 4


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt", llama_tensors(LAYERS), llama_config(LAYERS))


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


_LOAD = """
    import anyio, streamload
    async def main():
        params = streamload.LoadParams(devices=["cpu"], cpu_memory_bytes=2**30,
                                       host_reserve_bytes=0)
        model = await streamload.load({path!r}, params)
        model.release()
    anyio.run(main)
"""


def test_an_application_that_configures_nothing_sees_nothing(ckpt: Path) -> None:
    """A bare ``import streamload`` and a load print nothing on stdout or stderr."""
    done = _run_python(_LOAD.format(path=str(ckpt)))
    assert 0 == done.returncode, done.stderr
    assert ("", "") == (done.stdout, done.stderr)


def test_stdlib_basic_config_shows_the_events_on_stderr(ckpt: Path) -> None:
    """With ``logging.basicConfig(level=INFO)`` every event is a line on stderr, keyed by the
    event's field names; stdout stays clean."""
    code = "import logging\nlogging.basicConfig(level=logging.INFO)\n" + textwrap.dedent(
        _LOAD.format(path=str(ckpt))
    )
    done = _run_python(code)
    assert 0 == done.returncode, done.stderr
    assert "" == done.stdout
    lines = done.stderr.splitlines()
    assert lines[0].startswith("INFO:streamload:load_started ")
    assert any(line.startswith("INFO:streamload:layer_placed layer=0 ") for line in lines)
    assert "read_seconds=" in next(line for line in lines if "layer_placed" in line)
    assert lines[-1].startswith("INFO:streamload:load_finished ")


async def test_stdlib_records_carry_the_fields(
    ckpt: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each stdlib record has the event name and its fields as attributes."""
    assert not structlog.is_configured()
    with caplog.at_level(logging.INFO, logger="streamload"):
        await streamload.load(ckpt, params(["cpu"]))
    records = [r for r in caplog.records if r.name == "streamload"]
    assert "load_started" == records[0].event  # type: ignore[attr-defined]
    placed = next(r for r in records if r.event == "layer_placed")  # type: ignore[attr-defined]
    assert str(ckpt) == placed.path  # type: ignore[attr-defined]
    assert isinstance(placed.read_seconds, float)  # type: ignore[attr-defined]


async def test_an_application_structlog_pipeline_gets_the_events(ckpt: Path) -> None:
    """When the application configured structlog, the events go through its processors (and
    nothing goes to the stdlib logger)."""
    seen: list[MutableMapping[str, Any]] = []

    def keep(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        seen.append(dict(event_dict, level=method))
        raise structlog.DropEvent

    structlog.configure(processors=[keep])
    stdlib: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            stdlib.append(record)

    handler = Keep()
    logging.getLogger("streamload").addHandler(handler)
    try:
        await streamload.load(ckpt, params(["cpu"]))
    finally:
        logging.getLogger("streamload").removeHandler(handler)
    assert [] == stdlib
    assert ["load_started", "plan_computed"] == [e["event"] for e in seen[:2]]
    assert "load_finished" == seen[-1]["event"]
    assert all(str(ckpt) == e["path"] for e in seen)


async def test_load_started_counts_the_headers(ckpt: Path) -> None:
    """``LoadStarted`` comes first and names the files and header bytes read."""
    events: list[Event] = []
    await streamload.load(ckpt, params(["cpu"]), on_event=events.append)
    started = events[0]
    assert isinstance(started, LoadStarted)
    assert (str(ckpt), 3) == (started.path, started.files)
    assert 0 < started.header_bytes
    assert 0 <= started.seconds


async def test_layer_placed_splits_its_seconds_and_keeps_running_totals(ckpt: Path) -> None:
    """Each ``LayerPlaced`` names its shard files; its parts are wall-clock spans within its
    seconds; running totals end at the whole model; per-device seconds are spans within the
    load, not sums that exceed it."""
    gpu = SimulatedGPU("sim:0", total_bytes=2**30)
    events: list[Event] = []
    model = await streamload.load(ckpt, params([gpu, "cpu"]), on_event=events.append)
    placed = [e for e in events if isinstance(e, LayerPlaced)]
    for event in placed:
        assert event.files
        assert all(name.endswith(".safetensors") and "/" not in name for name in event.files)
        parts = [
            event.allocate_seconds,
            event.read_seconds,
            event.copy_seconds,
            event.convert_seconds,
            event.wait_seconds,
        ]
        assert all(0 <= part <= event.seconds + 1e-9 for part in parts), event
    assert [i + 1 for i in range(len(placed))] == [e.loaded_units for e in placed]
    assert model.report.nbytes == placed[-1].loaded_bytes == placed[-1].total_bytes
    assert {len(placed)} == {e.total_units for e in placed}
    for device in model.report.devices:
        assert device.seconds <= model.report.seconds
    finished = events[-1]
    assert isinstance(finished, LoadFinished)


async def test_cancellation_is_reported_as_cancelled_with_what_was_released(ckpt: Path) -> None:
    """A cancelled load logs ``load_cancelled`` at info (not a failure warning), with the units
    placed and the tensors released."""
    events: list[Event] = []
    logs: list[MutableMapping[str, Any]] = []

    def keep(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        logs.append(dict(event_dict, level=method))
        raise structlog.DropEvent

    structlog.configure(processors=[keep])
    with anyio.CancelScope() as scope:

        def on_event(event: Event) -> None:
            events.append(event)
            if isinstance(event, LayerPlaced) and event.layer == 1:
                scope.cancel()

        await streamload.load(ckpt, params(["cpu"]), on_event=on_event)
    cancelled = events[-1]
    assert isinstance(cancelled, LoadCancelled)
    placed = [e for e in events if isinstance(e, LayerPlaced)]
    assert len(placed) == cancelled.placed_units
    assert sum(e.nbytes for e in placed) == cancelled.placed_bytes
    assert cancelled.released_tensors >= sum(e.tensors for e in placed)
    assert cancelled.released_bytes >= cancelled.placed_bytes
    assert ("load_cancelled", "info") == (logs[-1]["event"], logs[-1]["level"])
    assert "load_failed" not in [e["event"] for e in logs]


async def test_on_event_takes_a_sequence_of_observers(ckpt: Path) -> None:
    """Every observer in the sequence gets every event, in order; sync and async alike."""
    first: list[Event] = []
    second: list[Event] = []

    async def later(event: Event) -> None:
        await anyio.lowlevel.checkpoint()
        second.append(event)

    await streamload.load(ckpt, params(["cpu"]), on_event=[first.append, later])
    assert first == second
    assert isinstance(first[-1], LoadFinished)


def test_observers_refuses_what_is_not_callable() -> None:
    """``on_event`` sequences hold callables; anything else is a ``TypeError`` at once."""
    assert () == observers(None)
    with pytest.raises(TypeError, match="not callable"):
        observers([print, 3])  # type: ignore[list-item]
