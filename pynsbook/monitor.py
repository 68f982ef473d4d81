"""Sampling a container's usage over time: the series behind the panel's chart and the
``--plot`` figures, exportable as CSV or JSON.

A :class:`Monitor` reads ``Container.stats()`` (the cgroup's own files; on hosts without
cgroups, ``/proc`` sampled by the engine, marked approximate) from one daemon thread at a
fixed rate, on a monotonic grid so a slow sample does not shift the ones after it. Each
sample's cost is measured (wall and thread CPU time) and kept, so the overhead of watching
is a number, not a guess::

    >>> with Monitor(container, rate=10) as m:
    ...     container.run("...")
    >>> m.series.to_csv("usage.csv"); m.cost()
    {'samples': 31, 'cpu_per_sample_s': 0.00011, 'cpu_fraction': 0.0011, ...}

Nothing here imports the notebook stack: a monitor works in a plain script too.
"""
from __future__ import annotations

import csv
import io
import json
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

__all__ = ["Sample", "Series", "Monitor"]

#: samples a monitor keeps before dropping the oldest (an hour at 10 Hz)
MAX_SAMPLES = 36_000


@dataclass
class Sample:
    """One reading. Sizes in bytes, times in seconds (``t`` since the monitor started);
    ``None`` means unknown or unlimited."""

    t: float
    memory: Optional[int] = None
    memory_peak: Optional[int] = None
    memory_limit: Optional[int] = None
    cpu_time: Optional[float] = None
    cpu_quota: Optional[float] = None
    throttled_count: Optional[int] = None
    throttled_time: Optional[float] = None
    pids: Optional[int] = None
    pids_limit: Optional[int] = None
    oom_kills: Optional[int] = None
    frozen: Optional[bool] = None


FIELDS: Tuple[str, ...] = tuple(f.name for f in fields(Sample))


def sample_from_stats(t: float, st: Any) -> Sample:
    """A :class:`Sample` from a :class:`pynsbook.Stats`."""
    return Sample(t=t, memory=st.memory_current, memory_peak=st.memory_peak,
                  memory_limit=st.memory_limit, cpu_time=st.cpu_time, cpu_quota=st.cpu_quota,
                  throttled_count=st.throttled_count, throttled_time=st.throttled_time,
                  pids=st.pids_current, pids_limit=st.pids_limit, oom_kills=st.oom_kills,
                  frozen=st.frozen)


