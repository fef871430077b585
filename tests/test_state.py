"""Process-wide state lives in one place and ``reset()`` returns it to a fresh process's."""

from __future__ import annotations

from streamload import _hostmem, _state
from streamload.devices import default_nvml


def test_reset_forgets_reservations_nvml_and_probes() -> None:
    """After ``reset()`` nothing a load or a probe left behind is seen: no reservation, a new
    NVML wrapper, probes to be read again."""
    _state.STATE.reservations.reserve(object(), "cuda:0", 10)
    nvml = default_nvml()
    assert nvml is default_nvml()  # one per process
    _hostmem.huge_pages_available()
    assert _state.STATE.probes.huge_pages is not None
    _state.reset()
    assert 0 == _state.STATE.reservations.held_by_others(None, "cuda:0")
    assert nvml is not default_nvml()
    assert _state.STATE.probes.huge_pages is None
