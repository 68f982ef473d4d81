"""A process the container runs, from fork to exec (or to the end of the Python code).

Python code runs in this forked, already initialised interpreter instead of a new
``python3``: that saves the interpreter's start-up on every run, and works on any root
filesystem, even one without Python. A *persistent* Python process (``repl``) keeps one
``__main__`` across many requests, so a named container remembers its variables.

The exec request names its file descriptors by role in ``msg["fds"]`` (an index into the
fds that came with it): stdin, stdout, stderr, code, inputs, outputs, repl.
"""
from __future__ import annotations

import io
import os
import pickle
import resource
import signal
import socket
import sys
import threading
import traceback
import types
from typing import Any, Dict, List, Optional

from ..linux import libc
from . import confine, protocol, values

_RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                  signal.SIGUSR2, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ)
_RLIMITS = {"nproc": resource.RLIMIT_NPROC, "data": resource.RLIMIT_DATA,
            "as": resource.RLIMIT_AS}


def _fd(msg: Dict[str, Any], fds: List[int], role: str) -> Optional[int]:
    index = (msg.get("fds") or {}).get(role)
    return None if index is None else fds[index]


def _close_all_but(keep: List[int]) -> None:
    low = 3
    for fd in sorted(set(keep)):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 16)


def _prepare(msg: Dict[str, Any], fds: List[int]) -> None:
    signal.set_wakeup_fd(-1)
    # what init handles, and what Python ignores at start-up (a command expects defaults)
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    os.setsid()
    _redirect(msg, fds)
    # keep only what this process uses: not the control socket, not init's wakeup pipe
    _close_all_but([fd for fd in (_fd(msg, fds, r) for r in ("code", "inputs", "outputs", "repl"))
                    if fd is not None])
    for name, value in (msg.get("rlimits") or {}).items():
        resource.setrlimit(_RLIMITS[name], (int(value), int(value)))
    if msg.get("cpus_affinity"):
        os.sched_setaffinity(0, msg["cpus_affinity"])
    _chdir(msg)
    os.environ.clear()
    os.environ.update(msg.get("env") or {})
    confine.apply(msg.get("confine"))  # last: it takes away what the steps above use
    libc.prctl(libc.PR_SET_DUMPABLE, 1)  # confined now: as traceable as its peers


def _chdir(msg: Dict[str, Any]) -> None:
    """An asked-for working directory is made if missing (as docker run -w does); the
    default one (the notebook's) may not exist here, and then it is /."""
    workdir = msg.get("workdir") or "/"
    if msg.get("workdir_asked"):
        os.makedirs(workdir, exist_ok=True)
    try:
        os.chdir(workdir)
    except OSError:
        if msg.get("workdir_asked"):
            raise
        os.chdir("/")


def _redirect(msg: Dict[str, Any], fds: List[int]) -> None:
    for target, role in enumerate(("stdin", "stdout", "stderr")):
        fd = _fd(msg, fds, role)
        if fd is not None:
            os.dup2(fd, target)


def _python_streams() -> None:
    """Fresh streams on fds 0-2: UTF-8 whatever the locale, and line-buffered, so output
    reaches the notebook as it is printed."""
    sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)


def _new_main() -> types.ModuleType:
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    sys.argv = ["-c"]
    return main


def _exec_code(code: str, namespace: Dict[str, Any]) -> int:
    """Run ``code`` as ``python -c`` would; the exit status as python would give it."""
    try:
        exec(compile(code, "<container>", "exec"), namespace)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code & 0xFF
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        etype, value, tb = sys.exc_info()
        traceback.print_exception(etype, value, tb.tb_next if tb else None)
        return 1
    return 0


def _load_inputs(fd: Optional[int], namespace: Dict[str, Any]) -> None:
    if fd is not None:
        namespace.update(pickle.loads(protocol.read_payload(fd)))


def _dump_outputs(fd: Optional[int], names: List[str], namespace: Dict[str, Any]) -> None:
    """Write the named variables into the client's memfd, in the data-only format of
    :mod:`.values` (never pickle: the host must be able to read it without running it);
    say which could not be sent, and why."""
    if fd is None:
        return
    data = memoryview(values.encode_outputs(names, namespace))
    os.ftruncate(fd, 0)
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], done)


