"""``moto_server`` whose ranged GETs read only the range asked for.

    python -m benchmarks.ranged_moto -H 127.0.0.1 -p PORT

moto serves a ranged GET by reading the whole object and slicing it, so on this server a
64 KiB read of a 16 MiB object costs what reading all 16 MiB does. Object stores (S3, MinIO,
GCS) serve a range at the cost of its bytes. This wrapper changes only that: for a GET with one
``bytes=FIRST-LAST`` range, the object's value handed to moto's range handling reads just
``[FIRST, LAST]`` from moto's own buffer; everything else (routing, signatures, ETags,
``If-Match``, the response headers, the ``Content-Range``) is moto's. The benchmark runs both
contenders against one server, so whichever server it runs, both pay the same for a request.
"""

from __future__ import annotations

import contextvars
import re
import sys
from typing import Any

from moto.s3 import models, responses

_RANGE: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "range", default=None
)
_SIMPLE = re.compile(r"bytes=(\d+)-(\d+)$")


class _Ranged:
    """The object's value as moto's range handling uses it: its length (the object's size)
    and one slice, ``[first:last + 1]``, read from the key's buffer."""

    def __init__(self, key: Any) -> None:
        self._key = key
        self._size = key.size

    def __len__(self) -> int:
        return int(self._size)

    def __bool__(self) -> bool:
        return bool(self._size)

    def __getitem__(self, part: slice) -> bytes:
        start, stop = part.start or 0, min(part.stop, self._size)
        with self._key.lock:
            self._key._value_buffer.seek(start)
            data: bytes = self._key._value_buffer.read(max(0, stop - start))
        return data


def _install() -> None:
    whole = models.FakeKey.value

    def value(key: Any) -> Any:
        asked = _RANGE.get()
        if asked is not None and asked[0] < key.size:
            return _Ranged(key)
        return whole.fget(key)  # type: ignore[attr-defined]

    models.FakeKey.value = property(value, whole.fset)  # type: ignore[attr-defined,method-assign,assignment]
    respond = responses.S3Response.key_response

    def key_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
        simple = None
        if request.method == "GET":
            simple = _SIMPLE.match(request.headers.get("range", ""))
        token = _RANGE.set((int(simple[1]), int(simple[2])) if simple else None)
        try:
            return respond(self, request, full_url, headers)
        finally:
            _RANGE.reset(token)

    responses.S3Response.key_response = key_response  # type: ignore[method-assign]


if __name__ == "__main__":
    _install()
    from moto.server import main

    main(sys.argv[1:])
