"""seccomp: the system calls a container may not make.

Filters are written with libseccomp (through ``pyseccomp``, a ctypes binding that is API
compatible with libseccomp's own Python module) and compiled once to classic BPF; a
container's process loads the compiled program with one prctl(2), which costs microseconds
instead of the milliseconds libseccomp takes to build a filter.

The default filter follows the semantics of Docker's default profile: calls that reach
past the container into the kernel or the machine fail with EPERM (keys, modules, clocks,
reboot, swap, mounting, new namespaces other than a user namespace, BPF, perf, tracing
other processes, pushing input into a terminal...). Like Docker's, most of them come back
when the matching capability is added (``--cap-add SYS_ADMIN`` brings back mount).
Docker's profile lists the calls it allows; this one lists the calls it refuses, so a
system call newer than the list is allowed.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Tuple

from . import libc

#: (calls, the capability that brings them back, or None)
_REFUSED: Tuple[Tuple[Tuple[str, ...], Optional[str]], ...] = (
    (("keyctl", "add_key", "request_key"), None),
    (("bpf",), "BPF"),
    (("perf_event_open",), "PERFMON"),
    (("userfaultfd",), None),
    (("clock_settime", "clock_settime64", "settimeofday", "stime", "adjtimex",
      "clock_adjtime", "clock_adjtime64"), "SYS_TIME"),
    (("init_module", "finit_module", "delete_module", "create_module",
      "get_kernel_syms", "query_module"), "SYS_MODULE"),
    (("kexec_load", "kexec_file_load", "reboot"), "SYS_BOOT"),
    (("swapon", "swapoff"), "SYS_ADMIN"),
    (("open_by_handle_at", "name_to_handle_at"), "DAC_READ_SEARCH"),
    (("mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount",
      "fspick", "move_mount", "open_tree", "mount_setattr", "quotactl", "quotactl_fd",
      "setns", "lookup_dcookie", "nfsservctl", "vm86", "vm86old", "uselib", "ustat",
      "sysfs", "_sysctl", "fanotify_init"), "SYS_ADMIN"),
    (("acct",), "SYS_PACCT"),
    # ptrace and process_vm_* stay allowed, as in Docker's profile on kernels >= 4.8 (a
    # tracer can no longer bypass the filter): strace and gdb work on the container's own
    # processes, and the kernel refuses its init, which holds more capabilities
    (("kcmp", "pidfd_getfd"), "SYS_PTRACE"),
    (("iopl", "ioperm"), "SYS_RAWIO"),
    (("syslog",), "SYSLOG"),
    (("vhangup",), "SYS_TTY_CONFIG"),
    (("io_uring_setup", "io_uring_enter", "io_uring_register"), None),
    (("get_mempolicy", "set_mempolicy", "mbind", "move_pages"), "SYS_NICE"),
)

#: namespace flags of clone(2) and unshare(2) that only SYS_ADMIN may use (not CLONE_NEWUSER:
#: a user namespace is what unprivileged programs such as browsers sandbox themselves with)
_NS_FLAGS = (0x00000080, 0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x20000000,
             0x40000000)
#: ADDR_NO_RANDOMIZE (no ASLR), MMAP_PAGE_ZERO (page 0 mapped: NULL-pointer exploits) and
#: READ_IMPLIES_EXEC (data executable) (<linux/personality.h>)
_PERSONA_FLAGS = (0x0040000, 0x0100000, 0x0400000)
_TIOCSTI = 0x5412  # push a character into a terminal's input: a shell outside reads it
_TIOCLINUX = 0x541C

_SECCOMP_MODE_FILTER = 2
PR_SET_SECCOMP = 22


_AVAILABLE: List[Tuple[bool, str]] = []
_FIX = "install it with: apt-get install libseccomp2 && pip install pyseccomp"


def available() -> Tuple[bool, str]:
    """(usable, why not): libseccomp and a binding are there (asked once, without loading
    the binding: a client that only plans a container need not pay for it)."""
    if not _AVAILABLE:
        import importlib.util
        if not any(importlib.util.find_spec(m) for m in ("seccomp", "pyseccomp")):
            _AVAILABLE.append((False, f"no Python binding of libseccomp; {_FIX}"))
        else:
            try:
                ctypes.CDLL(_SONAME)
                _AVAILABLE.append((True, ""))
            except OSError as err:
                _AVAILABLE.append((False, f"libseccomp cannot be loaded ({err}); {_FIX}"))
    return _AVAILABLE[0]


_SONAME = "libseccomp.so.2"


def _module() -> Any:
    try:
        import seccomp  # libseccomp's own binding, where Debian's python3-seccomp is seen
        return seccomp
    except ImportError:
        pass
    # pyseccomp (the same API through ctypes) looks its libraries up with find_library,
    # which runs ldconfig each time (~4 ms); the dynamic loader finds them by soname itself
    import ctypes.util
    real = ctypes.util.find_library
    known = {"c": "libc.so.6", "seccomp": _SONAME}
    ctypes.util.find_library = lambda name: known.get(name) or real(name)
    try:
        import pyseccomp
    finally:
        ctypes.util.find_library = real
    return pyseccomp


def _refuse_all(flt: Any, names: Iterable[str], action: int) -> None:
    for name in names:
        try:
            flt.add_rule(action, name)
        except (OSError, ValueError, RuntimeError):
            pass  # this architecture has no such call (stime, vm86, ...)


def _default(sc: Any, caps: FrozenSet[str]) -> Any:
    """The default filter for a process that keeps ``caps``."""
    flt = sc.SyscallFilter(sc.ALLOW)
    eperm = sc.ERRNO(errno.EPERM)
    for names, cap in _REFUSED:
        if cap is None or cap not in caps:
            _refuse_all(flt, names, eperm)
    # personality flags that weaken the process against exploits (ADDR_NO_RANDOMIZE turns off
    # ASLR, READ_IMPLIES_EXEC makes data executable...), as Docker refuses them. The query
    # personality(0xffffffff) changes nothing and stays allowed: a rule can test one
    # comparison per argument, so "flag set and not the query" is written as "flag set and
    # some other bit clear", for each other bit (the kernel reads the low 32 bits only)
    for flag in _PERSONA_FLAGS:
        for other in range(32):
            if (1 << other) != flag:
                flt.add_rule(eperm, "personality",
                             sc.Arg(0, sc.MASKED_EQ, flag | (1 << other), flag))
    if "SYS_ADMIN" not in caps:
        for call in ("unshare", "clone"):
            for bit in _NS_FLAGS:
                flt.add_rule(eperm, call, sc.Arg(0, sc.MASKED_EQ, bit, bit))
        # clone3 passes its flags in memory a filter cannot read: say it does not exist,
        # so that the C library falls back to clone, whose flags the rules above see
        _refuse_all(flt, ["clone3"], sc.ERRNO(errno.ENOSYS))
        # ioctl's request is 32 bits in the kernel: compare only those, or 0x...00005412
        # would pass the filter and still be TIOCSTI
        for request in (_TIOCSTI, _TIOCLINUX):
            flt.add_rule(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    return flt


_ACTIONS = {"SCMP_ACT_ALLOW": "ALLOW", "SCMP_ACT_ERRNO": "ERRNO", "SCMP_ACT_KILL": "KILL",
            "SCMP_ACT_KILL_THREAD": "KILL", "SCMP_ACT_KILL_PROCESS": "KILL_PROCESS",
            "SCMP_ACT_TRAP": "TRAP", "SCMP_ACT_LOG": "LOG"}
_OPS = {"SCMP_CMP_NE": "NE", "SCMP_CMP_LT": "LT", "SCMP_CMP_LE": "LE", "SCMP_CMP_EQ": "EQ",
        "SCMP_CMP_GE": "GE", "SCMP_CMP_GT": "GT", "SCMP_CMP_MASKED_EQ": "MASKED_EQ"}


class ProfileError(ValueError):
    """A Docker-format profile that cannot be used; the message is one line."""


def _action(sc: Any, name: Any, errno_ret: Any, where: str) -> int:
    if name not in _ACTIONS:
        raise ProfileError(f"{where}: unknown action {name!r} (known: {', '.join(_ACTIONS)})")
    kind = _ACTIONS[name]
    if kind == "ERRNO":
        if errno_ret is not None and not (isinstance(errno_ret, int) and 0 <= errno_ret <= 4095):
            raise ProfileError(f"{where}: errnoRet {errno_ret!r} must be a number from 0 to 4095")
        return sc.ERRNO(errno_ret if errno_ret is not None else errno.EPERM)
    return getattr(sc, kind)


def _includes(rule: Dict[str, Any], caps: FrozenSet[str]) -> bool:
    """Docker's includes/excludes: a rule may apply only with (or without) capabilities."""
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("caps") and not all(c.upper().replace("CAP_", "") in caps for c in inc["caps"]):
        return False
    if exc.get("caps") and any(c.upper().replace("CAP_", "") in caps for c in exc["caps"]):
        return False
    arches = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}
    mine = arches.get(libc.MACHINE)
    if inc.get("arches") and mine not in inc["arches"]:
        return False
    if exc.get("arches") and mine in exc["arches"]:
        return False
    return True


