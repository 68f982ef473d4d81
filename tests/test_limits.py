"""cgroup limits the kernel enforces: memory (OOM), pids (fork bombs), CPU quota, live updates."""
import shutil
import time

import pytest

import pynsbook
from pynsbook import Container

pytestmark = [pytest.mark.needs("cgroups"), pytest.mark.usefixtures("no_leaks")]

ALLOC = "x = bytearray({mb} * 1024 * 1024)\nprint('allocated', len(x) >> 20, 'MiB')"


def test_200mb_under_64m_is_oom_killed_and_reported_as_oom():
    r = pynsbook.run(ALLOC.format(mb=200), memory="64M")
    assert r.oom_killed
    assert r.exit_code == 137 and r.signal == 9
    assert r.describe().startswith("killed: out of memory (limit 64 MiB, peak ")
    assert r.peak_memory is not None and r.peak_memory >= 60 << 20


def test_32mb_under_64m_succeeds_and_peak_is_read_from_the_kernel():
    r = pynsbook.run(ALLOC.format(mb=32), memory="64M")
    assert r.ok, r
    assert "allocated 32 MiB" in r.stdout
    assert 32 << 20 <= r.peak_memory <= 64 << 20
    assert r.limits["memory"] == 64 << 20


def test_a_sigkill_that_is_not_an_oom_is_not_reported_as_oom():
    r = pynsbook.run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", memory="64M")
    assert r.signal == 9 and not r.oom_killed


FORK_BOMB = """
import os, time
children = 0
for _ in range(200):
    try:
        if os.fork() == 0:
            time.sleep(3)
            os._exit(0)
        children += 1
    except BlockingIOError:
        break
print('forked', children)
"""


def test_pids_limit_contains_a_fork_bomb_and_the_run_reports_it():
    t0 = time.monotonic()
    r = pynsbook.run(FORK_BOMB, pids=32)
    forked = int(r.stdout.split()[-1])
    assert forked < 32, r.stdout
    assert r.pids_limit_hits >= 1
    assert time.monotonic() - t0 < 30  # the host stayed responsive


def test_half_a_cpu_holds_a_busy_loop_near_half():
    code = "import time\nend = time.monotonic() + 2\nwhile time.monotonic() < end: pass"
    r = pynsbook.run(code, cpus=0.5)
    ratio = r.cpu_time / r.wall_time
    assert 0.4 <= ratio <= 0.6, f"cpu {r.cpu_time:.2f} s over wall {r.wall_time:.2f} s"


def test_limits_change_live_on_a_running_container():
    with Container(memory="64M", cpus=0.5, pids=16) as c:
        assert c.stats().memory_limit == 64 << 20
        c.update(memory="128M", cpus=1.5, pids=64)
        s = c.stats()
        assert (s.memory_limit, s.cpu_quota, s.pids_limit) == (128 << 20, 1.5, 64)
        r = c.run(ALLOC.format(mb=100))  # would not fit the old limit
        assert r.ok and not r.oom_killed, r
        c.update(memory="48M")
        assert c.run(ALLOC.format(mb=100)).oom_killed


def test_stats_report_usage_of_a_running_container():
    with Container(memory="64M") as c:
        r = c.run(ALLOC.format(mb=20) + "\nimport time; time.sleep(0.1)")
        s = c.stats()
        assert r.ok
        assert s.memory_peak >= 20 << 20
        assert s.cpu_time > 0
        assert s.pids_current >= 1  # the init
        assert s.oom_kills == 0


@pytest.mark.needs("stress_ng")
def test_stress_ng_runs_as_a_real_workload_under_memory_and_cpu_limits():
    r = pynsbook.run(["stress-ng", "--vm", "1", "--vm-bytes", "200M", "--vm-keep", "--timeout", "3s",
                      "--cpu", "1", "--oomable", "--metrics-brief", "--temp-path", "/tmp"],
                     memory="64M", cpus=0.5, timeout=60)
    assert r.oom_killed, r  # stress-ng's vm worker wants 200M: the kernel kills it in the cgroup
    assert r.cpu_time / r.wall_time < 0.7


