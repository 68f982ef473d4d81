"""An unprivileged user: namespaces work through a user namespace; cgroup limits the host
will not give this user are reported by doctor and refused with a clear error, or enforced
approximately when the user asks for best effort."""
import json
import os

import pytest

from tests import helpers

pytestmark = pytest.mark.needs("rootless_user")


@pytest.mark.needs("userns")
def test_unprivileged_user_gets_a_working_container_and_is_root_inside():
    out = helpers.json_as_user("""
import json, pynsbook
r = pynsbook.run(["sh", "-c", "id -u; hostname; ls /sys/class/net; echo x > /etc/x && cat /etc/x"],
                 hostname="student")
print(json.dumps({"out": r.stdout.split(), "ns": r.namespaces, "code": r.exit_code}))
""")
    assert out["code"] == 0
    assert out["out"] == ["0", "student", "lo", "x"]
    assert set(out["ns"]) >= {"user", "pid", "mnt", "net", "uts"}


def test_doctor_says_what_the_user_cannot_limit_and_how_to_fix_it():
    out = helpers.json_as_user("import json, pynsbook; print(json.dumps(pynsbook.doctor().to_dict()))")
    from pynsbook import cgroups
    if cgroups.mode() in ("v1", "hybrid"):
        memory = next(c for c in out["controllers"] if c["name"] == "memory")
        assert not memory["ok"]
        assert "root" in memory["reason"] and memory["fix"]


def test_a_limit_the_user_cannot_have_is_refused_with_one_clear_line():
    from pynsbook import cgroups
    if cgroups.mode() not in ("v1", "hybrid"):
        pytest.skip("on this host the user may have delegated cgroups")
    r = helpers.run_as_user("import pynsbook; pynsbook.run('pass', memory='64M')", check=False)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pynsbook.errors.UnsupportedError: --mem 64 MiB: ")
    assert "--best-effort" in last


def test_best_effort_enforces_memory_approximately_and_says_what_was_dropped():
    out = helpers.json_as_user("""
import json, pynsbook
big = pynsbook.run("x = bytearray(300 << 20); import time; time.sleep(1)", memory="64M",
                   cpus=0.5, best_effort=True)
small = pynsbook.run("x = bytearray(8 << 20)", memory="64M", best_effort=True)
print(json.dumps({"oom": big.oom_killed, "enf": big.enforcement, "dropped": big.dropped,
                  "small_ok": small.ok, "peak": small.peak_memory}))
""")
    from pynsbook import cgroups
    if cgroups.mode() in ("v1", "hybrid"):
        assert out["enf"] == "fallback"
        assert "cpus" in out["dropped"]
    assert out["oom"] is True
    assert out["small_ok"] is True
    assert out["peak"] >= 8 << 20


@pytest.mark.needs("userns")
def test_best_effort_pids_limit_holds_a_fork_bomb_through_rlimit_nproc():
    from pynsbook import cgroups
    if "pids" in cgroups.backend().controllers() and cgroups.mode() == "v2":
        pytest.skip("the user has a pids controller here")
    out = helpers.json_as_user("""
import json, pynsbook
code = '''
import os, time
n = 0
for _ in range(100):
    try:
        if os.fork() == 0:
            time.sleep(2); os._exit(0)
        n += 1
    except BlockingIOError:
        break
print(n)
'''
r = pynsbook.run(code, pids=16, best_effort=True)
print(json.dumps({"forked": int(r.stdout.split()[-1]), "limits": r.limits}))
""")
    assert out["limits"]["pids"] == 16
    assert out["forked"] < 16


@pytest.mark.needs("userns", "overlay")
def test_doctor_finds_overlayfs_usable_for_the_user_through_a_user_namespace():
    out = helpers.json_as_user("import json, pynsbook; print(json.dumps(pynsbook.doctor().to_dict()))")
    assert out["overlay"]["ok"], out["overlay"]
    assert all(c["ok"] for c in out["namespaces"]), out["namespaces"]


@pytest.mark.needs("cgroup_v2", "cgroups")
def test_doctor_says_the_delegated_controllers_are_usable():
    """On cgroup v2 (as root, or as a user with a delegated subtree) doctor names where the
    containers' cgroups go and that memory, cpu and pids work there."""
    import pynsbook
    report = pynsbook.doctor()
    usable = {c.name for c in report.controllers if c.ok}
    assert {"memory", "cpu", "pids"} <= usable, report
    assert report.cgroup_base and report.cgroup_mode == "v2"


def test_without_user_namespaces_a_run_still_runs_and_doctor_says_why():
    """A Binder-like host: no user namespaces for this user. The run still happens (as a
    plain process) and doctor gives the reason and the command that would allow it."""
    import os as _os
    import pynsbook
    from pynsbook import probe
    if _os.geteuid() == 0 or probe.namespaces()["user"][0]:
        pytest.skip("this host gives this user namespaces (the no-privilege VM lane has none)")
    r = pynsbook.run(["sh", "-c", "echo hi"])
    assert r.ok and r.stdout == "hi\n" and r.namespaces == []
    assert "WITHOUT ISOLATION" in r.dropped["namespaces"]  # never silent
    import subprocess, sys
    cli = subprocess.run([sys.executable, "-m", "pynsbook", "run", "--", "true"],
                         capture_output=True, text=True, timeout=60)
    lines = [l for l in cli.stderr.splitlines() if "WITHOUT ISOLATION" in l]
    assert cli.returncode == 0 and len(lines) == 1, cli.stderr
    user = next(c for c in pynsbook.doctor().namespaces if c.name == "user")
    assert not user.ok and user.reason and user.fix


@pytest.mark.needs("delegated_scope", "cgroup_v2", "userns")
def test_in_a_delegated_scope_its_processes_move_to_a_leaf_and_containers_get_limits():
    """As `systemd-run --user --scope -p Delegate=yes jupyter lab` leaves it: this process
    sits in the scope itself, whose subtree_control is empty. pynsbook moves the scope's
    processes into a leaf of the scope, enables the delegated controllers, and limits hold."""
    import pynsbook
    from pynsbook import cgroups
    from pynsbook.cgroups.base import procs
    from pynsbook.cgroups.v2 import LEAF
    scope = cgroups.backend().delegated_scope
    r = pynsbook.run("x = bytearray(200 * 1024 * 1024)", memory="64M")
    assert r.oom_killed, (r.exit_code, r.stderr)
    with open("/proc/self/cgroup") as f:
        own = f.read().strip().split("::")[-1]
    assert own.endswith("/" + LEAF) and scope.endswith(own[:-len(LEAF) - 1])
    assert procs(scope) == []  # "no internal processes": everything moved to the leaf
    with open(f"{scope}/cgroup.subtree_control") as f:
        assert {"memory", "cpu", "pids"} <= set(f.read().split())
