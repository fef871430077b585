"""Object-store checkpoints (``s3://``, ``gs://``, ``az://``) through obstore.

What is requested, and how (a request costs a round trip, so set-up issues as few as it can and
runs them side by side):

- the index and ``config.json`` by GET, at once; a listing of the prefix only when there is no
  index (a single-file checkpoint is found by name), so a sharded checkpoint needs no
  ``ListBucket`` permission;
- each shard's header by one speculative ranged GET of its first ``FIRST_READ`` bytes (the
  8-byte length and, nearly always, the whole header it announces), every shard at once as
  soon as the index names them; a longer header costs one more GET for the rest. That GET's
  response gives the object's size and ETag. Parsed and validated exactly like a local file's;
- tensor bytes by ranged GETs of one chunk each (``LoadParams.chunk_bytes``, from the engine's
  reader lanes and staged reads, so as many are in flight as for local files), received
  straight into the destination memory the engine hands over (the staging slot or the CPU
  tensor). On S3 through presigned URLs (``_signed``: the body goes from the socket into the
  destination, one copy); on GCS and Azure, or behind a proxy, collected by obstore outside
  the interpreter lock and copied once into it. Nothing is written to disk. A host
  destination's pages are faulted in while the response is on its way.

Every ranged GET of tensor bytes carries ``If-Match`` with the ETag the header read returned,
so an object that is overwritten during the load fails its next read (``ObjectChangedError``)
instead of mixing two versions. A read whose connection drops is requested again from the byte
it reached, at most ``RESUMES`` times (obstore's GETs: obstore's own retries, then at most
``RANGE_RETRIES`` more requests of the range), then fails naming the object and the offset.

Credentials and endpoints come from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, and the
``GOOGLE_*``/``AZURE_*`` equivalents, read by obstore) and ``LoadParams.storage_options``. Plain
http is allowed only when the endpoint itself is configured as an ``http://`` URL.
``connect_timeout`` bounds both a connection attempt and obstore's retrying of it, so an endpoint
that refuses connections fails within it.
"""

from __future__ import annotations

import base64
import http.client
import os
import struct
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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
from streamload.sources._signed import SignedRanges, SignedStatus

__all__ = [
    "FIRST_READ",
    "RANGE_RETRIES",
    "RESUMES",
    "SCHEMES",
    "ObjectFiles",
    "ObjectStoreCheckpoint",
    "is_url",
    "open_url",
]

_T = TypeVar("_T")

SCHEMES = ("s3://", "gs://", "az://")
RANGE_RETRIES = 2  # further requests of the rest of a range after obstore gave up on one
# Requests of the rest of a range a presigned read makes after a failure (it has no other
# retries: obstore's own are not in its path); with backoff, about 3 s of retrying in all.
RESUMES = 5
_HEADER_WORKERS = 16  # shards whose headers are fetched at once
FIRST_READ = 1 << 16  # the first read of a shard: its prefix and, nearly always, its header
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
    """Read ``url``'s index, config and headers (blocking; the requests run side by side).
    ``verify``: also ask the store for each shard's recorded sha256 (a HEAD per shard, S3
    only)."""
    base = url.rstrip("/")
    given = None
    if base.endswith((".safetensors", ".index.json")):
        base, _, given = base.rpartition("/")
    store = _store(base, storage_options, connect_timeout)
    files = ObjectFiles(base, store, SignedRanges.for_store(base, store, connect_timeout))
    root = Path(base)
    with ThreadPoolExecutor(_HEADER_WORKERS) as pool:
        config = pool.submit(files.fetch, _CONFIG_NAME)
        index_name = given or INDEX_NAME
        raw = files.fetch(index_name) if index_name.endswith(".index.json") else None
        if raw is None and given is not None and given.endswith(".index.json"):
            raise CheckpointError(root / given, "no such object")
        if raw is not None:
            index = root / index_name
            weight_map, shard_names = parse_index(raw, index)
            headers = files.headers(pool, shard_names, missing=MissingShardError)
            checkpoint = checked_checkpoint(root, index, weight_map, shard_names, headers)
        else:
            name = given or _single_name(base, files.listing())
            (header,) = files.headers(pool, [name], missing=CheckpointError)
            checkpoint = Checkpoint(root, (header,), {e.name: e for e in header.tensors})
        if verify:
            files.ask_checksums(pool, [shard.path for shard in checkpoint.shards], connect_timeout)
        found = config.result()
    return ObjectStoreCheckpoint(checkpoint, _config(found, root / _CONFIG_NAME), files)


