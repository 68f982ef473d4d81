"""``pynsbook kernel install|uninstall``: a Jupyter kernel "Python 3 (pynsbook)" that loads
the magics at start and, given limits, runs the whole kernel inside a cgroup with them.

With limits the kernelspec's argv is ``python -m pynsbook kernel launch [limits] -- python
-m ipykernel_launcher -f {connection_file} ...``. ``launch`` makes a container with no
namespaces of its own and the host network (only the cgroup: the kernel still sees the
notebook's files, connection file and ports) and runs the kernel in it with the
environment and working directory Jupyter gave. Jupyter interrupts a kernel by sending
SIGINT to the process group of what it started, which is ``launch`` (the kernel itself is
in the container's own session), so ``launch`` passes SIGINT and SIGTERM on to the kernel.
If ``launch`` is killed, the container's shim sees it go and removes the kernel and cgroup.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from typing import Any, Dict, List, Optional

from . import spec as spec_mod
from .errors import PynsbookError

DEFAULT_NAME = "pynsbook"
DISPLAY_NAME = "Python 3 (pynsbook)"
_LIMIT_OPTIONS = spec_mod.LIMIT_KEYS + ("best_effort",)


def _add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """The limit options of the one option table (a kernel has no namespaces or name)."""
    spec_mod.add_arguments(p, keys=_LIMIT_OPTIONS)


def _limit_argv(args: argparse.Namespace) -> List[str]:
    """The limit flags given, as a command line again (raw, as the user wrote them)."""
    out: List[str] = []
    for opt in spec_mod.OPTIONS:
        value = getattr(args, opt.key, None) if opt.key in _LIMIT_OPTIONS else None
        if value is None:
            continue
        if opt.switch:
            out.append(opt.flag) if value else None
        else:
            for v in value if isinstance(value, list) else [value]:
                out += [opt.flag, str(v)]
    return out


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("kernel", help="install or remove the \"Python 3 (pynsbook)\" Jupyter kernel",
                       description="Install a Jupyter kernel that loads the pynsbook magics at "
                                   "start; with limits, the whole kernel runs in a cgroup.",
                       epilog="examples:\n  pynsbook kernel install --user\n"
                              "  pynsbook kernel install --name small --mem 512M --cpus 1\n"
                              "  pynsbook kernel uninstall --name small",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ks = p.add_subparsers(dest="kernel_cmd", metavar="install|uninstall")
    ks.required = True
    inst = ks.add_parser("install", help="install the kernelspec")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for this user only")
    where.add_argument("--prefix", metavar="DIR",
                       help="install under DIR/share/jupyter/kernels (e.g. a virtualenv)")
    where.add_argument("--sys-prefix", action="store_true",
                       help=f"install into this Python's prefix ({sys.prefix})")
    inst.add_argument("--name", default=DEFAULT_NAME, help=f"kernel name (default {DEFAULT_NAME})")
    inst.add_argument("--display-name", help=f"what Jupyter shows (default \"{DISPLAY_NAME}\")")
    _add_limit_arguments(inst)
    un = ks.add_parser("uninstall", help="remove the kernelspec")
    un.add_argument("--name", default=DEFAULT_NAME, help=f"kernel name (default {DEFAULT_NAME})")
    un.add_argument("--prefix", metavar="DIR", help="remove it from DIR/share/jupyter/kernels")
    launch = ks.add_parser("launch", help=argparse.SUPPRESS)
    _add_limit_arguments(launch)
    launch.add_argument("command", nargs=argparse.REMAINDER)


def main(args: argparse.Namespace) -> int:
    if args.kernel_cmd == "install":
        path = install(name=args.name, user=args.user,
                       prefix=sys.prefix if args.sys_prefix else args.prefix,
                       display_name=args.display_name, limit_argv=_limit_argv(args))
        print(f"installed kernel {args.name!r} in {path}")
        return 0
    if args.kernel_cmd == "uninstall":
        path = uninstall(args.name, prefix=args.prefix)
        print(f"removed kernel {args.name!r} from {path}")
        return 0
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    return launch(spec_mod.spec_from_args(args), command)


# ---------------------------------------------------------------------------------------
# the kernelspec

def kernelspec(limit_argv: Optional[List[str]] = None, display_name: Optional[str] = None,
               python: str = sys.executable) -> Dict[str, Any]:
    """The kernel.json contents. Limits are checked now, so a typo fails at install."""
    kernel = [python, "-m", "ipykernel_launcher", "-f", "{connection_file}",
              "--IPKernelApp.extensions=pynsbook"]
    limit_argv = list(limit_argv or [])
    shown = ""
    if limit_argv:
        parser = argparse.ArgumentParser(add_help=False)
        _add_limit_arguments(parser)
        spec = spec_mod.spec_from_args(parser.parse_args(limit_argv))
        shown = ", ".join(f"{k} {spec_mod.format_size(v) if k in ('memory', 'swap') else v}"
                          for k, v in spec.limits().items() if k != "swap")
        kernel = [python, "-m", "pynsbook", "kernel", "launch", *limit_argv, "--", *kernel]
    return {
        "argv": kernel,
        "display_name": display_name or (f"Python 3 (pynsbook: {shown})" if shown else DISPLAY_NAME),
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"pynsbook": {"limits": limit_argv}},
    }


def install(name: str = DEFAULT_NAME, user: bool = False, prefix: Optional[str] = None,
            display_name: Optional[str] = None, limit_argv: Optional[List[str]] = None) -> str:
    """Install the kernelspec; return the directory it went to."""
    from jupyter_client.kernelspec import KernelSpecManager
    spec = kernelspec(limit_argv, display_name)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "kernel.json"), "w") as f:
            json.dump(spec, f, indent=1)
        try:  # the Python logos, as the plain ipykernel kernelspec has them
            from ipykernel.kernelspec import RESOURCES
            for fname in os.listdir(RESOURCES):
                if fname.startswith("logo"):
                    shutil.copy(os.path.join(RESOURCES, fname), tmp)
        except (ImportError, OSError):
            pass
        return KernelSpecManager().install_kernel_spec(tmp, name, user=user, prefix=prefix)


def uninstall(name: str = DEFAULT_NAME, prefix: Optional[str] = None) -> str:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    if prefix:
        path = os.path.join(prefix, "share", "jupyter", "kernels", name)
        if not os.path.isdir(path):
            raise PynsbookError(f"no kernel named {name!r} in {path}")
        shutil.rmtree(path)
        return path
    try:
        return KernelSpecManager().remove_kernel_spec(name)
    except (KeyError, NoSuchKernel):
        raise PynsbookError(f"no kernel named {name!r} is installed "
                            "(see `jupyter kernelspec list`)") from None


# ---------------------------------------------------------------------------------------
# running a kernel in a cgroup

def launch(spec: spec_mod.Spec, command: List[str]) -> int:
    """Run ``command`` (the kernel) in a container that has only a cgroup: no namespaces,
    and not confined (privileged), for it is the user's own kernel, which makes containers."""
    from .engine.container import Container
    if not command:
        raise PynsbookError("kernel launch needs the kernel's command after --")
    spec = spec_mod.make_spec({"namespaces": "none", "net": "host", "privileged": True},
                              base=spec)
    started: Dict[str, Any] = {}

    def forward(signum: int, frame: Any) -> None:
        c, rid = started.get("c"), started.get("rid")
        if c is not None and rid is not None:
            c.signal(signum, rid)

    def on_start(c: Any, rid: str) -> None:
        started.update(c=c, rid=rid)

    from .cli import echo
    out, err = echo(sys.stdout), echo(sys.stderr)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    env = dict(os.environ)
    c = Container(spec=spec)
    try:
        c.start()
        env["PYNSBOOK_KERNEL_CGROUP"] = c.cgroup.path if c.cgroup else ""
        result = c.exec(command, env=env, workdir=os.getcwd(), on_stdout=out, on_stderr=err,
                        on_start=on_start)
    finally:
        c.stop()
        if c.cgroup is not None:
            _remove_tree(c.cgroup)
    if result.oom_killed:
        err(f"pynsbook: the kernel was {result.describe()}\n")
        return 137
    if result.signal:
        return 128 + result.signal
    return result.exit_code


def _remove_tree(cgroup: Any) -> None:
    """Remove what the kernel's own containers left inside its cgroup (their session
    directories), then the kernel's cgroup and its session. The engine removes a container's
    cgroup but not cgroups nested in it, and rmdir refuses a cgroup that has children."""
    from .cgroups.base import kill_pids, procs, rmdir_retry
    tops = list(getattr(cgroup, "dirs", {}).values()) or [cgroup.path]
    for top in tops:
        if not os.path.isdir(top):
            continue
        for root, _, _ in os.walk(top, topdown=False):
            kill_pids(procs(root))
            try:
                rmdir_retry(root, timeout=1.0)
            except OSError:
                pass
        try:
            os.rmdir(os.path.dirname(top))  # our session directory, if nothing else is in it
        except OSError:
            pass
