"""The benchmark harness: subjects, interleaved repeats with warm-up, results that carry
their environment, and JSON/CSV output.

A :class:`Subject` is one thing to time (a fork, ``crun run``, a microVM boot...). The
harness times ``once()`` with ``time.perf_counter`` unless ``once()`` returns its own
measurement in seconds (a VM boot reports QEMU-start-to-ready, measured where it happens).

Order is interleaved — round 1 runs A, B, C; round 2 runs A, B, C again; ... — so drift of
the machine (other jobs, frequency, caches) hits every subject alike instead of the one that
happened to run last. Subjects that are absent are *skipped with a reason*; subjects that
fail are reported as failed with the error, never silently dropped.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from .stats import Summary, summarize

SCHEMA = "pynsbook.bench/1"


class BenchUsageError(ValueError):
    """Bad input to a benchmark (unknown subject, N out of range, missing kernel...).
    ``str()`` is one line for the command line."""


class Subject:
    """One thing to time. Subclasses override ``once`` and, if needed, ``check``,
    ``setup`` and ``teardown``."""

    #: short id used on the command line (``--subjects``)
    name: str = ""
    #: what the chart and the table say
    label: str = ""
    #: baseline | namespace | pynsbook | peer | vm | test
    group: str = "test"
    #: at most this many measured runs (slow subjects such as VM boots); None = --repeat
    max_repeat: Optional[int] = None
    #: at most this many warm-up runs
    max_warmup: Optional[int] = None

    def __init__(self) -> None:
        self.meta: Dict[str, Any] = {}

    def check(self) -> Optional[str]:
        """Why this subject cannot run here, or None when it can."""
        return None

    def setup(self) -> None:
        """Prepare once before the first run (build a bundle, boot a warm container...)."""

    def once(self) -> Optional[float]:
        """Run once. Return None to be timed by the harness, or seconds measured inside."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Undo ``setup``; called even after an error or an interrupt."""


class FuncSubject(Subject):
    """A subject made of a function (tests, notebooks)."""

    def __init__(self, name: str, fn: Callable[[], Optional[float]], label: str = "",
                 group: str = "test", check: Optional[Callable[[], Optional[str]]] = None,
                 max_repeat: Optional[int] = None) -> None:
        super().__init__()
        self.name, self.label, self.group = name, label or name, group
        self._fn, self._check, self.max_repeat = fn, check, max_repeat

    def check(self) -> Optional[str]:
        return self._check() if self._check else None

    def once(self) -> Optional[float]:
        return self._fn()


