"""Object-store throughput and the cost of ``verify=True``, in one run.

    python -m benchmarks.sources [--mib 256] [--rounds 5] [--json FILE]

S3: a moto S3 server on 127.0.0.1, started here in a process of its own (so the client's work
and the server's do not share one interpreter lock), holds a Llama-shaped checkpoint in
``--shards`` shards.
Alternating, round after round:

- ``download``: a plain parallel download of the same objects into memory with obstore's
  async API: ranged GETs of ``chunk_bytes`` each, as many in flight as streamload's CPU reader
  lanes (``reader_threads // 2``), every range's bytes kept;
- ``streamload``: ``streamload.load("s3://...", LoadParams(devices=["cpu"]))``, the defaults.

Verify: the same checkpoint laid out as a hub cache (blobs named by sha256) on local disk, warm
(read once before), loaded onto the CPU with ``verify=False`` and ``verify=True`` alternately.

Reported: medians of the per-round seconds and of the per-round ratios (throughput of
streamload over the download's, from the call and from the plan on; time with verify over
without). Both run in this one process, one after the other.
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
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import structlog
import torch

import streamload
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
    ranges = [(n, s, min(s + CHUNK, sizes[n])) for n in names for s in range(0, sizes[n], CHUNK)]
    queue = list(reversed(ranges))
    kept: list[Any] = []

    async def lane() -> None:
        while queue:
            name, start, end = queue.pop()
            kept.append(await obstore.get_range_async(store, name, start=start, end=end))

    await asyncio.gather(*(lane() for _ in range(lanes)))
    return sum(len(data) for data in kept)


def _timed_load(source: str | Path, params: streamload.LoadParams) -> tuple[float, float]:
    """Seconds from the call to the loaded model, and from the plan (listing, headers, config
    and planning done) to the loaded model: the streaming alone."""
    planned = 0.0

    def on_event(event: streamload.events.Event) -> None:
        nonlocal planned
        if isinstance(event, streamload.events.PlanComputed):
            planned = time.perf_counter()

    started = time.perf_counter()
    model = anyio.run(lambda: streamload.load(source, params, on_event=on_event))
    ended = time.perf_counter()
    model.release()
    return ended - started, ended - planned


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


def run(mib: int, rounds: int, shards: int, servers: list[str]) -> dict[str, Any]:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    params = streamload.LoadParams(devices=["cpu"])
    lanes = params.reader_threads // 2
    results: dict[str, Any] = {"mib": mib, "shards": shards, "rounds": rounds}
    results["concurrency"] = lanes
    with tempfile.TemporaryDirectory() as tmp:
        local = _checkpoint(Path(tmp) / "ckpt", mib, shards)
        for server in servers:
            results[f"s3_{server}"] = _s3_rounds(SERVERS[server], local, params, rounds)
        snapshot = _hub_cache(Path(tmp) / "hub", local)
        _timed_load(snapshot, params)  # warm the page cache
        plain, verified = [], []
        for _ in range(rounds):
            plain.append(_timed_load(snapshot, params)[0])
            checking = streamload.LoadParams(devices=["cpu"], verify=True)
            verified.append(_timed_load(snapshot, checking)[0])
        results["verify"] = {
            "plain_s": statistics.median(plain),
            "verify_s": statistics.median(verified),
            "verify_over_plain": _median_ratio(verified, plain),
        }
    return results


def _s3_rounds(
    module: str, local: Path, params: streamload.LoadParams, rounds: int
) -> dict[str, Any]:
    """Download and load, alternating, ``rounds`` times against a fresh server (``module``)
    holding ``local``'s files under ``s3://bench/m``."""
    import boto3

    server, endpoint = _start_server(module)
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
    )
    lanes = params.reader_threads // 2
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        names = sorted(f.name for f in local.iterdir())
        for name in names:
            client.put_object(Bucket="bench", Key=f"m/{name}", Body=(local / name).read_bytes())
        url = "s3://bench/m"
        objects = [n for n in names if n.endswith(".safetensors")]
        download, load, stream = [], [], []
        for _ in range(rounds):
            started = time.perf_counter()
            nbytes = asyncio.run(_download(url, objects, lanes))
            download.append(time.perf_counter() - started)
            whole, streaming = _timed_load(url, params)
            load.append(whole)
            stream.append(streaming)
    finally:
        server.terminate()
        server.wait()
    return {
        "server": module,
        "bytes": nbytes,
        "download_s": statistics.median(download),
        "streamload_s": statistics.median(load),
        "streamload_stream_s": statistics.median(stream),
        "download_gb_per_s": nbytes / statistics.median(download) / 1e9,
        "streamload_gb_per_s": nbytes / statistics.median(load) / 1e9,
        "streamload_over_download": _median_ratio(download, load),
        "streaming_over_download": _median_ratio(download, stream),
        "rounds_streamload_over_download": [
            round(d / w, 3) for d, w in zip(download, load, strict=True)
        ],
    }


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
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    # moto reads a whole object for every ranged GET, so on big objects each request costs the
    # server the object's size: shards of ~16 MiB keep that artifact from deciding the result.
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--server", choices=sorted(SERVERS), action="append")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = run(args.mib, args.rounds, args.shards, args.server or list(SERVERS))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
