"""An inference server that answers while its model streams in.

    python -m examples.server --demo --slow-events 0.5
    curl localhost:8000/health       # 200 at once, also during the load
    curl localhost:8000/load         # progress: state, bytes, layers, device, plan, re-plans
    curl localhost:8000/ready        # 503 until the model is ready, then 200
    curl localhost:8000/metrics      # Prometheus metrics: streamload_* during and after the load
    curl -X POST localhost:8000/generate -d '{"prompt_ids": [1, 5, 9], "max_new_tokens": 8}'

The lifespan starts the load in a background task, so the server takes requests at once. The
load reports through ``on_event`` to two observers: the service's progress (``/load`` shows what
it said) and ``streamload.metrics.PrometheusObserver`` (``/metrics``, in the service's own
registry). Stopping the server during the
load (Ctrl-C, SIGTERM) cancels the task: streamload releases everything it placed, and the
server logs each simulated GPU's ledger, back at 0 bytes; then it exits, with status 0 after
Ctrl-C and by the signal itself after SIGTERM, as uvicorn does. Logs are JSON lines on stdout
(uvicorn's own lines keep their format).

Options (or environment variables): ``--model`` (``STREAMLOAD_MODEL``), a checkpoint directory;
``--devices`` (``STREAMLOAD_DEVICES``), ``auto`` or a list such as ``sim:0=600MiB,sim:1=600MiB,cpu``
(simulated GPUs of that size) or ``cuda:0,cpu``; ``--host``/``--port`` (``HOST``/``PORT``);
``--demo`` writes a small random Llama to a temporary directory and loads it over two simulated
GPUs and the CPU; ``--slow-events SECONDS`` pauses after each placed layer, to watch a load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
import structlog
import torch
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import streamload
from examples.json_logs import configure_json_logging
from examples.mixed_gpu_cpu import simulated_gpus, write_tiny_llama
from streamload import events
from streamload.integrations.transformers import load_model
from streamload.metrics import PrometheusObserver
from streamload.testing import SimulatedGPU

log = structlog.get_logger("examples.server")
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_devices(spec: str) -> Literal["auto"] | list[str | SimulatedGPU]:
    """``"auto"``, or ``"sim:0=600MiB,sim:1=1GiB,cpu"`` -> simulated GPUs and device names."""
    if spec.strip() == "auto":
        return "auto"
    devices: list[str | SimulatedGPU] = []
    for item in (part.strip() for part in spec.split(",")):
        name, _, size = item.partition("=")
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", size.strip().lower())
        if not size:
            devices.append(name)
        elif match and match[2] in _UNITS:
            devices.append(SimulatedGPU(name, total_bytes=int(float(match[1]) * _UNITS[match[2]])))
        else:
            raise ValueError(f"bad device size in {item!r}; expected e.g. sim:0=600MiB")
    return devices


@dataclass
class LoadProgress:
    """What ``/load`` shows, kept up to date from the load's events."""

    state: Literal["loading", "ready", "failed", "cancelled"] = "loading"
    bytes_placed: int = 0
    bytes_total: int | None = None
    layers_placed: int = 0
    layers_total: int | None = None
    current_device: str | None = None
    plan: dict[str, Any] | None = None
    replans: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def record(self, event: events.Event) -> None:
        if isinstance(event, events.PlanComputed):
            self.plan = event.plan.to_dict()
            self.bytes_total = sum(row.weight_bytes + row.mmap_bytes for row in event.plan.devices)
            self.layers_total = len(event.plan.layer_devices)
        elif isinstance(event, events.LayerPlaced):
            self.bytes_placed += event.nbytes
            self.current_device = event.device
            if event.layer is not None:
                self.layers_placed += 1
        elif isinstance(event, events.Replanned):
            self.replans.append(events.event_fields(event))


