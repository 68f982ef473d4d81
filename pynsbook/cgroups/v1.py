"""cgroup v1 (and hybrid hosts): one hierarchy per controller, each with its own directory.

Each container gets ``<own cgroup>/pynsbook/<session>/<container>`` in every hierarchy we
use, so the machine's own limits on this process still apply above ours.
"""
from __future__ import annotations

import os
import time
from typing import Dict, FrozenSet, List, Optional, Tuple

from ..linux.mountinfo import Mount, cgroup_dir, read_mountinfo, read_proc_cgroup
from ..results import Stats
from .base import (CPU, CPUSET, FREEZER, IO, MEMORY, PIDS, TOP, Backend, Cgroup, Missing,
                   _kill_and_rmdir, kill_pids, procs, read, read_int, read_keyed,
                   reap_sessions, remove_tree, rmdir_retry, session_name, write)

# pynsbook controller -> v1 subsystem names that serve it
_SUBSYSTEMS = {MEMORY: "memory", CPU: "cpu", "cpuacct": "cpuacct", CPUSET: "cpuset",
               PIDS: "pids", IO: "blkio", FREEZER: "freezer"}
_UNLIMITED = 9223372036854771712  # what v1 memory files say for "no limit" (page-rounded max)
_PERIOD_US = 100_000


