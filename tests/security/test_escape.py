"""The escape suite (issue 17, section 2): attacks a container must not get away with.

Every attempt runs INSIDE a container with default options and must fail with the exact
errno written here; a crash, a hang or a timeout of the attempt is a failure too (each run
has a timeout; ``probe.parse`` turns a run without an answer into an AssertionError).
The attempts themselves are in ``probe.py``, which also says why none of them can harm
the host when the confinement is missing (try-syscall with invalid arguments; files that
act on the host are only ever opened, never written).

Lanes (the ``lane`` parameter of each test):
- ``root``: as root, default options (a user namespace where the host has them);
- ``root-no-userns``: as root with ``--no-ns user``: the container's root IS host root
  (uid 0, no user namespace between), where the power of uid 0 is greatest;
- ``rootless``: as the unprivileged test user (through a user namespace). Its attempts run
  in one process (``probe.run_batch``), started once, and each test reads its answer.

Then the contrast: a subset run with ``privileged=True``, showing which attempts succeed
there (files that act on the host are still only opened, never written).
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

import pytest

from tests import helpers
from tests.security import probe

#: every attempt leaves nothing behind: no process, cgroup or mount of ours on the host
pytestmark = pytest.mark.usefixtures("no_leaks")

#: Docker's default capabilities (CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID
#: SETPCAP NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP) as a mask
DOCKER_CAPS = 0x00000000A80425FB
CAP_SYS_ADMIN = 1 << 21

ROOT = pytest.param("root", marks=pytest.mark.needs("root"), id="root")
ROOT_NO_USERNS = pytest.param("root-no-userns", marks=pytest.mark.needs("root"),
                              id="root-no-userns")
ROOTLESS = pytest.param("rootless", marks=pytest.mark.needs("rootless_user", "userns"),
                        id="rootless")
ALL_LANES = [ROOT, ROOT_NO_USERNS, ROOTLESS]
LANE_OPTIONS: Dict[str, Dict[str, Any]] = {
    "root": {}, "root-no-userns": {"no_namespaces": ["user"]}, "rootless": {}}


# ---------------------------------------------------------------------------------------
# what the host looks like (the attempts aim at it)

def host_disk() -> Dict[str, Any]:
    """The device the host's root filesystem is on, and how the host mounts it."""
    st = os.stat("/")
    fstype, source = "ext4", "/dev/root"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == "/":
                fstype, source = right.split()[:2]
    return {"major": os.major(st.st_dev), "minor": os.minor(st.st_dev), "kind": "b",
            "fstype": fstype, "host_path": source if source.startswith("/") else "/dev/root"}


#: a host process for the container to look for: `sleep` with a unique fraction of a
#: second in its argument (GNU sleep takes "1000.123"), started once per session
_MARKER: List[Tuple[subprocess.Popen, str]] = []


def host_marker() -> Tuple[int, str]:
    if not _MARKER:
        token = f"1000.{secrets.randbelow(10 ** 12):012d}"
        proc = subprocess.Popen(["sleep", token], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _MARKER.append((proc, token))
    proc, token = _MARKER[0]
    return proc.pid, token


def host_process_params() -> Dict[str, Any]:
    pid, token = host_marker()
    with open("/proc/self/cmdline", "rb") as f:
        owncmd = f.read().decode(errors="replace")
    return {"hostpid": pid, "marker": token, "ownpid": os.getpid(), "owncmd": owncmd}


@pytest.fixture(scope="module", autouse=True)
def _marker():
    """Started before any test (whose leak check would count it), stopped after all."""
    host_marker()
    yield
    for proc, _ in _MARKER:
        proc.kill()
        proc.wait()
    _MARKER.clear()


# ---------------------------------------------------------------------------------------
# the tables of attempts (the rootless batch is made from the same tables)

#: try-syscall attempts that must give EPERM (probe.TRY_SYSCALLS says what an allowed
#: call gives instead: EFAULT, EBADF, EINVAL, or ENOSYS on a kernel built without it)
EPERM_CALLS = [c for c in probe.TRY_SYSCALLS if c != "clone3"]

#: files whose writing acts on the machine (only opened for writing, never written)
PROC_WRITES = ["/proc/sys/kernel/hostname", "/proc/sys/kernel/core_pattern",
               "/proc/sysrq-trigger", "/proc/sys/kernel/modprobe", "/proc/sys/vm/drop_caches",
               "/proc/sys/kernel/sysrq"]

#: runc's maskedPaths: files read as empty, directories as empty and read-only
MASKED = ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug",
          "/proc/latency_stats", "/proc/timer_stats", "/proc/acpi", "/proc/asound",
          "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap"]

