"""``pynsbook bench density``: start N containers one after another that stay alive, and
measure what each costs and how fast they start.

Memory per container = (PSS of all its processes, from ``/proc/PID/smaps_rollup``, summed
over the fleet + the growth of the kernel's slab, page tables and kernel stacks from
``/proc/meminfo`` since before the first start) / N. The kernel part is host-wide and so
includes whatever else the host did meanwhile: it is labelled as such.

Fleets: pynsbook containers (shim + init each), ``unshare -pfnmiu --mount-proc sleep``,
``crun run -d`` of busybox ``sleep`` (64 MiB limit), and microVMs for small N (each QEMU
process's PSS includes the guest memory it touched). Everything started is stopped in a
``finally``, so an interrupt leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional

from ..linux import procfs
from .harness import BenchRun, BenchUsageError, SubjectResult, environment, progress
from .subjects import CONTAINER_OPTIONS, check_kernel, parse_subjects, vm_unavailable

MAX_N = 1000
MAX_VM_N = 8
KINDS = ["pynsbook", "unshare", "crun", "microvm"]
KERNEL_KEYS = ("Slab", "PageTables", "KernelStack")


def validate_n(n: int, vm_n: int) -> None:
    if not 1 <= n <= MAX_N:
        raise BenchUsageError(f"-n must be between 1 and {MAX_N} containers, not {n}")
    if not 0 <= vm_n <= MAX_VM_N:
        raise BenchUsageError(f"--vm-n must be between 0 and {MAX_VM_N} VMs, not {vm_n}")


def checkpoints(n: int) -> List[int]:
    """1, 2, 5, 10, 20, 50, ... up to n, and n itself."""
    out, base = [], 1
    while base <= n:
        for m in (1, 2, 5):
            if base * m <= n:
                out.append(base * m)
        base *= 10
    if out[-1] != n:
        out.append(n)
    return out


def meminfo() -> Dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def pss(pid: int) -> int:
    """Proportional set size of one process in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree(pid: int) -> List[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += procfs.children(p)
    return out


# --------------------------------------------------------------------------- fleets


class Fleet:
    kind = ""
    label = ""

    def check(self) -> Optional[str]:
        return None

    def start_one(self) -> None:
        raise NotImplementedError

    def pids(self) -> List[int]:
        raise NotImplementedError

    def stop_all(self) -> None:
        raise NotImplementedError

    def shared(self) -> Dict[str, int]:
        """Processes that serve the whole fleet (not counted per container): name -> PSS."""
        return {}

    def warm_up(self) -> None:
        """One start and stop before measuring, so first-time costs (imports, probes,
        bundle building) do not land on the first point of the curve."""
        try:
            self.start_one()
        finally:
            self.stop_all()


class PynsbookFleet(Fleet):
    kind, label = "pynsbook", "pynsbook containers (idle init)"

    def __init__(self) -> None:
        self.containers: List[Any] = []

    def start_one(self) -> None:
        from ..engine.container import Container
        self.containers.append(Container(**CONTAINER_OPTIONS).start())

    def pids(self) -> List[int]:
        from ..engine import spawn
        out = []
        for c in self.containers:
            if c.init_pid:
                # the init's parent is its shim on the slow path; on the fast path it is the
                # launcher, which serves every container of the notebook (like the notebook
                # itself, not counted per container: its PSS is reported beside the fleet's)
                parent = procfs.ppid(c.init_pid)
                if parent and parent != spawn.launcher_pid():
                    out.append(parent)
                out += tree(c.init_pid)
        return out

    def shared(self) -> Dict[str, int]:
        """pynsbook's processes that serve all containers, with their PSS."""
        from ..engine import spawn
        launcher = spawn.launcher_pid()
        return {"launcher": pss(launcher)} if launcher else {}

    def stop_all(self) -> None:
        while self.containers:
            c = self.containers.pop()
            try:
                c.stop(timeout=0.2)
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass


class UnshareFleet(Fleet):
    kind, label = "unshare", "unshare -pfnmiu --mount-proc sleep"

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen] = []

    def check(self) -> Optional[str]:
        if not shutil.which("unshare") or not shutil.which("sleep"):
            return "unshare or sleep is not installed"
        return None if os.geteuid() == 0 else "unshare -pfnmiu needs root"

    def start_one(self) -> None:
        p = subprocess.Popen(["unshare", "-pfnmiu", "--mount-proc", "--kill-child",
                              "sleep", "1000000"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        deadline = time.monotonic() + 5
        while not procfs.children(p.pid):  # started when its PID 1 (sleep) exists
            if p.poll() is not None:
                raise RuntimeError(f"unshare exited with status {p.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("unshare did not start its child within 5 s")
            time.sleep(0.0005)

    def pids(self) -> List[int]:
        return [q for p in self.procs for q in tree(p.pid)]

    def stop_all(self) -> None:
        for p in self.procs:
            for q in reversed(tree(p.pid)):
                try:
                    os.kill(q, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.wait()
        self.procs = []


class CrunFleet(Fleet):
    kind, label = "crun", "crun run -d busybox sleep (64 MiB limit)"

    def __init__(self) -> None:
        self.rt = None
        self.ids: List[str] = []
        self.container_pids: List[int] = []

    def check(self) -> Optional[str]:
        from .oci import OCIPeer
        return OCIPeer("crun").check()

    def start_one(self) -> None:
        from .oci import OCIRuntime
        from .subjects import spawn
        if self.rt is None:
            self.rt = OCIRuntime("crun", ["/bin/sleep", "1000000"])
            if self.rt.workaround:
                self.label = CrunFleet.label + ", cgroup2 hidden in a private mount ns"
        rt = self.rt
        cid = rt.new_id()
        pid_file = os.path.join(rt.tmp, f"{cid}.pid")
        config = rt.own_config(cid)
        self.ids.append(cid)
        fd = os.open(rt.errlog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            spawn(rt.argv(cid, detach=True, config=config, pid_file=pid_file),
                  rt.prepare_child, stderr_fd=fd)
        except RuntimeError as err:
            raise RuntimeError(f"{err}: {rt.error_text()}") from None
        finally:
            os.close(fd)
        with open(pid_file) as f:
            self.container_pids.append(int(f.read().strip()))

    def pids(self) -> List[int]:
        return [q for p in self.container_pids for q in tree(p)]

    def stop_all(self) -> None:
        if self.rt is not None:
            for cid in self.ids:
                self.rt.delete(cid)
            self.rt.cleanup()
            self.rt = None
        self.ids, self.container_pids = [], []


class VMFleet(Fleet):
    kind, label = "microvm", "QEMU microVMs (idle shell)"
    UP = "pynsbook-bench-vm-up"

    def __init__(self, kernel_path: Optional[str] = None, memory_mb: int = 256) -> None:
        self.kernel_path, self.memory_mb = kernel_path, memory_mb
        self.kernel = self.initramfs = None
        self.accel = ""
        self.threads: List[threading.Thread] = []
        self.qemu: List[int] = []
        self.errors: List[str] = []

    def check(self) -> Optional[str]:
        return vm_unavailable()

    def start_one(self) -> None:
        from .. import vm
        if self.kernel is None:
            self.kernel, self.initramfs = vm.prepare(self.kernel_path)
            self.accel = vm.choose_accel(self.kernel, self.initramfs)
            self.label = f"QEMU microVMs, {self.memory_mb} MiB each ({self.accel})"
        up = threading.Event()
        before = set(self._qemu_children())

        def boot() -> None:
            try:
                vm.boot(self.kernel, self.initramfs, f"echo {self.UP}; exec sleep 1000000",
                        accel=self.accel, timeout=3600, ready_timeout=300,
                        memory_mb=self.memory_mb,
                        on_line=lambda line: up.set() if self.UP in line else None)
            except vm.VMError as err:
                if not getattr(self, "_stopping", False):
                    self.errors.append(str(err).splitlines()[0])
            finally:
                up.set()

        t = threading.Thread(target=boot, daemon=True)
        t.start()
        self.threads.append(t)
        up.wait()
        new = [p for p in self._qemu_children() if p not in before]
        self.qemu += new
        if self.errors or not new:
            raise RuntimeError(self.errors[-1] if self.errors else "QEMU did not start")

    @staticmethod
    def _qemu_children() -> List[int]:
        """QEMUs started by any thread of this process (each boot runs in its own thread,
        and /proc lists a child under the thread that forked it)."""
        out, kids = [], []
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/children") as f:
                    kids += [int(x) for x in f.read().split()]
            except OSError:
                pass
        for pid in kids:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().startswith("qemu-system"):
                        out.append(pid)
            except OSError:
                pass
        return out

    def pids(self) -> List[int]:
        return list(self.qemu)

    def shared(self) -> Dict[str, int]:
        """Processes that serve the whole fleet (not counted per container): name -> PSS."""
        return {}

    def warm_up(self) -> None:  # a whole boot is too dear: prepare the kernel only
        from .. import vm
        self.kernel, self.initramfs = vm.prepare(self.kernel_path)
        self.accel = vm.choose_accel(self.kernel, self.initramfs)
        self.label = f"QEMU microVMs, {self.memory_mb} MiB each ({self.accel})"

    def stop_all(self) -> None:
        self._stopping = True
        for pid in set(self.qemu) | set(self._qemu_children()):  # QEMUs we started, by PID; boot() then reaps them
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for t in self.threads:
            t.join(timeout=15)
        self.threads, self.qemu = [], []


# --------------------------------------------------------------------------- run


def run_fleet(fleet: Fleet, n: int, show_progress: bool = True) -> SubjectResult:
    res = SubjectResult(fleet.kind, fleet.label, "vm" if fleet.kind == "microvm" else
                        ("pynsbook" if fleet.kind == "pynsbook" else "peer"), "ok")
    why = fleet.check()
    if why:
        res.status, res.reason = "skipped", why
        return res
    points: List[Dict[str, Any]] = []
    marks = set(checkpoints(n))
    try:
        fleet.warm_up()
    except Exception as err:  # noqa: BLE001 - reported, not fatal to the other fleets
        res.status, res.reason = "failed", f"warm-up start failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        return res
    bar = progress(n, f"density {fleet.kind}", show_progress)
    base = meminfo()
    t_all = time.perf_counter()
    started = 0
    try:
        for i in range(1, n + 1):
            t0 = time.perf_counter()
            try:
                fleet.start_one()
            except Exception as err:  # noqa: BLE001 - report how far it got
                res.reason = f"start {i} failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
                res.status = "failed" if started == 0 else "ok"
                break
            res.samples.append(time.perf_counter() - t0)
            started = i
            bar.update(1)
            if i in marks:
                points.append(_point(fleet, i, base, time.perf_counter() - t_all))
        if started and (not points or points[-1]["n"] != started):
            points.append(_point(fleet, started, base, time.perf_counter() - t_all))
        res.meta["shared_pss"] = fleet.shared()
    finally:
        bar.close()
        res.meta["label"] = fleet.label
        fleet.stop_all()
    res.label = fleet.label
    total = sum(res.samples)
    res.meta.update(points=points, started=started, requested=n,
                    throughput_per_s=(started / total) if total else None,
                    memory_per_container=points[-1]["per_container"] if points else None)
    if getattr(fleet, "accel", ""):
        res.meta["accel"] = fleet.accel
        res.meta["vm_memory_mb"] = getattr(fleet, "memory_mb", None)
    return res


def _point(fleet: Fleet, n: int, base: Dict[str, int], elapsed: float) -> Dict[str, Any]:
    now = meminfo()
    kernel = {k: now.get(k, 0) - base.get(k, 0) for k in KERNEL_KEYS}
    total_pss = sum(pss(p) for p in set(fleet.pids()))
    kernel_total = sum(kernel.values())
    return {"n": n, "pss": total_pss, "kernel": kernel, "kernel_total": kernel_total,
            "per_container": (total_pss + kernel_total) / n, "pss_per_container": total_pss / n,
            "elapsed": elapsed}


def run_density(n: int = 100, kinds: Optional[str] = None, vm_n: int = 2,
                kernel_path: Optional[str] = None, show_progress: bool = True) -> BenchRun:
    """Start ``n`` containers of each kind (and ``vm_n`` microVMs), measure, stop them all."""
    validate_n(n, vm_n)
    chosen = parse_subjects(kinds, KINDS)
    if "microvm" in chosen and vm_n:
        check_kernel(kernel_path)
    run = BenchRun(kind="density", unit="s", env=environment(),
                   config={"n": n, "vm_n": vm_n, "kinds": chosen,
                           "options": CONTAINER_OPTIONS})
    t0 = time.monotonic()
    fleets = {"pynsbook": PynsbookFleet, "unshare": UnshareFleet, "crun": CrunFleet}
    for kind in chosen:
        if kind == "microvm":
            if vm_n == 0:
                run.results.append(SubjectResult("microvm", "QEMU microVMs", "vm", "skipped",
                                                 reason="--vm-n 0"))
                continue
            res = run_fleet(VMFleet(kernel_path), vm_n, show_progress)
            if res.meta.get("accel"):
                run.env["vm_accel"] = res.meta["accel"]
        else:
            res = run_fleet(fleets[kind](), n, show_progress)
        run.results.append(res)
        run.order += [kind] * len(res.samples)
    run.seconds = time.monotonic() - t0
    return run


def format_density(run: BenchRun) -> str:
    from .startup import fmt_time
    lines = [f"density: up to {run.config.get('n')} containers ({run.config.get('vm_n')} VMs), "
             f"started one after another and kept alive; {run.env.get('kernel')}, "
             f"{run.env.get('cpus')} CPUs",
             f"{'fleet':<56} {'N':>4} {'MiB each':>9} {'PSS':>6} {'kernel':>7} "
             f"{'start med':>10} {'per s':>7}"]
    for r in run.results:
        if r.status != "ok":
            lines.append(f"{r.status}: {r.name} — {r.reason}")
            continue
        p = r.meta["points"][-1]
        mib = 1 << 20
        lines.append(f"{r.label[:56]:<56} {p['n']:>4} {p['per_container'] / mib:>9.2f} "
                     f"{p['pss_per_container'] / mib:>6.2f} {p['kernel_total'] / p['n'] / mib:>7.2f} "
                     f"{fmt_time(r.median):>10} {r.meta['throughput_per_s']:>7.1f}")
        if r.reason:
            lines.append(f"  note: {r.reason}")
        for name, size in (r.meta.get("shared_pss") or {}).items():
            lines.append(f"  plus, once for all its containers: the {name}, {size / mib:.1f} MiB")
        first, last = r.samples[: max(1, len(r.samples) // 10)], r.samples[-max(1, len(r.samples) // 10):]
        if len(r.samples) >= 10:
            from .stats import median
            lines.append(f"  start time, first 10% {fmt_time(median(first))} vs last 10% "
                         f"{fmt_time(median(last))} (growth with N: {median(last) / median(first):.2f}x)")
    lines.append("memory = (PSS of the fleet's processes + host-wide growth of Slab, PageTables, "
                 "KernelStack) / N; the kernel part includes anything else the host did meanwhile")
    ours, crun = run.get("pynsbook"), run.get("crun")
    if ours is not None and ours.status == "ok" and ours.meta.get("memory_per_container"):
        m = ours.meta["memory_per_container"] / (1 << 20)
        ref = (f"; crun in this run: {crun.meta['memory_per_container'] / (1 << 20):.2f} MiB"
               if crun is not None and crun.status == "ok" and crun.meta.get("memory_per_container")
               else "")
        lines.append(f"issue 7 goal, idle container <= 0.5 MiB: pynsbook {m:.2f} MiB "
                     f"{'MET' if m <= 0.5 else 'NOT MET'}{ref}")
    return "\n".join(lines)
