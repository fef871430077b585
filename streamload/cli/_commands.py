"""The ``streamload`` commands (``inspect``, ``plan``, ``load``, ``demo``) and ``main``: parse,
configure logging (the one place streamload does), run the command, turn every error into one
line and an exit status."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamload
from streamload._cmdline import DeviceArg, UsageError, configured_logging, devices_from_args
from streamload.cli._demo import (
    _DEMO_FILES,
    _DEMO_HIDDEN,
    _DEMO_LAYERS,
    _demo_load,
    write_demo_checkpoint,
)
from streamload.cli._live import _run_load
from streamload.cli._parse import build_parser
from streamload.cli._render import (
    Output,
    _json,
    _show_plan,
    _show_report,
    _show_spec,
    paged_summary,
    report_summary,
    spec_summary,
)
from streamload.errors import format_bytes

if TYPE_CHECKING:
    pass

__all__ = ["Setup", "main"]


# --------------------------------------------------------------------------------------------
# inspect


def _cmd_inspect(args: argparse.Namespace, out: Output) -> int:
    spec = streamload.inspect(
        args.path, args.dtype, params=streamload.LoadParams(revision=args.revision)
    )
    summary = spec_summary(spec)
    if args.json:
        _json(summary)
    else:
        _show_spec(summary, out)
    return 0


# --------------------------------------------------------------------------------------------
# plan and load


@dataclass(frozen=True, slots=True)
class Setup:
    """What ``plan`` and ``load`` run with: the parameters, and the inputs as JSON (``--json``)."""

    params: streamload.LoadParams
    inputs: dict[str, Any]


def _devices(args: argparse.Namespace) -> tuple[list[Any], dict[str, int]]:
    """``--device`` in order (``NAME=SIZE``: a simulated GPU; ``cuda:N=SIZE``: a cap), then
    ``"cpu"`` unless ``--no-cpu``; no devices for ``"auto"``."""
    given: list[DeviceArg] = args.device or []
    if given:
        return devices_from_args(given, cpu=not args.no_cpu)
    if args.no_cpu:
        import torch  # only here: every GPU torch sees, by name

        devices: list[Any] = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if not devices:
            raise ValueError("--no-cpu without --device: no CUDA GPU is visible")
        return devices, {}
    return [], {}


def _setup(args: argparse.Namespace) -> Setup:
    if args.block_size is not None and args.paged_attention is None:
        raise ValueError("--block-size needs --paged-attention")
    paged = args.paged_attention
    if paged is not None and args.block_size is not None:
        paged = dataclasses.replace(paged, block_size=args.block_size)
    overrides: dict[str, Any] = {}
    if args.gpu_reserve is not None:
        overrides["reserve_min_bytes"] = args.gpu_reserve
    if args.host_reserve is not None:
        overrides["host_reserve_bytes"] = args.host_reserve
    devices, caps = _devices(args)
    params = streamload.LoadParams(
        devices=devices or "auto",
        max_memory=caps or None,
        dtype=args.dtype,
        max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size,
        paged_attention=paged,
        cpu_policy=args.cpu_policy,
        cpu_memory_bytes=args.cpu_memory,
        revision=args.revision,
        verify=getattr(args, "verify", False),
        **overrides,
    )
    given: list[DeviceArg] = args.device or []
    inputs = {
        "path": str(args.path),
        "revision": params.revision,
        "devices": [
            {"name": d.name, "simulated": d.simulated, "total_bytes": d.total_bytes} for d in given
        ]
        or "auto",
        "cpu": not args.no_cpu,
        "cpu_memory_bytes": params.cpu_memory_bytes,
        "cpu_policy": params.cpu_policy,
        "dtype": params.target_code,
        "max_seq_len": params.max_seq_len,
        "max_batch_size": params.max_batch_size,
        "paged_attention": paged_summary(paged),
        "reserve_fraction": params.reserve_fraction,
        "reserve_min_bytes": params.reserve_min_bytes,
        "max_memory": dict(params.memory_caps),
        "host_reserve_bytes": params.host_reserve_bytes,
    }
    return Setup(params, inputs)


def _cmd_plan(args: argparse.Namespace, out: Output) -> int:
    setup = _setup(args)
    plan = streamload.plan(args.path, setup.params)
    if args.json:
        _json({"inputs": setup.inputs, **plan.to_dict()})
    else:
        _show_plan(plan, out)
    return 0


def _cmd_load(args: argparse.Namespace, out: Output) -> int:
    setup = _setup(args)
    model = _run_load(args.path, setup.params, None if args.json else out)
    try:
        if args.json:
            _json({"inputs": setup.inputs, **report_summary(model)})
        else:
            _show_report(model, out)
    finally:
        model.release()
    return 0


# --------------------------------------------------------------------------------------------
# demo


def _cmd_demo(args: argparse.Namespace, out: Output) -> int:
    made_dir = args.dir is None
    directory: Path = Path(tempfile.mkdtemp(prefix="streamload-demo-")) if made_dir else args.dir
    present = [name for name in _DEMO_FILES if (directory / name).exists()]
    if present:
        raise ValueError(f"--dir {directory} already holds {', '.join(present)}; not overwriting")
    existed = directory.exists()
    try:
        started = time.perf_counter()
        directory.mkdir(parents=True, exist_ok=True)
        size = write_demo_checkpoint(directory)
        out.line(
            f"wrote a random Llama-shaped checkpoint ({_DEMO_LAYERS} layers, hidden "
            f"{_DEMO_HIDDEN}, bf16, {format_bytes(size)}) to {directory} "
            f"in {time.perf_counter() - started:.1f} s"
        )
        _demo_load(directory, out)
        if args.keep:
            out.line(f"kept the checkpoint in {directory}")
    finally:
        if not args.keep and (made_dir or not existed):
            shutil.rmtree(directory, ignore_errors=True)
        elif not args.keep:  # a folder the user had: remove only what the demo wrote
            for name in _DEMO_FILES:
                (directory / name).unlink(missing_ok=True)
    return 0


# --------------------------------------------------------------------------------------------
# main


# Each subcommand's name (argparse's ``command``) picks the function that runs it; the parser
# names no functions, so that parsing never imports the commands.
_COMMANDS: Mapping[str, Callable[[argparse.Namespace, Output], int]] = {
    "inspect": _cmd_inspect,
    "plan": _cmd_plan,
    "load": _cmd_load,
    "demo": _cmd_demo,
}


def _one_line(exc: BaseException) -> str:
    """An error message on one line (a does-not-fit breakdown becomes ``; ``-separated)."""
    lines = [line.strip().removeprefix("- ") for line in str(exc).splitlines()]
    return "; ".join(line for line in lines if line) or type(exc).__name__


def _fail(message: str, exc: BaseException | None = None, *, as_json: bool = False) -> int:
    """Report an error and return exit status 2: one line on stderr, or under ``--json`` a
    JSON object on stdout (``{"error": {"type": ..., "message": ...}}``), so that a program
    reading the output always gets JSON."""
    if as_json:
        kind = "UsageError" if exc is None else type(exc).__name__
        _json({"error": {"type": kind, "message": message}})
    else:
        print(f"streamload: error: {message}", file=sys.stderr, flush=True)
    return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 for errors, 130 if interrupted)."""
    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(given)
    except UsageError as exc:
        return _fail(str(exc), as_json="--json" in given)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    run = _COMMANDS[args.command]
    try:
        with configured_logging(args.json_logs):
            return run(args, Output.create())
    except KeyboardInterrupt:
        print("streamload: interrupted; nothing is left loaded", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # `streamload plan --json | head`: the reader left
        _silence_stdout()
        return 1
    except (streamload.StreamloadError, ValueError, OSError) as exc:
        return _fail(_one_line(exc), exc, as_json=bool(getattr(args, "json", False)))