#: cgroup hierarchies to mount: a v1 controller the host mounted (memory), the devices
#: hierarchy (whose root is where release_agent lives), one of our own name, and cgroup2
CGROUP_MOUNTS = {"memory": {"options": "memory"}, "devices": {"options": "devices"},
                 "named": {"options": "none,name=pynsbook-escape"},
                 "cgroup2": {"fstype": "cgroup2"}}

#: unshare(kinds) -> (errno, errno of the follow-up in "then", if any)
UNSHARES = {
    **{kind: ({"kinds": [kind]}, errno.EPERM, None)
       for kind in ("mnt", "net", "pid", "uts", "ipc", "cgroup", "time")},
    "user+mnt": ({"kinds": ["user", "mnt"]}, errno.EPERM, None),
    # a user namespace is allowed (browsers sandbox themselves with one) ...
    "user": ({"kinds": ["user"]}, 0, None),
    # ... but it brings back nothing the filter refuses
    "user-then-mnt": ({"kinds": ["user"], "then": "mnt"}, 0, errno.EPERM),
    "user-then-mount": ({"kinds": ["user"], "then": "mount"}, 0, errno.EPERM),
}

#: the host's root disk; a loop device (a block device host root can open where the disk
#: itself is refused, as on some sandboxed hosts; with LOOP_SET_FD it would give any file);
#: /dev/kmsg (the kernel's log, and a character device)
DEVICES = {"host-disk": lambda: host_disk(),
           "loop0": lambda: {"major": 7, "minor": 0, "kind": "b"},
           "kmsg": lambda: {"major": 1, "minor": 11, "kind": "c"}}

SLEEPERS = {
    # a Python daemon: fork, setsid, fork again, exec sleep
    "python-daemon": lambda m: probe.container_code("sleeper", {"duration": m}),
    "setsid-f": lambda m: ["setsid", "-f", "sleep", m],
    # the naive one, as typed in a shell: it keeps the run's stdout and stderr open
    "setsid-bg": lambda m: ["sh", "-c", f"setsid sleep {m} & echo started"],
}


def default_cases() -> List[Tuple[str, Optional[Dict[str, Any]]]]:
    """Every (attempt, params) the default-options tests make, for the rootless batch."""
    cases: List[Tuple[str, Optional[Dict[str, Any]]]] = []
    cases += [("syscall", {"call": c}) for c in probe.TRY_SYSCALLS]
    cases += [("mount_tmpfs", {}), ("mount_block", host_disk()), ("status", {}), ("dev", {}),
              ("tiocsti", {}), ("cgroup_files", {}), ("init_reach", {}),
              ("remount_rw", {"paths": REMOUNT_PATHS}),
              ("read", {"path": "/proc/kmsg", "only_if_null": True}),
              ("host_process", host_process_params())]
    cases += [("mknod_open", make()) for make in DEVICES.values()]
    cases += [("open_write", {"path": p}) for p in PROC_WRITES]
    cases += [("read", {"path": p}) for p in MASKED]
    cases += [("cgroup_mount", p) for p in CGROUP_MOUNTS.values()]
    cases += [("unshare", p) for p, _, _ in UNSHARES.values()]
    return cases


REMOUNT_PATHS = ["/sys", "/sys/fs/cgroup", "/proc/sys", "/proc/sysrq-trigger", "/proc/bus",
                 "/proc/fs", "/proc/irq"]


# ---------------------------------------------------------------------------------------
# running an attempt in a lane

def _key(name: str, params: Any, options: Dict[str, Any]) -> str:
    return json.dumps([name, params, options], sort_keys=True)


_ROOTLESS: Dict[str, Any] = {}


def _rootless_batch(cases: List[List[Any]]) -> Dict[str, Any]:
    code = ("import json\nfrom tests.security import probe\n"
            f"print(json.dumps(probe.run_batch(json.loads({json.dumps(cases)!r}))))\n")
    r = helpers.run_as_user(code, timeout=900)
    return json.loads(r.stdout.strip().splitlines()[-1])


