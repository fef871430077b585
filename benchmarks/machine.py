"""Facts about the machine a benchmark ran on, from ``/proc``, ``/sys`` and ``statvfs`` (what
``df`` reports). Device kinds and sizes, never paths."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "streamload",
    "torch",
    "safetensors",
    "anyio",
    "transformers",
    "accelerate",
    "runai-model-streamer",
    "fastsafetensors",
)

_DEVICE_KINDS = (
    ("nvme", "NVMe"),
    ("vd", "virtio block"),
    ("xvd", "Xen block"),
    ("sd", "SCSI/SATA"),
    ("md", "software RAID"),
    ("dm-", "device mapper"),
    ("loop", "loop device"),
)


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _meminfo_gib(field: str) -> float | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def cpu() -> dict[str, Any]:
    model = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    quota = _read("/sys/fs/cgroup/cpu.max")
    limit = None
    if quota and not quota.startswith("max"):
        max_us, period_us = quota.split()
        limit = round(int(max_us) / int(period_us), 2)
    return {
        "model": model or platform.processor() or "unknown",
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cgroup_cpu_limit": limit,
    }


def memory() -> dict[str, Any]:
    limit = _read("/sys/fs/cgroup/memory.max")
    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled") or ""
    mode = thp[thp.find("[") + 1 : thp.find("]")] if "[" in thp else None
    return {
        "total_gib": _meminfo_gib("MemTotal"),
        "available_gib": _meminfo_gib("MemAvailable"),
        "cgroup_limit_gib": (round(int(limit) / 2**30, 1) if limit and limit.isdigit() else None),
        "transparent_hugepages": mode,
    }


def _mount_of(path: Path) -> tuple[str, str] | None:
    """(filesystem type, source) of the mount holding ``path``, from ``/proc/self/mountinfo``."""
    best: tuple[int, str, str] | None = None
    target = str(path.resolve())
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        point = fields[4]
        dash = fields.index("-")
        fstype, source = fields[dash + 1], fields[dash + 2]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > best[0]):
            best = (len(point), fstype, source)
    return None if best is None else (best[1], best[2])


def _block_device(source: str) -> dict[str, Any]:
    name = Path(source).name if source.startswith("/dev/") else None
    if not name:
        return {"kind": "not a block device"}
    disk = name
    if not Path(f"/sys/block/{disk}").exists():  # a partition: find its disk
        parent = Path(f"/sys/class/block/{name}").resolve().parent.name
        disk = parent if Path(f"/sys/block/{parent}").exists() else name
    kind = next((k for prefix, k in _DEVICE_KINDS if disk.startswith(prefix)), "block device")
    rotational = _read(f"/sys/block/{disk}/queue/rotational")
    return {
        "name": disk,
        "kind": kind,
        "model": _read(f"/sys/block/{disk}/device/model"),
        "rotational": None if rotational is None else rotational == "1",
        "scheduler": _read(f"/sys/block/{disk}/queue/scheduler"),
    }


def storage(path: Path) -> dict[str, Any]:
    """The filesystem and device holding ``path`` (kinds and sizes only)."""
    mount = _mount_of(path)
    stat = os.statvfs(path)
    facts: dict[str, Any] = {
        "filesystem": mount[0] if mount else "unknown",
        "size_gib": round(stat.f_blocks * stat.f_frsize / 2**30),
        "free_gib": round(stat.f_bavail * stat.f_frsize / 2**30),
    }
    if mount:
        facts["device"] = _block_device(mount[1])
    return facts


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def commit(root: Path) -> str | None:
    """The checked-out commit, with ``+dirty`` when ``streamload/`` has local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "streamload"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def facts(checkpoint_dir: Path, root: Path) -> dict[str, Any]:
    return {
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu(),
        "memory": memory(),
        "storage": storage(checkpoint_dir),
        "versions": versions(),
        "streamload_commit": commit(root),
        "platform": sys.platform,
    }
