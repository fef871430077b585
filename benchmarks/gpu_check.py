"""The CUDA path on a real GPU: ``make gpu-check`` (``python -m benchmarks.gpu_check``).

Each check runs in a fresh Python process (contexts, caches and free memory start as a user's
process finds them) and prints one summary line, ``PASS``/``FAIL``/``SKIP``, its name and what
it saw; the run exits non-zero if any check failed. Without a CUDA device it prints
``no CUDA device: N checks skipped`` and exits 0. The README's Limits section lists what each
check proves. ``--size-gb`` sets the random checkpoint's size (default 3), ``--only NAME``
runs one check, ``--keep DIR`` keeps the checkpoints there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamload.engine._reader import host_view

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
GiB = 2**30
TOLERANCE = 64 * MiB  # NVML and cudaMemGetInfo read the same driver counters, at two moments

CHECKS: dict[str, Callable[[Path], str]] = {}


def check(function: Callable[[Path], str]) -> Callable[[Path], str]:
    """Register a check: it returns its detail line, or raises ``AssertionError``/``Skip``."""
    CHECKS[function.__name__.removeprefix("check_").replace("_", "-")] = function
    return function


class Skip(Exception):
    """The check does not apply on this machine (its message says why)."""


# --------------------------------------------------------------------------------------------
# Helpers (run inside a check's own process)


def _nvml_free(ordinal: int) -> int:
    from streamload.devices import CudaDevice, default_nvml

    device = CudaDevice(ordinal)
    handle = device._nvml_handle()
    if handle is None:
        raise Skip("NVML cannot map this GPU")
    return default_nvml().memory(handle, device=device.name).free


def _has_context(ordinal: int) -> bool:
    import torch

    return bool(torch._C._cuda_hasPrimaryContext(ordinal))  # type: ignore[attr-defined]


def _ckpt(work: Path, dtype: str = "F32") -> Path:
    """A Llama-shaped checkpoint of random tensors (``--size-gb``), written once per run."""
    import torch

    from streamload.testing import llama_config, llama_shapes, write_sharded

    size = float(os.environ.get("GPU_CHECK_SIZE_GB", "3"))
    directory = work / f"llama-{dtype.lower()}-{size:g}gb"
    if (directory / "config.json").exists():
        return directory
    per_layer = 4 * (2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632)
    layers = max(2, int((size * 1e9 - 2 * 4 * 32000 * 2048) / per_layer))
    config = llama_config(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    gen = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.randn(shape, generator=gen, dtype=torch.float32)
        for name, (_, shape) in llama_shapes(config, dtype).items()
    }
    write_sharded(directory, tensors, num_shards=4, sparse=False, config=config)
    return directory


def _reference(directory: Path, dtype: Any) -> dict[str, Any]:
    import safetensors.torch

    out: dict[str, Any] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        for name, tensor in safetensors.torch.load_file(shard).items():
            out[name] = (
                tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
            )
    return out


def _same(loaded: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Names whose bytes, dtype or shape differ."""
    import torch

    bad = []
    for name, want in reference.items():
        got = loaded.get(name)
        if got is None or got.dtype != want.dtype or got.shape != want.shape:
            bad.append(name)
            continue
        got = got.detach().cpu().contiguous()
        if not torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
            bad.append(name)
    return bad


def _params(devices: list[Any], **overrides: Any) -> Any:
    import streamload

    base: dict[str, Any] = {
        "devices": devices,
        "max_seq_len": 2048,
        "host_reserve_bytes": 0,
        "reserve_fraction": 0.0,
    }
    base.update(overrides)
    return streamload.LoadParams(**base)


def _evict(directory: Path) -> None:
    """Drop the checkpoint's clean pages from the page cache (cold reads)."""
    for shard in directory.glob("*.safetensors"):
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _load(directory: Path, params: Any, on_event: Any = None) -> Any:
    import anyio

    import streamload

    async def run() -> Any:
        return await streamload.load(directory, params, on_event=on_event)

    return anyio.run(run)


# --------------------------------------------------------------------------------------------
# Checks


