"""User namespaces and time namespaces: the /proc files that configure them."""
from __future__ import annotations

import time


def write_id_maps(pid: str, uid_map: str, gid_map: str, deny_setgroups: bool) -> None:
    """Write /proc/PID/{setgroups,uid_map,gid_map}.

    An unprivileged process must write ``deny`` to setgroups before gid_map (user_namespaces(7)).
    """
    if deny_setgroups:
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(uid_map)
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(gid_map)


def set_uptime(seconds: float) -> None:
    """Offset the monotonic and boot-time clocks of the time namespace this process just
    unshared, so they read ``seconds`` in its children. Must run before any child exists.
    """
    lines = []
    for name, clock in (("monotonic", time.CLOCK_MONOTONIC), ("boottime", time.CLOCK_BOOTTIME)):
        offset_ns = int((seconds - time.clock_gettime(clock)) * 1e9)
        sec, nsec = divmod(offset_ns, 1_000_000_000)
        lines.append(f"{name} {sec} {nsec}\n")
    with open("/proc/self/timens_offsets", "w") as f:
        f.write("".join(lines))
