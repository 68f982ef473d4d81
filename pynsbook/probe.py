"""What this host lets this user do: namespace kinds, user namespaces, overlayfs, cgroups.

Each probe runs the real thing once in short-lived child processes (never forks of the
notebook's kernel) and is cached for the life of the process. The warm launcher measures it
as it starts (forks of a fresh, single-threaded process) and hands it over (:func:`seed`),
so a client need not start an interpreter of its own for it.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from typing import Any, Dict, Optional, Tuple

from .spec import NAMESPACES

# Runs in a fresh interpreter (or a fresh launcher, see measure()): for each namespace kind,
# fork and try to unshare it (inside a new user namespace when not root, as an unprivileged
# user must). The children run side by side; each reports on a pipe of its own.
_NS_PROBE_BODY = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
FLAGS = dict(cgroup=0x02000000, ipc=0x08000000, net=0x40000000, mnt=0x00020000,
             pid=0x20000000, time=0x00000080, user=0x10000000, uts=0x04000000)
root = os.geteuid() == 0
out = {}
children = {}
for name, flag in FLAGS.items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        err = 0
        if not root and name != "user" and libc.unshare(FLAGS["user"]) != 0:
            err = ctypes.get_errno()
        elif libc.unshare(flag) != 0:
            err = ctypes.get_errno()
        os.write(w, str(err).encode()); os._exit(0)
    os.close(w)
    children[name] = (pid, r)
for name, (pid, r) in children.items():
    out[name] = int(os.read(r, 16) or b"-1"); os.close(r)
for pid, _ in children.values():
    os.waitpid(pid, 0)
overlay = -1
uid, gid = os.geteuid(), os.getegid()
pid = os.fork()
if pid == 0:
    try:
        if not root:
            if libc.unshare(FLAGS["user"]) != 0: os._exit(2)
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                               ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f: f.write(text)
        if libc.unshare(FLAGS["mnt"]) != 0: os._exit(3)
        libc.mount(None, b"/", None, 16384 | (1 << 18), None)
        if libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None) != 0: os._exit(4)
        for d in ("/tmp/l", "/tmp/u", "/tmp/w", "/tmp/m"): os.mkdir(d)
        rc = libc.mount(b"overlay", b"/tmp/m", b"overlay", 0,
                        b"lowerdir=/tmp/l,upperdir=/tmp/u,workdir=/tmp/w")
        os._exit(0 if rc == 0 else 10 + ctypes.get_errno())
    except BaseException:
        os._exit(5)
_, status = os.waitpid(pid, 0)
overlay = os.waitstatus_to_exitcode(status)
result = {"ns": out, "overlay": overlay}
"""
_NS_PROBE = _NS_PROBE_BODY + "print(json.dumps(result))\n"


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


_raw: Optional[Dict[str, Any]] = None
_raw_lock = threading.Lock()


def measure() -> Dict[str, Any]:
    """Run the probe in this process (its forks do the trying). Only for a fresh,
    single-threaded process such as the launcher: never the notebook's kernel."""
    scope: Dict[str, Any] = {}
    exec(_NS_PROBE_BODY, scope)  # noqa: S102 - our own constant source
    return scope["result"]


def seed(raw: Dict[str, Any]) -> None:
    """Use a probe measured by another process of this user (the launcher), unless this
    process has one already."""
    global _raw
    with _raw_lock:
        if _raw is None and isinstance(raw, dict) and isinstance(raw.get("ns"), dict):
            _raw = raw


def measured() -> bool:
    """Whether this process has its probe already (measured here, or seeded)."""
    return _raw is not None


def _raw_probe() -> Dict:
    global _raw
    with _raw_lock:
        if _raw is None:
            try:
                out = subprocess.run([sys.executable, "-S", "-c", _NS_PROBE], capture_output=True,
                                     text=True, timeout=30, start_new_session=True)
                _raw = json.loads(out.stdout)
            except (OSError, ValueError, subprocess.SubprocessError):
                _raw = {"ns": {n: -1 for n in NAMESPACES}, "overlay": -1}
        return _raw


def userns_blocker() -> Tuple[str, str]:
    """Why unprivileged user namespaces fail here, and the command that allows them."""
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        return ("user namespaces are disabled (user.max_user_namespaces = 0)",
                "sudo sysctl -w user.max_user_namespaces=15000")
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return ("unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0)",
                "sudo sysctl -w kernel.unprivileged_userns_clone=1")
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return ("AppArmor restricts unprivileged user namespaces",
                "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")
    return ("the kernel refused to create a user namespace (seccomp or a container runtime "
            "may block it)", "run Jupyter on a host or VM that allows unshare(CLONE_NEWUSER)")


@functools.lru_cache(maxsize=None)
def namespaces() -> Dict[str, Tuple[bool, str, str]]:
    """namespace kind -> (usable, reason if not, fix if not)."""
    raw = _raw_probe()["ns"]
    root = os.geteuid() == 0
    out: Dict[str, Tuple[bool, str, str]] = {}
    user_ok = raw.get("user", -1) == 0
    for name in NAMESPACES:
        err = raw.get(name, -1)
        if err == 0:
            out[name] = (True, "", "")
        elif not os.path.exists(f"/proc/self/ns/{name}"):
            out[name] = (False, f"this kernel has no {name} namespace",
                         "use Linux 5.6 or newer" if name == "time" else "use a newer kernel")
        elif not root and not user_ok:
            reason, fix = userns_blocker()
            out[name] = (False, f"an unprivileged user needs a user namespace first, and {reason}",
                         fix)
        elif name == "user":
            reason, fix = userns_blocker()
            out[name] = (False, reason, fix)
        else:
            out[name] = (False, f"unshare refused: {os.strerror(err) if err > 0 else 'unknown'}",
                         "run as root, or allow user namespaces")
    return out


@functools.lru_cache(maxsize=None)
def overlay() -> Tuple[bool, str, str]:
    """Whether this user can mount overlayfs (in a user namespace when not root)."""
    if "overlay" not in (_read("/proc/filesystems") or ""):
        return (False, "the kernel has no overlayfs", "sudo modprobe overlay")
    code = _raw_probe()["overlay"]
    if code == 0:
        return (True, "", "")
    if code == 2:
        reason, fix = userns_blocker()
        return (False, f"mounting needs a user namespace, and {reason}", fix)
    if code >= 10:
        return (False, f"overlay mount refused: {os.strerror(code - 10)}",
                "use Linux 5.11 or newer for overlayfs in user namespaces")
    return (False, "overlay mount probe failed", "run pynsbook doctor as root to compare")
