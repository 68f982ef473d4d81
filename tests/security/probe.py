"""Escape attempts, as small Python functions a container runs (issue 17, section 2).

The whole text of this file is what a container runs: ``container_code(name, params)``
appends one call to :func:`_probe`, which runs the attempt ``name`` and prints one line
``PROBE {json}``. The top half uses the standard library only (an image's root may hold
nothing else); the host-side helpers at the bottom import pynsbook lazily and only run on
the host.

Nothing here may harm the host even when the confinement is missing:
- system calls that would be destructive if allowed are made the bubblewrap way
  ("try-syscall"): with an invalid pointer, a bad file descriptor or an invalid value, so
  that an ALLOWED call fails harmlessly (EFAULT, EBADF, EINVAL) and only a REFUSED call
  gives EPERM. The comment by each call names what an allowed call returns;
- files whose writing would act on the host (core_pattern, sysrq-trigger, sysctls,
  cgroup files other than the container's own limits) are only opened for writing, and
  closed at once: the open alone tells whether a write could happen;
- whatever an attempt manages to mount, it unmounts again (in the container's own mount
  namespace, which goes away with the container anyway).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import stat
import time

# x86_64 system call numbers
NR = {
    "ptrace": 101, "syslog": 103, "personality": 135, "pivot_root": 155, "adjtimex": 159,
    "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "iopl": 172, "ioperm": 173, "init_module": 175,
    "delete_module": 176, "quotactl": 179, "clock_settime": 227, "kexec_load": 246,
    "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
    "perf_event_open": 298, "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsmount": 432, "clone": 56, "clone3": 435,
}

CLONE = {"mnt": 0x00020000, "cgroup": 0x02000000, "uts": 0x04000000, "ipc": 0x08000000,
         "user": 0x10000000, "pid": 0x20000000, "net": 0x40000000, "time": 0x00000080}

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_RELATIME = 32, 1024, 2048, 4096, 1 << 21
MNT_DETACH = 2
BAD_PTR = 1  # a pointer the kernel cannot read: an allowed call copying from it -> EFAULT

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _arg(a):
    if a is None:
        return ctypes.c_void_p(None)
    if isinstance(a, bytes):
        return ctypes.c_char_p(a)
    if isinstance(a, int):
        return ctypes.c_long(a)
    return a


def sc(name, *args):
    """syscall(NR[name], *args) -> errno (0 when the call succeeded)."""
    ctypes.set_errno(0)
    ret = _libc.syscall(ctypes.c_long(NR[name]), *[_arg(a) for a in args])
    return ctypes.get_errno() if ret < 0 else 0


def os_errno(fn, *args):
    """Run an os function -> (errno or 0, its result or None)."""
    try:
        return 0, fn(*args)
    except OSError as err:
        return err.errno, None


def in_child(fn, timeout=10.0):
    """Run fn() in a forked child (an attempt that would change this process: unshare,
    clone, personality); its JSON-able result comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            out = fn()
        except BaseException as err:  # reported, not raised: the parent decides
            out = {"error": repr(err)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data.decode()) if data else {"error": "the child gave no answer"}


def _flags_of(path):
    """The per-mount flags of the mount holding ``path`` as MS_* bits (for a bind remount
    that changes nothing but read-only, the locked flags must be kept)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
                   (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME),
                   (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
        if f & st:
            out |= ms
    return out


def mountinfo():
    """[(mount point, per-mount options, fs type, super options)] of this mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, _source, superopts = (right.split() + ["", "", ""])[:3]
            point = fields[4].encode().decode("unicode_escape")
            out.append((point, fields[5].split(","), fstype, superopts.split(",")))
    return out


def overflow_uid():
    try:
        with open("/proc/sys/kernel/overflowuid") as f:
            return int(f.read())
    except OSError:
        return 65534


def _scratch(name):
    """A fresh directory to mount on (the writable /tmp of the container)."""
    path = f"/tmp/pynsbook-escape-mnt-{name}-{os.getpid()}"
    os.makedirs(path, exist_ok=True)
    return path


