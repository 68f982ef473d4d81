"""Starting a container's shim, and the entrant of each run: forked by the warm launcher
(fast), or as new Python processes (the slow path, when the launcher cannot run or
``PYNSBOOK_LAUNCHER=0``).

Both give the client the same handle: ``pid``, ``wait(timeout)``, ``kill()``,
``stderr_text()`` and ``close()``.

The launcher itself is a new interpreter (``python -m pynsbook.engine.launcher``), started
before the first container is planned (:func:`prepare`: it measures the host probe the plan
needs), or, for the ``pynsbook`` command only, a fork of the command made while it is still
single-threaded (:func:`prestart`). It ends once its client has closed the connection
(shut down first: a reader thread's pending recv would keep a bare close from ending it)
and every container it spawned is over; the client waits for that at exit.
"""
from __future__ import annotations

import fcntl
import gc
import itertools
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Optional

from . import protocol

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Shim:
    """A running container, known by its shim's PID: its end (reported by the launcher once
    the init has exited and the cgroups are gone, or the shim's own exit on the slow path)
    means the container is gone."""

    def __init__(self, pid: int, stderr_fd: int, launcher: Optional["LauncherClient"] = None) -> None:
        self.pid = pid
        self.launcher = launcher
        self._stderr_fd = stderr_fd
        self._exited = threading.Event()
        self.returncode: Optional[int] = None

    def _set_exit(self, status: int) -> None:
        self.returncode = status
        self._exited.set()

    def poll(self) -> Optional[int]:
        """The exit status if the shim has ended, else None."""
        return self.returncode if self._exited.is_set() else None

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired("pynsbook shim", timeout or 0)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self._exited.is_set():
            return
        if self.launcher is not None:
            # its launcher owns these PIDs (the shim's is reaped once it hands init over):
            # kill through it, or, with the launcher gone, not at all (the lifeline ends init)
            if self.launcher.alive:
                self.launcher.kill(self.pid)
            return
        try:  # a shim of the slow path: our child, not reaped yet
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stderr_text(self) -> str:
        """What the shim and init wrote to stderr (read once the shim has exited)."""
        if self._stderr_fd < 0:
            return ""
        os.set_blocking(self._stderr_fd, False)
        try:
            return os.read(self._stderr_fd, 65536).decode(errors="replace")
        except BlockingIOError:
            return ""

    def close(self) -> None:
        if self._stderr_fd >= 0:
            os.close(self._stderr_fd)
            self._stderr_fd = -1


class PopenShim(Shim):
    def __init__(self, child: socket.socket) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "pynsbook.engine.shim", str(child.fileno())],
            pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=_child_env(), start_new_session=True, cwd="/")
        super().__init__(self.popen.pid, self.popen.stderr.fileno())  # type: ignore[union-attr]

    def poll(self) -> Optional[int]:
        self.returncode = self.popen.poll()
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        self.returncode = self.popen.wait(timeout)
        self._exited.set()
        return self.returncode

    def kill(self) -> None:
        if self.popen.returncode is None:
            self.popen.kill()

    def close(self) -> None:
        if self.popen.stderr:
            self.popen.stderr.close()
        self._stderr_fd = -1


class _ForkedLauncher:
    """A launcher forked from this process (see :func:`prestart`): the part of Popen that
    LauncherClient uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: it has ended all the same
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            pidfd = os.pidfd_open(self.pid)  # readable once it has ended
        except OSError:  # reaped already (poll says so), or no pidfds: poll in short steps
            pidfd = -1
        try:
            while self.poll() is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired("pynsbook launcher", timeout or 0)
                if pidfd >= 0:
                    select.select([pidfd], [], [], left)
                else:
                    time.sleep(0.005 if left is None else min(0.005, left))
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        return self.returncode  # type: ignore[return-value]


_kept: "list[Any]" = []  # in a forked launcher: what it took over from its caller


def _fork_launcher(ours: socket.socket, theirs: socket.socket) -> _ForkedLauncher:
    """Fork this process into the launcher. Only for a single-threaded process whose open
    descriptors the launcher must not keep are nothing but its stdio (the ``pynsbook``
    command, first thing): no new interpreter starts, and the launcher's imports run beside
    the caller's."""
    env = _child_env()
    pid = os.fork()
    if pid:
        return _ForkedLauncher(pid)
    try:
        # nothing of the caller's may be freed here: an object finalised later would close
        # a descriptor number the launcher has reused by then
        gc.freeze()
        ours.close()
        keep = theirs.detach()
        if keep < 3:  # (the caller's stdio was closed) stdio is about to become /dev/null
            keep, old = fcntl.fcntl(keep, fcntl.F_DUPFD_CLOEXEC, 3), keep
            os.close(old)
        os.setsid()  # as start_new_session: no terminal's Ctrl-C reaches it
        os.chdir("/")
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        # the streams a new interpreter would have (the caller's may be None, or hold its
        # buffered output); the caller's stay referenced, so none is ever finalised here
        _kept.extend((sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__,
                      sys.__stderr__))
        sys.stdin = sys.__stdin__ = open(0, "r", closefd=False)
        sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)
        sys.stderr = sys.__stderr__ = open(2, "w", errors="backslashreplace", closefd=False)
        os.closerange(3, keep)
        os.closerange(keep + 1, 1 << 20)  # what a new interpreter would not have inherited
        os.environ.clear()
        os.environ.update(env)
        sock = socket.socket(fileno=keep)
        protocol.hello(sock)  # the probe first: the client plans while we import
        from . import launcher
        launcher.main(sock.detach(), greeted=True)
    finally:
        os._exit(125)


