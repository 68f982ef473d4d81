"""One layer on disk, and what a layer means.

A layer is a directory in overlayfs's own format, so it can be an overlay lower directory
as it is:

- a deleted path is a *whiteout*: a character device 0/0 with the deleted name;
- a directory whose lower contents are hidden is *opaque*: it carries the xattr
  ``trusted.overlay.opaque=y`` (read by overlayfs mounted by real root) and
  ``user.overlay.opaque=y`` (read by overlayfs mounted in a user namespace, ``userxattr``).
  We write both where we may (trusted.* needs real root) and accept either when reading.

A layer's identity is the sha256 of its *canonical tar*: the OCI layer tar we would write
for it (``digest_dir``), which this module never stores, only hashes:

- PAX format, entries depth first, siblings sorted by name (bytes), names relative and
  without ``./``; the root itself is not an entry;
- whiteouts as empty ``.wh.NAME`` files, an opaque directory as the directory followed by
  an empty ``DIR/.wh..wh..opq``, exactly as the OCI image spec writes changesets;
- mode (permission bits), uid, gid as a container sees them (real root: the ids on disk;
  an unprivileged user: its own uid shown as 0, anyone else's as 65534), symlink targets,
  device numbers, file contents; a file with several names in the layer is stored once and
  its other names are hard links to the first name in walk order;
- mtime 0, no user or group names, no other xattrs: the same files imported twice, or by
  another user, are the same layer.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import tarfile
from typing import IO, Callable, Dict, Iterator, List, Optional, Set, Tuple

from ..errors import PynsbookError

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
#: directories the engine creates in every root as mount points (a container layer may
#: hold them empty: they are no change)
MOUNT_POINTS = ("proc", "sys", "dev", "tmp", "run")
_OVERFLOW_ID = 65534


class LayerError(PynsbookError):
    """A layer (tarball, directory, container layer) that cannot be stored as it is."""


# ---------------------------------------------------------------------------------------
# whiteouts and opaque directories

def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def make_whiteout(path: str) -> None:
    """A 0/0 character device: allowed without CAP_MKNOD since Linux 5.8."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o000, 0)
    except PermissionError as err:
        raise LayerError(f"cannot create the whiteout {path} (a 0/0 device; this needs "
                         "Linux 5.8 or newer, or root)") from err


def is_opaque(path: str) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def set_opaque(path: str) -> None:
    done = False
    for name in OPAQUE_XATTRS:
        try:
            os.setxattr(path, name, b"y", follow_symlinks=False)
            done = True
        except OSError:
            continue  # trusted.* needs real root; user.* may be missing on some filesystems
    if not done:
        raise LayerError(f"cannot mark {path} opaque: this filesystem refuses the overlay "
                         "xattrs (put the store on ext4, xfs or btrfs: PYNSBOOK_STORE=DIR)")


# ---------------------------------------------------------------------------------------
# walking a layer