def _from_profile(sc: Any, profile: Dict[str, Any], caps: FrozenSet[str]) -> Any:
    """A filter from a Docker-format JSON profile (defaultAction, syscalls[].names/action/
    args, includes/excludes by capability). A rule that cannot be applied as written is a
    ProfileError: a filter silently weaker than its profile would fail open. Only a call
    this architecture does not have is passed over (profiles list every architecture's)."""
    if not isinstance(profile, dict) or "defaultAction" not in profile:
        raise ProfileError("not a Docker seccomp profile: it has no \"defaultAction\"")
    flt = sc.SyscallFilter(_action(sc, profile["defaultAction"],
                                   profile.get("defaultErrnoRet"), "defaultAction"))
    rules = profile.get("syscalls") or []
    if not isinstance(rules, list):
        raise ProfileError("\"syscalls\" is not a list")
    for i, rule in enumerate(rules):
        where = f"syscalls[{i}]"
        if not isinstance(rule, dict):
            raise ProfileError(f"{where} is not an object")
        if not _includes(rule, caps):
            continue
        action = _action(sc, rule.get("action"), rule.get("errnoRet"), where)
        args = _args(sc, rule.get("args") or [], where)
        names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ProfileError(f"{where}: \"names\" is not a list of system call names")
        for name in names:
            if sc.resolve_syscall(sc.Arch.NATIVE, name) < 0:
                continue  # not a call of this architecture (or not one libseccomp knows)
            if action == _default_action(sc, profile):
                continue  # the same as the default: nothing to add
            try:
                flt.add_rule(action, name, *args)
            except (OSError, ValueError, RuntimeError) as err:
                raise ProfileError(f"{where}: libseccomp refused the rule for {name}: {err}") from None
    return flt


