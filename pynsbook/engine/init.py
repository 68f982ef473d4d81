"""The container's init: PID 1 inside the PID namespace.

It finishes the container (cgroup, namespaces, hostname, loopback, root filesystem), then
serves the client: each ``exec`` request forks a process with the pipes the client sent.
Like any init it reaps every orphan and forwards the signals it gets to its processes;
when the client's socket closes it kills everything and exits, which (as PID 1) takes the
whole PID namespace with it.
"""
from __future__ import annotations

import gc
import os
import selectors
import signal
import socket
import sys
from typing import Any, Dict, List, Optional

from ..linux import libc, netns
from . import protocol
from .shim import _fail
from .workload import run_workload  # now: after pivot_root pynsbook's files may be gone

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
              signal.SIGUSR2)
_HANDLED = _FORWARDED + (signal.SIGCHLD,)


def setup(cfg: Dict[str, Any]) -> None:
    """Everything between fork and ready, in the order the kernel requires."""
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)  # the shim died: so does the container
    for path in cfg["cgroup_join"]:  # join before unsharing the cgroup namespace
        with open(path, "w") as f:
            f.write("0")
    ns = set(cfg["namespaces"])
    flags = 0
    for name in ("mnt", "uts", "ipc", "net", "cgroup"):
        if name in ns:
            flags |= libc.NS_FLAGS[name]
    if flags:
        libc.unshare(flags)
    if "uts" in ns:
        socket.sethostname(cfg["hostname"])
    if "net" in ns:
        netns.loopback_up()
    if "mnt" in ns:
        from ..linux.rootfs import RootBuilder
        RootBuilder(cfg.get("lowers"), sorted(ns), cfg.get("cgroup_mounts") or [],
                    cfg.get("upper"), cfg.get("copy_root"), cfg.get("keep") or ()).build()


class Init:
    def __init__(self, sock: socket.socket, cfg: Dict[str, Any]) -> None:
        self.sock = sock
        self.cfg = cfg
        self.jobs: Dict[int, str] = {}  # pid -> request id
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in _HANDLED:
            signal.signal(sig, lambda *_: None)  # wakes the loop through the wakeup fd

    def serve(self) -> None:
        self._install_signals()
        self.sel.register(self.sock, selectors.EVENT_READ, "sock")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "signal")
        protocol.send(self.sock, {"event": "ready"})
        while True:
            for key, _ in self.sel.select():
                if key.data == "signal":
                    self._on_signals()
                elif not self._on_message():
                    self._shutdown()

    def _on_signals(self) -> None:
        try:
            data = os.read(self.wake_r, 512)
        except BlockingIOError:
            data = b""
        for signum in set(data):
            if signum == signal.SIGCHLD:
                continue
            self._signal_jobs(signum)
        self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            rid = self.jobs.pop(pid, None)
            if rid is None:
                continue  # an orphan that was reparented to us: reaped, nothing to report
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            code = 128 + sig if sig else os.WEXITSTATUS(status)
            protocol.send(self.sock, {"event": "exited", "id": rid, "code": code, "signal": sig,
                                      "rusage": {"utime": ru.ru_utime, "stime": ru.ru_stime,
                                                 "maxrss": ru.ru_maxrss * 1024}})

    def _signal_jobs(self, signum: int, rid: Optional[str] = None) -> None:
        for pid, job in list(self.jobs.items()):
            if rid is None or job == rid:
                try:
                    os.killpg(pid, signum)  # each job leads its own session and group
                except (ProcessLookupError, PermissionError):
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        pass

    def _on_message(self) -> bool:
        try:
            msg, fds = protocol.recv(self.sock)
        except (ConnectionError, OSError):
            return False
        if msg is None:
            return False
        op = msg.get("op")
        if op == "exec":
            self._exec(msg, fds)
        elif op == "signal":
            self._signal_jobs(int(msg["sig"]), msg.get("id"))
            for fd in fds:
                os.close(fd)
        elif op == "hostname":  # a spare container adopted by a start that names it
            socket.sethostname(msg["name"])
        elif op == "stop":
            return False
        return True

    def _exec(self, msg: Dict[str, Any], fds: List[int]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_workload(msg, fds)  # never returns
        for fd in fds:
            os.close(fd)
        self.jobs[pid] = msg["id"]
        protocol.send(self.sock, {"event": "started", "id": msg["id"], "pid": pid})

    def _shutdown(self) -> None:
        self._signal_jobs(signal.SIGKILL)
        # without a PID namespace our exit does not kill the jobs' children: the client
        # empties the cgroup afterwards
        os._exit(0)


def init_main(sock: socket.socket, cfg: Dict[str, Any]) -> None:
    try:
        setup(cfg)
    except BaseException as err:  # any failure: report it and leave
        _fail(sock, err)
    gc.freeze()  # as in the launcher: workloads forked from here copy fewer pages
    try:
        Init(sock, cfg).serve()
    finally:
        os._exit(1)
