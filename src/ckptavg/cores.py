"""The cores this process may use: ``--threads``' default.

Two things narrow them. The CPU affinity mask (``os.sched_getaffinity``): SLURM's cgroup cpuset, ``taskset``,
``docker --cpuset-cpus``. And a CFS bandwidth quota, which leaves the mask whole: ``docker --cpus 4`` or a
Kubernetes CPU limit of 4 on a 64-core node show 64 cores in the mask but give 4 cores' time, so 64 threads
would spend most of it waiting for their turn. The quota is read from the cgroup file system, version 2
(``cpu.max``) or version 1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), at the process's cgroup and every
cgroup above it (a parent's limit binds its children); the tightest wins, rounded up to whole cores.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def available_cores(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The cores in the affinity mask, or fewer where a CFS quota allows less time (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(root, proc_cgroup)
    return max(1, min(cores, quota)) if quota is not None else max(1, cores)


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """Whole cores' worth of CPU time the tightest CFS quota above this process allows (rounded up), or
    None where no quota is set or the cgroup files cannot be read (not Linux, no cgroup mount)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # version 2: one hierarchy, mounted at the root
            limits += _walk(root, path, _v2_limit)
        elif "cpu" in controllers.split(","):  # version 1: the cpu controller's own mount
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    limits += _walk(mount, path, _v1_limit)
                    break
    return max(1, math.ceil(min(limits))) if limits else None


def _walk(mount: Path, path: str, limit_of: Callable[[Path], float | None]) -> list[float]:
    """The limits found at ``path`` under ``mount`` and at each folder above it, up to the mount itself.
    In a container with its own cgroup namespace the path reads ``/`` and the mount is the container's
    cgroup, whose limit sits at the mount."""
    found = []
    parts = PurePosixPath(path).parts[1:] if path.startswith("/") else ()
    for depth in range(len(parts), -1, -1):
        at = mount.joinpath(*parts[:depth])
        value = limit_of(at)
        if value is not None:
            found.append(value)
    return found


def _v2_limit(folder: Path) -> float | None:
    """``cpu.max``: "QUOTA PERIOD" in microseconds, or "max PERIOD" for none."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" and int(period) > 0 and int(quota) > 0 else None
    except (OSError, ValueError):
        return None


def _v1_limit(folder: Path) -> float | None:
    """``cpu.cfs_quota_us`` (-1 for none) over ``cpu.cfs_period_us``."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
