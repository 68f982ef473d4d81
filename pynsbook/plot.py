"""Usage charts (matplotlib): memory against its limit and CPU against its quota over time,
with OOM kills and CPU throttling marked; and the same workload under several limits side
by side.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global
figure list, no GUI backend, safe from threads), so reports can ``savefig`` it. The figures
also carry ``_repr_png_``: a notebook shows them as a PNG whether or not the inline backend
was ever set up, in JupyterLab and under nbclient alike.
"""
from __future__ import annotations

import io
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from matplotlib.figure import Figure

from .monitor import Series

__all__ = ["usage_figure", "compare_figure", "png", "summary", "UsageFigure"]

MIB = 1 << 20
MEMORY_COLOR = "tab:blue"
CPU_COLOR = "tab:green"
LIMIT_COLOR = "tab:red"
THROTTLE_COLOR = "tab:orange"

Runs = Union[Mapping[str, Series], Sequence[Tuple[str, Series]], Sequence[Series]]


class UsageFigure(Figure):
    """A Figure that shows itself as a PNG in IPython."""

    def _repr_png_(self) -> bytes:
        return png(self)


def png(fig: Figure, dpi: Optional[float] = None) -> bytes:
    """Render ``fig`` to PNG bytes (Agg; no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi)
    return buf.getvalue()


def _limit_steps(series: Series, name: str, fallback: Optional[float],
                 scale: float) -> Tuple[List[float], List[Optional[float]]]:
    """The limit as it was at each sample (limits change live), or the fixed fallback."""
    t = series.times
    values = series.column(name)
    if any(v is not None for v in values):
        return t, [None if v is None else v / scale for v in values]
    if fallback and t:
        return [t[0], t[-1]], [fallback / scale] * 2
    return [], []


def _draw_memory(ax: Any, series: Series, limit: Optional[float]) -> None:
    t = series.times
    mem = [None if v is None else v / MIB for v in series.column("memory")]
    ax.plot(t, [float("nan") if v is None else v for v in mem], drawstyle="steps-post",
            color=MEMORY_COLOR, label="memory")
    lt, lv = _limit_steps(series, "memory_limit", limit, MIB)
    if any(v is not None for v in lv):
        ax.plot(lt, [float("nan") if v is None else v for v in lv], drawstyle="steps-post",
                color=LIMIT_COLOR, linestyle="--", label="limit")
    ooms = series.oom_events()
    for i, (when, n) in enumerate(ooms):
        ax.axvline(when, color=LIMIT_COLOR, linewidth=1.5,
                   label=f"OOM kill ({sum(k for _, k in ooms)})" if i == 0 else None)
    ax.set_ylim(bottom=0)
    ax.set(title="memory", xlabel="seconds", ylabel="MiB")


def _draw_cpu(ax: Any, series: Series, quota: Optional[float]) -> None:
    rate = series.cpu_rate()
    ax.plot([0.0] + [t for t, _ in rate] if rate else [],
            [rate[0][1]] + [v for _, v in rate] if rate else [],
            drawstyle="steps-pre", color=CPU_COLOR, label="CPU")
    lt, lv = _limit_steps(series, "cpu_quota", quota, 1.0)
    if any(v is not None for v in lv):
        ax.plot(lt, [float("nan") if v is None else v for v in lv], drawstyle="steps-post",
                color=LIMIT_COLOR, linestyle="--", label="quota")
    throttled = series.throttle_events()
    if throttled:
        by_t = dict(zip(series.times, lv)) if lv and len(lv) == len(series.times) else {}
        top = max([v for _, v in rate] + [v for v in lv if v is not None] + [0.1])
        ax.scatter([t for t, _ in throttled],
                   [by_t.get(t) or top for t, _ in throttled], marker="v", s=18,
                   color=THROTTLE_COLOR, zorder=3,
                   label=f"throttled ({sum(n for _, n in throttled)} periods)")
    ax.set_ylim(bottom=0)
    ax.set(title="CPU", xlabel="seconds", ylabel="CPUs busy")


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize="small", framealpha=0.7)


def _subtitle(series: Series) -> str:
    if series.approximate:
        return " (approximate: sampled from /proc, no cgroup)"
    return ""


def usage_figure(series: Series, limits: Optional[Mapping[str, Any]] = None, *,
                 title: Optional[str] = None, width: float = 8.0, height: float = 2.8,
                 dpi: float = 90) -> Figure:
    """Memory against its limit and CPU against its quota, over time.

    ``limits`` (as in ``RunResult.limits`` or ``Container.plan.limits``: ``memory`` bytes,
    ``cpus``) is drawn when the samples do not carry the limits themselves (hosts without
    cgroups); limits changed while the container ran show as steps. OOM kills are red
    vertical lines, CPU throttling orange marks on the quota line.
    """
    limits = dict(limits or {})
    fig = UsageFigure(figsize=(width, height), dpi=dpi)
    mem_ax, cpu_ax = fig.subplots(1, 2)
    _draw_memory(mem_ax, series, limits.get("memory"))
    _draw_cpu(cpu_ax, series, limits.get("cpus"))
    for ax in (mem_ax, cpu_ax):
        _legend(ax)
    head = title if title is not None else (series.name or "")
    head += _subtitle(series)
    if head:
        fig.suptitle(head, fontsize=9)
    fig.tight_layout()
    return fig


def _runs(runs: Runs) -> List[Tuple[str, Series]]:
    if isinstance(runs, Mapping):
        return [(str(k), v) for k, v in runs.items()]
    out: List[Tuple[str, Series]] = []
    for item in runs:
        if isinstance(item, Series):
            out.append((item.name or f"run {len(out) + 1}", item))
        else:
            label, s = item
            out.append((str(label), s))
    return out


def compare_figure(runs: Runs, limits: Optional[Iterable[Optional[Mapping[str, Any]]]] = None,
                   *, title: Optional[str] = None, dpi: float = 90) -> Figure:
    """The same workload under several limits, side by side: one column per run (memory
    above, CPU below), axes shared so the heights compare.

    ``runs``: ``{label: Series}``, ``[(label, Series), ...]`` or ``[Series, ...]``;
    ``limits``: one mapping per run, for hosts whose samples lack the limits.
    """
    items = _runs(runs)
    if not items:
        raise ValueError("compare_figure needs at least one run")
    per_run = list(limits) if limits is not None else [None] * len(items)
    if len(per_run) != len(items):
        raise ValueError(f"{len(items)} runs but {len(per_run)} limit mappings")
    fig = UsageFigure(figsize=(3.2 * len(items) + 0.6, 4.6), dpi=dpi)
    axes = fig.subplots(2, len(items), sharey="row", squeeze=False)
    for col, ((label, s), lim) in enumerate(zip(items, per_run)):
        lim = dict(lim or {})
        _draw_memory(axes[0][col], s, lim.get("memory"))
        _draw_cpu(axes[1][col], s, lim.get("cpus"))
        axes[0][col].set_title(f"{label}: memory", fontsize=9)
        axes[1][col].set_title(f"{label}: CPU", fontsize=9)
        if col:
            axes[0][col].set_ylabel("")
            axes[1][col].set_ylabel("")
        for ax in (axes[0][col], axes[1][col]):
            _legend(ax)
    if title or any(s.approximate for _, s in items):
        fig.suptitle((title or "") + (_subtitle(items[0][1]) if items[0][1].approximate else ""),
                     fontsize=9)
    fig.tight_layout()
    return fig


def summary(series: Series) -> Dict[str, Any]:
    """Numbers a report prints beside the chart: peak memory, CPU seconds, events."""
    cpu = [v for v in series.column("cpu_time") if v is not None]
    return {"samples": len(series), "seconds": series.times[-1] if len(series) else 0.0,
            "peak_memory": series.peak_memory(),
            "cpu_time": (cpu[-1] - cpu[0]) if cpu else None,
            "oom_kills": sum(n for _, n in series.oom_events()),
            "throttled_periods": sum(n for _, n in series.throttle_events())}


class LiveChart:
    """The panel's chart: one figure kept between frames, its lines' data replaced and
    re-rendered to PNG (about a quarter of the cost of building a figure each time).
    Shows the last ``window`` seconds."""

    def __init__(self, width: float = 7.0, height: float = 2.3, dpi: float = 72,
                 window: float = 60.0) -> None:
        self.window = window
        self.fig = UsageFigure(figsize=(width, height), dpi=dpi)
        self.mem_ax, self.cpu_ax = self.fig.subplots(1, 2)
        self.fig.subplots_adjust(left=0.08, right=0.98, bottom=0.2, top=0.86, wspace=0.25)
        nan = [float("nan")]
        self.mem, = self.mem_ax.plot(nan, nan, drawstyle="steps-post", color=MEMORY_COLOR,
                                     label="memory")
        self.mem_limit, = self.mem_ax.plot(nan, nan, drawstyle="steps-post", linestyle="--",
                                           color=LIMIT_COLOR, label="limit")
        self.oom, = self.mem_ax.plot(nan, nan, linestyle="none", marker="X", markersize=8,
                                     color=LIMIT_COLOR, label="OOM kill")
        self.cpu, = self.cpu_ax.plot(nan, nan, drawstyle="steps-pre", color=CPU_COLOR,
                                     label="CPU")
        self.quota, = self.cpu_ax.plot(nan, nan, drawstyle="steps-post", linestyle="--",
                                       color=LIMIT_COLOR, label="quota")
        self.throttle, = self.cpu_ax.plot(nan, nan, linestyle="none", marker="v", markersize=5,
                                          color=THROTTLE_COLOR, label="throttled")
        self.mem_ax.set_title("memory (MiB)", fontsize=9)
        self.cpu_ax.set_title("CPU (CPUs busy)", fontsize=9)
        for ax in (self.mem_ax, self.cpu_ax):
            ax.tick_params(labelsize=7)
            ax.legend(loc="upper left", fontsize=6, framealpha=0.6)
        self.frames = 0

    def render(self, series: Series) -> bytes:
        samples = series.samples
        if samples:
            t_end = samples[-1].t
            cut = t_end - self.window
            samples = [s for s in samples if s.t >= cut]
        view = Series(samples)
        t = view.times
        nan = float("nan")
        self.mem.set_data(t, [nan if v is None else v / MIB for v in view.column("memory")])
        self.mem_limit.set_data(t, [nan if v is None else v / MIB
                                    for v in view.column("memory_limit")])
        ooms = view.oom_events()
        top = max([v / MIB for v in view.column("memory") + view.column("memory_limit")
                   if v is not None] + [1.0])
        self.oom.set_data([w for w, _ in ooms], [top] * len(ooms))
        rate = view.cpu_rate()
        self.cpu.set_data([w for w, _ in rate], [v for _, v in rate])
        quota = view.column("cpu_quota")
        self.quota.set_data(t, [nan if v is None else v for v in quota])
        thr = view.throttle_events()
        by_t = dict(zip(t, quota))
        self.throttle.set_data([w for w, _ in thr], [by_t.get(w) or 0.0 for w, _ in thr])
        for ax in (self.mem_ax, self.cpu_ax):
            ax.relim()
            ax.autoscale_view()
            ax.set_ylim(bottom=0)
            if t:
                ax.set_xlim(max(0.0, t[-1] - self.window), max(t[-1], 1.0))
        self.frames += 1
        return png(self.fig)
