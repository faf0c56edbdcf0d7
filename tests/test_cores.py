"""--threads' default: the cores in the affinity mask, fewer where a CFS quota gives less CPU time.

Each case is a cgroup file system laid out in tmp_path as the kernel shows it (version 2's ``cpu.max``,
version 1's ``cpu.cfs_quota_us``/``cpu.cfs_period_us``) with the ``/proc/self/cgroup`` that points into it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptavg import api, cores

MASK = len(os.sched_getaffinity(0))


def cgroup_fs(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    (tmp_path / "proc_cgroup").write_text(proc)
    return root, tmp_path / "proc_cgroup"


@pytest.mark.parametrize(
    ("proc", "files", "quota"),
    [
        # version 2, a container's own namespace: the limit sits at the mount (docker --cpus 4)
        ("0::/\n", {"cpu.max": "400000 100000\n"}, 4),
        # version 2 without a namespace: the pod's limit is two levels above the process's cgroup
        (
            "0::/kubepods/pod1/ctr\n",
            {"kubepods/pod1/cpu.max": "250000 100000\n", "kubepods/pod1/ctr/cpu.max": "max 100000\n"},
            3,  # 2.5 cores' time: rounded up
        ),
        # the tightest limit on the way up wins
        ("0::/a/b\n", {"a/cpu.max": "100000 100000\n", "a/b/cpu.max": "800000 100000\n"}, 1),
        ("0::/a\n", {"a/cpu.max": "max 100000\n"}, None),  # no quota
        ("0::/a\n", {"a/cpu.max": "50000 100000\n"}, 1),  # half a core: one thread
        # version 1 (as on this project's VM): the cpu controller's mount, -1 for no quota
        ("4:memory:/x\n1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        (
            "3:cpu,cpuacct:/docker/abc\n",  # the host's path; the container sees its own cgroup at the mount
            {"cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            2,
        ),
        ("0::/a\n", {"a/cpu.max": "garbage\n"}, None),  # unreadable limits are no limits
        ("0::/a\n", {}, None),
    ],
)
def test_the_tightest_cfs_quota_above_the_process_in_whole_cores(tmp_path: Path, proc: str, files, quota):
    root, proc_cgroup = cgroup_fs(tmp_path, proc, files)
    assert cores.cpu_quota(root, proc_cgroup) == quota
    assert cores.available_cores(root, proc_cgroup) == max(1, min(MASK, quota or MASK))


def test_without_cgroup_files_the_default_is_the_affinity_mask(tmp_path: Path):
    assert cores.cpu_quota(tmp_path / "none", tmp_path / "no_proc_cgroup") is None
    assert cores.available_cores(tmp_path / "none", tmp_path / "no_proc_cgroup") == MASK


def test_a_quota_above_the_mask_leaves_the_mask(tmp_path: Path):
    root, proc_cgroup = cgroup_fs(tmp_path, "0::/\n", {"cpu.max": f"{(MASK + 8) * 100000} 100000\n"})
    assert cores.available_cores(root, proc_cgroup) == MASK


def test_the_default_is_the_cores_this_process_may_use():
    assert cores.available_cores() == min(MASK, cores.cpu_quota() or MASK)
    assert api.Options().threads is None  # resolved when the run starts
