"""Soak: a kernel that runs many containers must not grow. 1,000 cells one after another,
then 50 containers at once from threads, in one real Jupyter kernel: its descriptors,
threads and memory stay flat (the slope is printed), and nothing of ours is left."""
from __future__ import annotations

import json
import os

import pytest

from tests.test_magics import KernelSession, leftovers, session_dirs, wait_until

pytestmark = [pytest.mark.no_vm,  # minutes under emulation
              pytest.mark.needs("userns") if os.geteuid() else pytest.mark.needs("root")]

#: the kernel measures itself: open descriptors, threads, resident memory, once the pool's
#: background work (a spare being prepared holds sockets and pipes) has settled
PROBE = """import json, os, threading, psutil
from pynsbook.engine import background
background.drain(10)
print(json.dumps({"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
                  "rss": psutil.Process().memory_info().rss}))"""


def _slope(xs, ys):
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@pytest.fixture
def kernel(tmp_path):
    k = KernelSession(cwd=str(tmp_path))
    k.ok("%load_ext pynsbook")
    yield k
    pid = k.pid
    k.close()
    # the kernel's end takes its launcher, its spares and its containers with it
    assert wait_until(lambda: not leftovers(session_dirs(pid)), 10), leftovers(session_dirs(pid))


def test_a_thousand_cells_leave_the_kernels_descriptors_threads_and_memory_flat(kernel):
    samples = []
    for i in range(1, 1001):
        out = kernel.ok("%%container\nprint('cell', " + str(i) + ")")
        assert out == f"cell {i}\n"
        if i % 100 == 0:
            samples.append((i, json.loads(kernel.ok(PROBE))))
    settled = samples[1:]  # the first hundred start the launcher, the pool and its threads
    cells = [i for i, _ in settled]
    fds = [s["fds"] for _, s in settled]
    threads = [s["threads"] for _, s in settled]
    rss = [s["rss"] for _, s in settled]
    slope_kib = _slope(cells, rss) / 1024
    print(f"\nsoak, 1000 cells: fds {fds}, threads {threads}, "
          f"RSS {rss[0] >> 20}-{rss[-1] >> 20} MiB, slope {slope_kib:.2f} KiB/cell")
    assert max(fds) - min(fds) <= 2, fds
    assert max(threads) - min(threads) <= 1, threads
    # a leak of one run's output buffers or result would be tens of KiB per cell
    assert slope_kib < 4, f"RSS grows {slope_kib:.2f} KiB per cell: {rss}"


def test_fifty_containers_at_once_from_threads_leave_nothing_behind(kernel):
    code = """
import threading, pynsbook
results = []
def one(i):
    results.append(pynsbook.run(f"import time; time.sleep(0.3); print({i})", memory="64M"))
threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
for t in threads: t.start()
for t in threads: t.join()
print(sorted(int(r.stdout) for r in results) == list(range(50)), all(r.ok for r in results))
"""
    rounds = []
    for _ in range(3):
        assert kernel.ok(code) == "True True\n"
        rounds.append(json.loads(kernel.ok(PROBE)))
    print(f"\nsoak, 3 x 50 concurrent containers: {rounds}")
    # no growth: the last round stays within the first rounds' high-water mark
    assert rounds[2]["fds"] <= max(r["fds"] for r in rounds[:2]) + 2, rounds
    assert rounds[2]["threads"] <= max(r["threads"] for r in rounds[:2]) + 1, rounds
    # the containers are gone once their runs returned (a spare waiting in the pool is
    # pynsbook's by design): no cgroup of a finished container is left
    left = kernel.ok("import json, time\nfrom pynsbook import cgroups\nfrom pynsbook.engine import pool\n"
                     "for _ in range(100):\n"
                     "    left = set(cgroups.backend().session_dirs()) - pool.footprint()[1]\n"
                     "    if not left: break\n"
                     "    time.sleep(0.05)\n"
                     "print(json.dumps(sorted(left)))")
    assert json.loads(left) == []