class LauncherClient:
    """The client's end of the warm launcher (one per process, started on first use).

    The launcher's first message is its hello, with the host probe (probe.py) it measured
    as it started; then it answers each spawn request (``seq`` pairs them) and reports the
    end of each container it spawned."""

    def __init__(self, fork: bool = False) -> None:
        ours, theirs = protocol.pair()
        try:
            if fork:
                self.popen: Any = _fork_launcher(ours, theirs)
            else:
                self.popen = subprocess.Popen(
                    [sys.executable, "-m", "pynsbook.engine.launcher", str(theirs.fileno())],
                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_child_env(),
                    start_new_session=True, cwd="/")
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.lock = threading.Lock()
        self.shims: Dict[int, Shim] = {}
        self.replies: Dict[int, Dict[str, Any]] = {}  # spawn replies, by request
        self.waiting: "set[int]" = set()  # requests someone waits for (others' replies go)
        self.reply_ready = threading.Condition()
        self._seq = itertools.count(1)
        self.hello: Optional[Dict[str, Any]] = None
        self.alive = True
        try:  # whose cgroups to remove if we die without saying bye
            from ..cgroups.base import session_name
            protocol.send(ours, {"op": "client", "session": session_name()})
        except OSError:
            pass  # gone already: the reader finds out
        threading.Thread(target=self._read, name="pynsbook-launcher", daemon=True).start()

    def _read(self) -> None:
        for msg in protocol.messages(self.sock):
            if msg.get("event") == "exited":
                shim = self.shims.pop(msg["pid"], None)
                if shim:
                    shim._set_exit(msg["status"])
                continue
            with self.reply_ready:
                if msg.get("event") == "hello":
                    self.hello = msg
                elif msg.get("seq") in self.waiting:
                    self.replies[msg["seq"]] = msg
                self.reply_ready.notify_all()
        self.alive = False
        with self.reply_ready:
            self.reply_ready.notify_all()
        # nobody reports these containers' ends now: their shims are long gone (each handed
        # its init over), so say "ended" at once; each container's lifeline says the rest
        for shim in list(self.shims.values()):
            shim._set_exit(-1)

    def probe(self, timeout: float = 10.0) -> Optional[Dict[str, Any]]:
        """The host probe the launcher measured as it started (None: it did not say)."""
        with self.reply_ready:
            self.reply_ready.wait_for(lambda: self.hello is not None or not self.alive, timeout)
            return (self.hello or {}).get("probe")

    def spawn(self, cfg: Dict[str, Any], child: socket.socket) -> Optional[Shim]:
        """Fork a shim in the launcher; None if the launcher is gone."""
        with self.lock:
            if not self.alive:
                return None
            seq = next(self._seq)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            with self.reply_ready:
                self.waiting.add(seq)
            try:
                try:
                    protocol.send(self.sock, {"op": "spawn", "cfg": cfg, "seq": seq},
                                  [child.fileno(), err_w])
                finally:
                    os.close(err_w)  # the launcher has its own copy now (or never will)
                with self.reply_ready:
                    self.reply_ready.wait_for(lambda: seq in self.replies or not self.alive)
            except OSError:
                os.close(err_r)
                return None
            except BaseException:  # interrupted: the reply, when it comes, is dropped
                os.close(err_r)
                raise
            finally:
                with self.reply_ready:
                    self.waiting.discard(seq)
                    reply = self.replies.pop(seq, None)
            if not reply or reply.get("event") != "spawned":
                os.close(err_r)
                return None
            shim = Shim(reply["pid"], err_r, self)
            self.shims[shim.pid] = shim
            return shim

    def kill(self, shim_pid: int) -> None:
        """SIGKILL the container of that shim (by PIDs the launcher owns)."""
        with self.lock:
            try:
                protocol.send(self.sock, {"op": "kill", "pid": shim_pid})
            except OSError:
                pass

    def enter(self, req: Dict[str, Any], fds: "list[int]") -> bool:
        """Ask the launcher to fork an entrant for a run (no reply: the entrant answers on
        the run's socket, ``fds[0]``); False if the launcher is gone."""
        with self.lock:
            if not self.alive:
                return False
            try:
                protocol.send(self.sock, req, fds)
            except OSError:
                return False
            return True

    def close(self, wait: bool = True) -> None:
        """Let the launcher go: it leaves once the inits it took over have ended (their
        lifelines close with this process) and their cgroups are removed. ``wait``: for
        that, up to 5 s."""
        if self.lock.acquire(timeout=1):  # (a start stuck waiting for its reply: no bye)
            try:
                protocol.send(self.sock, {"op": "bye"})  # we let it go: we did not die
            except OSError:
                pass
            finally:
                self.lock.release()
        # shutdown first: the reader thread blocked in recvmsg() holds the open file, so a
        # bare close() would not end the connection, and the launcher would wait for our exit
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if not wait:
            self.popen.poll()
            return
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass  # not killed: it would leave those cgroups behind


