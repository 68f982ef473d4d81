"""``pynsbook doctor``: what this host lets this user do, and how to enable what is missing."""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from . import cgroups, probe
from .cgroups.base import CPU, CPUSET, IO, MEMORY, PIDS
from .spec import NAMESPACES

_NS_WHAT = {
    "cgroup": "its own cgroup appears as the root /",
    "ipc": "its own System V IPC and POSIX message queues",
    "net": "its own network devices, addresses and ports",
    "mnt": "its own mount table and root filesystem",
    "pid": "its own process numbers, starting at 1",
    "time": "its own boot and monotonic clocks (--uptime)",
    "user": "its own user IDs: root inside, an ordinary user outside",
    "uts": "its own hostname",
}
_LIMIT_OF = {MEMORY: "--mem, --swap", CPU: "--cpus", CPUSET: "--cpuset", PIDS: "--pids",
             IO: "--io-read-bps, --io-write-bps"}


@dataclass
class Check:
    """One capability: whether it works here, and if not why and what would enable it."""

    name: str
    ok: bool
    detail: str = ""
    reason: str = ""
    fix: str = ""


@dataclass
class DoctorReport:
    kernel: str
    user: str
    cgroup_mode: str
    cgroup_backend: str
    cgroup_base: Optional[str]
    controllers: List[Check] = field(default_factory=list)
    namespaces: List[Check] = field(default_factory=list)
    user_namespaces: Optional[Check] = None
    overlay: Optional[Check] = None
    time_namespace: Optional[Check] = None
    small_init: Optional[Check] = None
    #: what a container may do to the kernel it shares, layer by layer (default options)
    confinement: List[Check] = field(default_factory=list)
    swap_accounting: bool = False
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.controllers + self.namespaces) and bool(self.overlay and self.overlay.ok)

    def missing(self) -> List[Check]:
        checks = self.controllers + self.namespaces + [c for c in (self.overlay,) if c]
        return [c for c in checks if not c.ok]

    def __str__(self) -> str:
        lines = [f"pynsbook doctor — Linux {self.kernel}, running as {self.user}",
                 f"cgroups: {self.cgroup_mode} (backend {self.cgroup_backend}"
                 + (f", containers under {self.cgroup_base}/pynsbook)" if self.cgroup_base else ")")]
        for c in self.controllers:
            lines.append(_line(c))
        lines.append("namespaces:")
        for c in self.namespaces:
            lines.append(_line(c))
        if self.overlay:
            lines.append("filesystems:")
            lines.append(_line(self.overlay))
        if self.confinement:
            lines.append("confinement (default; --privileged turns it off):")
            for c in self.confinement:
                lines.append(_line(c))
        if self.small_init:
            lines.append("idle containers:")
            lines.append(_line(self.small_init))
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython shows the text table
        p.text(str(self))


def _line(c: Check) -> str:
    mark = "ok  " if c.ok else "NO  "
    text = f"  {mark}{c.name:<8} {c.detail}"
    if not c.ok:
        text += f"\n        why: {c.reason}"
        if c.fix:
            text += f"\n        fix: {c.fix}"
    return text


def _small_init() -> Check:
    """Whether idle containers wait in the compiled init (KiB) or in Python (MiB)."""
    from .engine import tiny
    detail = "a compiled init and shim of a few KiB wait in each container, not Python"
    if tiny.load() is not None:
        return Check("init", True, detail)
    why = tiny.why_not() or "unknown"
    fix = ("" if "PYNSBOOK_TINY_INIT" in why else
           "sudo apt-get install gcc libc6-dev musl-tools (pynsbook compiles it once, on first use)")
    return Check("init", False, detail, why + "; containers work the same, but each idle "
                 "one holds about 4 MiB", fix)


def _confinement(mnt_ok: bool) -> List[Check]:
    """Each layer of the default confinement, and whether this host gives it."""
    from .linux import seccomp
    checks = [Check("caps", True, "capabilities cut to Docker's default 14 (no SYS_ADMIN, "
                    "SYS_MODULE, SYS_TIME, ...), inheritable and ambient empty; no_new_privs")]
    ok, why = seccomp.available()
    checks.append(Check("seccomp", ok, "system-call filter: mount, keyctl, clock_settime, "
                        "reboot, bpf, ptrace, new namespaces... fail with EPERM",
                        why + "; containers run without the filter (and say so)" if not ok else "",
                        "sudo apt-get install libseccomp2 && pip install pyseccomp" if not ok else ""))
    what = "/proc/kcore, /proc/keys, /proc/timer_list... masked; /proc/sys, /sys read-only"
    checks.append(Check("paths", mnt_ok, what, "" if mnt_ok else
                        "needs a mount namespace, which this host does not give",
                        "" if mnt_ok else "see the mnt namespace above"))
    checks.append(Check("devices", mnt_ok, "/dev holds null, zero, full, random, urandom, tty, "
                        "pts, shm, mqueue; every writable mount is nodev (a device node made "
                        "with mknod cannot be opened)", "" if mnt_ok else
                        "needs a mount namespace: the host's /dev is shared", ""))
    return checks


def doctor() -> DoctorReport:
    """Probe the host (real unshare and mount attempts in a child process) and report."""
    backend = cgroups.backend()
    have = backend.controllers()
    uid = os.geteuid()
    report = DoctorReport(kernel=platform.release(),
                          user="root" if uid == 0 else f"uid {uid} (unprivileged)",
                          cgroup_mode=cgroups.mode(), cgroup_backend=backend.name,
                          cgroup_base=backend.base(), swap_accounting=backend.can_swap())
    for controller in (MEMORY, CPU, CPUSET, PIDS, IO):
        if controller in have:
            report.controllers.append(Check(controller, True, f"limits {_LIMIT_OF[controller]}"))
        else:
            m = backend.missing(controller)
            report.controllers.append(Check(controller, False, f"limits {_LIMIT_OF[controller]}",
                                            m.reason, m.fix or ""))
    ns = probe.namespaces()
    for name in NAMESPACES:
        ok, reason, fix = ns[name]
        report.namespaces.append(Check(name, ok, _NS_WHAT[name], reason, fix))
    report.user_namespaces = next(c for c in report.namespaces if c.name == "user")
    report.time_namespace = next(c for c in report.namespaces if c.name == "time")
    ok, reason, fix = probe.overlay()
    report.overlay = Check("overlay", ok, "overlayfs: image layers and the throwaway container "
                           "layer", reason, fix)
    report.small_init = _small_init()
    report.confinement = _confinement(ns["mnt"][0])
    from .images import doctor_note  # how image roots are mounted here
    report.notes.append(doctor_note())
    if not have:
        report.notes.append("without cgroups, --mem and --pids work only with --best-effort, "
                            "enforced approximately (sampling and rlimits); --cpus and IO "
                            "limits cannot be enforced")
    elif MEMORY in have and not backend.can_swap():
        report.notes.append("swap is not accounted per cgroup here: --swap is refused, and a "
                            "container may use swap beyond --mem if the host has swap")
    return report
