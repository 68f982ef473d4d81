"""The small resident program (tinyinit.c) that a container's init and shim become once
Python has built the container: compiled once per machine, executed from a descriptor.

An idle container then costs kilobytes instead of two forked interpreters' megabytes
(issue 7's density goal). Without a C compiler, or with ``PYNSBOOK_TINY_INIT=0``, the init
and shim go on in Python (slower to idle, equivalent in behaviour); ``pynsbook doctor``
says which one runs and how to get the small one.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

SOURCE = Path(__file__).with_name("tinyinit.c")
_fd: Optional[int] = None
_why_not: Optional[str] = None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pynsbook"


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def binary_path() -> Path:
    """Where the compiled program is kept: named by the source's hash, so an upgraded
    pynsbook compiles its own."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"tinyinit-{digest}-{platform.machine()}"


def build() -> Path:
    """Compile tinyinit.c (statically when the C library allows) unless it is cached.
    Raises RuntimeError with the reason when it cannot."""
    target = binary_path()
    if target.is_file() and os.access(target, os.X_OK):
        return target
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (install one: sudo apt-get install gcc libc6-dev)")
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (["-static"], []):  # static: no shared libraries mapped into each container
        fd, tmp = tempfile.mkstemp(prefix=".tinyinit-", dir=target.parent)
        os.close(fd)
        cmd = [cc, "-O2", "-s", "-o", tmp, str(SOURCE)] + extra
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            out = None
            errors.append(str(err))
        if out is not None and out.returncode == 0:
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)  # atomic: another process may be compiling too
            for old in target.parent.glob(f"tinyinit-*-{platform.machine()}"):
                if old != target:  # an earlier pynsbook's (a running one keeps its open copy)
                    old.unlink(missing_ok=True)
            return target
        if out is not None:
            errors.append((out.stderr or out.stdout).strip().splitlines()[-1:] and
                          (out.stderr or out.stdout).strip().splitlines()[-1] or f"exit {out.returncode}")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    raise RuntimeError(f"{cc} could not compile {SOURCE.name}: {errors[-1] if errors else '?'}")


def load() -> Optional[int]:
    """Open the program once per process (compiling it if needed); None when the Python
    init and shim must be used, with the reason in :func:`why_not`."""
    global _fd, _why_not
    if _fd is not None or _why_not is not None:
        return _fd
    if os.environ.get("PYNSBOOK_TINY_INIT", "1") == "0":
        _why_not = "turned off (PYNSBOOK_TINY_INIT=0)"
        return None
    try:
        _fd = os.open(build(), os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, RuntimeError) as err:
        _why_not = str(err)
    return _fd


def why_not() -> Optional[str]:
    """Why the small init is not used (after :func:`load`), or None when it is."""
    return _why_not


def become(fd: int, argv: Sequence[str], keep: Sequence[int] = ()) -> None:
    """Replace this process with the program (``argv`` after the program name); ``keep``
    are descriptors it needs. Returns only if the exec failed."""
    for k in keep:
        os.set_inheritable(k, True)
    args: List[str] = ["pynsbook"] + [str(a) for a in argv]  # ps shows "pynsbook init 8"
    try:
        os.execve(fd, args, {})
    except OSError:
        return
