"""What every cgroup backend offers, the controller names, and the session layout.

Layout: ``<base>/pynsbook/<session>/<container>``. ``<base>`` is where this process may
create cgroups; ``<session>`` is ``<pid>-<start time>`` of the Python process that owns the
containers, so a later process can tell a dead session's leftovers and reap them. Nothing
outside a ``pynsbook`` directory is ever written to.
"""
from __future__ import annotations

import abc
import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

from ..linux import procfs
from ..results import Stats

# controller names as the rest of pynsbook spells them (v1's blkio is "io" here)
MEMORY = "memory"
CPU = "cpu"
CPUSET = "cpuset"
PIDS = "pids"
IO = "io"
FREEZER = "freezer"

#: the controller each limit keyword needs
LIMIT_CONTROLLER = {"memory": MEMORY, "swap": MEMORY, "cpus": CPU, "cpuset": CPUSET,
                    "pids": PIDS, "io_read_bps": IO, "io_write_bps": IO}

TOP = "pynsbook"


@dataclass(frozen=True)
class Missing:
    """Why a controller or limit is unavailable and how to make it available."""

    reason: str
    fix: Optional[str] = None


def read(path: str) -> str:
    # os.open/os.read: a third of the cost of open().read() on the hot path of every run
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read_int(path: str) -> Optional[int]:
    try:
        text = read(path).strip()
    except OSError:
        return None
    if text in ("max", ""):
        return None
    return int(text.split()[0])


def read_keyed(path: str) -> Dict[str, int]:
    """Parse a flat keyed file (``key value`` per line) like memory.events or cpu.stat."""
    out: Dict[str, int] = {}
    try:
        text = read(path)
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def process_start_time(pid: int) -> Optional[int]:
    """The start time in clock ticks, to tell PID reuse apart."""
    return procfs.start_time(pid)


def session_name(pid: Optional[int] = None) -> str:
    pid = pid or os.getpid()
    return f"{pid}-{process_start_time(pid)}"


def session_alive(name: str) -> bool:
    """Whether the process that owns session ``name`` still runs."""
    try:
        pid_text, start_text = name.split("-", 1)
        pid = int(pid_text)
    except ValueError:
        return True  # not ours to judge: leave it alone
    start = process_start_time(pid)
    return start is not None and str(start) == start_text


def kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def procs(directory: str) -> List[int]:
    try:
        return [int(x) for x in read(os.path.join(directory, "cgroup.procs")).split()]
    except OSError:
        return []


def rmdir_retry(path: str, timeout: float = 2.0) -> None:
    """rmdir a cgroup, waiting for exiting processes to leave it (EBUSY)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def reap_sessions(tops: Iterable[str], own: str, remove: Callable[[str], None]) -> List[str]:
    """Remove the container cgroups of dead sessions under each ``<base>/pynsbook``
    (``remove`` empties and deletes one), then their session directories."""
    removed = set()
    for top in tops:
        try:
            sessions = os.listdir(top)
        except OSError:
            continue
        for s in sessions:
            sdir = os.path.join(top, s)
            if not os.path.isdir(sdir) or s == own or session_alive(s):
                continue
            for c in os.listdir(sdir):
                cdir = os.path.join(sdir, c)
                if os.path.isdir(cdir):
                    try:
                        remove(cdir)
                    except OSError:
                        continue
            try:
                rmdir_retry(sdir)
                removed.add(s)
            except OSError:
                pass
        try:
            os.rmdir(top)  # pynsbook's own directory, if no session is left in it
        except OSError:
            pass
    return sorted(removed)


def remove_tree(directory: str) -> None:
    """Empty and delete a cgroup and every cgroup nested in it, deepest first.

    A container may make cgroups of its own inside its cgroup (a kernel started with limits
    runs its own containers there): rmdir fails while any of them remains.
    """
    for root, _dirs, _files in os.walk(directory, topdown=False):
        for _ in range(50):
            pids = procs(root)
            if not pids:
                break
            kill_pids(pids)
            time.sleep(0.005)
        rmdir_retry(root)


def _kill_and_rmdir(directory: str) -> None:
    remove_tree(directory)


class Cgroup(abc.ABC):
    """One container's cgroup (across v1 hierarchies, or one v2 directory)."""

    #: files a container's init, and each run's process, write "0" to, to join the cgroup
    #: (each is single-threaded then)
    join_files: Tuple[str, ...] = ()
    #: a path to show users (v2 directory, or v1 memory hierarchy path)
    path: str = ""

    @abc.abstractmethod
    def apply(self, limits: Dict[str, object]) -> None:
        """Set limits (keywords as in spec.LIMIT_KEYS; values parsed). Works live."""

    @abc.abstractmethod
    def stats(self) -> Stats:
        """Usage and limits now."""

    @abc.abstractmethod
    def pids(self) -> List[int]:
        """Host PIDs of every process in the cgroup."""

    @abc.abstractmethod
    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup, by PID, so none can fork away meanwhile."""

    @abc.abstractmethod
    def freeze(self, frozen: bool) -> None:
        """Freeze or thaw every process in the cgroup."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Kill what is left and delete the cgroup."""

    def counters(self) -> Tuple[Optional[int], Optional[float], Optional[int]]:
        """(OOM kills, CPU seconds, forks refused by the pids limit): what a run's result
        is computed from, read before and after it — cheaply, as it is on every run."""
        s = self.stats()
        return s.oom_kills, s.cpu_time, s.pids_limit_hits

    def start_peak_window(self) -> None:
        """Start measuring peak memory for the next run (resets the peak where possible)."""

    def peak_memory(self) -> Optional[int]:
        return self.stats().memory_peak

    def files(self) -> Dict[str, str]:
        """The interface files worth showing a student, name -> content."""
        return {}


class Backend(abc.ABC):
    """A way to create and control cgroups on this host."""

    name: str = "none"

    @abc.abstractmethod
    def controllers(self) -> FrozenSet[str]:
        """Controllers this process can use for its containers."""

    @abc.abstractmethod
    def missing(self, controller: str) -> Missing:
        """Why ``controller`` is not usable, and the fix."""

    @abc.abstractmethod
    def create(self, container: str) -> Cgroup:
        """Create the cgroup for a new container of this session."""

    def reap_stale(self) -> List[str]:
        """Remove what dead sessions left; return the session names removed."""
        return []

    def tops(self) -> List[str]:
        """pynsbook's own directory in each hierarchy its containers use."""
        return []

    def session_dirs(self) -> List[str]:
        """The container cgroups of this process's session, in every hierarchy (to see
        what is there: for clean-up checks and benchmarks)."""
        out: List[str] = []
        for top in self.tops():
            sess = os.path.join(top, session_name())
            try:  # the last container's removal may take the session directory meanwhile
                names = os.listdir(sess)
            except FileNotFoundError:
                continue
            out += [os.path.join(sess, n) for n in names if os.path.isdir(os.path.join(sess, n))]
        return out

    def can_swap(self) -> bool:
        return False

    def base(self) -> Optional[str]:
        return None
