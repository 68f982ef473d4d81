"""Starting a container's shim, and the entrant of each run: forked by the warm launcher
(fast), or as new Python processes (the slow path, when the launcher cannot run or
``PYNSBOOK_LAUNCHER=0``).

Both give the client the same handle: ``pid``, ``wait(timeout)``, ``kill()``,
``stderr_text()`` and ``close()``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
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


class LauncherClient:
    """The client's end of the warm launcher (one per process, started on first use)."""

    def __init__(self) -> None:
        ours, theirs = protocol.pair()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "pynsbook.engine.launcher", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_child_env(),
                start_new_session=True, cwd="/")
        finally:
            theirs.close()
        self.sock = ours
        self.lock = threading.Lock()
        self.shims: Dict[int, Shim] = {}
        self.replies: "list[Dict[str, Any]]" = []
        self.reply_ready = threading.Condition()
        self.alive = True
        threading.Thread(target=self._read, name="pynsbook-launcher", daemon=True).start()

    def _read(self) -> None:
        for msg in protocol.messages(self.sock):
            if msg.get("event") == "exited":
                shim = self.shims.pop(msg["pid"], None)
                if shim:
                    shim._set_exit(msg["status"])
                continue
            with self.reply_ready:
                self.replies.append(msg)
                self.reply_ready.notify_all()
        self.alive = False
        with self.reply_ready:
            self.reply_ready.notify_all()
        # nobody reports these containers' ends now: their shims are long gone (each handed
        # its init over), so say "ended" at once; each container's lifeline says the rest
        for shim in list(self.shims.values()):
            shim._set_exit(-1)

    def spawn(self, cfg: Dict[str, Any], child: socket.socket) -> Optional[Shim]:
        """Fork a shim in the launcher; None if the launcher is gone."""
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        with self.lock:
            if not self.alive:
                os.close(err_r)
                os.close(err_w)
                return None
            try:
                protocol.send(self.sock, {"op": "spawn", "cfg": cfg}, [child.fileno(), err_w])
            except OSError:
                os.close(err_r)
                os.close(err_w)
                return None
            finally:
                if err_w >= 0:
                    os.close(err_w)
            with self.reply_ready:
                while not self.replies and self.alive:
                    self.reply_ready.wait(5)
                reply = self.replies.pop(0) if self.replies else None
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

    def close(self) -> None:
        """Let the launcher go: it leaves once the inits it took over have ended (their
        lifelines close with this process) and their cgroups are removed."""
        # shutdown first: the reader thread blocked in recvmsg() holds the open file, so a
        # bare close() would not end the connection, and the launcher would wait for our exit
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass  # not killed: it would leave those cgroups behind


_launcher: Optional[LauncherClient] = None
_launcher_lock = threading.Lock()


def _get_launcher() -> Optional[LauncherClient]:
    global _launcher
    if os.environ.get("PYNSBOOK_LAUNCHER", "1") == "0":
        return None
    with _launcher_lock:
        if _launcher is None or not _launcher.alive:
            try:
                _launcher = LauncherClient()
            except OSError:
                return None
        return _launcher


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
    protocol.send(ours, req, fds)
    return popen


def launcher_pid() -> Optional[int]:
    """The PID of this process's warm launcher, if one runs (it ends when we do)."""
    return _launcher.popen.pid if _launcher is not None and _launcher.alive else None


def shutdown() -> None:
    """Stop the launcher (at interpreter exit, after the containers)."""
    global _launcher
    if _launcher is not None:
        _launcher.close()
        _launcher = None
