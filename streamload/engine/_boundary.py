"""The engine's one error boundary: foreign exceptions become ``StreamloadError`` here.

Errors met while a unit is read or placed are translated with that unit's context
(``translate``); whatever reaches the top of a load is reduced to the one error it stands for
(``single``: a real error before the cancellations it caused), stripped of the frames that
could keep device tensors alive (``scrub``) and mapped to what the caller sees (``failure``):
cancellation and other ``BaseException``s unchanged, ``StreamloadError`` as raised, anything
else a ``LoadError`` chained to it. A device's refusal that the load survives (a re-plan
follows) is scrubbed the same way where it is caught (``refusal``).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator

import anyio

from streamload.engine._units import Unit
from streamload.errors import LoadError, StreamloadError

__all__ = ["failure", "refusal", "scrub", "single", "translate"]


def scrub(exc: BaseException) -> None:
    """Clear the locals of finished frames in ``exc``'s tracebacks (chained and grouped ones
    too), so a caller holding the exception does not keep device tensors alive through them."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)


def refusal(exc: BaseException) -> str:
    """The first line of a device's refusal (``torch.OutOfMemoryError``), for the reason of the
    re-plan that follows, with ``exc`` scrubbed first: the tensors the refused allocation had
    already got are locals of the frames it passed through, and a reference cycle (the
    exception, those frames, the future it crossed threads in) would keep them on the device
    until the collector runs, so the retry would meet the device still holding them."""
    scrub(exc)
    text = str(exc)
    return text.splitlines()[0] if text else repr(exc)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def single(exc: BaseException) -> BaseException:
    """The one error an exception (group) stands for: a real error before cancellations."""
    leaves = list(_leaves(exc))
    cancelled = anyio.get_cancelled_exc_class()
    for leaf in leaves:
        if not isinstance(leaf, cancelled):
            return leaf
    return leaves[0] if leaves else exc


def translate(error: BaseException, unit: Unit, device: str) -> BaseException:
    """``error`` met reading or placing ``unit`` on ``device``, as a ``StreamloadError`` that
    names them (``StreamloadError`` and non-``Exception``s pass unchanged)."""
    if isinstance(error, StreamloadError) or not isinstance(error, Exception):
        return error
    if isinstance(error, OSError):
        path = error.filename or (unit.entries[0].path if unit.entries else None)
        return LoadError(
            f"reading {unit.where} failed: {error.strerror or error}",
            path=path,
            layer=unit.layer,
            device=device,
        )
    return LoadError(
        f"placing {unit.where} failed: {type(error).__name__}: {error}",
        layer=unit.layer,
        device=device,
    )


def failure(error: BaseException) -> BaseException:
    """What a load that stopped on ``error`` (already ``single``) raises: cancellation and
    other ``BaseException``s unchanged, a ``StreamloadError`` as it is, anything else a
    ``LoadError`` (the caller raises it ``from error``)."""
    if isinstance(error, anyio.get_cancelled_exc_class()) or not isinstance(error, Exception):
        return error
    if isinstance(error, StreamloadError):
        return error
    return LoadError(f"{type(error).__name__}: {error}")
