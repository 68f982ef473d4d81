"""The client side of a container: create its cgroup, start its shim, send it work, stream
its output, collect what happened, and make sure nothing of it outlives the container.
"""
from __future__ import annotations

import atexit
import codecs
import functools
import itertools
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Union

from .. import cgroups
from ..errors import (ContainerError, ContainerNotFound, ContainerStateError, OptionError, PynsbookError,
                      error_from_dict)
from ..linux.ids import write_id_maps
from ..linux import procfs, rootfs
from ..linux.mountinfo import read_mountinfo
from ..results import RunResult, Stats
from ..spec import Spec, make_spec
from . import background, confine, pool, protocol, spawn, values
from .plan import Plan, make_plan

if TYPE_CHECKING:
    from .sampler import Sampler


Callback = Callable[[str], None]
#: how much of each output stream a RunResult keeps (the callbacks see all of it): a cell
#: that prints gigabytes must not take the notebook's kernel down with it
KEEP_CHARS = 32 << 20


class Passthrough:
    """An output callback that is a file descriptor: the container's bytes go to it as they
    are, not decoded and not kept in the result (``pynsbook run``: binary output survives,
    and a large output costs no memory)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False  # the reader went away (``| head``): the rest is drained

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.broken:
            try:
                view = view[os.write(self.fd, view):]
            except BrokenPipeError:
                self.broken = True
            except BlockingIOError:
                select.select([], [self.fd], [])

    def __call__(self, text: str) -> None:
        self.write(text.encode("utf-8", "surrogateescape"))
_REGISTRY: "Dict[str, Container]" = {}
_REGISTRY_LOCK = threading.Lock()
_reaped = False
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_STOP_GRACE = 1.0  # seconds between SIGINT, SIGTERM and SIGKILL
#: Python runs go to a worker forked ahead of need (PYNSBOOK_PREFORK=0: fork per run)
_PREFORK = os.environ.get("PYNSBOOK_PREFORK", "1") != "0"


def containers() -> Dict[str, "Container"]:
    """The running containers of this process, by name."""
    with _REGISTRY_LOCK:
        return dict(_REGISTRY)


def get(name: str) -> "Container":
    with _REGISTRY_LOCK:
        if name not in _REGISTRY:
            raise ContainerNotFound(name)
        return _REGISTRY[name]


def _reap_stale_once() -> None:
    global _reaped
    if not _reaped:
        _reaped = True
        try:
            cgroups.backend().reap_stale()
        except OSError:
            pass


def _cgroup_mounts() -> List[Dict[str, str]]:
    """How to mount the cgroup filesystems inside a container (a read-only view)."""
    out = []
    mode = cgroups.mode()
    for m in read_mountinfo():
        if mode == "v2" and m.fstype == "cgroup2":
            return [{"name": "", "type": "cgroup2"}]
        if m.fstype == "cgroup":
            opts = [o for o in m.super_options if o not in ("rw", "ro")]
            out.append({"name": os.path.basename(m.mountpoint), "type": "cgroup",
                        "options": ",".join(opts)})
    return out


def _create_cgroup(name: str) -> cgroups.Cgroup:
    for attempt in range(3):
        try:
            return cgroups.backend().create(name)
        except FileNotFoundError:
            # the shim of this session's last container removed the session directory
            # between our mkdirs: make it again
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=4)
def _python_dirs(sys_path: tuple) -> frozenset:
    """This Python's environment and pynsbook itself (resolved once per sys.path)."""
    wanted = {sys.prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
              spawn.PKG_PARENT}
    wanted.update(p for p in sys_path if p)
    return frozenset(os.path.realpath(p) for p in wanted)


def _kept_paths() -> List[str]:
    """Directories the host view would hide (fresh /tmp and /run, hidden /root and /home)
    that it shows all the same: this Python's environment, pynsbook itself and the working
    directory, so a cell can import what the notebook can and open files next to it."""
    out: List[str] = []
    hidden = ("/tmp", "/run") + rootfs.HIDDEN_DIRS
    for p in sorted(_python_dirs(tuple(sys.path)) | {os.path.realpath(os.getcwd())}):
        if any(p == h or p.startswith(h + "/") for h in hidden) and os.path.isdir(p) \
                and p not in ("/tmp", "/run") \
                and not any(p == q or p.startswith(q + "/") for q in out):
            out.append(p)
    return out


class _Job:
    """One process a container runs (or one request to its persistent interpreter)."""

    def __init__(self, rid: str, signal_rid: Optional[str] = None, worker: bool = False) -> None:
        self.rid = rid
        self.signal_rid = signal_rid or rid  # whom to signal: the persistent interpreter
        self.worker = worker  # an idle Python worker, waiting for a request
        self.started = threading.Event()
        self.exited = threading.Event()
        self.host_pid: Optional[int] = None
        self.entrant_pid: Optional[int] = None  # pynsbook's process that waits for it
        self.sock: Any = None  # the run's socket to its entrant (None: not a process)
        self.process: Any = None  # the entrant's Popen, on the slow path (to reap it)
        self.error: Optional[PynsbookError] = None  # the process could not be started
        self.code: Optional[int] = None
        self.signal: Optional[int] = None
        self.rusage: Dict[str, float] = {}

    def send(self, msg: Dict[str, Any]) -> None:
        sock = self.sock
        if sock is not None and not self.exited.is_set():
            try:
                protocol.send(sock, msg)
            except OSError:
                pass  # it has just ended

    def read_events(self) -> None:
        """The entrant's reports, until it leaves (run on a thread of its own)."""
        for msg in protocol.messages(self.sock):
            event = msg.get("event")
            if event == "started":
                self.host_pid, self.entrant_pid = msg.get("host_pid"), msg.get("entrant")
                self.started.set()
            elif event == "exited":
                self.code, self.signal, self.rusage = msg["code"], msg["signal"], msg.get("rusage", {})
                break
            elif event == "error":
                self.error = error_from_dict(msg["error"])
                break
        self.started.set()
        self.exited.set()
        sock, self.sock = self.sock, None
        sock.close()
        if self.process is not None:
            self.process.wait()  # it leaves once its run has ended


