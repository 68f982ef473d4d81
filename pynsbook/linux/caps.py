"""Linux capabilities: their names, and reducing a process to a set of them.

A process has five capability sets (capabilities(7)). To confine a container's process
for good, all five are cut down before it runs anything: the bounding set (the most any
later exec can give back), then effective and permitted through capset(2); the inheritable
and ambient sets are emptied. Root gets its bounding set at exec, so the bounding set is
what a shell in the container ends up with.
"""
from __future__ import annotations

import ctypes
from typing import FrozenSet, Iterable

from . import libc

#: <linux/capability.h>, by number
NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
    "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
    "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
NUMBER = {name: i for i, name in enumerate(NAMES)}

#: what Docker gives a container by default: enough to act as root over its own files
#: and processes, nothing over the kernel, the devices or the machine
DEFAULT: FrozenSet[str] = frozenset({
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
    "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
})
ALL: FrozenSet[str] = frozenset(NAMES)

FORM = "capability names like NET_ADMIN or CAP_SYS_PTRACE, comma-separated, or ALL"

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522
#: glibc's capset() wrapper is in libcap, not libc: the raw system call, by architecture
_SYS_CAPSET = {"aarch64": 91, "riscv64": 91, "ppc64le": 184, "s390x": 185,
               "i686": 185, "armv7l": 185}.get(libc.MACHINE, 126)
_SYS_CAPGET = _SYS_CAPSET - 1  # capget is just before capset in every table above


def normalize(name: str) -> str:
    """``cap_net_admin`` -> ``NET_ADMIN``; raises KeyError for an unknown name."""
    upper = name.strip().upper()
    if upper.startswith("CAP_"):
        upper = upper[4:]
    if upper != "ALL" and upper not in NUMBER:
        raise KeyError(name)
    return upper


def mask(names: Iterable[str]) -> int:
    """The bit mask of a set of names, as /proc/PID/status prints it (CapEff etc.)."""
    bits = 0
    for name in names:
        bits |= 1 << NUMBER[name]
    return bits


def _last_cap() -> int:
    """The highest capability this kernel knows (newer kernels know more than NAMES)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(NAMES) - 1


#: read once, at import: a container's /proc/sys may be masked, and the read costs time
LAST_CAP = _last_cap()


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def restrict_bounding(keep: FrozenSet[str]) -> None:
    """Drop every capability but ``keep`` from the bounding set, and clear the ambient set:
    no exec can give this process or its children more than ``keep`` again.

    Dropping needs CAP_SETPCAP. A process without it (an ordinary user, no user namespace)
    has no capabilities to lose, and with no_new_privs no exec can give it any: its
    bounding set is left as it is."""
    keep_bits = mask(keep)
    for cap in range(LAST_CAP + 1):
        if keep_bits & (1 << cap):
            continue  # (dropping one that is not there succeeds: no need to read first)
        try:
            libc.prctl(PR_CAPBSET_DROP, cap)
        except PermissionError:
            if _effective() & (1 << NUMBER["SETPCAP"]):
                raise
            break
    libc.prctl4(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def _capget() -> "ctypes.Array[_Data]":
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    libc.raw_syscall(_SYS_CAPGET, "capget", ctypes.byref(header), ctypes.byref(data))
    return data


def _effective() -> int:
    data = _capget()
    return data[0].effective | (data[1].effective << 32)


def restrict(keep: FrozenSet[str]) -> None:
    """Reduce this process's effective and permitted sets to ``keep`` (or to what it has of
    it), inheritable to none. Irreversible; call it after everything that needs more."""
    current = _capget()
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    keep_bits = mask(keep)
    for i in (0, 1):  # 64 bits in two 32-bit halves
        half = (keep_bits >> (32 * i)) & 0xFFFFFFFF & current[i].permitted
        # inheritable stays empty, as in runc since CVE-2022-24769: with file capabilities
        # it could hand a non-root program capabilities across an exec
        data[i].effective = data[i].permitted = half
    libc.raw_syscall(_SYS_CAPSET, "capset", ctypes.byref(header), ctypes.byref(data))


def no_new_privs() -> None:
    """No exec may ever give this process or its children more privileges (setuid bits and
    file capabilities stop working); also what lets it load a seccomp filter unprivileged."""
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
