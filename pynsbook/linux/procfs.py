"""A process's facts from /proc, read directly: light enough for forked processes, where
psutil is not wanted (a zombie's stat still answers, which the launcher relies on)."""
from __future__ import annotations

from typing import List, Optional


def stat_fields(pid: int) -> Optional[List[str]]:
    """/proc/PID/stat from field 3 (the state) on: the command name, which may hold spaces
    and parentheses, is cut off at its last ')'. None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def ppid(pid: int) -> Optional[int]:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def session(pid: int) -> Optional[int]:
    fields = stat_fields(pid)
    return int(fields[3]) if fields else None


def start_time(pid: int) -> Optional[int]:
    """Field 22: the start time in clock ticks, which tells a reused PID apart."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def children(pid: int) -> List[int]:
    """The PIDs of a process's children (those of its main thread)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []
