"""Prometheus metrics for loads (extra: ``streamload[prometheus]``).

    observer = PrometheusObserver()          # registers in prometheus_client's default registry
    model = await streamload.load(path, params, on_event=[my_callback, observer])

``PrometheusObserver`` is an ``on_event`` observer: it turns events into updates of these
metrics in a ``prometheus_client`` registry (``registry=`` for one of your own), which the
application serves as it serves its other metrics (``prometheus_client.generate_latest``,
``make_asgi_app``; ``examples/server.py`` serves ``/metrics`` during and after the load):

- ``streamload_load_in_progress`` (gauge): loads between ``load_started`` and their end;
- ``streamload_loads_total{outcome}``: loads ended, ``finished``, ``failed`` or ``cancelled``;
- ``streamload_load_bytes_total{device}``, ``streamload_load_stored_bytes_total{device}``,
  ``streamload_load_units_total{device}``: bytes placed (target dtype), bytes read from disk,
  layers and non-mapped parts placed;
- ``streamload_load_progress_ratio`` (gauge): placed bytes over the load's total;
- ``streamload_layer_seconds{device}`` (histogram): each unit's allocation to completion;
- ``streamload_stage_seconds_total{stage}``: the wall-clock parts of the units' seconds,
  ``allocate``, ``read``, ``copy``, ``convert``, ``wait`` (see ``LayerPlaced``);
- ``streamload_replans_total{reason}``: live re-plans by kind (``under-delivered``,
  ``allocation failed``); ``streamload_paged_attention_fallbacks_total``;
- ``streamload_device_free_bytes{device}`` (gauge): live free bytes after its last placement;
- ``streamload_load_seconds`` (histogram) and ``streamload_load_gb_per_second`` (gauge): whole
  loads that finished, and the last one's rate.

Labels are bounded: device names and fixed words; a re-plan's ``reason`` is its kind, the text
before the first ``:``, never the free-form detail.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from streamload.events import (
    Event,
    LayerPlaced,
    LoadCancelled,
    LoadFailed,
    LoadFinished,
    LoadStarted,
    PagedAttentionDisabled,
    Replanned,
)

__all__ = ["PrometheusObserver"]

# Units take from milliseconds (a norm) to minutes (a cold layer of a large model).
_UNIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def replan_kind(reason: str) -> str:
    """A re-plan's reason as a bounded label: the text before its first ``:``."""
    return reason.split(":", 1)[0].strip() or "unknown"


class PrometheusObserver:
    """An ``on_event`` observer updating ``streamload_*`` metrics in ``registry`` (default:
    ``prometheus_client.REGISTRY``). Make one per registry: the metrics are registered when it
    is made, and one observer serves any number of loads, one after another or at once."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        self.in_progress = Gauge("streamload_load_in_progress", "Loads in progress.", registry=reg)
        self.loads = Counter(
            "streamload_loads", "Loads that ended, by outcome.", ["outcome"], registry=reg
        )
        self.load_bytes = Counter(
            "streamload_load_bytes", "Bytes placed (target dtype).", ["device"], registry=reg
        )
        self.stored_bytes = Counter(
            "streamload_load_stored_bytes", "Bytes read from disk.", ["device"], registry=reg
        )
        self.units = Counter(
            "streamload_load_units", "Layers and non-mapped parts placed.", ["device"], registry=reg
        )
        self.progress = Gauge(
            "streamload_load_progress_ratio",
            "Placed bytes over total bytes of the load in progress.",
            registry=reg,
        )
        self.layer_seconds = Histogram(
            "streamload_layer_seconds",
            "Seconds from a unit's allocation to its completion.",
            ["device"],
            buckets=_UNIT_BUCKETS,
            registry=reg,
        )
        self.stage_seconds = Counter(
            "streamload_stage_seconds",
            "Wall-clock parts of units' seconds.",
            ["stage"],
            registry=reg,
        )
        self.replans = Counter(
            "streamload_replans", "Live re-plans, by kind of reason.", ["reason"], registry=reg
        )
        self.fallbacks = Counter(
            "streamload_paged_attention_fallbacks",
            "Plans that fell back to non-paged KV sizing.",
            registry=reg,
        )
        self.device_free = Gauge(
            "streamload_device_free_bytes",
            "A device's live free bytes after its last placement.",
            ["device"],
            registry=reg,
        )
        self.load_seconds = Histogram(
            "streamload_load_seconds",
            "Seconds of whole loads that finished.",
            buckets=_LOAD_BUCKETS,
            registry=reg,
        )
        self.gb_per_s = Gauge(
            "streamload_load_gb_per_second", "The last finished load's GB/s.", registry=reg
        )
        self._active: dict[str, int] = {}  # path -> loads started and not yet ended

    def __call__(self, event: Event) -> None:
        if isinstance(event, LoadStarted):
            self._active[event.path] = self._active.get(event.path, 0) + 1
            self.in_progress.inc()
            self.progress.set(0.0)
        elif isinstance(event, LayerPlaced):
            self._placed(event)
        elif isinstance(event, Replanned):
            self.replans.labels(replan_kind(event.reason)).inc()
        elif isinstance(event, PagedAttentionDisabled):
            self.fallbacks.inc()
        elif isinstance(event, LoadFinished):
            self._ended(event.report.path, "finished")
            self.load_seconds.observe(event.report.seconds)
            self.gb_per_s.set(event.report.gb_per_s)
        elif isinstance(event, LoadFailed):
            self._ended(event.path, "failed")
        elif isinstance(event, LoadCancelled):
            self._ended(event.path, "cancelled")

    def _placed(self, event: LayerPlaced) -> None:
        device = event.device
        self.load_bytes.labels(device).inc(event.nbytes)
        self.stored_bytes.labels(device).inc(event.stored_bytes)
        self.units.labels(device).inc()
        self.layer_seconds.labels(device).observe(event.seconds)
        for stage, seconds in (
            ("allocate", event.allocate_seconds),
            ("read", event.read_seconds),
            ("copy", event.copy_seconds),
            ("convert", event.convert_seconds),
            ("wait", event.wait_seconds),
        ):
            self.stage_seconds.labels(stage).inc(seconds)
        self.device_free.labels(device).set(event.free_after)
        if event.total_bytes:
            self.progress.set(event.loaded_bytes / event.total_bytes)

    def _ended(self, path: str, outcome: str) -> None:
        self.loads.labels(outcome).inc()
        started = self._active.get(path, 0)
        if started:  # a load that failed before it started was never in progress
            self._active[path] = started - 1
            if started == 1:
                del self._active[path]
            self.in_progress.dec()
