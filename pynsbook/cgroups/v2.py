"""cgroup v2: one unified hierarchy. Containers live in ``<base>/pynsbook/<session>/<name>``.

``<base>`` is the cgroup root when running as root there (unless this process itself runs in
a pynsbook cgroup, like a kernel started with limits: then its containers stay inside those
limits). For an ordinary user it is the subtree systemd delegated to it:
``systemd-run --user --scope -p Delegate=yes jupyter lab`` puts Jupyter and its kernels *in*
the delegated scope, whose subtree_control is empty. v2 forbids enabling controllers for the
children of a cgroup that holds processes ("no internal processes"), so on first use the
scope's processes move into a leaf of the scope, ``<scope>/pynsbook-leaf`` (as systemd and
crun do; they stay inside the scope and its limits), and then the delegated controllers are
enabled in the scope. A process already in that leaf (a kernel Jupyter restarted) uses the
scope directly; otherwise the nearest ancestor this user may write to.
As root, the controllers are enabled in every cgroup from the root down to ``<base>``, as
runc does.
"""
from __future__ import annotations

import os
from typing import Dict, FrozenSet, List, Optional, Tuple

from ..linux.mountinfo import Mount, cgroup_dir, read_mountinfo, read_proc_cgroup
from ..results import Stats
from .base import (CPU, CPUSET, IO, MEMORY, PIDS, TOP, Backend, Cgroup, Missing,
                   kill_pids, procs, read, read_int, read_keyed, reap_sessions, remove_tree,
                   session_name, write)

_WANTED = (MEMORY, CPU, CPUSET, PIDS, IO)
_PERIOD_US = 100_000


def unified_mount(mounts: Optional[List[Mount]] = None) -> Optional[Mount]:
    mounts = read_mountinfo() if mounts is None else mounts
    for m in mounts:
        if m.fstype == "cgroup2":
            return m
    return None


def _writable(d: str) -> bool:
    return os.access(d, os.W_OK) and os.access(os.path.join(d, "cgroup.procs"), os.W_OK)


#: where the processes of a delegated scope move, so that the scope may have children
LEAF = "pynsbook-leaf"


def _delegated_to_us(d: str) -> bool:
    """This user owns the cgroup and may enable controllers in it (systemd's Delegate=yes
    chowns the directory, cgroup.procs, cgroup.subtree_control and cgroup.threads)."""
    try:
        return (os.stat(d).st_uid == os.geteuid() and _writable(d)
                and os.access(os.path.join(d, "cgroup.subtree_control"), os.W_OK))
    except OSError:
        return False


def find_scope(mount: Mount, own_path: str) -> Optional[str]:
    """The delegated cgroup this process sits in (not root, not one of pynsbook's own), whose
    processes must move to a leaf before it can have children; None if there is none."""
    own = cgroup_dir(mount, own_path)
    root = mount.mountpoint.rstrip("/") or "/"
    if (own is None or own.rstrip("/") == root or os.geteuid() == 0 or f"/{TOP}/" in own_path
            or os.path.basename(own) == LEAF):
        return None
    return own if _delegated_to_us(own) else None


def find_base(mount: Mount, own_path: str) -> Optional[str]:
    """The directory where this process may create the ``pynsbook`` subtree."""
    own = cgroup_dir(mount, own_path)
    if own is None:
        return None
    root = mount.mountpoint.rstrip("/") or "/"
    inside_ours = f"/{TOP}/" in own_path  # e.g. a kernel started with limits by pynsbook
    if os.geteuid() == 0 and _writable(root) and not inside_ours:
        return root
    if own.rstrip("/") == root:
        return root if _writable(root) else None
    scope = find_scope(mount, own_path)
    if scope is not None:
        return scope
    d = os.path.dirname(own)
    while len(d) >= len(root):
        if _writable(d):
            return d
        if d == root:
            break
        d = os.path.dirname(d)
    return None


def _controllers(path: str) -> FrozenSet[str]:
    try:
        return frozenset(read(path).split())
    except OSError:
        return frozenset()


