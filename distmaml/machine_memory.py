"""How much memory this machine lets this process allocate: the machine's available memory, the
job's cgroup limit (SLURM, containers), this process's address-space limit (ulimit -v), or a GPU's
free memory; and sizes as they read best. The lowest layer: it knows nothing of runs, tasks or
estimates, so a task family can ask it before decoding a data set.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

GIB = 2 ** 30


def available_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes this process may still allocate, where the number comes from): the tightest of the
    machine's available memory, the job's cgroup limit and this process's address-space limit."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device}"
    available, source = _meminfo_available(), "MemAvailable in /proc/meminfo"
    for limit, where in ((_cgroup_headroom(), "this job's cgroup memory limit"),
                         (_address_space_headroom(), "this process's address-space limit, ulimit -v")):
        if limit is not None and limit < available:
            available, source = max(limit, 0), where
    return available, source


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _address_space_headroom() -> int | None:
    """RLIMIT_AS (ulimit -v) minus this process's virtual size: past it every allocation fails, however
    much memory the machine has free."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return soft - int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return soft


def _cgroup_headroom() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), as SLURM and containers set it."""
    try:
        relative = Path("/proc/self/cgroup").read_text().strip().split("::")[-1]
        group = Path("/sys/fs/cgroup") / relative.lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((group / "memory.current").read_text())
    except (OSError, ValueError, IndexError):
        return None


def describe_size(size: float) -> str:
    """Bytes as the unit that reads best: 2.41 GiB, 310 MiB, 96 KiB."""
    if size >= GIB:
        return f"{size / GIB:.2f} GiB"
    return f"{size / 2 ** 20:.0f} MiB" if size >= 2 ** 20 else f"{size / 2 ** 10:.0f} KiB"
