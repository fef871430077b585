"""The ``streamload`` command's arguments: strings -> typed values at the edge, and the parser.

``--device`` and sizes parse as ``python -m streamload.distributed`` parses them
(``streamload._cmdline``); a bad argument raises ``UsageError`` (``main`` prints one line).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import streamload
from streamload._cmdline import Parser, arg_type, parse_device, parse_size

__all__ = ["build_parser", "parse_paged_attention"]


_PAGED_FORMS = "off, context, context:TOKENS, mb:MIB, util:FRACTION"


def parse_paged_attention(text: str) -> streamload.PagedAttention | None:
    """``--paged-attention`` MODE -> ``PagedAttention`` (default block size) or ``None``.

    ``off`` -> ``None``; ``context`` -> a pool for ``max_seq_len x max_batch_size`` tokens;
    ``context:8192`` -> ``ContextSize(8192)``; ``mb:4096`` -> ``MbAmount(4096)``;
    ``util:0.9`` -> ``Utilization(0.9)``. Anything else raises ``ValueError``.
    """
    mode, sep, value = text.strip().lower().partition(":")
    if not sep and mode in ("off", "context"):
        return None if mode == "off" else streamload.PagedAttention()
    if not sep or mode not in ("context", "mb", "util"):
        raise ValueError(f"bad paged-attention mode {text!r}: expected one of {_PAGED_FORMS}")
    try:
        number = float(value) if mode == "util" else int(value)
    except ValueError:
        raise ValueError(
            f"bad paged-attention mode {text!r}: {value!r} is not a number ({_PAGED_FORMS})"
        ) from None
    memory: streamload.ContextSize | streamload.MbAmount | streamload.Utilization
    try:
        if mode == "util":
            memory = streamload.Utilization(number)
        elif mode == "mb":
            memory = streamload.MbAmount(int(number))
        else:
            memory = streamload.ContextSize(int(number))
    except ValueError as exc:
        raise ValueError(f"bad paged-attention mode {text!r}: {exc}") from None
    return streamload.PagedAttention(memory=memory)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise ValueError(f"{text!r} is not positive")
    return value


def _dtype(text: str) -> str:
    """A dtype name -> its safetensors code (``"bf16" -> "BF16"``), without importing torch."""
    code = streamload.LoadParams(dtype=text).target_code
    assert code is not None
    return code


_SOURCE_HELP = (
    "checkpoint: a directory or .safetensors file, a hub repo id org/name, "
    "or an object-store prefix s3://bucket/prefix (gs://, az://)"
)


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help=_SOURCE_HELP)
    parser.add_argument(
        "--revision", default="main", help="hub branch, tag or commit (default: main)"
    )


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    _add_source_options(parser)
    parser.add_argument(
        "--device",
        action="append",
        type=arg_type(parse_device),
        metavar="NAME=SIZE",
        help="a hypothetical GPU, e.g. sim:0=24GiB (repeatable, filled in order); a bare NAME "
        "such as cuda:1 is a real device; without --device: every visible GPU, then the CPU",
    )
    parser.add_argument(
        "--cpu-memory",
        type=arg_type(parse_size),
        metavar="SIZE",
        help="the CPU's memory (default: the host's available memory)",
    )
    parser.add_argument("--no-cpu", action="store_true", help="plan the GPUs only")
    parser.add_argument(
        "--cpu-policy", choices=("copy", "mmap"), default="copy", help="CPU layers (default copy)"
    )
    parser.add_argument(
        "--dtype",
        type=arg_type(_dtype),
        help="target dtype of floating tensors (default: as stored)",
    )
    parser.add_argument("--max-seq-len", type=arg_type(_positive_int), default=4096, metavar="N")
    parser.add_argument("--max-batch-size", type=arg_type(_positive_int), default=1, metavar="N")
    parser.add_argument(
        "--paged-attention",
        type=arg_type(parse_paged_attention),
        default=None,
        metavar="MODE",
        help=f"KV cache: {_PAGED_FORMS} (default off)",
    )
    parser.add_argument(
        "--block-size", type=arg_type(_positive_int), metavar="N", help="paged KV block size"
    )
    parser.add_argument(
        "--gpu-reserve",
        type=arg_type(parse_size),
        metavar="SIZE",
        help="minimum reserve per GPU (default 512MiB; the reserve is max(2%% of total, this))",
    )
    parser.add_argument(
        "--host-reserve",
        type=arg_type(parse_size),
        metavar="SIZE",
        help="host memory kept free (default 2GiB)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="streamload",
        description="Inspect, plan and stream safetensors checkpoints onto GPUs and the CPU.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {streamload.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="layers, bytes, dtypes and config facts")
    _add_source_options(inspect)
    inspect.add_argument("--dtype", type=arg_type(_dtype), help="count bytes in this dtype")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(json_logs=False)

    plan = commands.add_parser("plan", help="the device map a load would start from")
    _add_plan_options(plan)
    plan.set_defaults(json_logs=False)

    load = commands.add_parser("load", help="load with a live progress bar, then report")
    _add_plan_options(load)
    load.add_argument("--json-logs", action="store_true", help="log every event as JSON (stderr)")
    load.add_argument(
        "--verify", action="store_true", help="hash every file and check its recorded sha256"
    )

    demo = commands.add_parser(
        "demo", help="write a small checkpoint and load it over two simulated GPUs and the CPU"
    )
    demo.add_argument("--dir", type=Path, help="write the checkpoint here (default: a temp dir)")
    demo.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    demo.add_argument("--json-logs", action="store_true", help="log every event as JSON (stderr)")
    return parser