class V2Backend(Backend):
    name = "cgroup-v2"

    def __init__(self, mount: Optional[Mount] = None, own_path: Optional[str] = None) -> None:
        self.mount = mount or unified_mount()
        own = read_proc_cgroup().get("", "/") if own_path is None else own_path
        self.own = own
        self._base = find_base(self.mount, own) if self.mount else None
        #: a delegated scope holding this process: its processes move to a leaf on first use
        self._scope = find_scope(self.mount, own) if self.mount else None
        #: that scope, for doctor and the tests (kept after the move)
        self.delegated_scope = self._scope
        self._base_ready = False  # leaf made, controllers enabled down to the base
        self.session = session_name()
        if self._scope:  # what the scope was given, to enable once its processes moved
            self._usable = frozenset(c for c in _WANTED if c in _controllers(
                os.path.join(self._scope, "cgroup.controllers")))
        elif self._base and os.geteuid() == 0:  # root enables what the parent offers
            self._usable = frozenset(c for c in _WANTED if c in _controllers(
                os.path.join(self._base, "cgroup.controllers")))
        elif self._base:
            delegated = _controllers(os.path.join(self._base, "cgroup.subtree_control"))
            top = os.path.join(self._base, TOP)
            if os.path.isdir(top):  # our own directory: what it got from base is what we have
                delegated = delegated | _controllers(os.path.join(top, "cgroup.controllers"))
            self._usable = frozenset(c for c in _WANTED if c in delegated)
        else:
            self._usable = frozenset()

    def base(self) -> Optional[str]:
        return self._base

    def controllers(self) -> FrozenSet[str]:
        return self._usable

    def can_swap(self) -> bool:
        if not self._base or MEMORY not in self._usable:
            return False
        # memory.swap.max exists only with swap accounting; look at a sibling that has memory
        probe = os.path.join(self._base, TOP)
        return not os.path.isdir(probe) or os.path.exists(os.path.join(probe, "memory.swap.max"))

    def missing(self, controller: str) -> Missing:
        if self.mount is None:
            return Missing("cgroup2 is not mounted", "sudo mount -t cgroup2 none /sys/fs/cgroup")
        if self._base is None:
            own = cgroup_dir(self.mount, self.own) or self.own
            return Missing(f"this user may not create cgroups near its own ({own}): no "
                           "delegated subtree",
                           "start Jupyter in a delegated scope: systemd-run --user --scope "
                           "-p Delegate=yes jupyter lab")
        have = _controllers(os.path.join(self._base, "cgroup.controllers"))
        if controller not in have:
            return Missing(f"the {controller} controller is not available in {self._base}",
                           f"enable it in the parent: echo +{controller} | sudo tee "
                           f"{os.path.dirname(self._base)}/cgroup.subtree_control")
        return Missing(f"the {controller} controller is not enabled for children of {self._base}",
                       f"echo +{controller} | sudo tee {self._base}/cgroup.subtree_control"
                       + (" (or with systemd: systemctl set-property user@$UID.service "
                          "Delegate=yes)" if os.geteuid() else ""))

    def _leave_scope(self) -> None:
        """Move every process of the delegated scope into its leaf, then enable the
        delegated controllers for the scope's children. Processes that Jupyter starts
        meanwhile land in the scope too: read again until it is empty."""
        scope, self._scope = self._scope, None
        if scope is None:
            return
        leaf = os.path.join(scope, LEAF)
        try:
            os.mkdir(leaf)
        except FileExistsError:
            pass
        for _ in range(20):
            pids = procs(scope)
            if not pids:
                break
            for pid in pids:
                try:
                    write(os.path.join(leaf, "cgroup.procs"), str(pid))
                except ProcessLookupError:
                    pass  # it ended meanwhile
                except OSError as err:
                    raise OSError(err.errno, f"cannot move process {pid} out of the delegated "
                                  f"scope {scope} into {leaf} ({err.strerror}): v2 allows "
                                  "controllers for its children only once it holds no "
                                  "process") from None
        self._enable(scope)

    def _enable_down_to(self, base: str) -> None:
        """As root: enable the controllers in every cgroup from the root down to ``base``,
        where the parent has them (runc does the same); a parent that refuses is left."""
        root = self.mount.mountpoint.rstrip("/") or "/" if self.mount else "/"
        path, chain = base, []
        while len(path) > len(root):
            path = os.path.dirname(path)
            chain.append(path)
        for d in reversed(chain):
            try:
                self._enable(d)
            except OSError:
                return

    def _enable(self, directory: str) -> None:
        want = [c for c in self._usable
                if c in _controllers(os.path.join(directory, "cgroup.controllers"))]
        have = _controllers(os.path.join(directory, "cgroup.subtree_control"))
        todo = [c for c in want if c not in have]
        if todo:
            write(os.path.join(directory, "cgroup.subtree_control"),
                  " ".join("+" + c for c in todo))

    def _ensure(self, path: str) -> None:
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        self._enable(path)

    def create(self, container: str) -> Cgroup:
        if not self._base:
            m = self.missing(MEMORY)
            raise OSError(13, m.reason)
        if not self._base_ready:  # once: the base stays as this leaves it
            if self._scope:
                self._leave_scope()
            elif os.geteuid() == 0:
                self._enable_down_to(self._base)
            self._enable(self._base)
            self._base_ready = True
        top = os.path.join(self._base, TOP)
        sess = os.path.join(top, self.session)
        self._ensure(top)
        self._ensure(sess)
        path = os.path.join(sess, container)
        os.mkdir(path)
        return V2Cgroup(path)

    def tops(self) -> List[str]:
        return [os.path.join(self._base, TOP)] if self._base else []

    def reap_stale(self) -> List[str]:
        return reap_sessions(self.tops(), self.session, lambda d: V2Cgroup(d).remove())


