"""``pynsbook kernel install|uninstall``: install into a temporary prefix, start a real
kernel from the kernelspec, and check it preloads the magics and that its limits hold."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import psutil
import pytest

from tests.test_magics import KernelSession, error_of, leftovers, session_dirs, wait_until


def pynsbook_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pynsbook", *args], capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.fixture
def prefix(tmp_path, monkeypatch):
    """A kernel directory of our own: JUPYTER_PATH points the kernel manager at it."""
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    return tmp_path


def test_install_writes_a_kernelspec_that_preloads_the_extension(prefix):
    r = pynsbook_cli("kernel", "install", "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    spec = json.loads((prefix / "share/jupyter/kernels/pynsbook/kernel.json").read_text())
    assert spec["display_name"] == "Python 3 (pynsbook)"
    assert spec["argv"][:3] == [sys.executable, "-m", "ipykernel_launcher"]
    assert "--IPKernelApp.extensions=pynsbook" in spec["argv"]
    assert "{connection_file}" in spec["argv"]
    r = pynsbook_cli("kernel", "uninstall", "--prefix", str(prefix))
    assert r.returncode == 0 and not (prefix / "share/jupyter/kernels/pynsbook").exists()
    r = pynsbook_cli("kernel", "uninstall", "--prefix", str(prefix))
    assert r.returncode != 0 and "no kernel named 'pynsbook'" in r.stderr


def test_bad_limits_fail_at_install(prefix):
    r = pynsbook_cli("kernel", "install", "--prefix", str(prefix), "--mem", "lots")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("pynsbook: invalid value 'lots' for --mem: expected a "
                                       "size like 64M")
    assert r.stderr.count("\n") == 1
    assert not (prefix / "share/jupyter/kernels/pynsbook").exists()


def test_plain_kernel_starts_with_the_magics_loaded(prefix, tmp_path):
    assert pynsbook_cli("kernel", "install", "--prefix", str(prefix)).returncode == 0
    k = KernelSession("pynsbook", cwd=str(tmp_path))
    try:
        out = k.ok("import os\nprint(sorted(get_ipython().magics_manager.magics['cell']).count('container'),"
                   " os.getcwd())")
        assert out == f"1 {tmp_path}\n"
    finally:
        k.close()


@pytest.mark.needs("root", "cgroups")
def test_limited_kernel_runs_in_a_cgroup_and_its_limits_hold(prefix, tmp_path):
    r = pynsbook_cli("kernel", "install", "--prefix", str(prefix), "--name", "small",
                     "--mem", "160M", "--cpus", "1.5")
    assert r.returncode == 0, r.stderr
    spec = json.loads((prefix / "share/jupyter/kernels/small/kernel.json").read_text())
    assert spec["display_name"] == "Python 3 (pynsbook: memory 160 MiB, cpus 1.5)"
    k = KernelSession("small", cwd=str(tmp_path))
    launcher = k.pid
    dirs = session_dirs(launcher)
    try:
        # the right place: our cwd, the connection file readable, the magics loaded
        out = k.ok("import os\nprint(os.getcwd(), 'container' in get_ipython().magics_manager.magics['cell'])")
        assert out == f"{tmp_path} True\n"
        # the kernel sits in the cgroup with the limits, and %cgroup tells the student
        out = k.ok("t = %cgroup\nprint(t)")
        assert "160 MiB (set here)" in out and "1.5 CPUs (set here)" in out
        # the kernel can still run containers (nested below its own cgroup)
        assert k.ok("%%container --mem 64M\nprint('nested')\n") == "nested\n"
        # the stop button reaches the kernel through the launcher
        threading.Timer(1.0, k.km.interrupt_kernel).start()
        reply, msgs = k.execute("import time\ntime.sleep(20)")
        assert error_of(msgs)["ename"] == "KeyboardInterrupt" and msgs[-1]["t"] < 5
        assert k.ok("print('alive')") == "alive\n"
        # the memory limit holds for the whole kernel
        kernel_pid = int(k.ok("import os; print(os.getpid())"))
        k.kc.execute("x = bytearray(400 * 2**20)")
        assert wait_until(lambda: not psutil.pid_exists(kernel_pid)
                          or psutil.Process(kernel_pid).status() == psutil.STATUS_ZOMBIE, 20)
        assert wait_until(lambda: k.km.provisioner.process.poll() is not None, 10)
        assert k.km.provisioner.process.returncode == 137  # the launcher reports the OOM
    finally:
        k.close()
    # nothing left: not the kernel's cgroup, not its containers' (nested) cgroups
    assert wait_until(lambda: not leftovers(dirs), 10), leftovers(dirs)
    assert not any(os.path.isdir(d) for d in dirs)


@pytest.mark.needs("root", "cgroups")
def test_killing_the_launcher_of_a_limited_kernel_leaves_nothing(prefix, tmp_path):
    assert pynsbook_cli("kernel", "install", "--prefix", str(prefix), "--name", "small",
                        "--mem", "256M").returncode == 0
    k = KernelSession("small", cwd=str(tmp_path))
    dirs = session_dirs(k.pid)
    try:
        k.ok("%%container --name n --mem 64M\nprint(1)\n")
        os.kill(k.pid, 9)  # what a hard kill of the kernel does
        assert wait_until(lambda: not leftovers(dirs), 3), leftovers(dirs)
    finally:
        k.close()
        for d in dirs:  # clean up after the engine, so the xfail leaves nothing either
            for root, _, _ in os.walk(d, topdown=False):
                try:
                    os.rmdir(root)
                except OSError:
                    pass