#: in the VM lanes a container costs seconds: there the default-option attempts of a lane
#: run together, each in a child of one container of that lane (probe.run_in_one_container)
ONE_CONTAINER = os.environ.get("PYNSBOOK_LANE", "host") != "host"
_BATCHED: Dict[str, Dict[str, Any]] = {}


def attempt(lane: str, name: str, params: Optional[Dict[str, Any]] = None,
            **options: Any) -> Dict[str, Any]:
    """Run attempt ``name`` in a new container of ``lane``; its answer (probe.parse)."""
    # (the rootless lane too when this process is the unprivileged user: the VM's delegated
    # lane; as root its cases go to the test user's process, in run_as_user below)
    if ONE_CONTAINER and not options and (lane != "rootless" or os.geteuid() != 0):
        key = _key(name, params or {}, {"lane": lane})
        if not any(k.startswith(lane + "|") for k in _BATCHED):
            cases = [[_key(n, p or {}, {"lane": lane}), n, p or {}] for n, p in default_cases()]
            for k, answer in probe.run_in_one_container(cases, **LANE_OPTIONS[lane]).items():
                _BATCHED[lane + "|" + k] = answer
        if lane + "|" + key in _BATCHED:
            out = _BATCHED[lane + "|" + key]
            if "_error" in out:
                raise AssertionError(f"in the {lane} batch: {out['_error']}")
            return out
    options = dict(LANE_OPTIONS[lane], **options)
    if lane != "rootless" or os.geteuid() != 0:  # (not root: this process is the user)
        return probe.run_attempt(name, params, **options)
    key = _key(name, params or {}, options)
    if not _ROOTLESS:  # first use: every default case, as the test user, in one process
        batch = [[_key(n, p or {}, {}), n, p or {}, {}] for n, p in default_cases()]
        _ROOTLESS.update(_rootless_batch(batch))
    if key not in _ROOTLESS:
        _ROOTLESS.update(_rootless_batch([[key, name, params or {}, options]]))
    out = _ROOTLESS[key]
    if "_error" in out:
        raise AssertionError(f"as {helpers.TEST_USER}: {out['_error']}")
    return out


def refused_write(owner_uid: int, overflowuid: int) -> int:
    """The errno of opening for writing a file the container may not write.

    The mount is read-only: EROFS. But the kernel checks the file's permissions first
    (may_open, then the mount in do_dentry_open): when the file's owner is not mapped into
    the container's user namespace (it shows as the overflow uid, 65534 — the rootless
    lane, or a root mapped to an unprivileged range) the container's root has no power over
    it and the open fails with EACCES before the mount is looked at. (For /proc/sys the
    check is sysctl_perm: only host uid 0 gets the owner's bits — the same split.)
    """
    return errno.EACCES if owner_uid == overflowuid else errno.EROFS


# ---------------------------------------------------------------------------------------
# 1. system calls that reach past the container into the kernel or the machine

@pytest.mark.parametrize("call", EPERM_CALLS)
@pytest.mark.parametrize("lane", ALL_LANES)
def test_kernel_facing_system_call_is_refused_with_eperm(lane, call):
    """modules, kexec, reboot, swap, clocks, keys, bpf, perf, userfaultfd, shocker's
    open_by_handle_at, the mount family, acct, quotactl, process_vm_*, ptrace of the
    container's init (from a process that is not init), iopl/ioperm, personality(
    ADDR_NO_RANDOMIZE), syslog, setns of every kind (nstype 0, "any", included), and
    clone with CLONE_NEWNS: each made so that an allowed call fails harmlessly with another
    errno (see probe.TRY_SYSCALLS); refused, it is EPERM."""
    out = attempt(lane, "syscall", {"call": call})
    assert out.get("errno") == errno.EPERM, out


@pytest.mark.parametrize("lane", ALL_LANES)
def test_clone3_is_not_implemented_so_its_namespace_flags_cannot_be_smuggled(lane):
    """clone3 passes its flags in a struct a seccomp filter cannot read: like Docker, the
    filter answers ENOSYS (not EPERM: glibc falls back to clone(2) only on ENOSYS, and
    clone's flags the filter can check). Allowed, the bad pointer would give EFAULT."""
    out = attempt(lane, "syscall", {"call": "clone3"})
    assert out.get("errno") == errno.ENOSYS, out


