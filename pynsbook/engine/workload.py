"""A process the container runs, from fork to exec (or to the end of the Python code).

Python code runs in this forked, already initialised interpreter instead of a new
``python3``: that saves the interpreter's start-up on every run, and works on any root
filesystem, even one without Python.
"""
from __future__ import annotations

import io
import os
import resource
import signal
import sys
import threading
import traceback
import types
from typing import Any, Dict, List

from . import protocol

_RLIMITS = {"nproc": resource.RLIMIT_NPROC, "data": resource.RLIMIT_DATA,
            "as": resource.RLIMIT_AS}


def _prepare(msg: Dict[str, Any], fds: List[int]) -> bytes:
    signal.set_wakeup_fd(-1)
    for sig in range(1, signal.NSIG):
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    os.setsid()
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    payload = protocol.read_payload(fds[3]) if len(fds) > 3 else b""
    os.closerange(3, 1 << 16)  # the control socket, the wakeup pipe and the sent fds
    for name, value in (msg.get("rlimits") or {}).items():
        resource.setrlimit(_RLIMITS[name], (int(value), int(value)))
    if msg.get("cpus_affinity"):
        os.sched_setaffinity(0, msg["cpus_affinity"])
    workdir = msg.get("workdir") or "/"
    try:
        os.chdir(workdir)
    except OSError:
        os.chdir("/")
    return payload


def _run_python(code: str) -> int:
    """Run ``code`` as ``python -c`` would: as __main__, exit status from SystemExit."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # fresh streams on fds 0-2: UTF-8 whatever the locale, and line-buffered so output
    # reaches the notebook as it is printed
    sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    sys.argv = ["-c"]
    status = 0
    try:
        exec(compile(code, "<container>", "exec"), main.__dict__)
    except SystemExit as exc:
        if exc.code is None:
            status = 0
        elif isinstance(exc.code, int):
            status = exc.code & 0xFF
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException:
        etype, value, tb = sys.exc_info()
        traceback.print_exception(etype, value, tb.tb_next if tb else None)
        status = 1
    try:
        getattr(threading, "_shutdown", lambda: None)()  # wait for non-daemon threads
    except BaseException:
        pass
    return status


def run_workload(msg: Dict[str, Any], fds: List[int]) -> None:
    """In the forked child: set up fds and limits, then exec or run the code. Never returns."""
    status = 127
    try:
        payload = _prepare(msg, fds)
        os.environ.clear()
        os.environ.update(msg.get("env") or {})
        if msg.get("python"):
            status = _run_python(payload.decode("utf-8"))
        else:
            argv = msg["argv"]
            try:
                os.execvpe(argv[0], argv, dict(os.environ))
            except FileNotFoundError:
                sys.stderr.write(f"pynsbook: {argv[0]}: command not found in the container\n")
                status = 127
            except PermissionError:
                sys.stderr.write(f"pynsbook: {argv[0]}: permission denied (not executable?)\n")
                status = 126
            except OSError as err:
                sys.stderr.write(f"pynsbook: cannot run {argv[0]}: {err.strerror}\n")
                status = 126
    except BaseException as err:  # setup in the child failed: say so on its stderr
        try:
            sys.stderr.write(f"pynsbook: could not start the process: {err}\n")
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(status)