@check
def check_gpu_tests(work: Path) -> str:
    """The ``gpu``-marked tests pass."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    assert done.returncode == 0, last
    return last


@check
def check_nvml_matches_mem_get_info(work: Path) -> str:
    """NVML's free memory of each GPU is ``cudaMemGetInfo``'s within 64 MiB."""
    import torch

    lines = []
    for ordinal in range(torch.cuda.device_count()):
        with torch.cuda.device(ordinal):
            free, _ = torch.cuda.mem_get_info(ordinal)
        nvml = _nvml_free(ordinal)
        assert abs(nvml - free) <= TOLERANCE, f"cuda:{ordinal}: NVML {nvml}, cudart {free}"
        lines.append(f"cuda:{ordinal} differ by {abs(nvml - free) / MiB:.1f} MiB")
    return "; ".join(lines)


@check
def check_context_cost(work: Path) -> str:
    """``prepare()`` creates the context (none before it) and NVML sees what it costs."""

    from streamload.devices import CudaDevice

    assert not _has_context(0), "a context existed before any CUDA call"
    before = _nvml_free(0)
    CudaDevice(0).prepare()
    assert _has_context(0)
    cost = before - _nvml_free(0)
    assert 0 < cost < 4 * GiB, f"context cost {cost} bytes"
    return f"context on cuda:0 costs {cost / MiB:.0f} MiB"


@check
def check_no_context_on_gpu_0(work: Path) -> str:
    """A load onto ``cuda:1`` creates no context on GPU 0 (worker threads start on device 0)."""
    import torch

    if torch.cuda.device_count() < 2:
        raise Skip("needs two GPUs")
    directory = _ckpt(work)
    model = _load(directory, _params(["cuda:1", "cpu"], dtype="bf16"))
    model.release(empty_cache=True)
    assert not _has_context(0), "GPU 0 got a context"
    return "loaded onto cuda:1, GPU 0 untouched"


@check
def check_allocation_and_release_in_live_free(work: Path) -> str:
    """1 GiB allocated shows in live free memory; freed, it counts as reusable cache; after
    ``release_cache`` the driver has it back."""
    import torch

    from streamload.devices import CudaDevice

    device = CudaDevice(0)
    device.prepare()
    start, start_nvml = device.live_free_bytes(), _nvml_free(0)
    tensor = device.empty((GiB,), torch.uint8)
    held = device.live_free_bytes()
    assert abs(start - held - GiB) <= TOLERANCE, f"live free {start} -> {held} holding 1 GiB"
    del tensor
    freed, cached_nvml = device.live_free_bytes(), _nvml_free(0)
    assert abs(freed - start) <= TOLERANCE, f"live free {freed} after free, {start} before"
    assert start_nvml - cached_nvml >= GiB - TOLERANCE, "NVML should still count the cache"
    device.release_cache()
    assert abs(_nvml_free(0) - start_nvml) <= TOLERANCE, "empty_cache gave nothing back"
    return "allocate, free, release_cache all seen"


_VISIBLE_PROBE = """
import json, streamload.devices as d
devs = d.resolve_devices("auto")
out = []
for dev in devs:
    if dev.is_gpu:
        out.append([dev.name, dev._nvml_handle() is not None, dev.live_free_bytes()])
