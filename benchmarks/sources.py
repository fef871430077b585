"""Object-store throughput and the cost of ``verify=True``, in one run.

    python -m benchmarks.sources [--mib 1024] [--rounds 5] [--server moto] [--json FILE]

S3: a moto S3 server on 127.0.0.1, started here in a process of its own (so the client's work
and the server's do not share one interpreter lock), holds a Llama-shaped checkpoint in
``--shards`` shards. Alternating, round after round, each in a fresh process (DESIGN §10),
timed from the call with the libraries it uses already imported, as many in flight as
streamload's CPU reader lanes (``reader_threads // 2``):

- ``download``: a plain parallel download of the same objects into memory with obstore's
  async API: one listing, then ranged GETs of ``CHUNK`` bytes, every range's bytes kept;
- ``download-presigned``: the same ranges through presigned URLs over keep-alive
  ``http.client`` connections, each received into a fresh buffer of its own: the transport
  streamload uses for S3 tensor bytes, as a plain download;
- ``streamload``: ``streamload.load("s3://...", LoadParams(devices=["cpu"]))``, the defaults.

Verify: the same checkpoint laid out as a hub cache (blobs named by sha256) on local disk, warm
(read once before), loaded onto the CPU with ``verify=False`` and ``verify=True`` alternately,
each in a fresh process.

Reported: medians of the per-round seconds and of the per-round ratios (throughput of
streamload over each download's, from the call and from the plan on; time with verify over
without).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from streamload.testing import write_sharded

CHUNK = 16 * 2**20


def _checkpoint(directory: Path, mib: int, shards: int) -> Path:
    """A Llama-shaped bf16 checkpoint of about ``mib`` MiB in ``shards`` shards."""
    hidden, layers = 1024, 8
    per_layer = max(1, mib * 2**20 // layers // hidden // 12)
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        for name, rows in [("self_attn.q_proj", 2), ("self_attn.o_proj", 2), ("mlp.up_proj", 8)]:
            shape = (rows * per_layer // 2, hidden)
            tensors[f"{p}.{name}.weight"] = torch.randn(*shape, generator=gen).bfloat16()
    tensors["model.embed_tokens.weight"] = torch.randn(256, hidden, generator=gen).bfloat16()
    tensors["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    tensors["lm_head.weight"] = torch.randn(256, hidden, generator=gen).bfloat16()
    config = {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 4 * per_layer,
        "vocab_size": 256,
        "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16",
    }
    return write_sharded(directory, tensors, num_shards=shards, sparse=False, config=config)


async def _download(url: str, names: list[str], lanes: int) -> int:
    """Every object's bytes by ranged GETs of ``CHUNK``, ``lanes`` in flight; returns bytes."""
    import obstore
    from obstore.store import from_url

    store = from_url(url, client_options={"allow_http": True})
    # One listing gives every size (as a plain download of a prefix would get them).
    listing = await obstore.list_with_delimiter_async(store)
    sizes = {meta["path"]: meta["size"] for meta in listing["objects"]}
    queue = list(reversed(_ranges(names, sizes)))
    kept: list[Any] = []

    async def lane() -> None:
        while queue:
            name, start, end = queue.pop()
            kept.append(await obstore.get_range_async(store, name, start=start, end=end))

    await asyncio.gather(*(lane() for _ in range(lanes)))
    return sum(len(data) for data in kept)


