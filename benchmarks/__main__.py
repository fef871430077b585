"""Run every benchmark: ``python -m benchmarks`` (or ``make bench``).

Results go to ``benchmarks/results/`` as JSON; the README's tables are copied from them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks import load_throughput, plan_time

RESULTS = Path("benchmarks/results")


def main() -> int:
    plan_time.main(["--json", str(RESULTS / "plan_time.json")])
    load_throughput.main(["--json", str(RESULTS / "load_warm.json")])
    load_throughput.main(["--cold", "--json", str(RESULTS / "load_cold.json")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
