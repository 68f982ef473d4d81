"""Build a container's root filesystem inside its own mount namespace, then pivot into it.

Two shapes:
- host view (no rootfs given): the host's filesystems, each under an overlay whose upper
  layer is a throwaway tmpfs, so the container may write anywhere and nothing reaches the host;
- a root made of layers (``rootfs=DIR``, or an image's layers): the layers are the
  overlay's lower directories, so they are never modified; the upper directory (the
  container layer) is a throwaway tmpfs, or a host directory the client gave, so that the
  container's changes can be listed (diff) and kept (commit).
Both get a fresh /proc, /sys, /dev, /tmp and /run. Every step runs after the mount namespace
was made ``rprivate``, so no mount propagates back to the host. Unless the container is
privileged, parts of /proc and /sys are masked or read-only (confinement.MASKED and
READ_ONLY), /sys is read-only down to its last submount, and every filesystem the container
can write to is ``nodev``, so a device node it makes (with CAP_MKNOD) cannot be opened.
The processes that run in the container have no capability to undo any of this.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Dict, List, Optional, Sequence

from . import libc
from .mountinfo import read_mountinfo

SCRATCH = "/tmp"  # covered by our private tmpfs; the container gets a fresh /tmp anyway
_SKIP_UNDER = ("/proc", "/sys", "/dev", "/tmp", "/run")
_PSEUDO = {"proc", "sysfs", "cgroup", "cgroup2", "securityfs", "debugfs", "tracefs", "bpf",
           "pstore", "configfs", "fusectl", "binfmt_misc", "autofs", "devpts", "mqueue",
           "hugetlbfs", "nsfs", "devtmpfs", "efivarfs", "rpc_pipefs", "selinuxfs"}
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_NOSUID_NODEV = libc.MS_NOSUID | libc.MS_NODEV

#: runc's maskedPaths: kernel internals a container has no business reading (files read as
#: empty, directories as an empty read-only tmpfs), and /proc/kmsg, the kernel's log
MASKED = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
          "/proc/kmsg", "/sys/firmware", "/sys/devices/virtual/powercap")
#: runc's readonlyPaths: the kernel's settings (/proc/sys: core_pattern runs a program as
#: host root) and triggers (sysrq-trigger reboots the machine)
READ_ONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
#: what the host view hides: the homes (an empty directory, except the notebook's own
#: folders: RootBuilder.keep) and the host's credentials (read as empty). Container root is
#: host root's uid when run as root, and files are checked by uid, not by capability.
HIDDEN_DIRS = ("/root", "/home")
HIDDEN_FILES = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-",
                "/etc/sudoers", "/etc/sudoers.d", "/etc/ssh", "/etc/security/opasswd")
#: where a home keeps credentials: masked in every home the host view shows (the
#: notebook's folder may be a home itself, and then it is shown whole)
HOME_SECRETS = (".ssh", ".gnupg", ".netrc", ".npmrc", ".pypirc", ".git-credentials", ".aws",
                ".docker", ".kube", ".config", ".local/share/keyrings", ".password-store",
                ".claude", ".cargo/credentials.toml", ".m2/settings.xml")


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _mkdirs(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def _statvfs_flags(path: str) -> int:
    """Mount flags a read-only bind must keep (a user namespace may not clear them)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st, ms in ((os.ST_NOSUID, libc.MS_NOSUID), (os.ST_NODEV, libc.MS_NODEV),
                   (os.ST_NOEXEC, libc.MS_NOEXEC)):
        if f & st:
            out |= ms
    return out


def bind_readonly(source: str, target: str, recursive: bool = True) -> None:
    flags = libc.MS_BIND | (libc.MS_REC if recursive else 0)
    libc.mount(source, target, None, flags)
    libc.mount(None, target, None,
               libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY | _statvfs_flags(target))
    if recursive:
        readonly_below(target)


def readonly_below(target: str) -> None:
    """Make every mount under ``target`` read-only too: a remount changes one mount, and
    the submounts of a recursive bind (the host's /sys/fs/cgroup/* under /sys) stay
    writable otherwise."""
    try:
        libc.mount_setattr(target, libc.MOUNT_ATTR_RDONLY, recursive=True)
        return
    except OSError:
        pass  # a kernel older than 5.12: remount each submount
    for m in read_mountinfo():
        if _under(m.mountpoint, [target]) and m.mountpoint != target:
            try:
                libc.mount(None, m.mountpoint, None, libc.MS_REMOUNT | libc.MS_BIND |
                           libc.MS_RDONLY | _statvfs_flags(m.mountpoint))
            except OSError:
                pass


