"""ContainerPanel: sliders and buttons reach the cgroup; the panel stays live while a cell
blocks the kernel's main thread (messages sent as a front end would, over jupyter_client);
hosts without cgroups get disabled controls and a reason; headless runs get a PNG."""
from __future__ import annotations

import json
import os
import queue
import time
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import pytest

import pynsbook
from pynsbook.monitor import Monitor
from pynsbook.results import Stats

MIB = 1 << 20
CONTAINER = pytest.mark.needs("root", "cgroup_v1")  # reads v1 interface files directly
NOTEBOOKS = os.path.join(os.path.dirname(__file__), "notebooks")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


@CONTAINER
@pytest.mark.usefixtures("no_leaks")
def test_sliders_and_buttons_change_the_cgroup_at_once():
    from pynsbook.widgets import ContainerPanel
    with pynsbook.Container(memory="256M", cpus=1, pids=64) as c:
        panel = ContainerPanel(c, chart_interval=0.3)
        try:
            assert panel.memory.value == 256 and panel.cpus.value == 1.0 and panel.pids.value == 64
            mem = os.path.join(c.cgroup.dirs["memory"], "memory.limit_in_bytes")
            panel.memory.value = 128  # what a front end's slider move does, in the handler
            assert int(_read(mem)) == 128 * MIB
            panel.cpus.value = 0.5
            assert _read(os.path.join(c.cgroup.dirs["cpu"], "cpu.cfs_quota_us")) == "50000"
            panel.pids.value = 32
            assert _read(os.path.join(c.cgroup.dirs["pids"], "pids.max")) == "32"
            panel.pids.value = panel.pids.max  # the right end: a limit that does not bind
            assert _read(os.path.join(c.cgroup.dirs["pids"], "pids.max")) == str(panel.pids.max)
            panel.freeze_button.click()
            assert _read(os.path.join(c.cgroup.dirs["freezer"], "freezer.state")) == "FROZEN"
            assert panel.monitor.series.samples[-1].frozen is True
            panel.thaw_button.click()
            assert _read(os.path.join(c.cgroup.dirs["freezer"], "freezer.state")) == "THAWED"
            # the new limit is in the series, so the chart draws it
            assert panel.monitor.series.samples[-1].memory_limit == 128 * MIB
            first = panel.chart.value
            deadline = time.monotonic() + 5
            while panel.chart.value == first and time.monotonic() < deadline:
                time.sleep(0.05)
            assert panel.chart.value != first and panel.chart.value[:4] == b"\x89PNG"
            assert "memory limit 128 MiB" in panel.caption.value
            bundle = panel._repr_mimebundle_()
            assert {"image/png", "text/plain",
                    "application/vnd.jupyter.widget-view+json"} <= set(bundle)
            panel.stop_button.click()
            assert not c.running
            deadline = time.monotonic() + 5
            while not panel.memory.disabled and time.monotonic() < deadline:
                time.sleep(0.05)
            assert panel.memory.disabled and "stopped" in panel.status.value
        finally:
            panel.close()


@CONTAINER
@pytest.mark.usefixtures("no_leaks")
def test_a_limit_the_kernel_refuses_is_reported_and_the_slider_springs_back():
    from pynsbook.widgets import ContainerPanel
    with pynsbook.Container(memory="256M") as c:
        panel = ContainerPanel(c, chart_interval=5)
        try:
            c.update(memory="200M")  # e.g. %cgroup NAME memory=200M: the panel follows
            panel.monitor.sample()
            panel._sync_from(panel.monitor.series.samples[-1])
            assert panel.memory.value == 200
            c.stop()
            panel.memory.value = 64
            assert panel.errors and "could not set memory" in panel.errors[-1]
            assert "could not set memory" in panel.note.value
        finally:
            panel.close()


class _NoCgroupContainer:
    """What a container looks like on a host without cgroups: no .cgroup, /proc samples."""

    name = "fallback"
    cgroup = None
    running = True
    plan = SimpleNamespace(limits={"memory": 64 * MIB})

    def __init__(self) -> None:
        self.cpu = 0.0

    def stats(self) -> Stats:
        self.cpu += 0.01
        return Stats(backend="fallback", memory_current=10 * MIB, memory_peak=12 * MIB,
                     memory_limit=64 * MIB, cpu_time=self.cpu, pids_current=2,
                     approximate=True)

    def update(self, **limits: Any) -> None:  # pragma: no cover - must not be reached
        raise AssertionError("a disabled slider changed a limit")


