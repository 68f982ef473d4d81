"""Smoke checks the VM lane runs in the guest before pytest (stdlib only, no pynsbook).

They prove each lane is the host it claims to be, independently of the project's code:
cgroup v2 with controllers enabled; a 64M ``memory.max`` OOM-kills a 200 MB allocation
and ``memory.events`` counts it; ``cpu.max`` 50000/100000 holds a busy loop near half a
CPU; ``pids.max`` holds; limits change live; ``memory.peak`` is readable. In the
delegated lane the same runs as the unprivileged user inside its delegated subtree; in
the nouserns lane, user namespaces and cgroup writes must both be refused.

    python tests/vm/guest_checks.py --lane root|delegated|nouserns
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

CG = Path("/sys/fs/cgroup")
RESULTS: List[Tuple[str, bool, str]] = []


def check(name: str, fn: Callable[[], str]) -> None:
    """Run one check; record PASS with its detail, or FAIL with the reason."""
    t0 = time.monotonic()
    try:
        detail = fn()
        ok = True
    except Exception as err:  # a check failing must not stop the others
        detail, ok = f"{type(err).__name__}: {err}", False
    took = time.monotonic() - t0
    RESULTS.append((name, ok, detail))
    print(f"guest check: {'PASS' if ok else 'FAIL'} {name} ({detail}) [{took:.1f}s]", flush=True)


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise AssertionError(message)


def read(cg: Path, name: str) -> str:
    return (cg / name).read_text().strip()


def keyed(cg: Path, name: str) -> dict:
    return {k: int(v) for k, v in (ln.split() for ln in read(cg, name).splitlines())}


def write(cg: Path, name: str, value: str) -> None:
    (cg / name).write_text(value)


def spawn(cg: Path, argv: List[str], **kw) -> "subprocess.Popen[str]":
    """Start ``argv`` already inside cgroup ``cg`` (it moves itself before exec)."""
    procs = str(cg / "cgroup.procs")

    def enter() -> None:
        with open(procs, "w") as fh:
            fh.write("0")

    return subprocess.Popen(argv, preexec_fn=enter, text=True, **kw)


def new_cgroup(base: Path, name: str) -> Path:
    cg = base / name
    cg.mkdir()
    return cg


def remove(cg: Path) -> None:
    if not cg.exists():
        return
    for child in [p for p in cg.iterdir() if p.is_dir()]:
        remove(child)
    try:
        write(cg, "cgroup.kill", "1")
    except OSError:
        pass
    for _ in range(50):
        try:
            cg.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def cpu_share(cg: Path, seconds: float) -> float:
    """CPUs the cgroup used over ``seconds`` of wall time (from ``cpu.stat``)."""
    u0, t0 = keyed(cg, "cpu.stat")["usage_usec"], time.monotonic()
    time.sleep(seconds)
    u1, t1 = keyed(cg, "cpu.stat")["usage_usec"], time.monotonic()
    return (u1 - u0) / 1e6 / (t1 - t0)


# --------------------------------------------------------------------------- checks


def check_cgroup2() -> str:
    mounts = [ln.split() for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
    fstype = next((m[m.index("-") + 1] for m in mounts if m[4] == str(CG)), None)
    expect(fstype == "cgroup2", f"{CG} is {fstype}, not cgroup2")
    enabled = read(CG, "cgroup.subtree_control").split()
    for c in ("cpu", "memory", "pids"):
        expect(c in enabled, f"{c} not enabled in the root's cgroup.subtree_control ({enabled})")
    return "enabled at the root: " + " ".join(enabled)


def check_oom(base: Path) -> str:
    cg = new_cgroup(base, "oom")
    try:
        write(cg, "memory.max", str(64 << 20))
        if (cg / "memory.swap.max").exists():
            write(cg, "memory.swap.max", "0")
        code = "chunks = []\nfor _ in range(25): chunks.append(b'x' * (8 << 20))\nprint('survived')"
        p = spawn(cg, [sys.executable, "-c", code], stdout=subprocess.PIPE)
        out, _ = p.communicate(timeout=120)
        events = keyed(cg, "memory.events")
        peak = int(read(cg, "memory.peak"))
        expect(p.returncode == -signal.SIGKILL, f"exit {p.returncode}, output {out!r}")
        expect(events.get("oom_kill", 0) >= 1, f"memory.events has no oom_kill: {events}")
        expect(peak >= 48 << 20, f"memory.peak only {peak}")
        return f"SIGKILL, oom_kill {events['oom_kill']}, memory.peak {peak >> 20} MiB"
    finally:
        remove(cg)


def check_cpu(base: Path) -> str:
    cg = new_cgroup(base, "cpu")
    try:
        write(cg, "cpu.max", "50000 100000")
        p = spawn(cg, ["/bin/sh", "-c", "while :; do :; done"])
        try:
            time.sleep(0.5)
            half = cpu_share(cg, 3.0)
            write(cg, "cpu.max", "25000 100000")  # live update
            time.sleep(0.3)
            quarter = cpu_share(cg, 3.0)
            write(cg, "cpu.max", "max 100000")
            time.sleep(0.3)
            unlimited = cpu_share(cg, 2.0)
        finally:
            p.kill()
            p.wait()
        throttled = keyed(cg, "cpu.stat").get("nr_throttled", 0)
        detail = f"0.5 -> {half:.2f}, 0.25 -> {quarter:.2f}, max -> {unlimited:.2f} CPU, nr_throttled {throttled}"
        expect(0.30 <= half <= 0.60, "cpu.max 50000 100000 not near half a CPU: " + detail)
        expect(0.12 <= quarter <= 0.35, "live cpu.max update to 0.25 not honoured: " + detail)
        expect(unlimited > half * 1.3, "live cpu.max update to max not honoured: " + detail)
        expect(throttled > 0, "cpu.stat shows no throttling: " + detail)
        return detail
    finally:
        remove(cg)


def check_pids(base: Path) -> str:
    cg = new_cgroup(base, "pids")
    try:
        write(cg, "pids.max", "8")
        code = (
            "import os, time\nok = failed = 0\n"
            "for _ in range(20):\n"
            "    try:\n        pid = os.fork()\n    except OSError:\n        failed += 1\n        continue\n"
            "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
            "    ok += 1\n"
            "print(ok, failed, flush=True)\ntime.sleep(30)\n"
        )
        p = spawn(cg, [sys.executable, "-c", code], stdout=subprocess.PIPE)
        line = p.stdout.readline().split()  # type: ignore[union-attr]
        current = int(read(cg, "pids.current"))
        events = keyed(cg, "pids.events")
        write(cg, "pids.max", "14")  # live update: room for a new process and its four children
        code2 = "import os\nfor _ in range(4): os.fork() == 0 and os._exit(0)\nprint('forked')"
        extra = spawn(cg, [sys.executable, "-c", code2], stdout=subprocess.PIPE)
        out2, _ = extra.communicate(timeout=60)
        write(cg, "cgroup.kill", "1")
        p.wait(timeout=30)
        ok, failed = int(line[0]), int(line[1])
        detail = f"{ok} forks allowed, {failed} refused, pids.current {current}, events max {events.get('max')}"
        expect(ok == 7 and failed == 13, "pids.max 8 did not hold: " + detail)
        expect(current == 8 and events.get("max", 0) >= 1, "pids accounting wrong: " + detail)
        expect("forked" in out2, "raising pids.max live did not allow new forks")
        return detail + ", raised live to 14"
    finally:
        remove(cg)


def check_memory_live(base: Path) -> str:
    cg = new_cgroup(base, "memlive")
    try:
        write(cg, "memory.max", str(128 << 20))
        if (cg / "memory.swap.max").exists():
            write(cg, "memory.swap.max", "0")
        code = "import time\nb = b'x' * (40 << 20)\nprint('ready', flush=True)\ntime.sleep(60)"
        p = spawn(cg, [sys.executable, "-c", code], stdout=subprocess.PIPE)
        expect(p.stdout.readline().strip() == "ready", "allocating child did not start")  # type: ignore[union-attr]
        current = int(read(cg, "memory.current"))
        try:
            write(cg, "memory.max", str(16 << 20))  # below what the child holds
        except OSError:
            pass  # EBUSY when the kernel gave up reclaiming; the OOM kill still happened
        code_ = p.wait(timeout=60)
        events = keyed(cg, "memory.events")
        expect(code_ == -signal.SIGKILL and events.get("oom_kill", 0) >= 1,
               f"lowering memory.max live did not OOM-kill: exit {code_}, {events}")
        return f"usage {current >> 20} MiB, memory.max 128M -> 16M killed it (oom_kill {events['oom_kill']})"
    finally:
        remove(cg)


def check_userns(expected: bool) -> str:
    p = subprocess.run(["unshare", "-Ur", "id", "-u"], capture_output=True, text=True, timeout=60)
    if expected:
        expect(p.returncode == 0 and p.stdout.strip() == "0", f"unshare -Ur failed: {p.stderr.strip()}")
        return "unshare -Ur: uid 0 inside"
    expect(p.returncode != 0, "unshare -U worked although user namespaces should be off")
    return f"unshare -U refused: {p.stderr.strip()}"


def check_no_cgroup_write() -> str:
    own = CG / Path(Path("/proc/self/cgroup").read_text().strip().split(":", 2)[2]).relative_to("/")
    for where in (CG, own):
        try:
            (where / "pynsbook-probe").mkdir()
        except PermissionError:
            continue
        (where / "pynsbook-probe").rmdir()
        raise AssertionError(f"could create a cgroup under {where}")
    return f"no cgroup writable (own cgroup {own})"


def check_unprivileged() -> str:
    expect(os.geteuid() != 0, "running as root")
    return f"uid {os.geteuid()}"


# --------------------------------------------------------------------------- lanes


def limit_checks(base: Path) -> None:
    base.mkdir(exist_ok=True)
    try:
        write(base, "cgroup.subtree_control", "+cpu +memory +pids")
        check("64M memory.max OOM-kills a 200 MB allocation", lambda: check_oom(base))
        check("cpu.max holds a busy loop near 0.5 CPU, updates live", lambda: check_cpu(base))
        check("pids.max holds, updates live", lambda: check_pids(base))
        check("memory.max lowered live OOM-kills", lambda: check_memory_live(base))
    finally:
        remove(base)


def check_in_scope() -> str:
    """The lane starts where systemd-run --user --scope -p Delegate=yes puts Jupyter: in the
    scope itself, with nothing enabled for children (pynsbook's tests then prove it copes)."""
    own = Path("/proc/self/cgroup").read_text().strip().split("::")[-1]
    expect(own == "/lane", f"in {own}, not in the scope /lane")
    enabled = read(CG / "lane", "cgroup.subtree_control")
    expect(enabled == "", f"the scope enables {enabled!r} for its children already")
    return f"in {own}, subtree_control empty"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lane", required=True, choices=("root", "delegated", "nouserns"))
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    check("cgroup2 at /sys/fs/cgroup, controllers on", check_cgroup2)
    if args.lane == "root":
        limit_checks(CG / "pynsbook-vm-checks")
        check("user namespaces work", lambda: check_userns(True))
    elif args.lane == "delegated":
        check("unprivileged", check_unprivileged)
        check("in the delegated scope itself, its subtree_control empty (as systemd leaves it)",
              check_in_scope)
        check("user namespaces work", lambda: check_userns(True))
    else:
        check("unprivileged", check_unprivileged)
        check("user namespaces refused", lambda: check_userns(False))
        check("no writable cgroup", check_no_cgroup_write)
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"guest checks ({args.lane}): {len(RESULTS) - len(failed)} passed, {len(failed)} failed"
          f" in {time.monotonic() - t0:.1f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
