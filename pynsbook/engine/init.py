"""The container's init: PID 1 inside the PID namespace.

It finishes the container (cgroup, namespaces, hostname, loopback, root filesystem), and
then only waits (saying ``ready`` first): runs enter the container from outside (entrant.py). Waiting
is done by the small compiled init (tinyinit.c) when there is one, else by :func:`idle`:
reap every orphan, and when the client's socket closes, exit — which, as PID 1, takes the
whole PID namespace with it.
"""
from __future__ import annotations

import os
import signal
import socket
from typing import Any, Dict

from ..linux import libc, netns
from . import confine, protocol, tiny
from .shim import _fail


def setup(cfg: Dict[str, Any]) -> None:
    """Everything between fork and ready, in the order the kernel requires."""
    if not cfg.get("handoff"):
        # the shim (staying, on the slow path) died: so does the container. A handed-over
        # init sets none: the shim's exit would send it (the kernel sends it when the
        # parent exits, and a flag set just before the hand-over catches that exit); its
        # lifeline ends it instead; if the launcher died, the client removes the cgroup when
        # it stops the container (a client that died too: the next session reaps it).
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    for path in cfg["cgroup_join"]:  # join before unsharing the cgroup namespace
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
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
                    cfg.get("upper"), cfg.get("copy_root"), cfg.get("keep") or (),
                    mask_paths=cfg.get("mask_paths", True),
                    read_only=cfg.get("read_only", False)).build()


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)


def idle(sock: socket.socket) -> None:
    """What the small init does, in Python: reap every process that ends, pass signals on
    to every process of the PID namespace, and exit when the client's socket closes.
    Never returns."""
    def reap(*_: object) -> None:
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    return
            except ChildProcessError:
                return

    def forward(signum: int, _frame: object) -> None:
        if os.getpid() == 1:  # kill(-1) from PID 1: every process of this namespace only
            os.kill(-1, signum)

    signal.signal(signal.SIGCHLD, reap)
    for sig in FORWARDED:
        signal.signal(sig, forward)
    reap()
    while True:
        try:
            if not sock.recv(512):  # the handler reaps while we wait (PEP 475 retries)
                break
        except OSError:
            break
    os._exit(0)


def init_main(sock: socket.socket, cfg: Dict[str, Any]) -> None:
    try:
        confine.prepare(cfg.get("init_confine"))  # on the host's files, before the pivot
        setup(cfg)
        # built: from here on the init holds no more than the processes it waits for.
        # The small init also makes itself untraceable after its exec; this Python one
        # cannot: its memory still belongs to the host's user namespace (a fork keeps its
        # parent's), so an unprivileged user's entrants could no longer open its namespaces
        confine.apply(cfg.get("init_confine"))
    except BaseException as err:  # any failure: report it and leave
        _fail(sock, err)
    program = tiny.load()
    if program is not None:  # it says "ready" itself, so a started container is idle in it
        tiny.become(program, ["init", sock.fileno()], keep=[sock.fileno()])
    try:
        protocol.send(sock, {"event": "ready"})
        idle(sock)
    finally:
        os._exit(1)
