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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import structlog

from streamload._sizes import parse_size

__all__ = [
    "DeviceArg",
    "Parser",
    "UsageError",
    "arg_type",
    "configured_logging",
    "devices_from_args",
    "parse_device",
    "parse_size",
]

# --------------------------------------------------------------------------------------------
# Parsing at the edge: strings -> typed values


@dataclass(frozen=True, slots=True)
class DeviceArg:
    """One ``--device``: a bare ``NAME`` is a real device; ``cuda:N=SIZE`` a real GPU that the
    load may take at most ``SIZE`` of (``LoadParams.max_memory``); any other ``NAME=SIZE`` a
    simulated GPU of that size."""

    name: str
    total_bytes: int | None

    @property
    def simulated(self) -> bool:
        return self.total_bytes is not None and not _CUDA.fullmatch(self.name)


_CUDA = re.compile(r"cuda:\d+")


def devices_from_args(given: Sequence[DeviceArg], *, cpu: bool) -> tuple[list[Any], dict[str, int]]:
    """The ``LoadParams.devices`` and ``max_memory`` that ``--device`` arguments name, in order,
    then ``"cpu"`` if ``cpu``; simulated GPUs are made here."""
    names = [d.name for d in given]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ValueError(f"--device {duplicate} is given twice")
    devices: list[Any] = []
    caps: dict[str, int] = {}
    for arg in given:
        if arg.simulated:
            from streamload.testing import SimulatedGPU

            assert arg.total_bytes is not None
            devices.append(SimulatedGPU(arg.name, total_bytes=arg.total_bytes))
            continue
        devices.append(arg.name)
        if arg.total_bytes is not None:
            caps[arg.name] = arg.total_bytes
    if devices and cpu:
        devices.append("cpu")
    return devices, caps


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