class ModelService:
    """The model, its load and its progress: one per server process."""

    def __init__(self, model: Path, devices: str, *, slow_events: float = 0.0) -> None:
        self.path = model
        self.devices = parse_devices(devices)
        self.slow_events = slow_events
        self.progress = LoadProgress()
        self.model: Any = None  # a transformers model once ready
        self.registry = CollectorRegistry()
        self.metrics = PrometheusObserver(self.registry)
        self._one_at_a_time = anyio.CapacityLimiter(1)

    async def _on_event(self, event: events.Event) -> None:
        self.progress.record(event)
        if self.slow_events and isinstance(event, events.LayerPlaced):
            await anyio.sleep(self.slow_events)

    async def load(self) -> None:
        """Load the model; a failure is recorded (the server keeps answering), a cancellation
        propagates after streamload has released every byte it placed."""
        params = streamload.LoadParams(devices=self.devices)
        try:
            with structlog.contextvars.bound_contextvars(model=self.path.name):
                observers: list[events.EventCallback] = [self.metrics, self._on_event]
                model = await load_model(self.path, params, on_event=observers)
        except anyio.get_cancelled_exc_class():
            # streamload has logged ``load_cancelled`` with what it placed and released.
            self.progress.state = "cancelled"
            raise
        except Exception as exc:  # a StreamloadError, or the model class rejecting the weights
            self.progress.state, self.progress.error = "failed", str(exc)
            log.error("model_failed", error=str(exc))
            return
        self.model = model
        self.progress.plan = model.streamload.plan.to_dict()  # after any re-plan
        self.progress.state = "ready"
        log.info("model_ready", seconds=round(model.streamload.report.seconds, 3))

    async def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding in a worker thread, one request at a time."""
        return await anyio.to_thread.run_sync(
            self._generate, prompt_ids, max_new_tokens, limiter=self._one_at_a_time
        )

    def _generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids], device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        return [int(token) for token in out[0, len(prompt_ids) :]]

    def close(self) -> None:
        """Drop the model; log what each simulated GPU still holds (0 once all is freed)."""
        if self.model is not None:
            self.model.streamload.release()
            self.model = None
        ledgers = {d.name: d.allocated_bytes for d in self.devices if isinstance(d, SimulatedGPU)}
        log.info("device_ledgers", allocated_bytes=ledgers, state=self.progress.state)


def _service(request: Request) -> ModelService:
    service: ModelService = request.app.state.service
    return service


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    state = _service(request).progress.state
    return JSONResponse({"state": state}, status_code=200 if state == "ready" else 503)


async def load_status(request: Request) -> JSONResponse:
    return JSONResponse(vars(_service(request).progress))


async def metrics(request: Request) -> Response:
    """The Prometheus exposition of the service's registry (``streamload_*`` metrics)."""
    body = generate_latest(_service(request).registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def generate_args(body: Any, vocab_size: int) -> tuple[list[int], int] | None:
    """``{"prompt_ids": [...], "max_new_tokens": n}`` -> ``(ids, n)``; ``None`` if invalid."""
    fields = body if isinstance(body, dict) else {}
    ids, count = fields.get("prompt_ids"), fields.get("max_new_tokens", 16)
    if not isinstance(ids, list) or not ids or not isinstance(count, int):
        return None
    if all(type(t) is int and 0 <= t < vocab_size for t in ids) and 0 < count <= 256:
        return ids, count
    return None


async def generate(request: Request) -> JSONResponse:
    service = _service(request)
    if service.model is None:
        return JSONResponse({"error": f"model is {service.progress.state}"}, status_code=503)
    vocab = service.model.config.vocab_size
    try:
        args = generate_args(await request.json(), vocab)
    except ValueError:  # not JSON
        args = None
    if args is None:
        error = f"expected prompt_ids: token ids below {vocab}, max_new_tokens: 1..256"
        return JSONResponse({"error": error}, status_code=400)
    return JSONResponse({"token_ids": await service.generate(*args)})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Start the load in the background; at shutdown, cancel it if it is still running."""
    service: ModelService = app.state.service
    async with anyio.create_task_group() as group:
        group.start_soon(service.load)
        yield
        group.cancel_scope.cancel()
    service.close()


def create_app(service: ModelService) -> Starlette:
    routes = [
        Route("/health", health),
        Route("/ready", ready),
        Route("/load", load_status),
        Route("/metrics", metrics),
        Route("/generate", generate, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    return app


def main(argv: Sequence[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m examples.server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=env("STREAMLOAD_MODEL"))
    parser.add_argument("--devices", default=env("STREAMLOAD_DEVICES"))
    parser.add_argument("--host", default=env("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("PORT", "8000")))
    parser.add_argument("--demo", action="store_true", help="write a small Llama and load it")
    parser.add_argument("--slow-events", type=float, default=0.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    if args.model is None and not args.demo:
        parser.error("give --model PATH (or STREAMLOAD_MODEL), or --demo")
    configure_json_logging()  # the library's event lines and the server's own, on stdout
    with tempfile.TemporaryDirectory(prefix="streamload-server-") as scratch:
        path = args.model or write_tiny_llama(Path(scratch))
        devices = args.devices
        if devices is None and args.demo:
            gpus = simulated_gpus(path, streamload.LoadParams())
            devices = ",".join(f"{gpu.name}={gpu.total_bytes()}" for gpu in gpus) + ",cpu"
        service = ModelService(path, devices or "auto", slow_events=args.slow_events)
        log.info("server_starting", model=str(path), devices=devices or "auto")
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
