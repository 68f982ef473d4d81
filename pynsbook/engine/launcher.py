"""The warm launcher: one single-threaded process per client that forks container shims.

Starting a shim as a new ``python`` costs tens of milliseconds of interpreter start-up and
imports; forking it from a process that has already imported everything costs about one.
The client never forks itself (a Jupyter kernel runs several threads, and a fork there can
deadlock on a lock another thread held): it asks the launcher, over one SOCK_SEQPACKET
socket. (The ``pynsbook`` command, single-threaded as it starts, forks itself into its
launcher instead of starting a new interpreter for it: spawn.prestart.)

client -> launcher: {"op": "client", "session"}  (first: its cgroup session, see _leave)
                    {"op": "spawn", "cfg": {...}, "seq"} + fds [container socket, stderr pipe]
                    {"op": "enter", "cfg", "msg"} + fds [run socket, the run's fds...]
                    (a run in a running container: forks an entrant, no reply; the
                    entrant reports on the run's socket)
                    {"op": "kill", "pid"}  (SIGKILL the container of that shim)
                    {"op": "bye"}  (last, before the client closes its end)
launcher -> client: {"event": "hello", "probe": {...} or None} (first: the host probe of
                    probe.py, measured by forks of this fresh process)
                    {"event": "spawned", "pid", "seq"} / {"event": "spawn_failed", "error",
                    "seq"} (``seq`` names the request answered)
                    {"event": "exited", "pid", "status"}  (a container ended: its init's
                    exit status, after its cgroups were removed)

The launcher is a child subreaper: each shim hands its init over to it and exits, so an idle
container holds one small process, not two. The launcher then waits for the init (it knows
it by its session, which is the shim's PID) and removes the container's cgroups, as the
shim did.
When the client's socket closes, each container ends through its own socket (its lifeline),
and the launcher leaves once it has removed what the last of them left.
"""
from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
from typing import Any, Dict, List, Optional, Set

from . import confine, protocol
# imported now, so that forked shims, inits and workloads find them already loaded
from . import init as _init  # noqa: F401
from . import tiny
from . import workload as _workload  # noqa: F401
from ..linux import libc, procfs
from ..linux import rootfs as _rootfs  # noqa: F401
from .entrant import run_entrant
from .shim import remove_cgroups, run_shim


class _Shim:
    """What the launcher remembers of a container it spawned, until its init has ended."""

    def __init__(self, dirs: List[str]) -> None:
        self.dirs = dirs
        self.handed_over = False  # the shim exited 0: its init is ours to wait for


