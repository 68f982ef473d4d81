"""``%%container --plot``: sample a container's memory and CPU while a cell runs, then draw
them (rendered to PNG here, so it shows the same in JupyterLab, nbclient and nbconvert)."""
from __future__ import annotations

import io
import threading
import time
from typing import Any, List, Optional, Tuple

INTERVAL = 0.05  # seconds between samples


class Samples:
    """(seconds since start, memory bytes, CPU seconds) read from the container's cgroup."""

    def __init__(self, container: Any) -> None:
        self.container = container
        self.points: List[Tuple[float, Optional[int], Optional[float]]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._t0 = 0.0

    def _take(self) -> None:
        try:
            st = self.container.stats()
        except Exception:  # the container went away between two samples
            return
        self.points.append((time.monotonic() - self._t0, st.memory_current, st.cpu_time))

    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL):
            self._take()

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._take()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="pynsbook-plot")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)
        self._take()

    def png(self, result: Any) -> bytes:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        fig = Figure(figsize=(8, 2.6), dpi=90)
        mem_ax, cpu_ax = fig.subplots(1, 2)
        t = [p[0] for p in self.points]
        mem = [(p[1] or 0) / 2**20 for p in self.points]
        mem_ax.plot(t, mem, drawstyle="steps-post")
        limit = (result.limits or {}).get("memory")
        if limit:
            mem_ax.axhline(limit / 2**20, color="red", linestyle="--", label="limit")
            mem_ax.legend(loc="lower right")
        mem_ax.set(title="memory", xlabel="seconds", ylabel="MiB")
        cpu = []
        for (t0, _, c0), (t1, _, c1) in zip(self.points, self.points[1:]):
            if c0 is not None and c1 is not None and t1 > t0:
                cpu.append((t1, 100 * (c1 - c0) / (t1 - t0)))
        cpu_ax.plot([x for x, _ in cpu], [y for _, y in cpu], drawstyle="steps-pre")
        cpus = (result.limits or {}).get("cpus")
        if cpus:
            cpu_ax.axhline(100 * cpus, color="red", linestyle="--", label="quota")
            cpu_ax.legend(loc="lower right")
        cpu_ax.set(title="CPU", xlabel="seconds", ylabel="% of one CPU")
        fig.suptitle(result.describe() if not result.ok else f"wall {result.wall_time:.2f} s",
                     fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        FigureCanvasAgg(fig).print_png(buf)
        return buf.getvalue()

    def show(self, result: Any) -> None:
        from IPython.display import Image, display
        display(Image(data=self.png(result), format="png"))
