"""devices: CUDA_VISIBLE_DEVICES rules, NVML mapping and errors, host memory, the CPU device,
discovery and validation, the reservation ledger, and (with CUDA) the CUDA device."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml
import pytest
import torch

from streamload._state import ReservationBook
from streamload.devices import (
    DONE,
    CpuDevice,
    CudaDevice,
    CudaFence,
    Device,
    DeviceSpec,
    Fence,
    Nvml,
    NvmlMemory,
    VisibleGpu,
    host_available_bytes,
    host_total_bytes,
    nvml_uuid_from_torch,
    parse_cuda_visible_devices,
    resolve_devices,
    resolve_nvml_handle,
)
from streamload.errors import DeviceError
from streamload.testing._simulated import SimulatedGPU

GiB = 2**30

# Three GPUs in NVML index order; the first two share the prefix "GPU-8932f93".
U0 = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
U1 = "GPU-8932f938-0000-4106-c12f-20bd9faed9f6"
U2 = "GPU-1d4e0a55-3b1f-4c2a-9d10-6f2b8e7c1a00"
UUIDS = (U0, U1, U2)
MIG_A = "MIG-5c6f4f4e-2a4b-5d7e-9f10-aabbccddeeff"
MIG_B = "MIG-0a1b2c3d-4e5f-5a6b-8c7d-112233445566"


# --------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, [0, 1, 2], id="unset-all"),
        pytest.param("", [], id="empty-none"),
        pytest.param("2,1", [2, 1], id="reorder"),
        pytest.param("1", [1], id="single"),
        pytest.param("0,2,-1,1", [0, 2], id="negative-ends-list"),
        pytest.param("0,x,1", [0], id="invalid-ends-list"),
        pytest.param("abc", [], id="invalid-first"),
        pytest.param("0,0", [], id="duplicate-empties"),
        pytest.param("1,0,1", [], id="late-duplicate-empties"),
        pytest.param("1gpu2,2ampere", [1, 2], id="strtoul-prefix"),
        pytest.param("0,3,1", [0], id="index-past-last-ends-list"),
        pytest.param(" 2 , 0", [2, 0], id="spaces"),
        pytest.param("+1", [1], id="plus-sign"),
        pytest.param(f"{U2},{U0}", [2, 0], id="full-uuids"),
        pytest.param("GPU-8932f937,GPU-1d4e", [0, 2], id="unique-prefixes"),
        pytest.param("GPU-8932f93", [], id="ambiguous-prefix"),
        pytest.param("GPU-1d4e,GPU-8932f93,GPU-8932f937", [2], id="ambiguous-ends-list"),
        pytest.param("GPU-deadbeef,GPU-1d4e", [], id="unknown-uuid"),
        pytest.param("GPU-1d4e,1", [2], id="index-after-uuid-ends-list"),
        pytest.param(f"GPU-8932f937,{U0}", [], id="uuid-duplicate-empties"),
        pytest.param("GPU-", [], id="bare-prefix-ambiguous"),
    ],
)
def test_parse_cuda_visible_devices(value: str | None, expected: list[int]) -> None:
    """Each CUDA_VISIBLE_DEVICES rule maps to the NVML indices CUDA would make visible, in
    CUDA ordinal order."""
    gpus = parse_cuda_visible_devices(value, UUIDS)
    assert expected == [g.nvml_index for g in gpus]
    assert list(range(len(expected))) == [g.ordinal for g in gpus]
    assert [UUIDS[i] for i in expected] == [g.uuid for g in gpus]


@pytest.mark.parametrize(
    ("value", "entry"),
    [
        pytest.param(f"{MIG_A},{MIG_B}", MIG_A, id="mig-uuid-first-only"),
        pytest.param(f"MIG-{U0.removeprefix('GPU-')}", f"MIG-{U0.removeprefix('GPU-')}", id="mig"),
        pytest.param(f"MIG-{U0}/1/0", f"MIG-{U0}/1/0", id="mig-legacy-form"),
    ],
)
def test_parse_mig_entries(value: str, entry: str) -> None:
    """A MIG list makes exactly one instance visible, as ordinal 0, with no NVML GPU index."""
    assert [VisibleGpu(0, entry, None)] == parse_cuda_visible_devices(value, UUIDS)


def test_parse_with_no_gpus() -> None:
    """With no NVML GPUs every integer list is empty."""
    assert [] == parse_cuda_visible_devices("0,1", [])


# --------------------------------------------------------------------------------------------
# A fake pynvml


@dataclass
class FakeGpu:
    """A GPU or MIG instance as a fake NVML handle."""

    uuid: str
    free: int = 10 * GiB
    total: int = 80 * GiB
    mig_mode: int | None = None  # None: GetMigMode raises NotSupported
    instances: list[FakeGpu] = field(default_factory=list)


@dataclass
class FakeMemory:
    total: int
    free: int
    used: int


class FakeNvml:
    """The ``NvmlApi`` subset, raising real ``pynvml`` errors; records lookups."""

    def __init__(
        self,
        gpus: Sequence[FakeGpu],
        *,
        init_error: Exception | None = None,
        uuid_bytes: bool = False,
        fail: dict[str, Exception] | None = None,
    ) -> None:
        self.gpus = list(gpus)
        self.init_error = init_error
        self.uuid_bytes = uuid_bytes
        self.fail = fail or {}
        self.inits = 0
        self.lookups: list[str] = []

    def _maybe_fail(self, call: str) -> None:
        if call in self.fail:
            raise self.fail[call]

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlDeviceGetCount(self) -> int:
        self._maybe_fail("count")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self._maybe_fail("by_index")
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError_InvalidArgument()
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any:
        self.lookups.append(uuid)
        self._maybe_fail("by_uuid")
        for gpu in self.gpus:
            for candidate in [gpu, *gpu.instances]:
                if candidate.uuid == uuid:
                    return candidate
        raise pynvml.NVMLError_NotFound()

    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes:
        self._maybe_fail("uuid")
        text: str = handle.uuid
        return text.encode() if self.uuid_bytes else text

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        self._maybe_fail("memory")
        return FakeMemory(handle.total, handle.free, handle.total - handle.free)

    def nvmlDeviceGetMigMode(self, handle: Any) -> Sequence[int]:
        self._maybe_fail("mig")
        if handle.mig_mode is None:
            raise pynvml.NVMLError_NotSupported()
        return [handle.mig_mode, handle.mig_mode]


def three_gpus() -> list[FakeGpu]:
    return [FakeGpu(U0, free=1 * GiB), FakeGpu(U1, free=2 * GiB), FakeGpu(U2, free=3 * GiB)]


# --------------------------------------------------------------------------------------------
# Nvml: the error boundary


@pytest.mark.parametrize(
    "error", [pynvml.NVMLError_LibraryNotFound(), pynvml.NVMLError_DriverNotLoaded()]
)
def test_missing_library_or_driver_means_no_nvml(error: Exception) -> None:
    """A missing NVML library or driver makes NVML unavailable (no error), decided once."""
    fake = FakeNvml([], init_error=error)
    nvml = Nvml(fake)
    assert (False, False, 1) == (nvml.available(), nvml.available(), fake.inits)


def test_init_succeeds_once() -> None:
    """NVML is initialised on first use, and only once."""
    fake = FakeNvml(three_gpus())
    nvml = Nvml(fake)
    assert (True, True, 1) == (nvml.available(), nvml.available(), fake.inits)


def test_other_init_errors_become_device_errors() -> None:
    """Any other ``nvmlInit`` failure is a ``DeviceError`` naming the device, chained to the
    NVML error."""
    nvml = Nvml(FakeNvml([], init_error=pynvml.NVMLError_NoPermission()))
    with pytest.raises(DeviceError) as caught:
        nvml.available(device="cuda:1")
    assert "cuda:1" == caught.value.device
    assert "Insufficient Permissions" in str(caught.value)
    assert isinstance(caught.value.__cause__, pynvml.NVMLError_NoPermission)


@pytest.mark.parametrize(
    ("call", "use"),
    [
        ("count", lambda n: n.gpu_uuids(device="cuda:2")),
        ("by_index", lambda n: n.gpu_uuids(device="cuda:2")),
        ("uuid", lambda n: n.gpu_uuids(device="cuda:2")),
        ("memory", lambda n: n.memory(FakeGpu(U0), device="cuda:2")),
        ("by_uuid", lambda n: n.handle_by_uuid(U0, device="cuda:2")),
        ("mig", lambda n: n.mig_enabled(FakeGpu(U0), device="cuda:2")),
    ],
)
def test_nvml_errors_become_device_errors(call: str, use: Any) -> None:
    """Every NVML call turns an ``NVMLError`` into a ``DeviceError`` for the device it was
    made for, ``raise ... from`` the original."""
    nvml = Nvml(FakeNvml(three_gpus(), fail={call: pynvml.NVMLError_GpuIsLost()}))
    with pytest.raises(DeviceError) as caught:
        use(nvml)
    assert "cuda:2" == caught.value.device
    assert "GPU is lost" in str(caught.value)
    assert isinstance(caught.value.__cause__, pynvml.NVMLError_GpuIsLost)


@pytest.mark.parametrize("as_bytes", [False, True], ids=["str", "bytes"])
def test_gpu_uuids_are_text_in_nvml_order(as_bytes: bool) -> None:
    """UUIDs come back as ``str`` whether the pynvml release returns ``str`` or ``bytes``."""
    nvml = Nvml(FakeNvml(three_gpus(), uuid_bytes=as_bytes))
    assert list(UUIDS) == nvml.gpu_uuids()


def test_memory_reading() -> None:
    """``memory`` returns NVML's total, free and used bytes."""
    nvml = Nvml(FakeNvml(three_gpus()))
    gpu = FakeGpu(U0, free=5 * GiB, total=40 * GiB)
    assert NvmlMemory(40 * GiB, 5 * GiB, 35 * GiB) == nvml.memory(gpu, device="cuda:0")


