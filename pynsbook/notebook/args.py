"""The command lines of the magics: the option table of ``pynsbook run`` plus the notebook's
own flags, parsed so that every mistake is one ``UsageError`` line; and the help texts
(``%%container?``) built from the same table, so they never drift from it.
"""
from __future__ import annotations

import argparse
import textwrap
from typing import List, Tuple

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser

from .. import spec as spec_mod
from ..errors import OptionError

#: flags only %%container has (name, metavar or None, help)
CELL_FLAGS: Tuple[Tuple[Tuple[str, ...], str, str], ...] = (
    (("-i", "--in"), "VAR",
     "send notebook variables into the container before the cell runs (pickled; "
     "with --bash, as environment variables)"),
    (("-o", "--out"), "VAR", "bring variables back into the notebook after the cell ran "
                             "(plain values and NumPy arrays; not pickled)"),
    (("--bash", "--sh"), "", "the cell is a shell script (/bin/sh), not Python"),
    (("--bg",), "", "start the container and return at once; its output keeps arriving "
                    "in this cell's output area"),
    (("--proc",), "VAR", "with --bg: store the background run's handle in this variable"),
    (("--stats",), "", "print a one-line summary after the run: wall, CPU, peak memory vs "
                       "limit, OOM"),
    (("--plot",), "", "draw the run's memory and CPU use after it ends"),
    (("--no-raise-error",), "", "do not raise when the container fails (OOM, non-zero exit, "
                                "timeout): print why and go on"),
)

CELL_EXAMPLES = """\
Examples::

    %%container --mem 64M --stats
    data = bytearray(100 * 2**20)        # more than 64M: killed: out of memory

    %%container --cpus 0.5 --pids 32 --hostname lab --bash
    hostname; ps ax; cat /sys/fs/cgroup/pids/pids.max

    %%container -i arr -o total
    total = arr.sum()                    # arr goes in pickled; total comes back as data

    %%container --name db --mem 256M
    rows = [1, 2, 3]                     # --name: the container and its Python live on

    %%container --name db
    print(len(rows))                     # ... so a later cell sees rows

    %%container --bg --proc job --timeout 60
    import time
    for i in range(30): print(i); time.sleep(1)
"""

LINE_EXAMPLES = """\
Examples::

    %container ls                  # running containers of this kernel
    %container stats db            # usage and limits of container db
    %container logs db             # what its cells printed
    %container stop db             # stop it (its processes, cgroup and mounts go)
    %container rm db               # stop it and forget its logs
    %container doctor              # what this host supports, and how to enable the rest
    %container images              # images in the store (pynsbook images busybox makes one)
    %container layers busybox      # an image's layers: size, files added/changed/deleted
    %container diff db             # what container db changed: A/C/D lines like docker diff
    %container commit db mine      # db's container layer becomes image mine
"""

CGROUP_DOC = """\
Show or change a cgroup::

    %cgroup                        # the kernel's own cgroup, and which limits apply to it
    %cgroup NAME                   # container NAME's cgroup: path, limits, usage
    %cgroup NAME memory=128M cpus=1.5 pids=64
                                   # change its limits while it runs

Keys: {keys}. Sizes like 64M or 1.5G; cpus like 0.5.
"""


class _Parser(MagicArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog}? for every option)")


def cell_parser() -> MagicArgumentParser:
    """The parser of ``%%container``: the shared option table plus the cell's own flags."""
    p = _Parser(prog="%%container", add_help=False,
                            description="Run the cell in a new Linux container.")
    spec_mod.add_arguments(p)
    p.add_argument("-i", "--in", dest="inputs", metavar="VAR", nargs="+", action="extend",
                   default=[], help=CELL_FLAGS[0][2])
    p.add_argument("-o", "--out", dest="outputs", metavar="VAR", nargs="+", action="extend",
                   default=[], help=CELL_FLAGS[1][2])
    p.add_argument("--bash", "--sh", dest="bash", action="store_true", help=CELL_FLAGS[2][2])
    p.add_argument("--bg", action="store_true", help=CELL_FLAGS[3][2])
    p.add_argument("--proc", metavar="VAR", help=CELL_FLAGS[4][2])
    p.add_argument("--stats", action="store_true", help=CELL_FLAGS[5][2])
    p.add_argument("--plot", action="store_true", help=CELL_FLAGS[6][2])
    p.add_argument("--no-raise-error", dest="raise_error", action="store_false",
                   help=CELL_FLAGS[7][2])
    return p


