"""Real parts for the source tests: a hub cache laid out as huggingface_hub lays it out, an S3
server on 127.0.0.1 (moto's), and a proxy in front of it that injects faults."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from tests.engine_support import llama_config, llama_tensors, write_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file: huggingface_hub names a non-LFS blob by it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hub_cache(
    cache: Path, repo_id: str, checkpoint: Path, *, commit: str = COMMIT, ref: str = "main"
) -> Path:
    """Lay ``checkpoint``'s files out in ``cache`` as huggingface_hub does: blobs named by
    sha256 (``*.safetensors``, LFS files) or git sha1 (JSON), ``snapshots/{commit}/{name}`` as
    relative symlinks to them, ``refs/{ref}`` holding the commit. Returns the repo folder."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = folder / "blobs", folder / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(checkpoint.iterdir()):
        data = file.read_bytes()
        lfs = file.suffix == ".safetensors"
        name = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        (blobs / name).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", name))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return folder


def sharded(directory: Path, layers: int = 4) -> Path:
    """A Llama-shaped checkpoint in three shards with an index."""
    return write_checkpoint(directory, llama_tensors(layers), llama_config(layers))


def single(directory: Path, layers: int = 3) -> Path:
    """A Llama-shaped checkpoint in one ``model.safetensors``, no index."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = llama_tensors(layers, seed=1)
    safetensors.torch.save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(llama_config(layers)))
    return directory


def encoder(directory: Path, layers: int = 2) -> Path:
    """A BERT-shaped masked-LM checkpoint (an encoder: no KV cache) in one file."""
    hidden, inter, vocab = 32, 64, 64
    gen = torch.Generator().manual_seed(2)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    tensors = {
        "bert.embeddings.word_embeddings.weight": rand(vocab, hidden),
        "bert.embeddings.position_embeddings.weight": rand(64, hidden),
        "bert.embeddings.token_type_embeddings.weight": rand(2, hidden),
        "bert.embeddings.LayerNorm.weight": rand(hidden),
        "bert.embeddings.LayerNorm.bias": rand(hidden),
        "cls.predictions.bias": rand(vocab),
        "cls.predictions.transform.dense.weight": rand(hidden, hidden),
    }
    for i in range(layers):
        p = f"bert.encoder.layer.{i}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value"):
            tensors[f"{p}.{name}.weight"] = rand(hidden, hidden)
        tensors[f"{p}.attention.output.dense.weight"] = rand(hidden, hidden)
        tensors[f"{p}.intermediate.dense.weight"] = rand(inter, hidden)
        tensors[f"{p}.output.dense.weight"] = rand(hidden, inter)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, directory / "model.safetensors")
    config = {
        "model_type": "bert",
        "architectures": ["BertForMaskedLM"],
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": 2,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def upload(client: Any, bucket: str, prefix: str, directory: Path, *, checksum: bool = True) -> str:
    """Put every file of ``directory`` under ``prefix`` (with a SHA256 checksum recorded when
    ``checksum``); returns the ``s3://`` URL of the prefix."""
    for file in sorted(directory.iterdir()):
        extra = {"ChecksumAlgorithm": "SHA256"} if checksum else {}
        client.put_object(
            Bucket=bucket, Key=f"{prefix}/{file.name}", Body=file.read_bytes(), **extra
        )
    return f"s3://{bucket}/{prefix}"


@dataclass
class Faults:
    """What the proxy does to requests whose path ends with ``target``.

    ``drop_after``: forward that many body bytes of a ranged GET's response, then close the
    connection (``drops`` times, ``-1``: always); ``status``: answer ranged GETs of the target
    with that status and an S3 error body instead (``answers`` times, ``-1``: always);
    ``deny``: answer every request 403; ``deny_listing``: answer listings 403. ``seen``: every
    request, as (method, path, range); ``peers``: each request's path and the client's
    (host, port) of the connection it came on; ``if_match``: the ``If-Match`` of each request
    that had one.
    """

    target: str = ""
    drop_after: int = 0
    drops: int = 0
    status: int = 0
    answers: int = 0
    deny: bool = False
    deny_listing: bool = False
    dropped: int = 0
    answered: int = 0
    seen: list[tuple[str, str, str]] = field(default_factory=list)
    peers: list[tuple[str, tuple[str, int]]] = field(default_factory=list)
    if_match: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _hit(self, path: str, ranged: bool) -> bool:
        return bool(self.target) and path.split("?")[0].endswith(self.target) and ranged

    def should_drop(self, path: str, ranged: bool) -> bool:
        with self.lock:
            if self._hit(path, ranged) and (self.drops < 0 or self.dropped < self.drops):
                self.dropped += 1
                return True
            return False

    def answer(self, path: str, ranged: bool) -> int:
        """The status to answer this request with instead of forwarding it (0: forward)."""
        with self.lock:
            if not self.status or not self._hit(path, ranged):
                return 0
            if self.answers >= 0 and self.answered >= self.answers:
                return 0
            self.answered += 1
            return self.status


_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>"
)
_UNAVAILABLE = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def start_proxy(upstream: str, faults: Faults) -> tuple[str, Callable[[], None]]:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that applies ``faults``; returns its
    URL and a function that stops it."""
    host, port = upstream.removeprefix("http://").split(":")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the tests say what they expect

        def do_GET(self) -> None:
            self._forward()

        def do_HEAD(self) -> None:
            self._forward()

        def _forward(self) -> None:
            with faults.lock:
                faults.seen.append((self.command, self.path, self.headers.get("Range", "")))
                faults.peers.append((self.path, self.client_address[:2]))
                if "If-Match" in self.headers:
                    faults.if_match.append(self.headers["If-Match"])
            status = faults.answer(self.path, "Range" in self.headers)
            if faults.deny or (faults.deny_listing and "list-type=" in self.path):
                status = 403
            if status:
                body = _DENIED if status == 403 else _UNAVAILABLE
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                return
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            connection.request(self.command, self.path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            connection.close()
            drop = faults.should_drop(self.path, "range" in {k.lower() for k in headers})
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("connection", "transfer-encoding", "server", "date"):
                    self.send_header(key, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            if drop:
                self.wfile.write(body[: faults.drop_after])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return f"http://127.0.0.1:{server.server_address[1]}", stop


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard environment an S3 client reads, pointing at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }


@contextmanager
def moto_s3(bucket: str) -> Iterator[tuple[str, Any]]:
    """A moto S3 server on 127.0.0.1 holding an empty ``bucket``: its endpoint and a boto3
    client for it; stopped on exit."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = s3_env(endpoint)
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        )
        client.create_bucket(Bucket=bucket)
        yield endpoint, client
    finally:
        server.stop()


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def files_under(directory: Path) -> Iterator[Path]:
    """Every file below ``directory``, for "nothing partial left" checks."""
    for root, _, names in os.walk(directory):
        for name in names:
            yield Path(root, name)