_launcher: Optional[LauncherClient] = None
_launcher_lock = threading.Lock()


def _get_launcher(fork: bool = False) -> Optional[LauncherClient]:
    global _launcher
    if os.environ.get("PYNSBOOK_LAUNCHER", "1") == "0":
        return None
    with _launcher_lock:
        if _launcher is None or not _launcher.alive:
            if _launcher is not None:
                _launcher.close(wait=False)  # it ended: release our end
            try:
                _launcher = LauncherClient(fork=fork)
            except OSError:
                _launcher = None
        return _launcher


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def prestart(fork: bool = False) -> None:
    """Start this process's launcher now, before a container needs it, so that its start
    overlaps with the caller's own work. ``fork``: fork this process into it instead of
    starting a new interpreter — only for a caller that owns its whole process and holds no
    descriptor but its stdio (the ``pynsbook`` command, first thing); never done while
    another thread runs."""
    _get_launcher(fork=fork and _single_threaded())


def prepare() -> None:
    """Before a container is planned: start the launcher (if this process uses one) and take
    the host probe it measures as it starts, instead of starting an interpreter for it."""
    from .. import probe
    launcher = _get_launcher()
    if launcher is not None and not probe.measured():
        raw = launcher.probe()
        if raw is not None:
            probe.seed(raw)


def start_shim(cfg: Dict[str, Any], child: socket.socket, use_launcher: bool = True) -> Shim:
    """Start a shim for a container whose socket end is ``child`` and send it ``cfg``
    (the launcher passes it in the spawn request; the slow path over the socket)."""
    launcher = _get_launcher() if use_launcher else None
    shim = launcher.spawn(cfg, child) if launcher else None
    if shim is not None:
        return shim
    shim = PopenShim(child)
    return shim


def start_entrant(req: Dict[str, Any], ours: socket.socket, theirs: socket.socket,
                  fds: "list[int]") -> Optional[subprocess.Popen]:
    """Start the process that runs ``req`` in a running container (entrant.py): forked by
    the launcher (None), or a new Python process on the slow path, which reads the request
    from the run's socket (its Popen, for the caller to wait for). ``fds`` stay open for the
    caller to close."""
    launcher = _get_launcher()
    if launcher is not None and launcher.enter(req, [theirs.fileno()] + list(fds)):
        return None
    popen = subprocess.Popen(
        [sys.executable, "-m", "pynsbook.engine.entrant", str(theirs.fileno())],
        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=None, env=_child_env(), cwd="/", start_new_session=True)
    try:
        protocol.send(ours, req, fds)
    except BaseException:
        popen.kill()  # it would wait for a request that never comes
        popen.wait()
        raise
    return popen


def launcher_lost() -> bool:
    """Whether this process's launcher ended without being asked to (killed)."""
    return _launcher is not None and not _launcher.alive


def launcher_pid() -> Optional[int]:
    """The PID of this process's warm launcher, if one runs (it ends when we do)."""
    return _launcher.popen.pid if _launcher is not None and _launcher.alive else None


def shutdown() -> None:
    """Stop the launcher (at interpreter exit, after the containers)."""
    global _launcher
    if _launcher is not None:
        _launcher.close()
        _launcher = None
