"""Entering a running container to run one process in it (as ``nsenter`` or ``runc exec``).

Every run of a container goes this way, so the container itself holds nothing but a small
init while it is idle. The launcher forks an *entrant* per run; the entrant

1. opens the container's namespaces through its init's ``/proc/PID/ns`` (and checks that
   PID is still that init, by its start time) and the files that join its cgroup;
2. enters its user namespace (setns wants CAP_SYS_ADMIN in the caller's own user namespace
   too: an unprivileged user has it only in there), then its PID and time namespaces (they
   apply to children), and forks the run's process;
3. in that child: joins the cgroup through files opened outside (the cgroup namespace
   would hide the way in), enters the other namespaces in nsenter's order, sets a hostname
   the client asked for, and becomes the workload (workload.run_workload); the entrant
   reports ``started`` once the child is in;
4. serves the client on the run's own socket, as an init would: ``started`` and ``exited``
   (with rusage) events, ``signal`` requests for the run's process group; when the client's
   end closes, it kills the group and leaves.

The entrant stays outside the container's cgroup and its other namespaces: only the run is
counted against the container's limits.

client -> entrant: {"op": "signal", "sig"}
entrant -> client: {"event": "started", "id", "host_pid", "entrant"}
                   {"event": "exited", "id", "code", "signal", "rusage"}
                   {"event": "error", "error": {...}} (the run could not start)
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from typing import Any, Dict, List

from ..errors import ContainerError, ContainerStateError
from ..linux import libc, procfs
from . import confine, protocol
from .workload import run_workload

#: what the run's process enters, in nsenter's order (mnt late: it changes the root)
ORDER = ("cgroup", "ipc", "uts", "net", "mnt")


def _open_namespaces(cfg: Dict[str, Any]) -> Dict[str, int]:
    init = int(cfg["init_pid"])
    fds = {}
    for kind in cfg["namespaces"]:
        fds[kind] = os.open(f"/proc/{init}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
    # the PID was the container's init when we opened its namespaces only if it still is
    if procfs.start_time(init) != cfg["init_start"]:
        raise ProcessLookupError(f"the container's init ({init}) has ended")
    return fds


def _child(cfg: Dict[str, Any], ns: Dict[str, int], joins: List[int], msg: Dict[str, Any],
           fds: List[int], inside: int) -> None:
    """In the fork: join, enter, say so on ``inside`` (by closing it), become the run.
    Never returns."""
    try:
        # until it is confined (workload.py) it holds the entrant's powers inside the
        # container: not dumpable, so no process there may ptrace it, even with SYS_PTRACE
        libc.prctl(libc.PR_SET_DUMPABLE, 0)
        for fd in joins:
            os.write(fd, b"0")  # this process has one thread: it moves whole
        for kind in ORDER:
            if kind in ns:
                libc.setns(ns[kind], libc.NS_FLAGS[kind])
        if msg.get("hostname"):
            socket.sethostname(msg["hostname"])
    except OSError as err:  # told to the entrant, which reports it as the run's error
        os.write(inside, f"could not enter the container: {err.strerror or err}".encode())
        os._exit(125)
    for fd in list(ns.values()) + joins + [inside]:
        os.close(fd)
    run_workload(msg, fds)  # never returns


class Entrant:
    def __init__(self, sock: socket.socket, rid: str) -> None:
        self.sock = sock
        self.rid = rid
        self.pid = 0
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def start(self, cfg: Dict[str, Any], msg: Dict[str, Any], fds: List[int]) -> None:
        confine.prepare(msg.get("confine"))  # on the host's files, before entering
        ns = _open_namespaces(cfg)
        joins = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in cfg.get("cgroup_join") or ()]
        for kind in ("user", "pid", "time"):  # pid and time apply to the children we make
            if kind in ns:
                libc.setns(ns.pop(kind), libc.NS_FLAGS[kind])
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        sys.stdout.flush()
        sys.stderr.flush()
        inside_r, inside_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError as err:
            os.close(inside_r)
            os.close(inside_w)
            # a PID namespace whose init has died takes no new process: fork says ENOMEM
            gone = procfs.start_time(int(cfg["init_pid"])) != cfg["init_start"]
            if err.errno == errno.ENOMEM and gone:
                raise ContainerStateError("the container has ended") from None
            raise
        if pid == 0:
            signal.set_wakeup_fd(-1)
            self.sock.close()
            os.close(inside_r)
            _child(cfg, ns, joins, msg, fds, inside_w)
        for fd in list(ns.values()) + joins + fds + [inside_w]:
            os.close(fd)
        # "started" means in the cgroup and the namespaces: what it uses from now on counts
        failed = os.read(inside_r, 4096)
        os.close(inside_r)
        self.pid = pid
        if failed:
            os.waitpid(pid, 0)
            raise ContainerError(failed.decode(errors="replace"))
        protocol.send(self.sock, {"event": "started", "id": self.rid, "host_pid": pid,
                                  "entrant": os.getpid()})

    def serve(self) -> None:
        if self._reaped():
            return
        for kind, msg, rfds in protocol.events(self.sock, self.wake_r):
            for fd in rfds:
                os.close(fd)
            if kind == "message":
                if msg is None:  # the client is gone, or stopped the container
                    self._signal(signal.SIGKILL)
                    return
                if msg.get("op") == "signal":
                    self._signal(int(msg["sig"]))
            if self._reaped():
                return

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)  # the run leads its own session and group
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def _reaped(self) -> bool:
        try:
            pid, status, ru = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = 128 + sig if sig else os.WEXITSTATUS(status)
        protocol.send(self.sock, {"event": "exited", "id": self.rid, "code": code, "signal": sig,
                                  "rusage": {"utime": ru.ru_utime, "stime": ru.ru_stime,
                                             "maxrss": ru.ru_maxrss * 1024}})
        return True


def run_entrant(sock: socket.socket, req: Dict[str, Any], fds: List[int]) -> None:
    """Everything an entrant does, given the client's request. Never returns."""
    status = 0
    try:
        entrant = Entrant(sock, str(req["msg"]["id"]))
        try:
            entrant.start(req["cfg"], req["msg"], fds)
        except Exception as err:  # whatever it is, the client hears of it
            if isinstance(err, ContainerError):
                payload = err.to_dict()
            elif isinstance(err, (ProcessLookupError, FileNotFoundError)):
                payload = ContainerStateError("the container has ended").to_dict()
            elif isinstance(err, OSError):
                payload = ContainerError(f"could not run in the container: {err.strerror or err}",
                                         err.errno).to_dict()
            else:  # a bug of ours: say what it was rather than vanish
                payload = ContainerError(f"could not run in the container: "
                                         f"{type(err).__name__}: {err}").to_dict()
            protocol.send(sock, {"event": "error", "id": req["msg"]["id"], "error": payload})
            status = 125
            return
        entrant.serve()
    except OSError:
        status = 1  # the client's socket broke: nobody to report to
    finally:
        os._exit(status)


def main(fd: int) -> None:
    """Started as its own process (``python -m pynsbook.engine.entrant FD``): the slow path,
    when the warm launcher is not available. The request comes over the socket first."""
    sock = socket.socket(fileno=fd)
    req, fds = protocol.recv(sock)
    if req is None:
        os._exit(125)
    run_entrant(sock, req, fds)


if __name__ == "__main__":
    main(int(sys.argv[1]))
