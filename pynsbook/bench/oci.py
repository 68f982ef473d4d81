"""crun and runc as benchmark peers: a tiny OCI bundle (static busybox) in a temporary
directory, runs of ``/bin/true`` with a 64 MiB memory limit, and a clean-up that leaves no
container state, bundle or cgroup behind.

Where their cgroups go: ``<own cgroup>/pynsbook/<session>/<id>`` in every hierarchy, the
layout pynsbook's own containers use (``<session>`` is this process's, so the engine's
stale-session reaper also removes leftovers of a benchmark that was killed).

- runc reads a relative ``linux.cgroupsPath`` relative to its caller's cgroup: given as is.
- crun 1.8 refuses hybrid hosts ("cgroups in hybrid mode not supported") and reads the path
  from the root of each hierarchy. Its child process therefore enters a private mount
  namespace, unmounts the cgroup2 mount there and bind-mounts our own cgroup of each v1
  hierarchy over that hierarchy's mount point, so the same relative layout results. That
  costs a mount-namespace copy per run, and the subject's label says so.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

from ..linux import libc
from ..linux.mountinfo import read_mountinfo
from .harness import Subject

MEMORY_LIMIT = 64 << 20


def own_cgroup_dirs() -> List[Tuple[str, str, str]]:
    """(mount point, our cgroup's directory in it, fstype) for every cgroup mount."""
    own: Dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                own[c] = path
    out = []
    for m in read_mountinfo():
        if m.fstype == "cgroup2":
            path = own.get("", "/")
        elif m.fstype == "cgroup":
            keys = [o for o in m.super_options if o in own]
            if not keys:
                continue
            path = own[keys[0]]
        else:
            continue
        root = getattr(m, "root", "/") or "/"
        rel = os.path.relpath(path, root) if path.startswith(root) else None
        if rel is None:
            continue
        d = os.path.normpath(os.path.join(m.mountpoint, "" if rel == "." else rel))
        out.append((m.mountpoint, d, m.fstype))
    return out


class CgroupParent:
    """``pynsbook/<session>`` below our own cgroup in every hierarchy: remembers which
    directories existed, and removes exactly what the benchmark created."""

    def __init__(self) -> None:
        from ..cgroups.base import TOP, session_name
        self.rel = f"{TOP}/{session_name()}"
        self.dirs = own_cgroup_dirs()
        self.existed = {p for _, d, _ in self.dirs
                        for p in (os.path.join(d, TOP), os.path.join(d, self.rel))
                        if os.path.isdir(p)}

    def remove(self, leaf: str) -> None:
        """rmdir ``leaf`` (if the runtime left it) and the parents we created, if empty."""
        from ..cgroups.base import TOP
        for _, d, _ in self.dirs:
            for p in (os.path.join(d, self.rel, leaf), os.path.join(d, self.rel),
                      os.path.join(d, TOP)):
                if p in self.existed or not os.path.isdir(p):
                    continue
                try:
                    os.rmdir(p)
                except OSError:
                    pass  # not empty (someone else's) or busy: never forced

    def leftovers(self, prefix: str) -> List[str]:
        out = []
        for _, d, _ in self.dirs:
            base = os.path.join(d, self.rel)
            try:
                out += [os.path.join(base, x) for x in os.listdir(base) if x.startswith(prefix)
                        and os.path.isdir(os.path.join(base, x))]
            except OSError:
                pass
        return out


def build_bundle(directory: str, argv: List[str], cgroups_path: str,
                 memory: int = MEMORY_LIMIT) -> Dict[str, object]:
    """A minimal OCI bundle: busybox as the root filesystem, five namespaces, a memory limit."""
    from ..vm.initramfs import find_busybox
    rootfs = os.path.join(directory, "rootfs")
    for sub in ("bin", "proc", "dev", "tmp"):
        os.makedirs(os.path.join(rootfs, sub), exist_ok=True)
    shutil.copy2(str(find_busybox()), os.path.join(rootfs, "bin", "busybox"))
    for applet in ("true", "sh", "sleep"):
        os.symlink("busybox", os.path.join(rootfs, "bin", applet))
    config = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": argv,
                    "env": ["PATH=/bin"], "cwd": "/", "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "bench",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "strictatime", "mode=755", "size=64k"]}],
        "linux": {"resources": {"memory": {"limit": memory}}, "cgroupsPath": cgroups_path,
                  "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return config


def hybrid_workaround(unmounts: List[str], binds: List[Tuple[str, str]]) -> None:
    """What crun's child does before exec on a hybrid host: a private mount namespace
    without the cgroup2 mount, and our own v1 cgroups bound over their hierarchies' roots."""
    libc.unshare(libc.CLONE_NEWNS)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    for mp in unmounts:
        libc.umount2(mp, libc.MNT_DETACH)
    for src, mp in binds:
        libc.mount(src, mp, None, libc.MS_BIND)


def workaround_plan() -> Tuple[List[str], List[Tuple[str, str]]]:
    """(cgroup2 mounts to hide, (own dir, mount point) binds) — empty when not hybrid."""
    dirs = own_cgroup_dirs()
    if not (any(fs == "cgroup2" for _, _, fs in dirs) and any(fs == "cgroup" for _, _, fs in dirs)):
        return [], []
    return ([mp for mp, _, fs in dirs if fs == "cgroup2"],
            [(d, mp) for mp, d, fs in dirs if fs == "cgroup" and d != mp])


class WorkaroundCost(Subject):
    """fork + the crun hybrid workaround + exit: what the workaround adds to each crun run,
    so a reader can take it off crun's time."""

    name, label, group = "crun-prep", "crun's hybrid workaround alone (fork, mount ns, umount, binds)", "baseline"

    def check(self) -> Optional[str]:
        if os.geteuid() != 0:
            return "needs root"
        if not workaround_plan()[0]:
            return "not a hybrid cgroup host: crun needs no workaround here"
        return None

    def setup(self) -> None:
        self.plan = workaround_plan()

    def once(self) -> None:
        from .subjects import _child, _wait
        pid = os.fork()
        if pid == 0:
            _child(lambda: (hybrid_workaround(*self.plan), 0)[1])
        _wait(pid, "crun-prep")


class OCIRuntime:
    """A bundle and a state root for one runtime, with the crun hybrid workaround."""

    def __init__(self, runtime: str, argv: List[str]) -> None:
        self.runtime = runtime
        self.path = shutil.which(runtime)
        self.token = secrets.token_hex(3)
        self.leaf_prefix = f"bench-{runtime}-{self.token}"
        self.tmp = tempfile.mkdtemp(prefix=f"pynsbook-bench-{runtime}-")
        try:  # interrupted while the bundle is built (SIGTERM, Ctrl-C): nothing stays
            self.state = os.path.join(self.tmp, "state")
            os.mkdir(self.state)
            self.parent = CgroupParent()
            self.leaf = self.leaf_prefix
            self.bundle = os.path.join(self.tmp, "bundle")
            self.config = build_bundle(self.bundle, argv, f"{self.parent.rel}/{self.leaf}")
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.leaves: List[str] = [self.leaf]
        self.hybrid = any(fs == "cgroup2" for _, _, fs in self.parent.dirs) and \
            any(fs == "cgroup" for _, _, fs in self.parent.dirs)
        # crun on a hybrid host: what its child must do before exec
        self.binds = [(d, mp) for mp, d, fs in self.parent.dirs if fs == "cgroup" and d != mp]
        self.unmounts = [mp for mp, _, fs in self.parent.dirs if fs == "cgroup2"]
        self.errlog = os.path.join(self.tmp, "stderr")
        self.ids: List[str] = []

    @property
    def workaround(self) -> bool:
        return self.runtime == "crun" and self.hybrid

    def prepare_child(self) -> None:
        """In the forked child, before exec: hide cgroup2 and re-root the v1 hierarchies."""
        if self.workaround:
            hybrid_workaround(self.unmounts, self.binds)

    def argv(self, cid: str, detach: bool = False, config: Optional[str] = None,
             pid_file: Optional[str] = None) -> List[str]:
        assert self.path
        return [self.path, "--root", self.state, "run", *(["-d"] if detach else []),
                *([f"--pid-file={pid_file}"] if pid_file else []),
                *(["--config", config] if config else []), "--bundle", self.bundle, cid]

    def own_config(self, cid: str) -> str:
        """A config file for container ``cid`` with a cgroup of its own (for crun -f)."""
        leaf = f"{self.leaf_prefix}-{cid.rsplit('-', 1)[-1]}"
        self.leaves.append(leaf)
        cfg = json.loads(json.dumps(self.config))
        cfg["linux"]["cgroupsPath"] = f"{self.parent.rel}/{leaf}"  # type: ignore[index]
        path = os.path.join(self.bundle, f"config-{cid}.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        return path

    def delete(self, cid: str) -> None:
        """``RUNTIME delete -f cid`` (through the same mount-namespace workaround)."""
        assert self.path
        from .subjects import spawn
        try:
            spawn([self.path, "--root", self.state, "delete", "-f", cid], self.prepare_child)
        except RuntimeError:
            pass

    def new_id(self) -> str:
        cid = f"pynsbook-bench-{self.token}-{len(self.ids)}"
        self.ids.append(cid)
        return cid

    def error_text(self) -> str:
        try:
            with open(self.errlog) as f:
                lines = f.read().strip().splitlines()
            return lines[-1] if lines else ""
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Delete every container of ours the runtime still knows, our cgroups, the bundle."""
        if self.path and os.path.isdir(self.state):
            for cid in os.listdir(self.state):
                if cid.startswith(f"pynsbook-bench-{self.token}-"):
                    self.delete(cid)
        for leaf in self.leaves:
            self.parent.remove(leaf)
        shutil.rmtree(self.tmp, ignore_errors=True)


class OCIPeer(Subject):
    """``crun run`` / ``runc run`` of /bin/true with a 64 MiB memory limit."""

    group = "peer"

    def __init__(self, runtime: str) -> None:
        super().__init__()
        self.runtime = runtime
        self.name = runtime
        self.label = f"{runtime} run /bin/true (64 MiB limit)"
        self.rt: Optional[OCIRuntime] = None

    def check(self) -> Optional[str]:
        if not shutil.which(self.runtime):
            return f"{self.runtime} is not installed"
        if os.geteuid() != 0:
            return f"{self.runtime} run needs root here (rootless mode is not benchmarked)"
        from ..vm.initramfs import find_busybox
        from ..vm import VMError
        try:
            find_busybox()
        except VMError as err:
            return f"no static busybox for the bundle: {err}"
        return None

    def setup(self) -> None:
        self.rt = OCIRuntime(self.runtime, ["/bin/true"])
        if self.rt.workaround:
            self.label += ", cgroup2 hidden in a private mount ns (hybrid host)"
        self.meta.update(workaround=self.rt.workaround, cgroup_parent=self.rt.parent.rel)

    def once(self) -> None:
        from .subjects import spawn
        rt = self.rt
        assert rt is not None
        fd = os.open(rt.errlog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            spawn(rt.argv(rt.new_id()), rt.prepare_child, stderr_fd=fd)
        except RuntimeError as err:
            raise RuntimeError(f"{err}: {rt.error_text()}") from None
        finally:
            os.close(fd)

    def teardown(self) -> None:
        if self.rt is not None:
            self.rt.cleanup()
            left = self.rt.parent.leftovers(self.rt.leaf_prefix)
            if left:
                self.meta["cgroups_left"] = left
            self.rt = None
