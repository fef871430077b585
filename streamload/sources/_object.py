"""Object-store checkpoints (``s3://``, ``gs://``, ``az://``) through obstore.

What is requested, and how:

- one listing of the prefix (names, sizes, ETags), then the index and ``config.json`` by GET;
- each shard's header by ranged GETs: the first ``FIRST_READ`` bytes (the 8-byte length and,
  for almost every shard, the whole header it announces), then the rest of a longer header
  (several shards at once); parsed and validated exactly like a local file's. A request costs
  a round trip, so one speculative read replaces the exact 8 bytes a first read would take;

- tensor bytes by ranged GETs of one chunk each (``LoadParams.chunk_bytes``, from the engine's
  reader lanes and staged reads, so as many are in flight as for local files), streamed
  straight into the destination memory the engine hands over: the staging slot or the CPU
  tensor. Nothing is written to disk.

Every ranged GET carries ``If-Match`` with the ETag the listing returned, so an object that is
overwritten during the load fails its next read (``ObjectChangedError``) instead of mixing two
versions. A read whose connection drops mid-range is resumed from the last byte received, at
most ``RANGE_RETRIES`` times, then fails naming the object and the offset.

Credentials and endpoints come from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, and the
``GOOGLE_*``/``AZURE_*`` equivalents, read by obstore) and ``LoadParams.storage_options``. Plain
http is allowed only when the endpoint itself is configured as an ``http://`` URL.
``connect_timeout`` bounds both a connection attempt and obstore's retrying of it, so an endpoint
that refuses connections fails within it.
"""

from __future__ import annotations

import base64
import os
import struct
import time
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from obstore import GetOptions

from streamload.checkpoint import (
    INDEX_NAME,
    MAX_HEADER_BYTES,
    Checkpoint,
    ShardHeader,
    checked_checkpoint,
    parse_header,
    parse_index,
)
from streamload.errors import (
    CheckpointError,
    ConfigError,
    MissingShardError,
    ObjectChangedError,
    SourceError,
    SourceUnreachableError,
    StreamloadError,
    location,
)

__all__ = [
    "FIRST_READ",
    "RANGE_RETRIES",
    "SCHEMES",
    "ObjectFiles",
    "ObjectStoreCheckpoint",
    "is_url",
    "open_url",
]

SCHEMES = ("s3://", "gs://", "az://")
RANGE_RETRIES = 2  # further requests of the rest of a range after obstore gave up on one
_HEADER_WORKERS = 16  # shards whose headers are fetched at once
FIRST_READ = 1 << 16  # the first read of a shard: its prefix and, nearly always, its header
_STREAM_PIECE = 1 << 20  # bytes obstore collects before handing a piece of a range over
_CONFIG_NAME = "config.json"


def is_url(text: str) -> bool:
    """Whether ``text`` names an object-store location streamload reads."""
    return text.startswith(SCHEMES)


@dataclass(frozen=True, slots=True)
class _Object:
    key: str  # relative to the store's prefix
    size: int
    etag: str | None


@dataclass(frozen=True, slots=True)
class ObjectStoreCheckpoint:
    """What planning learnt of an object-store checkpoint: the parsed checkpoint, its config,
    and a way to read its bytes (``files``)."""

    checkpoint: Checkpoint
    config: Mapping[str, Any]
    files: ObjectFiles


def open_url(
    url: str, storage_options: Mapping[str, str], connect_timeout: float, verify: bool
) -> ObjectStoreCheckpoint:
    """List ``url``'s prefix, read its index, config and headers (blocking). ``verify``: also
    ask the store for each shard's recorded sha256 (a HEAD per shard, S3 only)."""
    base = url.rstrip("/")
    given = None
    if base.endswith((".safetensors", ".index.json")):
        base, _, given = base.rpartition("/")
    store = _store(base, storage_options, connect_timeout)
    listing = _list(store, base)
    files = ObjectFiles(base, store, listing)
    name = given or (INDEX_NAME if INDEX_NAME in listing else _single_name(base, listing))
    root = Path(base)
    if name.endswith(".index.json"):
        index = root / name
        weight_map, shard_names = parse_index(files.get(index), index)
        headers = files.headers([root / shard for shard in shard_names], missing=MissingShardError)
        checkpoint = checked_checkpoint(root, index, weight_map, shard_names, headers)
    else:
        (header,) = files.headers([root / name], missing=CheckpointError)
        checkpoint = Checkpoint(root, (header,), {e.name: e for e in header.tensors})
    config = _config(files, root / _CONFIG_NAME)
    if verify:
        files.ask_checksums([shard.path for shard in checkpoint.shards], connect_timeout)
    return ObjectStoreCheckpoint(checkpoint, config, files)