class Launcher:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.children: Dict[int, _Shim] = {}  # by the shim's PID (= the init's session)
        self.entrants: Set[int] = set()  # each waits for a run (reaped before we leave)
        self.session: Optional[str] = None  # the client's cgroup session (its first message)
        self.bye = False  # the client let us go (else it died: see _leave)
        self.closing = False

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # only the client's socket ends us
        for kind, msg, fds in protocol.events(self.sock, self.wake_r):
            if kind == "signal":
                self._reap()
            elif msg is None:  # the client is gone: its inits end (their lifelines closed)
                break
            elif msg.get("op") == "spawn":
                self._spawn(msg["cfg"], fds, msg.get("seq"))
            elif msg.get("op") == "enter" and fds:
                self._enter(msg, fds)
            elif msg.get("op") == "client":
                self.session = str(msg.get("session") or "") or None
            elif msg.get("op") == "bye":
                self.bye = True
            else:
                if msg.get("op") == "kill":
                    self._kill(int(msg["pid"]))
                for fd in fds:
                    os.close(fd)
        self.closing = True  # remove what the last inits leave, then go
        while True:
            self._reap()
            select.select([self.wake_r], [], [])
            try:
                os.read(self.wake_r, 512)
            except BlockingIOError:
                pass

    def _in_child(self) -> None:
        """First thing in a forked shim or entrant: default signals, none of our fds."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        self.sock.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def _spawn(self, cfg: Dict[str, Any], fds: List[int], seq: Any = None) -> None:
        container_fd, stderr_fd = fds[0], fds[1]
        try:
            pid = os.fork()
        except OSError as err:
            self._tell({"event": "spawn_failed", "error": str(err), "seq": seq})
            for fd in fds:
                os.close(fd)
            return
        if pid == 0:
            try:
                self._in_child()
                os.setsid()  # the session (the shim's PID) names its init to us later
                cfg["handoff"] = True
                os.dup2(stderr_fd, 2)
                os.close(stderr_fd)
                run_shim(socket.socket(fileno=container_fd), cfg)
            finally:
                os._exit(125)
        for fd in fds:
            os.close(fd)
        self.children[pid] = _Shim(list(cfg.get("cgroup_dirs") or []))
        self._tell({"event": "spawned", "pid": pid, "seq": seq})

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
                self._in_child()
                libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)  # we died: so does it
                run_entrant(socket.socket(fileno=fds[0]), req, fds[1:])
            finally:
                os._exit(125)
        self.entrants.add(pid)
        for fd in fds:
            os.close(fd)

    def _tell(self, msg: Dict[str, Any]) -> None:
        """Report to the client; if it is gone, go on removing what its containers leave."""
        if self.closing:
            return
        try:
            protocol.send(self.sock, msg)
        except OSError:
            self.closing = True

    def _members(self, shim: int) -> List[int]:
        """The container's init (session = the shim's PID): the shim's child before the
        hand-over, ours after. PIDs of unreaped children cannot be reused meanwhile."""
        return [p for p in procfs.children(shim) + procfs.children(os.getpid())
                if p != shim and procfs.session(p) == shim]

    def _kill(self, shim: int) -> None:
        """SIGKILL a container: its shim and its init, whether handed over yet or not."""
        if shim not in self.children:
            return
        for pid in ([] if self.children[shim].handed_over else [shim]) + self._members(shim):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        while True:
            try:  # look before reaping: a zombie init still tells its session
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
            if info is None:
                break
            pid = info.si_pid
            owner = procfs.session(pid)
            _, status = os.waitpid(pid, 0)
            self.entrants.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            code = code if code >= 0 else 128 - code
            shim = self.children.get(pid)
            if shim is not None:  # a shim ended
                if self._members(pid):
                    # its init lives on, reparented to us before the shim could be reaped
                    # (also when the shim failed, or was killed, after forking it)
                    shim.handed_over = True
                    continue
            elif owner in self.children and owner != pid:  # a handed-over init ended
                pid, shim = owner, self.children[owner]
            else:
                continue  # an entrant (it reported on its run's socket), or an orphan
            remove_cgroups(shim.dirs)  # the container is over (or never was)
            del self.children[pid]
            self._tell({"event": "exited", "pid": pid, "status": code})
        if self.closing and not self.children and not self.entrants:
            self._leave()

    def _leave(self) -> None:
        """The client is gone and every container we spawned is over: go. A client that
        died instead of saying bye (SIGKILL) may have left cgroups no container of ours
        took over (killed while starting one): its session's go too, now rather than at
        some later start's clean-up of dead sessions."""
        if not self.bye and self.session and "/" not in self.session \
                and self.session not in (".", ".."):
            try:
                from .. import cgroups
                from ..cgroups.base import remove_tree
                for top in cgroups.backend().tops():
                    session = os.path.join(top, self.session)
                    if os.path.isdir(session):
                        remove_tree(session)
                    try:
                        os.rmdir(top)  # pynsbook's own, if that was the last session
                    except OSError:
                        pass
            except Exception:
                pass
        os._exit(0)


def main(fd: int, greeted: bool = False) -> None:
    sock = socket.socket(fileno=fd)
    if not greeted:  # (a launcher forked from its client said hello before its imports)
        protocol.hello(sock)
    # everything imported now lives as long as the process: keep the garbage collector
    # off it, so forked children do not copy the pages it would touch (copy-on-write)
    gc.freeze()
    tiny.load()  # compiled once per machine; shims and inits exec it from this descriptor
    confine.warm()  # the default seccomp filter, compiled once for every fork to share
    libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)  # the inits that shims hand over are ours
    Launcher(sock).serve()


if __name__ == "__main__":
    main(int(sys.argv[1]))
