"""ctypes bindings for the syscalls Python's os module lacks (mount, pivot_root, unshare,
setns on Python < 3.12). Every call raises ``OSError(errno, "name(args) failed: ...")``.
"""
from __future__ import annotations

import ctypes

import os
from typing import Optional

# the C library this interpreter already runs on (find_library would run ldconfig: ~4 ms)
_libc = ctypes.CDLL(None, use_errno=True)

# <linux/sched.h>
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: namespace name (as in /proc/self/ns) -> clone flag
NS_FLAGS = {
    "cgroup": CLONE_NEWCGROUP, "ipc": CLONE_NEWIPC, "net": CLONE_NEWNET, "mnt": CLONE_NEWNS,
    "pid": CLONE_NEWPID, "time": CLONE_NEWTIME, "user": CLONE_NEWUSER, "uts": CLONE_NEWUTS,
}

# <sys/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} failed: {os.strerror(err)}")
    return result


def _b(s: Optional[str]) -> Optional[bytes]:
    return None if s is None else os.fsencode(s)


_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def mount(source: Optional[str], target: str, fstype: Optional[str] = None, flags: int = 0,
          data: Optional[str] = None) -> None:
    """mount(2)."""
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           f"mount({source!r}, {target!r}, {fstype!r}, {data!r})")


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc.umount2(_b(target), flags), f"umount2({target!r})")


MACHINE = os.uname().machine

# glibc has no pivot_root wrapper; the number depends on the architecture (<asm/unistd.h>)
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203,
                   "s390x": 217, "i686": 217, "armv7l": 218}.get(MACHINE, 155)
# mount_setattr(2) has one number on every architecture (new system calls share a table)
_SYS_MOUNT_SETATTR = 442
_SYS_KEYCTL = {"aarch64": 219, "riscv64": 219, "ppc64le": 271, "s390x": 280,
               "i686": 288, "armv7l": 311}.get(MACHINE, 250)


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2): make ``new_root`` the root of this mount namespace."""
    _check(_libc.syscall(_SYS_PIVOT_ROOT, _b(new_root), _b(put_old)),
           f"pivot_root({new_root!r}, {put_old!r})")


def unshare(flags: int) -> None:
    """unshare(2) (os.unshare exists only from Python 3.12)."""
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2): join the namespace that ``fd`` (an open /proc/PID/ns/* file) refers to."""
    _check(_libc.setns(fd, nstype), f"setns({fd}, {nstype:#x})")


def prctl(option: int, arg2: int = 0) -> None:
    """prctl(2) for options that take one integer argument."""
    _check(_libc.prctl(option, arg2, 0, 0, 0), f"prctl({option}, {arg2})")


def prctl4(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0) -> None:
    """prctl(2) with more integer arguments (the rest must be 0, as the kernel insists)."""
    _check(_libc.prctl(option, arg2, arg3, arg4, 0), f"prctl({option}, {arg2}, {arg3})")


def raw_syscall(number: int, name: str, *args: object) -> int:
    """syscall(2) for calls glibc does not wrap; arguments as ctypes values."""
    return _check(_libc.syscall(number, *args), name)


# <linux/mount.h>
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
AT_RECURSIVE = 0x8000
_AT_FDCWD = -100


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(path: str, attr_set: int, recursive: bool = True) -> None:
    """mount_setattr(2): set mount attributes on ``path`` and, recursively, every mount
    below it (a remount with MS_BIND|MS_RDONLY changes the top mount only)."""
    attr = _MountAttr(attr_set, 0, 0, 0)
    raw_syscall(_SYS_MOUNT_SETATTR, f"mount_setattr({path!r})", ctypes.c_int(_AT_FDCWD),
                _b(path), ctypes.c_uint(AT_RECURSIVE if recursive else 0),
                ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))


KEYCTL_JOIN_SESSION_KEYRING = 1


def join_new_session_keyring() -> None:
    """Give this process a new, empty session keyring of its own (keyctl(2)): otherwise it
    shares its parent's, and the keys in it (credentials, tokens) with it."""
    raw_syscall(_SYS_KEYCTL, "keyctl(JOIN_SESSION_KEYRING)",
                ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), ctypes.c_void_p(None))
