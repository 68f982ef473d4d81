"""Running one ``%%container`` cell: pick or start its container, stream its output to the
cell (stdout and stderr apart), bring variables in and out, and turn a failed run into an
exception so "Run all" stops.

Threads: a foreground cell runs in the kernel's main thread, so the stop button (SIGINT to
the kernel, a KeyboardInterrupt here) reaches the engine, which stops the process. A ``--bg``
cell runs in a daemon thread; its output goes to display handles created in the cell while
it ran (``update_display_data`` finds them by id whichever cell is running later, in
JupyterLab and under nbclient alike; a stream message would be routed by the parent cell
and is dropped once that cell has finished). Nothing here forks: the engine starts the
container from its own launcher process.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
import uuid
from typing import Any, Callable, Deque, Dict, List, Optional

from IPython.core.error import UsageError

from ..engine.container import Container, containers
from ..errors import ContainerError
from ..results import RunResult
from ..spec import LIMIT_KEYS, Spec

#: per-run and per-container options a running named container can still take
_PER_RUN = ("timeout", "env", "workdir", "name")
_LOG_CHARS = 200_000      # what `%container logs NAME` keeps
_LIVE_CHARS = 100_000     # what a --bg display keeps on screen
_LIVE_INTERVAL = 0.1      # seconds between updates of a --bg display


class ContainerFailed(ContainerError):
    """The cell's container failed: out of memory, a non-zero exit, a timeout, a signal.

    Shows as one line (the cell's own stderr already has the details), and is an error,
    so "Run all" stops at the cell.
    """

    def __init__(self, message: str, result: Optional[RunResult] = None) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> Any:
        return (ContainerFailed, (self.message,))

    def _render_traceback_(self) -> List[str]:  # IPython shows this instead of a traceback
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self.message}"]


class ContainerInterrupted(KeyboardInterrupt):
    """The stop button stopped the cell's container (SIGINT, SIGTERM, SIGKILL). A
    KeyboardInterrupt, so queued cells are not run; shown as one line."""

    def _render_traceback_(self) -> List[str]:
        return [f"\x1b[0;31mKeyboardInterrupt\x1b[0m: {self}"]


# ---------------------------------------------------------------------------------------
# logs of named containers (for `%container logs NAME`)

LOGS: Dict[str, Deque[str]] = {}


def _log(name: str, text: str) -> None:
    log = LOGS.setdefault(name, collections.deque())
    log.append(text)
    total = sum(len(t) for t in log)
    while total > _LOG_CHARS and len(log) > 1:
        total -= len(log.popleft())


# ---------------------------------------------------------------------------------------
# choosing the container

def container_for(spec: Spec) -> "tuple[Container, bool]":
    """The container a cell runs in, and whether the cell owns it (stops it at the end).

    A ``--name`` that already runs is reused: limits given again are applied live;
    options that shape a container only when it starts (namespaces, hostname, root) are
    refused, since they cannot change now.
    """
    if spec.name and spec.name in containers():
        c = containers()[spec.name]
        fresh = Spec()
        fixed = [k for k in ("namespaces", "net", "hostname", "rootfs", "uptime", "best_effort")
                 if getattr(spec, k) != getattr(fresh, k)]
        if fixed:
            from ..spec import option
            raise UsageError(f"%%container: container {spec.name!r} already runs; "
                             f"{option(fixed[0] if fixed[0] != 'namespaces' else 'namespaces').flag} "
                             f"applies only when it starts (%container stop {spec.name} first)")
        limits = {k: getattr(spec, k) for k in LIMIT_KEYS if getattr(spec, k) not in (None, ())}
        if limits:
            c.update(**limits)
        return c, False
    c = Container(spec=spec)
    c.start()
    return c, not spec.name


# ---------------------------------------------------------------------------------------
# one run

class CellRun:
    """One run of a cell: call ``run()`` in the foreground, or ``start()`` for ``--bg``."""

    def __init__(self, shell: Any, code: str, args: Any, spec: Spec) -> None:
        self.shell = shell
        self.code = code
        self.args = args
        self.spec = spec
        self.container: Optional[Container] = None
        self.owned = False
        self.result: Optional[RunResult] = None
        self.error: Optional[BaseException] = None
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._samples: Optional[Any] = None  # a pynsbook.monitor.Monitor for --plot
        self._inputs = self._collect_inputs()

    # -- public handle (what --proc VAR holds) --------------------------------------------

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> Optional[RunResult]:
        """Wait for the run to end; return its RunResult (None if still running)."""
        self._done.wait(timeout)
        return self.result

    def stop(self) -> None:
        """Stop the run's container (a named one too: its processes, cgroup and mounts go)."""
        if self.container is not None:
            self.container.stop()
        if self._thread is not None:
            self._thread.join(5)

    def __repr__(self) -> str:
        state = "running" if not self.done else (self.result.describe() if self.result
                                                  else f"failed: {self.error}")
        name = self.container.name if self.container else "?"
        return f"<%%container run in {name}: {state}>"

    # -- running ---------------------------------------------------------------------------

    def _collect_inputs(self) -> Dict[str, Any]:
        ns = self.shell.user_ns
        missing = [v for v in self.args.inputs if v not in ns]
        if missing:
            raise UsageError(f"%%container: -i {missing[0]}: no variable named {missing[0]!r} "
                             "in the notebook")
        return {v: ns[v] for v in self.args.inputs}

    def _execute(self, on_out: Callable[[str], None], on_err: Callable[[str], None]) -> RunResult:
        c = self.container
        assert c is not None
        name = self.spec.name

        def out(text: str) -> None:
            on_out(text)
            if name:
                _log(name, text)

        def err(text: str) -> None:
            on_err(text)
            if name:
                _log(name, text)

        common: Dict[str, Any] = dict(on_stdout=out, on_stderr=err, timeout=self.spec.timeout,
                                      env=dict(self.spec.env) or None, workdir=self.spec.workdir)
        if self.args.plot:
            from ..monitor import Monitor
            self._samples = Monitor(c, rate=20).start()
        try:
            if self.args.bash:
                env = dict(common.pop("env") or {})
                env.update({k: _env_value(v) for k, v in self._inputs.items()})
                return c.exec(["/bin/sh", "-c", self.code], env=env, **common)
            return c.run(self.code, inputs=self._inputs or None,
                         outputs=list(self.args.outputs) or None, persistent=bool(name),
                         **common)
        finally:
            if self._samples:
                self._samples.stop()

    def _finish(self, result: RunResult, write_out: Callable[[str], None],
                write_err: Callable[[str], None]) -> None:
        """After the run: variables back, the --stats line, the chart; raise if it failed."""
        self.result = result
        outputs = getattr(result, "outputs", None) or {}
        self.shell.user_ns.update(outputs)
        for var, why in (getattr(result, "output_errors", None) or {}).items():
            write_err(f"pynsbook: -o {var}: {why}\n")
        for key, why in result.dropped.items():
            write_err(f"pynsbook: {key} not enforced: {why}\n")
        if self.args.stats:
            write_out(f"pynsbook: {result.summary()}\n")
        if self.args.plot and self._samples is not None:
            from IPython.display import Image, display
            from ..plot import usage_figure
            fig = usage_figure(self._samples.series, result.limits, title=result.describe())
            display(Image(data=fig._repr_png_(), format="png"))  # a PNG, whatever the backend

    def failure(self, result: RunResult) -> Optional[str]:
        if result.ok:
            return None
        who = f"container {self.spec.name}: " if self.spec.name else ""
        return who + result.describe()

    def run(self) -> Optional[RunResult]:
        """Run in the foreground (the kernel's main thread)."""
        self.container, self.owned = container_for(self.spec)

        def write_err(text: str) -> None:
            sys.stderr.write(text)
            sys.stderr.flush()

        def write_out(text: str) -> None:
            sys.stdout.write(text)

        try:
            result = self._execute(write_out, write_err)
        except KeyboardInterrupt:
            what = ("stopped the run; the container keeps running" if not self.owned
                    else "stopped the container")
            raise ContainerInterrupted(f"interrupted: {what}") from None
        finally:
            sys.stdout.flush()
            if self.owned:
                self.container.stop()
            self._done.set()
        self._finish(result, write_out, write_err)
        sys.stdout.flush()
        message = self.failure(result)
        if message:
            if self.args.raise_error:
                raise ContainerFailed(message, result)
            write_err(f"pynsbook: {message}\n")
        return result

    def start(self) -> "CellRun":
        """Start in the background: the container starts now (errors show in this cell),
        the code runs in a thread, the output goes to this cell's display handles."""
        self.container, self.owned = container_for(self.spec)
        live = LiveOutput(self.shell)
        self._thread = threading.Thread(target=self._background, args=(live,), daemon=True,
                                        name=f"pynsbook-bg-{self.container.name}")
        self._thread.start()
        return self

    def _background(self, live: "LiveOutput") -> None:
        try:
            result = self._execute(live.stdout, live.stderr)
            self._finish(result, live.stdout, live.stderr)
            message = self.failure(result)
            if message:
                live.stderr(f"pynsbook: {message}\n")
        except BaseException as err:  # nobody can catch it in a thread: show it in the cell
            self.error = err
            live.stderr(f"pynsbook: {type(err).__name__}: {err}\n")
        finally:
            if self.owned and self.container is not None:
                self.container.stop()
            live.close()
            self._done.set()


def _env_value(value: Any) -> str:
    if isinstance(value, (str, int, float, bool)):
        return str(value)
    raise UsageError("%%container --bash -i: only strings and numbers can go into a shell "
                     f"script (as environment variables), not {type(value).__name__}")


# ---------------------------------------------------------------------------------------
# live output of a --bg cell

class LiveOutput:
    """Two display areas (stdout, stderr) made in the cell that started a --bg run, updated
    from a background thread. Outside a kernel (terminal IPython) text is just printed."""

    def __init__(self, shell: Any) -> None:
        self._in_kernel = getattr(shell, "kernel", None) is not None
        self._text = {"stdout": "", "stderr": ""}
        self._dirty = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if not self._in_kernel:
            return
        from IPython.display import display
        self._ids = {k: f"pynsbook-{k}-{uuid.uuid4().hex}" for k in self._text}
        for key, did in self._ids.items():
            display(self._bundle(key, ""), raw=True, display_id=did)
        self._pusher = threading.Thread(target=self._push_loop, daemon=True,
                                        name="pynsbook-bg-output")
        self._pusher.start()

    @staticmethod
    def _bundle(key: str, text: str) -> Dict[str, str]:
        import html
        style = "background:#fdd;" if key == "stderr" else ""
        return {"text/plain": text,
                "text/html": f"<pre style='margin:0;{style}'>{html.escape(text)}</pre>" if text else ""}

    def _add(self, key: str, text: str) -> None:
        if not self._in_kernel:
            stream = sys.stdout if key == "stdout" else sys.stderr
            stream.write(text)
            stream.flush()
            return
        with self._lock:
            t = self._text[key] + text
            if len(t) > _LIVE_CHARS:
                t = "[… earlier output cut …]\n" + t[-_LIVE_CHARS:]
            self._text[key] = t
            self._dirty.add(key)

    def stdout(self, text: str) -> None:
        self._add("stdout", text)

    def stderr(self, text: str) -> None:
        self._add("stderr", text)

    def _push(self) -> None:
        from IPython.display import update_display
        with self._lock:
            todo = {k: self._text[k] for k in self._dirty}
            self._dirty.clear()
        for key, text in todo.items():
            update_display(self._bundle(key, text), raw=True, display_id=self._ids[key])

    def _push_loop(self) -> None:
        while not self._closed.wait(_LIVE_INTERVAL):
            self._push()
        self._push()

    def close(self) -> None:
        self._closed.set()
        if self._in_kernel:
            self._pusher.join(5)


#: the --bg runs of this kernel that %container ls and wait_all still need (see remember)
BACKGROUND: List[CellRun] = []


def remember(run: CellRun) -> None:
    """Keep a --bg run, and let finished ones go, as IPython's script magics prune their
    finished background processes: a finished run stays only while it is the latest run of
    a named container (what a user can still ask for by that name); a finished anonymous
    run goes (its ``--proc`` variable, if any, keeps the handle). Each run holds its
    inputs, result and display state, so keeping them all would grow without end."""
    BACKGROUND.append(run)
    latest = {r.spec.name: r for r in BACKGROUND if r.spec.name}
    BACKGROUND[:] = [r for r in BACKGROUND
                     if not r.done or (r.spec.name and latest[r.spec.name] is r)]


def wait_all(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for run in list(BACKGROUND):
        run.wait(max(0.0, deadline - time.monotonic()))
