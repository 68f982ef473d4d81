#!/usr/bin/env python3
"""Run the test suite inside a QEMU microVM with a real cgroup-v2 kernel, as three lanes.

    python3 tests/vm/lane.py [--lane root|delegated|nouserns|all] [--timeout S] [--quick|--full]
                             [-- PYTEST ARGS...]

One test:  python3 tests/vm/lane.py --lane root -- tests/test_x.py::test_y

Each lane boots its own VM (host root shared read-only, guest set up by
tests/vm/guest_lane.sh), runs tests/vm/guest_checks.py and then pytest with
PYNSBOOK_LANE and PYNSBOOK_REQUIRE set. The first run fetches Debian's kernel and builds
the initramfs into the cache ($PYNSBOOK_VM_CACHE, else ~/.cache/pynsbook/vm); later runs
reuse them. Exits non-zero if any lane fails or a boot fails or times out.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pynsbook import vm  # noqa: E402  (stdlib-only package, importable without install)

LANES = ("root", "delegated", "nouserns")
#: Per-lane default pytest arguments (see the file); used without ``--`` arguments.
SELECTION_FILE = REPO / "tests/vm/selection"
#: Without a selection file: the tests whose outcome depends on the host (they carry a
#: needs marker). The rest already ran on the host, ~30x faster than under emulation.
DEFAULT_SELECTION = ["-m", "needs and not no_vm"]
#: --full: every test except those marked no_vm.
FULL_SELECTION = ["-m", "not no_vm"]
#: Always passed: name each test as it starts (a hang shows where); bound each test
#: (pytest-timeout) below the project's 300 s, so one hang cannot eat the lane's budget;
#: and skip loading nbval and anyio, which cost ~60 s of imports per lane under emulation.
ALWAYS = ["-v", "--color=no", "--timeout=150", "-p", "no:nbval", "-p", "no:anyio"]


def _terminate(signum, _frame):  # turn SIGTERM/SIGHUP into an exception: QEMU gets killed
    raise KeyboardInterrupt(f"signal {signum}")


def _world_readable(path: Path) -> Optional[str]:
    """The first directory on the way to ``path`` an unprivileged user cannot enter."""
    for parent in [*reversed(path.parents), path]:
        if parent.is_dir() and not (parent.stat().st_mode & 0o001):
            return str(parent)
    return None


def lane_selection(lane: str, path: Path = SELECTION_FILE) -> List[str]:
    """The pytest arguments ``path`` gives ``lane`` (a line ``LANE ARGS...``)."""
    if path.exists():
        for line in path.read_text().splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == lane:
                return words[1:]
    return list(DEFAULT_SELECTION)


def _always(selected: List[str]) -> List[str]:
    """ALWAYS, but with nbval loaded when the selection runs notebooks."""
    out = list(ALWAYS)
    if any(a.startswith("--nbval") for a in selected):
        i = out.index("no:nbval")
        del out[i - 1:i + 1]  # the "-p" before it too
    return out


def _keep_args() -> List[str]:
    """A checkout under /tmp, /run or /var/tmp (fresh in the guest) is kept visible."""
    repo = str(REPO.resolve())
    if any(repo.startswith(p) for p in ("/tmp/", "/run/", "/var/tmp/")) and " " not in repo:
        return [f"pynsbook_keep={repo}"]
    return []


def pytest_summary(lines: List[str]) -> str:
    """pytest's final ``=== 3 passed, 1 skipped in 9.1s ===`` line, without the rulers."""
    for line in reversed(lines):
        m = re.match(r"^=+ (.* in [\d.]+s.*?) =+$", line.strip())
        if m:
            return m.group(1)
    return "no pytest summary"


