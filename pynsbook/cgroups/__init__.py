"""cgroup backends. The host's cgroup mode is detected once; the rest of pynsbook asks
``backend()`` and never spells v1 or v2 file names itself.
"""
from __future__ import annotations

import functools
from typing import FrozenSet, List, Optional

from ..linux.mountinfo import Mount, read_mountinfo
from .base import (CPU, CPUSET, FREEZER, IO, LIMIT_CONTROLLER, MEMORY, PIDS, Backend, Cgroup,
                   Missing)

__all__ = ["Backend", "Cgroup", "Missing", "backend", "mode", "LIMIT_CONTROLLER",
           "MEMORY", "CPU", "CPUSET", "PIDS", "IO", "FREEZER"]


def mode(mounts: Optional[List[Mount]] = None) -> str:
    """``v2`` (unified only), ``hybrid`` (v1 controllers plus a cgroup2 mount), ``v1`` or ``none``."""
    mounts = read_mountinfo() if mounts is None else mounts
    v1 = any(m.fstype == "cgroup" and not any(o.startswith("name=") for o in m.super_options)
             for m in mounts)
    v2 = any(m.fstype == "cgroup2" for m in mounts)
    if v1 and v2:
        return "hybrid"
    if v1:
        return "v1"
    return "v2" if v2 else "none"


class NoCgroups(Backend):
    """Hosts without usable cgroups: no limits from the kernel's cgroups at all."""

    name = "none"

    def __init__(self, why: Missing) -> None:
        self.why = why

    def controllers(self) -> FrozenSet[str]:
        return frozenset()

    def missing(self, controller: str) -> Missing:
        return self.why

    def create(self, container: str) -> Cgroup:
        raise OSError(self.why.reason)


@functools.lru_cache(maxsize=None)
def backend() -> Backend:
    """The backend for this host and user (cached: the host does not change under us)."""
    m = mode()
    if m in ("v1", "hybrid"):
        from .v1 import V1Backend
        return V1Backend()
    if m == "v2":
        from .v2 import V2Backend
        return V2Backend()
    return NoCgroups(Missing("no cgroup filesystem is mounted on this host",
                             "sudo mount -t cgroup2 none /sys/fs/cgroup"))
