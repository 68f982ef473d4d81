"""Containers against virtual machines, measured: startup, density, churn and overhead
benchmarks, charts, and a report a user can send to someone.

    from pynsbook import bench
    run = bench.startup(repeat=20)          # a BenchRun: medians, spread, environment
    bench.charts.startup_chart(run)         # a matplotlib Figure
    bench.report.write_report([run], "out") # out/index.html, out/results.json, CSVs

Command line: ``pynsbook bench startup|density|churn|overhead|report``.
"""
from __future__ import annotations

from .harness import (BenchRun, BenchUsageError, FuncSubject, Subject, SubjectResult,
                      environment, load_runs, measure)
from .stats import Summary, bootstrap_ci, median, quantile, summarize
# The submodules share their names with the functions below: import them first, so that
# the functions, defined after, are what ``bench.startup`` names (a submodule imported
# later would otherwise replace the function on the package).
from . import churn as _churn, density as _density, overhead as _overhead, startup as _startup  # noqa: E402,F401

__all__ = ["BenchRun", "BenchUsageError", "FuncSubject", "Subject", "SubjectResult",
           "Summary", "bootstrap_ci", "environment", "load_runs", "measure", "median",
           "quantile", "summarize", "startup", "density", "churn", "overhead"]


def startup(subjects=None, repeat: int = 20, warmup: int = 2, kernel_path=None,
            show_progress: bool = True) -> BenchRun:
    """Run the startup benchmark (see :mod:`pynsbook.bench.startup`)."""
    from .startup import run_startup
    return run_startup(subjects, repeat=repeat, warmup=warmup, kernel_path=kernel_path,
                       show_progress=show_progress)


def density(*args, **kwargs) -> BenchRun:
    """Run the density benchmark (see :mod:`pynsbook.bench.density`)."""
    from .density import run_density
    return run_density(*args, **kwargs)


def churn(*args, **kwargs) -> BenchRun:
    """Run the churn benchmark (see :mod:`pynsbook.bench.churn`)."""
    from .churn import run_churn
    return run_churn(*args, **kwargs)


def overhead(*args, **kwargs) -> BenchRun:
    """Run the overhead benchmark (see :mod:`pynsbook.bench.overhead`)."""
    from .overhead import run_overhead
    return run_overhead(*args, **kwargs)