@pytest.mark.parametrize("case", list(UNSHARES))
@pytest.mark.parametrize("lane", ALL_LANES)
def test_unshare_of_a_namespace_other_than_user_is_refused(lane, case):
    params, first, then = UNSHARES[case]
    out = attempt(lane, "unshare", params)
    assert out.get("errno") == first, out
    if then is not None:
        assert out.get("then") == then, out


@pytest.mark.parametrize("lane", ALL_LANES)
def test_tiocsti_on_the_controlling_terminal_is_refused(lane):
    """Pushing characters into a terminal's input (a shell outside would read them):
    our own pty, made our controlling terminal, where the kernel alone would allow it."""
    out = attempt(lane, "tiocsti")
    assert out.get("errno") == errno.EPERM, out


# ---------------------------------------------------------------------------------------
# 2. mounts

@pytest.mark.parametrize("lane", ALL_LANES)
def test_mounting_a_tmpfs_is_refused(lane):
    out = attempt(lane, "mount_tmpfs")
    assert out.get("errno") == errno.EPERM, out


@pytest.mark.parametrize("lane", ALL_LANES)
def test_mounting_the_hosts_disk_is_refused(lane):
    """mount(2) of the host's root disk, read-only, through a node made for it when mknod
    works (else the host's path of it): refused before the device is even looked at."""
    out = attempt(lane, "mount_block", host_disk())
    assert out.get("errno") == errno.EPERM, out


@pytest.mark.parametrize("lane", ALL_LANES)
def test_read_only_mounts_cannot_be_remounted_writable(lane):
    """`mount -o remount,bind,rw` of every read-only mount the container has (/sys,
    /sys/fs/cgroup and each hierarchy in it, runc's readonlyPaths, masks, read-only binds
    of host files): refused, and each stays read-only."""
    out = attempt(lane, "remount_rw", {"paths": REMOUNT_PATHS})
    mounts = out["mounts"]
    assert mounts["/sys"].get("exists", True) and mounts["/sys/fs/cgroup"].get("exists", True)
    bad = {p: m for p, m in mounts.items()
           if m.get("exists", True) and (m["errno"] != errno.EPERM or not m["ro_after"])
           and m.get("was_ro", True)}
    assert not bad, bad
    assert all(m["was_ro"] for p, m in mounts.items()
               if p in ("/sys", "/sys/fs/cgroup") or p.startswith("/sys/fs/cgroup/")), mounts


# ---------------------------------------------------------------------------------------
# 3. devices

@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("lane", ALL_LANES)
def test_a_node_of_a_host_device_cannot_be_made_or_opened(lane, device):
    """mknod of the host's root disk (its major:minor from the host's stat of /), of
    /dev/loop0 and of /dev/kmsg, in every directory we can write: refused (EPERM: no CAP_MKNOD over the host's
    devices in a user namespace), or made (CAP_MKNOD is one of Docker's 14) but not
    openable: EACCES where the mount is nodev (checked first, may_open_dev), else EPERM
    (the devices cgroup)."""
    out = attempt(lane, "mknod_open", DEVICES[device]())
    tried = [a for a in out["attempts"] if not a["rdonly"]]
    assert tried, out  # /tmp at least is writable
    for a in tried:
        if a["mknod"] == 0:
            assert a["open"] == (errno.EACCES if a["nodev"] else errno.EPERM), a
        else:
            assert a["mknod"] == errno.EPERM, a


ALLOWED_DEV = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
               "urandom": (1, 9), "tty": (5, 0)}


@pytest.mark.parametrize("lane", ALL_LANES)
def test_dev_holds_only_harmless_devices_and_writable_mounts_are_nodev(lane):
    out = attempt(lane, "dev")
    allowed = set(ALLOWED_DEV) | {"pts", "ptmx", "shm", "mqueue", "fd", "stdin", "stdout",
                                  "stderr"}
    assert set(out["dev"]) <= allowed, sorted(set(out["dev"]) - allowed)
    for name, entry in out["dev"].items():
        if entry["kind"] in ("chr", "blk"):
            if name == "ptmx":
                assert entry["kind"] == "chr" and tuple(entry["rdev"]) == (5, 2), entry
            else:
                assert entry["kind"] == "chr" and tuple(entry["rdev"]) == ALLOWED_DEV[name], \
                    (name, entry)
    # a filesystem the container can write, where a node could be made, must not give
    # devices (device-node binds, devpts, mqueue, proc and sysfs excepted: no mknod there)
    assert out["writable_without_nodev"] == [], out["writable_without_nodev"]


