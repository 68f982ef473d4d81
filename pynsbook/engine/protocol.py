"""Messages between pynsbook (the client) and a container's init (the daemon).

One SOCK_SEQPACKET socket per container: each message is one JSON object, and file
descriptors (the pipes of a process, a memfd with its code) travel beside it (SCM_RIGHTS).
The socket's end in the client is the container's lifeline: when it closes, because the
client exited or was killed, init kills everything in the container and exits.

client -> init                      init -> client
  {"op": "exec", "id", "argv"|"code",  {"event": "ready"}
   "env", "workdir", "python"}        {"event": "started", "id", "pid"}
   + fds [stdin, stdout, stderr, code]{"event": "exited", "id", "code", "signal", "rusage"}
  {"op": "signal", "id"|None, "sig"}  {"event": "error", "error": {...}}
  {"op": "stop"}
shim -> client: {"event": "map_ids", "pid"} (root only; the client writes the id maps and
answers {"op": "mapped"}), then {"event": "init", "pid": host PID of init}.
"""
from __future__ import annotations

import json
import os
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