@pytest.mark.parametrize("error", [pynvml.NVMLError_NotFound(), pynvml.NVMLError_InvalidArgument()])
def test_unknown_uuid_is_none(error: Exception) -> None:
    """A UUID NVML does not know (or a form it does not take) is ``None``, not an error."""
    nvml = Nvml(FakeNvml([], fail={"by_uuid": error}))
    assert nvml.handle_by_uuid(U0, device="cuda:0") is None


@pytest.mark.parametrize(
    ("mode", "expected"),
    [(None, False), (0, False), (1, True)],
    ids=["unsupported", "disabled", "enabled"],
)
def test_mig_mode(mode: int | None, expected: bool) -> None:
    """MIG mode reads current mode; a GPU without MIG support says no."""
    nvml = Nvml(FakeNvml([]))
    assert expected == nvml.mig_enabled(FakeGpu(U0, mig_mode=mode), device="cuda:0")


# --------------------------------------------------------------------------------------------
# torch ordinal -> NVML handle


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="none"),
        pytest.param("8932f937-d72c-4106-c12f-20bd9faed9f6", U0, id="bare-str"),
        pytest.param(U0, U0, id="prefixed-str"),
        pytest.param(U0.upper().replace("GPU-", ""), U0, id="upper"),
        pytest.param(uuid.UUID(U0[4:]).bytes, U0, id="raw-bytes"),
        pytest.param(U0[4:].encode(), U0, id="ascii-bytes"),
        pytest.param("not-a-uuid", None, id="garbage"),
        pytest.param(b"\x01\x02", None, id="short-bytes"),
    ],
)
def test_nvml_uuid_from_torch(value: object, expected: str | None) -> None:
    """torch's device UUID in any of its forms becomes NVML's ``GPU-...`` text."""
    assert expected == nvml_uuid_from_torch(value)


