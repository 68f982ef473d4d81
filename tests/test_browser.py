"""The panel in a real browser: JupyterLab on localhost, Debian's Chromium driven by
Playwright. A notebook cell starts a container, shows its panel and then blocks in a
foreground run; the test moves the memory slider with the keyboard, and checks that the
cgroup's limit changed (while the cell still runs), that the chart redrew with the new
limit, and that the stop button stops the container. A screenshot is kept in
``test-artifacts/``.

Nothing touches the user's Jupyter setup: the server gets a temporary notebook directory
and temporary runtime, config, data and IPython directories, a random free port and a
random token. The server (and with it the kernel), the browser and the container are gone
when the test ends.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any, Callable, Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO, "test-artifacts")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MIB = 1 << 20
START_MIB = 256
STEPS = 4          # ArrowLeft presses; the memory slider's step is 8 MiB
RUN_SECONDS = 40   # the foreground run; the stop button ends it long before

CELL = f"""\
import pynsbook
from pynsbook.widgets import ContainerPanel
c = pynsbook.Container(memory="{START_MIB}M").start()
panel = ContainerPanel(c, chart_interval=0.5)
display(panel)
print("CGROUP", c.cgroup.dirs["memory"], "LIVE", panel.live_during_cells, flush=True)
try:  # a foreground run: the kernel's main thread is busy until the stop button
    c.run("import time\\nt = time.time()\\nwhile time.time() - t < {RUN_SECONDS}: time.sleep(0.05)")
except Exception as err:
    print("RUN ENDED", type(err).__name__)
finally:
    c.stop()
"""

pytestmark = [pytest.mark.no_vm, pytest.mark.needs("root", "cgroup_v1", "browser"),
              pytest.mark.timeout(120)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def _notebook(path: str) -> None:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    nb = new_notebook(cells=[new_code_cell(CELL)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)


class _Lab:
    """A JupyterLab server in its own session (so its kernel goes with it)."""

    def __init__(self, tmp: str) -> None:
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.root = os.path.join(tmp, "notebooks")
        os.makedirs(self.root)
        env = dict(os.environ)
        for var, sub in (("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTER_CONFIG_DIR", "config"),
                         ("JUPYTER_DATA_DIR", "data"), ("IPYTHONDIR", "ipython")):
            env[var] = os.path.join(tmp, sub)
            os.makedirs(env[var])
        env.pop("JUPYTER_PATH", None)
        self.log = open(os.path.join(tmp, "lab.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.root}", "--LabApp.news_url=",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            env=env, cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"jupyter lab exited with {self.proc.returncode}")
        try:
            with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the server shuts its kernels down
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything of its session still there (a kernel that hung): by its group id
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)
        self.log.close()


def test_moving_the_memory_slider_in_jupyterlab_changes_the_cgroup_and_redraws_the_chart(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    pytest.importorskip("jupyterlab", reason="pip install jupyterlab (the lab extra)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    os.makedirs(ARTIFACTS, exist_ok=True)
    timings = {}
    t0 = time.monotonic()
    lab = _Lab(str(tmp_path))
    cgroup: Optional[str] = None
    try:
        _notebook(os.path.join(lab.root, "panel.ipynb"))
        _wait(lab.ready, 40, "jupyter lab to answer")
        timings["server"] = time.monotonic() - t0
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                console: list = []
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}")
                        if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                page.goto(f"{lab.url}/lab/tree/panel.ipynb?token={lab.token}")
                # the status bar says "Idle" once the kernel is connected and ready
                page.get_by_text("(ipykernel) | Idle").wait_for(timeout=40_000)
                timings["lab loaded, kernel idle"] = time.monotonic() - t0
                prompt = page.locator(".jp-Cell .jp-InputPrompt").first
                for _ in range(3):  # a run asked for as the kernel connects can be dropped
                    page.locator(".jp-Cell .jp-InputArea-editor").first.click()
                    page.keyboard.press("Control+Enter")
                    try:
                        _wait(lambda: prompt.inner_text().strip() not in ("[ ]:", ""), 5,
                              "the cell to start")
                        break
                    except AssertionError:
                        continue
                handle = page.locator(".pynsbook-memory .noUi-handle")
                handle.wait_for(timeout=30_000)
                out = page.locator(".jp-OutputArea-output", has_text="CGROUP")
                out.wait_for(timeout=20_000)
                words = out.inner_text().split()
                cgroup = words[words.index("CGROUP") + 1]
                assert words[words.index("LIVE") + 1] == "True", out.inner_text()
                limit_file = os.path.join(cgroup, "memory.limit_in_bytes")
                assert int(open(limit_file).read()) == START_MIB * MIB
                chart = page.locator("img.pynsbook-chart")
                caption = page.locator(".pynsbook-chart-caption")
                _wait(lambda: "samples" in caption.inner_text(), 10, "the first chart")
                before = chart.screenshot()
                timings["panel shown"] = time.monotonic() - t0

                handle.focus()
                for _ in range(STEPS):
                    page.keyboard.press("ArrowLeft")
                target = (START_MIB - 8 * STEPS) * MIB
                _wait(lambda: int(open(limit_file).read()) == target, 10,
                      f"memory.limit_in_bytes to become {target}")
                timings["cgroup changed"] = time.monotonic() - t0
                prompt = page.locator(".jp-Cell .jp-InputPrompt").first.inner_text()
                assert "*" in prompt, f"the cell had finished ({prompt!r}): not a foreground test"
                new_limit = f"{START_MIB - 8 * STEPS} MiB"
                _wait(lambda: f"limit {new_limit}" in caption.inner_text(), 10,
                      "the chart to redraw with the new limit")
                _wait(lambda: chart.screenshot() != before, 5, "the chart image to change")
                assert new_limit in page.locator(".pynsbook-status").inner_text()
                page.screenshot(path=os.path.join(ARTIFACTS, "browser_panel.png"))
                chart.screenshot(path=os.path.join(ARTIFACTS, "browser_panel_chart.png"))

                page.locator(".pynsbook-panel button", has_text="stop").click()
                _wait(lambda: not os.path.exists(cgroup), 10, "the container's cgroup to go")
                page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']",
                                       timeout=15_000)
                timings["stopped"] = time.monotonic() - t0
            except BaseException:
                try:  # what the page looked like when it went wrong
                    page.screenshot(path=os.path.join(ARTIFACTS, "browser_failure.png"))
                except Exception:
                    pass
                print("browser console:", *console[-20:], sep="\n  ")
                raise
            finally:
                browser.close()
    finally:
        lab.stop()
        timings["all clean"] = time.monotonic() - t0
        print("browser test timings (s from start): "
              + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    assert cgroup is not None and not os.path.exists(cgroup)
    assert timings["all clean"] < 60
