"""Log loads as JSON lines that carry each load's context, for log shippers.

    python -m examples.json_logs                       # a small random Llama, written for you
    python -m examples.json_logs path/to/checkpoint --loads 2
    python -m examples.json_logs | jq -c 'select(.event == "layer_placed")'

streamload logs every event through the ``streamload`` structlog logger and configures nothing;
the application decides the format. Here ``JSONRenderer`` writes one JSON object per line on
stdout, with an ISO timestamp and the level; the event's fields are keys (``layer``, ``device``,
``nbytes``, ``seconds``, ``free_before``, ...).

Each load runs inside ``structlog.contextvars.bound_contextvars(load_id=..., model=...)``; the
``merge_contextvars`` processor adds those keys to every line logged in that context, the
library's lines included. Context variables belong to the task, so with ``--loads 2`` two loads
run at once and every line names the load it belongs to.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import anyio
import structlog

import streamload
from examples.mixed_gpu_cpu import devices_for, write_tiny_llama

log = structlog.get_logger("examples.json_logs")


def configure_json_logging(stream: TextIO | None = None) -> None:
    """Every structlog line as one JSON object (on ``stream``, default stdout), with the
    context bound by ``bind_contextvars``/``bound_contextvars`` merged in."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
    )


async def logged_load(path: Path, params: streamload.LoadParams, load_id: str) -> None:
    """One load whose every log line carries ``load_id`` and ``model``."""
    with structlog.contextvars.bound_contextvars(load_id=load_id, model=path.name):
        devices = params.devices
        names = devices if isinstance(devices, str) else [getattr(d, "name", d) for d in devices]
        log.info("load_requested", devices=names)
        async with await streamload.load(path, params) as model:
            log.info("load_done", tensors=len(model.tensors), device_map=model.device_map)


async def run_loads(path: Path, count: int) -> None:
    """``count`` loads of ``path`` at once; without CUDA each onto simulated GPUs of its own."""
    base = streamload.LoadParams()
    async with anyio.create_task_group() as group:
        for k in range(count):
            params = dataclasses.replace(base, devices=devices_for(path, base, first=2 * k))
            group.start_soon(logged_load, path, params, uuid.uuid4().hex[:12])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.json_logs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", nargs="?", type=Path, help="checkpoint directory or file")
    parser.add_argument("--loads", type=int, default=1, help="loads to run at once")
    args = parser.parse_args(argv)
    configure_json_logging()
    with tempfile.TemporaryDirectory(prefix="streamload-example-") as scratch:
        path = args.path or write_tiny_llama(Path(scratch))
        anyio.run(run_loads, path, args.loads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
