"""`pynsbook run` and `pynsbook doctor` as a user meets them: exit codes and one-line messages."""
import json
import os
import subprocess
import sys

import pytest

from tests import helpers

CONTAINER = pytest.mark.needs("userns") if os.geteuid() else pytest.mark.needs("root")


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    return subprocess.run([sys.executable, "-m", "pynsbook", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@CONTAINER
def test_run_exits_with_the_childs_status_and_streams_its_output():
    r = cli("run", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")


@CONTAINER
@pytest.mark.needs("cgroups")
def test_run_reports_oom_with_137_and_one_line():
    r = cli("run", "--mem", "64M", "--", sys.executable, "-c", "x = bytearray(200 << 20)")
    assert r.returncode == 137
    assert r.stderr.strip().startswith("pynsbook: killed: out of memory (limit 64 MiB, peak ")
    assert len(r.stderr.strip().splitlines()) == 1


@CONTAINER
def test_run_timeout_exits_124():
    r = cli("run", "--timeout", "0.5", "--", "sleep", "10")
    assert r.returncode == 124
    assert "timed out after 0.5 s" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--mem", "64X"], "invalid value '64X' for --mem: expected a size like 64M"),
    (["--cpus", "-1"], "invalid value '-1' for --cpus"),
    (["--ns", "bogus"], "invalid value 'bogus' for --ns"),
    (["--rootfs", "/no/such/root"], "invalid value '/no/such/root' for --rootfs"),
])
def test_bad_input_is_one_line_without_traceback(args, needle):
    r = cli("run", *args, "--", "true")
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_run_without_a_command_says_how():
    r = cli("run", "--mem", "64M")
    assert r.returncode == 2 and "needs a command after --" in r.stderr


def test_doctor_json_reports_every_piece():
    r = cli("doctor", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["cgroup_mode"] in ("v1", "v2", "hybrid", "none")
    assert [c["name"] for c in report["namespaces"]] == ["cgroup", "ipc", "net", "mnt", "pid",
                                                          "time", "user", "uts"]
    assert {c["name"] for c in report["controllers"]} == {"memory", "cpu", "cpuset", "pids", "io"}
    assert report["overlay"]["name"] == "overlay"
    for check in report["controllers"] + report["namespaces"] + [report["overlay"]]:
        if not check["ok"]:
            assert check["reason"] and check["fix"], check


def test_doctor_text_is_readable():
    r = cli("doctor")
    assert r.returncode == 0
    assert "cgroups:" in r.stdout and "namespaces:" in r.stdout


@CONTAINER
def test_run_passes_binary_output_through_byte_for_byte():
    data = bytes(range(256)) * 64 + b"\xff\xfe not utf-8 \x00"
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    # what the container writes comes out exactly (decoding would replace the bytes that
    # are not UTF-8)
    code = f"import sys; sys.stdout.buffer.write({data!r})"
    r = subprocess.run([sys.executable, "-m", "pynsbook", "run", "--", sys.executable, "-c", code],
                       capture_output=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data
