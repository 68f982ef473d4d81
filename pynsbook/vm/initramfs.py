"""Build the microVM's initramfs: busybox-static, the kernel modules the guest needs, and
an ``/init`` that mounts the host's root read-only over 9p and moves it onto ``/``.

The archive is written by Python's own ``newc`` cpio writer (no root needed for the
``/dev/console`` node) and cached by a hash of everything that goes into it.

Why ``mount --move`` and not ``chroot``: the kernel refuses new user namespaces (and
``pivot_root``) to a process whose root is not a mount point's root, so a plain chroot
into the share would break every container test in the guest.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from .errors import VMSetupError
from .kernel import Kernel, cache_dir, cache_lock

#: Modules the guest always gets: 9p over virtio-mmio for the shares, entropy, and what
#: containers use (overlay roots, veth pairs, bridges, tun, fuse, loop devices).
DEFAULT_MODULES: Sequence[str] = (
    "virtio_mmio", "9pnet_virtio", "9p", "virtio_rng",
    "overlay", "veth", "bridge", "tun", "fuse", "loop", "dummy",
)

#: Printed by the guest's init when the system is set up and the payload starts.
READY_MARKER = "@@PYNSBOOK-VM-READY@@"
#: Printed by the guest's init after the payload, followed by its exit status.
EXIT_MARKER = "@@PYNSBOOK-VM-EXIT@@"
#: Printed by the guest's init when it cannot set the guest up, followed by the reason.
FAIL_MARKER = "@@PYNSBOOK-VM-FAIL@@"

#: Where the guest finds the writable share, the payload and busybox after the switch.
GUEST_DIR = "/run/pynsbook-vm"

_FORMAT_VERSION = "7"

# Stage 1 runs from the initramfs: load modules, mount the shares, move the host root
# onto / and hand over to stage 2 inside it. KEY=value words of the kernel command line
# arrive as environment variables (pynsbook_root_tag, pynsbook_share_tag).
_INIT = r"""#!/bin/sh
export PATH=/bin
fail() { echo "FAIL_MARKER $*"; exec /bin/busybox reboot -f; }
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
busybox mount -t devtmpfs devtmpfs /dev
while read -r mod; do
    [ -n "$mod" ] && busybox insmod "/lib/modules/$mod" 2>/dev/null ||
        echo "pynsbook-vm: insmod $mod failed"
done < /modules.list
busybox mkdir -p /newroot
busybox mount -t 9p -o "trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000" \
    "${pynsbook_root_tag:-hostroot}" /newroot || fail "cannot mount the host root over 9p"
# A host directory under /tmp or /run (a checkout there, say: pynsbook_keep=PATH) must
# stay visible through the guest's fresh ones: hold it aside, then put it back.
if [ -n "$pynsbook_keep" ]; then
    busybox mkdir -p /keep && busybox mount --bind "/newroot$pynsbook_keep" /keep ||
        fail "cannot keep $pynsbook_keep"
fi
busybox mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp || fail "no /tmp in the host root"
busybox mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fail "no /run in the host root"
if [ -n "$pynsbook_keep" ]; then
    busybox mkdir -p "/newroot$pynsbook_keep" && busybox mount --move /keep "/newroot$pynsbook_keep" ||
        fail "cannot put back $pynsbook_keep"
fi
busybox mkdir -p /newroot/GUEST_DIR/share
busybox mount -t 9p -o "trans=virtio,version=9p2000.L,cache=none,msize=512000" \
    "${pynsbook_share_tag:-share}" /newroot/GUEST_DIR/share || fail "cannot mount the share"
