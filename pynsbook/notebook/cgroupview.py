"""``%cgroup``: what cgroup a process is in and which limits apply to it (its own, or one set
higher up the tree), and a container's cgroup as a table of limits, usage and files.

The readers take a ``read(path) -> text`` function, so tests can feed them a fake tree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from ..linux.mountinfo import Mount, cgroup_dir, read_mountinfo, read_proc_cgroup
from ..spec import format_size  # noqa: F401 (used by magics too)
from .table import Table

Reader = Callable[[str], Optional[str]]
_V1_UNLIMITED = 1 << 62  # v1 memory files say 9223372036854771712 for "no limit"


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class Resource:
    """How to read one resource's limit and usage in one cgroup version."""

    name: str
    controller: str  # the v1 subsystem (ignored on v2)
    limit: Callable[[str, Reader], Optional[float]]
    usage: Callable[[str, Reader], Optional[float]]
    show: Callable[[Optional[float]], str]
    show_usage: Callable[[Optional[float]], str]


def _int(text: Optional[str]) -> Optional[int]:
    if text is None or text in ("", "max"):
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def _v1_memory_limit(d: str, read: Reader) -> Optional[float]:
    v = _int(read(os.path.join(d, "memory.limit_in_bytes")))
    return None if v is None or v >= _V1_UNLIMITED else v


def _v1_cpu_limit(d: str, read: Reader) -> Optional[float]:
    quota = _int(read(os.path.join(d, "cpu.cfs_quota_us")))
    period = _int(read(os.path.join(d, "cpu.cfs_period_us"))) or 100_000
    return None if quota is None or quota < 0 else quota / period


def _v2_cpu_limit(d: str, read: Reader) -> Optional[float]:
    text = read(os.path.join(d, "cpu.max"))
    if not text:
        return None
    quota, _, period = text.partition(" ")
    return None if quota == "max" else int(quota) / int(period or 100_000)


def _v2_cpu_usage(d: str, read: Reader) -> Optional[float]:
    for line in (read(os.path.join(d, "cpu.stat")) or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) / 1e6
    return None


def _file_int(name: str, scale: float = 1.0) -> Callable[[str, Reader], Optional[float]]:
    def get(d: str, read: Reader) -> Optional[float]:
        v = _int(read(os.path.join(d, name)))
        return None if v is None else v / scale
    return get


def _size(v: Optional[float]) -> str:
    return "no limit" if v is None else format_size(v)


def _cpus(v: Optional[float]) -> str:
    return "no limit" if v is None else f"{v:g} CPUs"


def _count(v: Optional[float]) -> str:
    return "no limit" if v is None else f"{int(v)}"


def _seconds(v: Optional[float]) -> str:
    return "?" if v is None else f"{v:.1f} s CPU used"


def _used(v: Optional[float]) -> str:
    return "?" if v is None else f"{format_size(v)} in use"


def _procs(v: Optional[float]) -> str:
    return "?" if v is None else f"{int(v)} tasks"


V1 = (
    Resource("memory", "memory", _v1_memory_limit, _file_int("memory.usage_in_bytes"), _size, _used),
    Resource("cpu", "cpu", _v1_cpu_limit, lambda d, r: None, _cpus, _seconds),
    Resource("pids", "pids", _file_int("pids.max"), _file_int("pids.current"), _count, _procs),
)
V2 = (
    Resource("memory", "", _file_int("memory.max"), _file_int("memory.current"), _size, _used),
    Resource("cpu", "", _v2_cpu_limit, _v2_cpu_usage, _cpus, _seconds),
    Resource("pids", "", _file_int("pids.max"), _file_int("pids.current"), _count, _procs),
)


def _ancestors(directory: str, top: str) -> List[str]:
    """``directory`` and its parents up to the mount point ``top``, nearest first."""
    out = [directory]
    while directory.rstrip("/") != top.rstrip("/") and len(directory) > len(top):
        directory = os.path.dirname(directory)
        out.append(directory)
    return out


def _mount_for(mounts: List[Mount], controller: str) -> Optional[Mount]:
    for m in mounts:
        if controller and m.fstype == "cgroup" and controller in m.super_options:
            return m
        if not controller and m.fstype == "cgroup2":
            return m
    return None


