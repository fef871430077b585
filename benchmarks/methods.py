"""The loads being compared. Each runs in a fresh process (see ``load_throughput``) and returns
what it loaded; the harness measures memory and mappings around it.

- ``disk``: 8 threads ``pread`` 16 MiB chunks into reused buffers (the read limit);
- ``materialise``: 8 threads ``pread`` 16 MiB chunks straight into a fresh tensor per checkpoint
  tensor, each chunk's pages faulted in (``madvise(MADV_POPULATE_WRITE)``) just before its read:
  no parsing, no events, no planning, the least any load that materialises every tensor in
  process memory must do (fresh pages zero-filled, one copy), and so its floor;
- ``safetensors``: ``safetensors.torch.load_file`` per shard + ``clone()`` of every tensor
  (``load_file`` maps the file; the clone materialises every byte in process memory);
- ``streamload-cpu``, ``streamload-mmap``: ``streamload.load`` to the CPU with the default
  ``LoadParams`` (``cpu_policy="copy"``) and with ``cpu_policy="mmap"``, timed from the call of
  ``anyio.run`` (each also has a heartbeat run, ``Method.stall``, for the event-loop stall
  figure);
- ``streamload-cpu-huge``, ``streamload-cpu-auto``: ``streamload-cpu`` with ``huge_pages=True``
  and ``"auto"`` (transparent huge pages for the layers already in the page cache; the default,
  ``False``, keeps 4 KiB pages);
- ``streamload-sim``: to a staged ``SimulatedGPU`` (the CUDA path's staging ring and copies,
  with a host ``copy_`` as the copy primitive);
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(path, device_map="cpu")``;
- ``accelerate``: the model built under ``init_empty_weights``, then
  ``load_checkpoint_and_dispatch(model, path, device_map={"": "cpu"})``;
- ``runai``: runai-model-streamer's ``SafetensorsStreamer`` to the CPU, every tensor kept;
  ``runai-buffered`` the same with ``RUNAI_STREAMER_FS_STRATEGY=sync_buffered`` (its default
  reads with ``O_DIRECT`` where the filesystem allows, bypassing the page cache);
- ``fastsafetensors``: ``SafeTensorsFileLoader(None, "cpu", nogds=True)``, every tensor kept;
  ``fastsafetensors-buffered`` with ``FASTSAFETENSORS_ODIRECT=0`` (same reason).
"""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from benchmarks import procfs

CHUNK = 16 * 2**20


@dataclass(frozen=True, slots=True)
class Loaded:
    """What one load did: wall seconds of the load call, bytes it read, the tensors it holds."""

    seconds: float
    bytes_read: int
    tensors: list[torch.Tensor]
    extras: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Method:
    """A load under test: its runner, the modules imported before the memory baseline, the
    environment its process gets, and a few words on what it does."""

    run: Callable[[Path], Loaded]
    imports: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    note: str = ""
    # The same load with a 1 ms heartbeat on its event loop, for the stall figure (its own
    # runs: the heartbeat's wake-ups cost CPU that the throughput runs of no method pay).
    stall: Callable[[Path], Loaded] | None = None


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


_Job = tuple[Path, int, int | None, int]  # file, file offset, destination address, length


def _pool(jobs: list[_Job], threads: int = 8) -> int:
    """``threads`` threads ``pread`` the jobs, last first, until none are left: into the
    thread's own reused buffer where the destination is ``None``, else into the destination
    after faulting its pages in (``procfs.populate``). Returns the bytes read."""
    lock = threading.Lock()
    total = 0

    def worker() -> None:
        nonlocal total
        own = memoryview(bytearray(CHUNK))
        fds: dict[Path, int] = {}
        got = 0
        while True:
            with lock:
                if not jobs:
                    break
                path, off, address, size = jobs.pop()
            fd = fds.get(path) or fds.setdefault(path, os.open(path, os.O_RDONLY))
            if address is None:
                got += os.preadv(fd, [own[:size]], off)
            else:
                procfs.populate(address, size)
                got += os.preadv(fd, [(ctypes.c_char * size).from_address(address)], off)
        for fd in fds.values():
            os.close(fd)
        with lock:
            total += got

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return total