# ---------------------------------------------------------------------------------------
# 4. /proc and /sys

@pytest.mark.parametrize("path", PROC_WRITES)
@pytest.mark.parametrize("lane", ALL_LANES)
def test_writing_a_host_facing_proc_file_is_refused(lane, path):
    """hostname, core_pattern (a crash would run its command as host root), sysrq-trigger,
    modprobe, drop_caches, sysrq: opened for writing only (never written), refused with
    EROFS (runc's readonlyPaths) or EACCES where the owner is not mapped (refused_write)."""
    out = attempt(lane, "open_write", {"path": path})
    if not os.path.exists(path):  # a kernel built without it: the container has none either
        assert out["errno"] is None and out["stat"] == errno.ENOENT, out
        return
    assert out["errno"] is not None, f"{path} is on the host but not in the container: {out}"
    assert out["errno"] == refused_write(out["uid"], out["overflowuid"]), out


@pytest.mark.parametrize("path", MASKED)
@pytest.mark.parametrize("lane", ALL_LANES)
def test_masked_path_shows_nothing(lane, path):
    """runc's maskedPaths: a file reads as empty (/dev/null bound on it), a directory is
    empty and nothing can be made in it (a read-only tmpfs: EROFS)."""
    out = attempt(lane, "read", {"path": path})
    if not os.path.exists(path):  # not on this kernel: nothing to show, nothing shown
        assert not out["exists"] or out.get("size") == 0 or out.get("entries") == [], out
        return
    assert out["exists"], out
    if out["dir"]:
        assert out["entries"] == [] and out["create"] == errno.EROFS, out
    else:
        assert out["errno"] == 0 and out["size"] == 0, out


@pytest.mark.parametrize("lane", ALL_LANES)
def test_kernel_log_is_out_of_reach(lane):
    """/proc/kmsg (not in runc's maskedPaths): refused (EPERM: CAP_SYSLOG is not one of
    the 14) or masked by /dev/null. Never read unless it is the mask (reading takes the
    messages from the host's log reader). syslog(2) is in the EPERM system calls."""
    out = attempt(lane, "read", {"path": "/proc/kmsg", "only_if_null": True})
    if out.get("errno") == errno.EPERM:
        return
    assert out.get("null") is True and out.get("size") == 0, out


# ---------------------------------------------------------------------------------------
# 5. cgroups: the release_agent escape, and the container's own limits

@pytest.mark.parametrize("kind", list(CGROUP_MOUNTS))
@pytest.mark.parametrize("lane", ALL_LANES)
def test_mounting_a_cgroup_hierarchy_is_refused(lane, kind):
    """The first step of the release_agent escape (and of raising one's own limits)."""
    out = attempt(lane, "cgroup_mount", CGROUP_MOUNTS[kind])
    assert out.get("errno") == errno.EPERM, out


@pytest.mark.parametrize("lane", ALL_LANES)
def test_the_containers_cgroup_files_are_read_only(lane):
    """notify_on_release, release_agent (where the hierarchy's root shows), limits,
    devices.allow, cgroup.procs in every hierarchy of /sys/fs/cgroup: opened for writing
    only, refused (refused_write); a child cgroup cannot be made (EROFS: for mkdir the
    read-only mount is checked before the permissions)."""
    out = attempt(lane, "cgroup_files")
    assert out["files"], out  # something was tried
    bad = {p: f for p, f in out["files"].items()
           if f["errno"] != refused_write(f["uid"], out["overflowuid"])}
    assert not bad, bad
    assert out["mkdir"] and all(e == errno.EROFS for e in out["mkdir"].values()), out["mkdir"]


LIMIT_LANES = [pytest.param("root", marks=pytest.mark.needs("root", "cgroups"), id="root"),
               pytest.param("root-no-userns", marks=pytest.mark.needs("root", "cgroups"),
                            id="root-no-userns"),
               # an ordinary user can have limits only in a delegated cgroup-v2 scope
               pytest.param("rootless", marks=pytest.mark.needs(
                   "rootless_user", "userns", "cgroups", "delegated_scope"), id="rootless")]


