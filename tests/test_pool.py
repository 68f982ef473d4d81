"""Spare containers: a shape started again and again is served by a spare started ahead,
with the same isolation, limits and cleanup as a cold start."""
import os
import time

import pytest

import pynsbook
from pynsbook.engine import pool

CONTAINER = pytest.mark.needs("userns") if os.geteuid() else pytest.mark.needs("root")
pytestmark = [CONTAINER, pytest.mark.usefixtures("no_leaks")]


def _wait_for_spare(timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pool.spares() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_repeated_shape_gets_a_spare_and_the_adopter_gets_its_own_hostname_and_limits():
    pool.drain()
    shape = dict(namespaces="pid,mnt,uts,ipc,net" + (",user" if os.geteuid() else ""))
    for _ in range(pool.WARM_AFTER):
        pynsbook.run(["true"], **shape)
    _wait_for_spare()
    spare = pool.spares()
    assert len(spare) == 1
    spare_init = spare[0].init_pid
    with pynsbook.Container(hostname="adopted", pids=40, **shape) as c:
        assert c.init_pid == spare_init  # the spare was adopted
        r = c.exec(["sh", "-c", "hostname; cat /proc/self/cgroup | head -1"])
        assert r.stdout.splitlines()[0] == "adopted"
        if c.cgroup is not None:
            assert c.stats().pids_limit == 40
    pool.drain()
    assert not pool.spares()


@pytest.mark.needs("cgroups")
def test_an_adopted_spare_still_reports_oom_from_its_cgroup():
    pool.drain()
    for _ in range(pool.WARM_AFTER + 1):
        r = pynsbook.run("x = bytearray(200 << 20)", memory="64M")
        assert r.oom_killed, r
        _wait_for_spare(2)
    pool.drain()


def test_spares_can_be_turned_off():
    pool.set_enabled(False)
    try:
        for _ in range(pool.WARM_AFTER + 1):
            pynsbook.run(["true"])
        time.sleep(0.2)
        assert not pool.spares()
    finally:
        pool.set_enabled(True)


def test_a_command_in_an_adopted_spare_sees_no_idle_worker():
    pool.drain()
    for _ in range(pool.WARM_AFTER):
        pynsbook.run(["true"])
    _wait_for_spare()
    r = pynsbook.run(["sh", "-c", "echo /proc/[0-9]*"])  # the shell expands it itself
    assert len(r.stdout.split()) == 2, r.stdout  # init and sh: nothing else
    pool.drain()