print(json.dumps(out))
"""


@check
def check_cuda_visible_devices_forms(work: Path) -> str:
    """``CUDA_VISIBLE_DEVICES`` unset, an index, a full ``GPU-`` UUID, a UUID prefix and ``""``
    each give the expected GPUs, matched to their NVML handles."""
    import torch

    from streamload.devices import nvml_uuid_from_torch

    uuid = nvml_uuid_from_torch(getattr(torch.cuda.get_device_properties(0), "uuid", None))
    forms: dict[str, str | None] = {"unset": None, "index": "0", "empty": ""}
    if uuid is not None:
        forms["uuid"] = uuid
        forms["prefix"] = uuid[:12]
    seen = []
    for label, value in forms.items():
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        if value is not None:
            env["CUDA_VISIBLE_DEVICES"] = value
        done = subprocess.run(
            [sys.executable, "-c", _VISIBLE_PROBE], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{label}: {done.stderr.strip().splitlines()[-1:]}"
        gpus = json.loads(done.stdout.strip().splitlines()[-1])
        if label == "empty":
            assert gpus == [], f"{label}: {gpus}"
        elif label == "unset":
            assert len(gpus) == torch.cuda.device_count(), f"{label}: {gpus}"
        else:
            assert [g[0] for g in gpus] == ["cuda:0"], f"{label}: {gpus}"
        assert all(g[1] for g in gpus), f"{label}: a GPU without its NVML handle: {gpus}"
        seen.append(f"{label}={len(gpus)}")
    return " ".join(seen)


def _slow_copies() -> Any:
    """The real runtime with a ``torch.cuda._sleep`` queued on the copy's stream before every
    copy, so copies finish long after the ring would have refilled their slot had it not
    waited for the fence."""
    import torch

    from streamload.devices import TorchCuda

    class Slow(TorchCuda):
        __slots__ = ()

        def copy(self, dst: Any, src: Any, *, non_blocking: bool) -> None:
            torch.cuda._sleep(2_000_000)  # type: ignore[no-untyped-call]
            super().copy(dst, src, non_blocking=non_blocking)

    return Slow()


@check
def check_ring_is_bit_identical_with_slow_copies(work: Path) -> str:
    """With every copy delayed on the GPU, the load equals safetensors byte for byte in the
    stored dtype, bf16 and fp16 (the ring waits for its fences, conversions are awaited)."""
    import torch

    from streamload.devices import CudaDevice

    directory = _ckpt(work)
    lines = []
    for dtype in (None, torch.bfloat16, torch.float16):
        device = CudaDevice(0, runtime=_slow_copies())
        model = _load(directory, _params([device, "cpu"], dtype=dtype))
        bad = _same(model.tensors, _reference(directory, dtype))
        on_gpu = sum(1 for d in model.plan.layer_devices if d == "cuda:0")
        model.release(empty_cache=True)
        assert not bad, f"{dtype}: {len(bad)} tensors differ, e.g. {bad[:3]}"
        lines.append(f"{dtype or 'stored'} ok ({on_gpu} layers on cuda:0)")
    return "; ".join(lines)


def _baseline_pinned_copy(directory: Path) -> float:
    """Seconds: one thread reads each shard in 16 MiB pieces into one pinned buffer and copies
    it to the GPU with a blocking copy."""
    import torch

    buffer = torch.empty(16 * MiB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(16 * MiB, dtype=torch.uint8, device="cuda:0")
    view = host_view(buffer)
    started = time.perf_counter()
    for shard in sorted(directory.glob("*.safetensors")):
        with open(shard, "rb", buffering=0) as f:
            while (got := f.readinto(view)) > 0:
                dst[:got].copy_(buffer[:got])
    torch.cuda.synchronize()
    return time.perf_counter() - started


def _baseline_preadv_pinned(directory: Path) -> float:
    """Seconds: 8 threads ``preadv`` into a ring of pinned slots, non-blocking copies on one
    stream, each slot reused after its event (the path streamload takes, without a loader)."""
    import concurrent.futures
    import threading

    import torch

    slots = [torch.empty(16 * MiB, dtype=torch.uint8, pin_memory=True) for _ in range(8)]
    events: list[Any] = [None] * 8
    dst = torch.empty(16 * MiB, dtype=torch.uint8, device="cuda:0")
    stream = torch.cuda.Stream(device=0)  # type: ignore[no-untyped-call]
    lock = threading.Lock()
    jobs = []
    for shard in sorted(directory.glob("*.safetensors")):
        size = shard.stat().st_size
        jobs += [(shard, offset) for offset in range(0, size, 16 * MiB)]

    def work(index: int) -> None:
        slot = index % 8
        shard, offset = jobs[index]
        with lock:
            if events[slot] is not None:
                events[slot].synchronize()
        fd = os.open(shard, os.O_RDONLY)
        try:
            got = os.preadv(fd, [host_view(slots[slot])], offset)
        finally:
            os.close(fd)
        with lock, torch.cuda.device(0), torch.cuda.stream(stream):
            dst[:got].copy_(slots[slot][:got], non_blocking=True)
            events[slot] = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
            events[slot].record(stream)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for start in range(0, len(jobs), 8):  # one wave per ring turn: a slot is never shared
            list(pool.map(work, range(start, min(start + 8, len(jobs)))))
    stream.synchronize()
    return time.perf_counter() - started


@check
def check_throughput_warm_and_cold(work: Path) -> str:
    """GB/s of a stored-dtype load onto cuda:0, warm and cold, beside a pinned-copy and a
    ``preadv``-into-pinned baseline measured in the same run (figures, no threshold)."""
    directory = _ckpt(work)
    nbytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    figures = []
    for state in ("warm", "cold"):
        row = []
        methods: list[tuple[str, Callable[[Path], float]]] = [
            ("streamload", _timed_load),
            ("pinned-copy", _baseline_pinned_copy),
            ("preadv-pinned", _baseline_preadv_pinned),
        ]
        for name, method in methods:

            def run(method: Callable[[Path], float] = method) -> float:
                return method(directory)

            if state == "warm":
                run()  # fill the page cache
            else:
                _evict(directory)
            row.append(f"{name} {nbytes / run() / 1e9:.2f}")
        figures.append(f"{state}: " + ", ".join(row) + " GB/s")
    return "; ".join(figures)


def _timed_load(directory: Path) -> float:
    started = time.perf_counter()
    model = _load(directory, _params(["cuda:0", "cpu"]))
    seconds = time.perf_counter() - started
    model.release(empty_cache=True)
    return seconds


def _tight_reserve(directory: Path, gpu_share: float) -> int:
    """A reserve that leaves about ``gpu_share`` of the checkpoint's bytes for the load, read
    from NVML before this process has a context (the load must charge the context itself)."""
    import streamload

    spec = streamload.inspect(directory)
    return max(_nvml_free(0) - int(spec.total_bytes * gpu_share), 0)


@check
def check_tight_plan_needs_no_replan(work: Path) -> str:
    """On an idle GPU with room for half the model, the plan holds: the load places what it
    planned without a re-plan (the context is charged before capacities are read)."""
    from streamload.events import Replanned

    directory = _ckpt(work)
    events: list[Any] = []
    reserve = _tight_reserve(directory, 0.5)
    model = _load(
        directory, _params(["cuda:0", "cpu"], reserve_min_bytes=reserve), on_event=events.append
    )
    replans = [e for e in events if isinstance(e, Replanned)]
    on_gpu = sum(1 for d in model.plan.layer_devices if d == "cuda:0")
    model.release(empty_cache=True)
    assert not replans, f"re-planned: {replans[0].reason}"
    assert on_gpu > 0, "nothing was planned on cuda:0"
    return f"{on_gpu} layers on cuda:0, no re-plan"


_TAKER = """
import sys, time, torch
x = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device="cuda:0")
torch.cuda.synchronize()
print("taken", flush=True)
time.sleep(600)
"""


def _start_taker(taker: list[subprocess.Popen[str]]) -> str:
    """Start the helper that takes 20 GiB on cuda:0; its first line once it holds them."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _TAKER, str(20 * GiB)], stdout=subprocess.PIPE, text=True
    )
    taker.append(proc)
    assert proc.stdout is not None
    return proc.stdout.readline()


