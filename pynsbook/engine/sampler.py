"""Usage by sampling the container's processes, for hosts without a memory cgroup.

Approximate by nature: a spike shorter than the sampling period goes unseen, and a memory
"limit" is enforced by killing the run once a sample exceeds it.
"""
from __future__ import annotations

import time
from typing import List, Optional

import psutil

from ..results import Stats

PERIOD = 0.05


class Sampler:
    def __init__(self, init_pid: int, memory_limit: Optional[int] = None) -> None:
        self.init_pid = init_pid
        self.memory_limit = memory_limit
        self.peak = 0
        self.killed = False
        self._last = 0.0

    def _procs(self) -> List[psutil.Process]:
        try:
            init = psutil.Process(self.init_pid)
            return [init] + init.children(recursive=True)
        except psutil.Error:
            return []

    def _rss(self, procs: List[psutil.Process]) -> int:
        total = 0
        for p in procs[1:] or procs:  # the init itself is pynsbook's, not the user's
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def sample(self) -> bool:
        """Take a sample if one is due; True when the memory limit was just exceeded."""
        now = time.monotonic()
        if now - self._last < PERIOD or not self.init_pid:
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
        self.init_pid = 0
