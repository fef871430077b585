"""``streamload.metrics.PrometheusObserver`` and ``streamload.tracing.OpenTelemetryObserver``:
what a load, a re-plan and a cancellation leave in a registry and in a trace (the SDK's
in-memory exporter)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import streamload
from streamload.events import Event, LayerPlaced, Replanned
from streamload.metrics import PrometheusObserver, replan_kind
from streamload.testing import SimulatedGPU
from streamload.tracing import OpenTelemetryObserver
from tests.engine_support import (
    llama_config,
    llama_tensors,
    params,
    sized_gpu,
    write_checkpoint,
)

pytestmark = pytest.mark.anyio

LAYERS = 6


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt", llama_tensors(LAYERS), llama_config(LAYERS))


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry's exposition, parsed back by prometheus_client's parser."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _steal_after_layer_zero(gpu: SimulatedGPU) -> Callable[[Event], None]:
    def on_event(event: Event) -> None:
        if isinstance(event, LayerPlaced) and event.layer == 0:
            gpu.steal(gpu.free_bytes)

    return on_event


async def test_prometheus_counts_bytes_units_replans_and_outcome(ckpt: Path) -> None:
    """After a load with a re-plan: bytes and units per device match the report, the unit
    histogram saw every unit, the re-plan is counted by its kind, nothing is in progress."""
    gpu0 = sized_gpu("sim:0", ckpt, 2.5, primary=True)
    gpu1 = sized_gpu("sim:1", ckpt, 2.5, primary=False)
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    events: list[Event] = []
    model = await streamload.load(
        ckpt,
        params([gpu0, gpu1, "cpu"]),
        on_event=[events.append, _steal_after_layer_zero(gpu1), observer],
    )
    samples = _samples(registry)
    for device in model.report.devices:
        labels = (("device", device.device),)
        assert device.nbytes == samples[("streamload_load_bytes_total", labels)]
    units = sum(1 for e in events if isinstance(e, LayerPlaced))
    assert units == sum(
        value for (name, _), value in samples.items() if name == "streamload_layer_seconds_count"
    )
    replans = [e for e in events if isinstance(e, Replanned)]
    assert replans
    kind = (("reason", replan_kind(replans[0].reason)),)
    assert len(replans) == samples[("streamload_replans_total", kind)]
    assert 0 == samples[("streamload_load_in_progress", ())]
    assert 1 == samples[("streamload_loads_total", (("outcome", "finished"),))]
    assert 1 == samples[("streamload_load_progress_ratio", ())]
    assert ("streamload_device_free_bytes", (("device", "sim:0"),)) in samples


async def test_prometheus_in_progress_during_the_load_and_cancelled_after(ckpt: Path) -> None:
    """While units are placed the load is in progress; a cancelled load is counted as such
    and leaves nothing in progress."""
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    during: list[float] = []
    with anyio.CancelScope() as scope:

        def on_event(event: Event) -> None:
            if isinstance(event, LayerPlaced) and event.layer == 1:
                during.append(_samples(registry)[("streamload_load_in_progress", ())])
                scope.cancel()

        await streamload.load(ckpt, params(["cpu"]), on_event=[observer, on_event])
    samples = _samples(registry)
    assert [1.0] == during
    assert 0 == samples[("streamload_load_in_progress", ())]
    assert 1 == samples[("streamload_loads_total", (("outcome", "cancelled"),))]


async def test_prometheus_failure_before_start_is_not_in_progress(tmp_path: Path) -> None:
    """A load that fails opening its checkpoint counts as failed, never as in progress."""
    registry = CollectorRegistry()
    with pytest.raises(streamload.StreamloadError):
        await streamload.load(
            tmp_path / "missing", params(["cpu"]), on_event=PrometheusObserver(registry)
        )
    samples = _samples(registry)
    assert (0, 1) == (
        samples[("streamload_load_in_progress", ())],
        samples[("streamload_loads_total", (("outcome", "failed"),))],
    )


def _tracer() -> tuple[OpenTelemetryObserver, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OpenTelemetryObserver(provider.get_tracer("tests")), exporter


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


async def test_trace_has_a_load_span_a_child_per_unit_and_replans_as_events(ckpt: Path) -> None:
    """One ``streamload.load`` span; one ``streamload.unit`` child per placed unit, within
    it; the plan and each re-plan are events on the load span."""
    gpu0 = sized_gpu("sim:0", ckpt, 2.5, primary=True)
    gpu1 = sized_gpu("sim:1", ckpt, 2.5, primary=False)
    observer, exporter = _tracer()
    events: list[Event] = []
    await streamload.load(
        ckpt,
        params([gpu0, gpu1, "cpu"]),
        on_event=[events.append, _steal_after_layer_zero(gpu1), observer],
    )
    spans = exporter.get_finished_spans()
    (load,) = _by_name(spans, "streamload.load")
    units = _by_name(spans, "streamload.unit")
    placed = [e for e in events if isinstance(e, LayerPlaced)]
    assert len(placed) == len(units)
    assert load.context is not None
    for unit in units:
        assert unit.parent is not None
        assert load.context.span_id == unit.parent.span_id
        assert unit.start_time is not None
        assert load.start_time is not None
        assert unit.start_time >= load.start_time
    names = [event.name for event in load.events]
    assert "plan_computed" == names[0]
    assert sum(1 for e in events if isinstance(e, Replanned)) == names.count("replanned")
    assert load.attributes is not None
    assert str(ckpt) == load.attributes["streamload.path"]
    assert StatusCode.UNSET == load.status.status_code
    layers = [(u.attributes or {}).get("streamload.layer") for u in units]
    assert list(range(LAYERS)) == [layer for layer in layers if layer is not None]


async def test_trace_of_a_failed_and_a_cancelled_load(ckpt: Path, tmp_path: Path) -> None:
    """A failed load's span records the error with status ``ERROR``; a cancelled one ends
    with a ``load_cancelled`` event and no error."""
    observer, exporter = _tracer()
    with pytest.raises(streamload.StreamloadError):
        await streamload.load(tmp_path / "missing", params(["cpu"]), on_event=observer)
    with anyio.CancelScope() as scope:

        def on_event(event: Event) -> None:
            if isinstance(event, LayerPlaced):
                scope.cancel()

        await streamload.load(ckpt, params(["cpu"]), on_event=[observer, on_event])
    failed, cancelled = _by_name(exporter.get_finished_spans(), "streamload.load")
    assert StatusCode.ERROR == failed.status.status_code
    assert "exception" in [event.name for event in failed.events]
    assert StatusCode.UNSET == cancelled.status.status_code
    assert "load_cancelled" == cancelled.events[-1].name
