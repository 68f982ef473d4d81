"""The things the startup benchmark times, from a bare fork to a microVM boot.

- baseline: ``fork``+``_exit``; fork+exec of ``/bin/true``; the *floor* of issue 7 (fork,
  unshare of pid/mnt/uts/ipc/net, fork, make ``/`` private and mount ``/proc``), all from
  this already running Python;
- namespace: fork, ``unshare(2)`` of one namespace kind (and a second fork for pid and time,
  which only apply to children), exit — and all eight kinds at once;
- pynsbook: a new container per run (cold) running the Python cell ``pass`` or ``/bin/true``;
  a started container running them (warm); and the command ``pynsbook run -- /bin/true`` as
  a user types it, from the start of its process to its exit (issue 17);
- peer: ``unshare(1)``, bubblewrap, ``crun run`` and ``runc run`` of ``/bin/true`` with a
  64 MiB memory limit (an OCI bundle of busybox built in a temporary directory);
- vm: a QEMU microVM booted to the ready marker of its init (KVM or emulation, labelled).

Every exec'd subject is started the same way (``os.fork`` + ``os.execv``, stdio to
/dev/null), so the peers pay the same launch cost as each other.

Other engineers add subjects with :func:`register` (the warm launcher of issue 7 does).
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..linux import libc
from .harness import BenchUsageError, Subject

#: the namespaces of the issue-7 container and floor (and of the unshare/crun/runc peers)
FIVE = ("pid", "mnt", "uts", "ipc", "net")
#: the container options of the pynsbook subjects (issue 7: five namespaces and
#: memory, CPU and pids limits)
CONTAINER_OPTIONS = {"memory": "64M", "cpus": 1, "pids": 64, "namespaces": ",".join(FIVE)}


def _wait(pid: int, what: str) -> None:
    try:
        _, status = os.waitpid(pid, 0)
    except BaseException:  # Ctrl-C or SIGTERM while the child runs: let it finish first
        _reap(pid)
        raise
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{what} exited with status {code}")


def _reap(pid: int, grace: float = 5.0) -> None:
    """Wait up to ``grace`` seconds for our child to end by itself (a runc or crun that
    is interrupted half-way leaves state behind), then SIGKILL it; reap it either way."""
    import signal
    import time
    deadline = time.monotonic() + grace
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        except KeyboardInterrupt:
            done = 0
            deadline = 0.0  # asked twice: stop waiting
        if done:
            return
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return
        time.sleep(0.005)


def _child(fn: Callable[[], int]) -> None:
    """In a forked child: run fn and _exit with its status, never returning."""
    code = 1
    try:
        code = fn()
    except BaseException:  # noqa: BLE001 - nothing may escape a forked child
        code = 1
    finally:
        os._exit(code)


def spawn(argv: Sequence[str], prepare: Optional[Callable[[], None]] = None,
          stderr_fd: Optional[int] = None) -> None:
    """fork + execv ``argv`` (absolute path), stdio on /dev/null; wait; raise on failure."""
    path = argv[0]
    args = list(argv)
    pid = os.fork()
    if pid == 0:
        def go() -> int:
            null = os.open("/dev/null", os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.dup2(stderr_fd if stderr_fd is not None else null, 2)
            if prepare is not None:
                prepare()
            os.execv(path, args)
            return 127
        _child(go)
    _wait(pid, os.path.basename(path))


# --------------------------------------------------------------------------- baseline


class ForkExit(Subject):
    name, label, group = "fork", "fork + exit (in this Python)", "baseline"

    def once(self) -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        _wait(pid, "fork")


class ExecTrue(Subject):
    name, label, group = "true", "fork + exec /bin/true", "baseline"

    def check(self) -> Optional[str]:
        return None if os.access("/bin/true", os.X_OK) else "/bin/true is missing"

    def once(self) -> None:
        spawn(["/bin/true"])


def _unshare_child(flags: int, fork_again: bool, mount_proc: bool = False) -> int:
    libc.unshare(flags)
    if not fork_again:
        return 0
    pid = os.fork()
    if pid == 0:
        def inner() -> int:
            if mount_proc:
                libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
                libc.mount("proc", "/proc", "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
            return 0
        _child(inner)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class Unshare(Subject):
    """fork, unshare(flags), [fork again], exit — from this Python, no exec."""

    group = "namespace"

    def __init__(self, name: str, kinds: Sequence[str], label: str, mount_proc: bool = False,
                 group: str = "namespace") -> None:
        super().__init__()
        self.name, self.label, self.group = name, label, group
        self.kinds = tuple(kinds)
        self.flags = 0
        for k in self.kinds:
            self.flags |= libc.NS_FLAGS[k]
        self.fork_again = bool({"pid", "time"} & set(self.kinds)) or mount_proc
        self.mount_proc = mount_proc

    def check(self) -> Optional[str]:
        missing = [k for k in self.kinds if not os.path.exists(f"/proc/self/ns/{k}")]
        if missing:
            return f"this kernel has no {', '.join(missing)} namespace"
        if os.geteuid() != 0 and "user" not in self.kinds:
            return "creating this namespace needs root (or a user namespace)"
        return None

    def once(self) -> None:
        pid = os.fork()
        if pid == 0:
            _child(lambda: _unshare_child(self.flags, self.fork_again, self.mount_proc))
        _wait(pid, f"unshare({'|'.join(self.kinds)})")


def floor_subject() -> Unshare:
    return Unshare("floor", FIVE, "floor: fork+unshare(5 ns)+fork+mount /proc",
                   mount_proc=True, group="baseline")


# --------------------------------------------------------------------------- pynsbook


class PynsbookCold(Subject):
    """A new container per run: request to result (its removal finishes after).

    ``prepared``: as ``pynsbook.run`` does when a shape repeats, the container was started
    ahead (a spare: namespaces, root filesystem, cgroup joined, a Python worker forked) and
    the run adopts it; otherwise everything happens after the request.
    """

    group = "pynsbook"

    def __init__(self, cell: str, prepared: bool = True, confined: bool = True) -> None:
        super().__init__()
        self.cell = cell
        self.prepared = prepared
        #: --privileged: the same container without capabilities cut, filter or masks
        self.options = dict(CONTAINER_OPTIONS, **({} if confined else {"privileged": True}))
        self.name = ("pynsbook-cold-" if prepared else "pynsbook-unprepared-") + \
            ("" if confined else "unconfined-") + ("pass" if cell == "pass" else "true")
        what = "Python cell `pass`" if cell == "pass" else "/bin/true"
        self.label = (f"pynsbook new container, {what}" + ("" if confined else ", privileged") +
                      (" (prepared ahead)" if prepared else " (nothing prepared)"))

    def once(self) -> None:
        from ..engine import pool
        from ..engine.container import run
        argv = "pass" if self.cell == "pass" else ["/bin/true"]
        if self.prepared:
            r = run(argv, **self.options)
        else:
            with pool.bypassed():
                r = run(argv, **self.options)
        _ok(r)


class PynsbookWarm(Subject):
    """A started container (cgroup, namespaces and init exist) running one more job."""

    group = "pynsbook"

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.cell = cell
        self.name = "pynsbook-warm-" + ("pass" if cell == "pass" else "true")
        what = "Python cell `pass`" if cell == "pass" else "/bin/true"
        self.label = f"pynsbook running container, {what}"
        self.container = None

    def setup(self) -> None:
        from ..engine.container import Container
        self.container = Container(**CONTAINER_OPTIONS).start()

    def once(self) -> None:
        c = self.container
        assert c is not None
        _ok(c.run("pass") if self.cell == "pass" else c.exec(["/bin/true"]))

    def teardown(self) -> None:
        if self.container is not None:
            self.container.stop()
            self.container = None


class PynsbookCommand(Subject):
    """``pynsbook run -- /bin/true`` as a user types it: a new process, timed from its start
    to its exit — the interpreter's start-up, the imports, the launcher, the container, its
    removal and the exit. The container has what the crun peer's has: a 64 MiB memory limit
    and the pid, net, ipc, uts and mount namespaces."""

    name = "pynsbook-cli-true"
    group = "pynsbook"
    ARGS = ["run", "--mem", "64M", "--ns", ",".join(FIVE), "--", "/bin/true"]

    def __init__(self) -> None:
        super().__init__()
        self.argv: List[str] = []
        self.label = "pynsbook run --mem 64M --ns " + ",".join(FIVE) + " -- /bin/true (process start to exit)"

    def check(self) -> Optional[str]:
        import sys
        script = os.path.join(os.path.dirname(sys.executable), "pynsbook")
        if os.access(script, os.X_OK):  # the command of this environment, as a user runs it
            self.argv = [script] + self.ARGS
        else:
            self.argv = [sys.executable, "-m", "pynsbook"] + self.ARGS
        self.meta["argv"] = self.argv
        if os.geteuid() != 0:
            return "needs root (the peers it is compared with run as root)"
        return None

    def once(self) -> None:
        spawn(self.argv)


def _ok(result: object) -> None:
    code = getattr(result, "exit_code", 0)
    if code != 0:
        err = (getattr(result, "stderr", "") or "").strip().splitlines()
        raise RuntimeError(f"the container's job exited with status {code}"
                           + (f": {err[-1]}" if err else ""))


# --------------------------------------------------------------------------- peers


class ExecPeer(Subject):
    group = "peer"

    def __init__(self, name: str, label: str, tool: str, args: Sequence[str]) -> None:
        super().__init__()
        self.name, self.label, self.tool, self.args = name, label, tool, list(args)
        self.path: Optional[str] = None

    def check(self) -> Optional[str]:
        self.path = shutil.which(self.tool)
        if not self.path:
            return f"{self.tool} is not installed"
        if os.geteuid() != 0 and self.name == "unshare":
            return "unshare -pfnmiu needs root"
        return None

    def once(self) -> None:
        assert self.path
        spawn([self.path, *self.args])


def unshare_peer() -> ExecPeer:
    return ExecPeer("unshare", "unshare -pfnmiu --mount-proc true", "unshare",
                    ["-pfnmiu", "--mount-proc", "true"])


def bwrap_peer() -> ExecPeer:
    return ExecPeer("bwrap", "bwrap --unshare-all (ro /, /proc, /dev) true", "bwrap",
                    ["--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc",
                     "--dev", "/dev", "/bin/true"])


from .oci import OCIPeer, WorkaroundCost  # noqa: E402  (uses spawn above)


# --------------------------------------------------------------------------- vm


class MicroVM(Subject):
    """QEMU microVM: from starting QEMU to the ready marker its init prints (host-measured)."""

    name, label, group = "microvm", "QEMU microVM boot to ready", "vm"
    max_repeat = 5
    max_warmup = 1

    def __init__(self, kernel_path: Optional[str] = None, memory_mb: int = 512) -> None:
        super().__init__()
        self.kernel_path = kernel_path
        self.memory_mb = memory_mb
        self.kernel = self.initramfs = None
        self.accel = "tcg"

    def check(self) -> Optional[str]:
        return vm_unavailable()

    def setup(self) -> None:
        from .. import vm
        self.kernel, self.initramfs = vm.prepare(self.kernel_path)
        self.accel = vm.choose_accel(self.kernel, self.initramfs)
        self.label = f"QEMU microVM boot to ready ({self.accel})"
        self.meta.update(accel=self.accel, kernel=str(getattr(self.kernel, "image", "")),
                         memory_mb=self.memory_mb, guest_uptime_at_ready=[], total_seconds=[])

    def once(self) -> float:
        from .. import vm
        r = vm.boot(self.kernel, self.initramfs, "true", accel=self.accel, timeout=180,
                    memory_mb=self.memory_mb)
        self.meta["guest_uptime_at_ready"].append(r.guest_uptime_at_ready)
        self.meta["total_seconds"].append(r.total_seconds)
        if not r.ok:
            raise RuntimeError(f"the VM's payload exited with status {r.exit_status}")
        return r.ready_seconds


def vm_unavailable() -> Optional[str]:
    """Why no microVM can boot here (QEMU or a static busybox missing), or None."""
    from .. import vm
    from ..vm.initramfs import find_busybox
    try:
        vm.find_qemu()
        find_busybox()
    except vm.VMError as err:
        return str(err)
    return None


def check_kernel(path: Optional[str]) -> None:
    """Raise BenchUsageError (one line) when ``path`` is given and is not a kernel."""
    if path is None:
        return
    from .. import vm
    try:
        vm.kernel_from_path(path)
    except vm.VMError as err:
        raise BenchUsageError(str(err).splitlines()[0] if str(err) else
                              f"not a usable kernel: {path}") from None
    except OSError as err:
        raise BenchUsageError(f"cannot read the kernel {path}: {err.strerror}") from None


# --------------------------------------------------------------------------- catalogue

Factory = Callable[..., Subject]
#: name -> (factory(kernel_path=...), one-line description); insertion order = chart order
STARTUP: Dict[str, Tuple[Factory, str]] = {}


def register(name: str, factory: Factory, description: str = "") -> None:
    """Add a startup subject (``factory(**opts) -> Subject``; opts has ``kernel_path``)."""
    STARTUP[name] = (factory, description or name)


register("fork", lambda **o: ForkExit(), "fork + _exit in this Python")
register("true", lambda **o: ExecTrue(), "fork + exec /bin/true")
register("floor", lambda **o: floor_subject(), "fork, unshare pid/mnt/uts/ipc/net, fork, mount /proc")
for _kind in ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"):
    register(f"ns-{_kind}", (lambda k: lambda **o: Unshare(f"ns-{k}", (k,), f"unshare {k} namespace"))(_kind),
             f"fork, unshare({_kind}), exit")
register("ns-all", lambda **o: Unshare("ns-all", tuple(libc.NS_FLAGS), "unshare all 8 namespaces"),
         "fork, unshare of all eight kinds, fork, exit")
register("pynsbook-cold-pass", lambda **o: PynsbookCold("pass"), "new container, Python `pass`")
register("pynsbook-cold-true", lambda **o: PynsbookCold("true"), "new container, /bin/true")
register("pynsbook-cold-unconfined-pass", lambda **o: PynsbookCold("pass", confined=False),
         "the same, --privileged: what confinement costs a prepared start")
register("pynsbook-cold-unconfined-true", lambda **o: PynsbookCold("true", confined=False),
         "new container, /bin/true, --privileged")
register("pynsbook-unprepared-pass", lambda **o: PynsbookCold("pass", prepared=False),
         "new container made after the request, Python `pass`")
register("pynsbook-unprepared-unconfined-pass",
         lambda **o: PynsbookCold("pass", prepared=False, confined=False),
         "the same, --privileged: what confinement costs a start from nothing")
register("pynsbook-cli-true", lambda **o: PynsbookCommand(),
         "the command `pynsbook run -- /bin/true`, process start to exit")
register("pynsbook-warm-pass", lambda **o: PynsbookWarm("pass"), "running container, Python `pass`")
register("pynsbook-warm-true", lambda **o: PynsbookWarm("true"), "running container, /bin/true")
register("unshare", lambda **o: unshare_peer(), "unshare -pfnmiu --mount-proc true")
register("bwrap", lambda **o: bwrap_peer(), "bwrap --unshare-all ... true")
register("crun", lambda **o: OCIPeer("crun"), "crun run /bin/true, 64 MiB")
register("crun-prep", lambda **o: WorkaroundCost(), "crun's hybrid workaround alone (its cost per crun run)")
register("runc", lambda **o: OCIPeer("runc"), "runc run /bin/true, 64 MiB")
register("microvm", lambda **o: MicroVM(o.get("kernel_path")), "QEMU microVM to ready marker")

#: group aliases accepted by --subjects
ALIASES = {
    "ns": [n for n in STARTUP if n.startswith("ns-")],
    "peers": ["unshare", "bwrap", "crun", "runc"],
    "baseline": ["fork", "true", "floor", "crun-prep"],
}


def _aliases() -> Dict[str, List[str]]:
    out = dict(ALIASES)
    out["pynsbook"] = [n for n in STARTUP if n.startswith("pynsbook")]
    out["all"] = list(STARTUP)
    return out


def parse_subjects(text: Optional[str], known: Sequence[str],
                   aliases: Optional[Dict[str, List[str]]] = None) -> List[str]:
    """``"a,b,peers"`` -> names, in the catalogue's order; one-line error when unknown."""
    if text is None or text.strip() in ("", "all"):
        return list(known)
    aliases = aliases or {}
    wanted: List[str] = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        if word in aliases:
            wanted += aliases[word]
        elif word in known:
            wanted.append(word)
        else:
            raise BenchUsageError(f"unknown subject {word!r}; known: {', '.join(known)}"
                                  + (f" (or {', '.join(sorted(aliases))})" if aliases else ""))
    if not wanted:
        raise BenchUsageError("--subjects names no subject")
    return [n for n in known if n in wanted]


def startup_subjects(names: Optional[str] = None, kernel_path: Optional[str] = None) -> List[Subject]:
    """Subjects for ``bench startup`` (all when ``names`` is None)."""
    chosen = parse_subjects(names, list(STARTUP), _aliases())
    if "microvm" in chosen:
        check_kernel(kernel_path)
    return [STARTUP[n][0](kernel_path=kernel_path) for n in chosen]
