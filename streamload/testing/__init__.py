"""Testing aids for code that loads models with streamload, on machines without GPUs.

Like ``httpx.MockTransport`` or ``structlog.testing``: public, documented, stable.

- ``SimulatedGPU``: a device with a memory ledger that goes through the engine's CUDA path
  (probe, allocate, staging ring, copy, recheck) with a host copy as the copy primitive;
  ``steal``/``give_back`` play another tenant.
- ``FakeCuda``: a recording fake of the CUDA runtime for ``CudaDevice(runtime=...)``, so the
  real CUDA device code runs here; it enforces per-thread current devices, contexts that cost
  memory, streams and events with their flags, and copies that complete only when waited.
- Checkpoint writers: ``write_safetensors``, ``write_sparse_safetensors`` (a real header, a data
  region that is a file hole), ``write_sharded`` (Hugging Face layout with an index).
- Shapes of real models: ``llama_config``/``llama_shapes`` and the presets ``LLAMA_3_8B``,
  ``LLAMA_3_1_70B``, ``LLAMA_3_1_405B`` (``name -> (dtype code, shape)``), to plan and stream
  big models from sparse files at no disk cost.
"""

from typing import TYPE_CHECKING, Any

from streamload.testing._shapes import (
    LLAMA_3_1_70B,
    LLAMA_3_1_405B,
    LLAMA_3_8B,
    llama_config,
    llama_shapes,
    tiny_llama_config,
)
from streamload.testing._simulated import SimulatedGPU
from streamload.testing._writers import (
    TensorShape,
    dtype_code,
    write_safetensors,
    write_sharded,
    write_sparse_safetensors,
)

if TYPE_CHECKING:
    from streamload.testing._fake_cuda import FakeCall, FakeCuda

__all__ = [
    "LLAMA_3_1_70B",
    "LLAMA_3_1_405B",
    "LLAMA_3_8B",
    "FakeCall",
    "FakeCuda",
    "SimulatedGPU",
    "TensorShape",
    "dtype_code",
    "llama_config",
    "llama_shapes",
    "tiny_llama_config",
    "write_safetensors",
    "write_sharded",
    "write_sparse_safetensors",
]


def __getattr__(name: str) -> Any:
    # The fake CUDA runtime imports torch; imported when first named, so a server's planning
    # path over simulated GPUs never imports torch.
    if name in ("FakeCall", "FakeCuda"):
        from streamload.testing import _fake_cuda

        return getattr(_fake_cuda, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
