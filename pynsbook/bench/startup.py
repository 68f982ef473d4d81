"""``pynsbook bench startup``: time every subject, print pynsbook next to its peers, and
the ratios of issue 7 — honestly, pass or fail.

Issue-7 goals (all numbers from the same run):
- pynsbook, a *new* container running the Python cell ``pass`` (five namespaces, memory,
  CPU and pids limits), request to result, at most 0.35x ``crun run`` of ``/bin/true``;
- the same within 1.5x of the floor: fork + unshare(pid,mnt,uts,ipc,net) + fork + mount
  ``/proc`` inside an already running Python.

Issue-17 goal: the command ``pynsbook run -- /bin/true`` (a new process, start to exit: the
``pynsbook-cli-true`` subject) at most 6x ``crun run`` of ``/bin/true``, measured interleaved
with it (``--subjects pynsbook-cli-true,crun,crun-prep``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .harness import BenchRun, measure
from .subjects import startup_subjects

#: (reference, goal) — ratio = median(candidate) / median(reference)
GOALS = [("crun", 0.35), ("floor", 1.5)]
#: pynsbook subjects judged against the goals: a *new* container running Python `pass`.
#: A subject registered later (the warm launcher of issue 7) appends its name here.
GOAL_CANDIDATES: List[str] = ["pynsbook-cold-pass", "pynsbook-unprepared-pass"]
PEERS = ["unshare", "bwrap", "crun", "runc", "microvm"]
#: issue 17: (subject, reference, goal) for the command as a user runs it, start to exit
COMMAND_GOALS = [("pynsbook-cli-true", "crun", 6.0)]


def run_startup(subjects: Optional[str] = None, *, repeat: int = 20, warmup: int = 2,
                kernel_path: Optional[str] = None, show_progress: bool = True) -> BenchRun:
    subs = startup_subjects(subjects, kernel_path)
    run = measure(subs, kind="startup", repeat=repeat, warmup=warmup,
                  show_progress=show_progress)
    run.config["subjects"] = [s.name for s in subs]
    run.data["goals"] = goal_ratios(run)
    run.data["command_goals"] = command_goal_ratios(run)
    run.data["peers"] = peer_ratios(run)
    run.data["confinement"] = confinement_costs(run)
    vm = run.get("microvm")
    if vm is not None and vm.meta.get("accel"):
        run.env["vm_accel"] = vm.meta["accel"]
    return run


def goal_ratios(run: BenchRun) -> List[Dict[str, Any]]:
    out = []
    for ours in GOAL_CANDIDATES:
        if run.get(ours) is None and ours != "pynsbook-cold-pass":
            continue  # a registered candidate that was not part of this run
        for base, goal in GOALS:
            out.append(_ratio(run, ours, base, goal))
    return out


def command_goal_ratios(run: BenchRun) -> List[Dict[str, Any]]:
    """The issue-17 ratios, for the subjects of COMMAND_GOALS that were part of this run."""
    return [_ratio(run, ours, base, goal) for ours, base, goal in COMMAND_GOALS
            if run.get(ours) is not None]


def _ratio(run: BenchRun, ours: str, base: str, goal: float) -> Dict[str, Any]:
    a, b = run.median(ours), run.median(base)
    entry: Dict[str, Any] = {"subject": ours, "reference": base, "goal": goal,
                             "what": f"{_label(run, ours)} vs {_label(run, base)}"}
    if a is None or b is None:
        missing = [n for n, v in ((ours, a), (base, b)) if v is None]
        entry.update(ratio=None, met=None,
                     why=f"not measured in this run: {', '.join(missing)}" + _reason(run, missing))
    else:
        entry.update(ours_s=a, reference_s=b, ratio=a / b, met=a / b <= goal)
        prep, fork = run.median("crun-prep"), run.median("fork")
        if base == "crun" and prep is not None and fork is not None and b > prep - fork > 0:
            # the hybrid workaround is ours, not crun's: say what crun costs without it
            adj = b - (prep - fork)
            entry.update(workaround_s=prep - fork, reference_adjusted_s=adj,
                         ratio_adjusted=a / adj, met_adjusted=a / adj <= goal)
    return entry


#: issue 17: what the default confinement may add to a prepared start (median)
CONFINEMENT_GOAL_S = 0.3e-3


def confinement_costs(run: BenchRun) -> List[Dict[str, Any]]:
    """Each confined start against the same start --privileged, from this run."""
    out = []
    for r in run.results:
        if "-unconfined-" not in r.name:
            continue
        confined = r.name.replace("unconfined-", "")
        a, b = run.median(confined), run.median(r.name)
        if a is None or b is None:
            continue
        entry: Dict[str, Any] = {"subject": confined, "unconfined": r.name, "confined_s": a,
                                 "unconfined_s": b, "cost_s": a - b}
        if confined.startswith("pynsbook-cold-"):  # the goal is for prepared starts
            entry.update(goal_s=CONFINEMENT_GOAL_S, met=a - b <= CONFINEMENT_GOAL_S)
        out.append(entry)
    return out


def peer_ratios(run: BenchRun) -> List[Dict[str, Any]]:
    ours = [r for r in run.results if r.group == "pynsbook" and r.status == "ok"]
    out = []
    for peer in PEERS:
        p = run.median(peer)
        if p is None:
            continue
        for r in ours:
            out.append({"subject": r.name, "peer": peer, "ratio": r.median / p})  # type: ignore[operator]
    return out


def _label(run: BenchRun, name: str) -> str:
    r = run.get(name)
    return r.label if r else name


def _reason(run: BenchRun, names: List[str]) -> str:
    bits = []
    for n in names:
        r = run.get(n)
        if r is not None and r.reason:
            bits.append(f"{n}: {r.reason}")
    return f" ({'; '.join(bits)})" if bits else ""


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 0.01:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e3:.2f} ms"


def fmt_ratio(x: float) -> str:
    """0.72x; and 1/254x rather than 0.00x for tiny ratios."""
    return f"{x:.2f}x" if x >= 0.01 else f"1/{1 / x:.0f}x"


def format_startup(run: BenchRun) -> str:
    """The text ``pynsbook bench startup`` prints."""
    env = run.env
    lines = [f"startup: median of {run.config.get('repeat')} runs after {run.config.get('warmup')} "
             f"warm-up, interleaved; {env.get('kernel')}, {env.get('cpus')} CPUs, "
             f"cgroup {env.get('cgroup_mode')}, load {env.get('loadavg_start')}",
             f"{'subject':<58} {'median':>9} {'IQR':>19} {'95% CI of median':>21} {'n':>3}"]
    for r in run.results:
        s = r.summary
        if r.status != "ok" or s is None:
            continue
        iqr = f"{fmt_time(s.q1)}-{fmt_time(s.q3)}"
        ci = f"{fmt_time(s.ci_low)}-{fmt_time(s.ci_high)}"
        lines.append(f"{r.label[:58]:<58} {fmt_time(s.median):>9} {iqr:>19} {ci:>21} {s.n:>3}")
    for r in run.results:
        if r.status != "ok":
            lines.append(f"{r.status}: {r.name} — {r.reason}")
    ours = [r for r in run.results if r.group == "pynsbook" and r.status == "ok"]
    peers = [p for p in PEERS if run.median(p) is not None]
    if ours and peers:
        lines.append("")
        lines.append("pynsbook next to its peers (median, same run; ratio = pynsbook / peer):")
        for r in ours:
            parts = [f"{p} {fmt_time(run.median(p))} ({fmt_ratio(r.median / run.median(p))})"  # type: ignore[operator]
                     for p in peers]
            lines.append(f"  {r.name} {fmt_time(r.median)}: " + ", ".join(parts))
    if run.data.get("confinement"):
        lines.append("")
        lines.append("what confinement costs (median confined - median --privileged, same run):")
        for c in run.data["confinement"]:
            verdict = ""
            if "goal_s" in c:
                verdict = f"  (goal <= {fmt_time(c['goal_s'])})  {'MET' if c['met'] else 'NOT MET'}"
            lines.append(f"  {c['subject']}: {fmt_time(c['confined_s'])} - {fmt_time(c['unconfined_s'])}"
                         f" = {fmt_time(c['cost_s'])}{verdict}")
    lines.append("")
    lines.append("issue 7 goals (ratios from this run):")
    lines += _goal_lines(run.data.get("goals", []))
    if run.data.get("command_goals"):
        lines.append("")
        lines.append("issue 17 goal, the command from process start to exit (ratio from this run):")
        lines += _goal_lines(run.data["command_goals"])
    return "\n".join(lines)


def _goal_lines(goals: List[Dict[str, Any]]) -> List[str]:
    lines = []
    for g in goals:
        if g.get("ratio") is None:
            lines.append(f"  {g['subject']} / {g['reference']}: not measured — {g.get('why')}")
            continue
        verdict = "MET" if g["met"] else "NOT MET"
        lines.append(f"  {g['subject']} / {g['reference']} = {fmt_time(g['ours_s'])} / "
                     f"{fmt_time(g['reference_s'])} = {g['ratio']:.2f}x  (goal <= {g['goal']}x)  {verdict}")
        if g.get("ratio_adjusted") is not None:
            lines.append(f"    crun without its hybrid-host workaround ({fmt_time(g['workaround_s'])} "
                         f"measured by crun-prep - fork): {fmt_time(g['reference_adjusted_s'])}, ratio "
                         f"{g['ratio_adjusted']:.2f}x  {'MET' if g['met_adjusted'] else 'NOT MET'}")
    return lines