def hierarchies(mounts: Optional[List[Mount]] = None,
                own: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """pynsbook controller -> this process's cgroup directory in that v1 hierarchy."""
    mounts = read_mountinfo() if mounts is None else mounts
    own = read_proc_cgroup() if own is None else own
    out: Dict[str, str] = {}
    for m in mounts:
        if m.fstype != "cgroup":
            continue
        for ours, subsystem in _SUBSYSTEMS.items():
            if subsystem in m.super_options and ours not in out and subsystem in own:
                directory = cgroup_dir(m, own[subsystem])
                if directory and os.path.isdir(directory):
                    out[ours] = directory
    return out


class V1Backend(Backend):
    name = "cgroup-v1"

    def __init__(self, dirs: Optional[Dict[str, str]] = None) -> None:
        self.dirs = hierarchies() if dirs is None else dirs
        self.session = session_name()
        self._usable = frozenset(c for c, d in self.dirs.items()
                                 if os.access(d, os.W_OK) and c in (MEMORY, CPU, CPUSET, PIDS, IO))
        self._session_ready = False

    def controllers(self) -> FrozenSet[str]:
        return self._usable

    def base(self) -> Optional[str]:
        return self.dirs.get(MEMORY)

    def can_swap(self) -> bool:
        d = self.dirs.get(MEMORY)
        return bool(d) and os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes"))

    def missing(self, controller: str) -> Missing:
        sub = _SUBSYSTEMS.get(controller, controller)
        if controller not in self.dirs:
            return Missing(f"the {sub} cgroup controller is not mounted on this host",
                           f"sudo mkdir -p /sys/fs/cgroup/{sub} && sudo mount -t cgroup -o {sub} "
                           f"cgroup /sys/fs/cgroup/{sub}")
        return Missing(f"cgroup v1 hierarchies can only be changed by root (no write access to "
                       f"{self.dirs[controller]})",
                       "run as root, or use a cgroup v2 host with a delegated subtree "
                       "(systemd-run --user --scope -p Delegate=yes jupyter lab)")

    def _dirs_used(self) -> Dict[str, str]:
        wanted = {c: d for c, d in self.dirs.items()
                  if c in (MEMORY, CPU, "cpuacct", CPUSET, PIDS, IO, FREEZER) and os.access(d, os.W_OK)}
        unique: Dict[str, str] = {}
        for c, d in wanted.items():
            if d not in unique.values():
                unique[c] = d
        return unique

    @staticmethod
    def _fill_cpuset(path: str, parent: str) -> None:
        # a new v1 cpuset is empty, and no task can join it until it is filled
        for f in ("cpuset.cpus", "cpuset.mems"):
            if not read(os.path.join(path, f)).strip():
                write(os.path.join(path, f), read(os.path.join(parent, f)).strip())

    def _ensure(self, path: str, parent: str, cpuset: bool) -> None:
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        if cpuset:  # also when it exists: its maker (another session) may not have filled it yet
            self._fill_cpuset(path, parent)

    def create(self, container: str) -> Cgroup:
        dirs = {}
        try:
            for c, d in self._dirs_used().items():
                cpuset = c == CPUSET
                top = os.path.join(d, TOP)
                sess = os.path.join(top, self.session)
                self._ensure(top, d, cpuset)
                self._ensure(sess, top, cpuset)
                path = os.path.join(sess, container)
                os.mkdir(path)
                dirs[c] = path
                if cpuset:
                    self._fill_cpuset(path, sess)
        except OSError:
            for path in dirs.values():
                rmdir_retry(path)
            raise
        return V1Cgroup(dirs, self)

    def tops(self) -> List[str]:
        return [os.path.join(d, TOP) for d in self._dirs_used().values()]

    def reap_stale(self) -> List[str]:
        return reap_sessions(self.tops(), self.session, _kill_and_rmdir)


class V1Cgroup(Cgroup):
    def __init__(self, dirs: Dict[str, str], backend: V1Backend) -> None:
        self.dirs = dirs
        self.backend = backend
        # "tasks", not "cgroup.procs": moving the current thread alone skips the kernel's
        # threadgroup lock, whose write side waits for an RCU grace period (10-20 ms per
        # start, measured); the joining init has one thread, so the whole process moves
        self.join_files = tuple(os.path.join(d, "tasks") for d in dirs.values())
        self.path = dirs.get(MEMORY) or next(iter(dirs.values()), "")
        self._cpuacct = dirs.get("cpuacct") or dirs.get(CPU)

    def _f(self, controller: str, name: str) -> str:
        return os.path.join(self.dirs[controller], name)

    def apply(self, limits: Dict[str, object]) -> None:
        if "memory" in limits or "swap" in limits:
            self._apply_memory(limits.get("memory"), limits.get("swap"))
        if "cpus" in limits:
            cpus = limits["cpus"]
            write(self._f(CPU, "cpu.cfs_period_us"), str(_PERIOD_US))
            write(self._f(CPU, "cpu.cfs_quota_us"),
                  "-1" if cpus is None else str(max(1000, int(float(cpus) * _PERIOD_US))))
        if "cpuset" in limits and limits["cpuset"] is not None:
            write(self._f(CPUSET, "cpuset.cpus"), str(limits["cpuset"]))
        if "pids" in limits:
            write(self._f(PIDS, "pids.max"), "max" if limits["pids"] is None else str(limits["pids"]))
        for key, fname in (("io_read_bps", "blkio.throttle.read_bps_device"),
                           ("io_write_bps", "blkio.throttle.write_bps_device")):
            for io in limits.get(key) or ():
                write(self._f(IO, fname), f"{io.device} {io.rate}")

    def _apply_memory(self, memory: object, swap: object) -> None:
        mem_file = self._f(MEMORY, "memory.limit_in_bytes")
        memsw_file = self._f(MEMORY, "memory.memsw.limit_in_bytes")
        mem = -1 if memory is None else int(memory)  # type: ignore[arg-type]
        has_memsw = os.path.exists(memsw_file)
        if not has_memsw:
            write(mem_file, str(mem))
            return
        memsw = -1 if mem == -1 else mem + int(swap or 0)  # type: ignore[arg-type]
        current_memsw = read_int(memsw_file) or _UNLIMITED
        # memsw may never be below memory: raise memsw first when growing, last when shrinking
        if memsw == -1 or memsw > current_memsw:
            write(memsw_file, str(memsw))
            write(mem_file, str(mem))
        else:
            write(mem_file, str(mem))
            write(memsw_file, str(memsw))

    def stats(self) -> Stats:
        s = Stats(backend="cgroup-v1")
        if MEMORY in self.dirs:
            s.memory_current = read_int(self._f(MEMORY, "memory.usage_in_bytes"))
            s.memory_peak = read_int(self._f(MEMORY, "memory.max_usage_in_bytes"))
            limit = read_int(self._f(MEMORY, "memory.limit_in_bytes"))
            s.memory_limit = None if limit is None or limit >= _UNLIMITED else limit
            memsw = read_int(self._f(MEMORY, "memory.memsw.limit_in_bytes"))
            if memsw is not None and memsw < _UNLIMITED and s.memory_limit is not None:
                s.swap_limit = memsw - s.memory_limit
            s.oom_kills = read_keyed(self._f(MEMORY, "memory.oom_control")).get("oom_kill", 0)
        if self._cpuacct:
            usage = read_int(os.path.join(self._cpuacct, "cpuacct.usage"))
            s.cpu_time = None if usage is None else usage / 1e9
        if CPU in self.dirs:
            quota = read_int(self._f(CPU, "cpu.cfs_quota_us"))
            period = read_int(self._f(CPU, "cpu.cfs_period_us")) or _PERIOD_US
            s.cpu_quota = None if quota is None or quota < 0 else quota / period
            st = read_keyed(self._f(CPU, "cpu.stat"))
            s.throttled_count = st.get("nr_throttled")
            s.throttled_time = st["throttled_time"] / 1e9 if "throttled_time" in st else None
        if CPUSET in self.dirs:
            s.cpuset = read(self._f(CPUSET, "cpuset.cpus")).strip()
        if PIDS in self.dirs:
            s.pids_current = read_int(self._f(PIDS, "pids.current"))
            s.pids_limit = read_int(self._f(PIDS, "pids.max"))
            s.pids_limit_hits = read_keyed(self._f(PIDS, "pids.events")).get("max", 0)
        if FREEZER in self.dirs:
            s.frozen = read(self._f(FREEZER, "freezer.state")).strip() != "THAWED"
        return s

    def counters(self) -> Tuple[Optional[int], Optional[float], Optional[int]]:
        oom = read_keyed(self._f(MEMORY, "memory.oom_control")).get("oom_kill", 0) if MEMORY in self.dirs else None
        usage = read_int(os.path.join(self._cpuacct, "cpuacct.usage")) if self._cpuacct else None
        hits = read_keyed(self._f(PIDS, "pids.events")).get("max", 0) if PIDS in self.dirs else None
        return oom, None if usage is None else usage / 1e9, hits

    def peak_memory(self) -> Optional[int]:
        return read_int(self._f(MEMORY, "memory.max_usage_in_bytes")) if MEMORY in self.dirs else None

    def start_peak_window(self) -> None:
        if MEMORY in self.dirs:
            try:
                write(self._f(MEMORY, "memory.max_usage_in_bytes"), "0")
            except OSError:
                pass

    def pids(self) -> List[int]:
        out: set = set()
        for d in self.dirs.values():
            out.update(procs(d))
        return sorted(out)

    def freeze(self, frozen: bool) -> None:
        if FREEZER not in self.dirs:
            raise OSError("the freezer controller is not available")
        write(self._f(FREEZER, "freezer.state"), "FROZEN" if frozen else "THAWED")
        if frozen:
            deadline = time.monotonic() + 2
            while read(self._f(FREEZER, "freezer.state")).strip() != "FROZEN":
                if time.monotonic() > deadline:
                    break
                time.sleep(0.002)

    def kill_all(self) -> None:
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            frozen = FREEZER in self.dirs
            if frozen:
                try:
                    self.freeze(True)
                except OSError:
                    frozen = False
            kill_pids(pids)
            if frozen:
                self.freeze(False)
            time.sleep(0.005)

    def remove(self) -> None:
        self.kill_all()
        for d in self.dirs.values():
            remove_tree(d)

    def files(self) -> Dict[str, str]:
        names = {MEMORY: ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.max_usage_in_bytes"),
                 CPU: ("cpu.cfs_quota_us", "cpu.cfs_period_us"),
                 PIDS: ("pids.max", "pids.current"),
                 CPUSET: ("cpuset.cpus",)}
        out = {}
        for c, fs in names.items():
            for f in fs:
                if c in self.dirs:
                    try:
                        out[os.path.join(self.dirs[c], f)] = read(self._f(c, f)).strip()
                    except OSError:
                        pass
        return out
