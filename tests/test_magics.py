"""The magics, driven through a real IPython kernel (jupyter_client) and nbclient.

A test reads the kernel's iopub messages for its cell, with the time each one arrived, so
it can prove output streams while the cell still runs.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import psutil
import pytest

from pynsbook.linux.mountinfo import Mount

# ---------------------------------------------------------------------------------------
# a kernel to talk to


def session_dirs(pid: int, start: Optional[str] = None) -> List[str]:
    """The cgroup session directories of process ``pid`` (``<base>/pynsbook/<pid>-<start>``)
    in every hierarchy; it inherits our cgroups, so they sit under our bases."""
    from pynsbook import cgroups
    from pynsbook.cgroups.base import TOP, session_name
    backend = cgroups.backend()
    bases = list(getattr(backend, "dirs", {}).values()) or [backend.base()]
    name = start or session_name(pid)
    return sorted({os.path.join(b, TOP, name) for b in bases if b})


def leftovers(dirs: List[str]) -> List[str]:
    """Container cgroups still inside the session directories."""
    out = []
    for d in dirs:
        if os.path.isdir(d):
            out += [os.path.join(d, c) for c in os.listdir(d) if os.path.isdir(os.path.join(d, c))]
    return out


def wait_until(check, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


class KernelSession:
    """A real kernel started by jupyter_client; ``execute`` returns the reply and the
    iopub messages of that cell, each with ``t``: seconds since the request was sent."""

    def __init__(self, kernel_name: str = "python3", cwd: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None) -> None:
        from jupyter_client.manager import KernelManager
        self.km = KernelManager(kernel_name=kernel_name)
        kw: Dict[str, Any] = {"cwd": cwd or os.getcwd()}
        if env is not None:
            kw["env"] = env
        self.km.start_kernel(**kw)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid

    def execute(self, code: str, timeout: float = 60) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        msg_id = self.kc.execute(code)
        t0 = time.monotonic()
        msgs = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            msg["t"] = time.monotonic() - t0
            msgs.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        while True:
            reply = self.kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"], msgs

    def ok(self, code: str) -> str:
        """Run code that must succeed; return its stdout."""
        reply, msgs = self.execute(code)
        errors = [m["content"] for m in msgs if m["msg_type"] == "error"]
        assert reply["status"] == "ok" and not errors, (code, errors, stream(msgs, "stderr"))
        return stream(msgs, "stdout")

    def close(self) -> None:
        self.kc.stop_channels()
        if self.km.has_kernel:
            self.km.shutdown_kernel(now=False)


def stream(msgs: List[Dict[str, Any]], name: str) -> str:
    return "".join(m["content"]["text"] for m in msgs
                   if m["msg_type"] == "stream" and m["content"]["name"] == name)


def error_of(msgs: List[Dict[str, Any]]) -> Dict[str, Any]:
    errors = [m["content"] for m in msgs if m["msg_type"] == "error"]
    assert errors, "the cell did not fail"
    return errors[0]


@pytest.fixture(scope="module")
def kernel():
    k = KernelSession()
    k.ok("%load_ext pynsbook")
    yield k
    k.close()


# ---------------------------------------------------------------------------------------
# without a kernel: parsing and help

def test_every_option_is_in_the_help():
    from pynsbook import spec
    from pynsbook.magics import ContainerMagics
    doc = ContainerMagics.container_cell.__doc__
    for opt in spec.OPTIONS:
        for flag in opt.flags:
            assert flag in doc, flag
    for flag in ("-i, --in", "-o, --out", "--bash", "--bg", "--proc", "--stats", "--plot",
                 "--no-raise-error", "Examples"):
        assert flag in doc
    assert "%container ls" in ContainerMagics.container_line.__doc__
    assert "memory=128M" in ContainerMagics.cgroup.__doc__


@pytest.mark.parametrize("line, words", [
    ("--mem 64X", "invalid value '64X' for --mem"),
    ("--bogus", "unrecognized arguments: --bogus"),
    ("--cpus", "expected one argument"),
    ("--proc job", "--proc VAR goes with --bg"),
    ("--bash -o x", "-o works for Python cells only"),
    ("-i 1x", "'1x' is not a Python variable name"),
    ("--hostname 'a b", "cannot split"),
])
def test_bad_options_are_one_usage_error(line, words):
    from IPython.core.error import UsageError
    from pynsbook.notebook.args import parse_cell_line
    with pytest.raises(UsageError) as info:
        parse_cell_line(line)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_cell_options_are_the_run_options():
    from pynsbook.notebook.args import parse_cell_line
    args, spec = parse_cell_line("--mem 64M --cpus 0.5 --pids 32 --name db -e A=1 -i x y -o z "
                                 "--stats --no-raise-error")
    assert (spec.memory, spec.cpus, spec.pids, spec.name, spec.env) == (64 << 20, 0.5, 32, "db", (("A", "1"),))
    assert args.inputs == ["x", "y"] and args.outputs == ["z"] and args.stats and not args.raise_error


def test_own_cgroup_reads_limits_up_the_tree():
    from pynsbook.notebook.cgroupview import own_cgroup
    mounts = [Mount(1, 0, "/", "/sys/fs/cgroup/memory", (), "cgroup", "cgroup", ("rw", "memory")),
              Mount(2, 0, "/", "/sys/fs/cgroup/pids", (), "cgroup", "cgroup", ("rw", "pids"))]
    files = {
        "/sys/fs/cgroup/memory/lab/k/cgroup.procs": "1\n",
        "/sys/fs/cgroup/memory/lab/k/memory.limit_in_bytes": "9223372036854771712",
        "/sys/fs/cgroup/memory/lab/k/memory.usage_in_bytes": str(50 << 20),
        "/sys/fs/cgroup/memory/lab/memory.limit_in_bytes": str(1 << 30),
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
        "/sys/fs/cgroup/pids/k/cgroup.procs": "1\n",
        "/sys/fs/cgroup/pids/k/pids.max": "64",
        "/sys/fs/cgroup/pids/k/pids.current": "3",
    }
    table = own_cgroup("1", mounts, {"memory": "/lab/k", "pids": "/k"}, files.get)
    text = str(table)
    assert "1 GiB (set at /lab)" in text and "50 MiB in use" in text
    assert "64 (set here)" in text and "3 tasks" in text
    assert "cpu" in text and "controller not available" in text
    assert "memory: 1 GiB, set by /lab above this cgroup" in text
    assert "<table>" in table._repr_html_()


# ---------------------------------------------------------------------------------------
# through a real kernel

@pytest.mark.needs("root", "cgroups")
def test_output_streams_line_by_line_stdout_and_stderr_apart(kernel):
    reply, msgs = kernel.execute(
        "%%container --mem 64M\n"
        "import sys, time\n"
        "for i in range(3):\n"
        "    print('line', i); print('warn', i, file=sys.stderr); time.sleep(0.6)\n")
    assert reply["status"] == "ok"
    out = [m for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"]
    assert stream(msgs, "stdout") == "line 0\nline 1\nline 2\n"
    assert stream(msgs, "stderr") == "warn 0\nwarn 1\nwarn 2\n"
    end = msgs[-1]["t"]
    assert out[0]["content"]["text"].startswith("line 0")
    assert out[0]["t"] < end - 1.0, "the first line came only when the cell ended"
    assert len(out) >= 3  # one message per line: they came while the cell ran


@pytest.mark.needs("root", "cgroups")
def test_oom_raises_one_readable_line(kernel):
    reply, msgs = kernel.execute("%%container --mem 64M\nx = bytearray(200 * 2**20)\n")
    assert reply["status"] == "error"
    err = error_of(msgs)
    assert err["ename"] == "ContainerFailed"
    assert err["evalue"].startswith("killed: out of memory (limit 64 MiB, peak ")
    assert len(err["traceback"]) == 1  # no traceback through the magic's insides


@pytest.mark.needs("root", "cgroups")
@pytest.mark.parametrize("line", ["--mem 64X", "--bogus", "--cpus 99"])
def test_bad_flags_are_a_usage_error_without_traceback(kernel, line):
    reply, msgs = kernel.execute(f"%%container {line}\nprint('never')\n")
    assert reply["status"] == "error" and reply["ename"] == "UsageError"
    assert "never" not in stream(msgs, "stdout")
    assert stream(msgs, "stderr").count("\n") == 1  # one line, no traceback


@pytest.mark.needs("root", "cgroups")
def test_no_raise_error_goes_on(kernel):
    reply, msgs = kernel.execute("%%container --no-raise-error --bash\necho hi; exit 3\n")
    assert reply["status"] == "ok"
    assert stream(msgs, "stdout") == "hi\n"
    assert "pynsbook: exited with status 3" in stream(msgs, "stderr")


@pytest.mark.needs("root", "cgroups")
def test_numpy_round_trip_and_stats(kernel):
    kernel.ok("import numpy as np\narr = np.arange(12).reshape(3, 4)")
    out = kernel.ok("%%container --mem 128M -i arr -o doubled total --stats\n"
                    "import os\ndoubled = arr * 2\ntotal = int(arr.sum())\nprint('pid', os.getpid())\n")
    assert "pid 2" in out  # its own PID namespace: the cell is PID 2 after the init
    assert "pynsbook: wall " in out and "of 128 MiB" in out
    assert kernel.ok("print(type(doubled).__name__, doubled.tolist()[2], total)") == \
        "ndarray [16, 18, 20, 22] 66\n"


@pytest.mark.needs("root", "cgroups")
def test_bash_cell_gets_inputs_as_environment(kernel):
    kernel.ok("who = 'lab'")
    assert kernel.ok("%%container --bash --hostname box -i who\necho $who $(hostname)\n") == "lab box\n"


@pytest.mark.needs("root", "cgroups")
def test_named_container_keeps_python_state_and_files(kernel):
    try:
        kernel.ok("%%container --name st --mem 128M\nrows = [1, 2, 3]\nopen('/tmp/pynsbook-mark', 'w').write('x')\n"
                  "import os\nprint(os.getpid())\n")
        out = kernel.ok("%%container --name st\nimport os\nprint(len(rows), os.path.exists('/tmp/pynsbook-mark'))\n")
        assert out == "3 True\n"
        assert "\nst " in kernel.ok("t = %container ls\nprint(t)")
        assert kernel.ok("%container logs st").endswith("3 True\n")
        # a start-only option on a running container is refused, as one line
        reply, _ = kernel.execute("%%container --name st --hostname other\nprint(1)\n")
        assert reply["ename"] == "UsageError" and "already runs" in reply["evalue"]
    finally:
        kernel.ok("%container rm st")
    assert kernel.ok("import pynsbook; print(sorted(pynsbook.containers()))") == "[]\n"


@pytest.mark.needs("root", "cgroups")
def test_cgroup_magic_changes_limits_live(kernel):
    try:
        kernel.ok("%%container --name lim --mem 64M --pids 32\nprint('up')\n")
        out = kernel.ok("t = %cgroup lim memory=128M pids=64 cpus=0.5\nprint(t)")
        assert "128 MiB" in out and "0.5 CPUs" in out and "memory.limit_in_bytes" in out
        files = kernel.ok(
            "import pynsbook\nc = pynsbook.get('lim')\n"
            "print(sorted(v for k, v in c.cgroup.files().items() if k.endswith(('limit_in_bytes', 'pids.max', 'cfs_quota_us', 'memory.max', 'cpu.max'))))")
        assert str(128 << 20) in files and "'64'" in files and "50000" in files
        reply, msgs = kernel.execute("%cgroup lim memory=lots")
        assert reply["ename"] == "UsageError" and "invalid value 'lots'" in reply["evalue"]
        reply, _ = kernel.execute("%cgroup nope")
        assert reply["ename"] == "UsageError" and "no running container named 'nope'" in reply["evalue"]
    finally:
        kernel.ok("%container stop lim")


@pytest.mark.needs("root")
def test_cgroup_alone_shows_the_kernels_own(kernel):
    out = kernel.ok("t = %cgroup\nprint(t)")
    assert "The cgroup of this kernel" in out and "memory" in out
    assert "apply to this kernel" in out or "applies to this kernel" in out


@pytest.mark.needs("root", "cgroups")
def test_bg_returns_at_once_and_output_keeps_arriving(kernel):
    reply, msgs = kernel.execute(
        "%%container --bg --proc job --mem 64M\n"
        "import sys, time\n"
        "for i in range(4):\n"
        "    print('tick', i); time.sleep(0.4)\n"
        "print('oops', file=sys.stderr)\n")
    assert reply["status"] == "ok" and msgs[-1]["t"] < 1.0  # returned before the run ended
    ids = [m["content"]["transient"]["display_id"] for m in msgs if m["msg_type"] == "display_data"]
    assert len(ids) == 2  # stdout and stderr, made in this cell
    # the next cell waits; the updates go to the first cell's displays by id
    reply, later = kernel.execute("r = job.wait(20)\nprint(r.exit_code, job.done)")
    assert stream(later, "stdout") == "0 True\n"
    updates = [m for m in later if m["msg_type"] == "update_display_data"]
    by_id = {}
    for m in updates:
        by_id[m["content"]["transient"]["display_id"]] = m["content"]["data"]["text/plain"]
    assert by_id[ids[0]] == "tick 0\ntick 1\ntick 2\ntick 3\n" or "tick 3" in by_id[ids[0]]
    assert by_id[ids[1]] == "oops\n"
    assert len([m for m in updates if m["content"]["transient"]["display_id"] == ids[0]]) >= 2
    assert kernel.ok("import pynsbook; print(len(pynsbook.containers()))") == "0\n"


@pytest.mark.needs("root", "cgroups")
def test_interrupt_stops_the_container_and_leaves_nothing(kernel):
    kpid = kernel.pid
    dirs = session_dirs(kpid)
    before = {p.pid for p in psutil.Process(kpid).children(recursive=True)}
    busy: List[str] = []

    def find_running() -> None:
        # the cell's container: its cgroup holds init and the cell, under the cell's 64M
        # (a spare container waiting in the pool has no limit yet)
        from pynsbook.cgroups.base import procs, read_int
        limited = {os.path.basename(d) for d in leftovers(dirs) if len(procs(d)) >= 2 and
                   64 << 20 in (read_int(os.path.join(d, "memory.limit_in_bytes")),
                                read_int(os.path.join(d, "memory.max")))}
        busy.extend(d for d in leftovers(dirs) if os.path.basename(d) in limited)

    threading.Timer(0.9, find_running).start()
    stop = threading.Timer(1.2, kernel.km.interrupt_kernel)
    stop.start()
    reply, msgs = kernel.execute("%%container --mem 64M\nimport time\nfor i in range(60):\n"
                                 "    print(i); time.sleep(0.3)\n")
    stop.join()
    err = error_of(msgs)
    assert err["ename"] == "ContainerInterrupted"  # a KeyboardInterrupt: queued cells are dropped
    assert err["evalue"] == "interrupted: stopped the container" and len(err["traceback"]) == 1
    assert msgs[-1]["t"] < 5
    assert busy, "the running container was not found"
    assert wait_until(lambda: not any(os.path.isdir(d) for d in busy)), busy
    # the engine's warm launcher and its spare containers stay with the kernel; nothing else
    def new() -> List[List[str]]:
        spares = set(json.loads(kernel.ok("import json; from tests import helpers\n"
                                          "print(json.dumps(sorted(helpers.spare_pids())))")))
        return [p.cmdline() for p in psutil.Process(kpid).children(recursive=True)
                if p.pid not in before | spares and "pynsbook.engine.launcher" not in p.cmdline()]
    assert wait_until(lambda: not new()), new()
    assert kernel.ok("print('still alive')") == "still alive\n"


@pytest.mark.needs("root", "cgroups")
@pytest.mark.parametrize("how", ["restart", "kill"])
def test_restarting_or_killing_the_kernel_leaves_nothing(how):
    k = KernelSession()
    try:
        k.ok("%load_ext pynsbook")
        k.ok("%%container --name keep --mem 64M\nprint(1)\n")
        k.ok("%%container --bg --proc job\nimport time\ntime.sleep(60)\n")
        kpid = k.pid
        dirs = session_dirs(kpid)
        assert len({os.path.basename(d) for d in leftovers(dirs)}) >= 2  # and maybe spares
        procs = psutil.Process(kpid).children(recursive=True)
        assert procs
        if how == "restart":
            k.km.restart_kernel(now=False)
        else:
            os.kill(kpid, 9)  # as the OOM killer or `kill -9` would
        assert wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                          for p in procs), 10), procs
        assert wait_until(lambda: not leftovers(dirs), 10), leftovers(dirs)
    finally:
        k.close()


@pytest.mark.needs("root", "cgroups")
def test_run_all_stops_at_the_failed_cell(tmp_path):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%load_ext pynsbook"),
                nbformat.v4.new_code_cell("%%container --mem 64M\nprint('start')\nx = bytearray(200 * 2**20)\n"),
                nbformat.v4.new_code_cell("print('after')")]
    client = NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(CellExecutionError) as info:
        client.execute()
    assert "killed: out of memory (limit 64 MiB" in str(info.value)
    assert nb.cells[1].outputs[0]["text"] == "start\n"
    assert nb.cells[2].outputs == []  # "Run all" stopped at the failed cell


@pytest.mark.needs("root", "cgroups")
def test_bg_output_lands_in_its_cell_under_nbclient(tmp_path):
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%load_ext pynsbook"),
                nbformat.v4.new_code_cell("%%container --bg --proc job\nimport time\n"
                                          "for i in range(3):\n    print('bg', i); time.sleep(0.3)\n"),
                nbformat.v4.new_code_cell("job.wait(20); import time; time.sleep(0.3)\nprint('waited')")]
    NotebookClient(nb, timeout=60, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    texts = [o.get("data", {}).get("text/plain", "") for o in nb.cells[1].outputs]
    assert "bg 0\nbg 1\nbg 2\n" in texts
    assert nb.cells[2].outputs[0]["text"] == "waited\n"


@pytest.mark.needs("root", "cgroups")
def test_plot_draws_a_chart(kernel):
    reply, msgs = kernel.execute("%%container --plot --mem 64M\nx = bytearray(20 * 2**20)\n")
    assert reply["status"] == "ok"
    assert any("image/png" in m["content"].get("data", {}) for m in msgs if m["msg_type"] == "display_data")


def shown(k: KernelSession, code: str) -> str:
    """What a cell printed and displayed (stdout, results, display data), as text."""
    reply, msgs = k.execute(code)
    errors = [m["content"] for m in msgs if m["msg_type"] == "error"]
    assert reply["status"] == "ok" and not errors, (code, errors)
    texts = [m["content"]["data"].get("text/plain", "") for m in msgs
             if m["msg_type"] in ("execute_result", "display_data")]
    return stream(msgs, "stdout") + "".join(texts)


@pytest.mark.needs("busybox", "overlay")
@pytest.mark.needs("root")
def test_image_commands_show_layers_diff_and_commit(kernel, tmp_path):
    """%container images | layers | diff | commit, on a store of the test's own."""
    kernel.ok(f"import os; os.environ['PYNSBOOK_STORE'] = {str(tmp_path / 'store')!r}\n"
              "from pynsbook import images; images.import_busybox('bb')")
    assert "bb" in shown(kernel, "%container images")
    assert "LAYER" in shown(kernel, "%container layers bb")
    kernel.ok("%%container --image bb --name imgbox --bash\nrm /etc/hostname; mkdir -p /srv; echo hi > /srv/x\n")
    diff = shown(kernel, "%container diff imgbox")
    assert "D /etc/hostname" in diff and "A /srv/x" in diff, diff
    assert "committed" in shown(kernel, "%container commit imgbox bb2")
    assert "hi" in kernel.ok("%%container --image bb2 --bash\ncat /srv/x\n")
    kernel.ok("%container stop imgbox")
    reply, msgs = kernel.execute("%container layers nope")
    assert reply["status"] == "error" and reply["ename"] == "UsageError"
    assert "nope" in reply["evalue"] and "\n" not in reply["evalue"]
    kernel.ok("del os.environ['PYNSBOOK_STORE']")
