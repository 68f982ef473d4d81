"""A process that used containers leaves nothing behind when it ends: not its launcher, not
a container's process, cgroup or mount — whether it exits, returns from a script, or is
killed with SIGKILL mid-run or mid-start; and a long-lived process does not accumulate
descriptors or background runs as runs fail, are interrupted or finish.

State, not time: each check waits for a state (bounded), never for a fixed delay.

The process under test runs beneath a small *watcher* that is a child subreaper: whatever of
the process outlives it (its launcher, a container's init, an entrant) is handed to the
watcher, so "nothing was left when it exited" is a fact the watcher sees, not a race.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any, Dict, List

import pytest

from tests import helpers

pytestmark = [pytest.mark.usefixtures("no_leaks")]

#: runs ARGV beneath a child subreaper; prints one JSON line: the exit status, the session
#: name of the process (its cgroups are <top>/pynsbook/<session>/...), what of it was still
#: there at the moment it exited (handed to us), and whether those ended within 10 s.
#: With KILL_AFTER (a line the process prints first), it is SIGKILLed once that line came.
WATCHER = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    import psutil
    from pynsbook.cgroups.base import session_name
    from pynsbook.linux import libc
    from pynsbook.linux.mountinfo import mount_keys
    libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)
    kill_after = os.environ.pop("KILL_AFTER", "")
    mounts = set(mount_keys())
    proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    session = session_name(proc.pid)  # the start time is known from the first instant
    first = ""
    if kill_after:
        first = proc.stdout.readline()
        assert kill_after in first, first + proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    def describe(p):
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # ended since (a zombie now): it outlived the process all the same
            return "(ended since)"
    # what of it outlived it was handed to us as it ended
    left = [(p.pid, describe(p)) for p in psutil.Process().children()]
    deadline = time.monotonic() + 10
    while psutil.Process().children() and time.monotonic() < deadline:
        try:
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        time.sleep(0.01)
    lasting = [p.pid for p in psutil.Process().children()]
    for pid in lasting:  # nothing may stay behind the test, even when it fails
        os.kill(pid, signal.SIGKILL)
    print(json.dumps({"code": proc.returncode, "session": session, "left": left,
                      "lasting": lasting, "first": first, "out": out, "err": err,
                      "mounts": sorted(set(mount_keys()) - mounts)}))
""")


def watch(argv: List[str], kill_after: str = "", cwd: str = "/") -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    if kill_after:
        env["KILL_AFTER"] = kill_after
    r = subprocess.run([sys.executable, "-c", WATCHER, *argv], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=180)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def session_cgroups(session: str) -> List[str]:
    """What exists of session ``session`` under pynsbook's directory of each hierarchy."""
    from pynsbook import cgroups
    return [d for d in (os.path.join(top, session) for top in cgroups.backend().tops())
            if os.path.exists(d)]


def wait_for(check, timeout: float = 10.0) -> Any:
    """Poll ``check`` until it returns something true, or the timeout (then its last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def pynsbook_command(*args: str) -> List[str]:
    return [sys.executable, "-m", "pynsbook", *args]


# --------------------------------------------------------------------------- exit


@pytest.mark.needs("root", "cgroups")
def test_the_command_has_removed_everything_when_it_exits():
    r = watch(pynsbook_command("run", "--mem", "64M", "--", "true"))
    assert r["code"] == 0, r["err"]
    # its launcher, and every process of the container, ended before it did
    assert r["left"] == [], f"outlived `pynsbook run`: {r['left']}"
    assert session_cgroups(r["session"]) == []
    assert r["mounts"] == []


SCRIPT = "import pynsbook\nr = pynsbook.run(['true'], memory='64M')\nassert r.exit_code == 0\n"


@pytest.mark.needs("root", "cgroups")
def test_a_script_that_ran_a_container_has_removed_everything_when_it_returns():
    r = watch([sys.executable, "-c", SCRIPT])
    assert r["code"] == 0, r["err"]
    assert r["left"] == [], f"outlived the script: {r['left']}"
    assert session_cgroups(r["session"]) == []
    assert r["mounts"] == []


# --------------------------------------------------------------------------- SIGKILL

#: a client killed mid-run: a container whose process runs (and the launcher with it)
MID_RUN = textwrap.dedent("""
    import pynsbook
    c = pynsbook.Container(memory="64M").start()
    c.exec(["sh", "-c", "echo running; sleep 300"], on_stdout=lambda t: print(t, end="", flush=True))
