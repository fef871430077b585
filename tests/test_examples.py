"""The examples run and do what their docstrings say.

``examples.server`` runs as a real uvicorn subprocess on 127.0.0.1: it answers ``/health``
while its model streams in, flips ``/ready``, reports progress and the plan on ``/load``,
generates what ``from_pretrained`` generates, and on SIGINT or SIGTERM (during the load or
after it) shuts down cleanly with every simulated GPU's ledger back at 0.
``examples.mixed_gpu_cpu`` and ``examples.json_logs`` run in-process through their
``main(argv)``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import torch
import transformers
from prometheus_client.parser import text_string_to_metric_families

import streamload
from examples import json_logs, mixed_gpu_cpu
from examples.mixed_gpu_cpu import simulated_gpus, write_tiny_llama
from examples.server import parse_devices
from streamload.testing import SimulatedGPU

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 5
# Sized by ``simulated_gpus``: sim:0 takes the non-mapped parts and 1.5 layers, sim:1 2.5.
EXPECTED_LAYER_DEVICES = ["sim:0", "sim:1", "sim:1", "cpu", "cpu"]
EXPECTED_PLACEMENT = {
    "model.embed_tokens": "sim:0",
    "lm_head": "sim:0",
    "model.norm": "sim:0",
    **{f"model.layers.{i}": device for i, device in enumerate(EXPECTED_LAYER_DEVICES)},
}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="expects simulated GPUs")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    """The examples configure structlog as applications do; put the test's configuration back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


# --------------------------------------------------------------------------------------------
# examples.server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes]
) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds or if the server exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode} while waiting: {what}"
        try:
            if check():
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Server:
    """``python -m examples.server`` on a free port; its stdout (JSON log lines) in a file."""

    def __init__(self, args: list[str], logs: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.logs = logs
        command = [sys.executable, "-m", "examples.server", "--port", str(self.port), *args]
        env = {**os.environ, **env}
        with open(logs, "wb") as out, open(logs.with_suffix(".err"), "wb") as err:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5.0)

    def load(self) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get("/load").json()
        return body

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
        wait_for(what, check, timeout, self.proc)

    def stop(self, sig: signal.Signals = signal.SIGINT, timeout: float = 20.0) -> int:
        """Send ``sig`` (SIGINT is Ctrl-C); the exit status."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines of stdout (uvicorn's own lines are plain text)."""
        lines = self.logs.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextmanager
def server(args: list[str], logs: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    running = Server(args, logs, env or {})
    try:
        yield running
    finally:
        running.close()


def mid_load(load: dict[str, Any]) -> bool:
    return bool(load["state"] == "loading" and load["layers_placed"] >= 1)


def devices_arg(path: Path) -> str:
    gpus = simulated_gpus(path, streamload.LoadParams())
    return ",".join(f"{gpu.name}={gpu.total_bytes()}" for gpu in gpus) + ",cpu"


@no_cuda
@pytest.mark.timeout(30)
def test_server_answers_while_loading_then_generates_like_from_pretrained(
    checkpoint: Path, tmp_path: Path
) -> None:
    """Configured by environment variables: during the load ``/health`` is 200, ``/ready``
    and ``/generate`` 503, and ``/load`` shows the plan and partial progress; then ``/ready``
    flips to 200, ``/load`` shows every byte placed, ``/generate`` equals ``from_pretrained``'s
    greedy tokens, and SIGINT exits 0 with both simulated ledgers at 0."""
    prompt = [3, 17, 42, 99, 5, 200, 7, 1, 64, 128, 11, 2]
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)  # in eval mode
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )
    expected_tokens = out[0, len(prompt) :].tolist()
    total = streamload.inspect(checkpoint).total_bytes
    env = {"STREAMLOAD_MODEL": str(checkpoint), "STREAMLOAD_DEVICES": devices_arg(checkpoint)}

    with server(["--slow-events", "0.4"], tmp_path / "server.log", env) as srv:
        srv.wait_for("a layer placed", lambda: mid_load(srv.load()))
        assert 200 == srv.http.get("/health").status_code
        assert 503 == srv.http.get("/ready").status_code
        assert 503 == srv.http.post("/generate", json={"prompt_ids": prompt}).status_code
        during = srv.load()
        assert "loading" == during["state"]
        assert EXPECTED_LAYER_DEVICES == during["plan"]["layer_devices"]
        assert total == during["bytes_total"]
        assert 0 < during["bytes_placed"] < total

        srv.wait_for("/ready 200", lambda: srv.http.get("/ready").status_code == 200)
        after = srv.load()
        assert ("ready", total, LAYERS, []) == (
            after["state"],
            after["bytes_placed"],
            after["layers_placed"],
            after["replans"],
        )
        reply = srv.http.post("/generate", json={"prompt_ids": prompt, "max_new_tokens": 8})
        assert 200 == reply.status_code
        assert expected_tokens == reply.json()["token_ids"]
        bad = srv.http.post("/generate", json={"prompt_ids": [9999], "max_new_tokens": 8})
        assert 400 == bad.status_code

        assert 0 == srv.stop()
        ledgers = [line for line in srv.log_lines() if line["event"] == "device_ledgers"]
        assert [{"sim:0": 0, "sim:1": 0}] == [line["allocated_bytes"] for line in ledgers]