class CUuuidLike:
    """Stands in for ``torch._C._CUuuid``: ``str()`` and a ``bytes`` list of 16 ints."""

    def __init__(self, text: str, *, printable: bool = True) -> None:
        self._text = text
        self._printable = printable

    def __str__(self) -> str:
        return self._text if self._printable else "<_CUuuid>"

    @property
    def bytes(self) -> list[int]:
        return list(uuid.UUID(self._text).bytes)


@pytest.mark.parametrize("printable", [True, False], ids=["str", "bytes-list"])
def test_nvml_uuid_from_cuuuid_object(printable: bool) -> None:
    """A ``_CUuuid`` is read through ``str()``, else through its 16 ``bytes``."""
    assert U2 == nvml_uuid_from_torch(CUuuidLike(U2[4:], printable=printable))


def resolve(
    fake: FakeNvml,
    ordinal: int,
    *,
    torch_uuid: str | None = None,
    visible: str | None = None,
    order: str | None = None,
) -> Any:
    return resolve_nvml_handle(
        Nvml(fake), ordinal, torch_uuid=torch_uuid, visible=visible, device_order=order
    )


def test_handle_by_torch_uuid_ignores_order() -> None:
    """With torch's UUID the handle is found by UUID, whatever the NVML index."""
    gpus = three_gpus()
    assert gpus[2] is resolve(FakeNvml(gpus), 0, torch_uuid=U2, visible="0,1")


