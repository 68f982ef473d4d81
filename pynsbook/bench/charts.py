"""Charts of benchmark runs (each function returns a matplotlib Figure) and the classic
containers-versus-VMs comparison table rebuilt from measured numbers."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .harness import BenchRun

GROUP_COLORS = {"baseline": "#7f7f7f", "namespace": "#9ecae1", "pynsbook": "#d62728",
                "peer": "#1f77b4", "vm": "#ff7f0e", "native": "#2ca02c", "test": "#8c564b"}
MIB = 1 << 20


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    return Figure(figsize=(w, h), layout="constrained")


def _note(fig: Any, text: str) -> None:
    if text:
        fig.text(0.01, 0.005, text, fontsize=7, color="#555", ha="left", va="bottom", wrap=True)


def startup_chart(run: BenchRun) -> Any:
    """Median start time per subject (bars; whiskers = IQR) on a log axis."""
    import textwrap
    ok = [r for r in run.results if r.status == "ok" and r.samples]
    fig = _figure(11, 0.42 * max(len(ok), 3) + 1.8)
    ax = fig.add_subplot()
    names = ["\n".join(textwrap.wrap(r.label, 48)) for r in ok]
    meds = [r.summary.median * 1e3 for r in ok]  # type: ignore[union-attr]
    lo = [m - r.summary.q1 * 1e3 for m, r in zip(meds, ok)]  # type: ignore[union-attr]
    hi = [r.summary.q3 * 1e3 - m for m, r in zip(meds, ok)]  # type: ignore[union-attr]
    y = list(range(len(ok)))[::-1]
    ax.barh(y, meds, xerr=[lo, hi], color=[GROUP_COLORS.get(r.group, "#999") for r in ok],
            capsize=2, error_kw={"elinewidth": 0.8})
    for yi, m, h in zip(y, meds, hi):
        ax.text((m + h) * 1.12, yi, f"{m:.3g} ms" if m < 1000 else f"{m / 1000:.3g} s",
                va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("median start-to-finish time (ms, log scale); whiskers: IQR")
    accel = run.env.get("vm_accel")
    ax.set_title(f"Start time per subject\n{run.env.get('kernel', '')}, "
                 f"{run.env.get('cpus', '?')} CPUs, load {run.env.get('loadavg_start')}"
                 + (f", VM: {accel}" if accel else ""), fontsize=9)
    ax.grid(axis="x", which="both", alpha=0.3)
    if meds:
        ax.set_xlim(min(meds) / 2, max(m + h for m, h in zip(meds, hi)) * 6)
    skipped = [f"{r.name}: {r.reason}" for r in run.results if r.status != "ok"]
    _note(fig, ("not measured — " + "; ".join(skipped))[:400] if skipped else "")
    return fig


def density_chart(run: BenchRun) -> Any:
    """Memory per container against N, and each start's time against its position."""
    fig = _figure(10, 4.6)
    ax1, ax2 = fig.subplots(1, 2)
    colors = {"pynsbook": GROUP_COLORS["pynsbook"], "microvm": GROUP_COLORS["vm"],
              "unshare": "#1f77b4", "crun": "#17becf"}
    for r in run.results:
        if r.status != "ok" or not r.meta.get("points"):
            continue
        color = colors.get(r.name, "#8c564b")
        pts = r.meta["points"]
        ax1.plot([p["n"] for p in pts], [p["per_container"] / MIB for p in pts], "o-",
                 label=r.label, color=color, ms=3)
        ax2.plot(range(1, len(r.samples) + 1), [s * 1e3 for s in r.samples], ".-",
                 color=color, ms=2, lw=0.6)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("containers (or VMs) alive")
    ax1.set_ylabel("MiB per instance (PSS + kernel growth)")
    ax1.set_title("Memory per instance", fontsize=10)
    ax1.grid(alpha=0.3, which="both")
    if ax1.lines:
        fig.legend(loc="outside lower center", fontsize=7, ncols=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("the n-th start")
    ax2.set_ylabel("start time (ms, log)")
    ax2.set_title("Start time as the host fills up", fontsize=10)
    ax2.grid(alpha=0.3, which="both")
    skipped = [f"{r.name}: {r.reason}" for r in run.results if r.status != "ok"]
    _note(fig, ("not measured — " + "; ".join(skipped))[:300] if skipped else "")
    return fig


def overhead_chart(run: BenchRun) -> Any:
    """Slowdown relative to native per workload and environment (1.0 = native)."""
    fig = _figure(7, 3.8)
    ax = fig.add_subplot()
    rows = _slowdowns(run)
    workloads = list(dict.fromkeys(run.config.get("workloads", [])))
    envs = ["native", "container", "microvm"]
    width = 0.8 / len(envs)
    for i, env in enumerate(envs):
        vals = []
        for w in workloads:
            if env == "native":
                vals.append(1.0 if run.median(f"{w}/native") else 0.0)
            else:
                vals.append(next((x["slowdown"] for x in rows
                                  if x["workload"] == w and x["env"] == env), 0.0))
        xs = [j + (i - 1) * width for j in range(len(workloads))]
        label = env if env != "microvm" else f"microVM ({run.env.get('vm_accel', '?')})"
        color = {"native": GROUP_COLORS["native"], "container": GROUP_COLORS["pynsbook"],
                 "microvm": GROUP_COLORS["vm"]}[env]
        bars = ax.bar(xs, vals, width, label=label, color=color)
        for b, v in zip(bars, vals):
            if v:
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}x", ha="center",
                        va="bottom", fontsize=7)
    ax.axhline(1.0, color="#333", lw=0.8, ls="--")
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("time relative to native (lower is better)")
    if any(x["slowdown"] > 5 for x in rows):
        ax.set_yscale("log")
    ax.set_title("Overhead: the same workload natively, in a container, in a VM", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    return fig


def _slowdowns(run: BenchRun) -> List[Dict[str, Any]]:
    """Recomputed from the samples when they are there (results of older versions lack
    the noise test), else as stored."""
    from .overhead import slowdowns
    return slowdowns(run) if any(r.samples for r in run.results) else run.data.get("slowdown", [])


# --------------------------------------------------------------------------- the classic table


def _fmt_s(s: Optional[float]) -> str:
    from .startup import fmt_time
    return fmt_time(s)


def comparison_table(startup: Optional[BenchRun] = None, density: Optional[BenchRun] = None,
                     overhead: Optional[BenchRun] = None) -> List[Dict[str, str]]:
    """The classic table — containers start in seconds and VMs in minutes; hundreds of
    containers per host and dozens of VMs; near-native speed against weaker performance —
    with the measured numbers, and whether each claim holds here and by how much."""
    rows: List[Dict[str, str]] = []
    # -- start time
    row = {"aspect": "start time", "containers_claim": "seconds", "vms_claim": "minutes"}
    c = v = None
    c_name = ""
    if startup is not None:
        for name in ("pynsbook-cold-pass", "crun", "runc", "pynsbook-cold-true", "unshare"):
            c = startup.median(name)
            if c is not None:
                c_name = name
                break
        v = startup.median("microvm")
    accel = (startup.env.get("vm_accel") if startup else None) or "?"
    row["containers"] = f"{_fmt_s(c)} ({c_name})" if c is not None else "not measured"
    row["vms"] = f"{_fmt_s(v)} (microVM, {accel})" if v is not None else "not measured"
    verdict = []
    if c is not None:
        verdict.append(f"containers: holds and then some — {c_name} starts in {_fmt_s(c)}, "
                       f"{1.0 / c:.0f}x under one second" if c < 1 else
                       f"containers: holds ({_fmt_s(c)})" if c < 60 else "containers: does not hold")
    if v is not None:
        verdict.append(f"VMs: does not hold for a microVM — it is ready in {_fmt_s(v)}, "
                       f"{60 / v:.0f}x under a minute" if v < 60 else f"VMs: holds ({_fmt_s(v)})")
    if c is not None and v is not None:
        verdict.append(f"the VM takes {v / c:.0f}x as long as the container")
    row["verdict"] = "; ".join(verdict) or "run bench startup"
    rows.append(row)
    # -- density
    row = {"aspect": "instances per host", "containers_claim": "hundreds", "vms_claim": "dozens"}
    mem_total = None
    if density is not None:
        mem_total = (density.env.get("mem_total_kib") or 0) * 1024 or None
    cm = vm_m = None
    started_c = started_v = 0
    vm_cfg = None
    if density is not None:
        for name in ("pynsbook", "crun", "unshare"):
            r = density.get(name)
            if r is not None and r.status == "ok" and r.meta.get("memory_per_container"):
                cm, started_c, c_name = r.meta["memory_per_container"], r.meta["started"], name
                break
        r = density.get("microvm")
        if r is not None and r.status == "ok" and r.meta.get("memory_per_container"):
            vm_m, started_v = r.meta["memory_per_container"], r.meta["started"]
            vm_cfg = (r.meta.get("vm_memory_mb") or 256) * MIB
    if cm and mem_total:
        fit = int(mem_total / max(cm, 1))
        row["containers"] = (f"{cm / MIB:.2f} MiB each ({c_name}, {started_c} started) → "
                             f"~{fit:,} in {mem_total / (1 << 30):.0f} GiB")
        holds = fit >= 100
        rows_v = f"containers: {'holds' if holds else 'does not hold'} — ~{fit:,} fit by memory"
        if fit >= 1000:
            rows_v += " (thousands, not hundreds; CPU and PIDs limit first)"
    else:
        row["containers"] = "not measured"
        rows_v = ""
    verdict = [rows_v] if rows_v else []
    if vm_m and mem_total:
        fit_v = int(mem_total / max(vm_m, 1))
        fit_cfg = int(mem_total / vm_cfg) if vm_cfg else None
        row["vms"] = (f"{vm_m / MIB:.0f} MiB each ({started_v} started, {vm_cfg // MIB} MiB "
                      f"guests) → ~{fit_v:,} by footprint, ~{fit_cfg} by configured RAM")
        n_v = fit_cfg or fit_v
        verdict.append(f"VMs: {'holds' if 10 <= n_v < 200 else 'does not hold'} — "
                       f"~{fit_cfg} with {vm_cfg // MIB} MiB guests reserved, ~{fit_v} by "
                       "touched memory")
        if cm:
            verdict.append(f"a VM costs {vm_m / cm:.0f}x the memory of a container")
    else:
        row["vms"] = "not measured"
    row["verdict"] = "; ".join(verdict) or "run bench density"
    rows.append(row)
    # -- performance
    row = {"aspect": "performance", "containers_claim": "near native", "vms_claim": "slower"}
    sd = _slowdowns(overhead) if overhead is not None else []
    cs = {x["workload"]: x["slowdown"] for x in sd if x["env"] == "container"}
    vs = {x["workload"]: x["slowdown"] for x in sd if x["env"] == "microvm"}
    oaccel = (overhead.env.get("vm_accel") if overhead else None) or "?"
    row["containers"] = ", ".join(f"{w} {s:.2f}x" for w, s in cs.items()) or "not measured"
    row["vms"] = (", ".join(f"{w} {s:.1f}x" for w, s in vs.items()) + f" ({oaccel})") if vs else "not measured"
    verdict = []
    if cs:
        noisy = {x["workload"] for x in sd if x["env"] == "container" and x.get("within_noise")}
        real = {w: s for w, s in cs.items() if w not in noisy}
        worst = max(real.values()) if real else None
        if worst is None or worst <= 1.10:
            verdict.append("containers: holds — " + (
                f"worst {100 * (worst - 1):+.0f}% against native" if worst is not None else
                "no difference from native outside this run's noise")
                + (f" ({', '.join(sorted(noisy))}: within noise)" if noisy and real else ""))
        else:
            verdict.append(f"containers: does not hold here — {100 * (worst - 1):+.0f}% against "
                           "native, outside the run's noise")
    if vs:
        verdict.append(f"VMs: holds — {min(vs.values()):.1f}x to {max(vs.values()):.1f}x native"
                       + (" under software emulation; KVM would be far closer" if oaccel == "tcg" else "")
                       if min(vs.values()) > 1.10 else
                       f"VMs: does not hold here — {max(vs.values()):.2f}x native at worst")
    row["verdict"] = "; ".join(verdict) or "run bench overhead"
    rows.append(row)
    return rows


def format_table(rows: List[Dict[str, str]]) -> str:
    out = []
    for r in rows:
        out.append(f"{r['aspect']}: containers {r['containers_claim']} / VMs {r['vms_claim']} (claimed)")
        out.append(f"  measured containers: {r['containers']}")
        out.append(f"  measured VMs:        {r['vms']}")
        out.append(f"  → {r['verdict']}")
    return "\n".join(out)