def _default_action(sc: Any, profile: Dict[str, Any]) -> int:
    return _action(sc, profile["defaultAction"], profile.get("defaultErrnoRet"), "defaultAction")


def _args(sc: Any, raw: Any, where: str) -> List[Any]:
    """A rule's argument comparisons, checked: six arguments, one comparison each (what a
    rule can test), 64-bit values."""
    if not isinstance(raw, list):
        raise ProfileError(f"{where}: \"args\" is not a list")
    out, seen = [], set()
    for a in raw:
        if not isinstance(a, dict):
            raise ProfileError(f"{where}: an argument comparison is not an object")
        op = _OPS.get(a.get("op"))
        index, value, two = a.get("index"), a.get("value"), a.get("valueTwo", 0) or 0
        if op is None:
            raise ProfileError(f"{where}: unknown op {a.get('op')!r} (known: {', '.join(_OPS)})")
        if not isinstance(index, int) or not 0 <= index <= 5 or index in seen:
            raise ProfileError(f"{where}: argument index {index!r} must be 0-5, once per rule")
        if not all(isinstance(v, int) and 0 <= v < 1 << 64 for v in (value, two)):
            raise ProfileError(f"{where}: values must be whole numbers from 0 to 2^64-1")
        seen.add(index)
        out.append(sc.Arg(index, getattr(sc, op), value, two))
    return out


def load_profile(path: str) -> Dict[str, Any]:
    """Read and check a Docker-format profile file; ProfileError with one line if bad."""
    try:
        with open(path) as f:
            profile = json.load(f)
    except OSError as err:
        raise ProfileError(f"cannot read {path}: {err.strerror}") from None
    except ValueError as err:
        raise ProfileError(f"{path} is not JSON: {err}") from None
    if not isinstance(profile, dict) or "defaultAction" not in profile:
        raise ProfileError(f"{path} is not a Docker seccomp profile (no \"defaultAction\")")
    try:  # every rule must apply as written (with every capability, so that all count)
        _from_profile(_module(), profile, frozenset(_ALL_CAPS))
    except ImportError as err:
        raise ProfileError(f"cannot load libseccomp to read it ({err}); {_FIX}") from None
    except ProfileError as err:
        raise ProfileError(f"{path}: {err}") from None
    return profile


#: capability names (caps.py), for the includes/excludes of a profile's rules
from .caps import NAMES as _ALL_CAPS  # noqa: E402

_CACHE: Dict[Tuple, bytes] = {}


def compile_bpf(caps: FrozenSet[str], profile: Optional[Dict[str, Any]] = None) -> bytes:
    """The classic-BPF program for the default filter (or ``profile``) given the kept
    capabilities. Cached: the launcher compiles the default once, its forks reuse it."""
    key = (caps, json.dumps(profile, sort_keys=True) if profile is not None else None)
    if key not in _CACHE:
        sc = _module()
        flt = _from_profile(sc, profile, caps) if profile is not None else _default(sc, caps)
        fd = os.memfd_create("pynsbook-seccomp", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "wb") as f:
                flt.export_bpf(f)
            size = os.lseek(fd, 0, os.SEEK_END)
            _CACHE[key] = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    return _CACHE[key]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_SYS_SECCOMP = {"aarch64": 277, "riscv64": 277, "ppc64le": 358, "s390x": 348,
                "i686": 354, "armv7l": 383}.get(libc.MACHINE, 317)
_SECCOMP_SET_MODE_FILTER = 1
#: leave the speculative-store-bypass mitigation as the host set it: by default the
#: kernel forces it on for filtered processes, which slows the workload (systemd, crun)
_SECCOMP_FILTER_FLAG_SPEC_ALLOW = 4


def load_bpf(program: bytes) -> None:
    """Install a compiled filter on this thread (needs no_new_privs, or SYS_ADMIN). It is
    inherited by every child and kept across exec; it can never be removed."""
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    try:
        libc.raw_syscall(_SYS_SECCOMP, "seccomp(SET_MODE_FILTER)",
                         ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
                         ctypes.c_uint(_SECCOMP_FILTER_FLAG_SPEC_ALLOW), ctypes.byref(prog))
    except OSError as err:
        if err.errno != errno.EINVAL:  # EINVAL: a kernel older than the flag (4.17)
            raise
        libc.prctl4(PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(prog))