def test_handle_by_torch_uuid_of_mig_instance() -> None:
    """A UUID NVML knows only as ``MIG-<uuid>`` resolves to that MIG instance."""
    instance = FakeGpu("MIG-" + U1[4:], free=7 * GiB)
    parent = FakeGpu(U0, mig_mode=1, instances=[instance])
    assert instance is resolve(FakeNvml([parent]), 0, torch_uuid="GPU-" + U1[4:])


def test_mig_parent_resolves_to_visible_instance() -> None:
    """When torch names a GPU in MIG mode, the MIG instance from CUDA_VISIBLE_DEVICES is the
    handle: the parent's memory is the sum of all instances."""
    instance = FakeGpu(MIG_A, free=7 * GiB)
    parent = FakeGpu(U0, mig_mode=1, instances=[instance])
    assert instance is resolve(FakeNvml([parent]), 0, torch_uuid=U0, visible=MIG_A)


def test_mig_parent_without_instance_is_unknown() -> None:
    """A GPU in MIG mode with no MIG instance named is not used: the caller falls back."""
    parent = FakeGpu(U0, mig_mode=1, instances=[FakeGpu(MIG_A)])
    assert resolve(FakeNvml([parent]), 0, torch_uuid=U0) is None


def test_legacy_mig_form_is_not_looked_up() -> None:
    """``MIG-GPU-<uuid>/<gi>/<ci>`` is not a UUID NVML looks up; no call is made for it."""
    fake = FakeNvml([FakeGpu(U0, mig_mode=1)])
    assert resolve(fake, 0, visible=f"MIG-{U0}/1/0") is None
    assert [] == fake.lookups


@pytest.mark.parametrize(
    ("visible", "order", "ordinal", "expected"),
    [
        pytest.param("GPU-1d4e,GPU-8932f937", None, 1, 0, id="uuid-entries"),
        pytest.param("2,0", "PCI_BUS_ID", 0, 2, id="pci-order-indices"),
        pytest.param(None, "PCI_BUS_ID", 1, 1, id="pci-order-unset"),
        pytest.param("2,0", None, 0, None, id="fastest-first-unknown"),
        pytest.param(None, None, 0, None, id="unset-fastest-first-unknown"),
        pytest.param("2", "PCI_BUS_ID", 1, None, id="ordinal-not-visible"),
    ],
)
def test_handle_from_cuda_visible_devices(
    visible: str | None, order: str | None, ordinal: int, expected: int | None
) -> None:
    """Without torch's UUID, CUDA_VISIBLE_DEVICES maps ordinals to NVML only where it fixes
    the order (UUID entries, or ``CUDA_DEVICE_ORDER=PCI_BUS_ID``)."""
    gpus = three_gpus()
    handle = resolve(FakeNvml(gpus), ordinal, visible=visible, order=order)
    assert (None if expected is None else gpus[expected]) is handle


