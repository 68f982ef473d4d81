"""``pynsbook bench churn``: N containers one after another, each started, running the
Python cell ``pass`` and removed — a sweep over limits, or cell after cell.

Issue 7 asks that the time per container does not grow with N and that nothing is left
behind. Each subject runs its N starts back to back (not interleaved with the others, so a
spare container must be ready in time or the start pays for a new one); growth is the
median of the last 10% of starts over the first 10%. After pynsbook's subjects, the host is
checked: no process, cgroup or mount of the containers may remain (the warm launcher and
a waiting spare are pynsbook's by design, and are named as such).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from ..linux.mountinfo import mount_keys
from .harness import BenchRun, BenchUsageError, SubjectResult, environment, progress
from .stats import median
from .subjects import OCIPeer, PynsbookCold, parse_subjects

MAX_N = 5000
#: the issue's "does not grow": last 10% of starts within this factor of the first 10%
GROWTH_GOAL = 1.25
KINDS = {"pynsbook": lambda: PynsbookCold("pass"),
         "pynsbook-unprepared": lambda: PynsbookCold("pass", prepared=False),
         "crun": lambda: OCIPeer("crun")}


def growth(samples: List[float]) -> Optional[float]:
    """median(last 10%) / median(first 10%); None with fewer than 10 samples."""
    if len(samples) < 10:
        return None
    k = max(1, len(samples) // 10)
    return median(samples[-k:]) / median(samples[:k])


def leftovers(mounts_before: List[str], wait: float = 3.0) -> List[str]:
    """What pynsbook's containers left on the host: processes under the launcher that are
    not a waiting spare's, container cgroups of this session, and new host mounts — after
    ``wait`` seconds at most for the last ones to finish leaving (they do so asynchronously:
    ``run`` returns before its container is removed)."""
    deadline = time.monotonic() + wait
    while True:
        left = _leftovers_now(mounts_before)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _leftovers_now(mounts_before: List[str]) -> List[str]:
    import psutil

    from .. import cgroups
    from ..engine import background, pool, spawn
    background.drain(10)
    spare_pids, spare_dirs = pool.footprint()
    out: List[str] = []
    launcher = spawn.launcher_pid()
    if launcher:
        try:
            children = psutil.Process(launcher).children(recursive=True)
        except psutil.Error:
            children = []  # the launcher itself has just left
        out += [f"process {p.pid} ({_command(p)})" for p in children if p.pid not in spare_pids]
    out += [f"cgroup {d}" for d in cgroups.backend().session_dirs() if d not in spare_dirs]
    out += [f"mount {m}" for m in sorted(set(mount_keys()) - set(mounts_before))]
    return out


def _command(p: "psutil.Process") -> str:
    """A process's command line, for a report; one that ended meanwhile says so (a zombie
    its parent has not reaped yet has none)."""
    import psutil
    try:
        return " ".join(p.cmdline())[:60]
    except psutil.ZombieProcess:
        return "ended, not yet reaped"
    except psutil.Error:
        return "gone"


def run_churn(n: int = 500, kinds: Optional[str] = None, show_progress: bool = True) -> BenchRun:
    if not 10 <= n <= MAX_N:
        raise BenchUsageError(f"-n must be between 10 and {MAX_N}, not {n}")
    chosen = parse_subjects(kinds, list(KINDS))
    run = BenchRun(kind="churn", env=environment(), config={"n": n, "kinds": chosen})
    t0 = time.monotonic()
    for kind in chosen:
        subject = KINDS[kind]()
        res = SubjectResult(kind, subject.label, subject.group, "ok")
        run.results.append(res)
        why = subject.check()
        if why:
            res.status, res.reason = "skipped", why
            continue
        mounts = mount_keys()
        bar = progress(n, f"churn {kind}", show_progress)
        try:
            subject.setup()
            subject.once()  # first-time costs (imports, the launcher) are not the curve's
            for _ in range(n):
                t = time.perf_counter()
                subject.once()
                res.samples.append(time.perf_counter() - t)
                run.order.append(kind)
                bar.update(1)
        except Exception as err:  # noqa: BLE001 - report how far it got
            res.status = "failed" if not res.samples else "ok"
            res.reason = f"start {len(res.samples) + 1} failed: {err}"
        finally:
            bar.close()
            subject.teardown()
        res.meta["growth"] = growth(res.samples)
        if subject.group == "pynsbook":
            res.meta["left_behind"] = leftovers(mounts)
    run.seconds = time.monotonic() - t0
    return run


def format_churn(run: BenchRun) -> str:
    from .startup import fmt_time
    n = run.config.get("n")
    lines = [f"churn: {n} containers one after another, each started, running `pass` and "
             f"removed; {run.env.get('kernel')}, {run.env.get('cpus')} CPUs, load {run.env.get('loadavg_start')}",
             f"{'subject':<50} {'median':>9} {'first 10%':>10} {'last 10%':>9} {'growth':>7}  left behind"]
    verdict: Dict[str, Any] = {}
    for r in run.results:
        if r.status != "ok":
            lines.append(f"{r.status}: {r.name} — {r.reason}")
            continue
        k = max(1, len(r.samples) // 10)
        g = r.meta.get("growth")
        left = r.meta.get("left_behind")
        left_text = "n/a (a peer)" if left is None else ("nothing" if not left else
                                                        f"{len(left)}: {'; '.join(left[:3])}")
        lines.append(f"{r.label[:50]:<50} {fmt_time(r.median):>9} {fmt_time(median(r.samples[:k])):>10} "
                     f"{fmt_time(median(r.samples[-k:])):>9} {(f'{g:.2f}x' if g else '-'):>7}  {left_text}")
        if r.reason:
            lines.append(f"  note: {r.reason}")
        if r.group == "pynsbook":
            verdict[r.name] = (g is not None and g <= GROWTH_GOAL and not left)
    for name, met in verdict.items():
        lines.append(f"issue 7 goal, {name}: time per container does not grow with N "
                     f"(last 10% <= {GROWTH_GOAL}x first 10%) and nothing is left: "
                     f"{'MET' if met else 'NOT MET'}")
    return "\n".join(lines)
