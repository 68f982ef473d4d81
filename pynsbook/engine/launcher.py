"""The warm launcher: one single-threaded process per client that forks container shims.

Starting a shim as a new ``python`` costs tens of milliseconds of interpreter start-up and
imports; forking it from a process that has already imported everything costs about one.
The client never forks itself (a Jupyter kernel runs several threads, and a fork there can
deadlock on a lock another thread held): it asks the launcher, over one SOCK_SEQPACKET
socket.

client -> launcher: {"op": "spawn", "cfg": {...}} + fds [container socket, stderr pipe]
                    {"op": "enter", "cfg", "msg"} + fds [run socket, the run's fds...]
                    (a run in a running container: forks an entrant, no reply; the
                    entrant reports on the run's socket)
launcher -> client: {"event": "spawned", "pid"} / {"event": "spawn_failed", "error"}
                    {"event": "exited", "pid", "status"}  (a shim ended: exit status)
When the client's socket closes, the launcher exits; each container still ends through its
own socket, as on the slow path.
"""
from __future__ import annotations

import gc
import os
import selectors
import signal
import socket
import sys
from typing import Any, Dict, List

from . import protocol
# imported now, so that forked shims, inits and workloads find them already loaded
from . import init as _init  # noqa: F401
from . import tiny
from . import workload as _workload  # noqa: F401
from ..linux import libc
from ..linux import rootfs as _rootfs  # noqa: F401
from .entrant import run_entrant
from .shim import run_shim


class Launcher:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.children: Dict[int, bool] = {}

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # only the client's socket ends us
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "sock")
        sel.register(self.wake_r, selectors.EVENT_READ, "signal")
        while True:
            for key, _ in sel.select():
                if key.data == "signal":
                    try:
                        os.read(self.wake_r, 512)
                    except BlockingIOError:
                        pass
                    self._reap()
                    continue
                try:
                    msg, fds = protocol.recv(self.sock)
                except OSError:
                    msg, fds = None, []
                if msg is None:
                    os._exit(0)
                if msg.get("op") == "spawn":
                    self._spawn(msg["cfg"], fds)
                elif msg.get("op") == "enter" and fds:
                    self._enter(msg, fds)
                else:
                    for fd in fds:
                        os.close(fd)

    def _spawn(self, cfg: Dict[str, Any], fds: List[int]) -> None:
        container_fd, stderr_fd = fds[0], fds[1]
        try:
            pid = os.fork()
        except OSError as err:
            protocol.send(self.sock, {"event": "spawn_failed", "error": str(err)})
            for fd in fds:
                os.close(fd)
            return
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                os.setsid()
                os.dup2(stderr_fd, 2)
                self.sock.close()
                os.close(self.wake_r)
                os.close(self.wake_w)
                os.close(stderr_fd)
                run_shim(socket.socket(fileno=container_fd), cfg)
            finally:
                os._exit(125)
        for fd in fds:
            os.close(fd)
        self.children[pid] = True
        protocol.send(self.sock, {"event": "spawned", "pid": pid})

    def _enter(self, req: Dict[str, Any], fds: List[int]) -> None:
        try:
            pid = os.fork()
        except OSError as err:
            sock = socket.socket(fileno=fds[0])
            try:
                protocol.send(sock, {"event": "error", "id": req["msg"]["id"], "error": {
                    "kind": "ContainerError", "message": f"could not start a process: {err}"}})
            except OSError:
                pass
            sock.close()
            for fd in fds[1:]:
                os.close(fd)
            return
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                self.sock.close()
                os.close(self.wake_r)
                os.close(self.wake_w)
                libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)  # we died: so does it
                run_entrant(socket.socket(fileno=fds[0]), req, fds[1:])
            finally:
                os._exit(125)
        for fd in fds:
            os.close(fd)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.children.pop(pid, None) is None:
                continue  # an entrant: it reported on its run's socket
            code = os.waitstatus_to_exitcode(status)
            protocol.send(self.sock, {"event": "exited", "pid": pid,
                                      "status": code if code >= 0 else 128 - code})


def main(fd: int) -> None:
    # everything imported now lives as long as the process: keep the garbage collector
    # off it, so forked children do not copy the pages it would touch (copy-on-write)
    gc.freeze()
    tiny.load()  # compiled once per machine; shims and inits exec it from this descriptor
    Launcher(socket.socket(fileno=fd)).serve()


if __name__ == "__main__":
    main(int(sys.argv[1]))