def test_single_gpu_maps_without_hints() -> None:
    """With one GPU, ordinal 0 is NVML index 0 whatever the device order."""
    gpu = FakeGpu(U0)
    assert gpu is resolve(FakeNvml([gpu]), 0)


def test_no_nvml_resolves_nothing() -> None:
    """Without NVML there is no handle (the caller uses ``mem_get_info``)."""
    fake = FakeNvml(three_gpus(), init_error=pynvml.NVMLError_LibraryNotFound())
    assert resolve(fake, 0, torch_uuid=U0) is None


def test_resolution_error_names_the_ordinal() -> None:
    """An NVML failure while mapping names the CUDA device being mapped."""
    fake = FakeNvml(three_gpus(), fail={"count": pynvml.NVMLError_Unknown()})
    with pytest.raises(DeviceError) as caught:
        resolve(fake, 3, visible="0", order="PCI_BUS_ID")
    assert "cuda:3" == caught.value.device


# --------------------------------------------------------------------------------------------
# Host memory


MEMINFO = "MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n"


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def host(tmp_path: Path, files: dict[str, str], self_cgroup: str = "0::/\n") -> tuple[int, int]:
    write_tree(tmp_path, {"meminfo": MEMINFO, "self": self_cgroup, **files})
    paths = {
        "meminfo": tmp_path / "meminfo",
        "cgroup_fs": tmp_path / "fs",
        "self_cgroup": tmp_path / "self",
    }
    return host_available_bytes(**paths), host_total_bytes(**paths)


def test_host_memory_is_sane() -> None:
    """On this host, available memory is positive and at most the total."""
    available = host_available_bytes()
    assert 0 < available <= host_total_bytes()


def test_meminfo_without_cgroup_limit(tmp_path: Path) -> None:
    """Without a memory cgroup limit the numbers are ``MemAvailable`` and ``MemTotal``."""
    files = {"fs/cgroup.controllers": "memory\n", "fs/memory.max": "max\n"}
    assert (20000000 * 1024, 32000000 * 1024) == host(tmp_path, files)


def test_cgroup_v2_limit_caps_host_memory(tmp_path: Path) -> None:
    """A cgroup v2 limit caps total, and its headroom (limit - usage + inactive file cache)
    caps available, taking the tightest level from the process's cgroup up."""
    files = {
        "fs/cgroup.controllers": "memory\n",
        "fs/kubepods/memory.max": f"{16 * GiB}\n",
        "fs/kubepods/memory.current": f"{4 * GiB}\n",
        "fs/kubepods/memory.stat": "anon 1\n",
        "fs/kubepods/pod/memory.max": f"{8 * GiB}\n",
        "fs/kubepods/pod/memory.current": f"{6 * GiB}\n",
        "fs/kubepods/pod/memory.stat": f"anon 5\ninactive_file {1 * GiB}\nactive_file 7\n",
    }
    assert (3 * GiB, 8 * GiB) == host(tmp_path, files, "0::/kubepods/pod\n")


def test_cgroup_v1_limit_caps_host_memory(tmp_path: Path) -> None:
    """A cgroup v1 memory controller limit caps total and available the same way."""
    files = {
        "fs/memory/memory.limit_in_bytes": "9223372036854771712\n",
        "fs/memory/memory.usage_in_bytes": "5\n",
        "fs/memory/job/memory.limit_in_bytes": f"{4 * GiB}\n",
        "fs/memory/job/memory.usage_in_bytes": f"{2 * GiB}\n",
        "fs/memory/job/memory.stat": f"inactive_file 1\ntotal_inactive_file {GiB}\n",
    }
    assert (3 * GiB, 4 * GiB) == host(tmp_path, files, "4:memory:/job\n0::/\n")


