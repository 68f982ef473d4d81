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
from typing import IO, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

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


def make_whiteout(path: str, dir_fd: Optional[int] = None) -> None:
    """A 0/0 character device: allowed without CAP_MKNOD since Linux 5.8. With ``dir_fd``,
    ``path`` is a name in that directory (never reached through a symlink)."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o000, 0, dir_fd=dir_fd)
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


def set_opaque(path: Union[str, int]) -> None:
    """Mark a directory opaque: a path (its last component not followed) or an open fd."""
    done = False
    for name in OPAQUE_XATTRS:
        try:
            if isinstance(path, int):
                os.setxattr(path, name, b"y")
            else:
                os.setxattr(path, name, b"y", follow_symlinks=False)
            done = True
        except OSError:
            continue  # trusted.* needs real root; user.* may be missing on some filesystems
    if not done:
        raise LayerError(f"cannot mark {path} opaque: this filesystem refuses the overlay "
                         "xattrs (put the store on ext4, xfs or btrfs: PYNSBOOK_STORE=DIR)")


# ---------------------------------------------------------------------------------------
# never following links: directories by fd, attributes without following
#
# Everything in a layer (and in a container's layer) is hostile: a directory met early may
# be a symlink to the host by the time its attributes are set. So directories are reached
# one component at a time from an fd of the layer root, each with O_NOFOLLOW|O_DIRECTORY,
# and attributes are set on fds, or on a name in such a directory without following it.

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: errors of open_dir_at meaning "not (or no longer) a real directory of this tree"
NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR, errno.ENOENT)


def open_dir_at(root_fd: int, parts: Sequence[str]) -> int:
    """A new fd of the directory ``parts`` below the directory fd ``root_fd``, every
    component a real directory: OSError (errno in NOT_A_DIR) if one is a symlink, a file
    or missing."""
    fd = os.open(".", DIR_FLAGS, dir_fd=root_fd)
    try:
        for comp in parts:
            if comp in ("", ".", "..") or "/" in comp:
                raise ValueError(f"not a path component: {comp!r}")
            nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _set_time(target: Union[str, int], mtime: Optional[float], dir_fd: Optional[int] = None) -> None:
    if mtime is None:
        return
    try:
        if isinstance(target, int):
            os.utime(target, (mtime, mtime))
        else:
            os.utime(target, (mtime, mtime), dir_fd=dir_fd, follow_symlinks=False)
    except (OSError, OverflowError, ValueError, TypeError):
        pass  # a time the filesystem cannot hold: the file keeps the time it has


def set_attrs_fd(fd: int, mode: int, uid: int, gid: int, mtime: Optional[float]) -> None:
    """Owner (root only), permission bits and mtime of the open file ``fd``. The owner
    first: chown clears the setuid and setgid bits the mode then sets."""
    if os.geteuid() == 0:
        os.fchown(fd, uid, gid)
    os.fchmod(fd, stat.S_IMODE(mode))
    _set_time(fd, mtime)


def set_attrs_at(dir_fd: int, name: str, mode: int, uid: int, gid: int,
                 mtime: Optional[float]) -> None:
    """Like set_attrs_fd, for the entry ``name`` of directory ``dir_fd``, never following
    it: a symlink gets its owner and time (a symlink has no permission bits)."""
    if os.geteuid() == 0:
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        _chmod_nofollow(name, stat.S_IMODE(mode), dir_fd)
    _set_time(name, mtime, dir_fd)


def _chmod_nofollow(name: str, mode: int, dir_fd: Optional[int] = None) -> None:
    """chmod that fails (OSError) rather than follow ``name`` if it is a symlink."""
    try:
        os.chmod(name, mode, dir_fd=dir_fd, follow_symlinks=False)  # fchmodat(AT_SYMLINK_NOFOLLOW)
        return
    except (NotImplementedError, ValueError):
        pass  # a symlink (then the open below fails), or a C library without it
    except OSError as err:
        if err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:  # ELOOP above for a symlink; a file, directory or FIFO is changed through its fd
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def apply_dir_attrs(root: str, dirs: Dict[Tuple[str, ...], Tuple[int, int, int, Optional[float]]]) -> None:
    """Set ``(mode, uid, gid, mtime)`` on directories below ``root`` given by their path
    components, deepest first (a directory left read-only can be filled before), each
    reached without following a symlink. A path that is no longer a directory (a later
    entry replaced it, with a symlink perhaps) is left alone."""
    root_fd = os.open(root, DIR_FLAGS)
    try:
        for parts in sorted(dirs, key=len, reverse=True):
            try:
                fd = open_dir_at(root_fd, parts)
            except OSError as err:
                if err.errno in NOT_A_DIR:
                    continue
                raise
            try:
                set_attrs_fd(fd, *dirs[parts])
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)


# ---------------------------------------------------------------------------------------
# walking a layer

def walk(root: str, skip_mount_points: bool = False) -> Iterator[Tuple[str, str, os.stat_result]]:
    """(relative path, full path, lstat) of every entry below ``root``, each directory
    followed by its contents (pre-order), siblings sorted by name. Never follows symlinks.

    The tree may be live and hostile (a running container's layer): each directory is
    listed through an fd opened with O_NOFOLLOW and checked to be the inode its parent
    listed, and its entries are lstat'ed in it; a directory swapped for a symlink meanwhile
    is not listed (its name is still yielded, with what was seen). Whoever opens a yielded
    full path must check the inode too (as ``copy_entry`` does)."""
    def entries(rel_dir: str, full_dir: str,
                expect: Optional[os.stat_result]) -> Iterator[Tuple[str, str, os.stat_result]]:
        try:
            fd = os.open(full_dir, DIR_FLAGS if expect is not None else
                         os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            if err.errno in NOT_A_DIR:
                return  # removed, or replaced by a symlink or a file, since it was listed
            raise
        try:
            got = os.fstat(fd)
            if expect is not None and (got.st_dev, got.st_ino) != (expect.st_dev, expect.st_ino):
                return
            listed = []
            for name in sorted(os.listdir(fd), key=os.fsencode):
                try:
                    listed.append((name, os.stat(name, dir_fd=fd, follow_symlinks=False)))
                except FileNotFoundError:
                    continue
        finally:
            os.close(fd)
        for name, st in listed:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            full = os.path.join(full_dir, name)
            if skip_mount_points and not rel_dir and name in MOUNT_POINTS and \
                    stat.S_ISDIR(st.st_mode) and _empty_dir(full):
                continue
            yield rel, full, st

    stack = [entries("", root, None)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        yield item
        if stat.S_ISDIR(item[2].st_mode):
            stack.append(entries(item[0], item[1], item[2]))


def list_dir(path: str, st: os.stat_result) -> List[str]:
    """The names in directory ``path`` if it still is the inode ``st`` (as ``walk``
    yielded it), reached without following it; else none."""
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError as err:
        if err.errno in NOT_A_DIR:
            return []
        raise
    try:
        got = os.fstat(fd)
        if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino):
            return []
        return os.listdir(fd)
    finally:
        os.close(fd)


def _empty_dir(path: str) -> bool:
    try:
        return not os.listdir(path)
    except OSError:
        return False


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

def is_device(st: os.stat_result) -> bool:
    """A block or character device other than a whiteout: never kept in a layer."""
    return (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) and not is_whiteout(st)


def copy_entry(src: str, st: os.stat_result, dst: str,
               links: Optional[Dict[Tuple[int, int], str]] = None) -> bool:
    """Create ``dst`` as a copy of ``src`` (not following symlinks), with its mode and,
    as root, its owner. Directories are created empty and writable: the caller sets their
    attributes once they are filled. ``links`` keeps hard links. Device nodes (whiteouts
    aside) are not copied: returns False for them (the caller says so), True otherwise."""
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dst, 0o700)
        return True  # its attributes come last (copy_tree), so it can be filled first
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if links is not None and st.st_nlink > 1 and key in links:
            os.link(links[key], dst, follow_symlinks=False)
            return True
        _copy_file(src, dst, st)
        if links is not None and st.st_nlink > 1:
            links[key] = dst
    elif is_whiteout(st):
        make_whiteout(dst)
    elif is_device(st):
        # a device node in an image, a directory or a container's layer: whoever can read
        # the store would reach the host's device through it (docker keeps them and relies
        # on the device cgroup; we keep none: a container gets its own /dev)
        return False
    elif stat.S_ISFIFO(st.st_mode):
        os.mkfifo(dst, 0o600)
    else:
        return True  # sockets: not files a layer can carry
    set_attrs(dst, st.st_mode, st.st_uid, st.st_gid, st.st_mtime)
    return True


def _copy_file(src: str, dst: str, st: Optional[os.stat_result] = None) -> None:
    """Copy the file ``src`` to the new file ``dst``; with ``st``, ``src`` must still be
    that inode (a path reached through a directory swapped for a symlink is not)."""
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        got = os.fstat(fin)
        if not stat.S_ISREG(got.st_mode) or (
                st is not None and (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino)):
            raise LayerError(f"{src} changed while it was being copied (it is no longer the "
                             "file that was listed); nothing was kept")
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            size = got.st_size
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
    """Owner (root only), permission bits (not on symlinks) and mtime of ``path``, never
    following ``path`` itself if it is a symlink. (Its parents are followed: for paths
    this process made; a tree that may have changed under us goes by apply_dir_attrs.)"""
    is_link = stat.S_ISLNK(mode) or os.path.islink(path)
    if os.geteuid() == 0:
        os.lchown(path, uid, gid)
    if not is_link:
        _chmod_nofollow(path, stat.S_IMODE(mode))
    _set_time(path, mtime)


def copy_tree(src: str, dst: str, skip: Callable[[str, os.stat_result], bool] = lambda r, s: False,
              opaque: bool = True) -> List[str]:
    """Copy the tree ``src`` into the existing directory ``dst`` (an empty layer directory).
    Returns the paths (relative) of the device nodes left out.

    Directory modes are set last, so a read-only directory can still be filled."""
    links: Dict[Tuple[int, int], str] = {}
    dirs: Dict[Tuple[str, ...], Tuple[int, int, int, Optional[float]]] = {}
    skipped: List[str] = []
    devices: List[str] = []
    for rel, full, st in walk(src):
        if any(rel.startswith(s + "/") for s in skipped):
            continue
        if skip(rel, st):
            skipped.append(rel)
            continue
        target = os.path.join(dst, rel)
        if not copy_entry(full, st, target, links):
            devices.append(rel)
            continue
        if stat.S_ISDIR(st.st_mode):
            dirs[tuple(rel.split("/"))] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime)
            if opaque and is_opaque(full):
                set_opaque(target)
    apply_dir_attrs(dst, dirs)
    return devices


def describe_left_out(source: str, entries: List[str]) -> str:
    """One line saying which device nodes an import or commit left out, and why."""
    shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    # names come from the image: no newline or terminal escape of theirs gets printed
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in shown)
    return (f"pynsbook: {source}: left out {len(entries)} device node(s): {shown} "
            "(an image brings no device nodes: a container gets its own /dev)")


def rmtree(path: str) -> None:
    """Remove a tree even where directories were left without write permission (an
    overlay's work/work is mode 000), never following a symlink in it."""
    if not os.path.lexists(path):
        return
    import shutil
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
        return
    for _, dirnames, _, dir_fd in os.fwalk(path):  # fd-based, never into a symlink
        for d in dirnames:
            try:
                _chmod_nofollow(d, 0o700, dir_fd)
            except OSError:
                pass
    shutil.rmtree(path)


def flatten(layer_dirs: List[str], dest: str) -> None:
    """Apply layer directories (BOTTOM first) onto the empty directory ``dest``, as
    overlayfs would show them merged: whiteouts delete, opaque directories hide what is
    below. A plain copy of an image, for hosts where overlayfs is refused."""
    links: Dict[Tuple[int, int], str] = {}
    dirs: Dict[Tuple[str, ...], Tuple[int, int, int, Optional[float]]] = {}
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
                            rmtree(os.path.join(target, name))
                else:
                    if old is not None:
                        os.unlink(target)
                    os.mkdir(target, 0o700)
                dirs[tuple(rel.split("/"))] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime)
                continue
            if old is not None:
                rmtree(target) if stat.S_ISDIR(old.st_mode) else os.unlink(target)
            copy_entry(full, st, target, links)
    # a directory of a lower layer may be a symlink (to anywhere) in an upper one: its
    # attributes go to the directory only, if it still is one
    apply_dir_attrs(dest, dirs)