def _undo_mount(target):
    sc("umount2", target.encode(), MNT_DETACH)


# ---------------------------------------------------------------------------------------
# the attempts: each takes its params (a dict) and returns a dict with at least "errno"

def a_syscall(p):
    """One system call made the try-syscall way; ``errno`` is what it returned."""
    call = p["call"]
    if call in TRY_SYSCALLS:
        return {"errno": TRY_SYSCALLS[call]()}
    return {"error": f"no such call {call!r}"}


def _ptrace_attach_init():
    # from a process that is not the container's init, at the init. An allowed attach
    # stops the init: wait for that stop and detach at once, so it runs on.
    if os.getpid() == 1:
        return errno.EINVAL
    err = sc("ptrace", 16, 1, 0, 0)  # PTRACE_ATTACH
    if err == 0:
        try:
            os.waitpid(1, 0x40000000)  # __WALL
        except OSError:
            pass
        sc("ptrace", 17, 1, 0, 0)  # PTRACE_DETACH
    return err


def _clone_ns():
    # clone(CLONE_NEWNS | SIGCHLD) from a child: an allowed call makes a grandchild that
    # leaves at once
    def child():
        flags = CLONE["mnt"] | signal.SIGCHLD
        ctypes.set_errno(0)
        ret = _libc.syscall(ctypes.c_long(NR["clone"]), ctypes.c_long(flags), ctypes.c_long(0),
                            ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
        if ret == 0:
            os._exit(0)
        if ret > 0:
            os.waitpid(ret, 0)
            return {"errno": 0}
        return {"errno": ctypes.get_errno()}
    return in_child(child).get("errno", -1)


def _process_vm(call):
    if os.getpid() == 1:
        return errno.EINVAL
    buf = ctypes.create_string_buffer(8)
    local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)  # struct iovec {base, len}
    remote = (ctypes.c_void_p * 2)(None, 8)
    return sc(call, 1, ctypes.addressof(local), 1, ctypes.addressof(remote), 1, 0)


def _personality():
    # ADDR_NO_RANDOMIZE (turning address-space randomisation off), in a child; allowed
    # -> the old persona (>= 0)
    return in_child(lambda: {"errno": sc("personality", 0x0040000)}).get("errno", -1)


def _open_by_handle_at():
    # shocker: a handle decoded against a directory of the host's filesystem; with no
    # handle (NULL), an allowed call fails copying it: EFAULT
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        return sc("open_by_handle_at", fd, None, os.O_RDONLY)
    finally:
        os.close(fd)