""")

#: a client killed mid-start: its container's cgroup exists, the container does not yet
#: (held just before its shim is asked for)
MID_START = textwrap.dedent("""
    import time, pynsbook
    from pynsbook.engine import spawn
    def held(cfg, child):
        print("cgroup made", flush=True)
        time.sleep(300)
    spawn.start_shim = held
    pynsbook.Container(memory="64M").start()
""")


@pytest.mark.needs("root", "cgroups")
@pytest.mark.parametrize("argv,line", [
    ([sys.executable, "-c", MID_RUN], "running"),
    ([sys.executable, "-c", MID_START], "cgroup made"),
    (pynsbook_command("run", "--mem", "64M", "--", "sh", "-c", "echo running; sleep 300"), "running"),
], ids=["script-mid-run", "script-mid-start", "command-mid-run"])
def test_a_client_killed_with_sigkill_leaves_nothing_behind(argv, line):
    r = watch(argv, kill_after=line)
    assert r["code"] == -signal.SIGKILL
    # what it left running (its launcher, the container) noticed and ended by itself
    assert r["lasting"] == [], f"still running 10 s after the kill: {r['left']}"
    assert wait_for(lambda: not session_cgroups(r["session"])), \
        f"cgroups left: {session_cgroups(r['session'])}"
    assert r["mounts"] == []


# --------------------------------------------------------------------------- descriptors


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Stop(Exception):
    pass


def _stop_at_start(container: Any, rid: str) -> None:
    raise KeyboardInterrupt  # Ctrl-C just as the run has started


def _fail_on_output(text: str) -> None:
    raise _Stop  # a callback that fails (a display that went away)


FAILING_EARLY = [
    ("a workdir that is a file", lambda c: c.exec(["true"], workdir="/etc/passwd")),
    ("a command that does not exist", lambda c: c.exec(["/no/such/command"])),
    ("Python with outputs, bad workdir", lambda c: c.run("x = 1", outputs=["x"], workdir="/etc/passwd")),
    ("interrupted as it starts", lambda c: c.exec(["true"], on_start=_stop_at_start)),
    ("Python interrupted as it starts", lambda c: c.run("x = 1", outputs=["x"], on_start=_stop_at_start)),
    ("a failing output callback", lambda c: c.exec(["echo", "hi"], on_stdout=_fail_on_output)),
]


@pytest.mark.needs("root")
def test_runs_that_fail_early_or_are_interrupted_leave_no_descriptor_open():
    from pynsbook import Container, PynsbookError
    with Container() as c:
        def all_kinds() -> None:
            for _what, fn in FAILING_EARLY:
                try:
                    fn(c)
                except (KeyboardInterrupt, _Stop, PynsbookError):
                    pass
        all_kinds()  # the first of each kind may open what lasts (threads, sockets)
        base = _fds()
        runs = 0
        while runs < 200:
            all_kinds()
            runs += len(FAILING_EARLY)
        # (the last run's socket is closed by its reader thread as that run ends)
        wait_for(lambda: _fds() <= base, timeout=5)
        assert _fds() <= base, f"{_fds() - base} more descriptors open after {runs} failing runs"
        assert not [j for j in c._jobs.values() if not j.worker], "runs still registered"


# --------------------------------------------------------------------------- --bg registry


@pytest.mark.needs("root")
def test_finished_background_runs_are_not_kept_forever():
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell
    from pynsbook.notebook import cellrun
    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "pynsbook")
        before = len(cellrun.BACKGROUND)
        for i in range(30):
            shell.run_cell_magic("container", "--bg", "pass")
            assert cellrun.BACKGROUND[-1].wait(30) is not None
        shell.run_cell_magic("container", "--bg --name kept", "pass")
        named = cellrun.BACKGROUND[-1]
        assert named.wait(30) is not None
        shell.run_cell_magic("container", "--bg", "pass")
        cellrun.BACKGROUND[-1].wait(30)
        # running runs, and the latest run of a named container; not 30 finished ones
        assert len(cellrun.BACKGROUND) <= before + 2, cellrun.BACKGROUND
        assert named in cellrun.BACKGROUND
    finally:
        for name in ("kept",):
            try:
                shell.run_line_magic("container", f"stop {name}")
            except Exception:
                pass
        cellrun.wait_all(10)
        shell.run_line_magic("unload_ext", "pynsbook")
        InteractiveShell.clear_instance()
