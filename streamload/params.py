"""Load parameters: what the caller asks for, parsed at the edge into types.

``LoadParams`` is the one object a server builds; everything below it takes typed values, never
strings such as ``"1GB"`` or ``"balanced"``. Unknown or inconsistent values raise ``ValueError``
at construction, so a bad setting fails before any file is opened.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, TypeAlias

from streamload._sizes import parse_size

if TYPE_CHECKING:
    import torch

    from streamload.devices import Device

__all__ = [
    "ContextSize",
    "CpuPolicy",
    "LoadParams",
    "MbAmount",
    "PagedAttention",
    "PagedMemory",
    "Utilization",
    "VisionParams",
    "dtype_code",
    "parse_dtype",
    "parse_dtype_code",
    "torch_dtype",
]

MiB = 2**20
GiB = 2**30

CpuPolicy: TypeAlias = Literal["copy", "mmap"]

# Dtypes are handled as safetensors codes ("BF16") so that parameters, planning and the
# ``inspect``/``plan`` commands never import torch (importing it costs seconds and hundreds of
# MB for a headers-only answer). Torch dtypes are made from codes only where tensors are.

# safetensors dtype code -> the name of its torch dtype (every code the checkpoint parser knows).
_TORCH_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
    }
)
_NAME_TO_CODE: Mapping[str, str] = {name: code for code, name in _TORCH_NAMES.items()}

# What a user may write for a target dtype -> its safetensors code.
_DTYPE_ALIASES: Mapping[str, str] = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "f16": "F16",
    "float16": "F16",
    "half": "F16",
    "fp32": "F32",
    "f32": "F32",
    "float32": "F32",
    "float": "F32",
    "fp8": "F8_E4M3",
    "fp8_e4m3": "F8_E4M3",
    "float8_e4m3fn": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2",
    "float8_e5m2": "F8_E5M2",
}


def _is_torch_dtype(value: object) -> bool:
    # A torch dtype can only exist once torch is imported: ask it then, never import it here.
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.dtype)


def parse_dtype_code(value: torch.dtype | str | None) -> str | None:
    """``"bf16" | "bfloat16" | "BF16" | torch.bfloat16 -> "BF16"``; ``None`` stays ``None``.

    Never imports torch. ``ValueError`` for a name it does not know."""
    if value is None:
        return None
    if _is_torch_dtype(value):
        return dtype_code(value)  # type: ignore[arg-type]
    if not isinstance(value, str):
        raise ValueError(f"unknown dtype {value!r}; expected a torch dtype or a name")
    key = value.strip().removeprefix("torch.")
    if key in _TORCH_NAMES:
        return key
    try:
        return _DTYPE_ALIASES[key.lower()]
    except KeyError:
        known = ", ".join(sorted(_DTYPE_ALIASES))
        raise ValueError(f"unknown dtype {value!r}; expected one of: {known}") from None


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``"bf16" | "bfloat16" | torch.bfloat16 -> torch.bfloat16``; ``None`` stays ``None``
    (imports torch: use ``parse_dtype_code`` where no tensor is made)."""
    code = parse_dtype_code(value)
    return None if code is None else torch_dtype(code)


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code for a torch dtype (``torch.bfloat16 -> "BF16"``)."""
    try:
        return _NAME_TO_CODE[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no safetensors code streamload knows") from None


@functools.cache
def _torch_dtypes() -> Mapping[str, torch.dtype]:
    import torch

    return MappingProxyType({code: getattr(torch, name) for code, name in _TORCH_NAMES.items()})


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype code (``"BF16" -> torch.bfloat16``; imports
    torch)."""
    return _torch_dtypes()[code]


@dataclass(frozen=True, slots=True)
class MbAmount:
    """Paged KV pool of a fixed size, in MiB, shared by all layers (mistral.rs ``MbAmount``)."""

    mib: int

    def __post_init__(self) -> None:
        if self.mib <= 0:
            raise ValueError(f"MbAmount must be positive, got {self.mib}")