@check
def check_tenant_mid_load_replans_and_stays_exact(work: Path) -> str:
    """Another process takes 20 GiB after the first layer: the load re-plans and is still
    bit-identical."""
    import anyio.to_thread

    from streamload.events import LayerPlaced, Replanned

    directory = _ckpt(work)
    reserve = _tight_reserve(directory, 1.0)
    reserve = max(reserve - 10 * GiB, 0)  # 10 GiB spare: 20 GiB taken makes the GPU short
    events: list[Any] = []
    taker: list[subprocess.Popen[str]] = []

    async def on_event(event: Any) -> None:
        events.append(event)
        if isinstance(event, LayerPlaced) and event.layer == 0 and not taker:
            line = await anyio.to_thread.run_sync(_start_taker, taker)
            assert line.strip() == "taken", "the helper could not take 20 GiB"

    try:
        model = _load(directory, _params(["cuda:0", "cpu"], reserve_min_bytes=reserve), on_event)
        bad = _same(model.tensors, _reference(directory, None))
        model.release(empty_cache=True)
    finally:
        for proc in taker:
            proc.kill()
            proc.wait()
    replans = [e for e in events if isinstance(e, Replanned)]
    assert replans, "no re-plan after 20 GiB were taken"
    assert not bad, f"{len(bad)} tensors differ after the re-plan"
    return f"{len(replans)} re-plan(s), bit-identical"