def mask(root: str, paths: Sequence[str]) -> None:
    """Hide each path under ``root``: a file reads as empty (/dev/null bound over it), a
    directory as an empty read-only tmpfs. Missing paths are skipped."""
    for path in paths:
        target = root + path
        try:
            st = os.lstat(target)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            libc.mount("tmpfs", target, "tmpfs", _NOSUID_NODEV | libc.MS_NOEXEC | libc.MS_RDONLY,
                       "size=0,mode=555")
        else:
            libc.mount("/dev/null", target, None, libc.MS_BIND)
            libc.mount(None, target, None, libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY |
                       libc.MS_NOSUID | libc.MS_NOEXEC)  # not nodev: /dev/null must open


def make_readonly(root: str, paths: Sequence[str]) -> None:
    """Bind each path under ``root`` onto itself read-only (and everything below it)."""
    for path in paths:
        target = root + path
        if not os.path.exists(target):
            continue
        libc.mount(target, target, None, libc.MS_BIND | libc.MS_REC)
        flags = _statvfs_flags(target) | _NOSUID_NODEV | libc.MS_NOEXEC
        libc.mount(None, target, None, libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY | flags)
        readonly_below(target)


class RootBuilder:
    """Builds the new root under SCRATCH/root. One instance per container init."""

    def __init__(self, lowers: Optional[Sequence[str]], namespaces: Sequence[str],
                 cgroup_mounts: Sequence[Dict[str, str]], upper: Optional[str] = None,
                 copy_root: Optional[str] = None, keep: Sequence[str] = (),
                 mask_paths: bool = True, read_only: bool = False) -> None:
        self.lowers = list(lowers or [])  # top layer first, as overlayfs's lowerdir lists them
        self.upper = upper
        #: a private, writable copy to use as the root as it is (where overlayfs is refused)
        self.copy_root = copy_root
        #: host directories under /tmp, /run or a hidden home to show all the same (the
        #: notebook's Python environment and working directory may live there)
        self.keep = [] if lowers or copy_root else list(keep)
        self.host_view = not (lowers or copy_root)
        self.ns = set(namespaces)
        self.cgroup_mounts = cgroup_mounts
        self.root = os.path.join(SCRATCH, "root")
        self.userns = "user" in self.ns
        self.mask_paths = mask_paths
        self.read_only = read_only
        self._layers = 0

    # -- layers --------------------------------------------------------------------------

    def _overlay(self, lower: str, target: str, upper_base: Optional[str] = None) -> None:
        self._layers += 1
        if upper_base:
            upper, work = os.path.join(upper_base, "upper"), os.path.join(upper_base, "work")
        else:
            upper = os.path.join(SCRATCH, f"upper{self._layers}")
            work = os.path.join(SCRATCH, f"work{self._layers}")
        os.makedirs(upper, exist_ok=True)
        os.makedirs(work, exist_ok=True)
        # in a user namespace overlayfs may only use user.* xattrs (trusted.* needs host root)
        extra = ",userxattr" if self.userns else ""
        libc.mount("overlay", target, "overlay", libc.MS_NODEV,
                   f"lowerdir={lower},upperdir={upper},workdir={work}{extra}")

    def _mirror(self, src: str, dst: str, mountpoints: Sequence[str]) -> None:
        """Put every entry of host directory ``src`` into ``dst`` under its own overlay.

        One overlay over all of ``/`` would be simpler, but in a user namespace the kernel
        refuses a lower layer with mounts below it (they are locked: the overlay would show
        what they cover). So directories with no mount below them get an overlay each, and
        directories holding mount points are walked into.
        """
        try:
            entries = list(os.scandir(src))
        except OSError:
            return  # unreadable for this user: it stays an empty directory
        for entry in entries:
            path = os.path.join(src, entry.name)
            target = os.path.join(dst, entry.name)
            if _under(path, _SKIP_UNDER):
                if entry.is_dir(follow_symlinks=False):
                    os.mkdir(target)
                continue
            if entry.is_symlink():
                os.symlink(os.readlink(path), target)
            elif entry.is_dir(follow_symlinks=False):
                os.mkdir(target)
                below = [m for m in mountpoints if m.startswith(path + "/")]
                if below:
                    self._mirror(path, target, mountpoints)
                else:
                    self._layer_or_bind(path, target)
            elif entry.is_file(follow_symlinks=False):
                open(target, "w").close()
                try:
                    bind_readonly(path, target, recursive=False)
                except OSError:
                    pass

    def _layer_or_bind(self, path: str, target: str) -> None:
        try:
            self._overlay(path, target)
        except OSError:
            try:  # some filesystems cannot be an overlay's lower layer: show them read-only
                bind_readonly(path, target, recursive=False)
            except OSError:
                pass  # a mount this user may not see (another user's FUSE mount)

    # -- special filesystems -------------------------------------------------------------

    def _proc(self) -> None:
        target = self.root + "/proc"
        try:
            libc.mount("proc", target, "proc", _NOSUID_NODEV | libc.MS_NOEXEC)
        except OSError:
            if "pid" in self.ns:
                raise
            bind_readonly("/proc", target)  # no PID namespace: the host's processes show

    def _sys(self) -> None:
        target = self.root + "/sys"
        try:
            if "net" not in self.ns:
                raise OSError(errno.EPERM, "sysfs shows the host network")
            libc.mount("sysfs", target, "sysfs", _NOSUID_NODEV | libc.MS_NOEXEC | libc.MS_RDONLY)
        except OSError:
            bind_readonly("/sys", target)
            return
        if "cgroup" in self.ns and self.cgroup_mounts:
            self._cgroupfs(target + "/fs/cgroup")

    def _cgroupfs(self, base: str) -> None:
        """Show the container its own cgroup as the root of /sys/fs/cgroup (read-only)."""
        flags = _NOSUID_NODEV | libc.MS_NOEXEC | libc.MS_RDONLY
        try:
            if len(self.cgroup_mounts) == 1 and self.cgroup_mounts[0]["type"] == "cgroup2":
                libc.mount("cgroup2", base, "cgroup2", flags)
                return
            libc.mount("tmpfs", base, "tmpfs", _NOSUID_NODEV | libc.MS_NOEXEC, "mode=755")
            for cm in self.cgroup_mounts:
                target = os.path.join(base, cm["name"])
                os.mkdir(target)
                libc.mount("cgroup", target, cm["type"], flags, cm.get("options"))
            libc.mount(None, base, None, libc.MS_REMOUNT | libc.MS_RDONLY | flags)
        except OSError:
            pass  # a view for curious students, not a limit: the limits still hold

    def _dev(self) -> None:
        dev = self.root + "/dev"
        libc.mount("tmpfs", dev, "tmpfs", _NOSUID_NODEV | libc.MS_NOEXEC, "mode=755,size=64k")
        for name in _DEVICES:
            target = os.path.join(dev, name)
            open(target, "w").close()
            libc.mount("/dev/" + name, target, None, libc.MS_BIND)
        for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                           ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                           ("ptmx", "pts/ptmx")):
            os.symlink(link, os.path.join(dev, name))
        os.mkdir(dev + "/pts")
        try:
            libc.mount("devpts", dev + "/pts", "devpts", libc.MS_NOSUID | libc.MS_NOEXEC,
                       "newinstance,ptmxmode=0666,mode=620")
        except OSError:
            pass  # no terminals in this container; everything else works
        os.mkdir(dev + "/shm")
        libc.mount("shm", dev + "/shm", "tmpfs", _NOSUID_NODEV, "mode=1777")
        if "ipc" in self.ns:
            os.mkdir(dev + "/mqueue")
            try:
                libc.mount("mqueue", dev + "/mqueue", "mqueue", _NOSUID_NODEV | libc.MS_NOEXEC)
            except OSError:
                pass

    def _homes(self) -> List[str]:
        """The homes the host view shows something of: /root and each /home/NAME."""
        out = ["/root"]
        try:
            out += [f"/home/{name}" for name in os.listdir(self.root + "/home")]
        except OSError:
            pass
        return out

    def _hide_host_secrets(self) -> None:
        for path in HIDDEN_DIRS:
            if os.path.isdir(self.root + path):
                libc.mount("tmpfs", self.root + path, "tmpfs", _NOSUID_NODEV, "mode=755")
        mask(self.root, HIDDEN_FILES)

    # -- the whole thing -----------------------------------------------------------------

    def _host_view(self, root_fd: int, mountpoints: Sequence[str]) -> None:
        """The host's files, writable through throwaway overlays."""
        if self.userns:
            libc.mount(self.root, self.root, None, libc.MS_BIND)  # pivot_root wants a mount
            self._mirror("/", self.root, mountpoints)
            return
        # No user namespace: nothing is locked, so one overlay takes all of / (a few
        # hundred microseconds instead of one overlay per top-level directory); each other
        # mount gets its own overlay on top, parents before children.
        self._overlay(f"/proc/self/fd/{root_fd}", self.root)
        for mp in mountpoints:
            if mp == "/" or _under(mp, _SKIP_UNDER):
                continue
            target = self.root + mp
            if os.path.isdir(mp) and os.path.isdir(target):
                self._layer_or_bind(mp, target)
            elif os.path.isfile(mp) and os.path.exists(target):
                try:
                    bind_readonly(mp, target, recursive=False)
                except OSError:
                    pass

    def build(self) -> None:
        libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
        mountpoints = [] if self.lowers or self.copy_root else sorted(
            {m.mountpoint for m in read_mountinfo() if m.fstype not in _PSEUDO or m.mountpoint == "/"},
            key=lambda p: (p.count("/"), p))
        # open the layers before /tmp is covered: they may live under it
        lower_fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                     for d in self.lowers or [self.copy_root or "/"]]
        upper_fd = os.open(self.upper, os.O_RDONLY | os.O_DIRECTORY) if self.upper else -1
        keep_fds = []
        for path in self.keep:
            try:
                keep_fds.append((path, os.open(path, os.O_RDONLY | os.O_DIRECTORY)))
            except OSError:
                pass  # gone, or not ours to read: nothing to show
        try:
            libc.mount("tmpfs", SCRATCH, "tmpfs", _NOSUID_NODEV, "mode=0755")
            os.mkdir(self.root)
            if self.copy_root:
                libc.mount(f"/proc/self/fd/{lower_fds[0]}", self.root, None, libc.MS_BIND)
                libc.mount(None, self.root, None, libc.MS_REMOUNT | libc.MS_BIND | libc.MS_NODEV |
                           _statvfs_flags(self.root))
            elif self.lowers:
                self._overlay(":".join(f"/proc/self/fd/{fd}" for fd in lower_fds), self.root,
                              f"/proc/self/fd/{upper_fd}" if upper_fd >= 0 else None)
            else:
                self._host_view(lower_fds[0], mountpoints)
        finally:
            for fd in lower_fds + ([upper_fd] if upper_fd >= 0 else []):
                os.close(fd)
        for d in ("proc", "sys", "dev", "tmp", "run"):
            _mkdirs(os.path.join(self.root, d))
        if self.read_only:  # all of the root, before what stays writable is mounted on it
            readonly_below(self.root)
        self._proc()
        self._sys()
        self._dev()
        if self.host_view:
            self._hide_host_secrets()
        libc.mount("tmpfs", self.root + "/tmp", "tmpfs", _NOSUID_NODEV, "mode=1777")
        libc.mount("tmpfs", self.root + "/run", "tmpfs", _NOSUID_NODEV, "mode=755")
        for path, fd in keep_fds:  # under their own throwaway overlay, like the rest
            target = self.root + path
            os.makedirs(target, exist_ok=True)
            self._layer_or_bind(f"/proc/self/fd/{fd}", target)
            os.close(fd)
        if self.mask_paths:
            mask(self.root, MASKED)
            make_readonly(self.root, READ_ONLY)
        if self.host_view:  # over what keep showed of a home too (its .ssh)
            for home in self._homes():
                mask(self.root, [f"{home}/{name}" for name in HOME_SECRETS])
            if self.read_only:  # the tmpfs over the homes, and the folders shown in it
                for path in list(HIDDEN_DIRS) + [p for p, _ in keep_fds]:
                    if os.path.isdir(self.root + path):
                        readonly_below(self.root + path)
        os.chdir(self.root)
        # pivot_root(".", ".") stacks the old root on top of the new one; detaching it
        # leaves only the new root (the trick runc uses: no put_old directory needed)
        libc.pivot_root(".", ".")
        libc.umount2(".", libc.MNT_DETACH)
        os.chdir("/")
