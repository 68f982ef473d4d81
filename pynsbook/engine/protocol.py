"""Messages between pynsbook (the client) and the processes that serve a container.

SOCK_SEQPACKET sockets: each message is one JSON object, and file descriptors (the pipes of
a process, a memfd with its code) travel beside it (SCM_RIGHTS).

The container's socket joins the client to its shim and init while the container is made:
shim -> client: {"event": "map_ids", "pid"} (root only; the client writes the id maps and
answers {"op": "mapped"}), then {"event": "init", "pid": host PID of init};
init -> client: {"event": "ready"} or {"event": "error", "error": {...}}.
After that the socket is only the container's lifeline: when the client's end closes,
because it stopped the container, exited or was killed, init exits and every process of
the container ends with it.

Each run has a socket of its own, to the entrant that started it (entrant.py):
client -> entrant: {"op": "signal", "sig"}
entrant -> client: {"event": "started", "id", "host_pid", "entrant"}
                   {"event": "exited", "id", "code", "signal", "rusage"}
                   {"event": "error", "id", "error": {...}}
The request that starts a run ({"id", "argv"|"python"|"repl", "env", "workdir", "fds": roles,
...}) goes to the launcher, or through the run's socket on the slow path (spawn.py).
"""
from __future__ import annotations

import json
import os
import selectors
import socket
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

MAX_MESSAGE = 1 << 16
MAX_FDS = 8


def pair() -> Tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, message: Dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError("message too large; send big payloads through a memfd")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv(sock: socket.socket) -> Tuple[Optional[Dict[str, Any]], List[int]]:
    """One message and its fds; ``(None, [])`` when the other end closed."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


def messages(sock: socket.socket) -> Iterator[Dict[str, Any]]:
    """Every message until the other end closes (or the socket fails); fds are closed."""
    while True:
        try:
            msg, fds = recv(sock)
        except OSError:
            return
        for fd in fds:
            os.close(fd)
        if msg is None:
            return
        yield msg


def events(sock: socket.socket, wake_r: int) -> Iterator[Tuple[str, Optional[Dict[str, Any]], List[int]]]:
    """The loop of a process that serves one socket and wakes on signals through a signal
    wakeup pipe (``signal.set_wakeup_fd``): yields ``("signal", None, [])`` once the pipe
    is drained, or ``("message", msg, fds)``, msg None when the other end closed (or broke)."""
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "message")
    sel.register(wake_r, selectors.EVENT_READ, "signal")
    while True:
        for key, _ in sel.select():
            if key.data == "signal":
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    pass
                yield "signal", None, []
                continue
            try:
                msg, fds = recv(sock)
            except OSError:
                msg, fds = None, []
            yield "message", msg, fds


def hello(sock: socket.socket) -> None:
    """The launcher's first message: what this host lets this user do (probe.py), measured
    by forks of the launcher while it is fresh and single-threaded, so that the client
    plans its first container without starting an interpreter of its own for the probe."""
    try:
        from .. import probe
        raw: Optional[Dict[str, Any]] = probe.measure()
    except Exception:  # the client measures it itself then
        raw = None
    try:
        send(sock, {"event": "hello", "probe": raw})
    except OSError:
        pass  # the client is gone: the launcher's loop sees it


def payload_fd(data: bytes) -> int:
    """A sealed-size memory file holding ``data``, to pass code of any length."""
    fd = os.memfd_create("pynsbook-payload", os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_payload(fd: int) -> bytes:
    chunks = []
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
