"""Shared test helpers: leak snapshots and running code as an unprivileged user."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

import psutil

from pynsbook.linux.mountinfo import mount_keys

TEST_USER = "pynsbook-test"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def our_cgroup_dirs() -> List[str]:
    """Container cgroups of this process's session, in every hierarchy."""
    from pynsbook import cgroups
    return cgroups.backend().session_dirs()


def spare_pids() -> set:
    """The processes of the spare containers waiting in the pool (by design; not leaks)."""
    from pynsbook.engine import pool
    return pool.footprint()[0]


def snapshot() -> Dict[str, Any]:
    from pynsbook.engine import pool, spawn
    me = psutil.Process()
    # the launcher lives as long as this process, and spares wait to be adopted: by design
    spare_pids, spare_cgroups = pool.footprint()
    ours = {spawn.launcher_pid()} | spare_pids
    children = {p.pid for p in me.children(recursive=True)} - ours
    return {"children": children, "spare_cgroups": spare_cgroups,
            "mounts": mount_keys(), "cgroups": set(our_cgroup_dirs()) - spare_cgroups}


def assert_nothing_left(before: Dict[str, Any], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot()
        procs = now["children"] - before["children"]
        cgs = now["cgroups"] - before["cgroups"]
        mounts = set(now["mounts"]) - set(before["mounts"])
        if not (procs or cgs or mounts) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not procs, f"processes left behind: {[_cmd(p) for p in procs]}"
    assert not cgs, f"cgroups left behind: {sorted(cgs)}"
    assert not mounts, f"mounts left behind on the host: {sorted(mounts)}"


def _cmd(pid: int) -> str:
    try:
        return f"{pid} {' '.join(psutil.Process(pid).cmdline())}"
    except psutil.Error:
        return str(pid)


#: users this test session created (removed again at its end)
CREATED: List[str] = []
#: the test user's home for this session (its caches and image store), removed at the end
_USER_HOME: List[str] = []


def remove_created_users() -> None:
    for user in CREATED:
        subprocess.run(["userdel", user], capture_output=True)
    CREATED.clear()
    for home in _USER_HOME:
        shutil.rmtree(home, ignore_errors=True)
    _USER_HOME.clear()


def _user_home() -> str:
    """A private home for the test user, made once per session (not /tmp itself: what it
    writes there would outlive the tests)."""
    if not _USER_HOME:
        home = tempfile.mkdtemp(prefix="pynsbook-testuser-")
        if os.geteuid() == 0:
            pw = pwd.getpwnam(TEST_USER)
            os.chown(home, pw.pw_uid, pw.pw_gid)
        _USER_HOME.append(home)
    return _USER_HOME[0]


def rootless_user_available() -> Tuple[bool, str]:
    """Create the unprivileged test user if needed (only as root) and check it can run us."""
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        r = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                            "/usr/sbin/nologin", TEST_USER], capture_output=True, text=True)
        if r.returncode != 0:
            return False, f"cannot create the test user: {r.stderr.strip()}"
        CREATED.append(TEST_USER)
    r = run_as_user("import pynsbook, psutil; print('{}')", check=False)
    if r.returncode != 0:
        return False, (f"the test user cannot run {sys.executable} with pynsbook "
                       f"(is the checkout readable by others?): {r.stderr.strip()[-300:]}")
    return True, ""


def run_as_user(code: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run Python code as the unprivileged test user (or as ourselves if not root)."""
    argv = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        pw = pwd.getpwnam(TEST_USER)
        argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
                "--"] + argv
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": REPO,
           "HOME": _user_home(), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd="/")
    if check and r.returncode != 0:
        raise AssertionError(f"as {TEST_USER}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def json_as_user(code: str) -> Any:
    """Run code as the test user; it must print one JSON document last."""
    r = run_as_user(code)
    return json.loads(r.stdout.strip().splitlines()[-1])