def _assert_writes_refused(out: Dict[str, Any]) -> None:
    assert out["mount"] == errno.EPERM, out  # no fresh hierarchy to write through
    assert out["writes"], out
    for path, w in out["writes"].items():
        assert "uid" in w, f"wrote through a fresh mount: {out}"
        assert w["errno"] == refused_write(w["uid"], out["overflowuid"]), (path, out)


@pytest.mark.parametrize("lane", LIMIT_LANES)
def test_the_container_cannot_raise_its_own_memory_limit(lane):
    """With --mem 64M --pids 32: raising memory.limit_in_bytes through /sys/fs/cgroup or a
    fresh mount fails, and 200 MiB touched page by page is still OOM-killed."""
    out = attempt(lane, "raise_memory", {"alloc_mb": 200}, memory="64M", pids=32)
    _assert_writes_refused(out)
    assert "survived" not in out, out
    assert out["_run"]["oom_killed"], out


@pytest.mark.parametrize("lane", LIMIT_LANES)
def test_the_container_cannot_raise_its_own_pids_limit(lane):
    """With --mem 64M --pids 32: raising pids.max fails, and 100 forks stop short of 32
    processes with EAGAIN."""
    out = attempt(lane, "raise_pids", {"forks": 100}, memory="64M", pids=32)
    _assert_writes_refused(out)
    assert "forked" in out, f"the run ended before its forks were counted: {out}"
    assert out["forked"] < 32 and out["fork_errno"] == errno.EAGAIN, out


# ---------------------------------------------------------------------------------------
# 6. host processes, the container's init, capabilities

@pytest.mark.parametrize("lane", ALL_LANES)
def test_host_processes_are_invisible_and_cannot_be_signalled_or_traced(lane):
    """A host process (a marker `sleep` started by the test): not in the container's
    /proc, kill and ptrace of its host pid give ESRCH (no such process in the container's
    pid namespace: ptrace is allowed by the filter, as in Docker, for the container's own
    processes); and it is alive afterwards. The test's own process is not in the
    container's /proc either."""
    out = attempt(lane, "host_process", host_process_params())
    assert out["seen"] == [] and not out["own_visible"], out
    assert (out["kill0"], out["kill"], out["ptrace"]) == (errno.ESRCH, errno.ESRCH,
                                                          errno.ESRCH), out
    assert _MARKER[0][0].poll() is None, "the host's marker process was killed"


@pytest.mark.parametrize("lane", ALL_LANES)
def test_the_containers_init_is_out_of_reach(lane):
    """The init (pid 1) is the container's one process that may keep more powers: its
    memory, environment, descriptors, root and working directory are refused (EACCES:
    ptrace_may_access, which a process with fewer capabilities fails)."""
    out = attempt(lane, "init_reach")
    assert out["pid"] != 1, out
    errnos = dict(out["errnos"])
    errnos.pop("fd")  # listing the numbers is allowed to a root with DAC_OVERRIDE
    assert errnos == {k: errno.EACCES for k in errnos}, out


def _check_status(fields: Dict[str, str]) -> None:
    for key in ("CapEff", "CapPrm", "CapBnd"):
        assert int(fields[key], 16) == DOCKER_CAPS, (key, fields)
    assert int(fields["CapInh"], 16) & ~DOCKER_CAPS == 0, fields
    assert int(fields["CapAmb"], 16) == 0, fields
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2", fields


def _status_fields(text: str) -> Dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


@pytest.mark.parametrize("lane", ALL_LANES)
def test_python_code_runs_with_dockers_capabilities_no_new_privs_and_seccomp(lane):
    out = attempt(lane, "status")
    _check_status(out["self"])


@pytest.mark.parametrize("lane", ALL_LANES)
def test_a_command_runs_with_dockers_capabilities_no_new_privs_and_seccomp(lane):
    argv = ["cat", "/proc/self/status"]
    if lane == "rootless":
        if not _ROOTLESS:
            attempt(lane, "status")  # the batch
        key = _key("@argv", {"argv": argv}, {})
        if key not in _ROOTLESS:
            _ROOTLESS.update(_rootless_batch([[key, "@argv", {"argv": argv}, {}]]))
        r = _ROOTLESS[key]
        assert "_error" not in r, r
        text, code = r["stdout"], r["exit_code"]
    else:
        import pynsbook
        res = pynsbook.run(argv, timeout=probe.RUN_TIMEOUT, **LANE_OPTIONS[lane])
        text, code = res.stdout, res.exit_code
    assert code == 0, text
    _check_status(_status_fields(text))


