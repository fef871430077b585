"""Ranged GETs of S3 objects received straight into the engine's memory.

obstore collects a response body into a buffer of its own, which the engine then copies into
the destination: every byte is copied twice and lands first in fresh memory the size of a
chunk. So tensor bytes of an ``s3://`` object are requested through a URL obstore presigns
(SigV4 query authentication, valid for ``SIGNED_FOR``, signed again after ``RESIGN_AFTER`` so a
long load never meets an expired one), with ``Range`` and ``If-Match`` as unsigned headers,
over keep-alive ``http.client`` connections; the body is received with ``recv_into`` directly
into the destination views (the staging slot or the CPU tensor), outside the interpreter lock:
one copy, from the socket to where the bytes belong.

A body is received in steps of ``STEP`` bytes and the bytes received so far are counted in the
caller's ``progress``, so a connection that drops mid-body is resumed where it stopped (the
caller decides how often). A connection is reused only after its response was read to the end.

Used only where this is the same request obstore would make: S3, and no proxy configured for
the endpoint (``http.client`` does not speak to proxies); elsewhere obstore's GET is used.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["RESIGN_AFTER", "SIGNED_FOR", "STEP", "SignedRanges", "SignedStatus"]

SIGNED_FOR = timedelta(minutes=30)
RESIGN_AFTER = 600.0  # seconds: well inside SIGNED_FOR, and inside a session token's life
STEP = 1 << 22  # bytes received per call: what a dropped connection can cost to receive again

_Key = tuple[str, str, int]  # scheme, host, port


class SignedStatus(Exception):
    """The store answered a ranged GET with ``status`` instead of 206 (``text``: the start of
    its body, which names the S3 error code)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text}" if text else f"HTTP {status}")
        self.status = status
        self.text = text


class SignedRanges:
    """Presigned ranged GETs of one store's objects (thread-safe: each call takes a connection
    of its own from the idle ones, or opens one)."""

    def __init__(self, store: Any, timeout: float) -> None:
        self._store = store
        self._timeout = timeout
        self._lock = threading.Lock()
        self._urls: dict[str, tuple[float, urllib.parse.SplitResult]] = {}
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}
        self._context: ssl.SSLContext | None = None
        self._closed = False

    @classmethod
    def for_store(cls, base: str, store: Any, timeout: float) -> SignedRanges | None:
        """The signed reader for ``base``'s store, or ``None`` where obstore must make the
        requests: not S3, no credentials to sign with, or a proxy configured for the
        endpoint."""
        if not base.startswith("s3://"):
            return None
        ranges = cls(store, timeout)
        try:
            url = ranges._sign("probe")  # signing is local: a failure means it cannot sign
        except Exception:
            return None
        host = url.hostname or ""
        proxies = urllib.request.getproxies()  # *_proxy from the environment, as obstore's
        proxied = url.scheme in proxies or "all" in proxies
        if proxied and not urllib.request.proxy_bypass(host):
            return None
        return ranges

    def read(
        self,
        key: str,
        etag: str | None,
        views: list[memoryview],
        start: int,
        progress: list[int],
        prepare: Callable[[], None],
    ) -> None:
        """Receive bytes ``start + progress[0]`` on of object ``key`` into ``views`` (filled one
        after another; ``progress[0]`` of their bytes are filled already), counting each step
        in ``progress[0]``. ``prepare`` runs once the store has answered. Raises
        ``SignedStatus`` for an answer other than 206, ``OSError`` or
        ``http.client.HTTPException`` when the connection fails."""
        total = sum(view.nbytes for view in views)
        url = self._url(key)
        first = start + progress[0]
        headers = {"Range": f"bytes={first}-{start + total - 1}"}
        if etag:
            headers["If-Match"] = etag
        connection = self._connection(url)
        done = False
        try:
            connection.request("GET", f"{url.path}?{url.query}", headers=headers)
            response = connection.getresponse()
            if response.status != http.client.PARTIAL_CONTENT:
                text = response.read(4096).decode("utf-8", "replace")
                raise SignedStatus(response.status, _code(text))
            asked = start + total - first
            if response.length != asked:
                raise OSError(f"the response holds {response.length} bytes, not {asked}")
            prepare()
            _receive(response, views, progress)
            done = response.isclosed() and not response.will_close
        finally:
            if done:
                self._give_back(url, connection)
            else:
                connection.close()

    def close(self) -> None:
        """Close the idle connections (one in use is closed when its read ends)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def _url(self, key: str) -> urllib.parse.SplitResult:
        now = time.monotonic()
        with self._lock:
            known = self._urls.get(key)
        if known is not None and now - known[0] < RESIGN_AFTER:
            return known[1]
        url = self._sign(key)
        with self._lock:
            self._urls[key] = (now, url)
        return url

    def _sign(self, key: str) -> urllib.parse.SplitResult:
        import obstore

        return urllib.parse.urlsplit(obstore.sign(self._store, "GET", key, SIGNED_FOR))

    def _connection(self, url: urllib.parse.SplitResult) -> http.client.HTTPConnection:
        key = _key(url)
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop()
        host, port = key[1], key[2]
        if key[0] == "https":
            if self._context is None:
                self._context = ssl.create_default_context()
            return http.client.HTTPSConnection(
                host, port, timeout=self._timeout, context=self._context
            )
        return http.client.HTTPConnection(host, port, timeout=self._timeout)

    def _give_back(
        self, url: urllib.parse.SplitResult, connection: http.client.HTTPConnection
    ) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault(_key(url), []).append(connection)
                return
        connection.close()


def _receive(
    response: http.client.HTTPResponse, views: list[memoryview], progress: list[int]
) -> None:
    """Read the body into ``views`` from byte ``progress[0]`` of them, ``STEP`` at a time."""
    skip = progress[0]
    for view in views:
        if skip >= view.nbytes:
            skip -= view.nbytes
            continue
        at, skip = skip, 0
        while at < view.nbytes:
            got = response.readinto(view[at : min(view.nbytes, at + STEP)])
            if not got:
                raise http.client.IncompleteRead(b"", view.nbytes - at)
            at += got
            progress[0] += got


def _key(url: urllib.parse.SplitResult) -> _Key:
    scheme = url.scheme or "https"
    return scheme, url.hostname or "", url.port or (443 if scheme == "https" else 80)


def _code(text: str) -> str:
    """The ``<Code>`` and ``<Message>`` of an S3 error body, else its first line."""
    found = [
        text.partition(f"<{tag}>")[2].partition(f"</{tag}>")[0]
        for tag in ("Code", "Message")
        if f"<{tag}>" in text
    ]
    if found:
        return ": ".join(found)
    return text.strip().splitlines()[0][:200] if text.strip() else ""
