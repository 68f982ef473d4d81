"""IPython magics: ``%%container``, ``%container`` and ``%cgroup`` (``%load_ext pynsbook``).

The work is done in ``pynsbook.notebook``: ``args`` (command lines and help, from the one
option table), ``cellrun`` (running a cell), ``cgroupview`` (cgroup tables), ``plot``.
"""
from __future__ import annotations

from typing import Any, Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from .engine.container import containers
from .errors import OptionError
from .notebook import args as args_mod
from .notebook import cellrun, cgroupview
from .notebook.table import Table

__all__ = ["ContainerMagics", "ContainerFailed", "load_ipython_extension",
           "unload_ipython_extension"]

ContainerFailed = cellrun.ContainerFailed


def _get(name: str) -> Any:
    try:
        return containers()[name]
    except KeyError:
        running = ", ".join(sorted(containers())) or "none"
        raise UsageError(f"no running container named {name!r} (running: {running}; "
                         "name one with %%container --name NAME)") from None


#: image commands: the words they take, as help shows them
_IMAGE_COMMANDS = {"images": [], "layers": ["IMAGE"], "diff": ["NAME"], "commit": ["NAME", "IMAGE"]}


def _image_command(cmd: str, rest: list) -> Any:
    """``%container images | layers IMAGE | diff NAME | commit NAME IMAGE``."""
    from . import images
    words = _IMAGE_COMMANDS[cmd]
    if len(rest) != len(words):
        usage = " ".join(["%container", cmd] + words)
        raise UsageError(f"%container {cmd} takes {len(words) or 'no'} argument"
                         f"{'s' if len(words) != 1 else ''}: {usage}")
    try:
        if cmd == "images":
            return images.table()
        if cmd == "layers":
            return images.layers_table(rest[0])
        if cmd == "diff":
            return images.diff(_get(rest[0]))
        image = images.commit(_get(rest[0]), rest[1])
        print(f"pynsbook: committed {rest[0]}'s container layer as image {rest[1]} "
              f"({len(image.layers)} layers)")
        return None
    except (images.ImageError, OptionError) as err:
        raise UsageError(str(err)) from None


@magics_class
class ContainerMagics(Magics):
    """The pynsbook magics. ``%%container?``, ``%container?`` and ``%cgroup?`` explain each."""

    @cell_magic("container")
    def container_cell(self, line: str, cell: str) -> Optional[cellrun.CellRun]:
        args, spec = args_mod.parse_cell_line(line)
        run = cellrun.CellRun(self.shell, cell, args, spec)
        if not args.bg:
            run.run()
            return None
        run.start()
        cellrun.remember(run)
        if args.proc:
            self.shell.user_ns[args.proc] = run
        print(f"pynsbook: container {run.container.name} runs in the background"
              + (f"; its handle is {args.proc} (.wait(), .stop(), .result)" if args.proc else ""))
        return None

    container_cell.__doc__ = args_mod.cell_doc()

    @line_magic("container")
    def container_line(self, line: str) -> Any:
        words = line.split()
        if not words:
            raise UsageError("%container needs a command: ls, stop NAME, rm NAME, stats NAME, "
                             "logs NAME or doctor (see %container?)")
        cmd, rest = words[0], words[1:]
        if cmd in ("ls", "doctor") and rest:
            raise UsageError(f"%container {cmd} takes no arguments")
        if cmd == "ls":
            return self._ls()
        if cmd == "doctor":
            from .doctor import doctor
            return doctor()
        if cmd in ("stop", "rm", "stats", "logs"):
            if len(rest) != 1:
                raise UsageError(f"%container {cmd} takes one container name, like "
                                 f"%container {cmd} db")
            name = rest[0]
            if cmd == "logs":
                if name not in cellrun.LOGS and name not in containers():
                    raise UsageError(f"no container named {name!r} has printed anything")
                print("".join(cellrun.LOGS.get(name, ())), end="")
                return None
            if cmd == "stats":
                return cgroupview.container_table(_get(name))
            if cmd == "rm":
                cellrun.LOGS.pop(name, None)
                if name not in containers():
                    return None
            _get(name).stop()
            return None
        if cmd in _IMAGE_COMMANDS:
            return _image_command(cmd, rest)
        if cmd == "panel":
            if len(rest) != 1:
                raise UsageError("%container panel takes one container name, like "
                                 "%container panel db")
            from .widgets import ContainerPanel
            return ContainerPanel(_get(rest[0]))
        raise UsageError(f"%container: unknown command {cmd!r}; commands: ls, stop NAME, "
                         "rm NAME, stats NAME, logs NAME, panel NAME, doctor, images, layers IMAGE, "
                         "diff NAME, commit NAME IMAGE")

    container_line.__doc__ = args_mod.line_doc()

    def _ls(self) -> Table:
        table = Table("containers of this kernel")
        rows = table.section("", ("name", "cgroup", "memory", "limits", "up"))
        import time
        for name, c in sorted(containers().items()):
            try:
                st = c.stats()
                mem = "?" if st.memory_current is None else cgroupview.format_size(st.memory_current)
            except Exception:
                mem = "?"
            limits = ", ".join(f"{k}={cgroupview.format_size(v) if k in ('memory', 'swap') else v}"
                               for k, v in (c.plan.limits if c.plan else {}).items()) or "none"
            up = f"{time.time() - c.started_at:.0f} s" if c.started_at else "?"
            rows.rows.append((name, c.cgroup.path if c.cgroup else "-", mem, limits, up))
        busy = [r for r in cellrun.BACKGROUND if not r.done]
        if busy:
            table.notes.append("background runs: " + ", ".join(repr(r) for r in busy))
        if not rows.rows:
            table.notes.append("no named containers run (%%container --name NAME makes one)")
        return table

    @line_magic("cgroup")
    def cgroup(self, line: str) -> Any:
        words = line.split()
        if not words:
            return cgroupview.own_cgroup()
        name, changes = words[0], args_mod.parse_limits(words[1:])
        if "=" in name:
            raise UsageError("%cgroup: name the container first, like %cgroup db memory=128M")
        c = _get(name)
        if changes:
            try:
                c.update(**changes)
            except (OptionError, TypeError) as err:
                raise UsageError(f"%cgroup: {err}") from None
        return cgroupview.container_table(c)

    cgroup.__doc__ = args_mod.cgroup_doc()


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext pynsbook``."""
    ipython.register_magics(ContainerMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """Stop this kernel's background runs; named containers stay until stopped or exit."""
    for run in list(cellrun.BACKGROUND):
        if not run.done:
            run.stop()
    cellrun.BACKGROUND.clear()
    ipython.magics_manager.magics["cell"].pop("container", None)
    ipython.magics_manager.magics["line"].pop("container", None)
    ipython.magics_manager.magics["line"].pop("cgroup", None)



