"""Spare containers, started before they are needed.

Most of a container's start is spent before any user code can run: namespaces, the root
filesystem, and joining the cgroup (on cgroup v1 the first move of a process into a cgroup
waits for an RCU grace period). When a process starts containers of the same shape again
and again (a sweep over limits, a benchmark, cell after cell), pynsbook keeps one spare of
that shape ready; the next start adopts it, writes its limits and hostname, and is done.

A spare is an ordinary container with no limits yet; it is used by exactly one start and
stopped like any other, so isolation and cleanup are what they are on the cold path.
``PYNSBOOK_POOL=0`` (or ``set_enabled(False)``) turns spares off.
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Dict, List, Optional, Set, Tuple

if TYPE_CHECKING:
    from .confine import Confinement
    from .container import Container
    from .plan import Plan
    from ..spec import Spec

#: a shape must be started this many times before a spare is kept for it
WARM_AFTER = 2
MAX_SHAPES = 4

_lock = threading.Lock()
_ready = threading.Condition(_lock)  # a spare in preparation was stored, or failed
_spares: Dict[Tuple, "Container"] = {}
_starts: Dict[Tuple, int] = {}
_enabled = os.environ.get("PYNSBOOK_POOL", "1") != "0"


_bypass = threading.local()


class bypassed:
    """``with pool.bypassed():`` starts in this thread neither take nor leave spares (to
    measure the cold path beside the prepared one, without draining the pool)."""

    def __enter__(self) -> None:
        _bypass.on = True

    def __exit__(self, *exc: object) -> None:
        _bypass.on = False


def set_enabled(enabled: bool) -> None:
    """Turn spares on or off; off stops the spares that wait."""
    global _enabled
    _enabled = enabled
    if not enabled:
        drain()


def shape(spec: "Spec", plan: "Plan", keep: Tuple[str, ...], confinement: "Confinement"
          ) -> Optional[Tuple]:
    """What a spare must match; None for containers that are never pooled."""
    if spec.rootfs or getattr(spec, "image", None):
        return None  # their layers and container layer belong to one container
    # a spare shows the directories it kept visible when it started (``keep``)
    # and its confinement: its init made the masks, its worker forked ahead confines itself
    return (tuple(plan.namespaces), spec.uptime, plan.use_cgroup, tuple(keep), confinement)


#: how long a start waits for a spare that is being prepared: finishing it is never slower
#: than starting another container beside it, on a machine with few cores
WAIT_FOR_SPARE = 1.0


def take(key: Optional[Tuple]) -> Optional["Container"]:
    """A ready spare of this shape (removed from the pool), or None."""
    if key is None or not _enabled or getattr(_bypass, "on", False):
        return None
    with _lock:
        _starts[key] = _starts.get(key, 0) + 1
        if key in _spares and _spares[key] is None:  # being prepared: wait for it
            _ready.wait_for(lambda: _spares.get(key, 0) is not None, WAIT_FOR_SPARE)
        spare = _spares.pop(key, None)
    if spare is not None and not spare.running:
        spare.stop()
        return None
    return spare


def refill(key: Optional[Tuple], spec: "Spec") -> None:
    """Start a spare of this shape in the background, if the shape is used often."""
    if key is None or not _enabled or getattr(_bypass, "on", False):
        return
    with _lock:
        if key in _spares or _starts.get(key, 0) < WARM_AFTER:
            return
        if len(_spares) >= MAX_SHAPES:
            return
        _spares[key] = None  # type: ignore[assignment]  # reserved: one refill at a time
    from . import background
    background.submit(_start_spare, key, spec)


def _start_spare(key: Tuple, spec: "Spec") -> None:
    from .container import Container
    base = spec.replace(memory=None, swap=None, cpus=None, cpuset=None, pids=None,
                        io_read_bps=(), io_write_bps=(), name=None, hostname=None,
                        timeout=None, env=(), workdir=None, best_effort=True)
    spare = None
    try:
        spare = Container(spec=base)
        spare._spare = True
        spare._keep = key[3]  # what the shape promises, whatever the cwd is by now
        spare.start()
    except BaseException:
        with _lock:
            if key in _spares and _spares[key] is None:
                del _spares[key]
            _ready.notify_all()
        return
    with _lock:
        if _enabled and key in _spares and _spares[key] is None:
            _spares[key] = spare
            spare = None
        _ready.notify_all()
    if spare is not None:
        spare.stop()


def spares() -> List["Container"]:
    """The spares waiting now."""
    with _lock:
        return [c for c in _spares.values() if c is not None]


def footprint() -> Tuple[Set[int], Set[str]]:
    """The PIDs and cgroup directories of the spares waiting now (pynsbook's by design,
    not leftovers): init and its descendants, and each prepared worker with the entrant
    that waits for it."""
    from ..linux import procfs
    pids: Set[int] = set()
    dirs: Set[str] = set()
    for c in spares():
        if c._shim is not None and c._shim.launcher is None:
            pids.add(c._shim.pid)  # slow path: the shim stays (else it left at the hand-over)
        roots = [c.init_pid] + [j.entrant_pid for j in list(c._jobs.values())]
        todo = [p for p in roots if p]
        while todo:
            pid = todo.pop()
            pids.add(pid)
            todo += procfs.children(pid)
        if c.cgroup is not None:
            dirs.update(os.path.dirname(f) for f in c.cgroup.join_files)
    return pids, dirs


def drain() -> None:
    """Stop every spare (at exit, or when turned off)."""
    with _lock:
        waiting = [c for c in _spares.values() if c is not None]
        _spares.clear()
        _ready.notify_all()
    for c in waiting:
        c.stop(timeout=0.2)