TRY_SYSCALLS = {
    # modules: allowed -> EFAULT (image at an unreadable address), EBADF, EFAULT (name)
    "init_module": lambda: sc("init_module", None, 4096, BAD_PTR),
    "finit_module": lambda: sc("finit_module", -1, BAD_PTR, 0),
    "delete_module": lambda: sc("delete_module", BAD_PTR, 0),
    # kexec: allowed -> EINVAL (too many segments; invalid flags)
    "kexec_load": lambda: sc("kexec_load", 0, 1000, None, 0),
    "kexec_file_load": lambda: sc("kexec_file_load", -1, -1, 0, None, 0x80000000),
    # reboot with wrong magic numbers: allowed -> EINVAL (the capability is checked first)
    "reboot": lambda: sc("reboot", 0, 0, 0, None),
    # swap: allowed -> EFAULT (path at an unreadable address)
    "swapon": lambda: sc("swapon", BAD_PTR, 0),
    "swapoff": lambda: sc("swapoff", BAD_PTR),
    # clocks: allowed -> EFAULT (the new time is copied in before anything is checked)
    "clock_settime": lambda: sc("clock_settime", 0, BAD_PTR),
    "settimeofday": lambda: sc("settimeofday", BAD_PTR, None),
    "adjtimex": lambda: sc("adjtimex", BAD_PTR),
    "clock_adjtime": lambda: sc("clock_adjtime", 0, BAD_PTR),
    # keys: keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0) only reads an id;
    # add_key/request_key with an unreadable type -> EFAULT
    "keyctl": lambda: sc("keyctl", 0, -3, 0),
    "add_key": lambda: sc("add_key", BAD_PTR, BAD_PTR, None, 0, -2),
    "request_key": lambda: sc("request_key", BAD_PTR, BAD_PTR, None, 0),
    # bpf(BPF_MAP_CREATE) with unreadable attributes: allowed -> EFAULT
    "bpf": lambda: sc("bpf", 0, BAD_PTR, 8),
    # perf_event_open(NULL attr): allowed -> EFAULT
    "perf_event_open": lambda: sc("perf_event_open", None, 0, -1, -1, 0),
    # userfaultfd(UFFD_USER_MODE_ONLY | an unknown flag): allowed -> EINVAL
    "userfaultfd": lambda: sc("userfaultfd", 1 | 0x40000000),
    "open_by_handle_at": _open_by_handle_at,
    # mount family: allowed -> EFAULT (unreadable paths) or EBADF (bad descriptors)
    "umount2": lambda: sc("umount2", BAD_PTR, 0),
    "pivot_root": lambda: sc("pivot_root", BAD_PTR, BAD_PTR),
    "fsopen": lambda: sc("fsopen", BAD_PTR, 0),
    "fsmount": lambda: sc("fsmount", -1, 0, 0),
    "move_mount": lambda: sc("move_mount", -1, BAD_PTR, -1, BAD_PTR, 0),
    "open_tree": lambda: sc("open_tree", -1, BAD_PTR, 0),
    # acct with an unreadable path (NULL would turn accounting off): allowed -> EFAULT
    "acct": lambda: sc("acct", BAD_PTR),
    # quotactl(Q_GETINFO) on an unreadable device path: allowed -> EFAULT
    "quotactl": lambda: sc("quotactl", 0x800005, BAD_PTR, 0, None),
    # the init's memory (it holds more capabilities than we do): the filter allows these,
    # as Docker's does, and the kernel refuses (EPERM); where it may read it, NULL: EFAULT
    "process_vm_readv": lambda: _process_vm("process_vm_readv"),
    "process_vm_writev": lambda: _process_vm("process_vm_writev"),
    "ptrace_attach_init": _ptrace_attach_init,
    # port I/O: iopl(4) and ioperm of no ports: allowed -> EINVAL
    "iopl": lambda: sc("iopl", 4),
    "ioperm": lambda: sc("ioperm", 0, 0, 0),
    "personality": _personality,
    # the kernel log's size: allowed -> the size (a success)
    "syslog": lambda: sc("syslog", 10, None, 0),
    # setns with a bad descriptor: allowed -> EBADF. nstype 0 means "any kind": a filter
    # that only looks for the flags of the kinds it refuses would let it through
    **{f"setns_{kind}": (lambda flag=flag: sc("setns", -1, flag))
       for kind, flag in list(CLONE.items()) + [("any", 0)]},
    "clone_newns": _clone_ns,
    # clone3 takes its flags in a struct a filter cannot read: it must be ENOSYS (not
    # EPERM: glibc falls back to clone only on ENOSYS). Allowed -> EFAULT
    "clone3": lambda: sc("clone3", BAD_PTR, 88),
}


def a_mount_tmpfs(p):
    target = _scratch("tmpfs")
    err = sc("mount", b"tmpfs", target.encode(), b"tmpfs", 0, None)
    if err == 0:
        _undo_mount(target)
    return {"errno": err}


