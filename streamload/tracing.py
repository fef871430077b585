"""OpenTelemetry traces for loads (extra: ``streamload[otel]``).

    observer = OpenTelemetryObserver()       # the global tracer provider's "streamload" tracer
    model = await streamload.load(path, params, on_event=[my_callback, observer])

``OpenTelemetryObserver`` is an ``on_event`` observer that records each load as a span
(``streamload.load``, from ``load_started`` to its end) with a child span per unit
(``streamload.unit``: one layer or non-mapped part, from its allocation to its completion, with
its read, copy, convert and wait seconds as attributes). The plan, re-plans and the
paged-attention fallback are span events on the load span. A failed load's span records the
exception and has status ``ERROR``; a cancelled one ends with a ``load_cancelled`` event and no
error. Spans start in the context current when the load started, so a load inside a request or
startup span is its child.

The unit spans are made when the unit's ``LayerPlaced`` arrives, back-dated by its ``seconds``:
the engine times the unit, the observer only records it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from streamload.events import (
    Event,
    LayerPlaced,
    LoadCancelled,
    LoadFailed,
    LoadFinished,
    LoadStarted,
    PagedAttentionDisabled,
    PlanComputed,
    Replanned,
    event_fields,
    event_name,
)

__all__ = ["OpenTelemetryObserver"]

_Attribute = str | bool | int | float | list[str] | list[int] | list[float] | list[bool]


def _attributes(values: Mapping[str, Any]) -> dict[str, _Attribute]:
    """Event fields as ``streamload.*`` span attributes: ``None`` left out, lists of text
    kept, anything else nested (a plan's or a report's per-device rows) as its text."""
    out: dict[str, _Attribute] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, str | bool | int | float):
            out[f"streamload.{key}"] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[f"streamload.{key}"] = [str(v) for v in value]
        else:
            out[f"streamload.{key}"] = str(value)
    return out


def _ns(seconds_ago: float) -> int:
    return time.time_ns() - int(seconds_ago * 1e9)


class OpenTelemetryObserver:
    """An ``on_event`` observer recording loads as spans of ``tracer`` (default: the global
    provider's ``"streamload"`` tracer). One observer can serve several loads at once (spans
    are kept by the load's path)."""

    def __init__(self, tracer: Tracer | None = None) -> None:
        self._tracer = trace.get_tracer("streamload") if tracer is None else tracer
        self._loads: dict[str, Span] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, LoadStarted):
            span = self._tracer.start_span(
                "streamload.load",
                start_time=_ns(event.seconds),
                attributes=_attributes(event_fields(event)),
            )
            self._loads[event.path] = span
        elif isinstance(event, LayerPlaced):
            self._unit(event)
        elif isinstance(event, PlanComputed | Replanned | PagedAttentionDisabled):
            self._span(event.path).add_event(event_name(event), _attributes(event_fields(event)))
        elif isinstance(event, LoadFinished):
            span = self._end(event.report.path)
            span.set_attributes(_attributes(event_fields(event)))
            span.end()
        elif isinstance(event, LoadFailed):
            span = self._end(event.path)
            span.record_exception(event.error)
            span.set_status(Status(StatusCode.ERROR, str(event.error)))
            span.end()
        elif isinstance(event, LoadCancelled):
            span = self._end(event.path)
            span.add_event("load_cancelled", _attributes(event_fields(event)))
            span.end()

    def _span(self, path: str) -> Span:
        """The load span of ``path``: one is started if its ``load_started`` was not seen (a
        load that failed opening its checkpoint)."""
        span = self._loads.get(path)
        if span is None:
            span = self._loads[path] = self._tracer.start_span(
                "streamload.load", attributes={"streamload.path": path}
            )
        return span

    def _end(self, path: str) -> Span:
        span = self._span(path)
        del self._loads[path]
        return span

    def _unit(self, event: LayerPlaced) -> None:
        parent = trace.set_span_in_context(self._span(event.path))
        name = f"layer {event.layer}" if event.layer is not None else str(event.part)
        span = self._tracer.start_span(
            "streamload.unit",
            context=parent,
            start_time=_ns(event.seconds),
            attributes={"streamload.unit": name, **_attributes(event_fields(event))},
        )
        span.end()
