"""An idle container holds only its small init (in the launcher's care); every run enters
it from outside.

The compiled init (engine/tinyinit.c) and its Python equivalent, and the fast path and the
slow one (no warm launcher: the shim stays and waits), must behave the same.
"""
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

import pynsbook
from pynsbook import Container, ContainerStateError
from tests import helpers

pytestmark = [pytest.mark.usefixtures("no_leaks")]
CONTAINER = pytest.mark.needs("userns") if os.geteuid() else pytest.mark.needs("root")


def _ppid(pid: int) -> int:
    return psutil.Process(pid).ppid()


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


@CONTAINER
@pytest.mark.needs("cc")
def test_an_idle_container_is_one_small_compiled_process_in_the_launchers_care():
    from pynsbook.engine import pool, spawn
    from pynsbook.linux import procfs
    with pool.bypassed():  # a new container, not an adopted spare (that has a worker ready)
        c = Container().start()
    try:
        assert _comm(c.init_pid) == "pynsbook-init"  # init says ready from the compiled program
        assert "python" not in _maps(c.init_pid).lower()  # no interpreter mapped at all
        # the shim handed init over to the launcher (a child subreaper) and left: of the
        # container's session, only init remains
        assert _ppid(c.init_pid) == spawn.launcher_pid()
        members = [p.pid for p in psutil.Process(spawn.launcher_pid()).children(recursive=True)
                   if procfs.session(p.pid) == c._shim.pid]
        assert members == [c.init_pid]
        assert c.run("print('still works')").stdout == "still works\n"
    finally:
        c.stop()


@CONTAINER
def test_a_run_enters_the_containers_namespaces_and_cgroup_and_what_waits_for_it_is_not_charged():
    kinds = [k for k in ("ipc", "mnt", "net", "pid", "user", "uts") if os.path.exists(f"/proc/self/ns/{k}")]
    with Container(memory="64M", best_effort=True) as c:  # a cgroup where the host has one
        code = ("import os, time\nfor k in %r:\n    print(k, os.stat(f'/proc/self/ns/{k}').st_ino)\n"
                "time.sleep(1)" % (kinds,))
        members = []

        def on_output(_text: str) -> None:  # the run is alive (it sleeps after printing)
            if not members and c.cgroup is not None:
                job = next(j for j in list(c._jobs.values()) if not j.worker)
                assert job.started.wait(10)  # its entrant's report may come after the output
                members.append((job, set(c.cgroup.pids())))

        r = c.run(code, on_stdout=on_output)
        if c.cgroup is not None:
            job, inside = members[0]
            assert job.host_pid in inside and c.init_pid in inside
            assert job.entrant_pid not in inside  # pynsbook's waiting is not charged to the cell
        init_ns = {k: os.stat(f"/proc/{c.init_pid}/ns/{k}").st_ino for k in kinds}
        run_ns = {line.split()[0]: int(line.split()[1]) for line in r.stdout.splitlines()}
        assert run_ns == init_ns


@CONTAINER
def test_a_run_in_a_container_whose_init_was_killed_is_refused_with_a_clear_error():
    c = Container().start()
    try:
        os.kill(c.init_pid, signal.SIGKILL)  # by PID: the container's own init
        c._shim.wait(5)
        with pytest.raises(ContainerStateError, match="not running|has ended"):
            c.run("print('never')")
    finally:
        c.stop()


@CONTAINER
@pytest.mark.parametrize("env", [{"PYNSBOOK_TINY_INIT": "0"}, {"PYNSBOOK_LAUNCHER": "0"},
                                 {"PYNSBOOK_TINY_INIT": "0", "PYNSBOOK_LAUNCHER": "0"}],
                         ids=["python-init", "no-launcher", "python-init-and-shim"])
def test_the_fallbacks_do_what_the_fast_path_does(env):
    """Without a compiler (Python init), without the warm launcher (the shim stays and
    waits, in the compiled program; runs enter through new Python processes), and without
    both (the Python shim waits and removes the cgroups): the same runs, signals and
    clean-up."""
    script = textwrap.dedent("""
        import os, signal, threading, time, pynsbook
        from pynsbook import Container
        from tests import helpers
        before = helpers.snapshot()
        with Container() as c:
            assert c.run("print(6 * 7)").stdout == "42\\n"
            code = ("import signal, sys, time\\n"
                    "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7))\\n"
                    # short sleeps: a signal that lands just before a long sleep's syscall
                    # would wait for its end (Python's sleep), which emulation makes likely
                    "print('armed', flush=True)\\nfor _ in range(200): time.sleep(0.1)")
            got, armed = [], threading.Event()
            t = threading.Thread(target=lambda: got.append(c.run(code, on_stdout=lambda s: armed.set())))
            t.start()
            assert armed.wait(60)  # the slow path starts a new Python: slow under emulation
            os.kill(c.init_pid, signal.SIGUSR1)  # forwarded by whichever init runs
            t.join(20)
            assert got and got[0].exit_code == 7, got
        r = pynsbook.run("x = bytearray(10)")
        assert r.exit_code == 0
        helpers.assert_nothing_left(before)
        print("ok")
    """)
    env = dict(os.environ, PYNSBOOK_POOL="0", **env)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, env=env, cwd=helpers.REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_doctor_says_how_to_get_the_small_init_when_there_is_no_compiler(tmp_path):
    script = "import pynsbook; print(pynsbook.doctor())"
    env = dict(os.environ, CC="", PATH=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=helpers.REPO)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, env=env, cwd="/")
    assert r.returncode == 0, r.stderr
    text = r.stdout[r.stdout.index("idle containers:"):]
    assert "NO  init" in text and "no C compiler" in text
    assert "fix: sudo apt-get install gcc libc6-dev musl-tools" in text


@CONTAINER
@pytest.mark.no_vm  # 200 starts take minutes under emulation
def test_two_hundred_containers_in_a_row_all_run():
    """Back to back, spares handed over and adopted while others end: every one runs (a
    parent-death signal set at the hand-over once killed about one init in 300)."""
    codes = [pynsbook.run("pass", memory="64M", best_effort=True).exit_code for _ in range(200)]
    assert codes == [0] * 200