def run_disk(directory: Path) -> Loaded:
    files = shard_files(directory)
    jobs: list[_Job] = [
        (p, off, None, CHUNK) for p in files for off in range(0, p.stat().st_size, CHUNK)
    ]
    start = time.perf_counter()
    total = _pool(jobs)
    return Loaded(time.perf_counter() - start, total, [])


def run_materialise(directory: Path) -> Loaded:
    start = time.perf_counter()
    kept: list[torch.Tensor] = []
    jobs: list[_Job] = []
    for path in shard_files(directory):
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        for entry in header.values():
            begin, end = entry["data_offsets"]
            tensor = torch.empty(end - begin, dtype=torch.uint8)
            kept.append(tensor)
            for off in range(0, end - begin, CHUNK):
                size = min(CHUNK, end - begin - off)
                jobs.append((path, 8 + length + begin + off, tensor.data_ptr() + off, size))
    jobs.reverse()
    total = _pool(jobs)
    return Loaded(time.perf_counter() - start, total, kept)


def run_safetensors(directory: Path) -> Loaded:
    from safetensors.torch import load_file

    start = time.perf_counter()
    kept: list[torch.Tensor] = []
    for path in shard_files(directory):
        loaded = load_file(path)
        kept.extend(tensor.clone() for tensor in loaded.values())
        del loaded
    seconds = time.perf_counter() - start
    return Loaded(seconds, sum(t.nbytes for t in kept), kept)


def run_streamload(
    directory: Path,
    target: str,
    policy: Literal["copy", "mmap"],
    huge_pages: bool | Literal["auto"] | None = None,
    heartbeat: bool = False,
) -> Loaded:
    """``streamload.load`` with the default ``LoadParams`` but for the destination (and the
    ``huge_pages`` variant under test), timed as a user meets it: from the call of
    ``anyio.run`` to its return, the event loop's start included (``loop_seconds`` is the
    load's time inside the loop). With ``heartbeat``, a task on the same loop wakes every 1 ms
    and the worst gap between its wake-ups is reported (``worst_loop_gap_ms``)."""
    import anyio
    import anyio.lowlevel

    import streamload
    from streamload.testing import SimulatedGPU

    devices: list[Any] = (
        [SimulatedGPU("sim:0", total_bytes=64 * 2**30)] if target == "sim" else ["cpu"]
    )
    # Only what the row names is set: every other field keeps its default.
    params = streamload.LoadParams(devices=devices, cpu_policy=policy)
    if huge_pages is not None:
        params = dataclasses.replace(params, huge_pages=huge_pages)
    worst, worst_at = 0.0, 0.0

    async def beat(done: anyio.Event, began: float) -> None:
        nonlocal worst, worst_at
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            if now - last > worst:
                worst, worst_at = now - last, last - began
            last = now

    async def main() -> tuple[Any, float]:
        done = anyio.Event()
        async with anyio.create_task_group() as group:
            start = time.perf_counter()
            if heartbeat:
                group.start_soon(beat, done, start)
                await anyio.lowlevel.checkpoint()  # the heartbeat runs before the load
                start = time.perf_counter()
            model = await streamload.load(directory, params)
            seconds = time.perf_counter() - start
            done.set()
        return model, seconds

    called = time.perf_counter()
    model, loop_seconds = anyio.run(main)
    seconds = time.perf_counter() - called
    extras = {"staging_bytes": float(model.report.staging_bytes), "loop_seconds": loop_seconds}
    if heartbeat:
        extras |= {"worst_loop_gap_ms": worst * 1000, "worst_loop_gap_at_s": worst_at}
    return Loaded(seconds, model.report.stored_bytes, list(model.tensors.values()), extras)


def run_transformers(directory: Path) -> Loaded:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, device_map="cpu")
    seconds = time.perf_counter() - start
    tensors = list(model.state_dict().values())
    return Loaded(seconds, tensor_bytes(directory), tensors)


def run_accelerate(directory: Path) -> Loaded:
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.perf_counter()
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = load_checkpoint_and_dispatch(model, str(directory), device_map={"": "cpu"})
    seconds = time.perf_counter() - start
    tensors = list(model.state_dict().values())
    return Loaded(seconds, tensor_bytes(directory), tensors)


