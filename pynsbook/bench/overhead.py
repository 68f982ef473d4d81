"""``pynsbook bench overhead``: the same CPU-bound and memory-bound workloads natively, in
a pynsbook container and in a microVM, as slowdown relative to native.

Each workload is a short Python program run by the host's ``python3`` (the VM sees the
host's root, so it is the very same interpreter) that times *only its own work* and prints
``elapsed <seconds>``: start-up costs are the startup benchmark's business, not this one's.

- cpu: a pure-Python integer loop (interpreter dispatch, ALU, branch prediction);
- memory: touch every page of a fresh 64 MiB buffer and copy it (page faults, memory
  bandwidth).

Native and container runs are interleaved (native, container, native, ...); the VM runs
its repeats inside one boot (labelled with its accelerator: emulation is not
virtualisation, and a KVM guest would be much closer to native).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from typing import Any, Dict, List, Optional

from .harness import BenchRun, BenchUsageError, FuncSubject, SubjectResult, measure
from .subjects import check_kernel, parse_subjects, vm_unavailable

WORKLOADS: Dict[str, str] = {
    "cpu": (
        "import time\n"
        "t=time.perf_counter()\n"
        "x=0\n"
        "for i in range({scale}*1000000):\n"
        "    x=(x+i*i)%1000003\n"
        "print('elapsed', time.perf_counter()-t, x)\n"),
    "memory": (
        "import time\n"
        "t=time.perf_counter()\n"
        "for _ in range({scale}*4):\n"
        "    b=bytearray(64<<20)\n"
        "    b[::4096]=b'\\x01'*len(range(0,64<<20,4096))\n"
        "    c=bytes(b)\n"
        "    del b, c\n"
        "print('elapsed', time.perf_counter()-t)\n"),
}
ENVS = ["native", "container", "microvm"]
_ELAPSED = re.compile(r"^elapsed ([0-9.eE+-]+)", re.M)


def python3() -> str:
    return shutil.which("python3") or "/usr/bin/python3"


def script(workload: str, scale: int) -> str:
    return WORKLOADS[workload].format(scale=scale)


def parse_elapsed(text: str) -> float:
    m = _ELAPSED.search(text)
    if not m:
        raise RuntimeError(f"the workload printed no 'elapsed' line: {text.strip()[-200:]!r}")
    return float(m.group(1))


def _native(workload: str, scale: int) -> float:
    r = subprocess.run([python3(), "-c", script(workload, scale)], capture_output=True,
                       text=True, timeout=600, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"native {workload} exited with {r.returncode}: {r.stderr.strip()[-200:]}")
    return parse_elapsed(r.stdout)


def _container(workload: str, scale: int) -> float:
    from ..engine.container import run
    r = run([python3(), "-c", script(workload, scale)], memory="512M", cpus=2, pids=64,
            namespaces="pid,mnt,uts,ipc,net")
    if r.exit_code != 0:
        raise RuntimeError(f"container {workload} exited with {r.exit_code}: {r.stderr.strip()[-200:]}")
    return parse_elapsed(r.stdout)


def _vm(workloads: List[str], scale: int, repeat: int, kernel_path: Optional[str]) -> Dict[str, Any]:
    """One boot running every workload ``repeat`` times: {workload: [seconds]}, accel."""
    from .. import vm
    kernel, initramfs = vm.prepare(kernel_path)
    accel = vm.choose_accel(kernel, initramfs)
    lines = [f"echo warm; {python3()} -c 'pass'"]
    for i in range(repeat):
        for w in workloads:
            lines.append(f"printf 'workload {w} '; {python3()} -c {vm.shell_quote(script(w, scale))}")
    r = vm.boot(kernel, initramfs, "\n".join(lines), accel=accel, timeout=1800, memory_mb=1024)
    out: Dict[str, Any] = {"accel": accel, "samples": {w: [] for w in workloads}}
    for line in r.console:
        m = re.match(r"workload (\w+) elapsed ([0-9.eE+-]+)", line.strip())
        if m:
            out["samples"][m.group(1)].append(float(m.group(2)))
    if r.exit_status != 0:
        out["error"] = f"the VM's script exited with {r.exit_status}"
    return out


def run_overhead(workloads: Optional[str] = None, envs: Optional[str] = None, *,
                 repeat: int = 5, warmup: int = 1, scale: int = 1, vm_repeat: int = 3,
                 kernel_path: Optional[str] = None, show_progress: bool = True) -> BenchRun:
    wl = parse_subjects(workloads, list(WORKLOADS))
    ev = parse_subjects(envs, ENVS)
    if not 1 <= scale <= 100:
        raise BenchUsageError(f"--scale must be between 1 and 100, not {scale}")
    if not 1 <= vm_repeat <= 20:
        raise BenchUsageError(f"--vm-repeat must be between 1 and 20, not {vm_repeat}")
    if "microvm" in ev:
        check_kernel(kernel_path)
    subjects = []
    for w in wl:
        if "native" in ev:
            subjects.append(FuncSubject(f"{w}/native", (lambda w=w: _native(w, scale)),
                                        f"{w}, native", group="native"))
        if "container" in ev:
            subjects.append(FuncSubject(f"{w}/container", (lambda w=w: _container(w, scale)),
                                        f"{w}, pynsbook container", group="pynsbook"))
    run = measure(subjects, kind="overhead", repeat=repeat, warmup=warmup,
                  show_progress=show_progress)
    if "microvm" in ev:
        why = vm_unavailable()
        if why is None:
            try:
                t0 = time.monotonic()
                got = _vm(wl, scale, vm_repeat, kernel_path)
                run.env["vm_accel"] = got["accel"]
                for w in wl:
                    res = SubjectResult(f"{w}/microvm", f"{w}, QEMU microVM ({got['accel']})",
                                        "vm", "ok", samples=got["samples"][w],
                                        meta={"accel": got["accel"],
                                              "boot_seconds": time.monotonic() - t0})
                    if not res.samples:
                        res.status, res.reason = "failed", got.get("error", "no result from the VM")
                    run.results.append(res)
            except Exception as err:  # noqa: BLE001 - reported as failed, never hidden
                for w in wl:
                    run.results.append(SubjectResult(f"{w}/microvm", f"{w}, QEMU microVM", "vm",
                                                     "failed", reason=str(err).splitlines()[0]))
        else:
            for w in wl:
                run.results.append(SubjectResult(f"{w}/microvm", f"{w}, QEMU microVM", "vm",
                                                 "skipped", reason=why))
    run.config.update(workloads=wl, envs=ev, scale=scale, vm_repeat=vm_repeat)
    run.data["slowdown"] = slowdowns(run)
    return run


def slowdowns(run: BenchRun) -> List[Dict[str, Any]]:
    out = []
    for w in run.config.get("workloads", []):
        base = run.median(f"{w}/native")
        for env in ENVS[1:]:
            m = run.median(f"{w}/{env}")
            if base and m:
                a = run.get(f"{w}/native").summary  # type: ignore[union-attr]
                b = run.get(f"{w}/{env}").summary  # type: ignore[union-attr]
                # the two medians' 95% intervals overlap: no difference this run can show
                noise = bool(a and b and a.ci_low <= b.ci_high and b.ci_low <= a.ci_high)
                out.append({"workload": w, "env": env, "native_s": base, "env_s": m,
                            "slowdown": m / base, "within_noise": noise})
    return out


def format_overhead(run: BenchRun) -> str:
    from .startup import fmt_time
    lines = [f"overhead: workload time only (start-up excluded); median of "
             f"{run.config.get('repeat')} (VM: {run.config.get('vm_repeat')} in one boot); "
             f"{run.env.get('kernel')}, {run.env.get('cpus')} CPUs",
             f"{'workload / where':<44} {'median':>9} {'IQR':>21} {'vs native':>16}"]
    slow = {(s["workload"], s["env"]): s["slowdown"] for s in run.data.get("slowdown", [])}
    noisy = {(s["workload"], s["env"]) for s in run.data.get("slowdown", []) if s.get("within_noise")}
    for r in run.results:
        s = r.summary
        if r.status != "ok" or s is None:
            lines.append(f"{r.status}: {r.name} — {r.reason}")
            continue
        w, env = r.name.split("/")
        rel = "1.00x" if env == "native" else (f"{slow[(w, env)]:.2f}x" if (w, env) in slow else "-")
        if (w, env) in noisy:
            rel += " (noise)"
        lines.append(f"{r.label[:44]:<44} {fmt_time(s.median):>9} "
                     f"{fmt_time(s.q1) + '-' + fmt_time(s.q3):>21} {rel:>16}")
    if noisy:
        lines.append("(noise): the 95% intervals of the two medians overlap — no difference "
                     "from native that this run can show")
    return "\n".join(lines)
