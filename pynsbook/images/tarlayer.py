"""Turn one OCI layer tar (a changeset) into a layer directory, refusing what could escape.

The tar is applied to an empty directory, never onto files of other layers: each layer
stays its own overlay lower directory. OCI whiteouts become overlay whiteouts:

- ``DIR/.wh.NAME``   -> a 0/0 character device ``DIR/NAME`` (unless this same layer also
  has ``DIR/NAME``: a whiteout only hides what lower layers have);
- ``DIR/.wh..wh..opq`` -> ``DIR`` is marked opaque (whatever its position in the tar).

Every entry is hostile input. Nothing is reached by a path the kernel resolves: the layer
root is held open, each directory is entered one component at a time with
O_NOFOLLOW|O_DIRECTORY, and every creation, removal, write and attribute (owner, mode,
time, the opaque xattr) goes through such a directory fd, a file's own fd, or a name in
that directory that is not followed. Attributes of directories, applied once the tar is
read, reach the directory the same way again: if a later entry replaced it (by a symlink
to the host, say), they are dropped.

Refused, with one line naming the entry (the caller then discards the whole layer):
- a name that is absolute or has a ``..`` component, or longer than PATH_MAX;
- a hard link whose target is not a regular file earlier in the same tar (``..``, absolute,
  a symlink, or a lower layer's file);
- a symlink whose target climbs above the root (``../../..`` from where it is, or an
  absolute ``/../..``); an ordinary absolute symlink such as ``/bin/sh -> /bin/busybox``
  stays: it points inside the container's root, and nothing here ever follows a symlink;
- an entry whose path goes through a symlink (``d -> /etc`` then ``d/passwd``) or through
  a file: extraction would write outside the layer;
- an owner id out of range.

Left out, and listed (``apply_tar`` returns them; the importer says so in one line): block
and character devices other than 0/0 whiteouts, whoever imports. Docker keeps them and
relies on the device cgroup; here a device node in the store would hand the host's device
to whoever can read the store, and a container gets its own /dev anyway. FIFOs are kept;
setuid and setgid bits are kept (images need them: ``su``, ``passwd``).
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from typing import IO, Callable, Dict, List, Set, Tuple

from .layers import (DIR_FLAGS, NOT_A_DIR, WH_OPAQUE, WH_PREFIX, LayerError, is_whiteout,
                     make_whiteout, open_dir_at, set_attrs_at, set_attrs_fd, set_opaque)

PATH_MAX = 4096
#: deeper than this is no honest image (and would strain the recursive tree walks)
MAX_DEPTH = 256
_MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "leave unchanged" to chown


class UnsafeLayer(LayerError):
    """A tarball entry that would reach outside the layer."""

    def __init__(self, source: str, entry: str, why: str) -> None:
        self.source, self.entry, self.why = source, entry, why
        super().__init__(f"refused {source}: entry {entry!r} {why}; nothing was imported")


def clean_name(name: str, source: str) -> List[str]:
    """A member name as path components, or UnsafeLayer. ``./a//b/`` -> ``[a, b]``."""
    if name.startswith("/"):
        raise UnsafeLayer(source, name, "is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(source, name, "climbs out of the root with '..'")
    if len(os.fsencode(name)) >= PATH_MAX or len(parts) > MAX_DEPTH:
        raise UnsafeLayer(source, name[:60] + "...", f"is longer than a path can be "
                          f"({PATH_MAX} bytes, {MAX_DEPTH} directories)")
    return parts


def _symlink_escapes(parts: List[str], target: str) -> bool:
    depth = 0 if target.startswith("/") else len(parts) - 1
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        depth = depth - 1 if comp == ".." else depth + 1
        if depth < 0:
            return True
    return False


Key = Tuple[str, ...]


class _Applier:
    def __init__(self, root: str, source: str) -> None:
        self.source = source
        self.root_fd = os.open(root, DIR_FLAGS)
        self.written: Set[Key] = set()  # paths this layer itself defines
        self.dirs: Dict[Key, tarfile.TarInfo] = {}  # attributes set at the end
        self.opaque: Dict[Key, None] = {}
        self.left_out: Dict[Key, str] = {}  # device nodes not created, and what they were

    def close(self) -> None:
        os.close(self.root_fd)

    # -- reaching directories -----------------------------------------------------------

    def _parent(self, parts: List[str], name: str) -> int:
        """An fd of the parent directory of ``parts``: every component a real directory
        of this layer (made where missing; a whiteout there is replaced), never a symlink."""
        fd = os.open(".", DIR_FLAGS, dir_fd=self.root_fd)
        try:
            for i, comp in enumerate(parts[:-1]):
                nfd = self._enter(fd, comp, parts[:i + 1], name)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _enter(self, fd: int, comp: str, sofar: List[str], name: str) -> int:
        try:
            return os.open(comp, DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            os.mkdir(comp, 0o755, dir_fd=fd)
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
            where = "/".join(sofar)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeLayer(self.source, name, f"goes through the symlink {where!r}") from None
            if not is_whiteout(st):
                raise UnsafeLayer(self.source, name, f"goes through the file {where!r}") from None
            os.unlink(comp, dir_fd=fd)  # deleted below, made again here
            os.mkdir(comp, 0o755, dir_fd=fd)
        return os.open(comp, DIR_FLAGS, dir_fd=fd)

    def _clear(self, dir_fd: int, name: str, key: Key, keep_dir: bool) -> bool:
        """Remove what ``name`` is in ``dir_fd`` (a directory only if not ``keep_dir``).
        Returns whether a directory is (still) there."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(name, dir_fd=dir_fd)  # fd-based: never follows a symlink
            self._forget(key)
        else:
            os.unlink(name, dir_fd=dir_fd)
        return False

    def _forget(self, key: Key) -> None:
        """A directory was removed: what was recorded for it and below it is void."""
        n = len(key)
        for table in (self.dirs, self.opaque):
            for k in [k for k in table if k[:n] == key]:
                del table[k]

    # -- entries ------------------------------------------------------------------------

    def apply(self, tar: tarfile.TarFile) -> None:
        for m in tar:
            try:
                self.member(tar, m)
            except OSError as err:
                raise LayerError(f"refused {self.source}: entry {m.name[:200]!r} cannot be "
                                 f"made: {err.strerror}; nothing was imported") from None
        for key in self.opaque:
            self._at_dir(key, set_opaque)
        for key in sorted(self.dirs, key=len, reverse=True):
            m = self.dirs[key]
            self._at_dir(key, lambda fd: set_attrs_fd(fd, m.mode, m.uid, m.gid, m.mtime))

    def _at_dir(self, key: Key, action: Callable[[int], None]) -> None:
        try:
            fd = open_dir_at(self.root_fd, key)
        except OSError as err:
            if err.errno in NOT_A_DIR:
                return  # replaced by a later entry (a symlink, maybe to the host): not ours
            raise
        try:
            action(fd)
        finally:
            os.close(fd)

    def member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = clean_name(m.name, self.source)
        if not parts:  # the root directory itself
            return
        for what, n in (("owner", m.uid), ("group", m.gid)):
            if not isinstance(n, int) or not 0 <= n <= _MAX_ID:
                raise UnsafeLayer(self.source, m.name, f"has an {what} id out of range ({n})")
        fd = self._parent(parts, m.name)
        try:
            self._member(tar, m, parts, fd)
        finally:
            os.close(fd)

    def _member(self, tar: tarfile.TarFile, m: tarfile.TarInfo, parts: List[str], pfd: int) -> None:
        base = parts[-1]
        key = tuple(parts)
        if base.startswith(WH_PREFIX):
            if base == WH_OPAQUE:
                self.opaque[key[:-1]] = None
            elif not base.startswith(WH_PREFIX + WH_PREFIX):  # .wh..wh.* are aufs internals
                hidden = base[len(WH_PREFIX):]
                if hidden in ("", ".", ".."):
                    raise UnsafeLayer(self.source, m.name, "is a whiteout of no file")
                hidden_key = key[:-1] + (hidden,)
                if hidden_key not in self.written:
                    self._clear(pfd, hidden, hidden_key, keep_dir=False)
                    make_whiteout(hidden, dir_fd=pfd)
            return
        self.written.add(key)
        self.left_out.pop(key, None)
        if m.isdir():
            if not self._clear(pfd, base, key, keep_dir=True):
                os.mkdir(base, 0o700, dir_fd=pfd)
            self.dirs[key] = m
            return
        if m.issym():
            if _symlink_escapes(parts, m.linkname):
                raise UnsafeLayer(self.source, m.name,
                                  f"is a symlink to {m.linkname!r}, which climbs above the root")
            self._clear(pfd, base, key, keep_dir=False)
            os.symlink(m.linkname, base, dir_fd=pfd)
            set_attrs_at(pfd, base, stat.S_IFLNK | m.mode, m.uid, m.gid, m.mtime)
        elif m.islnk():
            target = clean_name(m.linkname, self.source)
            if tuple(target) in self.left_out:  # another name of a device left out
                self._clear(pfd, base, key, keep_dir=False)
                self.written.discard(key)
                self.left_out[key] = f"{'/'.join(parts)} (a hard link to it)"
                return
            if target == parts:
                raise UnsafeLayer(self.source, m.name, "is a hard link to itself")
            tfd = self._existing_file(target, m)
            try:
                self._clear(pfd, base, key, keep_dir=False)
                os.link(target[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(tfd)
            # a hard link shares its target's attributes
        elif m.isreg():
            self._clear(pfd, base, key, keep_dir=False)
            src = tar.extractfile(m)
            assert src is not None
            _write(src, base, pfd, m)
        elif m.ischr() or m.isblk():
            self._clear(pfd, base, key, keep_dir=False)
            if m.ischr() and m.devmajor == 0 and m.devminor == 0:
                make_whiteout(base, dir_fd=pfd)  # an overlay-style whiteout (some tools export those)
                return
            self.written.discard(key)
            kind = "char" if m.ischr() else "block"
            self.left_out[key] = f"{'/'.join(parts)} ({kind} {m.devmajor}:{m.devminor})"
        elif m.isfifo():
            self._clear(pfd, base, key, keep_dir=False)
            os.mkfifo(base, 0o600, dir_fd=pfd)
            set_attrs_at(pfd, base, stat.S_IFIFO | m.mode, m.uid, m.gid, m.mtime)
        else:
            raise UnsafeLayer(self.source, m.name, f"has a tar type this importer does not "
                              f"know ({m.type!r})")

    def _existing_file(self, parts: List[str], m: tarfile.TarInfo) -> int:
        """An fd of the directory holding ``parts``, a regular file this layer wrote."""
        if not parts:
            raise UnsafeLayer(self.source, m.name, "is a hard link to the root")
        why = (f"is a hard link to {m.linkname!r}, which is not a file earlier in the "
               "same layer")
        if tuple(parts) not in self.written:
            raise UnsafeLayer(self.source, m.name, why)
        try:
            fd = open_dir_at(self.root_fd, parts[:-1])
        except OSError as err:
            if err.errno in NOT_A_DIR:
                raise UnsafeLayer(self.source, m.name, why) from None
            raise
        try:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise UnsafeLayer(self.source, m.name, why)
        return fd


def _write(src: IO[bytes], name: str, dir_fd: int, m: tarfile.TarInfo) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    with open(fd, "wb") as out:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)
        out.flush()
        set_attrs_fd(fd, m.mode, m.uid, m.gid, m.mtime)


def apply_tar(fileobj: IO[bytes], root: str, source: str) -> List[str]:
    """Apply the layer tar read from ``fileobj`` (plain, gzip, bzip2 or xz) to the empty
    directory ``root``. Returns the device nodes left out, as ``"dev/sda (block 8:0)"``."""
    applier = _Applier(root, source)
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", encoding="utf-8",
                          errors="surrogateescape") as tar:
            applier.apply(tar)
    except tarfile.TarError as err:
        raise LayerError(f"cannot read {source} as a layer tar: {err}") from None
    finally:
        applier.close()
    return list(applier.left_out.values())
