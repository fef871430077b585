"""A rank's error as plain data: what ranks send each other when a survey, split or load fails.

Exceptions do not pickle reliably between processes; ``_Failure`` does, and turns back into
the same ``RankFailedError`` on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamload.errors import DeviceError, DoesNotFitError, LoadError, RankFailedError


@dataclass(frozen=True, slots=True)
class _Failure:
    """A rank's error as plain data (sent between ranks; exceptions do not pickle reliably)."""

    rank: int
    host: str
    phase: str
    problem: str
    device: str | None
    error_type: str

    @classmethod
    def of(cls, exc: BaseException, *, rank: int, host: str, phase: str) -> _Failure:
        return cls(rank, host, phase, str(exc), _device_of(exc), type(exc).__name__)

    def error(self) -> RankFailedError:
        return RankFailedError(
            self.problem,
            rank=self.rank,
            host=self.host,
            phase=self.phase,
            device=self.device,
            error_type=self.error_type,
        )


def _device_of(exc: BaseException) -> str | None:
    """The device an error names: its ``device``, or the devices a does-not-fit overflows."""
    if isinstance(exc, RankFailedError | LoadError | DeviceError):
        return exc.device
    if isinstance(exc, DoesNotFitError):
        over = [row.device for row in exc.devices if row.need > row.capacity]
        names = over or [row.device for row in exc.devices]
        return ", ".join(names) or None
    return None
