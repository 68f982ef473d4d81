"""Usage by sampling the container's processes, for hosts without a memory cgroup.

Approximate by nature: a spike shorter than the sampling period goes unseen, and a memory
"limit" is enforced by killing the run once a sample exceeds it.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence

import psutil

from ..results import Stats

PERIOD = 0.05


class Sampler:
    """Samples the processes below ``roots()``: the processes that wait for a container's
    runs (entrants, pynsbook's own and not counted), whose descendants are the runs."""

    def __init__(self, roots: Callable[[], Sequence[int]], memory_limit: Optional[int] = None) -> None:
        self.roots: Optional[Callable[[], Sequence[int]]] = roots
        self.memory_limit = memory_limit
        self.peak = 0
        self.killed = False
        self._last = 0.0

    def _procs(self) -> List[psutil.Process]:
        out: List[psutil.Process] = []
        for pid in (self.roots() if self.roots else ()):
            if not pid:
                continue
            try:
                out += psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                pass
        return out

    @staticmethod
    def _rss(procs: List[psutil.Process]) -> int:
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def sample(self) -> bool:
        """Take a sample if one is due; True when the memory limit was just exceeded."""
        now = time.monotonic()
        if now - self._last < PERIOD or not self.roots:
            return False
        self._last = now
        rss = self._rss(self._procs())
        self.peak = max(self.peak, rss)
        if self.memory_limit is not None and rss > self.memory_limit and not self.killed:
            self.killed = True
            return True
        return False

    def snapshot(self) -> Stats:
        procs = self._procs()
        cpu = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                cpu += t.user + t.system
            except psutil.Error:
                pass
        rss = self._rss(procs)
        self.peak = max(self.peak, rss)
        return Stats(backend="fallback", memory_current=rss, memory_peak=self.peak,
                     memory_limit=self.memory_limit, cpu_time=cpu, pids_current=len(procs),
                     approximate=True)

    def stop(self) -> None:
        self.roots = None
