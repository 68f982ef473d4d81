"""The shim: the first process of a container, started by the client as
``python -m pynsbook.engine.shim FD``. Fork protocol:

  client                    shim (host PID ns)                  init (PID 1 of the container)
  Popen(shim) ──config──▶   unshare(user) ─map_ids─▶ client writes uid/gid maps ─mapped─▶
                            unshare(pid, time); set uptime
                            fork ───────────────────────────▶  join cgroup; unshare(mnt, uts,
                            ─init pid─▶ client                  ipc, net, cgroup); hostname, lo,
                            waitpid(init); remove the cgroups;  root filesystem ─ready─▶ client
                            exit with init's status             wait for the client's socket
                                                               to close (runs enter from
                                                               outside: entrant.py)

The shim stays outside the new PID namespace, where init's parent can wait for it. Forked by
the launcher, the shim exits right after forking init and the launcher (a child subreaper)
inherits init: it waits for it and removes the cgroups, and reports the container's end to
the client. On the slow path the shim itself waits, in the small compiled program
(tiny.py) when there is one. Either way init becomes that program once the container is
built: an idle container holds one process of a few KiB.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Any, Dict, List

from ..cgroups.base import remove_tree
from ..errors import ContainerError
from ..linux import ids, libc
from . import protocol, tiny


def _fail(sock: socket.socket, err: BaseException) -> "None":
    if isinstance(err, OSError) and not isinstance(err, ContainerError):
        err = ContainerError(f"container setup: {err.strerror or err}", err.errno)
    payload = err.to_dict() if hasattr(err, "to_dict") else {"kind": "ContainerError",
                                                             "message": f"container setup: {err}"}
    try:
        protocol.send(sock, {"event": "error", "error": payload})
    finally:
        os._exit(125)


def enter_user_and_pid(sock: socket.socket, cfg: Dict[str, Any]) -> None:
    ns = set(cfg["namespaces"])
    if "user" in ns:
        libc.unshare(libc.CLONE_NEWUSER)
        if cfg["map_by_client"]:
            protocol.send(sock, {"event": "map_ids", "pid": os.getpid()})
            reply, _ = protocol.recv(sock)
            if not reply or reply.get("op") != "mapped":
                os._exit(125)
        else:
            ids.write_id_maps("self", f"0 {cfg['uid']} 1", f"0 {cfg['gid']} 1", deny_setgroups=True)
    flags = (libc.CLONE_NEWPID if "pid" in ns else 0) | (libc.CLONE_NEWTIME if "time" in ns else 0)
    if flags:
        libc.unshare(flags)
    if "time" in ns and cfg.get("uptime") is not None:
        ids.set_uptime(float(cfg["uptime"]))


def remove_cgroups(dirs: List[str]) -> None:
    """The container is over: empty and delete its cgroups, even if the client is gone
    (a killed kernel). Only the directories pynsbook created for this container."""
    for d in dirs:
        try:
            remove_tree(d)  # processes are left only without a PID namespace, or nested
        except OSError:
            pass
    for session in {os.path.dirname(d) for d in dirs}:
        try:
            os.rmdir(session)  # the session's last container: the client may be gone too
            os.rmdir(os.path.dirname(session))  # and pynsbook's own, the last session's
        except OSError:
            pass


HANDED_OVER = 0  # the shim's exit status when the launcher takes its init over


def run_shim(sock: socket.socket, cfg: Dict[str, Any]) -> None:
    """Everything the shim does once it has its configuration. Never returns.

    Forked by the launcher (``cfg["handoff"]``), the shim exits as soon as init exists: the
    launcher, a child subreaper, inherits init, waits for it and removes the cgroups. Started
    as its own process (the slow path), it stays and does that itself."""
    program = tiny.load()  # before the fork: the init becomes it too
    handoff = bool(cfg.get("handoff"))
    try:
        enter_user_and_pid(sock, cfg)
        pid = os.fork()
    except OSError as err:
        _fail(sock, err)
        return
    if pid == 0:
        from .init import init_main
        init_main(sock, cfg)  # never returns
    try:
        protocol.send(sock, {"event": "init", "pid": pid})
    except OSError:
        pass  # the client is gone: init sees that on the same socket, and ends
    sock.close()
    if handoff:
        os._exit(HANDED_OVER)
    dirs = cfg.get("cgroup_dirs") or []
    if program is not None:  # wait (and clean up) in a few kilobytes, not a Python fork
        tiny.become(program, ["shim", pid] + dirs)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    remove_cgroups(dirs)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status)
             else 128 + os.WTERMSIG(status))


def main(fd: int) -> None:
    """Started as its own process (``python -m pynsbook.engine.shim FD``): the slow path,
    used when the warm launcher is not available."""
    sock = socket.socket(fileno=fd)
    cfg, _ = protocol.recv(sock)
    if cfg is None:
        os._exit(125)
    run_shim(sock, cfg)


if __name__ == "__main__":
    main(int(sys.argv[1]))