@check
def check_forced_oom_replans(work: Path) -> str:
    """An allocation that raises ``torch.OutOfMemoryError`` (injected at the runtime seam, on
    the fifth allocation) re-plans; the load completes bit-identical."""
    import torch

    from streamload.devices import CudaDevice, TorchCuda
    from streamload.events import Replanned

    class Failing(TorchCuda):
        __slots__ = ("count",)

        def __init__(self) -> None:
            self.count = 0

        def empty(self, shape: tuple[int, ...], dtype: Any, ordinal: int) -> Any:
            self.count += 1
            if self.count == 5:
                raise torch.OutOfMemoryError("CUDA out of memory (forced by gpu_check)")
            return super().empty(shape, dtype, ordinal)

    directory = _ckpt(work)
    events: list[Any] = []
    model = _load(
        directory, _params([CudaDevice(0, runtime=Failing()), "cpu"]), on_event=events.append
    )
    bad = _same(model.tensors, _reference(directory, None))
    model.release(empty_cache=True)
    replans = [e for e in events if isinstance(e, Replanned)]
    assert replans, "no re-plan after the OOM"
    assert "allocation failed" in replans[0].reason, replans[0].reason
    assert not bad, f"{len(bad)} tensors differ"
    return f"re-planned: {replans[0].reason[:60]}"


@check
def check_cancellation_returns_to_baseline(work: Path) -> str:
    """Cancelled after three layers, the load leaves the GPU's free memory (NVML) where it was
    before it started, within 64 MiB."""
    import anyio

    import streamload
    from streamload.devices import CudaDevice
    from streamload.events import LayerPlaced

    directory = _ckpt(work)
    CudaDevice(0).prepare()
    baseline = _nvml_free(0)

    async def run() -> bool:
        with anyio.CancelScope() as scope:

            def on_event(event: Any) -> None:
                if isinstance(event, LayerPlaced) and event.layer == 2:
                    scope.cancel()

            await streamload.load(directory, _params(["cuda:0", "cpu"]), on_event=on_event)
        return scope.cancelled_caught

    assert anyio.run(run), "the load was not cancelled"
    gc.collect()
    after = _nvml_free(0)
    assert baseline - after <= TOLERANCE, f"{(baseline - after) / MiB:.0f} MiB still held"
    return f"back within {(baseline - after) / MiB:.1f} MiB"


@check
def check_load_model_equals_from_pretrained(work: Path) -> str:
    """``load_model`` onto cuda:0 gives the logits of ``from_pretrained(...).cuda()``."""
    import anyio
    import torch
    import transformers

    from streamload.integrations.transformers import load_model
    from streamload.testing import tiny_llama_config

    directory = work / "tiny-llama"
    config = transformers.LlamaConfig(**tiny_llama_config())
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokens = torch.tensor([[3, 17, 42, 99, 5, 200, 7, 1]], device="cuda:0")
    want = transformers.LlamaForCausalLM.from_pretrained(directory)
    want = want.cuda().eval()  # type: ignore[call-arg]
    with torch.no_grad():
        expected = want(tokens).logits

    async def run() -> Any:
        return await load_model(directory, _params(["cuda:0"]))

    model = anyio.run(run)
    with torch.no_grad():
        got = model(tokens).logits
    assert got.device == expected.device, f"logits on {got.device}"
    assert torch.equal(got, expected), f"max diff {(got - expected).abs().max().item()}"
    return "logits equal"


# --------------------------------------------------------------------------------------------
# Driver


def _run_one(name: str, work: Path) -> int:
    """Run one check in this process; print its JSON result."""
    try:
        detail = CHECKS[name](work)
        status = "PASS"
    except Skip as exc:
        status, detail = "SKIP", str(exc)
    except Exception as exc:
        status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
    print(json.dumps({"status": status, "detail": detail}), flush=True)
    return 0


def _cuda_available() -> bool:
    done = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip().endswith("True")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check")
    parser.add_argument("--only", choices=sorted(CHECKS), action="append")
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--keep", type=Path)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        return _run_one(args.run, args.work)
    names = args.only or list(CHECKS)
    if not _cuda_available():
        print(f"no CUDA device: {len(names)} checks skipped")
        return 0
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, GPU_CHECK_SIZE_GB=str(args.size_gb))
        for name in names:
            started = time.perf_counter()
            command = [sys.executable, "-m", "benchmarks.gpu_check", "--run", name]
            done = subprocess.run(
                [*command, "--work", str(work)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            try:
                result = json.loads(done.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                result = {"status": "FAIL", "detail": f"crashed (exit {done.returncode}): {tail}"}
            failed += result["status"] == "FAIL"
            seconds = time.perf_counter() - started
            print(
                f"{result['status']:4} {name:40} {seconds:6.1f} s  {result['detail']}", flush=True
            )
    print(f"{len(names) - failed} of {len(names)} checks did not fail")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
