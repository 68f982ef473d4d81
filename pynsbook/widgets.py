"""``ContainerPanel``: sliders that change a running container's limits, buttons that
freeze, thaw and stop it, and a live chart of memory against its limit and CPU against its
quota.

    >>> c = pynsbook.Container("db", memory="256M").start()
    >>> ContainerPanel(c)            # in a notebook cell; %container panel db does the same

The sliders' right ends are the host's memory, all its CPUs and 4096 processes: real
limits that do not bind (``Container.update`` cannot lift a limit: ``None`` is ignored).
Moving a slider calls ``Container.update`` at once (the cgroup file is written before the
handler returns). The panel stays live while a cell blocks (see :mod:`pynsbook.comms`)
and while a ``--bg`` cell runs. Without cgroups (Binder-like hosts) the usage is sampled
from /proc and marked approximate; the controls that cannot work are disabled, and the
panel says why and how to get them.

Threads: a :class:`~pynsbook.monitor.Monitor` samples at ``rate`` Hz; one panel thread
redraws the chart and the status line every ``chart_interval`` seconds while there are new
samples, and stops when the container does. Headless (nbclient, nbconvert), the panel's
output also carries a PNG of its chart, and nothing ever waits for a front end.
"""
from __future__ import annotations

import base64
import html
import os
import threading
from typing import Any, Dict, List, Optional

import ipywidgets as W

from . import comms
from .monitor import Monitor, Series
from .plot import MIB, LiveChart, png, usage_figure
from .spec import format_size

__all__ = ["ContainerPanel"]

MIN_MEMORY_MIB = 8
MEMORY_STEP_MIB = 8
MAX_PIDS = 4096
CPU_STEP = 0.05


def _host_memory_mib() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB)


def _backend_controllers() -> "tuple[frozenset, Any]":
    try:
        from . import cgroups
        backend = cgroups.backend()
        return backend.controllers(), backend
    except Exception:  # no cgroup support at all
        return frozenset(), None