class Container:
    """A container: namespaces, a cgroup and a root filesystem, kept by a small init; each
    run enters it from outside (entrant.py).

    >>> with Container("demo", memory="64M") as c:
    ...     c.run("print('hello')").stdout
    'hello\\n'
    """

    def __init__(self, name: Optional[str] = None, *, spec: Optional[Spec] = None,
                 **options: Any) -> None:
        if spec is None:
            spec = make_spec(options, name=name)
        elif options or name:
            spec = make_spec(options, base=spec, name=name or spec.name)
        self.spec = spec
        #: what its processes may do to the kernel (capabilities, seccomp, masked paths)
        self.confinement = confine.from_spec(spec)
        self._confine_msg: Optional[Dict[str, Any]] = None
        self.id = os.urandom(6).hex()  # (not secrets: its import costs every start ~5 ms)
        self.name = spec.name or self.id
        self.plan: Optional[Plan] = None
        self.cgroup: Optional[cgroups.Cgroup] = None
        self._shim: Optional[spawn.Shim] = None
        self._sock = None
        self.init_pid: Optional[int] = None
        self._jobs: Dict[str, _Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._watched = False  # its lifeline is watched (by the one watcher thread)
        self._dead = threading.Event()
        self._stopped = False
        self._sampler: Optional["Sampler"] = None
        self._repl: Optional[_Repl] = None  # the persistent Python worker
        self._fresh: Optional[_Repl] = None  # a one-shot Python worker forked ahead
        self._spare = False  # started by the pool, waiting to be adopted
        self._pool_key: Optional[tuple] = None
        self._keep: tuple = ()
        self._init_start: Optional[int] = None  # tells our init from a reused PID
        self._hostname: Optional[str] = None  # to set with the next run (an adopted spare)
        self.started_at: Optional[float] = None
        #: the root filesystem's layers, top first (None: the host's files under overlays)
        self.lowers: Optional[List[str]] = [spec.rootfs] if spec.rootfs else None
        #: a host directory for the container layer (upper/ and work/), when it must be
        #: read from outside (diff, commit); None: a throwaway tmpfs inside the container
        self.upper_dir: Optional[str] = None
        #: instead of layers: a private copy of the root, used as it is (no overlayfs here)
        self.copy_root: Optional[str] = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        if self._spare:
            return self._shim is not None and self._shim.poll() is None
        return self._shim is not None and not self._dead.is_set()

    def start(self) -> "Container":
        """Create the container: its cgroup with the limits, its namespaces, its root."""
        if self._shim is not None:
            raise ContainerStateError(f"container {self.name!r} was already started")
        with _REGISTRY_LOCK:
            if self.spec.name and self.spec.name in _REGISTRY:
                raise ContainerStateError(f"a container named {self.name!r} is already running "
                                          f"(stop it with %container stop {self.name})")
        _reap_stale_once()
        spawn.prepare()  # the launcher starts now, and measures the host probe the plan needs
        self.plan = plan = make_plan(self.spec)
        if not self._spare:  # once per start: the pool's shape and the config
            self._keep = tuple(_kept_paths())
        key = (None if self._spare else
               pool.shape(self.spec, plan, self._keep, self.confinement))
        spare = pool.take(key)
        if spare is not None:
            try:
                self._adopt(spare, plan)
            except BaseException:
                self._cleanup()
                raise
            return self._started(key)
        try:
            if self.spec.image:  # its layers, and a container layer in the image store
                from .. import images
                images.attach(self)
            if plan.use_cgroup:
                self.cgroup = _create_cgroup(f"{self.name}-{self.id[:6]}" if self.spec.name else self.id)
                try:
                    self.cgroup.apply(plan.cgroup_limits)
                except OSError as err:
                    raise ContainerError(f"could not set the limits: {err.strerror or err} "
                                         f"(in {self.cgroup.path})", err.errno) from None
            self._launch(plan)
        except BaseException:
            self._cleanup()
            raise
        return self._started(key)

    def _started(self, key: Optional[tuple]) -> "Container":
        if not self._watched:  # an adopted spare's lifeline is watched already
            _LIFELINES.watch(self._sock, self._dead.set)
            self._watched = True
        if self._spare and _PREFORK:  # its first Python run finds a worker waiting
            self._fresh = self._start_worker()
        if self.spec.name:
            with _REGISTRY_LOCK:
                _REGISTRY[self.spec.name] = self
        _LIVE.add(self)
        self.started_at = time.time()
        self._pool_key = key  # a spare of this shape is prepared once this one is done
        return self

    def _adopt(self, spare: "Container", plan: Plan) -> None:
        """Take over a spare container of the same shape: its shim, init and cgroup."""
        _LIVE.discard(spare)
        self._shim, self._sock, self.init_pid, self.cgroup = (spare._shim, spare._sock,
                                                              spare.init_pid, spare.cgroup)
        self._init_start = spare._init_start
        # the spare's event reader fills these same objects: they become ours
        self._jobs, self._ids, self._fresh = spare._jobs, spare._ids, spare._fresh
        self._dead, self._watched = spare._dead, spare._watched
        spare._shim = spare._sock = spare.cgroup = spare._fresh = None
        spare._stopped = True
        if self.cgroup is not None and plan.cgroup_limits:
            try:
                self.cgroup.apply(plan.cgroup_limits)
            except OSError as err:
                raise ContainerError(f"could not set the limits: {err.strerror or err} "
                                     f"(in {self.cgroup.path})", err.errno) from None
        if not self.spec.name and not self.spec.hostname:
            self.id = self.name = spare.id  # the spare's hostname is already its name
        elif "uts" in plan.namespaces:  # set by the next run's entrant, before its code
            self._hostname = self.spec.hostname or self.name

    def _config(self, plan: Plan) -> Dict[str, Any]:
        ns = plan.namespaces
        return {
            "namespaces": ns,
            "map_by_client": os.geteuid() == 0,
            "uid": os.geteuid(), "gid": os.getegid(),
            "cgroup_join": list(self.cgroup.join_files) if self.cgroup else [],
            "cgroup_dirs": [os.path.dirname(p) for p in self.cgroup.join_files] if self.cgroup else [],
            "hostname": self.spec.hostname or self.name,
            "lowers": self.lowers,
            "upper": self.upper_dir,
            "copy_root": self.copy_root,
            "keep": list(self._keep),
            "uptime": self.spec.uptime,
            "cgroup_mounts": _cgroup_mounts() if "cgroup" in ns else [],
            "mask_paths": self.confinement.mask_paths,
            "init_confine": self._init_confine(plan),
            "read_only": self.confinement.read_only_root,
        }

    def _init_confine(self, plan: Plan) -> Optional[Dict[str, Any]]:
        cfg = self.confinement.for_init()
        if cfg is not None and "seccomp" in plan.dropped:
            cfg["seccomp"] = False
        return cfg

    def _launch(self, plan: Plan) -> None:
        cfg = self._config(plan)
        client, child = protocol.pair()
        try:
            self._shim = spawn.start_shim(cfg, child)
        except BaseException:
            client.close()
            raise
        finally:
            child.close()
        self._sock = client
        if isinstance(self._shim, spawn.PopenShim):
            protocol.send(client, cfg)  # the slow path reads its configuration first
        ready = False
        # the shim names its init ("init") and the init says "ready", on one socket from
        # two processes: a quick init (no namespaces to make) may speak first. Both count.
        while not (ready and self.init_pid is not None):
            msg, fds = protocol.recv(client)
            for fd in fds:
                os.close(fd)
            if msg is None:
                raise self._died_early()
            event = msg.get("event")
            if event == "map_ids":
                full = "0 0 4294967295"
                write_id_maps(str(msg["pid"]), full, full, deny_setgroups=False)
                protocol.send(client, {"op": "mapped"})
            elif event == "init":
                self.init_pid = msg["pid"]
                self._init_start = procfs.start_time(msg["pid"])
            elif event == "error":
                raise error_from_dict(msg["error"])
            elif event == "ready":
                ready = True

    def _died_early(self) -> PynsbookError:
        assert self._shim is not None
        try:
            self._shim.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._shim.kill()
            self._shim.wait(timeout=5)
        text = self._shim.stderr_text().strip().splitlines()
        last = text[-1] if text else f"exit status {self._shim.returncode}"
        return ContainerError(f"the container's init stopped unexpectedly: {last}")

    def stop(self, timeout: float = _STOP_GRACE, wait: bool = True) -> None:
        """Stop every process (SIGTERM, then SIGKILL after ``timeout``) and remove the
        container: its processes, its cgroup, its mounts (they die with its namespace).

        With ``wait=False`` the container is told to end and the rest (waiting for its
        shim, removing its cgroup) finishes in the background; interpreter exit waits for it.
        """
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.running and any(not j.exited.is_set() and not j.worker
                                    for j in self._jobs.values()):
                self.signal(signal.SIGTERM)
                deadline = time.monotonic() + timeout
                for job in list(self._jobs.values()):
                    job.exited.wait(max(0.0, deadline - time.monotonic()))
        except OSError:
            pass
        if wait:
            self._cleanup()
            pool.refill(self._pool_key, self.spec)
        else:
            self._end()
            # the next spare first: the next start may be waiting for it, while removing
            # this one is mostly waiting for the kernel. Prepared once this container's
            # run is over, so it never competes with a running cell.
            pool.refill(self._pool_key, self.spec)
            background.submit(self._cleanup)

    def _end(self) -> None:
        """Tell the init to end the container now (the first, quick part of clean-up)."""
        if self._sock is not None:
            with self._lock:
                # shutdown, not just close: the reader thread's pending recv holds the file
                # open, and the init must see end of file now (then it exits, and as PID 1
                # ends every process of the container)
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                _LIFELINES.forget(self._sock)
                self._sock.close()
                self._sock = None
        for job in list(self._jobs.values()):
            sock = job.sock
            if sock is not None:  # its entrant sees EOF: it kills the run and leaves
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _cleanup(self) -> None:
        if self._sampler:
            self._sampler.stop()
        self._end()
        if self._shim is not None:
            try:
                self._shim.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._shim.kill()  # by PID: only our own shim
                self._shim.wait(timeout=5)
            self._shim.close()
        if self.cgroup is not None:
            try:
                self.cgroup.remove()
            except OSError:
                pass
        if self.spec.image:
            from .. import images
            images.release(self)
        with _REGISTRY_LOCK:
            if _REGISTRY.get(self.name) is self:
                del _REGISTRY[self.name]
        _LIVE.discard(self)
        self._dead.set()

    def __enter__(self) -> "Container":
        if self._shim is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- control ---------------------------------------------------------------------------

    def _enter(self, job: _Job, msg: Dict[str, Any], fds: Sequence[int]) -> None:
        """Start a run's process in the container: an entrant joins its cgroup and
        namespaces and forks it (entrant.py); ``job`` follows it on a thread."""
        if self._sock is None:
            raise ContainerStateError(f"container {self.name!r} is not running")
        assert self.plan is not None
        self._take_hostname(msg)
        cfg = {"init_pid": self.init_pid, "init_start": self._init_start,
               "namespaces": list(self.plan.namespaces),
               "cgroup_join": list(self.cgroup.join_files) if self.cgroup else []}
        ours, theirs = protocol.pair()
        try:
            job.process = spawn.start_entrant({"op": "enter", "cfg": cfg, "msg": msg},
                                              ours, theirs, fds)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        job.sock = ours
        threading.Thread(target=job.read_events, daemon=True, name=f"pynsbook-run-{job.rid}").start()

    def _take_hostname(self, msg: Dict[str, Any]) -> None:
        """An adopted spare's name goes with its next run, set before that run's code."""
        if self._hostname:
            msg["hostname"], self._hostname = self._hostname, None

    def update(self, **limits: Any) -> Dict[str, Any]:
        """Change limits while the container runs (same keywords as ``run``).

        ``None`` (or "max", "unlimited") lifts a memory, swap, cpus or pids limit."""
        if not self.running:
            raise ContainerStateError(f"container {self.name!r} is not running")
        bad = [k for k in limits if k not in ("memory", "mem", "swap", "cpus", "cpuset", "pids",
                                              "io_read_bps", "io_write_bps")]
        if bad:
            raise TypeError(f"{bad[0]!r} cannot change on a running container; limits that can: "
                            "memory, swap, cpus, cpuset, pids, io_read_bps, io_write_bps")
        limits = {("memory" if k == "mem" else k): v for k, v in limits.items()}
        lifted = [k for k, v in limits.items() if k in ("memory", "swap", "cpus", "pids") and
                  (v is None or str(v).lower() in ("max", "unlimited", "none"))]
        new = make_spec({k: v for k, v in limits.items() if k not in lifted},
                        base=self.spec.replace(name=None, **{k: None for k in lifted}))
        changed = {k: getattr(new, k) for k in limits}
        plan = make_plan(new.replace(namespaces=frozenset(), explicit_namespaces=frozenset()))
        cg_changes = {k: v for k, v in changed.items() if k in plan.cgroup_limits or k in lifted}
        if "memory" in cg_changes and "swap" in plan.cgroup_limits and "swap" not in cg_changes:
            cg_changes["swap"] = plan.cgroup_limits["swap"]
        if self.cgroup is not None and cg_changes:
            try:
                self.cgroup.apply(cg_changes)
            except OSError as err:
                raise ContainerError(f"could not change the limits: {err.strerror or err}",
                                     err.errno) from None
        if self._sampler and "memory" in plan.fallback_limits:
            self._sampler.memory_limit = plan.fallback_limits["memory"]
        self.spec = self.spec.replace(**{k: getattr(new, k) for k in changed})
        assert self.plan is not None
        self.plan.limits.update({k: v for k, v in plan.limits.items() if k in changed or k == "swap"})
        for k in lifted:
            self.plan.limits.pop(k, None)
        return changed

    def stats(self) -> Stats:
        """Usage and limits now (from the cgroup; sampled and approximate without one)."""
        if self.cgroup is not None and self.running:
            return self.cgroup.stats()
        if self.init_pid and self.running:
            from .sampler import Sampler
            return Sampler(lambda: [j.entrant_pid for j in list(self._jobs.values())
                                    if j.entrant_pid and not j.exited.is_set()]).snapshot()
        raise ContainerStateError(f"container {self.name!r} is not running")

    def signal(self, sig: int, run: Optional[str] = None) -> None:
        """Send a signal to one run (the id ``on_start`` received) or to every process the
        container runs; quietly nothing if the container has already ended."""
        if not self.running:
            return
        if run is None:
            targets = [j for j in list(self._jobs.values()) if j.sock is not None]
        else:
            job = self._jobs.get(run)
            target = self._jobs.get(job.signal_rid) if job else None
            targets = [target] if target is not None else []
        for job in targets:
            job.send({"op": "signal", "sig": int(sig)})

    def freeze(self) -> None:
        self._require_cgroup("freeze").freeze(True)

    def thaw(self) -> None:
        self._require_cgroup("thaw").freeze(False)

    def _require_cgroup(self, what: str) -> cgroups.Cgroup:
        if self.cgroup is None or not self.running:
            raise ContainerStateError(f"cannot {what} {self.name!r}: it has no cgroup "
                                      "(not running, or the host has no usable cgroups)")
        return self.cgroup

    # -- running ---------------------------------------------------------------------------

    def run(self, code: str, *, inputs: Optional[Dict[str, Any]] = None,
            outputs: Optional[Sequence[str]] = None, persistent: bool = False,
            **kwargs: Any) -> RunResult:
        """Run Python source in the container.

        ``inputs`` are pickled into the code's globals first; the variables named in
        ``outputs`` come back in ``RunResult.outputs`` if they are plain values (numbers,
        str, bytes, list, tuple, dict, set) or NumPy arrays, never unpickled (see
        :mod:`.values`); ``RunResult.output_errors`` says, one line per variable, why any
        other did not come back. With ``persistent`` the code
        runs in one long-lived interpreter of this container, so globals survive between
        runs (as cells of a notebook do); otherwise each run gets a fresh ``__main__``.
        """
        return self._execute(None, code, inputs=inputs, outputs=list(outputs or ()),
                             persistent=persistent, **kwargs)

    def exec(self, argv: Union[Sequence[str], str], **kwargs: Any) -> RunResult:
        """Run a command in the container: a list of arguments, or a string for ``/bin/sh -c``."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        if not argv:
            raise ValueError("exec needs a command, like ['ls', '-l']")
        return self._execute([str(a) for a in argv], None, **kwargs)

    def _env(self, extra: Optional[Dict[str, str]]) -> Dict[str, str]:
        path = _PATH
        if self.lowers is None:  # the notebook's own tools come first, as outside
            path = os.path.dirname(sys.executable) + ":" + path
        env = {"PATH": path, "HOME": "/root", "HOSTNAME": self.spec.hostname or self.name,
               "PYTHONUNBUFFERED": "1", "container": "pynsbook"}
        for key in ("LANG", "LC_ALL", "TERM"):
            if key in os.environ:
                env[key] = os.environ[key]
        env.update(dict(self.spec.env))
        env.update(extra or {})
        return env

    def _base_msg(self, env: Optional[Dict[str, str]], workdir: Optional[str]) -> Dict[str, Any]:
        assert self.plan is not None
        asked = workdir or self.spec.workdir
        msg: Dict[str, Any] = {"op": "exec", "env": self._env(env), "workdir_asked": bool(asked),
                               "workdir": asked or (os.getcwd() if self.lowers is None and
                                                    self.copy_root is None else "/")}
        if self._confine_msg is None and not self.confinement.privileged:
            self._confine_msg = self.confinement.to_msg()
            if "seccomp" in self.plan.dropped:
                self._confine_msg["seccomp"] = False
        msg["confine"] = self._confine_msg
        fb = self.plan.fallback_limits
        if "pids" in fb:
            msg["rlimits"] = {"nproc": fb["pids"]}
        if "cpuset" in fb:
            msg["cpus_affinity"] = _cpu_list(fb["cpuset"])
        return msg

    def _start_repl(self) -> "_Repl":
        """Start this container's persistent Python process."""
        self._repl = self._start_worker()
        return self._repl

    def _start_worker(self) -> "_Repl":
        """Start a Python worker in the container (through an entrant); returns at once
        (requests queue on its socket until it reads them)."""
        rid = str(next(self._ids))
        msg = self._base_msg(None, None)
        msg.update(id=rid, repl=True, fds={"stdin": 0, "stdout": 1, "stderr": 2, "repl": 3})
        job = self._jobs[rid] = _Job(rid, worker=True)
        ours, theirs = protocol.pair()
        try:
            null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            try:
                self._enter(job, msg, [null, null, null, theirs.fileno()])
            finally:
                os.close(null)
        except BaseException:
            ours.close()
            self._jobs.pop(rid, None)
            raise
        finally:
            theirs.close()
        return _Repl(job, ours)

    def _take_fresh_worker(self) -> Optional["_Repl"]:
        """The one-shot worker a spare container forked ahead of need, if there is one.

        Only spares have one (their first run is the run they were made for); a container
        that runs cell after cell forks per run, so `ps` inside shows no idle stranger."""
        if self._hostname:  # it is confined already, and cannot set the name: fork anew
            return None
        worker, self._fresh = self._fresh, None
        return worker if worker is not None and worker.alive else None

    def _discard_fresh_worker(self) -> None:
        """A run that does not use the waiting worker: end it first, so the run sees only
        its own processes."""
        worker, self._fresh = self._fresh, None
        if worker is not None and worker.alive:
            self.signal(signal.SIGKILL, worker.job.rid)
            worker.job.exited.wait(2)

    def _execute(self, argv: Optional[List[str]], code: Optional[str], *,
                 on_stdout: Optional[Callback] = None, on_stderr: Optional[Callback] = None,
                 timeout: Optional[float] = None, stdin: Optional[bytes] = None,
                 env: Optional[Dict[str, str]] = None, workdir: Optional[str] = None,
                 inputs: Optional[Dict[str, Any]] = None, outputs: Sequence[str] = (),
                 persistent: bool = False,
                 on_start: Optional[Callable[["Container", str], None]] = None) -> RunResult:
        if not self.running:
            raise ContainerStateError(f"container {self.name!r} is not running"
                                      + (" (start it first)" if self._shim is None else ""))
        assert self.plan is not None
        timeout = timeout if timeout is not None else self.spec.timeout
        payload_inputs = _pickle_inputs(inputs) if inputs else None
        repl = None
        if persistent:
            if code is None:
                raise ValueError("persistent runs take Python code, not a command")
            repl = self._repl if self._repl and self._repl.alive else self._start_repl()
            repl.lock.acquire()
        elif code is not None and _PREFORK:
            repl = self._take_fresh_worker()  # one-shot: a fresh __main__ all the same
            if repl is not None:
                repl.oneshot = True
                repl.lock.acquire()
        if repl is None or not repl.oneshot:
            self._discard_fresh_worker()
        try:
            return self._execute_locked(argv, code, on_stdout, on_stderr, timeout, stdin, env,
                                        workdir, payload_inputs, list(outputs), repl, on_start)
        finally:
            if repl:
                repl.lock.release()

    def _execute_locked(self, argv: Optional[List[str]], code: Optional[str],
                        on_stdout: Optional[Callback], on_stderr: Optional[Callback],
                        timeout: Optional[float], stdin: Optional[bytes],
                        env: Optional[Dict[str, str]], workdir: Optional[str],
                        payload_inputs: Optional[bytes], outputs: List[str],
                        repl: Optional["_Repl"], on_start: Any) -> RunResult:
        assert self.plan is not None
        rid = str(next(self._ids))
        job = _Job(rid, signal_rid=repl.job.rid if repl else rid)
        # every descriptor this run opens is closed on every path, exceptions included:
        # ``owned`` holds the ones still ours to close
        owned: List[int] = []
        sampler = None
        sent = pumped = False
        try:
            out_r, out_w = _pipe(owned)
            err_r, err_w = _pipe(owned)
            in_r, in_w = _pipe(owned)
            fds = [in_r, out_w, err_w]
            roles = {"stdin": 0, "stdout": 1, "stderr": 2}
            out_fd = None
            if code is not None:
                roles["code"] = len(fds)
                fds.append(_own(owned, protocol.payload_fd(code.encode("utf-8"))))
                if payload_inputs is not None:
                    roles["inputs"] = len(fds)
                    fds.append(_own(owned, protocol.payload_fd(payload_inputs)))
                if outputs:
                    out_fd = _own(owned, os.memfd_create("pynsbook-outputs", os.MFD_CLOEXEC))
                    roles["outputs"] = len(fds)
                    fds.append(_own(owned, os.dup(out_fd)))
            msg = {"id": rid, "fds": roles, "outputs": outputs}
            self._jobs[rid] = job
            if repl is None:
                msg.update(self._base_msg(env, workdir))
                msg.update(python=True) if code is not None else msg.update(argv=argv)
            else:
                repl.current = job
                repl.job.worker = False  # busy: stop() must let it finish
                if repl.oneshot:
                    base = self._base_msg(env, workdir)
                    msg.update(last=True, env=base["env"], workdir=base["workdir"],
                               workdir_asked=base["workdir_asked"],
                               rlimits=base.get("rlimits"), cpus_affinity=base.get("cpus_affinity"),
                               confine=base["confine"])
            fb = self.plan.fallback_limits
            before = self.cgroup.counters() if self.cgroup else None
            if self.cgroup:
                self.cgroup.start_peak_window()
            if not self.cgroup or "memory" in fb:
                from .sampler import Sampler
                process = repl.job if repl is not None else job
                sampler = self._sampler = Sampler(lambda: [process.entrant_pid or 0], fb.get("memory"))
            t0 = time.monotonic()
            if repl is None:
                self._enter(job, msg, fds)
            else:
                protocol.send(repl.sock, msg, fds)
            sent = True
            _close(owned, fds)  # the process has its own copies; ours would keep EOF away
            if stdin:
                owned.remove(in_w)  # the feeder closes it
                threading.Thread(target=_feed, args=(in_w, stdin), daemon=True).start()
            else:
                _close(owned, [in_w])
            if on_start:
                on_start(self, rid)
            result = RunResult(exit_code=-1, container=self.name, namespaces=list(self.plan.namespaces),
                               limits=dict(self.plan.limits), dropped=dict(self.plan.dropped),
                               enforcement=self.plan.enforcement)
            self._pump(job, out_r, err_r, result, on_stdout, on_stderr, t0, timeout, sampler)
            pumped = True
        except BaseException:
            if sent and not job.exited.is_set():
                # interrupted (or a callback failed): nobody will wait for this run, so it
                # is stopped as the stop button stops it
                self._interrupt(job)
            raise
        finally:
            # all but the outputs memfd, which is read once the run is over
            _close(owned, [fd for fd in owned if not (pumped and fd == out_fd)])
            self._jobs.pop(rid, None)
            if sampler:
                sampler.stop()
            if repl is not None:
                repl.job.worker = True
        try:
            result.wall_time = time.monotonic() - t0
            if repl is not None and repl.oneshot:
                # a one-shot worker exits after its request: wait, so that its memory and
                # CPU are counted and freed before the result says what they were
                repl.job.exited.wait(5)
            if repl is not None and job.code is None:
                # the worker itself died (OOM, a signal, os._exit): a persistent one's state is lost
                repl.job.exited.wait(2)
                job.code, job.signal, job.rusage = repl.job.code, repl.job.signal, repl.job.rusage
                if job.code is not None and not repl.oneshot:
                    note = ("pynsbook: the container's Python process ended "
                            f"({'signal ' + str(job.signal) if job.signal else 'status ' + str(job.code)}); "
                            "its variables are lost and the next run starts afresh\n")
                    result.stderr += note
                    if on_stderr:
                        on_stderr(note)
            if job.error is not None:
                raise job.error
            if job.code is None and (self._dead.is_set() or not self.running):
                raise self._died_early()  # the init is gone: the container is broken, not the code
            if job.code is None:  # what followed the run ended (the launcher was killed?)
                why = ("pynsbook's launcher process ended during it" if spawn.launcher_lost()
                       else "the pynsbook process that waited for it ended")
                raise ContainerError(f"pynsbook lost track of this run: {why}; its result is "
                                     f"lost, and the container {self.name!r} still runs")
            result.exit_code = job.code
            result.signal = job.signal
            self._account(result, job, before, sampler)
            if out_fd is not None:
                owned.remove(out_fd)  # _read_outputs closes it
                _read_outputs(out_fd, result, outputs)
        finally:
            _close(owned, list(owned))  # the outputs memfd, when no result was made
        return result

    def _pump(self, job: _Job, out_r: int, err_r: int, result: RunResult,
              on_stdout: Optional[Callback], on_stderr: Optional[Callback], t0: float,
              timeout: Optional[float], sampler: Optional["Sampler"]) -> None:
        """Stream the job's output to the callbacks until it exits; enforce the timeout."""
        sel = selectors.DefaultSelector()
        decoders = {out_r: codecs.getincrementaldecoder("utf-8")("replace"),
                    err_r: codecs.getincrementaldecoder("utf-8")("replace")}
        chunks: Dict[int, List[str]] = {out_r: [], err_r: []}
        callbacks = {out_r: on_stdout, err_r: on_stderr}
        raw = {fd: cb for fd, cb in callbacks.items() if isinstance(cb, Passthrough)}
        kept = {out_r: 0, err_r: 0}
        dropped = {out_r: 0, err_r: 0}
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        kill_at: Optional[float] = None
        exited_at: Optional[float] = None
        try:
            while sel.get_map():
                now = time.monotonic()
                if job.exited.is_set() and exited_at is None:
                    exited_at = now
                if exited_at is not None and now - exited_at > 0.5:
                    break  # a background grandchild holds the pipes open: stop reading
                if timeout is not None and not result.timed_out and now - t0 > timeout and not job.exited.is_set():
                    result.timed_out = True
                    result.limits["timeout"] = timeout
                    # a persistent interpreter gets a KeyboardInterrupt, so it keeps its state
                    persistent = job.signal_rid != job.rid
                    self._signal_job(job, signal.SIGINT if persistent else signal.SIGTERM)
                    kill_at = now + _STOP_GRACE
                if kill_at is not None and now > kill_at and not job.exited.is_set():
                    self._signal_job(job, signal.SIGKILL)
                    kill_at = None
                if sampler and sampler.sample():
                    self._signal_job(job, signal.SIGKILL)  # over the memory limit (fallback)
                for key, _ in sel.select(0.05):
                    try:
                        data = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        sel.unregister(key.fd)
                        continue
                    if key.fd in raw:
                        raw[key.fd].write(data)
                        continue
                    text = decoders[key.fd].decode(data)
                    if text:
                        if kept[key.fd] < KEEP_CHARS:
                            chunks[key.fd].append(text)
                            kept[key.fd] += len(text)
                        else:
                            dropped[key.fd] += len(text)
                        cb = callbacks[key.fd]
                        if cb:
                            cb(text)
            while not job.exited.wait(0.05):  # pipes closed: the process is about to exit
                if timeout is not None and time.monotonic() - t0 > timeout + 2 * _STOP_GRACE:
                    self._signal_job(job, signal.SIGKILL)
        finally:
            sel.close()
            for fd, dec in decoders.items():
                tail = dec.decode(b"", final=True)
                if tail:
                    chunks[fd].append(tail)
                if dropped[fd]:
                    chunks[fd].append(f"\n[pynsbook: {dropped[fd]} more characters were streamed "
                                      f"but not kept: a result keeps the first {KEEP_CHARS >> 20} Mi]\n")
            result.stdout = "".join(chunks[out_r])
            result.stderr = "".join(chunks[err_r])

    def _signal_job(self, job: _Job, sig: int) -> None:
        self.signal(sig, job.signal_rid)

    def _interrupt(self, job: _Job) -> None:
        """The stop button: SIGINT, then SIGTERM, then SIGKILL, with short waits."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            self._signal_job(job, sig)
            if job.exited.wait(_STOP_GRACE):
                return

    def _account(self, result: RunResult, job: _Job, before: Optional[tuple],
                 sampler: Optional["Sampler"]) -> None:
        if self.cgroup is not None and before is not None:
            oom, cpu, hits = self.cgroup.counters()
            if oom is not None:
                result.oom_killed = oom > (before[0] or 0)
            if cpu is not None and before[1] is not None:
                result.cpu_time = cpu - before[1]
            result.peak_memory = self.cgroup.peak_memory()
            if hits is not None:
                result.pids_limit_hits = hits - (before[2] or 0)
        if result.cpu_time is None and job.rusage:
            result.cpu_time = job.rusage.get("utime", 0) + job.rusage.get("stime", 0)
        if sampler is not None:
            if result.peak_memory is None or "memory" in self.plan.fallback_limits:  # type: ignore[union-attr]
                result.peak_memory = max(sampler.peak, int(job.rusage.get("maxrss", 0)))
            if sampler.killed:
                result.oom_killed = True


class _Lifelines:
    """One thread watches every container's lifeline and marks a container dead when its
    init closes it (the init says nothing once ready). A thread per container would cost
    its kernel stack and page tables (~30 KiB each): more than the idle container itself."""

    def __init__(self) -> None:
        # epoll: a socket registered while the thread waits is watched from then on
        self.sel = selectors.EpollSelector()
        self.lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None

    def watch(self, sock: Any, on_end: Callable[[], None]) -> None:
        with self.lock:
            self.sel.register(sock, selectors.EVENT_READ, on_end)  # effective at once
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name="pynsbook-lifelines")
                self.thread.start()

    def forget(self, sock: Any) -> None:
        """Before the client closes a lifeline (its descriptor number may be reused)."""
        with self.lock:
            key = self.sel.get_map().get(sock.fileno())
            if key is not None and key.fileobj is sock:
                self.sel.unregister(sock)

    def _run(self) -> None:
        while True:
            for key, _ in self.sel.select():
                try:
                    data = key.fileobj.recv(512)  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    continue
                with self.lock:
                    current = self.sel.get_map().get(key.fd)
                    if current is not key:
                        continue  # forgotten (or the number reused) meanwhile
                    self.sel.unregister(key.fileobj)
                key.data()


_LIFELINES = _Lifelines()


class _Repl:
    """The client's end of a container's persistent Python process."""

    def __init__(self, job: _Job, sock: Any) -> None:
        self.job = job
        self.sock = sock
        self.lock = threading.Lock()
        self.current: Optional[_Job] = None
        self.alive = True
        self.oneshot = False
        threading.Thread(target=self._read, daemon=True, name="pynsbook-repl").start()

    def _read(self) -> None:
        for msg in protocol.messages(self.sock):
            if self.current is not None and self.current.rid == str(msg.get("id")):
                self.current.code = msg["status"]
                self.current.started.set()
                self.current.exited.set()
        self.alive = False
        self.sock.close()
        if self.current is not None:
            self.current.exited.set()


def _pickle_inputs(inputs: Dict[str, Any]) -> bytes:
    import pickle
    for name, value in inputs.items():
        try:
            pickle.dumps(value)
        except Exception as err:
            raise OptionError("-i", name, f"a variable that can be pickled ({type(err).__name__}: {err})") from None
    return pickle.dumps(dict(inputs))


def _read_outputs(fd: int, result: RunResult, names: Sequence[str]) -> None:
    """The variables the container wrote into ``fd``, into ``result``. The bytes are
    hostile (code in the container can write anything there): they are decoded as data
    only (:mod:`.values`), at most ``values.MAX_BYTES`` of them, and anything wrong with
    them is one line in ``result.output_errors``, never an exception or a traceback."""
    try:
        size = os.fstat(fd).st_size
        data = bytearray(size if size <= values.MAX_BYTES else 0)  # one copy, read in place
        view, got = memoryview(data), 0
        while got < len(data):
            n = os.preadv(fd, [view[got:]], got)
            if not n:
                del view
                data = data[:got]  # truncated meanwhile: what is there is what came
                break
            got += n
    finally:
        os.close(fd)
    if size > values.MAX_BYTES:
        result.output_errors = {"*": f"nothing came back: the container wrote {size} bytes of "
                                     f"variables, more than the {values.MAX_BYTES} allowed"}
        return
    if not data:
        result.output_errors = {"*": "the code did not finish, so no variables came back"}
        return
    try:
        result.outputs, result.output_errors = values.decode_outputs(data, names)
    except values.Malformed as err:
        result.outputs = {}
        result.output_errors = {"*": f"nothing came back: {err}"}
    except Exception as err:  # a case the decoder did not foresee: still one line
        result.outputs = {}
        result.output_errors = {"*": "nothing came back: what the container sent could not "
                                     f"be read ({type(err).__name__})"}


def _pipe(owned: List[int]) -> "tuple[int, int]":
    """A pipe whose ends go into ``owned`` (the descriptors a run must close)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    owned += (r, w)
    return r, w


def _own(owned: List[int], fd: int) -> int:
    owned.append(fd)
    return fd


def _close(owned: List[int], fds: Sequence[int]) -> None:
    """Close those of ``fds`` that are still in ``owned``, and forget them there."""
    for fd in fds:
        if fd in owned:
            owned.remove(fd)
            os.close(fd)


def _feed(fd: int, data: bytes) -> None:
    try:
        with open(fd, "wb") as f:
            f.write(data)
    except OSError:
        pass


def _cpu_list(cpuset: str) -> List[int]:
    out: List[int] = []
    for part in cpuset.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


_LIVE: "weakref.WeakSet[Container]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Interpreter exit (a kernel restart): stop every container of this process."""
    pool.set_enabled(False)  # stops the spares, and no new ones start
    for c in list(_LIVE):
        try:
            c.stop(timeout=0.2)
        except BaseException:
            pass
    background.drain(10)
    spawn.shutdown()


def run(code_or_argv: Union[str, Sequence[str]], *, on_stdout: Optional[Callback] = None,
        on_stderr: Optional[Callback] = None, stdin: Optional[bytes] = None,
        inputs: Optional[Dict[str, Any]] = None, outputs: Optional[Sequence[str]] = None,
        **options: Any) -> RunResult:
    """Run Python source (a str) or a command (a list) in a new container, then remove it.

    Options are the keywords of the option table (``memory="64M"``, ``cpus=0.5``,
    ``pids=32``, ``namespaces=[...]``, ``timeout=10``, ...). For Python source, ``inputs``
    are pickled into its globals and the variables named in ``outputs`` come back in
    ``RunResult.outputs`` (plain values and NumPy arrays; ``RunResult.output_errors`` says
    why any other did not).
    """
    if not isinstance(code_or_argv, str) and (inputs or outputs):
        raise ValueError("inputs and outputs work with Python code, not with a command")
    c = Container(**options).start()
    try:
        if isinstance(code_or_argv, str):
            result = c.run(code_or_argv, on_stdout=on_stdout, on_stderr=on_stderr, stdin=stdin,
                           inputs=inputs, outputs=outputs)
        else:
            result = c.exec(list(code_or_argv), on_stdout=on_stdout, on_stderr=on_stderr,
                            stdin=stdin)
    except BaseException:
        c.stop()
        raise
    # the result is ready: the container's removal need not delay it (but an image's
    # container layer must be gone when we return, so the image can be removed at once)
    c.stop(wait=bool(c.spec.image))
    return result