@dataclass(frozen=True, slots=True)
class Utilization:
    """Use this fraction of each GPU's *total* memory for weights, activations and KV pool;
    the pool takes what the weights leave (mistral.rs ``Utilization``, vLLM's
    ``gpu_memory_utilization``)."""

    fraction: float

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"Utilization must be in (0, 1], got {self.fraction}")


@dataclass(frozen=True, slots=True)
class ContextSize:
    """Paged KV pool holding this many tokens in every layer (mistral.rs ``ContextSize``)."""

    tokens: int

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ValueError(f"ContextSize must be positive, got {self.tokens}")


PagedMemory: TypeAlias = MbAmount | Utilization | ContextSize


@dataclass(frozen=True, slots=True)
class PagedAttention:
    """Paged-attention KV cache settings.

    ``memory=None`` means a pool for ``max_seq_len x max_batch_size`` tokens (``ContextSize``).
    ``cache_dtype=None`` means the model's activation dtype (the load dtype, else the stored
    float dtype); a given one is kept as its safetensors code (``"fp8" -> "F8_E4M3"``). A plan
    that puts any layer on the CPU falls back to non-paged KV sizing and
    records why (``Plan.paged_attention_reason``).
    """

    memory: PagedMemory | None = None
    block_size: int = 32
    cache_dtype: torch.dtype | str | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        object.__setattr__(self, "cache_dtype", parse_dtype_code(self.cache_dtype))


@dataclass(frozen=True, slots=True)
class VisionParams:
    """Largest images a vision model will be asked to process, for the activation estimate."""

    max_image_shape: tuple[int, int] = (1024, 1024)
    max_num_images: int = 1

    def __post_init__(self) -> None:
        h, w = self.max_image_shape
        if h <= 0 or w <= 0 or self.max_num_images <= 0:
            raise ValueError(f"invalid vision params: {self}")


