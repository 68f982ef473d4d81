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
from typing import List, Optional, Sequence, Tuple

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


def _toolchains() -> List[Tuple[str, str, List[str]]]:
    """(name, compiler, flags), best first: musl's static C library keeps a process at
    ~18 KiB of its own memory, glibc's static one at ~80 KiB (measured). Static only: init
    execs the program inside the container's root, where an image's loader and C library
    (if any) need not match the host's."""
    out = []
    musl = shutil.which("musl-gcc")
    if musl and not os.environ.get("CC"):
        out.append(("musl", musl, ["-static"]))
    cc = _compiler()
    if cc:
        out.append(("static", cc, ["-static"]))
    return out


def binary_path(toolchain: str = "static") -> Path:
    """Where the compiled program is kept: named by the source's hash, so an upgraded
    pynsbook compiles its own, and by the toolchain that built it."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"tinyinit-{digest}-{toolchain}-{platform.machine()}"


def build() -> Path:
    """The compiled program: cached, or compiled now with the best toolchain that works
    (a copy cached earlier serves when none does). Raises RuntimeError with the reason
    when there is none."""
    chains = _toolchains()
    cached = [binary_path(name) for name in ("musl", "static") if binary_path(name).is_file()]
    errors = []
    for name, cc, flags in chains:
        target = binary_path(name)
        if target.is_file() and os.access(target, os.X_OK):
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tinyinit-", dir=target.parent)
        except OSError as err:
            errors.append(str(err))
            continue
        os.close(fd)
        try:
            out = subprocess.run([cc, "-O2", "-s", "-o", tmp, str(SOURCE)] + flags,
                                 capture_output=True, text=True, timeout=120)
            if out.returncode == 0:
                os.chmod(tmp, 0o755)
                os.replace(tmp, target)  # atomic: another process may be compiling too
                _prune(target)
                return target
            text = (out.stderr or out.stdout).strip().splitlines()
            errors.append(text[-1] if text else f"exit status {out.returncode}")
        except (OSError, subprocess.TimeoutExpired) as err:
            errors.append(str(err))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if cached:
        return cached[0]
    if not chains:
        raise RuntimeError("no C compiler (install one: sudo apt-get install gcc libc6-dev)")
    raise RuntimeError(f"{chains[-1][1]} could not compile {SOURCE.name} statically "
                       f"({errors[-1]}; a static C library: libc6-dev, or musl-tools)")


def _prune(keep: Path) -> None:
    """Remove programs compiled from an earlier source (a running one keeps its open copy)."""
    digest = keep.name.split("-")[1]
    for old in keep.parent.glob(f"tinyinit-*-{platform.machine()}"):
        if old.name.split("-")[1] != digest:
            old.unlink(missing_ok=True)


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