def parse_cell_line(line: str) -> Tuple[argparse.Namespace, spec_mod.Spec]:
    """``%%container`` options -> (flags, Spec). Every mistake is one UsageError line."""
    parser = cell_parser()
    try:
        args = parser.parse_argstring(line)
    except ValueError as err:  # unbalanced quotes
        raise UsageError(f"%%container: cannot split the options: {err}") from None
    for var in args.inputs + args.outputs + ([args.proc] if args.proc else []):
        if not var.isidentifier():
            raise UsageError(f"%%container: {var!r} is not a Python variable name")
    if args.proc and not args.bg:
        raise UsageError("%%container: --proc VAR goes with --bg")
    if args.bash and args.outputs:
        raise UsageError("%%container: -o works for Python cells only (a shell script has "
                         "no variables to bring back)")
    try:
        spec = spec_mod.spec_from_args(args)
    except OptionError as err:
        raise UsageError(f"%%container: {err}") from None
    return args, spec


def parse_limits(words: List[str]) -> dict:
    """``memory=128M cpus=1.5`` -> {"memory": "128M", "cpus": "1.5"} (values stay raw)."""
    out = {}
    for word in words:
        key, sep, value = word.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or not value:
            raise UsageError(f"%cgroup: expected key=value like memory=128M, got {word!r}")
        try:
            opt = spec_mod.option(key)
        except KeyError:
            raise UsageError(f"%cgroup: unknown limit {key!r}; limits: "
                             f"{', '.join(spec_mod.LIMIT_KEYS)}") from None
        if opt.key not in spec_mod.LIMIT_KEYS:
            raise UsageError(f"%cgroup: {key} cannot change while a container runs; limits "
                             f"that can: {', '.join(spec_mod.LIMIT_KEYS)}")
        out[opt.key] = value
    return out


def _option_lines() -> str:
    rows = []
    for opt in spec_mod.OPTIONS:
        flags = ", ".join(opt.flags) + ("" if opt.switch else f" {opt.metavar}")
        rows.append((flags, opt.help + (" (repeatable)" if opt.repeat and "repeat" not in opt.help else "")))
    for flags, metavar, text in CELL_FLAGS:
        rows.append((", ".join(flags) + (f" {metavar}..." if metavar and flags[0] in ("-i", "-o")
                                         else f" {metavar}" if metavar else ""), text))
    width = max(len(f) for f, _ in rows) + 2
    out = []
    for flags, text in rows:
        wrapped = textwrap.wrap(text, 88 - width) or [""]
        out.append(f"  {flags.ljust(width)}{wrapped[0]}")
        out += [" " * (width + 2) + more for more in wrapped[1:]]
    return "\n".join(out)


def cell_doc() -> str:
    return ("Run the cell in a new Linux container: its own PID namespace, hostname, mounts\n"
            "and network, under enforced cgroup limits. Output arrives line by line, stdout\n"
            "and stderr apart; the stop button stops the container; a failed container\n"
            "(OOM, non-zero exit, timeout) raises, so \"Run all\" stops there.\n\n"
            "::\n\n  %%container [OPTIONS]\n\nOptions (the same as `pynsbook run`):\n\n"
            + _option_lines() + "\n\n" + CELL_EXAMPLES)


def line_doc() -> str:
    return ("Manage the containers of this kernel::\n\n"
            "  %container ls | stop NAME | rm NAME | stats NAME | logs NAME | doctor\n"
            "  %container images | layers IMAGE | diff NAME | commit NAME IMAGE\n\n"
            + LINE_EXAMPLES + "\nA named container is made by `%%container --name NAME`; "
            "see `%%container?` for every option.\n")


def cgroup_doc() -> str:
    return CGROUP_DOC.format(keys=", ".join(spec_mod.LIMIT_KEYS))