@dataclass
class SubjectResult:
    name: str
    label: str
    group: str
    status: str  # ok | skipped | failed
    reason: str = ""
    samples: List[float] = field(default_factory=list)
    errors: int = 0
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> Optional[Summary]:
        return summarize(self.samples)

    @property
    def median(self) -> Optional[float]:
        s = self.summary
        return s.median if s else None

    def to_dict(self) -> Dict[str, Any]:
        s = self.summary
        return {"name": self.name, "label": self.label, "group": self.group,
                "status": self.status, "reason": self.reason, "errors": self.errors,
                "samples": self.samples, "summary": s.to_dict() if s else None,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SubjectResult":
        return cls(name=d["name"], label=d.get("label", d["name"]), group=d.get("group", ""),
                   status=d.get("status", "ok"), reason=d.get("reason", ""),
                   samples=[float(x) for x in d.get("samples", [])], errors=d.get("errors", 0),
                   meta=d.get("meta", {}))


@dataclass
class BenchRun:
    """The results of one benchmark run (startup, density or overhead) and where it ran."""

    kind: str
    unit: str = "s"
    results: List[SubjectResult] = field(default_factory=list)
    env: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    #: the order the measured runs happened in (subject names), for auditing interleaving
    order: List[str] = field(default_factory=list)
    #: kind-specific data (density curves, overhead tables)
    data: Dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    seconds: float = 0.0

    def get(self, name: str) -> Optional[SubjectResult]:
        return next((r for r in self.results if r.name == name), None)

    def median(self, name: str) -> Optional[float]:
        r = self.get(name)
        return r.median if r is not None and r.status == "ok" else None

    def to_dict(self) -> Dict[str, Any]:
        return {"schema": SCHEMA, "kind": self.kind, "unit": self.unit, "started": self.started,
                "seconds": self.seconds, "env": self.env, "config": self.config,
                "order": self.order, "results": [r.to_dict() for r in self.results],
                "data": self.data}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "BenchRun":
        if d.get("schema") != SCHEMA:
            raise BenchUsageError(f"not a pynsbook benchmark result (schema {d.get('schema')!r})")
        return cls(kind=d["kind"], unit=d.get("unit", "s"),
                   results=[SubjectResult.from_dict(r) for r in d.get("results", [])],
                   env=d.get("env", {}), config=d.get("config", {}), order=d.get("order", []),
                   data=d.get("data", {}), started=d.get("started", 0.0),
                   seconds=d.get("seconds", 0.0))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    def write_json(self, path: str) -> None:
        _write_atomic(path, self.to_json() + "\n")

    CSV_FIELDS = ("kind", "subject", "label", "group", "status", "unit", "n", "median", "q1",
                  "q3", "iqr", "ci_low", "ci_high", "min", "max", "mean", "errors", "reason")

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.CSV_FIELDS)
        for r in self.results:
            s = r.summary
            nums = ([s.n, s.median, s.q1, s.q3, s.iqr, s.ci_low, s.ci_high, s.min, s.max, s.mean]
                    if s else [0] + [""] * 9)
            w.writerow([self.kind, r.name, r.label, r.group, r.status, self.unit, *nums,
                        r.errors, r.reason])
        return buf.getvalue()

    def write_csv(self, path: str) -> None:
        _write_atomic(path, self.to_csv())


def load_runs(path: str) -> List[BenchRun]:
    """Benchmark runs from a JSON file written by ``--json`` or by a report."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise BenchUsageError(f"no such results file: {path}") from None
    except (OSError, ValueError) as err:
        raise BenchUsageError(f"cannot read {path}: {err}") from None
    items = d.get("runs") if isinstance(d, dict) and "runs" in d else [d]
    return [BenchRun.from_dict(x) for x in items]


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise BenchUsageError(f"cannot write {path}: no such directory {directory}")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- progress


def progress(total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm.auto bar (a widget in a notebook, text in a terminal), or a no-op."""
    if enabled:
        try:
            from tqdm.auto import tqdm
            tqdm.monitor_interval = 0  # no monitor thread: subjects fork
            in_notebook = "ipykernel" in sys.modules  # a widget there, whatever isatty says
            return tqdm(total=total, desc=desc, leave=False, unit="run",
                        disable=False if in_notebook else None)  # None: off when not a TTY
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- measuring


