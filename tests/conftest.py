"""Test conventions.

Tests say what the host must offer with ``@pytest.mark.needs("cap", ...)``. A missing
capability skips the test with the reason; but a lane that is supposed to have it lists it
in ``PYNSBOOK_REQUIRE`` (comma-separated), and then the skip becomes a failure, so a lane
cannot pass by quietly skipping what it exists to test.

Capabilities: root, rootless_user (able to run code as an unprivileged user: the test user
made as root, or ourselves when not root), cgroups (memory, cpu and pids controllers usable), cgroup_v1, cgroup_v2, userns,
overlay, timens, stress_ng, busybox, qemu, cc (a C compiler: the small compiled init),
delegated_scope (an ordinary user whose processes sit in a delegated v2 scope, as systemd
leaves a `systemd-run --user --scope -p Delegate=yes` one),
browser (Debian's chromium, playwright and JupyterLab).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Dict, Tuple

import pytest

from tests import helpers


def _capabilities() -> Dict[str, Tuple[bool, str]]:
    from pynsbook import cgroups, probe
    backend = cgroups.backend()
    have = backend.controllers()
    caps: Dict[str, Tuple[bool, str]] = {}
    root = os.geteuid() == 0
    caps["root"] = (root, "not running as root")
    need = {"memory", "cpu", "pids"}
    why = "; ".join(f"{c}: {backend.missing(c).reason}" for c in sorted(need - have))
    caps["cgroups"] = (need <= have, why or "")
    caps["cgroup_v1"] = (backend.name == "cgroup-v1" and need <= have, "not a usable cgroup v1 host")
    caps["cgroup_v2"] = (backend.name == "cgroup-v2" and need <= have,
                         f"not a usable cgroup v2 host ({why or backend.name})")
    ns = probe.namespaces()
    caps["userns"] = (ns["user"][0], ns["user"][1])
    caps["timens"] = (ns["time"][0], ns["time"][1])
    caps["overlay"] = (probe.overlay()[0], probe.overlay()[1])
    for tool, name in (("stress-ng", "stress_ng"), ("busybox", "busybox"),
                       ("qemu-system-x86_64", "qemu")):
        caps[name] = (shutil.which(tool) is not None, f"{tool} is not installed")
    from pynsbook.engine import tiny
    caps["cc"] = (tiny._compiler() is not None, "no C compiler (apt-get install gcc libc6-dev)")
    # as root the tests make an unprivileged user; as one already, they run as ourselves
    caps["delegated_scope"] = (
        bool(getattr(backend, "delegated_scope", None)) and not root,
        "not an unprivileged user inside a delegated cgroup-v2 scope "
        "(systemd-run --user --scope -p Delegate=yes)")
    ok, why = helpers.rootless_user_available() if root else (True, "")
    caps["rootless_user"] = (ok, why)
    import importlib.util
    missing = [what for what, ok in (
        ("/usr/bin/chromium (apt-get install chromium)", os.path.exists("/usr/bin/chromium")),
        ("playwright (pip)", importlib.util.find_spec("playwright") is not None),
        ("jupyterlab (pip)", importlib.util.find_spec("jupyterlab") is not None)) if not ok]
    caps["browser"] = (not missing, "missing " + ", ".join(missing))
    return caps


_CAPS: Dict[str, Tuple[bool, str]] = {}


def pytest_configure(config: pytest.Config) -> None:
    _CAPS.update(_capabilities())


def pytest_unconfigure(config: pytest.Config) -> None:
    helpers.remove_created_users()  # the machine is left with the users it had


def pytest_runtest_setup(item: pytest.Item) -> None:
    required = {c for c in os.environ.get("PYNSBOOK_REQUIRE", "").split(",") if c}
    for mark in item.iter_markers("needs"):
        for cap in mark.args:
            if cap not in _CAPS:
                pytest.fail(f"unknown capability {cap!r} in @needs (known: {', '.join(sorted(_CAPS))})")
            ok, why = _CAPS[cap]
            if ok:
                continue
            if cap in required:
                pytest.fail(f"this lane must have {cap}, but: {why}")
            pytest.skip(f"host lacks {cap}: {why}")


def pytest_report_header(config: pytest.Config) -> str:
    have = ",".join(sorted(c for c, (ok, _) in _CAPS.items() if ok))
    lane = os.environ.get("PYNSBOOK_LANE", "host")
    return f"pynsbook lane: {lane}; capabilities: {have}"


@pytest.fixture
def no_leaks():
    """Fail the test if it left a process, a cgroup or a mount of ours behind."""
    before = helpers.snapshot()
    yield
    helpers.assert_nothing_left(before)