def test_cgroup_path_hidden_uses_mount_root(tmp_path: Path) -> None:
    """Inside a container the host's cgroup path is not mounted; the mount root is read."""
    files = {
        "fs/cgroup.controllers": "memory\n",
        "fs/memory.max": f"{2 * GiB}\n",
        "fs/memory.current": f"{GiB}\n",
    }
    assert (GiB, 2 * GiB) == host(tmp_path, files, "0::/docker/abc\n")


def test_cgroup_limits_and_usage_are_read_afresh_on_every_call(tmp_path: Path) -> None:
    """Where the process's cgroup directories are is found once; a limit set, changed or
    lifted later, and usage that grows, show on the next reading."""
    files = {
        "fs/cgroup.controllers": "memory\n",
        "fs/job/memory.max": "max\n",
        "fs/job/memory.current": f"{GiB}\n",
    }
    unlimited = (20000000 * 1024, 32000000 * 1024)
    assert unlimited == host(tmp_path, files, "0::/job\n")

    files["fs/job/memory.max"] = f"{4 * GiB}\n"
    assert (3 * GiB, 4 * GiB) == host(tmp_path, files, "0::/job\n")

    files["fs/job/memory.current"] = f"{3 * GiB}\n"
    assert (GiB, 4 * GiB) == host(tmp_path, files, "0::/job\n")

    files["fs/job/memory.max"] = "max\n"
    assert unlimited == host(tmp_path, files, "0::/job\n")


def test_meminfo_missing_falls_back_to_sysconf(tmp_path: Path) -> None:
    """Without ``/proc/meminfo`` the host's page counts from ``os.sysconf`` are used."""
    paths = {
        "meminfo": tmp_path / "absent",
        "cgroup_fs": tmp_path / "fs",
        "self_cgroup": tmp_path / "absent",
    }
    assert 0 < host_available_bytes(**paths) <= host_total_bytes(**paths)


# --------------------------------------------------------------------------------------------
# CPU device


def test_cpu_device_protocol() -> None:
    """The CPU is an unstaged non-GPU ``Device`` named ``cpu`` reporting host memory."""
    cpu = CpuDevice()
    assert isinstance(cpu, Device)
    assert ("cpu", False, False) == (cpu.name, cpu.is_gpu, cpu.staged)
    assert 0 < cpu.live_free_bytes() <= cpu.total_bytes()


def test_cpu_empty_host_buffer_and_copy() -> None:
    """``empty`` and ``host_buffer`` make CPU tensors; ``copy_from_host`` copies at once and
    returns the done fence."""
    cpu = CpuDevice()
    dst = cpu.empty((2, 3), torch.float16)
    assert ((2, 3), torch.float16, torch.device("cpu")) == (tuple(dst.shape), dst.dtype, dst.device)
    src = cpu.host_buffer(12)
    src.copy_(torch.arange(12, dtype=torch.uint8))
    fence = cpu.copy_from_host(dst.view(-1).view(torch.uint8), src)
    cpu.synchronize()
    assert (DONE, list(range(12))) == (fence, dst.view(-1).view(torch.uint8).tolist())


def test_cpu_out_of_memory_is_torch_oom() -> None:
    """The CPU allocator's failure surfaces as ``torch.OutOfMemoryError``, as on a GPU."""
    with pytest.raises(torch.OutOfMemoryError, match="cpu"):
        CpuDevice().empty((2**60,), torch.uint8)


def test_done_fence() -> None:
    """``DONE`` is a ``Fence`` that is always done and never waits."""
    assert isinstance(DONE, Fence)
    DONE.wait()
    assert (True, "DONE") == (DONE.done(), repr(DONE))


# --------------------------------------------------------------------------------------------
# Discovery and validation


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")


@no_cuda
def test_auto_without_cuda_is_cpu_only() -> None:
    """``"auto"`` on a host without CUDA is just the CPU, with no error."""
    devices = resolve_devices("auto")
    assert ["cpu"] == [d.name for d in devices]
    assert isinstance(devices[0], CpuDevice)


