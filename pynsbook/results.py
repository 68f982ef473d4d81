"""Typed results: what a run, a stats call and doctor return."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from .spec import format_size


@dataclass
class Stats:
    """A container's usage and limits, read from its cgroup (``Container.stats()``).

    Sizes are bytes, times seconds; ``None`` means unknown or unlimited.
    ``approximate`` is true when there is no cgroup and the numbers come from sampling.
    """

    backend: str
    memory_current: Optional[int] = None
    memory_peak: Optional[int] = None
    memory_limit: Optional[int] = None
    swap_current: Optional[int] = None
    swap_limit: Optional[int] = None
    cpu_time: Optional[float] = None
    cpu_quota: Optional[float] = None
    cpuset: Optional[str] = None
    throttled_count: Optional[int] = None
    throttled_time: Optional[float] = None
    pids_current: Optional[int] = None
    pids_limit: Optional[int] = None
    pids_limit_hits: Optional[int] = None
    oom_kills: Optional[int] = None
    frozen: Optional[bool] = None
    approximate: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class RunResult:
    """What one run of code or a command in a container produced (``pynsbook.run``)."""

    exit_code: int
    signal: Optional[int] = None
    oom_killed: bool = False
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    wall_time: float = 0.0
    cpu_time: Optional[float] = None
    peak_memory: Optional[int] = None
    #: the limits in force, by API keyword (sizes in bytes)
    limits: Dict[str, Any] = field(default_factory=dict)
    #: limits asked for but not enforced (only with best_effort), keyword -> reason
    dropped: Dict[str, str] = field(default_factory=dict)
    #: namespaces the container had
    namespaces: List[str] = field(default_factory=list)
    #: "cgroup-v1", "cgroup-v2" or "fallback" (rlimits and sampling: approximate numbers)
    enforcement: str = "fallback"
    pids_limit_hits: int = 0
    container: Optional[str] = None
    #: variables brought back from Python code (``outputs=``), and why others could not be
    outputs: Dict[str, Any] = field(default_factory=dict)
    output_errors: Dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.oom_killed and not self.timed_out

    def describe(self) -> str:
        """One line saying how the run ended, the way a student should read it."""
        if self.oom_killed:
            limit = format_size(self.limits.get("memory"))
            peak = format_size(self.peak_memory) if self.peak_memory is not None else "unknown"
            return f"killed: out of memory (limit {limit}, peak {peak})"
        if self.timed_out:
            return f"killed: timed out after {self.limits.get('timeout', self.wall_time):g} s"
        if self.signal:
            import signal as _signal
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        return f"exited with status {self.exit_code}"

    def summary(self) -> str:
        """The one-line ``--stats`` summary: wall, CPU, peak memory against its limit."""
        parts = [f"wall {self.wall_time:.3f} s"]
        if self.cpu_time is not None:
            parts.append(f"cpu {self.cpu_time:.3f} s")
        if self.peak_memory is not None:
            mem = f"peak {format_size(self.peak_memory)}"
            if self.limits.get("memory"):
                mem += f" of {format_size(self.limits['memory'])}"
            parts.append(mem)
        if self.pids_limit_hits:
            parts.append(f"{self.pids_limit_hits} forks refused by the pids limit")
        parts.append("OOM-killed" if self.oom_killed else self.describe())
        if self.enforcement == "fallback":
            parts.append("approximate (no cgroup)")
        return ", ".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
