"""End-to-end time of ``streamload inspect`` and ``streamload plan`` on a sparse 70B, each in a
fresh process, as a user meets the command.

    python -m benchmarks.cli_time [--repeat 7]

Writes a sparse Llama-3.1-70B-shaped checkpoint (real headers in 30 shards, data regions that
are file holes), then alternates, several rounds, medians:

- ``inspect``: ``streamload inspect DIR``;
- ``plan``: ``streamload plan DIR`` over two hypothetical 80 GiB GPUs and a 1 TiB host;
- ``plan+torch``: the same after ``import torch`` in the same process (what every command
  cost while the library imported torch at import time).

Each run is ``python -c`` calling ``streamload.cli.main``, timed from process start to exit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.plan_time import SHAPES, write

_RUN = "import sys\n{pre}from streamload.cli import main\nraise SystemExit(main(sys.argv[1:]))"


def _command(name: str, directory: Path) -> tuple[str, list[str]]:
    gpus = ["--device", "sim:0=80GiB", "--device", "sim:1=80GiB", "--cpu-memory", "1TiB"]
    if name == "inspect":
        return _RUN.format(pre=""), ["inspect", str(directory)]
    pre = "import torch\n" if name == "plan+torch" else ""
    return _RUN.format(pre=pre), ["plan", str(directory), *gpus]


def once(name: str, directory: Path) -> float:
    code, args = _command(name, directory)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, timeout=120
    )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    names = ("inspect", "plan", "plan+torch")
    times: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        config, shard_bytes, _ = SHAPES["llama-3.1-70b"]
        directory = write(Path(tmp) / "llama-3.1-70b", config, shard_bytes)
        for name in names:
            once(name, directory)  # warm the page cache and the bytecode caches
        for _ in range(args.repeat):
            for name in names:
                times[name].append(once(name, directory))
    result = {name: round(statistics.median(values), 3) for name, values in times.items()}
    print(json.dumps({"median_seconds": result, "rounds": args.repeat}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
