"""The ``pynsbook`` command.

Each subcommand lives in the module that owns its feature and offers two functions:
``add_parser(subparsers)`` and ``main(args) -> int``. ``SUBCOMMANDS`` lists them; the
modules are imported only when their command runs (``pynsbook run`` stays quick).
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import signal
import sys
from typing import Any, Callable, Dict, List, Optional

from . import spec as spec_mod
from .errors import PynsbookError

EXIT_SETUP = 125  # the container could not be created (as docker run uses it)
EXIT_TIMEOUT = 124  # as timeout(1)


def _run_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("run", help="run a command in a new container",
                       description="Run CMD in a new container and exit with its status "
                                   "(137 and a message when it ran out of memory, 124 on timeout).",
                       epilog="examples:\n  pynsbook run --mem 64M -- python3 -c 'print(1)'\n"
                              "  pynsbook run --cpus 0.5 --pids 32 --hostname lab -- sh -c 'hostname; ps ax'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    spec_mod.add_arguments(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")


def _doctor_parser(sub: "argparse._SubParsersAction") -> None:
    d = sub.add_parser("doctor", help="what this host supports, and how to enable the rest")
    d.add_argument("--json", action="store_true", help="print the report as JSON")


#: command name -> module holding its add_parser() and main(); "" means this module
SUBCOMMANDS: Dict[str, str] = {
    "run": "",
    "doctor": "",
    "bench": ".bench.cli",
    "images": ".images.cli",
    "kernel": ".kernel",
}
_LOCAL = {"run": (_run_parser, lambda a: _cmd_run(a)), "doctor": (_doctor_parser, lambda a: _cmd_doctor(a))}


def _module(name: str) -> Any:
    return importlib.import_module(SUBCOMMANDS[name], __package__) if SUBCOMMANDS[name] else None


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pynsbook", description="Linux containers for notebooks: "
                                     "namespaces, cgroup limits and overlay roots.")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        if name in _LOCAL:
            _LOCAL[name][0](sub)
        elif only in (None, name):
            _module(name).add_parser(sub)
        else:  # listed in the help, parsed only when it is the command being run
            sub.add_parser(name, help=f"(see pynsbook {name} --help)", add_help=False)
    return parser


def echo(stream: Any) -> Callable[[str], None]:
    """A run callback that writes a container's output to ``stream`` as it arrives."""
    def write(text: str) -> None:
        if stream is None:  # started with that descriptor closed: the output goes nowhere
            return
        stream.write(text)
        stream.flush()
    return write


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cmd_run(args: argparse.Namespace) -> int:
    command: List[str] = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command and getattr(args, "image", None):  # the image's default command
        from .images import get
        command = list(get(args.image).config.cmd)
    if not command:
        raise _Usage("run needs a command after --, like: pynsbook run --mem 64M -- python3 -c 'print(1)'")
    spec = spec_mod.spec_from_args(args)
    # the launcher first: a fork of this (still single-threaded) process, whose imports run
    # beside ours instead of a new interpreter's start-up after them
    from .engine import spawn
    spawn.prestart(fork=True)
    from .engine.container import Container, Passthrough

    # the command's output goes out byte for byte (binary too), and is not kept in memory
    on_out = Passthrough(1) if sys.stdout is not None else None
    on_err = Passthrough(2) if sys.stderr is not None else None

    # SIGTERM to us stops the container the way Ctrl-C does: INT, TERM, then KILL
    signal.signal(signal.SIGTERM, _interrupt)
    with Container(spec=spec) as c:
        result = c.exec(command, on_stdout=on_out, on_stderr=on_err)
    for key, why in result.dropped.items():
        sys.stderr.write(f"pynsbook: {spec_mod.option(key).flag} not enforced: {why}\n")
    if result.oom_killed:
        sys.stderr.write(f"pynsbook: {result.describe()}\n")
        return 137
    if result.timed_out:
        sys.stderr.write(f"pynsbook: {result.describe()}\n")
        return EXIT_TIMEOUT
    return result.exit_code


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor
    report = doctor()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report)
    return 0


class _Usage(Exception):
    pass


def main(argv: Optional[List[str]] = None) -> int:
    """The command; ``argv`` None means this process is the ``pynsbook`` command itself
    (then ``run`` ends the process as soon as it is done: see _exit_now)."""
    as_command = argv is None
    argv = sys.argv[1:] if argv is None else argv
    only = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only if only in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    code = _main(parser, args)
    if as_command and args.cmd == "run":
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process now, doing what interpreter exit does that matters here — the
    atexit handlers (they stop what is left, and the launcher) and flushing the streams —
    without tearing down every imported module one by one, which costs a ``pynsbook run``
    tens of milliseconds after its work is done."""
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code & 0xFF)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.cmd in _LOCAL:
            return _LOCAL[args.cmd][1](args)
        return int(_module(args.cmd).main(args) or 0)
    except _Usage as err:
        parser.exit(2, f"pynsbook: {err}\n")
    except PynsbookError as err:
        sys.stderr.write(f"pynsbook: {err}\n")
        return 2 if isinstance(err, ValueError) else EXIT_SETUP
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
