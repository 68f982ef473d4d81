"""Chaos: pynsbook's own processes killed with SIGKILL in the middle of a run, each one
separately and again and again. The user gets one clear line (or the run's own result),
the next run works, and nothing of ours is left. (The client itself killed mid-run:
tests/test_exit.py.)"""
from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

import pynsbook
from pynsbook import Container, PynsbookError
from pynsbook.engine import spawn

pytestmark = [pytest.mark.usefixtures("no_leaks"),
              pytest.mark.needs("userns") if os.geteuid() else pytest.mark.needs("root")]

ROUNDS = 3


def _wait_for(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def _run_in_thread(c: Container, argv):
    """Start ``argv`` in ``c`` on a thread; -> (thread, box with its result or error, rid)."""
    box: dict = {}
    started = threading.Event()

    def on_start(_c, rid):
        box["rid"] = rid
        started.set()

    def go():
        try:
            box["result"] = c.exec(argv, on_start=on_start, timeout=20)
        except BaseException as err:  # what the user would see
            box["error"] = err
        started.set()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    started.wait(10)
    return t, box


def _victim(c: Container, box: dict, who: str) -> int:
    if who == "launcher":
        return spawn.launcher_pid()
    if who == "init":
        return c.init_pid
    job = c._jobs[box["rid"]]
    return _wait_for(lambda: job.entrant_pid)


def _outcome(box: dict) -> str:
    if "error" in box:
        err = box["error"]
        assert isinstance(err, PynsbookError), repr(err)
        return str(err)
    return box["result"].describe()


@pytest.mark.parametrize("who", ["launcher", "init", "entrant"])
def test_a_killed_process_of_ours_gives_one_clear_line_and_the_next_run_works(who):
    for _ in range(ROUNDS):
        with Container() as c:
            t, box = _run_in_thread(c, ["sh", "-c", "echo started; sleep 5; echo finished"])
            assert "rid" in box, box
            pid = _victim(c, box, who)
            assert pid and psutil.pid_exists(pid)
            os.kill(pid, signal.SIGKILL)
            t.join(30)
            assert not t.is_alive(), "the run hung after its " + who + " was killed"
            line = _outcome(box)
            print(who, "->", line)
            assert line and "\n" not in line.strip(), line
            # the run either finishes (a launcher that was not its entrant's parent: the
            # slow path) or is reported lost in one line naming why; never a traceback
            if "error" in box:
                assert "lost track of this run" in line or "ended" in line, line
        r = pynsbook.run(["echo", "next"])
        assert r.ok and r.stdout == "next\n", (who, r.stderr)