def run_runai(directory: Path) -> Loaded:
    from runai_model_streamer import SafetensorsStreamer

    files = [str(p) for p in shard_files(directory)]
    # From 0.17 every yielded tensor is the caller's (``owned=True``, a fresh buffer per ring
    # slot); earlier versions yield views into buffers they reuse, which must be cloned.
    owned = "owned" in inspect.signature(SafetensorsStreamer.stream_files).parameters
    start = time.perf_counter()
    kept: list[torch.Tensor] = []
    with SafetensorsStreamer() as streamer:
        if owned:
            streamer.stream_files(files, device="cpu", owned=True)
        else:
            streamer.stream_files(files, device="cpu")
        for _, tensor in streamer.get_tensors():
            kept.append(tensor if owned else tensor.clone())
    seconds = time.perf_counter() - start
    return Loaded(seconds, sum(t.nbytes for t in kept), kept, {"owned": float(owned)})


def run_fastsafetensors(directory: Path) -> Loaded:
    from fastsafetensors import SafeTensorsFileLoader

    files = [str(p) for p in shard_files(directory)]
    start = time.perf_counter()
    loader = SafeTensorsFileLoader(None, "cpu", nogds=True)
    try:
        loader.add_filenames({0: files})
        buffers = loader.copy_files_to_device()
        try:
            # Tensors share ownership of their buffer: they stay valid after ``close()``.
            kept = [buffers.get_tensor(name) for name in loader.get_keys()]
        finally:
            buffers.close()
    finally:
        loader.close()
    seconds = time.perf_counter() - start
    return Loaded(seconds, sum(t.nbytes for t in kept), kept)


def tensor_bytes(directory: Path) -> int:
    """Bytes of tensor data in the checkpoint's shards, from their headers."""
    total = 0
    for path in shard_files(directory):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(
            end - start
            for name, entry in header.items()
            if name != "__metadata__"
            for start, end in [entry["data_offsets"]]
        )
    return total


_STREAMLOAD = ("anyio", "streamload", "streamload.testing")
_HF = ("transformers", "transformers.models.llama.modeling_llama", "accelerate")


def _streamload(
    target: str,
    policy: Literal["copy", "mmap"],
    huge_pages: bool | Literal["auto"] | None = None,
    note: str = "",
) -> Method:
    return Method(
        lambda d: run_streamload(d, target, policy, huge_pages),
        _STREAMLOAD,
        note=note,
        stall=lambda d: run_streamload(d, target, policy, huge_pages, heartbeat=True),
    )


METHODS: dict[str, Method] = {
    "disk": Method(run_disk, note="8 threads pread 16 MiB chunks into reused buffers"),
    "materialise": Method(
        run_materialise, note="8 threads pread 16 MiB chunks into fresh, pre-faulted tensors"
    ),
    "safetensors": Method(
        run_safetensors, ("safetensors.torch",), note="load_file per shard + clone()"
    ),
    "streamload-cpu": _streamload("cpu", "copy", note="defaults (4 KiB pages)"),
    "streamload-cpu-huge": _streamload("cpu", "copy", huge_pages=True, note="huge_pages=True"),
    "streamload-cpu-auto": _streamload(
        "cpu", "copy", huge_pages="auto", note='huge_pages="auto" (huge pages for cached layers)'
    ),
    "streamload-mmap": _streamload("cpu", "mmap", note='cpu_policy="mmap"'),
    "streamload-sim": _streamload("sim", "copy", note="simulated GPU: staging ring + copy"),
    "transformers": Method(run_transformers, _HF, note='from_pretrained(device_map="cpu")'),
    "accelerate": Method(
        run_accelerate, _HF, note="init_empty_weights + load_checkpoint_and_dispatch"
    ),
    "runai": Method(
        run_runai,
        ("runai_model_streamer",),
        note="SafetensorsStreamer, defaults (O_DIRECT where possible)",
    ),
    "runai-buffered": Method(
        run_runai,
        ("runai_model_streamer",),
        (("RUNAI_STREAMER_FS_STRATEGY", "sync_buffered"),),
        note="SafetensorsStreamer, page-cache reads",
    ),
    "fastsafetensors": Method(
        run_fastsafetensors,
        ("fastsafetensors",),
        note="nogds, defaults (O_DIRECT on local filesystems)",
    ),
    "fastsafetensors-buffered": Method(
        run_fastsafetensors,
        ("fastsafetensors",),
        (("FASTSAFETENSORS_ODIRECT", "0"),),
        note="nogds, page-cache reads",
    ),
}