class V2Cgroup(Cgroup):
    def __init__(self, path: str) -> None:
        self.path = path
        self.join_files = (os.path.join(path, "cgroup.procs"),)
        self._peak_fd: Optional[int] = None

    def _f(self, name: str) -> str:
        return os.path.join(self.path, name)

    def apply(self, limits: Dict[str, object]) -> None:
        if "memory" in limits:
            write(self._f("memory.max"), "max" if limits["memory"] is None else str(limits["memory"]))
        if "swap" in limits or ("memory" in limits and os.path.exists(self._f("memory.swap.max"))):
            swap = limits.get("swap")
            value = "max" if limits.get("memory") is None and swap is None else str(int(swap or 0))  # type: ignore[arg-type]
            write(self._f("memory.swap.max"), value)
        if "cpus" in limits:
            cpus = limits["cpus"]
            write(self._f("cpu.max"), f"max {_PERIOD_US}" if cpus is None
                  else f"{max(1000, int(float(cpus) * _PERIOD_US))} {_PERIOD_US}")  # type: ignore[arg-type]
        if "cpuset" in limits and limits["cpuset"] is not None:
            write(self._f("cpuset.cpus"), str(limits["cpuset"]))
        if "pids" in limits:
            write(self._f("pids.max"), "max" if limits["pids"] is None else str(limits["pids"]))
        lines: Dict[str, List[str]] = {}
        for key, word in (("io_read_bps", "rbps"), ("io_write_bps", "wbps")):
            for io in limits.get(key) or ():  # type: ignore[attr-defined]
                lines.setdefault(io.device, []).append(f"{word}={io.rate}")
        for device, words in lines.items():
            write(self._f("io.max"), f"{device} {' '.join(words)}")

    def stats(self) -> Stats:
        s = Stats(backend="cgroup-v2")
        s.memory_current = read_int(self._f("memory.current"))
        s.memory_peak = self.peak_memory()
        s.memory_limit = read_int(self._f("memory.max"))
        s.swap_current = read_int(self._f("memory.swap.current"))
        s.swap_limit = read_int(self._f("memory.swap.max"))
        events = read_keyed(self._f("memory.events"))
        s.oom_kills = events.get("oom_kill", 0) if events else None
        st = read_keyed(self._f("cpu.stat"))
        if "usage_usec" in st:
            s.cpu_time = st["usage_usec"] / 1e6
        s.throttled_count = st.get("nr_throttled")
        s.throttled_time = st["throttled_usec"] / 1e6 if "throttled_usec" in st else None
        try:
            quota, period = read(self._f("cpu.max")).split()
            s.cpu_quota = None if quota == "max" else int(quota) / int(period)
        except (OSError, ValueError):
            pass
        try:
            s.cpuset = read(self._f("cpuset.cpus.effective")).strip()
        except OSError:
            pass
        s.pids_current = read_int(self._f("pids.current"))
        s.pids_limit = read_int(self._f("pids.max"))
        s.pids_limit_hits = read_keyed(self._f("pids.events")).get("max", 0) if os.path.exists(self._f("pids.events")) else None
        s.frozen = read_keyed(self._f("cgroup.events")).get("frozen", 0) == 1
        return s

    def counters(self) -> Tuple[Optional[int], Optional[float], Optional[int]]:
        events = read_keyed(self._f("memory.events"))
        usage = read_keyed(self._f("cpu.stat")).get("usage_usec")
        pids = read_keyed(self._f("pids.events"))
        return (events.get("oom_kill", 0) if events else None,
                None if usage is None else usage / 1e6, pids.get("max", 0) if pids else None)

    def start_peak_window(self) -> None:
        # since Linux 6.12, writing to memory.peak starts a fresh peak seen through that fd
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None
        try:
            fd = os.open(self._f("memory.peak"), os.O_RDWR)
        except OSError:
            return
        try:
            os.write(fd, b"reset\n")
            self._peak_fd = fd
        except OSError:
            os.close(fd)

    def peak_memory(self) -> Optional[int]:
        if self._peak_fd is not None:
            try:
                return int(os.pread(self._peak_fd, 64, 0).split()[0])
            except (OSError, ValueError):
                pass
        return read_int(self._f("memory.peak"))

    def pids(self) -> List[int]:
        return procs(self.path)

    def freeze(self, frozen: bool) -> None:
        write(self._f("cgroup.freeze"), "1" if frozen else "0")

    def kill_all(self) -> None:
        if os.path.exists(self._f("cgroup.kill")):
            write(self._f("cgroup.kill"), "1")
            return
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            self.freeze(True)
            kill_pids(pids)
            self.freeze(False)

    def remove(self) -> None:
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None
        self.kill_all()  # cgroup.kill takes the cgroups nested in it too
        remove_tree(self.path)

    def files(self) -> Dict[str, str]:
        out = {}
        for f in ("memory.max", "memory.current", "memory.peak", "cpu.max", "pids.max",
                  "pids.current", "cpuset.cpus.effective"):
            try:
                out[self._f(f)] = read(self._f(f)).strip()
            except OSError:
                pass
        return out