def _can_create(d):
    """Whether a plain file can be made in ``d`` (access(2) is not enough: an overlay also
    checks the layer below with the credentials of whoever mounted it)."""
    path = os.path.join(d, f"pynsbook-escape-file-{os.getpid()}")
    err, fd = os_errno(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if fd is None:
        return False
    os.close(fd)
    os.unlink(path)
    return True


def _make_nodes(p, name):
    """mknod the host's device in every writable directory we can find:
    [{dir, mknod errno, path (made), nodev}]"""
    kind = stat.S_IFBLK if p["kind"] == "b" else stat.S_IFCHR
    out = []
    for d in p.get("dirs") or ("/dev", "/dev/shm", "/tmp", "/run", "/var/tmp", "/root", "/"):
        if not os.path.isdir(d) or os.path.islink(d):
            continue
        vfs = os.statvfs(d)
        item = {"dir": d, "nodev": bool(vfs.f_flag & os.ST_NODEV),
                "rdonly": bool(vfs.f_flag & os.ST_RDONLY) or not _can_create(d)}
        if item["rdonly"]:
            out.append(item)  # not writable by us: nothing can be made here
            continue
        path = os.path.join(d, f"{name}-{os.getpid()}")
        err, _ = os_errno(os.mknod, path, kind | 0o600, os.makedev(p["major"], p["minor"]))
        item["mknod"] = err
        if err == 0:
            item["path"] = path
        out.append(item)
    return out


def a_mknod_open(p):
    """mknod the host's device, then open what was made (read-only, non-blocking, closed
    at once: nothing is read)."""
    out = _make_nodes(p, "pynsbook-escape-node")
    for item in out:
        if "path" in item:
            err, fd = os_errno(os.open, item["path"], os.O_RDONLY | os.O_NONBLOCK)
            if fd is not None:
                os.close(fd)
            item["open"] = err
            os.unlink(item.pop("path"))
    return {"attempts": out}


def a_mount_block(p):
    """Mount the host's root disk read-only (through a node made for it if mknod works,
    else the path it has on the host)."""
    made = _make_nodes(p, "pynsbook-escape-disknode")
    source = next((m["path"] for m in made if "path" in m), p["host_path"])
    target = _scratch("disk")
    err = sc("mount", source.encode(), target.encode(), p["fstype"].encode(), MS_RDONLY, None)
    if err == 0:
        _undo_mount(target)
    for m in made:
        if "path" in m:
            os.unlink(m["path"])
    return {"errno": err, "source": source, "made": made}


def a_open_write(p):
    """Open a file for writing and close it at once: NEVER write (core_pattern would run
    a command as host root, sysrq-trigger acts on the machine)."""
    path = p["path"]
    st_err, st = os_errno(os.stat, path)
    if st is None:
        return {"errno": None, "stat": st_err}
    err, fd = os_errno(os.open, path, os.O_WRONLY)
    if fd is not None:
        os.close(fd)
    return {"errno": err, "uid": st.st_uid, "overflowuid": overflow_uid()}


def a_remount_rw(p):
    """A bind remount that turns read-only off (and keeps every other flag): one attempt
    per read-only mount, plus the paths named in params."""
    wanted = list(p.get("paths") or [])
    points = [pt for pt, opts, _fs, _so in mountinfo() if "ro" in opts]
    out = {}
    for point in dict.fromkeys(wanted + points):
        if not os.path.exists(point):
            out[point] = {"exists": False}
            continue
        flags = MS_REMOUNT | MS_BIND | _flags_of(point)
        before = bool(os.statvfs(point).f_flag & os.ST_RDONLY)
        err = sc("mount", None, point.encode(), None, flags, None)
        out[point] = {"errno": err, "was_ro": before,
                      "ro_after": bool(os.statvfs(point).f_flag & os.ST_RDONLY)}
    return {"mounts": out}


def a_cgroup_mount(p):
    """Mount a cgroup hierarchy of our own (v1 with the named options, or cgroup2): the
    first step of the release_agent escape."""
    target = _scratch("cg")
    fstype = p.get("fstype", "cgroup")
    opts = p.get("options")
    err = sc("mount", fstype.encode(), target.encode(), fstype.encode(), 0,
             opts.encode() if opts else None)
    out = {"errno": err}
    if err == 0:
        out["release_agent_visible"] = os.path.exists(os.path.join(target, "release_agent"))
        _undo_mount(target)
    return out


def a_cgroup_files(p):
    """The container's /sys/fs/cgroup: open for writing (never write) notify_on_release,
    release_agent and the limits in every hierarchy; and try to make a child cgroup."""
    base = "/sys/fs/cgroup"
    names = p.get("names") or ("notify_on_release", "release_agent", "memory.limit_in_bytes",
                               "memory.memsw.limit_in_bytes", "pids.max", "devices.allow",
                               "cgroup.procs", "memory.max", "cgroup.subtree_control")
    dirs = [base] + sorted(os.path.join(base, d) for d in os.listdir(base)
                           if os.path.isdir(os.path.join(base, d)))
    out = {"files": {}, "mkdir": {}, "overflowuid": overflow_uid()}
    for d in dirs:
        for name in names:
            path = os.path.join(d, name)
            if not os.path.exists(path):
                continue
            st = os.stat(path)
            err, fd = os_errno(os.open, path, os.O_WRONLY)
            if fd is not None:
                os.close(fd)
            out["files"][path] = {"errno": err, "uid": st.st_uid}
        if d != base or os.path.exists(os.path.join(d, "cgroup.procs")):
            child = os.path.join(d, f"pynsbook-escape-{os.getpid()}")
            err, _ = os_errno(os.mkdir, child)
            if err == 0:
                os.rmdir(child)
            out["mkdir"][d] = err
    return out


def _write(path, data):
    err, fd = os_errno(os.open, path, os.O_WRONLY)
    if fd is None:
        return err
    try:
        os.write(fd, data)
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def a_raise_memory(p):
    """Raise the container's own memory limit (its own cgroup: not the host's), through
    /sys/fs/cgroup and through a fresh mount of the hierarchy; report, then allocate
    ``alloc_mb`` and touch every page: the limit must still kill us."""
    big = str(1 << 30).encode()
    out = {"writes": {}}
    for name in ("memory.memsw.limit_in_bytes", "memory.limit_in_bytes", "memory.max"):
        path = os.path.join("/sys/fs/cgroup/memory", name)
        if os.path.exists(path):
            out["writes"][path] = {"errno": _write(path, big), "uid": os.stat(path).st_uid}
        path = os.path.join("/sys/fs/cgroup", name)
        if os.path.exists(path):
            out["writes"][path] = {"errno": _write(path, b"max"), "uid": os.stat(path).st_uid}
    target = _scratch("cgmem")
    err = sc("mount", b"cgroup", target.encode(), b"cgroup", 0, b"memory")
    out["mount"] = err
    if err == 0:
        for name in ("memory.memsw.limit_in_bytes", "memory.limit_in_bytes"):
            err = _write(os.path.join(target, name), big)
            out["writes"][f"(fresh mount)/{name}"] = {"errno": err}
        _undo_mount(target)
    out["overflowuid"] = overflow_uid()
    print("PROBE " + json.dumps(out), flush=True)
    hog = b"\x01" * (p["alloc_mb"] << 20)  # memset: every page touched
    print("PROBE " + json.dumps(dict(out, survived=len(hog))), flush=True)
    return None


def a_raise_pids(p):
    """Raise the container's own pids limit, then fork up to ``forks`` sleepers."""
    out = {"writes": {}}
    for path in ("/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/pids.max"):
        if os.path.exists(path):
            out["writes"][path] = {"errno": _write(path, b"max"), "uid": os.stat(path).st_uid}
    target = _scratch("cgpids")
    err = sc("mount", b"cgroup", target.encode(), b"cgroup", 0, b"pids")
    out["mount"] = err
    if err == 0:
        err = _write(os.path.join(target, "pids.max"), b"max")
        out["writes"]["(fresh mount)/pids.max"] = {"errno": err}
        _undo_mount(target)
    out["overflowuid"] = overflow_uid()
    print("PROBE " + json.dumps(out), flush=True)  # in case the forks end the run
    children = []
    fork_err = None
    for _ in range(p["forks"]):
        try:
            pid = os.fork()
        except OSError as e:
            fork_err = e.errno
            break
        if pid == 0:
            time.sleep(5)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    out.update(forked=len(children), fork_errno=fork_err)
    return out


def a_host_process(p):
    """Look for a host process (by a marker in its command line), signal it, trace it."""
    hostpid = p["hostpid"]
    own = None  # the test's own process, by its host pid and command line
    try:
        with open(f"/proc/{p['ownpid']}/cmdline", "rb") as f:
            own = f.read().decode(errors="replace")
    except (OSError, KeyError):
        pass
    return {"seen": with_argument(p["marker"]), "own_visible": own == p.get("owncmd"),
            "visible": os.path.exists(f"/proc/{hostpid}"),
            "kill0": os_errno(os.kill, hostpid, 0)[0],
            "kill": os_errno(os.kill, hostpid, signal.SIGKILL)[0],
            # the filter allows ptrace; the pid namespace has no such process
            "ptrace": sc("ptrace", 0x4206, hostpid, 0, 0)}  # PTRACE_SEIZE: stops nothing


def a_unshare(p):
    """unshare() the given namespaces (and then, in ``then``, more of them, or a mount) in
    a child process."""
    def child():
        flags = 0
        for kind in p["kinds"]:
            flags |= CLONE[kind]
        out = {"errno": sc("unshare", flags)}
        if out["errno"] == 0 and p.get("then"):
            then = p["then"]
            if then == "mount":
                target = _scratch("userns-tmpfs")
                out["then"] = sc("mount", b"tmpfs", target.encode(), b"tmpfs", 0, None)
            else:
                out["then"] = sc("unshare", CLONE[then])
        return out
    return in_child(child)


def a_read(p):
    """Read (at most 4 KiB of) a file, or list a directory: masked paths show nothing."""
    path = p["path"]
    if not os.path.lexists(path):
        return {"exists": False}
    if os.path.isdir(path):
        entries = os.listdir(path)
        probe = os.path.join(path, f"pynsbook-escape-{os.getpid()}")
        err, fd = os_errno(os.open, probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        if fd is not None:
            os.close(fd)
            os.unlink(probe)
        return {"exists": True, "dir": True, "entries": entries[:20], "create": err}
    err, fd = os_errno(os.open, path, os.O_RDONLY | os.O_NONBLOCK)
    if fd is None:
        return {"exists": True, "dir": False, "errno": err}
    try:
        st = os.fstat(fd)
        null = stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        if p.get("only_if_null") and not null:
            return {"exists": True, "dir": False, "errno": 0, "null": False, "read": False}
        rerr, data = os_errno(os.read, fd, 4096)
    finally:
        os.close(fd)
    return {"exists": True, "dir": False, "errno": rerr, "size": len(data or b""), "null": null}


def a_init_reach(p):
    """What of the container's init (pid 1) a process of the container can reach: its
    memory, environment, descriptors, root and working directory."""
    out = {}
    for name, how in (("mem", "open"), ("environ", "open"), ("fd", "list"), ("root", "link"),
                      ("cwd", "link"), ("fd/0", "link")):
        path = f"/proc/1/{name}"
        if how == "open":
            err, fd = os_errno(os.open, path, os.O_RDONLY)
            if fd is not None:
                os.close(fd)
        elif how == "list":
            err, _ = os_errno(os.listdir, path)
        else:
            err, _ = os_errno(os.readlink, path)
        out[name] = err
    return {"errnos": out, "pid": os.getpid()}


def a_tiocsti(p):
    """Push a character into the input of a terminal (our own pty, made our controlling
    terminal, so an allowed push harms nothing)."""
    def child():
        # closing the terminal at the end hangs it up: that SIGHUP must not kill us first
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        master, slave = os.openpty()
        name = os.ttyname(slave)
        os.setsid()
        fd = os.open(name, os.O_RDWR)  # a session leader opening a tty: it is ours now
        c = ctypes.c_char(b"x")
        ctypes.set_errno(0)
        ret = _libc.ioctl(fd, ctypes.c_ulong(0x5412), ctypes.byref(c))  # TIOCSTI
        err = ctypes.get_errno() if ret < 0 else 0
        for x in (fd, slave, master):
            os.close(x)
        return {"errno": err}
    return in_child(child)


def a_status(p):
    """Capabilities, no_new_privs and seccomp of this process, and of every process of
    the container (its init included)."""
    def fields(pid):
        out = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.startswith("Cap") or key in ("NoNewPrivs", "Seccomp", "Name"):
                    out[key] = value.strip()
        return out
    others = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                others[pid] = fields(pid)
            except OSError:
                pass
    return {"self": fields("self"), "others": others}


def a_dev(p):
    """What /dev holds, and the mounts the container may write that still allow devices."""
    entries = {}
    for name in os.listdir("/dev"):
        st = os.lstat(os.path.join("/dev", name))
        kind = ("link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode)
                else "chr" if stat.S_ISCHR(st.st_mode) else "blk" if stat.S_ISBLK(st.st_mode)
                else "file")
        entries[name] = {"kind": kind, "rdev": [os.major(st.st_rdev), os.minor(st.st_rdev)]
                         if kind in ("chr", "blk") else None}
    writable_dev = []
    for point, opts, fstype, _so in mountinfo():
        if "rw" not in opts or "nodev" in opts:
            continue
        # nodes cannot be made in these; and a bind of one device node is that device
        if fstype in ("proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"):
            continue
        try:
            if not stat.S_ISDIR(os.lstat(point).st_mode):
                continue
        except OSError:
            continue
        writable_dev.append([point, fstype])
    return {"dev": entries, "writable_without_nodev": writable_dev}


def a_sleeper(p):
    """Leave a daemon behind: fork, setsid, fork again, exec a sleep with a marker."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            fd = os.open("/dev/null", os.O_RDWR)
            for target in (0, 1, 2):
                os.dup2(fd, target)
            os.execvp("sleep", ["sleep", p["duration"]])
        os._exit(0)
    os.waitpid(pid, 0)
    return {"errno": 0}


ATTEMPTS = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("a_")}


def _probe(name, params):
    out = ATTEMPTS[name](params)
    if out is not None:
        print("PROBE " + json.dumps(out), flush=True)


def _probe_many(cases, each_timeout):
    """Many attempts in one container (the VM lanes, where a container costs seconds):
    each in a forked child of its own, with its own deadline, answering one BATCH line."""
    import select
    for key, name, params in cases:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.dup2(w, 1)
            try:
                _probe(name, params)
            except BaseException as err:
                print("PROBE " + json.dumps({"_error": f"{type(err).__name__}: {err}"}),
                      flush=True)
            os._exit(0)
        os.close(w)
        data, deadline = b"", time.monotonic() + each_timeout
        while time.monotonic() < deadline:
            if select.select([r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                data += chunk
        os.close(r)
        try:
            os.kill(pid, signal.SIGKILL)  # done (or hung: a hang is its answer)
        except OSError:
            pass
        os.waitpid(pid, 0)
        lines = [ln[6:] for ln in data.decode(errors="replace").splitlines()
                 if ln.startswith("PROBE ")]
        out = json.loads(lines[-1]) if lines else {"_error": f"no answer in {each_timeout} s"}
        print("BATCH " + json.dumps([key, out]), flush=True)


# ---------------------------------------------------------------------------------------
# host side (never runs in a container)

RUN_TIMEOUT = 30.0


def container_code(name, params=None):
    """The Python source a container runs for one attempt."""
    with open(__file__) as f:
        source = f.read()
    return f"{source}\n_probe({name!r}, json.loads({json.dumps(params or {})!r}))\n"


def run_in_one_container(cases, each_timeout=20.0, **options):
    """Run [key, name, params] attempts in one new container -> {key: answer}."""
    import pynsbook
    with open(__file__) as f:
        source = f.read()
    code = f"{source}\n_probe_many(json.loads({json.dumps(cases)!r}), {each_timeout!r})\n"
    r = pynsbook.run(code, timeout=RUN_TIMEOUT + each_timeout * len(cases), **options)
    info = {"exit_code": r.exit_code, "signal": r.signal, "oom_killed": r.oom_killed,
            "timed_out": r.timed_out}
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("BATCH "):
            key, answer = json.loads(line[6:])
            out[key] = dict(answer, _run=info)
    missing = [c[0] for c in cases if c[0] not in out]
    if missing:
        raise AssertionError(f"the batch gave no answer for {len(missing)} attempts ({info}); "
                             f"stderr: {r.stderr[-3000:]!r}")
    return out


def parse(result):
    """The last PROBE line of a RunResult's output, with how the run ended under "_run".
    A run that printed none (a crash, a hang, a timeout) is an AssertionError."""
    lines = [ln[6:] for ln in result.stdout.splitlines() if ln.startswith("PROBE ")]
    info = {"exit_code": result.exit_code, "signal": result.signal,
            "oom_killed": result.oom_killed, "timed_out": result.timed_out}
    if not lines:
        raise AssertionError(f"the attempt gave no answer ({info}); stdout: "
                             f"{result.stdout[-2000:]!r}; stderr: {result.stderr[-3000:]!r}")
    out = json.loads(lines[-1])
    out["_run"] = info
    if result.timed_out:
        raise AssertionError(f"the attempt hung until the run's timeout: {out}")
    return out


def run_attempt(name, params=None, run_timeout=RUN_TIMEOUT, **options):
    """Run one attempt in a new container (options as for pynsbook.run)."""
    import pynsbook
    r = pynsbook.run(container_code(name, params), timeout=run_timeout, **options)
    return parse(r)


def with_argument(marker):
    """Processes (of this pid namespace) with ``marker`` as one of their arguments (not
    merely in one: a `python -c CODE` that mentions it is not the process looked for)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read().split(b"\0"):
                        found.append(int(pid))
            except OSError:
                pass
    return found


def survivors(marker, timeout=5.0):
    """Host processes with ``marker`` as an argument, once none is left or ``timeout``
    has passed (a bounded poll)."""
    deadline = time.monotonic() + timeout
    while True:
        found = with_argument(marker)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def run_batch(cases):
    """Run many attempts (for the unprivileged lane, in one process): cases are
    [key, name, params, options]. Two special names: "@argv" runs params["argv"] and gives
    its output; "@sleeper" runs params["run"] (code or argv) and reports the host
    processes left with params["marker"] in their command line (and kills them).
    -> {key: result, or {"_error": why}}"""
    import pynsbook
    results = {}
    for key, name, params, options in cases:
        try:
            if name == "@argv":
                r = pynsbook.run(params["argv"], timeout=RUN_TIMEOUT, **options)
                results[key] = {"stdout": r.stdout, "exit_code": r.exit_code,
                                "stderr": r.stderr[-2000:], "timed_out": r.timed_out}
            elif name == "@sleeper":
                r = pynsbook.run(params["run"], timeout=params.get("timeout", 20), **options)
                left = survivors(params["marker"])
                kill_all(left)
                results[key] = {"survivors": left, "timed_out": r.timed_out,
                                "wall_time": r.wall_time, "exit_code": r.exit_code,
                                "stderr": r.stderr[-2000:]}
            else:
                results[key] = run_attempt(name, params, **options)
        except BaseException as err:  # one case's failure is that case's, not the batch's
            results[key] = {"_error": f"{type(err).__name__}: {err}"}
    return results