def _wait_for_threads() -> None:
    try:
        getattr(threading, "_shutdown", lambda: None)()  # non-daemon threads, as at exit
    except BaseException:
        pass


def _run_python(msg: Dict[str, Any], fds: List[int]) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _python_streams()
    main = _new_main()
    code = protocol.read_payload(_fd(msg, fds, "code")).decode("utf-8")  # type: ignore[arg-type]
    _load_inputs(_fd(msg, fds, "inputs"), main.__dict__)
    status = _exec_code(code, main.__dict__)
    _wait_for_threads()
    _dump_outputs(_fd(msg, fds, "outputs"), msg.get("outputs") or [], main.__dict__)
    return status


def _apply_process_settings(req: Dict[str, Any]) -> None:
    """A request's environment, directory and fallback limits, for a worker forked before
    the request existed (a one-shot worker)."""
    if "env" in req:
        os.environ.clear()
        os.environ.update(req["env"])
    if req.get("workdir"):
        _chdir(req)
    for name, value in (req.get("rlimits") or {}).items():
        resource.setrlimit(_RLIMITS[name], (int(value), int(value)))
    if req.get("cpus_affinity"):
        os.sched_setaffinity(0, req["cpus_affinity"])


def _repl(msg: Dict[str, Any], fds: List[int]) -> int:
    """A Python worker: run each request's code in the same ``__main__``.

    Persistent workers serve many requests (a named container's state). One-shot workers
    are forked ahead of need and serve one request marked ``last``, which takes the fork
    off the path of a run (a fork of the interpreter costs milliseconds; sending it code,
    a fraction of one). Each request brings its own stdio pipes; between requests fds 0-2
    point at /dev/null, so the client sees end-of-file exactly when a request is done.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sock = socket.socket(fileno=_fd(msg, fds, "repl"))  # type: ignore[arg-type]
    main = _new_main()
    null = os.open("/dev/null", os.O_RDWR)
    while True:
        try:
            req, rfds = protocol.recv(sock)
        except KeyboardInterrupt:
            continue  # a late Ctrl-C for a request that already finished
        if req is None:
            return 0
        status = 1
        try:
            _apply_process_settings(req)
            _redirect(req, rfds)
            _python_streams()
            code = protocol.read_payload(_fd(req, rfds, "code")).decode("utf-8")  # type: ignore[arg-type]
            _load_inputs(_fd(req, rfds, "inputs"), main.__dict__)
            status = _exec_code(code, main.__dict__)
            _dump_outputs(_fd(req, rfds, "outputs"), req.get("outputs") or [], main.__dict__)
        except KeyboardInterrupt:
            traceback.print_exc()
        finally:
            _flush()
            for target in (0, 1, 2):
                os.dup2(null, target)
            for fd in rfds:
                os.close(fd)
        if req.get("last"):
            _wait_for_threads()
        protocol.send(sock, {"id": req["id"], "status": status})
        if req.get("last"):
            return status


def _flush() -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass  # a closed pipe: nobody is reading any more


def _exec_argv(argv: List[str]) -> int:
    try:
        os.execvpe(argv[0], argv, dict(os.environ))
    except FileNotFoundError:
        sys.stderr.write(f"pynsbook: {argv[0]}: command not found in the container\n")
        return 127
    except PermissionError:
        sys.stderr.write(f"pynsbook: {argv[0]}: permission denied (not executable?)\n")
        return 126
    except OSError as err:
        sys.stderr.write(f"pynsbook: cannot run {argv[0]}: {err.strerror}\n")
        return 126
    return 127


def run_workload(msg: Dict[str, Any], fds: List[int]) -> None:
    """In the forked child: set up fds and limits, then exec or run the code. Never returns."""
    status = 127
    try:
        _prepare(msg, fds)
        if msg.get("repl"):
            status = _repl(msg, fds)
        elif msg.get("python"):
            status = _run_python(msg, fds)
        else:
            status = _exec_argv(msg["argv"])
    except BaseException as err:  # setup in the child failed: say so on its stderr
        try:
            sys.stderr.write(f"pynsbook: could not start the process: {err}\n")
        except BaseException:
            pass
    finally:
        _flush()
        os._exit(status)
