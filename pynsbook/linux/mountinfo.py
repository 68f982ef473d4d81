"""Parse /proc/self/mountinfo and /proc/self/cgroup (parsers take text, so tests can feed them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    root: str          # the path inside the filesystem that is mounted here
    mountpoint: str
    options: Tuple[str, ...]
    fstype: str
    source: str
    super_options: Tuple[str, ...]


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) + 1 and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> List[Mount]:
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        mounts.append(Mount(int(f[0]), int(f[1]), _unescape(f[3]), _unescape(f[4]),
                            tuple(f[5].split(",")), r[0], _unescape(r[1]) if len(r) > 1 else "",
                            tuple(r[2].split(",")) if len(r) > 2 else ()))
    return mounts


def read_mountinfo(pid: str = "self") -> List[Mount]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return parse_mountinfo(f.read())


def parse_proc_cgroup(text: str) -> Dict[str, str]:
    """/proc/PID/cgroup -> {controller: path}; the v2 entry is under the key ''."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            out[""] = path
        for c in controllers.split(","):
            if c:
                out[c] = path
    return out


def read_proc_cgroup(pid: str = "self") -> Dict[str, str]:
    with open(f"/proc/{pid}/cgroup") as f:
        return parse_proc_cgroup(f.read())


def cgroup_dir(mount: Mount, cgroup_path: str) -> Optional[str]:
    """Where the cgroup ``cgroup_path`` (as /proc/self/cgroup says) is in this mount."""
    root = mount.root.rstrip("/")
    if root and not (cgroup_path == root or cgroup_path.startswith(root + "/")):
        return None
    rel = cgroup_path[len(root):].lstrip("/")
    return mount.mountpoint.rstrip("/") + ("/" + rel if rel else "")


def mount_keys() -> List[str]:
    """This process's mounts as "ROOT MOUNTPOINT" lines, sorted: two snapshots compare to
    show what a container left mounted on the host."""
    return sorted(f"{m.root} {m.mountpoint}" for m in read_mountinfo())