def scrape(srv: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics`` over HTTP, parsed by prometheus_client's own parser."""
    reply = srv.http.get("/metrics")
    assert 200 == reply.status_code
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


@no_cuda
@pytest.mark.timeout(30)
def test_server_metrics_during_and_after_the_load(checkpoint: Path, tmp_path: Path) -> None:
    """``/metrics`` (scraped over HTTP on 127.0.0.1): mid-load the load is in progress with
    some bytes placed; once ready, nothing is in progress, the load counts as finished and
    the bytes per device add up to the model."""
    total = streamload.inspect(checkpoint).total_bytes
    env = {"STREAMLOAD_MODEL": str(checkpoint), "STREAMLOAD_DEVICES": devices_arg(checkpoint)}
    with server(["--slow-events", "0.3"], tmp_path / "server.log", env) as srv:
        srv.wait_for("a layer placed", lambda: mid_load(srv.load()))
        during = scrape(srv)
        assert 1 == during[("streamload_load_in_progress", ())]
        placed = sum(v for (n, _), v in during.items() if n == "streamload_load_bytes_total")
        assert 0 < placed < total
        assert 0 < during[("streamload_load_progress_ratio", ())] < 1

        srv.wait_for("/ready 200", lambda: srv.http.get("/ready").status_code == 200)
        after = scrape(srv)
        assert 0 == after[("streamload_load_in_progress", ())]
        assert 1 == after[("streamload_loads_total", (("outcome", "finished"),))]
        placed = sum(v for (n, _), v in after.items() if n == "streamload_load_bytes_total")
        assert total == placed
        assert {"sim:0", "sim:1", "cpu"} == {
            dict(labels)["device"]
            for name, labels in after
            if name == "streamload_device_free_bytes"
        }
        assert 0 == srv.stop()


@no_cuda
@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGINT, 0), (signal.SIGTERM, -signal.SIGTERM)], ids=["int", "term"]
)
def test_signal_during_load_cancels_it_and_frees_every_simulated_byte(
    tmp_path: Path, sig: signal.Signals, status: int
) -> None:
    """``--demo``: SIGINT or SIGTERM mid-load shuts down through the lifespan: the load is
    cancelled (the log says so), both simulated GPUs' ledgers are back at 0 after holding
    layers, and the process exits 0 (SIGINT) or by the signal, as uvicorn does (SIGTERM)."""
    with server(["--demo", "--slow-events", "1.0"], tmp_path / "server.log") as srv:
        srv.wait_for("a layer placed", lambda: mid_load(srv.load()))
        assert status == srv.stop(sig)
        lines = srv.log_lines()

    by_event: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_event.setdefault(line["event"], []).append(line)
    placed = [line for line in by_event["layer_placed"] if line["layer"] is not None]
    assert 1 <= len(placed) < LAYERS
    assert "sim:0" in {line["device"] for line in by_event["layer_placed"]}
    assert "load_failed" not in by_event
    cancelled = by_event["load_cancelled"]
    assert [len(by_event["layer_placed"])] == [line["placed_units"] for line in cancelled]
    assert ["info"] == [line["level"] for line in cancelled]
    assert "model_ready" not in by_event
    ledgers = by_event["device_ledgers"]
    assert [("cancelled", {"sim:0": 0, "sim:1": 0})] == [
        (line["state"], line["allocated_bytes"]) for line in ledgers
    ]


def test_parse_devices_builds_simulated_gpus_and_keeps_names() -> None:
    """``--devices`` takes ``auto`` or names, ``name=SIZE`` making a simulated GPU."""
    assert "auto" == parse_devices("auto")
    devices = parse_devices("sim:0=600MiB, sim:1=1.5GiB,cpu")
    assert isinstance(devices, list)
    gpus = [d for d in devices if isinstance(d, SimulatedGPU)]
    assert [("sim:0", 600 * 2**20), ("sim:1", 3 * 2**29)] == [
        (gpu.name, gpu.total_bytes()) for gpu in gpus
    ]
    assert "cpu" == devices[2]
    with pytest.raises(ValueError, match="sim:0=lots"):
        parse_devices("sim:0=lots,cpu")


# --------------------------------------------------------------------------------------------
# examples.mixed_gpu_cpu and examples.json_logs


@no_cuda
@pytest.mark.usefixtures("restore_structlog")
def test_mixed_gpu_cpu_prints_device_map_and_report(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The device map spans both simulated GPUs and the CPU; the report has a row per device
    whose bytes add up to the checkpoint, and no re-plans."""
    assert 0 == mixed_gpu_cpu.main([str(checkpoint)])
    lines = capsys.readouterr().out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("module")))
    rows = [line.split() for line in lines[start + 1 : start + 1 + len(EXPECTED_PLACEMENT)]]
    assert EXPECTED_PLACEMENT == {row[0]: row[1] for row in rows}
    assert {"cpu"} == {row[2] for row in rows}  # simulated GPUs hold host memory
    report = {line.split()[0]: line.split() for line in lines if line.startswith(("sim:", "cpu"))}
    assert ["sim:0", "sim:1", "cpu"] == list(report)
    mib = sum(float(row[1]) for row in report.values())
    assert round(streamload.inspect(checkpoint).total_bytes / 2**20, 1) == round(mib, 1)
    assert "re-plans: 0" in lines


@no_cuda
@pytest.mark.usefixtures("restore_structlog")
def test_json_logs_lines_carry_the_bound_context_and_event_fields(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every stdout line is JSON with a timestamp and level; with two loads at once, each
    line carries its own load's ``load_id`` and the model name, and each load's
    ``layer_placed`` lines name every layer once with its device and bytes."""
    assert 0 == json_logs.main([str(checkpoint), "--loads", "2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all({"timestamp", "level", "event", "load_id"} <= line.keys() for line in lines)
    assert {checkpoint.name} == {line["model"] for line in lines}
    loads: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        loads.setdefault(line["load_id"], []).append(line)
    assert 2 == len(loads)
    spec = streamload.inspect(checkpoint)
    devices = []
    for load_lines in loads.values():
        placed = [line for line in load_lines if line["event"] == "layer_placed"]
        layers = sorted(line["layer"] for line in placed if line["layer"] is not None)
        assert list(range(LAYERS)) == layers
        assert spec.total_bytes == sum(line["nbytes"] for line in placed)
        devices.append(sorted({line["device"] for line in placed}))
        events = [line["event"] for line in load_lines]
        assert ["load_requested", "load_started", "plan_computed"] == events[:3]
        assert ["load_finished", "load_done"] == events[-2:]
    assert [["cpu", "sim:0", "sim:1"], ["cpu", "sim:2", "sim:3"]] == sorted(devices)