def own_cgroup(pid: str = "self", mounts: Optional[List[Mount]] = None,
               proc_cgroup: Optional[Dict[str, str]] = None, read: Reader = _read) -> Table:
    """The cgroup(s) process ``pid`` is in, each resource's limit there, the limit in force
    (the tightest one on the way up to the root) and where it is set."""
    mounts = read_mountinfo(pid) if mounts is None else mounts
    proc_cgroup = read_proc_cgroup(pid) if proc_cgroup is None else proc_cgroup
    v1 = any(m.fstype == "cgroup" for m in mounts) and any(k for k in proc_cgroup)
    me = "this kernel" if pid == "self" else f"process {pid}"
    table = Table(f"The cgroup of {me} (pid {os.getpid() if pid == 'self' else pid})")
    rows = table.section("", ("resource", "cgroup", "limit there", "limit in force", "usage"))
    applies = []
    for res in (V1 if v1 else V2):
        key = res.controller if v1 else ""
        path = proc_cgroup.get(key)
        mount = _mount_for(mounts, key)
        directory = cgroup_dir(mount, path) if mount and path is not None else None
        if directory is None or read(os.path.join(directory, "cgroup.procs")) is None:
            rows.rows.append((res.name, path or "-", "-", "controller not available", "-"))
            continue
        chain = _ancestors(directory, mount.mountpoint)
        own = res.limit(directory, read)
        best, where = None, None
        for d in chain:
            v = res.limit(d, read)
            if v is not None and (best is None or v < best):
                best, where = v, d
        usage = res.usage(directory, read)
        if res.name == "cpu" and v1 and usage is None:
            acct = _mount_for(mounts, "cpuacct")
            acct_dir = cgroup_dir(acct, proc_cgroup.get("cpuacct", path)) if acct else None
            usage = _file_int("cpuacct.usage", 1e9)(acct_dir, read) if acct_dir else None
        shown_where = ""
        if where is not None:
            rel = os.path.relpath(where, mount.mountpoint)
            rel = "/" if rel == "." else "/" + rel
            shown_where = " (set here)" if where == directory else f" (set at {rel})"
            applies.append(f"{res.name}: {res.show(best)}"
                           + ("" if where == directory else f", set by {rel} above this "
                              "cgroup (it counts everything inside it together)"))
        rows.rows.append((res.name, path or "/", res.show(own), res.show(best) + shown_where,
                          res.show_usage(usage)))
    if applies:
        table.notes.append(f"Limits that apply to {me}: " + "; ".join(applies) + ".")
    else:
        table.notes.append(f"No memory, CPU or process-count limit applies to {me}.")
    table.notes.append("Containers you start get cgroups of their own below this one "
                       "(…/pynsbook/<session>/<container>): their limits come on top.")
    return table


def container_table(container) -> Table:  # noqa: ANN001 (a pynsbook Container)
    """A container's cgroup: path, limits and usage, and the interface files themselves."""
    from ..spec import format_size as fs
    table = Table(f"container {container.name}")
    st = container.stats()
    path = container.cgroup.path if container.cgroup else "(no cgroup: limits enforced by sampling)"
    table.notes.append(f"cgroup: {path}")
    rows = table.section("", ("resource", "limit", "usage"))
    rows.rows.append(("memory", _size(st.memory_limit),
                      f"{fs(st.memory_current) if st.memory_current is not None else '?'} now, "
                      f"peak {fs(st.memory_peak) if st.memory_peak is not None else '?'}"
                      + (f", {st.oom_kills} OOM kills" if st.oom_kills else "")))
    if st.swap_limit is not None:
        rows.rows.append(("swap", _size(st.swap_limit), "-"))
    rows.rows.append(("cpu", _cpus(st.cpu_quota),
                      ("?" if st.cpu_time is None else f"{st.cpu_time:.2f} s CPU")
                      + (f", throttled {st.throttled_count} times" if st.throttled_count else "")))
    if st.cpuset is not None:
        rows.rows.append(("cpuset", st.cpuset, "-"))
    rows.rows.append(("pids", _count(st.pids_limit),
                      ("?" if st.pids_current is None else f"{st.pids_current} tasks")
                      + (f", {st.pids_limit_hits} forks refused" if st.pids_limit_hits else "")))
    if container.cgroup is not None:
        files = table.section("files", ("file", "content"))
        files.rows += [(p, v) for p, v in container.cgroup.files().items()]
    if st.approximate:
        table.notes.append("approximate: no cgroup, numbers are sampled")
    return table


def limits_row(changed: Dict[str, object]) -> str:
    shown: List[Tuple[str, str]] = []
    for key, value in changed.items():
        if key in ("memory", "swap"):
            shown.append((key, _size(value)))  # type: ignore[arg-type]
        else:
            shown.append((key, "no limit" if value is None else str(value)))
    return ", ".join(f"{k} {v}" for k, v in shown)