def _download_presigned(url: str, names: list[str], lanes: int) -> int:
    """The same ranges through presigned URLs, ``lanes`` threads each with one keep-alive
    connection, each range received into a fresh buffer of its own (an anonymous mapping,
    faulted in as the body lands, as obstore's buffers and streamload's tensors are:
    ``bytearray`` would zero it first); returns bytes."""
    import http.client
    import mmap
    import urllib.parse
    from datetime import timedelta

    import obstore
    from obstore.store import from_url

    store: Any = from_url(url, client_options={"allow_http": True})
    listing = obstore.list_with_delimiter(store)
    sizes = {meta["path"]: meta["size"] for meta in listing["objects"]}
    signed = {
        name: urllib.parse.urlsplit(obstore.sign(store, "GET", name, timedelta(minutes=30)))
        for name in names
    }
    queue = list(reversed(_ranges(names, sizes)))
    kept: list[mmap.mmap] = []

    def lane() -> None:
        connection: http.client.HTTPConnection | None = None
        while queue:
            try:
                name, start, end = queue.pop()
            except IndexError:
                break
            target = signed[name]
            if connection is None:
                connection = http.client.HTTPConnection(target.hostname or "", target.port)
            connection.request(
                "GET",
                f"{target.path}?{target.query}",
                headers={"Range": f"bytes={start}-{end - 1}"},
            )
            response = connection.getresponse()
            buffer = mmap.mmap(-1, end - start)
            view, at = memoryview(buffer), 0
            while at < len(buffer):
                got = response.readinto(view[at:])
                if not got:
                    raise OSError(f"{name}: the body ended at {at} of {len(buffer)} bytes")
                at += got
            kept.append(buffer)
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=lane) for _ in range(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(len(data) for data in kept)


def _ranges(names: list[str], sizes: dict[str, int]) -> list[tuple[str, int, int]]:
    return [(n, s, min(s + CHUNK, sizes[n])) for n in names for s in range(0, sizes[n], CHUNK)]


def _timed_load(source: str, params: Any) -> dict[str, float]:
    """Seconds from the call to the loaded model, and from the plan (listing, headers, config
    and planning done) to the loaded model: the streaming alone."""
    import anyio

    import streamload

    planned = 0.0

    def on_event(event: streamload.events.Event) -> None:
        nonlocal planned
        if isinstance(event, streamload.events.PlanComputed):
            planned = time.perf_counter()

    started = time.perf_counter()
    model = anyio.run(lambda: streamload.load(source, params, on_event=on_event))
    ended = time.perf_counter()
    nbytes = sum(t.numel() * t.element_size() for t in model.tensors.values())
    model.release()
    return {"seconds": ended - started, "stream_seconds": ended - planned, "bytes": nbytes}


def _one(method: str, source: str, objects: list[str], lanes: int) -> dict[str, float]:
    """One method, once, in this (fresh) process: its libraries imported, then timed."""
    import anyio  # noqa: F401  (imported before the clock starts, as a server has it)
    import obstore  # noqa: F401

    import streamload

    structlog_quiet()
    if method == "download":
        started = time.perf_counter()
        nbytes = asyncio.run(_download(source, objects, lanes))
        return {"seconds": time.perf_counter() - started, "bytes": nbytes}
    if method == "download-presigned":
        started = time.perf_counter()
        nbytes = _download_presigned(source, objects, lanes)
        return {"seconds": time.perf_counter() - started, "bytes": nbytes}
    verify = method == "streamload-verify"
    return _timed_load(source, streamload.LoadParams(devices=["cpu"], verify=verify))


def structlog_quiet() -> None:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _in_child(method: str, source: str, objects: list[str], lanes: int) -> dict[str, float]:
    """``_one`` in a fresh interpreter (the environment passed on: endpoint, credentials)."""
    command = [sys.executable, "-m", "benchmarks.sources", "--one", method, "--source", source]
    command += ["--lanes", str(lanes), *(f"--object={name}" for name in objects)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed: {done.stderr.strip().splitlines()[-1:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _hub_cache(cache: Path, checkpoint: Path) -> Path:
    """``checkpoint`` as a hub cache snapshot (safetensors blobs named by sha256)."""
    folder = cache / "models--bench--tiny"
    blobs, snapshot = folder / "blobs", folder / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(checkpoint.iterdir()):
        data = file.read_bytes()
        name = hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors" else file.name
        (blobs / name).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", name))
    return snapshot


def _median_ratio(top: list[float], bottom: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(top, bottom, strict=True))


# The servers the S3 rounds run against: moto as shipped, and moto serving a ranged GET at the
# cost of its range (``benchmarks.ranged_moto``) as object stores do.
SERVERS = {"moto": "moto.server", "ranged_moto": "benchmarks.ranged_moto"}
DOWNLOADS = ("download", "download-presigned")


def run(mib: int, rounds: int, shards: int, servers: list[str]) -> dict[str, Any]:
    import streamload

    lanes = streamload.LoadParams().reader_threads // 2
    results: dict[str, Any] = {"mib": mib, "shards": shards, "rounds": rounds}
    results["concurrency"] = lanes
    with tempfile.TemporaryDirectory() as tmp:
        local = _checkpoint(Path(tmp) / "ckpt", mib, shards)
        for server in servers:
            results[f"s3_{server}"] = _s3_rounds(SERVERS[server], local, rounds, lanes)
        snapshot = str(_hub_cache(Path(tmp) / "hub", local))
        _in_child("streamload", snapshot, [], lanes)  # warm the page cache
        plain, verified = [], []
        for _ in range(rounds):
            plain.append(_in_child("streamload", snapshot, [], lanes)["seconds"])
            verified.append(_in_child("streamload-verify", snapshot, [], lanes)["seconds"])
        results["verify"] = {
            "plain_s": statistics.median(plain),
            "verify_s": statistics.median(verified),
            "verify_over_plain": _median_ratio(verified, plain),
        }
    return results


def _s3_rounds(module: str, local: Path, rounds: int, lanes: int) -> dict[str, Any]:
    """The downloads and the load, alternating, ``rounds`` times, each in a fresh process,
    against a fresh server (``module``) holding ``local``'s files under ``s3://bench/m``."""
    import boto3

    server, endpoint = _start_server(module)
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
    )
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        names = sorted(f.name for f in local.iterdir())
        for name in names:
            client.put_object(Bucket="bench", Key=f"m/{name}", Body=(local / name).read_bytes())
        url = "s3://bench/m"
        objects = [n for n in names if n.endswith(".safetensors")]
        seconds: dict[str, list[float]] = {m: [] for m in (*DOWNLOADS, "streamload")}
        stream: list[float] = []
        nbytes: dict[str, int] = {}
        for _ in range(rounds):
            for method in seconds:
                got = _in_child(method, url, objects, lanes)
                seconds[method].append(got["seconds"])
                nbytes[method] = int(got["bytes"])
                if "stream_seconds" in got:
                    stream.append(got["stream_seconds"])
    finally:
        server.terminate()
        server.wait()
    load = seconds["streamload"]
    out: dict[str, Any] = {"server": module, "bytes": nbytes}
    for method, times in seconds.items():
        key = method.replace("-", "_")
        out[f"{key}_s"] = statistics.median(times)
        out[f"{key}_gb_per_s"] = nbytes[method] / statistics.median(times) / 1e9
    out["streamload_stream_s"] = statistics.median(stream)
    for method in DOWNLOADS:
        key = method.replace("-", "_")
        out[f"streamload_over_{key}"] = _median_ratio(seconds[method], load)
        out[f"streaming_over_{key}"] = _median_ratio(seconds[method], stream)
        out[f"rounds_streamload_over_{key}"] = [
            round(d / w, 3) for d, w in zip(seconds[method], load, strict=True)
        ]
    return out


def _start_server(module: str) -> tuple[subprocess.Popen[bytes], str]:
    """``module``'s moto server on a free port of 127.0.0.1, in its own process, once it
    answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", module, "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            with urllib.request.urlopen(endpoint + "/moto-api/", timeout=1):
                return server, endpoint
        except OSError:
            time.sleep(0.05)
    server.terminate()
    raise RuntimeError(f"{module} did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    # moto reads a whole object for every ranged GET, so on big objects each request costs the
    # server the object's size: shards of ~16 MiB keep that artifact from deciding the result.
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--server", choices=sorted(SERVERS), action="append")
    parser.add_argument("--json", type=Path)
    # One method once, in this process (how ``run`` starts each round's fresh process).
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--lanes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--object", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.source, args.object, args.lanes)))
        return
    results = run(args.mib, args.rounds, args.shards, args.server or list(SERVERS))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