def run_lane(lane: str, kernel: "vm.Kernel", initramfs: Path, accel: str, python: str,
             pytest_args: List[str], timeout: float, checks_only: bool,
             junit_dir: Optional[Path]) -> dict:
    """Boot one VM for ``lane``; return a summary dict (never raises VM errors)."""
    script = " ".join(["exec /bin/sh", str(REPO / "tests/vm/guest_lane.sh"), lane, str(REPO),
                       python, *[vm.shell_quote(a) for a in pytest_args]])
    env = {"PYNSBOOK_VM_CHECKS_ONLY": "1" if checks_only else "0",
           "PYNSBOOK_VM_ROOT_CGROUP": os.environ.get("PYNSBOOK_VM_ROOT_CGROUP", "leaf")}
    t0 = time.monotonic()
    summary = {"lane": lane, "status": "failed", "seconds": 0.0, "ready": None, "detail": ""}
    for attempt in (1, 2):
        try:
            result = vm.boot(kernel, initramfs, script, accel=accel, timeout=timeout,
                             kernel_args=_keep_args(),
                             ready_timeout=min(timeout, 120.0), env=env,
                             on_line=lambda s: print(f"[{lane}] {s.rsplit(chr(13), 1)[-1]}", flush=True))
        except vm.BootTimeout as err:
            # Retry only a boot that never got ready (rare TSC-calibration hangs).
            if attempt == 1 and "get ready" in str(err):
                print(f"[{lane}] {err}; retrying once", flush=True)
                continue
            summary.update(status="timed out", detail=str(err))
            break
        except vm.BootFailed as err:
            summary.update(status="boot failed", detail=str(err))
            print(err.console_tail[-3000:], flush=True)
            break
        summary["ready"] = result.ready_seconds
        summary["status"] = "passed" if result.ok else f"failed (exit {result.exit_status})"
        checks = next((l for l in result.console if l.startswith("guest checks (")), "no guest checks")
        summary["detail"] = f"{checks.split(': ', 1)[-1]}; pytest: {pytest_summary(result.console)}"
        if junit_dir is not None:
            for name, data in result.files.items():
                if name.startswith("junit-"):
                    junit_dir.mkdir(parents=True, exist_ok=True)
                    (junit_dir / name).write_bytes(data)
        break
    summary["seconds"] = time.monotonic() - t0
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--lane", default="all", choices=(*LANES, "all"))
    ap.add_argument("--timeout", type=float, default=1200.0,
                    help="seconds each lane may take, boot included (default 1200)")
    ap.add_argument("--total-timeout", type=float, default=2700.0,
                    help="seconds all lanes together may take (default 2700); a lane that "
                    "would start with less than a minute left fails as not run")
    ap.add_argument("--quick", action="store_true",
                    help="stop each lane at its first failing test (pytest -x)")
    ap.add_argument("--full", action="store_true",
                    help="every test not marked no_vm (default: the lane's line in "
                    "tests/vm/selection)")
    ap.add_argument("--checks-only", action="store_true",
                    help="run only the guest checks, not pytest")
    ap.add_argument("--kernel", help="a kernel image or unpacked kernel package to boot "
                    "(default: Debian's current linux-image, fetched into the cache)")
    ap.add_argument("--accel", default=os.environ.get("PYNSBOOK_VM_ACCEL", "auto"),
                    choices=("auto", "kvm", "tcg"))
    ap.add_argument("--python", default=str(REPO / ".venv/bin/python"),
                    help="the Python that runs pytest in the guest (default: the repo's .venv)")
    ap.add_argument("--junit-dir", type=Path, help="copy each lane's junit XML here")
    args = ap.parse_args(argv)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    if not Path(args.python).exists():
        print(f"lane: {args.python} not found; create it with: cd {REPO} && "
              "/usr/bin/python3 -m venv .venv && .venv/bin/pip install -e '.[test]'", file=sys.stderr)
        return 2
    closed = _world_readable(REPO)
    if closed:
        print(f"lane: {closed} is not world-searchable; the unprivileged lanes cannot reach "
              f"{REPO}", file=sys.stderr)
        return 2
    if pytest_args and not any(a.startswith("-m") for a in pytest_args):
        pytest_args = ["-m", "not no_vm", *pytest_args]  # never nest a VM in the VM
    try:
        t0 = time.monotonic()
        kernel = vm.kernel_from_path(args.kernel) if args.kernel else vm.fetch_kernel()
        initramfs = vm.build_initramfs(kernel)
        accel = vm.choose_accel(kernel, initramfs) if args.accel == "auto" else args.accel
        print(f"lane: {kernel.describe()}; initramfs {initramfs}; accel {accel} "
              f"(prepared in {time.monotonic() - t0:.1f}s)", flush=True)
    except vm.VMError as err:
        print(f"lane: {err}", file=sys.stderr)
        return 2

    lanes = LANES if args.lane == "all" else (args.lane,)
    summaries = []
    deadline = time.monotonic() + args.total_timeout
    try:
        for lane in lanes:
            left = deadline - time.monotonic()
            if left < 60:
                summaries.append({"lane": lane, "status": "not run", "seconds": 0.0, "ready": None,
                                  "detail": f"--total-timeout {args.total_timeout:.0f}s used up"})
                continue
            selected = pytest_args or (FULL_SELECTION if args.full else lane_selection(lane))
            if args.quick:
                selected = ["-x", *selected]
            summaries.append(run_lane(lane, kernel, initramfs, accel, args.python,
                                      _always(selected) + selected, min(args.timeout, left),
                                      args.checks_only, args.junit_dir))
    except KeyboardInterrupt:
        print("lane: interrupted; QEMU killed", file=sys.stderr)
        return 130
    print(f"\nVM lanes ({accel}, Linux {kernel.release}):")
    for s in summaries:
        ready = f"ready {s['ready']:.1f}s, " if s["ready"] else ""
        print(f"  {s['lane']:<10} {s['status']:<12} {s['seconds']:6.1f}s ({ready}{s['detail']})")
    return 0 if all(s["status"] == "passed" for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