class Series:
    """Samples of one container, oldest first, with the derived views charts need."""

    def __init__(self, samples: Optional[List[Sample]] = None, *, name: str = "",
                 backend: str = "", approximate: bool = False, rate: float = 0.0,
                 started_at: Optional[float] = None) -> None:
        self.samples: List[Sample] = list(samples or [])
        self.name = name
        self.backend = backend
        self.approximate = approximate
        self.rate = rate
        #: wall-clock time (time.time()) of t = 0
        self.started_at = started_at

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __repr__(self) -> str:
        span = f"{self.samples[-1].t:.1f} s" if self.samples else "empty"
        return f"<Series {self.name or '?'}: {len(self.samples)} samples, {span}, {self.backend}>"

    def column(self, name: str) -> List[Any]:
        return [getattr(s, name) for s in self.samples]

    @property
    def times(self) -> List[float]:
        return [s.t for s in self.samples]

    def cpu_rate(self) -> List[Tuple[float, float]]:
        """(t, CPUs in use) between consecutive samples: the CPU time's slope, drawn at the
        end of each interval (1.0 = one core busy)."""
        out = []
        prev: Optional[Sample] = None
        for s in self.samples:
            if prev is not None and s.cpu_time is not None and prev.cpu_time is not None \
                    and s.t > prev.t:
                out.append((s.t, max(0.0, (s.cpu_time - prev.cpu_time) / (s.t - prev.t))))
            prev = s
        return out

    def _increases(self, name: str) -> List[Tuple[float, int]]:
        out = []
        prev: Optional[int] = None
        for s in self.samples:
            value = getattr(s, name)
            if value is None:
                continue
            if prev is not None and value > prev:
                out.append((s.t, value - prev))
            prev = value
        return out

    def oom_events(self) -> List[Tuple[float, int]]:
        """(t, OOM kills since the previous sample) wherever the count went up."""
        return self._increases("oom_kills")

    def throttle_events(self) -> List[Tuple[float, int]]:
        """(t, periods throttled since the previous sample) wherever the CPU quota bit."""
        return self._increases("throttled_count")

    def peak_memory(self) -> Optional[int]:
        """The highest memory seen: the cgroup's own high-water mark where it has one
        (it sees between samples), else the highest sample."""
        peaks = [v for v in self.column("memory_peak") + self.column("memory") if v is not None]
        return max(peaks) if peaks else None

    # -- export ---------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "approximate": self.approximate,
                "rate": self.rate, "started_at": self.started_at,
                "fields": list(FIELDS), "samples": [asdict(s) for s in self.samples]}

    def to_json(self, path: Optional[str] = None) -> str:
        """The series as JSON (written to ``path`` too, if given)."""
        text = json.dumps(self.to_dict())
        if path:
            with open(path, "w") as f:
                f.write(text)
        return text

    def to_csv(self, path: Optional[str] = None) -> str:
        """One row per sample, one column per :class:`Sample` field; empty cells for
        unknown values (written to ``path`` too, if given)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(FIELDS)
        for s in self.samples:
            w.writerow(["" if v is None else (int(v) if isinstance(v, bool) else v)
                        for v in (getattr(s, k) for k in FIELDS)])
        text = buf.getvalue()
        if path:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Series":
        samples = [Sample(**{k: v for k, v in s.items() if k in FIELDS})
                   for s in data.get("samples", [])]
        return cls(samples, name=data.get("name", ""), backend=data.get("backend", ""),
                   approximate=bool(data.get("approximate")), rate=data.get("rate", 0.0),
                   started_at=data.get("started_at"))

    @classmethod
    def from_json(cls, text: str) -> "Series":
        return cls.from_dict(json.loads(text))


class Monitor:
    """Sample ``container`` ``rate`` times a second from a daemon thread.

    ``start()``/``stop()`` (or ``with``); ``sample()`` takes one reading now, from any
    thread. The monitor ends by itself when the container stops. ``on_sample`` callbacks
    run in the sampling thread after each sample (keep them short).
    """

    def __init__(self, container: Any, rate: float = 10.0,
                 max_samples: int = MAX_SAMPLES) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be above 0 samples a second, not {rate!r}")
        self.container = container
        self.rate = float(rate)
        self.max_samples = max_samples
        self.series = Series(name=getattr(container, "name", ""), rate=self.rate)
        self.on_sample: List[Callable[[Sample], None]] = []
        #: why sampling ended by itself (the container stopped), or None
        self.ended: Optional[str] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._t0: Optional[float] = None
        self._cost_wall = 0.0
        self._cost_cpu = 0.0
        self._cost_n = 0
        self._late = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Monitor":
        if self.running:
            return self
        self._stop.clear()
        self.ended = None
        if self._t0 is None:
            self._t0 = time.monotonic()
            self.series.started_at = time.time()
        self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"pynsbook-monitor-{self.series.name}")
        self._thread.start()
        return self

    def stop(self) -> "Monitor":
        """Stop sampling, after one last sample (if the container still runs)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        if self.ended is None:
            self.sample()
        return self

    def __enter__(self) -> "Monitor":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def sample(self) -> Optional[Sample]:
        """Read the container's usage now and append it; None once it has stopped."""
        if self._t0 is None:
            self._t0 = time.monotonic()
            self.series.started_at = time.time()
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            st = self.container.stats()
        except Exception as err:  # stopped (ContainerStateError) or its cgroup went away
            self.ended = f"{type(err).__name__}: {err}"
            return None
        s = sample_from_stats(time.monotonic() - self._t0, st)
        w1, c1 = time.perf_counter(), time.thread_time()
        with self._lock:
            self.series.backend = st.backend
            self.series.approximate = st.approximate
            self.series.samples.append(s)
            if len(self.series.samples) > self.max_samples:
                del self.series.samples[: len(self.series.samples) - self.max_samples]
            self._cost_wall += w1 - w0
            self._cost_cpu += c1 - c0
            self._cost_n += 1
        for cb in list(self.on_sample):
            try:
                cb(s)
            except Exception:  # a broken listener must not stop the sampling
                pass
        return s

    def _loop(self) -> None:
        period = 1.0 / self.rate
        next_at = time.monotonic() + period
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            if self.sample() is None:
                return
            next_at += period
            now = time.monotonic()
            if now > next_at:  # fell behind (a stalled host): skip, do not burst
                self._late += int((now - next_at) / period) + 1
                next_at = now + period

    def snapshot(self) -> Series:
        """A copy of the series so far, safe to draw while sampling goes on."""
        with self._lock:
            s = self.series
            return Series(list(s.samples), name=s.name, backend=s.backend,
                          approximate=s.approximate, rate=s.rate, started_at=s.started_at)

    def cost(self) -> Dict[str, float]:
        """What sampling cost: per sample (wall and this thread's CPU time) and as a
        fraction of one CPU at this rate; ``late`` counts samples skipped for being late."""
        n = max(1, self._cost_n)
        per_cpu = self._cost_cpu / n
        return {"samples": self._cost_n, "wall_per_sample_s": self._cost_wall / n,
                "cpu_per_sample_s": per_cpu, "cpu_fraction": per_cpu * self.rate,
                "late": self._late}