def walk(root: str, skip_mount_points: bool = False) -> Iterator[Tuple[str, str, os.stat_result]]:
    """(relative path, full path, lstat) of every entry below ``root``, each directory
    followed by its contents (pre-order), siblings sorted by name. Never follows symlinks."""
    def entries(rel_dir: str, full_dir: str) -> Iterator[Tuple[str, str, os.stat_result]]:
        try:
            names = sorted(os.listdir(full_dir), key=os.fsencode)
        except FileNotFoundError:
            return
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            full = os.path.join(full_dir, name)
            st = os.lstat(full)
            if skip_mount_points and not rel_dir and name in MOUNT_POINTS and \
                    stat.S_ISDIR(st.st_mode) and not os.listdir(full):
                continue
            yield rel, full, st

    stack = [entries("", root)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        yield item
        if stat.S_ISDIR(item[2].st_mode):
            stack.append(entries(item[0], item[1]))


def container_id(n: int) -> int:
    """The uid/gid a container sees for a file owned by ``n`` on the host."""
    if os.geteuid() == 0:
        return n
    return 0 if n in (os.geteuid(), os.getegid()) else _OVERFLOW_ID


class _Hasher:
    """A write-only file that hashes and counts what is written into it."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return len(data)


def canonical_tar(root: str, out: IO[bytes], skip_mount_points: bool = False) -> Dict[str, int]:
    """Write the canonical OCI layer tar of layer directory ``root`` to ``out`` (see the
    module docstring). Returns counts: entries, files, whiteouts, opaque, bytes (content)."""
    counts = {"entries": 0, "files": 0, "whiteouts": 0, "opaque": 0, "bytes": 0}
    first_name: Dict[Tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
                      encoding="utf-8", errors="surrogateescape") as tar:
        for rel, full, st in walk(root, skip_mount_points):
            counts["entries"] += 1
            if is_whiteout(st):
                parent, _, name = rel.rpartition("/")
                tar.addfile(_info(f"{parent}/{WH_PREFIX}{name}" if parent else WH_PREFIX + name))
                counts["whiteouts"] += 1
                continue
            info = _info(rel, st)
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                if is_opaque(full):
                    tar.addfile(_info(f"{rel}/{WH_OPAQUE}"))
                    counts["opaque"] += 1
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in first_name:
                    info.type, info.linkname = tarfile.LNKTYPE, first_name[key]
                    tar.addfile(info)
                    continue
                first_name[key] = rel
                info.size = st.st_size
                with open(full, "rb") as f:
                    tar.addfile(info, f)
                counts["files"] += 1
                counts["bytes"] += st.st_size
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(full)
                tar.addfile(info)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                tar.addfile(info)
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            # sockets are not files a layer can carry: left out
    return counts


def _info(name: str, st: Optional[os.stat_result] = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uname = info.gname = ""
    if st is None:  # a whiteout marker: an empty file
        info.mode, info.uid, info.gid = 0, 0, 0
    else:
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = container_id(st.st_uid), container_id(st.st_gid)
    return info


def digest_dir(root: str, skip_mount_points: bool = False) -> Tuple[str, Dict[str, int]]:
    """``("sha256:<hex>", counts)`` of layer directory ``root``; counts has ``tar_size``."""
    h = _Hasher()
    counts = canonical_tar(root, h, skip_mount_points)  # type: ignore[arg-type]
    counts["tar_size"] = h.size
    return "sha256:" + h.sha.hexdigest(), counts


def disk_usage(paths: List[str], seen: Optional[Set[Tuple[int, int]]] = None) -> int:
    """Bytes of disk the trees under ``paths`` use, each inode counted once (like du)."""
    seen = set() if seen is None else seen
    total = 0
    for top in paths:
        if not os.path.lexists(top):
            continue
        entries = [(top, os.lstat(top))] + [(full, st) for _, full, st in walk(top)] \
            if os.path.isdir(top) and not os.path.islink(top) else [(top, os.lstat(top))]
        for _, st in entries:
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
    return total


# ---------------------------------------------------------------------------------------
# copying entries (directory import, commit, the copy fallback)

def copy_entry(src: str, st: os.stat_result, dst: str,
               links: Optional[Dict[Tuple[int, int], str]] = None) -> None:
    """Create ``dst`` as a copy of ``src`` (not following symlinks), with its mode and,
    as root, its owner. Directories are created empty and writable: the caller sets their
    attributes once they are filled. ``links`` keeps hard links."""
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dst, 0o700)
        return  # its attributes come last (copy_tree), so it can be filled first
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if links is not None and st.st_nlink > 1 and key in links:
            os.link(links[key], dst)
            return
        _copy_file(src, dst)
        if links is not None and st.st_nlink > 1:
            links[key] = dst
    elif is_whiteout(st):
        make_whiteout(dst)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        if os.geteuid() != 0:
            return  # only root may make device nodes; images rarely need them (/dev is fresh)
        os.mknod(dst, st.st_mode, st.st_rdev)
    elif stat.S_ISFIFO(st.st_mode):
        os.mkfifo(dst)
    else:
        return  # sockets
    set_attrs(dst, st.st_mode, st.st_uid, st.st_gid, st.st_mtime)


def _copy_file(src: str, dst: str) -> None:
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fin).st_size
            while size > 0:
                n = os.copy_file_range(fin, fout, min(size, 1 << 30))
                if n == 0:
                    break
                size -= n
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            os.lseek(fin, 0, os.SEEK_SET)
            os.ftruncate(fout, 0)
            while True:
                chunk = os.read(fin, 1 << 20)
                if not chunk:
                    break
                os.write(fout, chunk)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def set_attrs(path: str, mode: int, uid: int, gid: int, mtime: Optional[float]) -> None:
    """Owner (root only), permission bits (not on symlinks) and mtime of ``path``."""
    is_link = stat.S_ISLNK(mode)
    if os.geteuid() == 0:
        os.lchown(path, uid, gid)
    if not is_link:
        os.chmod(path, stat.S_IMODE(mode))
    if mtime is not None:
        try:
            os.utime(path, (mtime, mtime), follow_symlinks=False)
        except OSError:
            pass


def copy_tree(src: str, dst: str, skip: Callable[[str, os.stat_result], bool] = lambda r, s: False,
              opaque: bool = True) -> None:
    """Copy the tree ``src`` into the existing directory ``dst`` (an empty layer directory).

    Directory modes are set last, so a read-only directory can still be filled."""
    links: Dict[Tuple[int, int], str] = {}
    dirs: List[Tuple[str, os.stat_result]] = []
    skipped: List[str] = []
    for rel, full, st in walk(src):
        if any(rel.startswith(s + "/") for s in skipped):
            continue
        if skip(rel, st):
            skipped.append(rel)
            continue
        target = os.path.join(dst, rel)
        copy_entry(full, st, target, links)
        if stat.S_ISDIR(st.st_mode):
            dirs.append((target, st))
            if opaque and is_opaque(full):
                set_opaque(target)
    for target, st in reversed(dirs):
        set_attrs(target, st.st_mode, st.st_uid, st.st_gid, st.st_mtime)


def rmtree(path: str) -> None:
    """Remove a tree even where directories were left without write permission (an
    overlay's work/work is mode 000)."""
    if not os.path.lexists(path):
        return
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                try:
                    os.chmod(full, 0o700)
                except OSError:
                    pass
    import shutil
    shutil.rmtree(path)


def flatten(layer_dirs: List[str], dest: str) -> None:
    """Apply layer directories (BOTTOM first) onto the empty directory ``dest``, as
    overlayfs would show them merged: whiteouts delete, opaque directories hide what is
    below. A plain copy of an image, for hosts where overlayfs is refused."""
    links: Dict[Tuple[int, int], str] = {}
    dirs: Dict[str, os.stat_result] = {}
    for layer in layer_dirs:
        for rel, full, st in walk(layer):
            target = os.path.join(dest, rel)
            try:
                old: Optional[os.stat_result] = os.lstat(target)
            except FileNotFoundError:
                old = None
            if is_whiteout(st):
                if old is not None:
                    rmtree(target) if stat.S_ISDIR(old.st_mode) else os.unlink(target)
                continue
            if stat.S_ISDIR(st.st_mode):
                if old is not None and stat.S_ISDIR(old.st_mode):
                    if is_opaque(full):
                        for name in os.listdir(target):
                            p = os.path.join(target, name)
                            rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
                else:
                    if old is not None:
                        os.unlink(target)
                    os.mkdir(target, 0o700)
                dirs[target] = st
                continue
            if old is not None:
                rmtree(target) if stat.S_ISDIR(old.st_mode) else os.unlink(target)
            copy_entry(full, st, target, links)
    for target in sorted(dirs, key=len, reverse=True):
        if os.path.isdir(target):
            st = dirs[target]
            set_attrs(target, st.st_mode, st.st_uid, st.st_gid, st.st_mtime)