class ObjectFiles:
    """Byte access to one prefix's objects for the engine's reader threads (thread-safe:
    obstore's store is shared, each call is its own request)."""

    local = False

    def __init__(self, base: str, store: Any, listing: Mapping[str, _Object]) -> None:
        self._base = base
        self._store = store
        self._objects = {Path(f"{base}/{name}"): obj for name, obj in listing.items()}
        self._heads: dict[Path, bytes] = {}
        self.checksums: dict[Path, str | None] = {}

    def fd(self, path: Path) -> int:
        raise CheckpointError(path, "an object has no file descriptor (it is read by range)")

    def head(self, path: Path, nbytes: int) -> bytes:
        """The first ``nbytes`` (the prefix and header, fetched while planning)."""
        data = self._heads.get(path)
        return (
            data[:nbytes]
            if data is not None and len(data) >= nbytes
            else self._range(path, 0, nbytes)
        )

    def get(self, path: Path) -> bytes:
        """A whole small object (index, config)."""
        obj = self._object(path, CheckpointError)
        return self._range(path, 0, obj.size) if obj.size else b""

    def read(self, path: Path, views: list[memoryview], offset: int, tensor: str) -> None:
        """Fill ``views`` with the object's bytes from ``offset`` (one ranged GET, streamed into
        them; resumed after a dropped connection up to ``RANGE_RETRIES`` times)."""
        import obstore
        from obstore import exceptions

        obj = self._object(path, CheckpointError)
        sink = _Sink([v for v in views if v.nbytes])
        end = offset + sink.nbytes
        pos, failures = offset, 0
        while pos < end:
            try:
                result = obstore.get(self._store, obj.key, options=self._options(obj, pos, end))
                for piece in result.stream(min_chunk_size=_STREAM_PIECE):
                    pos += sink.write(piece)
                if pos < end:
                    raise OSError(f"the response ended {end - pos} bytes short")
            except exceptions.PreconditionError as exc:
                raise ObjectChangedError(
                    location(path), f"its ETag is no longer {obj.etag}: it changed while being read"
                ) from exc
            except exceptions.NotFoundError as exc:
                raise ObjectChangedError(location(path), "it was deleted while being read") from exc
            except (exceptions.BaseError, OSError) as exc:
                failures += 1
                if failures > RANGE_RETRIES:
                    raise SourceError(
                        location(path),
                        f"reading {tensor!r} failed at byte {pos} (range {offset}-{end}) after "
                        f"{failures} attempts: {_first_line(exc)}",
                    ) from exc
                time.sleep(0.05 * 2**failures)

    def close(self) -> None:
        self._heads.clear()

    def headers(self, paths: list[Path], *, missing: type[CheckpointError]) -> list[ShardHeader]:
        """Fetch and parse the headers of ``paths`` (several at once), in order."""
        for path in paths:
            self._object(path, missing)
        with ThreadPoolExecutor(min(_HEADER_WORKERS, len(paths))) as pool:
            return list(pool.map(self._header, paths))

    def ask_checksums(self, paths: list[Path], timeout: float) -> None:
        """Record each object's ``x-amz-checksum-sha256`` (hex), ``None`` where the store keeps
        none or is not S3. A HEAD through a presigned URL: obstore does not return the header."""
        for path in paths:
            self.checksums[path] = None
            if self._base.startswith("s3://"):
                self.checksums[path] = self._s3_sha256(path, timeout)

    def _s3_sha256(self, path: Path, timeout: float) -> str | None:
        import obstore

        obj = self._object(path, CheckpointError)
        try:
            url = obstore.sign(self._store, "HEAD", obj.key, timedelta(minutes=5))
            request = urllib.request.Request(
                url, method="HEAD", headers={"x-amz-checksum-mode": "ENABLED"}
            )
            with urllib.request.urlopen(request, timeout=timeout) as response:
                value = response.headers.get("x-amz-checksum-sha256")
                kind = response.headers.get("x-amz-checksum-type", "FULL_OBJECT")
        except Exception:  # no signing credentials, or no answer: the file stays unverified
            return None
        if not value or "-" in value or kind != "FULL_OBJECT":  # multipart: not the file's hash
            return None
        return base64.b64decode(value).hex()

    def _header(self, path: Path) -> ShardHeader:
        obj = self._object(path, CheckpointError)
        data = self._range(path, 0, min(FIRST_READ, obj.size)) if obj.size else b""
        if len(data) >= 8:
            (length,) = struct.unpack_from("<Q", data)
            end = 8 + length
            if length <= MAX_HEADER_BYTES and len(data) < end <= obj.size:
                data += self._range(path, len(data), end)
            data = data[: max(8, min(end, len(data)))]
        self._heads[path] = data
        return parse_header(data, path=path, file_size=obj.size)

    def _object(self, path: Path, missing: type[CheckpointError]) -> _Object:
        obj = self._objects.get(path)
        if obj is None:
            raise missing(path, "no such object")
        return obj

    def _options(self, obj: _Object, start: int, end: int) -> GetOptions:
        options: GetOptions = {"range": (start, end)}
        if obj.etag:
            options["if_match"] = obj.etag
        return options

    def _range(self, path: Path, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a small range (prefix, header, index, config)."""
        buffer = bytearray(end - start)
        view = memoryview(buffer)
        try:
            self.read(path, [view], start, "header")
        finally:
            view.release()
        return bytes(buffer)


class _Sink:
    """Writes a stream of pieces into ``views`` one after another (one copy per byte)."""

    def __init__(self, views: list[memoryview]) -> None:
        self._views = views
        self._at = 0  # bytes of views[0] already written
        self.nbytes = sum(v.nbytes for v in views)

    def write(self, piece: Any) -> int:
        data = memoryview(piece).cast("B")
        written = 0
        while written < len(data) and self._views:
            view = self._views[0]
            take = min(view.nbytes - self._at, len(data) - written)
            view[self._at : self._at + take] = data[written : written + take]
            written += take
            self._at += take
            if self._at == view.nbytes:
                self._views.pop(0)
                self._at = 0
        if written < len(data):
            raise OSError(f"the response sent {len(data) - written} bytes more than asked for")
        return written


def _store(base: str, options: Mapping[str, str], connect_timeout: float) -> Any:
    """The obstore store for ``base``: the URL's bucket and prefix, the environment's
    credentials and endpoint, ``options`` over them."""
    try:
        from obstore.exceptions import BaseError
        from obstore.store import from_url
    except ImportError as exc:
        raise SourceError(base, "object stores need obstore: pip install 'streamload[s3]'") from exc

    endpoint = (
        options.get("endpoint")
        or options.get("aws_endpoint")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or ""
    )
    seconds = timedelta(seconds=connect_timeout)
    client: dict[str, Any] = {"connect_timeout": seconds}
    if base.startswith("s3://") and endpoint.startswith("http://"):
        client["allow_http"] = True  # an endpoint configured as plain http, explicitly
    retry = {
        "max_retries": 3,
        "retry_timeout": seconds,
        "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": seconds},
    }
    # The config's keys depend on the scheme (S3, GCS, Azure): obstore checks them.
    build: Any = from_url
    try:
        return build(base, config=dict(options) or None, client_options=client, retry_config=retry)
    except (BaseError, ValueError) as exc:
        raise SourceError(base, f"cannot configure the store: {_first_line(exc)}") from exc


def _list(store: Any, base: str) -> dict[str, _Object]:
    """The objects directly under the prefix, by name; a missing prefix, a missing bucket, an
    access denial and an unreachable endpoint are each a ``SourceError`` naming ``base``."""
    import obstore
    from obstore import exceptions

    try:
        listing = obstore.list_with_delimiter(store)
    except (exceptions.PermissionDeniedError, exceptions.UnauthenticatedError) as exc:
        raise SourceError(base, f"access denied: {_first_line(exc)}") from exc
    except exceptions.BaseError as exc:
        raise _listing_error(base, exc) from exc
    objects = {
        meta["path"].rpartition("/")[2]: _Object(meta["path"], meta["size"], meta["e_tag"])
        for meta in listing["objects"]
    }
    if not objects:
        raise SourceError(base, "no objects under this prefix")
    return objects


def _listing_error(base: str, exc: Exception) -> StreamloadError:
    text = str(exc)
    if "NoSuchBucket" in text:
        return SourceError(base, "no such bucket")
    if "AccessDenied" in text or " 403 " in text:
        return SourceError(base, f"access denied: {_first_line(exc)}")
    if "error sending request" in text or "connect" in text.lower() or "timed out" in text:
        return SourceUnreachableError(base, f"the endpoint cannot be reached: {_first_line(exc)}")
    return SourceError(base, f"cannot list: {_first_line(exc)}")


def _single_name(base: str, listing: Mapping[str, _Object]) -> str:
    names = sorted(name for name in listing if name.endswith(".safetensors"))
    if "model.safetensors" in names:
        return "model.safetensors"
    if len(names) == 1:
        return names[0]
    if not names:
        raise CheckpointError(base, f"holds no *.safetensors object and no {INDEX_NAME}")
    raise CheckpointError(
        base, f"holds {len(names)} *.safetensors objects ({', '.join(names)}) but no {INDEX_NAME}"
    )


def _config(files: ObjectFiles, path: Path) -> Mapping[str, Any]:
    import json

    try:
        raw = files.get(path)
    except CheckpointError as exc:
        raise ConfigError(path, "not found (a checkpoint needs its config.json)") from exc
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(path, f"is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(path, f"must hold a JSON object, got {type(config).__name__}")
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
