"""The ``streamload`` command line, over the public API only.

    streamload inspect PATH [--json] [--dtype bf16]
    streamload plan PATH [--device NAME=SIZE ...] [--cpu-memory SIZE] [--no-cpu] [--json] ...
    streamload load PATH [plan options] [--json-logs]
    streamload demo [--dir DIR] [--keep]

``--device sim:0=24GiB`` (repeatable) stands for a hypothetical GPU of that size
(``streamload.testing.SimulatedGPU``); a bare ``--device cuda:1`` names a real one. Without
``--device`` the live devices are used (``LoadParams(devices="auto")``).

Exit status: 0 on success; 2 for a bad argument or any ``StreamloadError`` (one line on stderr,
``streamload: error: ...``, never a traceback); 130 when interrupted (Ctrl-C cancels a load
cleanly: everything it placed is released); 1 when the reader of stdout went away.

This is the one place in streamload that configures logging: ``--json-logs`` sends every load
event to stderr as a JSON line; otherwise the library's log lines are dropped and the events are
shown as tables, a progress bar and re-plan notices. ``rich`` (the ``cli`` extra) is used when it
is installed, plain text otherwise.

Modules: ``_parse`` the arguments and the parser; ``_render`` tables, plans and reports;
``_live`` the progress bar and the live view of a load; ``_demo`` the demo's checkpoint and
load; ``_commands`` the commands and ``main`` (the ``streamload`` console script). What both
this command and ``python -m streamload.distributed`` use (``--device`` and size parsing, the
argparse error style, the logging setup) is in ``streamload._cmdline``. This face re-exports
the public names.
"""

from streamload._cmdline import DeviceArg, parse_device, parse_size
from streamload.cli._commands import main
from streamload.cli._live import LoadView
from streamload.cli._parse import build_parser, parse_paged_attention
from streamload.cli._render import Output, Table, plain_table, replan_line

__all__ = [
    "DeviceArg",
    "LoadView",
    "Output",
    "Table",
    "build_parser",
    "main",
    "parse_device",
    "parse_paged_attention",
    "parse_size",
    "plain_table",
    "replan_line",
]