@pytest.mark.needs("root")
def test_the_command_line_confines_by_default_and_privileged_undoes_it():
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    base = [sys.executable, "-m", "pynsbook", "run"]
    r = subprocess.run(base + ["--", "cat", "/proc/self/status"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    _check_status(_status_fields(r.stdout))
    r = subprocess.run(base + ["--privileged", "--", "cat", "/proc/self/status"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    fields = _status_fields(r.stdout)
    assert fields["Seccomp"] == "0" and int(fields["CapEff"], 16) & CAP_SYS_ADMIN, fields


# ---------------------------------------------------------------------------------------
# 7. nothing outlives its run

SLEEPER_LANES = [pytest.param("root", marks=pytest.mark.needs("root"), id="root"),
                 ROOTLESS]


@pytest.mark.parametrize("how", list(SLEEPERS))
@pytest.mark.parametrize("lane", SLEEPER_LANES)
def test_a_daemonized_sleeper_does_not_outlive_its_run(lane, how):
    """`setsid sleep 1000 &` and friends: gone when the run returns (a bounded poll of
    the host's processes for the sleeper's unique argument), and the run returns at once
    even when the sleeper holds its output open."""
    token = f"1000.{secrets.randbelow(10 ** 12):012d}"
    run = SLEEPERS[how](token)
    try:
        if lane == "rootless":
            key = _key("@sleeper", {"run": run, "marker": token}, {})
            out = _rootless_batch([[key, "@sleeper", {"run": run, "marker": token}, {}]])[key]
            assert "_error" not in out, out
            left, timed_out, wall = out["survivors"], out["timed_out"], out["wall_time"]
        else:
            import pynsbook
            r = pynsbook.run(run, timeout=20)
            left = probe.survivors(token)
            timed_out, wall = r.timed_out, r.wall_time
        assert left == [], f"left behind on the host: {left}"
        assert not timed_out and wall < 10, (timed_out, wall)
    finally:
        probe.kill_all(probe.survivors(token, timeout=0))


# ---------------------------------------------------------------------------------------
# 8. the contrast: the same attempts with --privileged

def _own_cgroup_hierarchy() -> Dict[str, str]:
    # on a cgroup v2 host the v1 controllers are bound to v2 (a v1 mount of memory is
    # EBUSY even for host root): mount what the host would let root mount
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return {"fstype": "cgroup2"}
    return {"options": "memory"}


#: (attempt, params, what the answer is when allowed), for calls the kernel allows to a
#: user namespace's root (on Debian's 6.1 too: the VM lanes). ENOSYS where the kernel may
#: be built without the feature (an allowed call then reaches a missing system call; a
#: refused one never gets there: EPERM).
PRIVILEGED = {
    "mount-tmpfs": ("mount_tmpfs", {}, 0),
    "unshare-mnt": ("unshare", {"kinds": ["mnt"]}, 0),
    "unshare-user+mnt": ("unshare", {"kinds": ["user", "mnt"]}, 0),
    "cgroup-mount": ("cgroup_mount", _own_cgroup_hierarchy(), 0),
    "clock_settime": ("syscall", {"call": "clock_settime"}, errno.EFAULT),
    "reboot": ("syscall", {"call": "reboot"}, errno.EINVAL),
    "keyctl": ("syscall", {"call": "keyctl"}, 0),
    "userfaultfd": ("syscall", {"call": "userfaultfd"}, errno.EINVAL),
    "ptrace-init": ("syscall", {"call": "ptrace_attach_init"}, 0),
    "process_vm_readv": ("syscall", {"call": "process_vm_readv"}, errno.EFAULT),
    "setns-mnt": ("syscall", {"call": "setns_mnt"}, errno.EBADF),
    "clone3": ("syscall", {"call": "clone3"}, errno.EFAULT),
    # opened for writing, and closed unwritten: proof that a write would have gone through
    "core_pattern": ("open_write", {"path": "/proc/sys/kernel/core_pattern"}, 0),
    "hostname": ("open_write", {"path": "/proc/sys/kernel/hostname"}, 0),
}

#: and without a user namespace the container's root is host root: these come back too
#: (the kernel checks their capability in the host's user namespace, some before copying
#: the arguments: bpf, perf on Debian, open_by_handle_at before 6.10, TIOCSTI with
#: dev.tty.legacy_tiocsti=0)
PRIVILEGED_NO_USERNS = {
    "init_module": ("syscall", {"call": "init_module"}, (errno.EFAULT, errno.ENOSYS)),
    "kexec_load": ("syscall", {"call": "kexec_load"}, (errno.EINVAL, errno.ENOSYS)),
    "swapon": ("syscall", {"call": "swapon"}, errno.EFAULT),
    "acct": ("syscall", {"call": "acct"}, errno.EFAULT),
    "syslog": ("syscall", {"call": "syslog"}, 0),
    "iopl": ("syscall", {"call": "iopl"}, (errno.EINVAL, errno.ENOSYS)),
    "bpf": ("syscall", {"call": "bpf"}, errno.EFAULT),
    "perf_event_open": ("syscall", {"call": "perf_event_open"}, errno.EFAULT),
    "open_by_handle_at": ("syscall", {"call": "open_by_handle_at"}, errno.EFAULT),
    "tiocsti": ("tiocsti", {}, 0),
}


def _allowed(expected: Any, out: Dict[str, Any]) -> bool:
    return out.get("errno") in (expected if isinstance(expected, tuple) else (expected,))


@pytest.mark.needs("root")
@pytest.mark.parametrize("case", list(PRIVILEGED))
def test_privileged_lets_the_attempt_through(case):
    name, params, expected = PRIVILEGED[case]
    confined = probe.run_attempt(name, params)
    privileged = probe.run_attempt(name, params, privileged=True)
    assert not _allowed(expected, confined), confined
    assert _allowed(expected, privileged), privileged


@pytest.mark.needs("root")
@pytest.mark.parametrize("case", list(PRIVILEGED_NO_USERNS))
def test_privileged_without_a_user_namespace_has_host_roots_powers(case):
    name, params, expected = PRIVILEGED_NO_USERNS[case]
    confined = probe.run_attempt(name, params, no_namespaces=["user"])
    privileged = probe.run_attempt(name, params, no_namespaces=["user"], privileged=True)
    assert confined.get("errno") == errno.EPERM, confined
    assert _allowed(expected, privileged), privileged


@pytest.mark.needs("root")
def test_privileged_has_every_capability_and_no_filter_and_sees_the_masked_paths():
    out = probe.run_attempt("status", privileged=True)["self"]
    assert out["Seccomp"] == "0" and out["NoNewPrivs"] == "0", out
    assert int(out["CapEff"], 16) == int(out["CapBnd"], 16), out
    assert int(out["CapEff"], 16) & CAP_SYS_ADMIN, out
    if os.path.exists("/proc/timer_list"):
        timer_list = probe.run_attempt("read", {"path": "/proc/timer_list"}, privileged=True)
        assert timer_list["errno"] == 0 and timer_list["size"] > 0, timer_list
    if os.path.isdir("/sys/firmware") and os.listdir("/sys/firmware"):
        firmware = probe.run_attempt("read", {"path": "/sys/firmware"}, privileged=True)
        assert firmware["entries"], firmware


def _session_keyring() -> int:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(ctypes.c_long(probe.NR["keyctl"]), ctypes.c_long(0),
                       ctypes.c_long(-3), ctypes.c_long(0))
    assert ret >= 0, os.strerror(ctypes.get_errno())
    return ret


_KEYRING_ID = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
print("KEYRING", libc.syscall(ctypes.c_long(250), ctypes.c_long(0), ctypes.c_long(-3),
                              ctypes.c_long(0)), ctypes.get_errno())
"""


@pytest.mark.needs("root")
@pytest.mark.parametrize("options",
                         [{"security_opt": ["seccomp=unconfined"]}, {"privileged": True}],
                         ids=["seccomp-unconfined", "privileged"])
def test_the_container_has_a_session_keyring_of_its_own(options):
    """Where keyctl is allowed, the session keyring the container sees is not the one of
    the process that started it (keys the notebook's user holds are not the container's)."""
    import pynsbook
    ours = _session_keyring()
    r = pynsbook.run(_KEYRING_ID, timeout=probe.RUN_TIMEOUT, **options)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("KEYRING ")]
    assert line, (r.stdout, r.stderr)
    theirs, err = map(int, line[-1].split()[1:])
    assert theirs > 0, f"keyctl failed in the container: {os.strerror(err)}"
    assert theirs != ours