def _caps(given: Mapping[str, int | str] | None) -> Mapping[str, int]:
    """``max_memory`` parsed at the edge: device name -> bytes (ints, or sizes with a unit)."""
    caps: dict[str, int] = {}
    for device, value in (given or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(
                f"max_memory[{device!r}] must be bytes or a size string, got {value!r}"
            )
        nbytes = parse_size(value) if isinstance(value, str) else value
        if nbytes < 0:
            raise ValueError(f"max_memory[{device!r}] must be >= 0, got {value!r}")
        caps[str(device)] = nbytes
    return MappingProxyType(caps)


def _default_devices() -> Literal["auto"]:
    return "auto"


@dataclass(frozen=True, slots=True)
class LoadParams:
    """Everything a load or a plan depends on besides the checkpoint.

    ``dtype`` (a torch dtype or a name such as ``"bf16"``) is kept as its safetensors code
    (``"BF16"``; ``target_dtype`` gives the torch dtype), so parameters never import torch.

    Devices: ``"auto"`` (every visible CUDA GPU in CUDA order, then the CPU) or a list of
    ``"cuda:N"``, ``"cpu"`` and ``Device`` objects (such as ``streamload.testing.SimulatedGPU``),
    filled in the order given; the CPU, if listed, must come last.

    Reserve per GPU is ``max(reserve_fraction x total, reserve_min_bytes)``. The CPU's budget is
    the host's available memory (or ``cpu_memory_bytes`` when given) minus
    ``host_reserve_bytes``.

    ``max_memory`` caps what a load may take per device, in accelerate's spelling
    (``{"cuda:0": "10GiB", "cpu": "64GiB"}``; ints are bytes, strings need a unit): a device's
    budget is ``min(cap, live free) - reserve``, and every recheck and re-plan applies the cap
    to what the load holds there. Use it to leave room on a shared GPU, or for a KV pool the
    server allocates after the load.

    ``staging_bytes`` bounds host memory used to stage tensors for staged devices; it does not
    grow with the model. The ring itself holds ``chunk_bytes`` slots for the usable CPUs + 1
    (at least 2, at most ``reader_threads``) within that budget: 48 MiB on 2 CPUs, 128 MiB on
    8 or more. ``reader_threads`` reads run at once; ``chunk_bytes`` is the read size.
    ``max_replans`` bounds live re-plans during one load.

    ``huge_pages`` decides whether host destinations (the memory a load reads CPU tensors into,
    under either CPU policy; a simulated GPU's tensors of at least 2 MiB, which are host memory too)
    get transparent huge pages: ``False`` (default) never, ``True`` always, ``"auto"`` for each
    layer or non-mapped part whose bytes are mostly (more than half, sampled) in the page cache when
    the load reaches it, before its own read-ahead starts. Why off by default: a warm load is bound
    by faulting in fresh pages, and a 2 MiB page must come from a free 2 MiB block, which is the
    memory a host has least ready: a virtual machine's guest hands free blocks of that size back
    to its hypervisor (free page reporting), so each huge page costs a host fault on every 4 KiB
    of it, and on a long-running host such blocks are found by compaction. In a fresh process on
    memory as the machine left it, 4 KiB pages were faster warm and cold; huge pages win only
    where memory has just been faulted in and freed (``benchmarks/results/measurements.md`` has
    both). A unit's CPU tensors share one mapping whose whole 2 MiB stretches get the advice
    (``streamload._hostmem.HostBlock``; each tensor's storage is exactly its bytes, and the
    mapping goes when the last of them is freed); a simulated GPU's tensor gets a mapping of its
    own (``streamload._hostmem.huge_mapping``). With THP ``defrag`` at ``madvise`` the kernel may
    compact memory to find huge pages; THP ``never`` turns them off whatever this says.

    ``direct_io`` decides whether local checkpoint files are read with ``O_DIRECT``, bypassing the
    page cache: ``False`` never, ``True`` always, ``"auto"`` (default) for each layer or
    non-mapped part whose bytes are mostly (more than half, sampled) *not* in the page cache
    when the load reaches it (the same probe as ``huge_pages="auto"``), whatever its device, so
    bytes already cached are copied from the cache and bytes the disk must read skip it: the
    cache's pages would be fresh memory to fault in beside the destination's (on a VM, host
    faults each), and into the staging ring a direct read is one aligned read into a reused
    slot (``benchmarks/results/measurements.md`` has both). Units ``cpu_policy="mmap"`` maps
    are left to the page cache under ``"auto"``. Direct reads are 4 KiB
    aligned in file offset, length and buffer address: a staged chunk is read as the aligned
    span around it into its (aligned) staging slot and copied out from the chunk's first byte;
    a CPU unit's tensors are laid out co-aligned with their file offsets modulo 4 KiB, so a
    chunk's aligned middle is read straight into them and only its partial first and last
    4 KiB blocks go through a small aligned bounce buffer (other destinations are read as the
    aligned span into a bounce buffer and copied out). Exactly the tensor's bytes are placed
    either way. A filesystem that refuses ``O_DIRECT`` (``EINVAL`` at open or at a read) has its
    files read through the page cache instead, reported once as a ``DirectIOFallback`` event (a
    warning in the log when ``True`` asked for direct reads, an info line under ``"auto"``).
    Objects (``s3://`` and the like) are never read with it. The read-ahead advice a load gives
    the kernel is left out for units read this way (it would read them into the cache a second
    time).

    ``empty_cache_on_failure``: when a load fails or is cancelled, the device memory it freed is
    returned from torch's caching allocator (and its pinned staging ring from torch's pinned-host
    cache) to the driver, so other processes on the GPU can use it (``Device.release_cache``);
    ``False`` keeps it cached for this process's next allocations.

    Sources (``streamload.sources``): ``revision`` is the branch, tag or commit a Hugging Face
    repo id is resolved at; ``storage_options`` are object-store settings beyond the standard
    environment (keys as obstore's store configs name them, e.g. ``"endpoint"``,
    ``"region"``); ``connect_timeout`` (seconds) bounds how long an unreachable endpoint is
    tried before the load fails. ``verify`` hashes every file the load reads in full and
    compares it with the sha256 its source records (``ChecksumError`` on a mismatch; files
    without one are listed as unverified in ``LoadReport.checks``).
    """

    devices: Literal["auto"] | Sequence[str | Device] = field(default_factory=_default_devices)
    dtype: torch.dtype | str | None = None
    max_seq_len: int = 4096
    max_batch_size: int = 1
    paged_attention: PagedAttention | None = None
    vision: VisionParams | None = None
    reserve_fraction: float = 0.02
    reserve_min_bytes: int = 512 * MiB
    cpu_policy: CpuPolicy = "copy"
    cpu_memory_bytes: int | None = None
    host_reserve_bytes: int = 2 * GiB
    attention_chunk: int = 1024
    staging_bytes: int = 256 * MiB
    chunk_bytes: int = 16 * MiB
    reader_threads: int = 8
    max_replans: int = 8
    huge_pages: bool | Literal["auto"] = False
    direct_io: bool | Literal["auto"] = "auto"
    empty_cache_on_failure: bool = True
    max_memory: Mapping[str, int | str] | None = None
    revision: str = "main"
    storage_options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    connect_timeout: float = 30.0
    verify: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype_code(self.dtype))
        object.__setattr__(self, "storage_options", MappingProxyType(dict(self.storage_options)))
        if not self.revision:
            raise ValueError("revision must be a branch, tag or commit, got an empty string")
        if self.connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be positive, got {self.connect_timeout}")
        if not isinstance(self.devices, str):
            object.__setattr__(self, "devices", tuple(self.devices))
        elif self.devices != "auto":
            raise ValueError(f"devices must be 'auto' or a list, got {self.devices!r}")
        positive = {
            "max_seq_len": self.max_seq_len,
            "max_batch_size": self.max_batch_size,
            "attention_chunk": self.attention_chunk,
            "staging_bytes": self.staging_bytes,
            "chunk_bytes": self.chunk_bytes,
            "reader_threads": self.reader_threads,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 <= self.reserve_fraction < 1.0:
            raise ValueError(f"reserve_fraction must be in [0, 1), got {self.reserve_fraction}")
        if self.reserve_min_bytes < 0 or self.host_reserve_bytes < 0 or self.max_replans < 0:
            raise ValueError("reserve_min_bytes, host_reserve_bytes, max_replans must be >= 0")
        if self.cpu_policy not in ("copy", "mmap"):
            raise ValueError(f"cpu_policy must be 'copy' or 'mmap', got {self.cpu_policy!r}")
        if self.cpu_memory_bytes is not None and self.cpu_memory_bytes < 0:
            raise ValueError(f"cpu_memory_bytes must be >= 0, got {self.cpu_memory_bytes}")
        if not (isinstance(self.huge_pages, bool) or self.huge_pages == "auto"):
            raise ValueError(f"huge_pages must be True, False or 'auto', got {self.huge_pages!r}")
        if not (isinstance(self.direct_io, bool) or self.direct_io == "auto"):
            raise ValueError(f"direct_io must be True, False or 'auto', got {self.direct_io!r}")
        if self.staging_bytes < self.chunk_bytes:
            raise ValueError("staging_bytes must be at least chunk_bytes")
        object.__setattr__(self, "max_memory", _caps(self.max_memory))

    @property
    def target_dtype(self) -> torch.dtype | None:
        """The target dtype as a torch dtype (imports torch), or ``None`` for as-stored."""
        code = self.target_code
        return None if code is None else torch_dtype(code)

    @property
    def target_code(self) -> str | None:
        """The safetensors code of the target dtype (``"BF16"``), or ``None`` for as-stored."""
        assert self.dtype is None or isinstance(self.dtype, str)
        return self.dtype

    @property
    def memory_caps(self) -> Mapping[str, int]:
        """``max_memory`` after parsing: device name -> the most a load may take there."""
        return {device: int(value) for device, value in (self.max_memory or {}).items()}

    def reserve_for(self, total_bytes: int) -> int:
        """Per-GPU reserve: ``max(reserve_fraction x total, reserve_min_bytes)``."""
        return max(int(self.reserve_fraction * total_bytes), self.reserve_min_bytes)