class ContainerPanel(W.VBox):
    """Live control of one running container. ``rate``: samples a second;
    ``chart_interval``: seconds between chart redraws; ``window``: seconds the chart shows.
    """

    def __init__(self, container: Any, *, rate: float = 10.0, chart_interval: float = 1.0,
                 window: float = 60.0, monitor: Optional[Monitor] = None) -> None:
        self.container = container
        self.monitor = monitor or Monitor(container, rate=rate)
        self.chart_interval = chart_interval
        self._chart = LiveChart(window=window)
        self._syncing = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._drawn = -1
        self.errors: List[str] = []
        #: seconds each chart frame took to render (the last 100)
        self.frame_times: List[float] = []

        name = html.escape(str(getattr(container, "name", "?")))
        self.title = W.HTML(f"<b>container {name}</b>")
        host_mib = _host_memory_mib()
        ncpu = float(len(os.sched_getaffinity(0)))
        self.memory = W.IntSlider(description="memory MiB", min=MIN_MEMORY_MIB,
                                  max=host_mib - host_mib % MEMORY_STEP_MIB,
                                  step=MEMORY_STEP_MIB, value=host_mib - host_mib % MEMORY_STEP_MIB,
                                  continuous_update=False, style={"description_width": "90px"},
                                  layout=W.Layout(width="460px"))
        self.cpus = W.FloatSlider(description="CPUs", min=CPU_STEP, max=ncpu, step=CPU_STEP,
                                  value=ncpu, continuous_update=False, readout_format=".2f",
                                  style={"description_width": "90px"},
                                  layout=W.Layout(width="460px"))
        self.pids = W.IntSlider(description="pids", min=1, max=MAX_PIDS, value=MAX_PIDS,
                                continuous_update=False, style={"description_width": "90px"},
                                layout=W.Layout(width="460px"))
        self.memory.add_class("pynsbook-memory")
        self.cpus.add_class("pynsbook-cpus")
        self.pids.add_class("pynsbook-pids")
        self.freeze_button = W.Button(description="freeze", icon="pause")
        self.thaw_button = W.Button(description="thaw", icon="play")
        self.stop_button = W.Button(description="stop", icon="stop", button_style="danger")
        self.status = W.HTML()
        self.note = W.HTML()
        self.chart = W.Image(format="png", layout=W.Layout(width="100%", max_width="720px"))
        self.chart.add_class("pynsbook-chart")
        self.caption = W.HTML()
        self.caption.add_class("pynsbook-chart-caption")
        self.status.add_class("pynsbook-status")
        self.note.add_class("pynsbook-note")
        super().__init__([self.title, self.memory, self.cpus, self.pids,
                          W.HBox([self.freeze_button, self.thaw_button, self.stop_button]),
                          self.status, self.chart, self.caption, self.note])
        self.add_class("pynsbook-panel")

        self.memory.observe(self._on_memory, names="value")
        self.cpus.observe(self._on_cpus, names="value")
        self.pids.observe(self._on_pids, names="value")
        self.freeze_button.on_click(lambda _: self._act("freeze"))
        self.thaw_button.on_click(lambda _: self._act("thaw"))
        self.stop_button.on_click(lambda _: self._act("stop"))

        self._notes: Dict[str, str] = {}
        self._decide_controls()
        why = comms.route_to_subshell([self.memory, self.cpus, self.pids, self.freeze_button,
                                       self.thaw_button, self.stop_button])
        self.live_during_cells = why is None
        if why and why != "not running in a Jupyter kernel":
            self._notes["live"] = (f"the controls act between cells only ({why}); "
                                   "run long cells with --bg to use them meanwhile")
        self.monitor.start()
        self._sync_from(self.monitor.series.samples[-1] if len(self.monitor.series) else None)
        self._redraw()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"pynsbook-panel-{name}")
        self._thread.start()

    # -- what can be changed here ---------------------------------------------------------

    def _decide_controls(self) -> None:
        c = self.container
        have, backend = _backend_controllers()
        cg = getattr(c, "cgroup", None)

        def why(controller: str) -> str:
            if backend is None:
                return "this host has no cgroups"
            m = backend.missing(controller)
            return m.reason + (f" (fix: {m.fix})" if m.fix else "")

        if cg is None:
            reason = why("memory") if "memory" not in have else "this container has no cgroup"
            for w in (self.memory, self.cpus, self.pids, self.freeze_button, self.thaw_button):
                w.disabled = True
            self._notes["cgroup"] = ("limits cannot change and freezing needs a cgroup: "
                                     f"{reason}. Usage is sampled from /proc (approximate).")
            return
        off = []
        dirs = getattr(cg, "dirs", None)  # v1: one directory per controller hierarchy
        for widget, controller in ((self.memory, "memory"), (self.cpus, "cpu"),
                                   (self.pids, "pids")):
            if controller not in have or (dirs is not None and controller not in dirs):
                widget.disabled = True
                off.append(f"{controller}: {why(controller)}")
        if dirs is not None and "freezer" not in dirs:  # v2 freezes with cgroup.freeze
            self.freeze_button.disabled = self.thaw_button.disabled = True
            off.append(f"freezer: {why('freezer')}")
        if off:
            self._notes["controllers"] = "disabled — " + "; ".join(off)

    # -- slider and button handlers (may run in the widget subshell thread) ---------------

    def _on_memory(self, change: Dict[str, Any]) -> None:
        if not self._syncing:
            value = change["new"]
            self._apply(memory=value * MIB)

    def _on_cpus(self, change: Dict[str, Any]) -> None:
        if not self._syncing:
            value = change["new"]
            self._apply(cpus=round(value, 2))

    def _on_pids(self, change: Dict[str, Any]) -> None:
        if not self._syncing:
            value = change["new"]
            self._apply(pids=int(value))

    def _apply(self, **limits: Any) -> None:
        try:
            self.container.update(**limits)
        except Exception as err:  # refused (EBUSY below current usage, stopped, ...)
            self._error(f"could not set {', '.join(limits)}: {err}")
            s = self.monitor.sample()
            self._sync_from(s)
        else:
            self._notes.pop("error", None)
            self.monitor.sample()  # the new limit shows in the series (and chart) at once
        self._show_notes()

    def _act(self, what: str) -> None:
        try:
            getattr(self.container, what)()
        except Exception as err:
            self._error(f"could not {what}: {err}")
        self.monitor.sample()
        self._show_notes()
        if what == "stop":
            self._closed.set()

    def _error(self, message: str) -> None:
        self.errors.append(message)
        self._notes["error"] = f"<span style='color:#b00'>{html.escape(message)}</span>"

    # -- showing state ---------------------------------------------------------------------

    def _sync_from(self, s: Any) -> None:
        """Move the sliders to the limits in force (after a refusal, or %cgroup)."""
        if s is None:
            return
        self._syncing = True
        try:
            for widget, value in ((self.memory, None if s.memory_limit is None
                                   else s.memory_limit // MIB),
                                  (self.cpus, s.cpu_quota), (self.pids, s.pids_limit)):
                target = widget.max if value is None else min(max(value, widget.min), widget.max)
                if widget.value != target:
                    widget.value = target
        finally:
            self._syncing = False

    def _show_notes(self) -> None:
        text = "<br>".join(v if k == "error" else html.escape(v) for k, v in self._notes.items())
        if self.note.value != text:
            self.note.value = f"<small>{text}</small>" if text else ""

    def _status_line(self, series: Series) -> str:
        if not len(series):
            return "no samples yet"
        s = series.samples[-1]
        rate = series.cpu_rate()
        parts = [f"memory {format_size(s.memory)} of {format_size(s.memory_limit)}",
                 f"CPU {rate[-1][1]:.2f}" + (f" of {s.cpu_quota:.2f}" if s.cpu_quota else "")
                 if rate else "CPU ?"]
        if s.pids is not None:
            parts.append(f"pids {s.pids}" + (f" of {s.pids_limit}" if s.pids_limit else ""))
        if s.throttled_count:
            parts.append(f"throttled {s.throttled_count}×")
        if s.oom_kills:
            parts.append(f"<b style='color:#b00'>OOM kills {s.oom_kills}</b>")
        if s.frozen:
            parts.append("<b>frozen</b>")
        if self.monitor.ended is not None:
            parts.append("<b>stopped</b>")
        if series.approximate:
            parts.append("approximate")
        return " · ".join(parts)

    def _redraw(self) -> None:
        import time
        with self._lock:
            series = self.monitor.snapshot()
            if len(series) == self._drawn and self.monitor.ended is None:
                return
            self._drawn = len(series)
            t0 = time.thread_time()
            data = self._chart.render(series)
            self.frame_times = (self.frame_times + [time.thread_time() - t0])[-100:]
        last = series.samples[-1] if len(series) else None
        self.chart.value = data
        # what the picture shows, in words (not the Image's tooltip: ipywidgets 8's Image
        # view throws on a tooltip, it has no description)
        self.caption.value = (f"<small>chart: memory limit "
                              f"{format_size(last.memory_limit) if last else '?'}, "
                              f"{len(series)} samples up to {last.t if last else 0:.1f} s"
                              f"</small>")
        self.status.value = f"<small>{self._status_line(series)}</small>"
        self._show_notes()

    def _loop(self) -> None:
        while not self._closed.wait(self.chart_interval):
            try:
                self._redraw()
            except Exception as err:  # a frame that fails must not kill the panel
                self._error(f"chart: {err}")
            if self.monitor.ended is not None or not self.monitor.running:
                break
        try:
            self._redraw()
        except Exception:
            pass
        self._finish()

    def _finish(self) -> None:
        if self.monitor.ended is not None or not getattr(self.container, "running", False):
            for w in (self.memory, self.cpus, self.pids, self.freeze_button, self.thaw_button,
                      self.stop_button):
                w.disabled = True

    # -- public ---------------------------------------------------------------------------

    @property
    def series(self) -> Series:
        """What the panel's monitor sampled so far (a copy)."""
        return self.monitor.snapshot()

    def figure(self, **kwargs: Any) -> Any:
        """A full-size usage figure of everything sampled so far (a matplotlib Figure)."""
        limits = dict(getattr(getattr(self.container, "plan", None), "limits", None) or {})
        return usage_figure(self.series, limits, **kwargs)

    def close(self) -> None:
        """Stop sampling and redrawing, and close the widgets."""
        self._closed.set()
        self.monitor.stop()
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        for w in list(self.children):
            if isinstance(w, W.HBox):
                for b in w.children:
                    b.close()
            w.close()
        super().close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = super()._repr_mimebundle_(**kwargs) or {}
        # a static picture for viewers without a widget manager (nbclient, nbconvert, GitHub)
        try:
            if self._drawn >= 0:
                bundle["image/png"] = base64.b64encode(png(self._chart.fig)).decode()
        except Exception:
            pass
        name = getattr(self.container, "name", "?")
        bundle["text/plain"] = f"ContainerPanel({name}): {self._status_line(self.monitor.snapshot())}"
        return bundle