class ObjectFiles:
    """Byte access to one prefix's objects for the engine's reader threads (thread-safe:
    obstore's store is shared, each call is its own request)."""

    local = False

    def __init__(self, base: str, store: Any, signed: SignedRanges | None = None) -> None:
        self._base = base
        self._store = store
        self._signed = signed  # tensor bytes straight into the destination (S3)
        self._objects: dict[Path, _Object] = {}  # each shard, from its header read
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

    def fetch(self, name: str) -> bytes | None:
        """A whole small object under the prefix (index, config); ``None`` if there is none."""
        import obstore
        from obstore import exceptions

        try:
            return bytes(obstore.get(self._store, name).bytes())
        except FileNotFoundError:  # obstore's "not found"
            return None
        except exceptions.BaseError as exc:
            raise _request_error(f"{self._base}/{name}", exc) from exc

    def listing(self) -> dict[str, _Object]:
        """The objects directly under the prefix, by name (``_list``)."""
        return _list(self._store, self._base)

    def read(
        self,
        path: Path,
        views: list[memoryview],
        offset: int,
        tensor: str,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        """Fill ``views`` with the object's bytes from ``offset``: one ranged GET, received
        straight into them (``_read_signed``, S3) or collected by obstore and copied once into
        them (``_read_collected``). ``prepare`` runs once, when the request is first answered, while
        its body arrives (the engine faults in the destination's pages there)."""
        obj = self._object(path, CheckpointError)
        pending = [v for v in views if v.nbytes]
        left = [prepare] if prepare is not None else []

        def once() -> None:
            while left:
                left.pop()()

        signed = self._signed
        if signed and self._read_signed(signed, path, obj, pending, offset, tensor, once):
            return
        self._read_collected(path, obj, pending, offset, tensor, once)

    def _read_collected(
        self,
        path: Path,
        obj: _Object,
        views: list[memoryview],
        offset: int,
        tensor: str,
        prepare: Callable[[], None],
    ) -> None:
        """Fill ``views`` from one ranged GET collected by obstore (``_retried``)."""
        end = offset + sum(v.nbytes for v in views)
        data = self._retried(
            path, tensor, offset, end, lambda: self._get(path, obj, offset, end, prepare)
        )
        _fill(views, data)

    def _retried(
        self,
        path: Path,
        what: str,
        start: int,
        end: int,
        attempt: Callable[[], _T],
        *,
        limit: int = RANGE_RETRIES,
        reached: Callable[[], int] | None = None,
    ) -> _T:
        """``attempt()``, made again with backoff after a failed request, a dropped connection
        or a short body, at most ``limit`` times, then a ``SourceError`` naming the object and
        the byte the range had ``reached`` (its start when not given). An access denial fails
        at once: asking again won't help. An obstore GET has retried itself already, and is
        requested whole again (it is one chunk); a presigned one resumes (``_read_signed``)."""
        from obstore import exceptions

        failures = 0
        while True:
            try:
                return attempt()
            except (exceptions.PermissionDeniedError, exceptions.UnauthenticatedError) as exc:
                raise _request_error(location(path), exc) from exc
            except (exceptions.BaseError, OSError, http.client.HTTPException) as exc:
                failures += 1
                if failures > limit:
                    at = start if reached is None else reached()
                    raise SourceError(
                        location(path),
                        f"reading {what!r} failed at byte {at} (range {start}-{end}) after "
                        f"{failures} attempts: {_first_line(exc)}",
                    ) from exc
                time.sleep(0.05 * 2**failures)

    def _read_signed(
        self,
        signed: SignedRanges,
        path: Path,
        obj: _Object,
        views: list[memoryview],
        offset: int,
        tensor: str,
        prepare: Callable[[], None],
    ) -> bool:
        """``signed.read`` into ``views`` (``_retried``, ``RESUMES`` times, each request asking
        for the rest from the byte the body reached). A 5xx or 429 is asked again; an answer
        that cannot change on asking again fails at once: the object changed (412) or is gone
        (404), another client error (4xx). False when the store refused the presigned request
        (401, 403): the caller reads through obstore instead, from then on."""
        progress = [0]

        def attempt() -> bool:
            try:
                signed.read(obj.key, obj.etag, views, offset, progress, prepare)
            except SignedStatus as exc:
                if exc.status in (401, 403):
                    # Refused: a request obstore makes may still be allowed (settings that add
                    # headers to every request, such as requester-pays or customer keys).
                    # obstore reads it, and the rest of the load, or fails as it would.
                    self._signed = None
                    signed.close()
                    return False
                if exc.status == 412:
                    raise _changed(path, obj) from exc
                if exc.status == 404:
                    raise _deleted(path) from exc
                if exc.status < 500 and exc.status != 429:
                    raise SourceError(location(path), f"cannot read {tensor!r}: {exc}") from exc
                raise OSError(str(exc)) from exc  # the store is busy: ask again
            return True

        end = offset + sum(v.nbytes for v in views)
        return self._retried(
            path, tensor, offset, end, attempt, limit=RESUMES, reached=lambda: offset + progress[0]
        )

    def close(self) -> None:
        self._heads.clear()
        if self._signed is not None:
            self._signed.close()

    def headers(
        self, pool: ThreadPoolExecutor, names: list[str], *, missing: type[CheckpointError]
    ) -> list[ShardHeader]:
        """Fetch and parse the headers of the objects ``names`` (all at once), in order."""
        futures = [pool.submit(self._header, name, missing) for name in names]
        return [future.result() for future in futures]

    def ask_checksums(self, pool: ThreadPoolExecutor, paths: list[Path], timeout: float) -> None:
        """Record each object's ``x-amz-checksum-sha256`` (hex), ``None`` where the store keeps
        none or is not S3. A HEAD through a presigned URL (obstore does not return the header),
        all at once."""
        s3 = self._base.startswith("s3://")
        found = pool.map(lambda path: self._s3_sha256(path, timeout) if s3 else None, paths)
        self.checksums.update(zip(paths, found, strict=True))

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

    def _header(self, name: str, missing: type[CheckpointError]) -> ShardHeader:
        """One shard's header: a speculative GET of its first ``FIRST_READ`` bytes (which also
        gives its size and ETag), then the rest of a header longer than that."""
        path = Path(f"{self._base}/{name}")
        data, obj = self._first_read(path, name, missing)
        self._objects[path] = obj
        if len(data) >= 8:
            (length,) = struct.unpack_from("<Q", data)
            end = 8 + length
            if length <= MAX_HEADER_BYTES and len(data) < end <= obj.size:
                data += self._range(path, len(data), end)
            data = data[: max(8, min(end, len(data)))]
        self._heads[path] = data
        return parse_header(data, path=path, file_size=obj.size)

    def _first_read(
        self, path: Path, name: str, missing: type[CheckpointError]
    ) -> tuple[bytes, _Object]:
        """The first ``FIRST_READ`` bytes of ``name`` (all of a shorter object) and what the
        response says of it; an empty object, which has no range, by a HEAD."""
        import obstore
        from obstore import exceptions

        def attempt() -> tuple[bytes, _Object]:
            try:
                result = obstore.get(self._store, name, options={"range": (0, FIRST_READ)})
                meta, data = result.meta, bytes(result.bytes())
            except FileNotFoundError as exc:  # obstore's "not found"
                raise missing(path, "no such object") from exc
            except (exceptions.PermissionDeniedError, exceptions.UnauthenticatedError) as exc:
                raise _request_error(location(path), exc) from exc
            except exceptions.BaseError as exc:
                if " 416 " not in str(exc):  # not an empty object (no range of it exists)
                    raise
                meta, data = obstore.head(self._store, name), b""
            return data, _Object(name, meta["size"], meta["e_tag"])

        return self._retried(path, "header", 0, FIRST_READ, attempt)

    def _get(
        self, path: Path, obj: _Object, start: int, end: int, prepare: Callable[[], None]
    ) -> Any:
        """Bytes ``[start, end)`` of ``obj`` as obstore's buffer (one attempt; ``prepare``
        between the answer and the body)."""
        import obstore
        from obstore import exceptions

        try:
            result = obstore.get(self._store, obj.key, options=self._options(obj, start, end))
            prepare()
            data = result.bytes()
        except exceptions.PreconditionError as exc:
            raise _changed(path, obj) from exc
        except FileNotFoundError as exc:  # obstore's "not found"
            raise _deleted(path) from exc
        if len(data) != end - start:
            raise OSError(f"the response held {len(data)} bytes, not {end - start}")
        return data

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
        """Bytes ``[start, end)`` of a small range (the rest of a long header), by obstore:
        planning opens no connection of its own that a plan would have to close."""
        buffer = bytearray(end - start)
        view = memoryview(buffer)
        try:
            self._read_collected(
                path, self._object(path, CheckpointError), [view], start, "header", lambda: None
            )
        finally:
            view.release()
        return bytes(buffer)


def _changed(path: Path, obj: _Object) -> ObjectChangedError:
    """A ranged GET's ``If-Match`` failed: the object was overwritten since its header read."""
    return ObjectChangedError(
        location(path), f"its ETag is no longer {obj.etag}: it changed while being read"
    )


def _deleted(path: Path) -> ObjectChangedError:
    return ObjectChangedError(location(path), "it was deleted while being read")


def _fill(views: list[memoryview], data: Any) -> None:
    """Copy ``data`` (exactly their bytes) into ``views``, one after another."""
    source = memoryview(data).cast("B")
    at = 0
    try:
        for view in views:
            view[:] = source[at : at + view.nbytes]
            at += view.nbytes
    finally:
        source.release()


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
    except exceptions.BaseError as exc:
        raise _request_error(base, exc, "cannot list") from exc
    objects = {
        meta["path"].rpartition("/")[2]: _Object(meta["path"], meta["size"], meta["e_tag"])
        for meta in listing["objects"]
    }
    if not objects:
        raise SourceError(base, "no objects under this prefix")
    return objects


def _request_error(where: str, exc: Exception, doing: str = "cannot read") -> StreamloadError:
    """A failed request as a ``SourceError`` naming ``where`` (the prefix or the object):
    a missing bucket, an access denial, an unreachable endpoint, anything else."""
    from obstore import exceptions

    text = str(exc)
    if "NoSuchBucket" in text:
        return SourceError(where, "no such bucket")
    denied = (exceptions.PermissionDeniedError, exceptions.UnauthenticatedError)
    if isinstance(exc, denied) or "AccessDenied" in text or " 403 " in text:
        return SourceError(where, f"access denied: {_first_line(exc)}")
    if "error sending request" in text or "connect" in text.lower() or "timed out" in text:
        return SourceUnreachableError(where, f"the endpoint cannot be reached: {_first_line(exc)}")
    return SourceError(where, f"{doing}: {_first_line(exc)}")


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


def _config(raw: bytes | None, path: Path) -> Mapping[str, Any]:
    import json

    if raw is None:
        raise ConfigError(path, "not found (a checkpoint needs its config.json)")
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
