"""What a container sees against what the host sees, one namespace at a time."""
import os
import socket
import time

import pytest

import pynsbook
from pynsbook import Container

pytestmark = [pytest.mark.usefixtures("no_leaks")]
CONTAINER = pytest.mark.needs("userns") if os.geteuid() else pytest.mark.needs("root")


@CONTAINER
def test_pid_namespace_gives_small_pids_and_proc_shows_only_the_container():
    r = pynsbook.run("import os\nprint(os.getpid())\n"
                     "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    pid_line, procs_line = r.stdout.splitlines()
    assert int(pid_line) <= 3
    assert eval(procs_line) == [1, int(pid_line)]  # init and us, nothing of the host


@CONTAINER
def test_init_is_pid_1_and_reaps_orphans():
    # a grandchild orphaned by its parent is reparented to init, which must reap it
    script = ("sh -c 'sleep 0.2 &' ; sleep 0.5; "
              "grep -l zombie /proc/[0-9]*/status 2>/dev/null | wc -l; cat /proc/1/cmdline | tr '\\0' ' '")
    r = pynsbook.run(["sh", "-c", script])
    lines = r.stdout.split("\n")
    assert lines[0].strip() == "0", r.stdout  # no zombies
    assert "pynsbook" in lines[1]


@CONTAINER
def test_hostname_is_the_containers_own():
    r = pynsbook.run(["hostname"], hostname="lab-box")
    assert r.stdout.strip() == "lab-box"
    assert socket.gethostname() != "lab-box"


@CONTAINER
def test_network_namespace_has_only_loopback_and_it_is_up():
    r = pynsbook.run(["sh", "-c", "ls /sys/class/net; cat /sys/class/net/lo/operstate"])
    names = r.stdout.split()
    assert names[:-1] == ["lo"], r.stdout
    code = ("import socket\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "c = socket.create_connection(s.getsockname()); print('loopback ok')")
    assert pynsbook.run(code).stdout.strip() == "loopback ok"


@CONTAINER
def test_net_host_shares_the_host_network():
    host = sorted(os.listdir("/sys/class/net"))
    r = pynsbook.run(["ls", "/sys/class/net"], net="host")
    assert sorted(r.stdout.split()) == host
    assert "net" not in r.namespaces


# root without a user namespace takes the one-overlay path; with one, an overlay per directory
SHAPES = [pytest.param({}, id="all-namespaces"),
          pytest.param({"namespaces": "pid,mnt,uts,ipc,net"}, id="no-userns",
                       marks=pytest.mark.needs("root"))]


@CONTAINER
@pytest.mark.parametrize("shape", SHAPES)
def test_writes_to_etc_and_usr_never_reach_the_host(tmp_path, shape):
    marker = f"pynsbook-test-{os.getpid()}"
    script = (f"echo hi > /etc/{marker} && echo hi > /usr/{marker} && "
              f"cat /etc/{marker} /usr/{marker}; rm -f /etc/hostname; echo done")
    r = pynsbook.run(["sh", "-c", script], **shape)
    assert r.stdout.split() == ["hi", "hi", "done"], r.stderr
    assert not os.path.exists(f"/etc/{marker}") and not os.path.exists(f"/usr/{marker}")
    assert os.path.exists("/etc/hostname")


@CONTAINER
def test_tmp_is_fresh_and_writable():
    marker = f"/tmp/pynsbook-host-only-{os.getpid()}"
    open(marker, "w").close()
    try:
        r = pynsbook.run(["sh", "-c", f"test -e {marker} && echo seen; echo x > /tmp/f && cat /tmp/f"])
        assert r.stdout.split() == ["x"]
    finally:
        os.unlink(marker)


@CONTAINER
def test_cwd_of_the_notebook_is_visible_inside(tmp_path, monkeypatch):
    (tmp_path / "data.txt").write_text("42")
    monkeypatch.chdir(tmp_path)
    # /tmp is fresh inside, so use a directory outside /tmp
    r = pynsbook.run(["pwd"], workdir="/etc")
    assert r.stdout.strip() == "/etc"


@CONTAINER
@pytest.mark.needs("overlay")
def test_rootfs_runs_on_another_root_and_leaves_it_unmodified(tmp_path):
    import shutil
    busybox = shutil.which("busybox")
    if not busybox:
        pytest.skip("busybox is not installed")
    root = tmp_path / "rootfs"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    for tool in ("sh", "ls", "cat", "echo", "rm"):
        os.symlink("busybox", root / "bin" / tool)
    (root / "etc" / "motd").write_text("the base layer\n")
    before = sorted(str(p) for p in root.rglob("*"))
    r = pynsbook.run(["/bin/sh", "-c", "cat /etc/motd; echo new > /etc/new; rm /etc/motd; ls /etc; ls /"],
                     rootfs=str(root))
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[0] == "the base layer"
    assert "new" in r.stdout.splitlines()[1]
    assert sorted(str(p) for p in root.rglob("*")) == before
    assert (root / "etc" / "motd").read_text() == "the base layer\n"
    # the python cell runs in the container's root even without python there
    r = pynsbook.run("import os; print(sorted(os.listdir('/')))", rootfs=str(root))
    assert "bin" in r.stdout and "usr" not in r.stdout


@CONTAINER
def test_user_namespace_makes_the_user_root_inside():
    r = pynsbook.run(["sh", "-c", "id -u; cat /proc/self/uid_map"])
    lines = r.stdout.split("\n")
    assert lines[0] == "0"
    assert lines[1].split()[:2] == ["0", str(os.geteuid())]


@CONTAINER
def test_cgroup_namespace_shows_the_containers_cgroup_as_root():
    r = pynsbook.run(["cat", "/proc/self/cgroup"])
    for line in r.stdout.splitlines():
        assert line.rsplit(":", 1)[1] == "/", r.stdout


@CONTAINER
@pytest.mark.needs("timens")
def test_uptime_sets_the_time_namespace_offset():
    r = pynsbook.run(["cat", "/proc/uptime"], uptime=5)
    inside = float(r.stdout.split()[0])
    assert 5 <= inside < 15
    with open("/proc/uptime") as f:
        host = float(f.read().split()[0])
    assert abs(host - inside) > 20 or host < 20  # only the container's clock moved
    r = pynsbook.run("import time; print(time.clock_gettime(time.CLOCK_BOOTTIME))", uptime=1000)
    assert 1000 <= float(r.stdout) < 1010


@CONTAINER
def test_ipc_namespace_hides_host_message_queues():
    r = pynsbook.run(["sh", "-c", "ls /dev/mqueue | wc -l; cat /proc/sysvipc/shm | wc -l"])
    assert r.stdout.split() == ["0", "1"]


@CONTAINER
def test_no_ns_leaves_namespaces_out():
    r = pynsbook.run(["hostname"], namespaces="pid,mnt" + (",user" if os.geteuid() else ""))
    assert r.stdout.strip() == socket.gethostname()
    assert "uts" not in r.namespaces


def test_unknown_command_says_so():
    r = pynsbook.run(["no-such-command-xyz"])
    assert r.exit_code == 127
    assert "no-such-command-xyz: command not found" in r.stderr


@CONTAINER
def test_a_working_directory_under_tmp_stays_visible_but_writes_do_not_reach_it(tmp_path, monkeypatch):
    """/tmp is fresh inside, but the notebook's own directory (and its Python, if it lives
    under /tmp) are shown through a throwaway overlay."""
    (tmp_path / "data.txt").write_text("42\n")
    monkeypatch.chdir(tmp_path)
    r = pynsbook.run(["sh", "-c", "pwd; cat data.txt; echo changed > data.txt; cat data.txt; "
                      "ls /tmp | wc -l"])
    lines = r.stdout.split()
    assert lines[:3] == [str(tmp_path), "42", "changed"], r.stderr
    assert (tmp_path / "data.txt").read_text() == "42\n"