@no_cuda
def test_auto_without_nvml_is_cpu_only() -> None:
    """A missing NVML library does not stop discovery."""
    nvml = Nvml(FakeNvml([], init_error=pynvml.NVMLError_LibraryNotFound()))
    assert ["cpu"] == [d.name for d in resolve_devices("auto", nvml=nvml)]


def test_device_objects_pass_through() -> None:
    """Device objects are kept as given, in order, next to named devices."""
    a, b = SimulatedGPU("sim:0"), SimulatedGPU("sim:1")
    devices = resolve_devices([a, b, "cpu"])
    assert [a, b] == devices[:2]
    assert isinstance(devices[2], CpuDevice)


@pytest.mark.parametrize(
    ("spec", "device"),
    [
        pytest.param(["gpu"], "gpu", id="unknown-name"),
        pytest.param(["cuda"], "cuda", id="cuda-without-ordinal"),
        pytest.param(["CPU"], "CPU", id="case"),
        pytest.param(["cuda:-1"], "cuda:-1", id="negative-ordinal"),
        pytest.param(["cuda:999"], "cuda:999", id="ordinal-not-visible"),
        pytest.param("everything", "everything", id="bad-string-spec"),
        pytest.param([], "devices", id="empty"),
        pytest.param([42], "42", id="not-a-device"),
        pytest.param(["cpu", "cpu"], "cpu", id="duplicate-cpu"),
        pytest.param([SimulatedGPU("sim:0"), SimulatedGPU("sim:0")], "sim:0", id="duplicate"),
        pytest.param(["cpu", SimulatedGPU("sim:0")], "cpu", id="cpu-not-last"),
    ],
)
def test_resolve_devices_rejects(spec: Any, device: str) -> None:
    """Unknown names, invisible ordinals, repeats and a CPU before a GPU are ``DeviceError``s
    naming the offending device."""
    with pytest.raises(DeviceError) as caught:
        resolve_devices(spec)
    assert device == caught.value.device


@no_cuda
def test_cuda_device_without_cuda_is_a_device_error() -> None:
    """Asking for a CUDA device torch cannot see is a ``DeviceError``, not an assertion."""
    with pytest.raises(DeviceError, match="not visible"):
        CudaDevice(0)


def test_device_spec_alias_accepts_lists() -> None:
    """``DeviceSpec`` is the annotation for ``"auto"`` or a device list."""
    spec: DeviceSpec = ["cpu"]
    assert ["cpu"] == [d.name for d in resolve_devices(spec)]


# --------------------------------------------------------------------------------------------
# Reservations


def test_reservations_count_others_only() -> None:
    """``held_by_others`` sums every other owner's bytes on that device, never the caller's;
    ``None`` as the owner sums everyone's."""
    book = ReservationBook()
    a, b = object(), object()
    book.reserve(a, "cuda:0", 100)
    book.reserve(b, "cuda:0", 30)
    book.reserve(b, "cuda:1", 5)
    assert (30, 100, 130, 0) == (
        book.held_by_others(a, "cuda:0"),
        book.held_by_others(b, "cuda:0"),
        book.held_by_others(None, "cuda:0"),
        book.held_by_others(b, "cuda:1"),
    )
    book.replace(a, {"cuda:0": 40})
    assert (40, 30) == (book.held_by_others(b, "cuda:0"), book.held_by_others(a, "cuda:0"))
    book.release_all(b)
    assert (0, 0) == (book.held_by_others(a, "cuda:0"), book.held_by_others(a, "cuda:1"))


def test_reservations_accept_unhashable_owners() -> None:
    """Owners are compared by identity, so any object (even an unhashable one) can own."""
    book = ReservationBook()
    owner: dict[str, int] = {}
    book.reserve(owner, "sim:0", 7)
    assert 7 == book.held_by_others({}, "sim:0")
    book.replace(owner, {})
    assert 0 == book.held_by_others(None, "sim:0")


