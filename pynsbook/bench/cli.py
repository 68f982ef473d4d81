"""``pynsbook bench startup|density|churn|overhead|report``.

Bad input (an unknown subject, N out of range, a kernel that does not exist, an unreadable
results file) prints one line and exits 2. Ctrl-C or SIGTERM stops the benchmark, which
then removes everything it started, and exits 130.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, List

from .harness import BenchRun, BenchUsageError

EPILOG = """examples:
  pynsbook bench startup --repeat 30 --json startup.json
  pynsbook bench startup --subjects pynsbook-cold-pass,floor,peers
  pynsbook bench density -n 200 --vm-n 2 --json density.json
  pynsbook bench churn -n 500
  pynsbook bench overhead --json overhead.json
  pynsbook bench report --out report/ --from startup.json density.json overhead.json"""


def add_parser(sub: "argparse._SubParsersAction") -> None:
    from .density import MAX_N, MAX_VM_N
    b = sub.add_parser("bench", help="containers against VMs: startup, density, overhead, report",
                       description="Benchmarks of containers against their peers and VMs, "
                                   "measured on this host.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bs = b.add_subparsers(dest="bench_cmd", metavar="BENCHMARK")
    bs.required = True

    def common(p: argparse.ArgumentParser, repeat: int) -> None:
        p.add_argument("--subjects", metavar="LIST", help="comma-separated subjects (default: all)")
        p.add_argument("--repeat", type=int, default=repeat, metavar="N",
                       help=f"measured runs per subject (default {repeat})")
        p.add_argument("--warmup", type=int, default=2, metavar="N", help="unrecorded runs first (default 2)")
        p.add_argument("--json", metavar="FILE", help="write the results as JSON")
        p.add_argument("--csv", metavar="FILE", help="write the summary as CSV")
        p.add_argument("--kernel", metavar="PATH", help="guest kernel for the VM (default: Debian's, fetched once)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    from .subjects import STARTUP
    s = bs.add_parser("startup", help="start time per subject, and the issue-7 ratios",
                      description="Time the start of every subject: " + ", ".join(STARTUP)
                      + " (aliases: baseline, ns, pynsbook, peers, all).")
    common(s, 20)
    d = bs.add_parser("density", help="N containers kept alive: memory each, start throughput",
                      description="Start N containers of each kind one after another, keep them "
                                  "alive, measure memory per container and start throughput; "
                                  "subjects: pynsbook, unshare, crun, microvm.")
    common(d, 1)
    d.add_argument("-n", type=int, default=100, help=f"containers per kind, 1..{MAX_N} (default 100)")
    d.add_argument("--vm-n", type=int, default=2, help=f"microVMs, 0..{MAX_VM_N} (default 2)")
    c = bs.add_parser("churn", help="N containers one after another: does start time grow?",
                      description="Start N containers one after another, each running the "
                                  "Python cell `pass` and removed at once; report the time per "
                                  "container, its growth with N, and what was left behind. "
                                  "Subjects: pynsbook, pynsbook-unprepared, crun.")
    c.add_argument("-n", type=int, default=500, help="containers per subject, 10..5000 (default 500)")
    c.add_argument("--subjects", metavar="LIST", help="comma-separated subjects (default: all)")
    c.add_argument("--json", metavar="FILE", help="write the results as JSON")
    c.add_argument("--csv", metavar="FILE", help="write the summary as CSV")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    o = bs.add_parser("overhead", help="CPU- and memory-bound workloads: native, container, VM",
                      description="Run the same workloads natively, in a container and in a "
                                  "microVM; report slowdown relative to native. Subjects are "
                                  "workloads (cpu, memory); --envs picks native, container, microvm.")
    common(o, 5)
    o.add_argument("--envs", metavar="LIST", help="native,container,microvm (default: all)")
    o.add_argument("--scale", type=int, default=1, help="workload size multiplier, 1..100")
    o.add_argument("--vm-repeat", type=int, default=3, help="runs of each workload in the VM")
    r = bs.add_parser("report", help="write a self-contained HTML report with charts",
                      description="Write DIR/index.html (charts embedded), results.json and CSVs. "
                                  "With --from, report those results; otherwise run quick "
                                  "startup, density and overhead benchmarks first.")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--from", dest="inputs", nargs="+", metavar="FILE", help="results written by --json")
    r.add_argument("--repeat", type=int, default=10, metavar="N")
    r.add_argument("-n", type=int, default=50, help="density: containers per kind")
    r.add_argument("--vm-n", type=int, default=2)
    r.add_argument("--kernel", metavar="PATH")
    r.add_argument("--no-progress", action="store_true")


def _save(run: BenchRun, args: argparse.Namespace) -> None:
    if getattr(args, "json", None):
        run.write_json(args.json)
    if getattr(args, "csv", None):
        run.write_csv(args.csv)


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse an unwritable --json/--csv before spending minutes measuring."""
    for opt in ("json", "csv"):
        path = getattr(args, opt, None)
        if path:
            d = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(d):
                raise BenchUsageError(f"--{opt} {path}: no such directory {d}")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_command(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.bench_cmd in ("startup", "density", "churn", "overhead"):
        _check_outputs(args)
    if args.bench_cmd == "startup":
        from .startup import format_startup, run_startup
        run = run_startup(args.subjects, repeat=args.repeat, warmup=args.warmup,
                          kernel_path=args.kernel, show_progress=progress)
        _save(run, args)
        print(format_startup(run))
    elif args.bench_cmd == "density":
        from .density import format_density, run_density
        run = run_density(args.n, args.subjects, vm_n=args.vm_n, kernel_path=args.kernel,
                          show_progress=progress)
        _save(run, args)
        print(format_density(run))
    elif args.bench_cmd == "churn":
        from .churn import format_churn, run_churn
        run = run_churn(args.n, args.subjects, show_progress=progress)
        _save(run, args)
        print(format_churn(run))
    elif args.bench_cmd == "overhead":
        from .overhead import format_overhead, run_overhead
        run = run_overhead(args.subjects, args.envs, repeat=args.repeat, warmup=args.warmup,
                           scale=args.scale, vm_repeat=args.vm_repeat, kernel_path=args.kernel,
                           show_progress=progress)
        _save(run, args)
        print(format_overhead(run))
    else:
        from .charts import comparison_table, format_table
        from .harness import load_runs
        from .report import write_report
        runs: List[BenchRun] = []
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            raise BenchUsageError(f"--out {args.out}: no such directory {parent}")
        if args.inputs:
            for path in args.inputs:
                runs += load_runs(path)
        else:
            from .density import run_density, validate_n
            from .overhead import run_overhead
            from .startup import run_startup
            from .subjects import check_kernel
            validate_n(args.n, args.vm_n)
            check_kernel(args.kernel)
            runs.append(run_startup(None, repeat=args.repeat, warmup=2, kernel_path=args.kernel,
                                    show_progress=progress))
            runs.append(run_density(args.n, None, vm_n=args.vm_n, kernel_path=args.kernel,
                                    show_progress=progress))
            runs.append(run_overhead(None, None, repeat=max(3, args.repeat // 2),
                                     kernel_path=args.kernel, show_progress=progress))
        path = write_report(runs, args.out)
        kinds = {r.kind: r for r in runs}
        print(format_table(comparison_table(kinds.get("startup"), kinds.get("density"),
                                            kinds.get("overhead"))))
        print(f"report: {path}")
    return 0


def main(args: argparse.Namespace) -> int:
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_command(args)
    except BenchUsageError as err:
        sys.stderr.write(f"pynsbook: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("pynsbook: interrupted; everything the benchmark started was removed\n")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
