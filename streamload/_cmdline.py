"""What the command lines share: parsing at the edge, one argparse error style, the logging setup.

``streamload`` (``streamload.cli``) and ``python -m streamload.distributed`` take the same
``--device`` and size arguments, report a bad argument the same way (one line, exit status 2)
and configure logging alike. The library must not import the ``streamload.cli`` command, so
these live here and both commands import them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NoReturn

import structlog

__all__ = [
    "DeviceArg",
    "Parser",
    "UsageError",
    "arg_type",
    "configured_logging",
    "parse_device",
    "parse_size",
]

# --------------------------------------------------------------------------------------------
# Parsing at the edge: strings -> typed values


_UNITS: Mapping[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """A byte count from ``"24GiB"``, ``"24GB"``, ``"512MiB"``, ``"1.5TiB"`` or ``"4096"``.

    Units are case-insensitive: ``KB MB GB TB`` are powers of 1000, ``KiB MiB GiB TiB`` powers
    of 1024, ``B`` or none means bytes. A bare ``G`` or ``M`` is refused as ambiguous. The result
    must be a whole number of bytes; anything else raises ``ValueError``.
    """
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(
            f"bad size {text!r}: expected a number with an optional unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 24GiB"
        )
    value = Decimal(match.group(1)) * unit
    if value != value.to_integral_value():
        raise ValueError(f"bad size {text!r}: not a whole number of bytes")
    return int(value)


@dataclass(frozen=True, slots=True)
class DeviceArg:
    """One ``--device``: ``NAME=SIZE`` is a simulated GPU, a bare ``NAME`` a real device."""

    name: str
    total_bytes: int | None


def parse_device(text: str) -> DeviceArg:
    """``"sim:0=24GiB" -> DeviceArg("sim:0", 25769803776)``; ``"cuda:1" -> DeviceArg("cuda:1",
    None)``. The CPU is not a ``--device`` (see ``--cpu-memory`` and ``--no-cpu``)."""
    name, sep, size = text.partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"bad device {text!r}: expected NAME=SIZE, e.g. sim:0=24GiB")
    if name == "cpu":
        raise ValueError("the CPU is always used last: size it with --cpu-memory, drop it --no-cpu")
    return DeviceArg(name, parse_size(size) if sep else None)


def arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` whose ``ValueError`` message is shown as it is."""

    @functools.wraps(parse)
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


# --------------------------------------------------------------------------------------------
# One argparse error style: a bad command line is one line, never usage text and SystemExit


class UsageError(Exception):
    """A bad command line; ``main`` prints it on one line and exits 2."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that raises ``UsageError`` (the message and where to find help)
    instead of printing usage and exiting, so that each command reports it in its own one-line
    form; argparse makes the subparsers of the parent's class, so they do the same."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------------
# Logging: configured by the commands only (the library configures no global logging)


def _drop(logger: Any, method: str, event_dict: Any) -> NoReturn:
    raise structlog.DropEvent


def _stderr_logger(*args: Any) -> structlog.PrintLogger:
    # sys.stderr is looked up per log line, so a live progress bar's redirection is honoured.
    return structlog.PrintLogger(sys.stderr)


@contextlib.contextmanager
def configured_logging(json_logs: bool) -> Iterator[None]:
    """``json_logs``: every log line as JSON on stderr; else drop the library's lines (the CLI
    shows the events itself). The previous structlog configuration is restored on exit."""
    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    if json_logs:
        processors: list[Any] = [
            structlog.contextvars.merge_contextvars,  # context bound by the caller (e.g. rank)
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors = [_drop]
    structlog.configure(
        processors=processors,
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        if was_configured:
            structlog.configure(**saved)
        else:
            structlog.reset_defaults()