@pytest.mark.parametrize(
    "call",
    [
        lambda b, o: b.reserve(o, "cuda:0", -1),
        lambda b, o: b.replace(o, {"cuda:0": -1}),
    ],
    ids=["reserve-negative", "replace-negative"],
)
def test_reservation_misuse_is_value_error(call: Any) -> None:
    """Negative amounts are ``ValueError``s that change nothing."""
    book = ReservationBook()
    owner = object()
    book.reserve(owner, "cuda:0", 10)
    with pytest.raises(ValueError):
        call(book, owner)
    assert 10 == book.held_by_others(None, "cuda:0")


def test_release_all_unknown_owner_is_noop() -> None:
    """Releasing everything of an owner that holds nothing is harmless."""
    book = ReservationBook()
    book.release_all(object())
    assert 0 == book.held_by_others(None, "cpu")


def test_reservations_under_threads() -> None:
    """Sixteen threads reserving and releasing concurrently leave an exact, empty ledger, and
    every reading in between is a whole number of reservations."""
    book = ReservationBook()
    start = threading.Barrier(16)
    observed: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        owner = object()
        try:
            start.wait()
            for i in range(500):
                book.reserve(owner, "cuda:0", 8)
                book.reserve(owner, f"cuda:{i % 3}", 8)
                observed.append(book.held_by_others(owner, "cuda:0") % 8)
                book.replace(owner, {"cuda:0": 8, "cuda:1": 16})
                observed.append(book.held_by_others(owner, "cuda:0") % 8)
                book.replace(owner, {})
            book.release_all(owner)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [] == errors
    assert {0} == set(observed)
    assert 0 == book.held_by_others(None, "cuda:0")
    assert [0, 0, 0] == [book.held_by_others(None, f"cuda:{i}") for i in range(3)]


# --------------------------------------------------------------------------------------------
# CUDA (only where a GPU is present)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_lists_gpus_then_cpu() -> None:
    """``"auto"`` is every CUDA GPU in torch ordinal order, then the CPU."""
    names = [d.name for d in resolve_devices("auto")]
    expected = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert [*expected, "cpu"] == names


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_memory_readings() -> None:
    """``cuda:0`` reports its total, and live free within it that grows by this process's
    unused cache."""
    device = CudaDevice(0)
    assert ("cuda:0", True, True) == (device.name, device.is_gpu, device.staged)
    total = device.total_bytes()
    assert total == torch.cuda.get_device_properties(0).total_memory
    assert 0 < device.live_free_bytes() <= total


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_round_trip() -> None:
    """A pinned staging buffer copied with ``copy_from_host`` arrives intact once its fence
    is waited, and ``synchronize`` leaves nothing in flight."""
    device = CudaDevice(0)
    src = device.host_buffer(1 << 20)
    assert src.is_pinned()
    src.copy_(torch.randint(0, 255, (1 << 20,), dtype=torch.uint8))
    dst = device.empty((1 << 18,), torch.float32)
    fence = device.copy_from_host(dst.view(torch.uint8), src)
    assert isinstance(fence, CudaFence)
    fence.wait()
    device.synchronize()
    assert fence.done()
    assert torch.equal(src, dst.view(torch.uint8).cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_oom_is_torch_oom() -> None:
    """An allocation beyond the GPU raises ``torch.OutOfMemoryError``."""
    device = CudaDevice(0)
    with pytest.raises(torch.OutOfMemoryError):
        device.empty((device.total_bytes() * 2,), torch.uint8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uuid_maps_to_nvml() -> None:
    """torch's UUID for ``cuda:0`` finds an NVML handle with the same UUID (when NVML and a
    torch with device UUIDs are present)."""
    nvml = Nvml()
    props = torch.cuda.get_device_properties(0)
    torch_uuid = nvml_uuid_from_torch(getattr(props, "uuid", None))
    if not nvml.available() or torch_uuid is None:
        pytest.skip("needs NVML and torch device UUIDs")
    handle = nvml.handle_by_uuid(torch_uuid, device="cuda:0")
    assert handle is not None
    assert torch_uuid == nvml.uuid(handle, device="cuda:0")
