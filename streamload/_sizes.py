"""Byte sizes as people write them: ``"24GiB"``, ``"512MiB"``, ``"24GB"`` (parsed at the edge,
for ``LoadParams.max_memory`` and the command lines)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal

__all__ = ["parse_size"]

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
    """A byte count from ``"24GiB"``, ``"24GB"``, ``"512MiB"``, ``"1.5TiB"`` or ``"4096B"``.

    Units are case-insensitive: ``KB MB GB TB`` are powers of 1000, ``KiB MiB GiB TiB`` powers
    of 1024, ``B`` means bytes. A number needs its unit (``"24"`` is refused: 24 bytes is never
    what was meant by a device size), except ``"0"``. A bare ``G`` or ``M`` is refused as
    ambiguous. The result must be a whole number of bytes; anything else raises ``ValueError``.
    """
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is not None and match.group(2) == "" and Decimal(match.group(1)) != 0:
        raise ValueError(
            f"bad size {text!r}: a size needs a unit, e.g. {match.group(1)}GiB "
            f"(or {match.group(1)}B for bytes)"
        )
    if match is None or unit is None:
        raise ValueError(
            f"bad size {text!r}: expected a number and a unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 24GiB"
        )
    value = Decimal(match.group(1)) * unit
    if value != value.to_integral_value():
        raise ValueError(f"bad size {text!r}: not a whole number of bytes")
    return int(value)