busybox cp /bin/busybox /stage2 /newroot/GUEST_DIR/
for fs in proc sys dev; do busybox mount --move "/$fs" "/newroot/$fs"; done
cd /newroot || fail "cd /newroot"
busybox mount --move . / || fail "mount --move of the new root"
exec busybox chroot . GUEST_DIR/busybox sh GUEST_DIR/stage2
"""

# Stage 2 runs inside the host's root: the "host setup" systemd would do (cgroup2 with
# every controller enabled for children, /dev/pts, /dev/shm, loopback), then the payload.
_STAGE2 = r"""
BB=GUEST_DIR/busybox
cd /
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb LANG=C.UTF-8
$BB mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || echo "FAIL_MARKER no cgroup2"
for c in $($BB cat /sys/fs/cgroup/cgroup.controllers); do
    echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control || echo "pynsbook-vm: cannot enable $c"
done
$BB mkdir -p /dev/pts /dev/shm /dev/mqueue
$BB mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
[ -e /dev/ptmx ] || $BB ln -s pts/ptmx /dev/ptmx
$BB mount -t tmpfs -o mode=1777 tmpfs /dev/shm
case "$pynsbook_keep" in /var/tmp/*) ;; *) $BB mount -t tmpfs -o mode=1777 tmpfs /var/tmp 2>/dev/null ;; esac
$BB mount -t mqueue mqueue /dev/mqueue 2>/dev/null
$BB ln -sf /proc/self/fd /dev/fd 2>/dev/null
$BB ip link set lo up
$BB hostname pynsbook-vm
# Kernel messages (OOM kills the tests cause on purpose) would interleave with the
# payload's output on the one console; keep only emergencies. dmesg still has them all.
$BB dmesg -n 1
echo "READY_MARKER $($BB cut -d' ' -f1 /proc/uptime)"
/bin/sh GUEST_DIR/share/payload < /dev/null > /dev/console 2>&1
status=$?
$BB sync
echo "$status" > GUEST_DIR/share/exit_status
$BB umount GUEST_DIR/share 2>/dev/null
echo "EXIT_MARKER $status $($BB cut -d' ' -f1 /proc/uptime)"
$BB reboot -f
"""


def init_scripts() -> Dict[str, str]:
    """The text of ``/init`` and ``/stage2`` with the markers filled in."""
    out = {}
    for name, text in (("init", _INIT), ("stage2", _STAGE2)):
        for key, value in (("GUEST_DIR", GUEST_DIR), ("READY_MARKER", READY_MARKER),
                           ("EXIT_MARKER", EXIT_MARKER), ("FAIL_MARKER", FAIL_MARKER)):
            text = text.replace(key, value)
        out[name] = text
    return out


# --------------------------------------------------------------------------- modules


def _norm(name: str) -> str:
    return name.replace("-", "_")


def module_index(modules_dir: Path) -> Dict[str, Path]:
    """Map each module name (``-`` read as ``_``) to its file under ``modules_dir``."""
    index: Dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(modules_dir / "kernel"):
        for f in files:
            for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
                if f.endswith(suffix):
                    index[_norm(f[: -len(suffix)])] = Path(dirpath) / f
    return index


def builtin_modules(modules_dir: Path) -> set:
    """Names of modules compiled into the kernel (``modules.builtin``)."""
    path = modules_dir / "modules.builtin"
    if not path.exists():
        return set()
    return {_norm(Path(line.strip()).name.split(".ko")[0]) for line in path.read_text().split()}


def read_module(path: Path) -> bytes:
    """A module's bytes, decompressed if it is a ``.ko.xz`` or ``.ko.gz``."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        import lzma
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        import gzip
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise VMSetupError(f"cannot decompress {path}: Python has no zstd; pass an uncompressed kernel")
    return data


def module_depends(elf: bytes) -> List[str]:
    """The ``depends=`` list from a module's ``.modinfo`` section (what modules.dep
    would say; Debian's package carries no modules.dep, depmod writes it at install)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return []
    e_shoff, = struct.unpack_from("<Q", elf, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int):
        return struct.unpack_from("<IIQQQQIIQQ", elf, e_shoff + i * e_shentsize)

    strtab = section(e_shstrndx)
    names = elf[strtab[4]:strtab[4] + strtab[5]]
    for i in range(e_shnum):
        sh = section(i)
        name = names[sh[0]:names.index(b"\0", sh[0])]
        if name == b".modinfo":
            for entry in elf[sh[4]:sh[4] + sh[5]].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [d for d in entry[8:].decode().split(",") if d]
    return []


def resolve_modules(modules_dir: Path, wanted: Iterable[str]) -> List[Path]:
    """The module files for ``wanted`` and their dependencies, in load order.

    Names that are built into the kernel or absent are skipped (the guest reports
    what it lacks); dependencies come before the modules that need them.
    """
    index = module_index(modules_dir)
    builtin = builtin_modules(modules_dir)
    order: List[Path] = []
    seen: set = set()

    def visit(name: str) -> None:
        name = _norm(name)
        if name in seen or name in builtin or name not in index:
            return
        seen.add(name)
        for dep in module_depends(read_module(index[name])):
            visit(dep)
        order.append(index[name])

    for name in wanted:
        visit(name)
    return order


# --------------------------------------------------------------------------- cpio


class CpioWriter:
    """A minimal ``newc`` (SVR4, no CRC) cpio archive writer, as the kernel unpacks."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple = (0, 0)) -> None:
        name_b = name.lstrip("/").encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0)
        self._ino += 1
        self._buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self._buf.write(name_b)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        """Add a directory."""
        self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file."""
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node."""
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        """Close the archive (``TRAILER!!!``) and return its bytes."""
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


# --------------------------------------------------------------------------- build


def find_busybox() -> Path:
    """The host's static busybox (Debian: package busybox-static), or an error saying so."""
    for cand in (os.environ.get("PYNSBOOK_VM_BUSYBOX"), "/bin/busybox", "/usr/bin/busybox",
                 shutil.which("busybox")):
        if cand and Path(cand).is_file():
            if b"/lib64/ld-linux" in Path(cand).read_bytes()[:4096]:
                continue  # dynamically linked: useless in the initramfs
            return Path(cand)
    raise VMSetupError("no static busybox found: apt-get install busybox-static "
                       "(or set PYNSBOOK_VM_BUSYBOX)")


def build_initramfs(kernel: Kernel, modules: Optional[Sequence[str]] = None) -> Path:
    """Build (or reuse from the cache) the initramfs for ``kernel``; return its path.

    ``modules`` defaults to :data:`DEFAULT_MODULES` plus any names listed in
    ``$PYNSBOOK_VM_MODULES`` (comma-separated).
    """
    if modules is None:
        extra = [m for m in os.environ.get("PYNSBOOK_VM_MODULES", "").split(",") if m]
        modules = list(DEFAULT_MODULES) + extra
    busybox = find_busybox()
    scripts = init_scripts()
    mod_files = resolve_modules(kernel.modules_dir, modules) if kernel.modules_dir else []

    key = hashlib.sha256()
    for part in (_FORMAT_VERSION, kernel.release, str(kernel.modules_dir), *modules,
                 scripts["init"], scripts["stage2"]):
        key.update(part.encode() + b"\0")
    bst = busybox.stat()
    key.update(f"{busybox}:{bst.st_size}:{bst.st_mtime_ns}".encode())
    out = cache_dir() / "initramfs" / f"initramfs-{kernel.release}-{key.hexdigest()[:16]}.cpio"
    if out.exists():
        return out

    w = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "tmp", "newroot", "lib", "lib/modules"):
        w.directory(d)
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", busybox.read_bytes(), 0o755)
    w.symlink("bin/sh", "busybox")
    w.file("init", scripts["init"].encode(), 0o755)
    w.file("stage2", scripts["stage2"].encode(), 0o755)
    names = []
    for f in mod_files:
        name = f.name.split(".ko")[0] + ".ko"
        w.file(f"lib/modules/{name}", read_module(f))
        names.append(name)
    w.file("modules.list", ("\n".join(names) + "\n").encode())
    data = w.finish()
    with cache_lock("initramfs"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.rename(out)
    return out