def measure(subjects: Sequence[Subject], *, kind: str = "startup", repeat: int = 10,
            warmup: int = 2, show_progress: bool = True, max_failures: int = 3,
            clock: Callable[[], float] = time.perf_counter) -> BenchRun:
    """Time every subject ``repeat`` times after ``warmup`` unrecorded runs, interleaved.

    Unavailable subjects are skipped with their reason. A subject that raises
    ``max_failures`` times is marked failed with the last error and leaves the rotation.
    Teardown runs for every subject that was set up, whatever happens (Ctrl-C included).
    """
    if repeat < 1:
        raise BenchUsageError(f"--repeat must be at least 1, not {repeat}")
    if warmup < 0:
        raise BenchUsageError(f"--warmup must be 0 or more, not {warmup}")
    names = [s.name for s in subjects]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise BenchUsageError(f"subject named twice: {', '.join(sorted(dup))}")
    run = BenchRun(kind=kind, config={"repeat": repeat, "warmup": warmup,
                                      "order": "interleaved"})
    run.env = environment()
    t_start = time.monotonic()
    results: Dict[str, SubjectResult] = {}
    active: List[Subject] = []
    ready: List[Subject] = []
    try:
        for s in subjects:
            res = results[s.name] = SubjectResult(s.name, s.label or s.name, s.group, "ok")
            why = s.check()
            if why:
                res.status, res.reason = "skipped", why
                continue
            try:
                ready.append(s)
                s.setup()
            except KeyboardInterrupt:
                raise
            except Exception as err:  # a subject that cannot start is reported, not fatal
                res.status, res.reason = "skipped", f"setup failed: {_one_line(err)}"
                continue
            res.label = s.label or s.name  # setup may know more (the VM's accelerator)
            active.append(s)
        reps = {s.name: min(repeat, s.max_repeat or repeat) for s in active}
        warms = {s.name: min(warmup, s.max_warmup if s.max_warmup is not None else warmup)
                 for s in active}
        total = sum(reps.values()) + sum(warms.values())
        bar = progress(total, kind, show_progress)
        fails: Dict[str, int] = {s.name: 0 for s in active}
        try:
            rounds = max([warmup + repeat] + [0])
            for rnd in range(rounds):
                for s in list(active):
                    res = results[s.name]
                    warming = rnd < warmup
                    if warming and rnd >= warms[s.name]:
                        continue
                    if not warming and rnd - warmup >= reps[s.name]:
                        continue
                    bar.set_postfix_str(s.name)
                    t0 = clock()
                    try:
                        own = s.once()
                        elapsed = clock() - t0
                    except KeyboardInterrupt:
                        raise
                    except Exception as err:
                        res.errors += 1
                        res.reason = _one_line(err)
                        fails[s.name] += 1
                        bar.update(1)
                        if fails[s.name] >= max_failures:
                            res.status = "failed"
                            active.remove(s)
                        continue
                    fails[s.name] = 0
                    bar.update(1)
                    if not warming:
                        res.samples.append(float(own) if own is not None else elapsed)
                        run.order.append(s.name)
        finally:
            bar.close()
    finally:
        for s in reversed(ready):
            try:
                s.teardown()
            except Exception as err:  # pragma: no cover - reported, never hidden
                results[s.name].meta["teardown_error"] = _one_line(err)
            results[s.name].meta.update(s.meta)
    for res in results.values():
        if res.status == "ok" and not res.samples:
            res.status = "failed"
            res.reason = res.reason or "no successful run"
    run.results = [results[n] for n in names]
    run.seconds = time.monotonic() - t_start
    run.env["loadavg_end"] = _loadavg()
    return run


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip().rstrip(":")


# --------------------------------------------------------------------------- environment


def _loadavg() -> Optional[List[float]]:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo_kib(key: str) -> Optional[int]:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


_VERSION_ARGS = {"crun": ["--version"], "runc": ["--version"], "bwrap": ["--version"],
                 "unshare": ["--version"], "qemu-system-x86_64": ["--version"],
                 "stress-ng": ["--version"]}


def tool_versions() -> Dict[str, Optional[str]]:
    """First line of ``--version`` of each peer tool, None when absent."""
    out: Dict[str, Optional[str]] = {}
    for tool, args in _VERSION_ARGS.items():
        path = shutil.which(tool)
        if not path:
            out[tool] = None
            continue
        try:
            r = subprocess.run([path, *args], capture_output=True, text=True, timeout=10)
            lines = (r.stdout or r.stderr).strip().splitlines()
            out[tool] = lines[0] if lines else "?"
        except (OSError, subprocess.TimeoutExpired):
            out[tool] = "?"
    return out


_ENV_CACHE: Dict[str, Any] = {}


def environment() -> Dict[str, Any]:
    """Where a benchmark ran: kernel, CPU, memory, cgroup mode, tool versions, KVM."""
    if not _ENV_CACHE:
        from .. import __version__, cgroups
        try:
            cg_mode = cgroups.mode()
        except OSError:
            cg_mode = "unknown"
        _ENV_CACHE.update({
            "kernel": f"{platform.system()} {platform.release()}",
            "machine": platform.machine(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "mem_total_kib": _meminfo_kib("MemTotal"),
            "cgroup_mode": cg_mode,
            "euid": os.geteuid(),
            "python": platform.python_version(),
            "pynsbook": __version__,
            "tools": tool_versions(),
            "kvm_device": os.access("/dev/kvm", os.R_OK | os.W_OK),
        })
    env = dict(_ENV_CACHE)
    env["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    env["loadavg_start"] = _loadavg()
    return env