@pytest.mark.needs("stress_ng")
def test_stress_ng_within_its_limit_completes():
    r = pynsbook.run(["stress-ng", "--vm", "1", "--vm-bytes", "16M", "--timeout", "1s",
                      "--temp-path", "/tmp"], memory="64M", cpus=1, timeout=60)
    assert r.exit_code == 0 and not r.oom_killed, r.stderr


def test_cpuset_pins_the_container():
    r = pynsbook.run("import os; print(sorted(os.sched_getaffinity(0)))", cpuset="0")
    assert r.stdout.strip() == "[0]"


def test_timeout_stops_the_run_and_says_so():
    r = pynsbook.run(["sleep", "30"], timeout=0.5)
    assert r.timed_out and not r.ok
    assert r.wall_time < 5
    assert r.describe() == "killed: timed out after 0.5 s"


def _root_block_device() -> str:
    import os
    st = os.stat("/usr/bin")
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def test_io_read_limit_throttles_direct_reads_from_the_disk():
    import os
    from pynsbook import cgroups
    if "io" not in cgroups.backend().controllers():
        pytest.skip("no io controller")
    device = _root_block_device()
    if not os.path.exists(f"/sys/dev/block/{device}"):
        pytest.skip(f"the root filesystem is not on a block device ({device})")
    big = max((os.path.join("/usr/bin", f) for f in os.listdir("/usr/bin")),
              key=lambda p: os.path.getsize(p) if os.path.isfile(p) and not os.path.islink(p) else 0)
    size = os.path.getsize(big)
    if size < 4 << 20:
        pytest.skip("no file of 4 MiB or more under /usr/bin to read")
    # O_DIRECT bypasses the page cache, so every byte comes from the device and is throttled
    code = ("import os, mmap, time\n"
            f"fd = os.open({big!r}, os.O_RDONLY | os.O_DIRECT)\n"
            "buf = mmap.mmap(-1, 1 << 20)\n"
            "t = time.monotonic(); n = 0\n"
            "while True:\n"
            "    got = os.readv(fd, [buf])\n"
            "    n += got\n"
            "    if got < len(buf) or n >= 4 << 20: break\n"
            "print(n, time.monotonic() - t)")
    r = pynsbook.run(code, io_read_bps=f"{device}:1M")
    n, seconds = r.stdout.split()
    rate = int(n) / float(seconds)
    assert rate < 1.6 * (1 << 20), f"{int(n) >> 20} MiB in {float(seconds):.2f} s"


def test_swap_limit_is_written_with_the_memory_limit():
    from pynsbook import cgroups
    if not cgroups.backend().can_swap():
        pytest.skip("swap is not accounted per cgroup here")
    with Container(memory="64M", swap="32M") as c:
        s = c.stats()
        assert (s.memory_limit, s.swap_limit) == (64 << 20, 32 << 20)
    with Container(memory="64M") as c:
        assert c.stats().swap_limit == 0  # --mem alone means no swap: OOM is predictable


def test_freeze_stops_the_container_until_thawed():
    import threading
    with Container() as c:
        out = []
        t = threading.Thread(target=lambda: out.append(c.run(
            "import time\nfor i in range(6):\n    print(i, flush=True)\n    time.sleep(0.1)")))
        t.start()
        time.sleep(0.15)
        c.freeze()
        assert c.stats().frozen
        time.sleep(0.6)
        assert t.is_alive()  # frozen: it cannot finish
        c.thaw()
        t.join(10)
        assert out and out[0].stdout.split() == ["0", "1", "2", "3", "4", "5"]


def test_a_limit_can_be_lifted_live():
    with Container(memory="64M", cpus=0.5, pids=16) as c:
        c.update(memory=None, cpus="max", pids="unlimited")
        s = c.stats()
        assert (s.memory_limit, s.cpu_quota, s.pids_limit) == (None, None, None)
        assert c.run(ALLOC.format(mb=100)).ok
        assert "memory" not in c.plan.limits