def test_without_cgroups_the_controls_are_disabled_and_the_panel_says_why():
    from pynsbook.widgets import ContainerPanel
    panel = ContainerPanel(_NoCgroupContainer(), chart_interval=0.2)
    try:
        for w in (panel.memory, panel.cpus, panel.pids, panel.freeze_button, panel.thaw_button):
            assert w.disabled
        assert not panel.stop_button.disabled
        assert "need" in panel.note.value and "approximate" in panel.note.value
        deadline = time.monotonic() + 5
        while "approximate" not in panel.status.value and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "approximate" in panel.status.value and panel.chart.value[:4] == b"\x89PNG"
    finally:
        panel.close()
    assert not panel.monitor.running


# ---------------------------------------------------------------------------------------
# a real kernel: widget messages while the main thread is busy


class _Kernel:
    def __init__(self) -> None:
        from jupyter_client.manager import KernelManager
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=os.path.dirname(os.path.dirname(__file__)))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def execute(self, code: str) -> str:
        return self.kc.execute(code)

    def reply(self, msg_id: str, timeout: float = 60) -> Dict[str, Any]:
        while True:
            msg = self.kc.get_shell_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def pending(self, msg_id: str) -> bool:
        """Whether the cell's execute_reply has not come yet (other replies are dropped)."""
        while True:
            try:
                msg = self.kc.get_shell_msg(timeout=0.01)
            except queue.Empty:
                return True
            if msg["parent_header"].get("msg_id") == msg_id:
                return False

    def output(self, msg_id: str, timeout: float = 60) -> str:
        """stdout of a cell, once it is idle."""
        out: List[str] = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            if msg["msg_type"] == "error":
                raise AssertionError("\n".join(msg["content"]["traceback"]))
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return "".join(out)

    def comm_update(self, comm_id: str, **state: Any) -> None:
        """What JupyterLab sends when a slider is moved."""
        msg = self.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {
            "method": "update", "state": state, "buffer_paths": []}})
        self.kc.shell_channel.send(msg)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def _wait_for(check: Any, timeout: float) -> Optional[float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(0.01)
    return None


@CONTAINER
@pytest.mark.no_vm
def test_the_panel_stays_live_while_a_foreground_cell_blocks_and_beside_a_background_run():
    k = _Kernel()
    try:
        setup = k.execute(
            "import json, pynsbook, threading\n"
            "from pynsbook.widgets import ContainerPanel\n"
            "c = pynsbook.Container(memory='256M').start()\n"
            "p = ContainerPanel(c, chart_interval=0.5)\n"
            "display(p)\n"
            "print(json.dumps({'mem': c.cgroup.dirs['memory'], 'cpu': c.cgroup.dirs['cpu'],"
            " 'memory': p.memory.model_id, 'cpus': p.cpus.model_id,"
            " 'live': p.live_during_cells, 'note': p.note.value}))\n")
        info = json.loads(k.output(setup).strip().splitlines()[-1])
        assert info["live"], info["note"]
        mem = os.path.join(info["mem"], "memory.limit_in_bytes")

        # a foreground run: the kernel's main thread is blocked in c.run for 4 s
        busy = k.execute("r = c.run('import time; time.sleep(4)'); print(r.wall_time)")
        time.sleep(0.8)  # well inside the run
        k.comm_update(info["memory"], value=96)
        latency = _wait_for(lambda: int(_read(mem)) == 96 * MIB, 3)
        reply_pending = k.pending(busy)
        assert latency is not None, "the memory slider did nothing while the cell ran"
        assert reply_pending, "the blocking cell had already finished"
        print(f"slider -> cgroup while a cell blocks: {latency * 1000:.0f} ms")
        assert float(k.output(busy).strip()) > 3.5  # the run itself was not disturbed

        # a background run (what --bg does): the cell returns, the run goes on
        bg = k.execute("t = threading.Thread(target=c.run, args=('import time; time.sleep(3)',))\n"
                       "t.start()")
        k.output(bg)
        k.comm_update(info["cpus"], value=0.25)
        quota = os.path.join(info["cpu"], "cpu.cfs_quota_us")
        assert _wait_for(lambda: _read(quota) == "25000", 3) is not None
        done = k.execute("t.join(); p.close(); c.stop(); print(c.running)")
        assert k.output(done).strip() == "False"
        assert not os.path.exists(info["mem"])
    finally:
        k.close()


# ---------------------------------------------------------------------------------------
# headless


@CONTAINER
@pytest.mark.no_vm
def test_a_notebook_with_a_panel_and_a_chart_executes_headless_and_yields_pngs(tmp_path):
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(os.path.join(NOTEBOOKS, "panel_headless.ipynb"), as_version=4)
    t0 = time.monotonic()
    NotebookClient(nb, timeout=60, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    took = time.monotonic() - t0
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    # the panel (its chart as a static picture) and the full usage figure
    assert len(pngs) >= 2, [sorted(o.get("data", {})) for o in outputs]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in pngs)
    assert took < 45


def test_monitor_needs_a_positive_rate():
    with pytest.raises(ValueError):
        Monitor(_NoCgroupContainer(), rate=0)
