"""Turn one OCI layer tar (a changeset) into a layer directory, refusing what could escape.

The tar is applied to an empty directory, never onto files of other layers: each layer
stays its own overlay lower directory. OCI whiteouts become overlay whiteouts:

- ``DIR/.wh.NAME``   -> a 0/0 character device ``DIR/NAME`` (unless this same layer also
  has ``DIR/NAME``: a whiteout only hides what lower layers have);
- ``DIR/.wh..wh..opq`` -> ``DIR`` is marked opaque (whatever its position in the tar).

Refused, with one line naming the entry (the caller then discards the whole layer):
- a name that is absolute or has a ``..`` component;
- a hard link whose target is not a regular file earlier in the same tar (``..``, absolute,
  or a lower layer's file);
- a symlink whose target climbs above the root (``../../..`` from where it is, or an
  absolute ``/../..``); an ordinary absolute symlink such as ``/bin/sh -> /bin/busybox``
  stays: it points inside the container's root, and nothing here ever follows a symlink;
- an entry whose path goes through a symlink (``d -> /etc`` then ``d/passwd``) or through
  a file: extraction would write outside the layer.
"""
from __future__ import annotations

import os
import stat
import tarfile
from typing import IO, Dict, List, Set, Tuple

from .layers import (WH_OPAQUE, WH_PREFIX, LayerError, is_whiteout, make_whiteout, rmtree,
                     set_attrs, set_opaque)


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


class _Applier:
    def __init__(self, root: str, source: str) -> None:
        self.root = root
        self.source = source
        self.written: Set[Tuple[str, ...]] = set()  # paths this layer itself defines
        self.dirs: Dict[str, tarfile.TarInfo] = {}  # attributes set at the end
        self.opaque: List[str] = []
        self.skipped_devices = 0

    def _parent(self, parts: List[str], name: str) -> str:
        """Make sure every parent of ``parts`` is a real directory of this layer."""
        path = self.root
        for comp in parts[:-1]:
            path = os.path.join(path, comp)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeLayer(self.source, name, f"goes through the symlink "
                                  f"{os.path.relpath(path, self.root)!r}")
            if is_whiteout(st):  # deleted below, made again here
                os.unlink(path)
                os.mkdir(path, 0o755)
            elif not stat.S_ISDIR(st.st_mode):
                raise UnsafeLayer(self.source, name, f"goes through the file "
                                  f"{os.path.relpath(path, self.root)!r}")
        return path

    def _clear(self, path: str, keep_dir: bool) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if not keep_dir:
                rmtree(path)
        else:
            os.unlink(path)

    def apply(self, tar: tarfile.TarFile) -> None:
        for m in tar:
            self.member(tar, m)
        for path in self.opaque:
            set_opaque(path)
        for path in sorted(self.dirs, key=len, reverse=True):
            m = self.dirs[path]
            set_attrs(path, stat.S_IFDIR | m.mode, m.uid, m.gid, m.mtime)

    def member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = clean_name(m.name, self.source)
        if not parts:  # the root directory itself
            return
        base = parts[-1]
        if base.startswith(WH_PREFIX):
            parent = self._parent(parts, m.name)
            if base == WH_OPAQUE:
                self.opaque.append(parent)
            elif not base.startswith(WH_PREFIX + WH_PREFIX):  # .wh..wh.* are aufs internals
                hidden = base[len(WH_PREFIX):]
                if hidden in ("", ".", ".."):
                    raise UnsafeLayer(self.source, m.name, "is a whiteout of no file")
                key = tuple(parts[:-1] + [hidden])
                if key not in self.written:
                    target = os.path.join(parent, hidden)
                    self._clear(target, keep_dir=False)
                    make_whiteout(target)
            return
        parent = self._parent(parts, m.name)
        path = os.path.join(parent, base)
        self.written.add(tuple(parts))
        if m.isdir():
            self._clear(path, keep_dir=True)
            if not os.path.isdir(path) or os.path.islink(path):
                os.mkdir(path, 0o700)
            self.dirs[path] = m
            return
        if m.issym():
            if _symlink_escapes(parts, m.linkname):
                raise UnsafeLayer(self.source, m.name,
                                  f"is a symlink to {m.linkname!r}, which climbs above the root")
            self._clear(path, keep_dir=False)
            os.symlink(m.linkname, path)
        elif m.islnk():
            target_parts = clean_name(m.linkname, self.source)
            target = self._existing_file(target_parts, m)
            self._clear(path, keep_dir=False)
            os.link(target, path)
            return  # a hard link shares its target's attributes
        elif m.isreg():
            self._clear(path, keep_dir=False)
            src = tar.extractfile(m)
            assert src is not None
            _write(src, path)
        elif m.ischr() or m.isblk():
            self._clear(path, keep_dir=False)
            if m.ischr() and m.devmajor == 0 and m.devminor == 0:
                make_whiteout(path)  # an overlay-style whiteout (some tools export those)
                return
            if os.geteuid() != 0:
                self.skipped_devices += 1
                return
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(path, kind | m.mode, os.makedev(m.devmajor, m.devminor))
        elif m.isfifo():
            self._clear(path, keep_dir=False)
            os.mkfifo(path)
        else:
            raise UnsafeLayer(self.source, m.name, f"has a tar type this importer does not "
                              f"know ({m.type!r})")
        mode = {tarfile.SYMTYPE: stat.S_IFLNK}.get(m.type, stat.S_IFREG) | m.mode
        set_attrs(path, mode, m.uid, m.gid, m.mtime)

    def _existing_file(self, parts: List[str], m: tarfile.TarInfo) -> str:
        if not parts:
            raise UnsafeLayer(self.source, m.name, "is a hard link to the root")
        path = self.root
        for comp in parts:
            path = os.path.join(path, comp)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                break
            if stat.S_ISLNK(st.st_mode):
                break
        else:
            if stat.S_ISREG(st.st_mode) and tuple(parts) in self.written:
                return path
        raise UnsafeLayer(self.source, m.name, f"is a hard link to {m.linkname!r}, which is "
                          "not a file earlier in the same layer")


def _write(src: IO[bytes], path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as out:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)


def apply_tar(fileobj: IO[bytes], root: str, source: str) -> int:
    """Apply the layer tar read from ``fileobj`` (plain, gzip, bzip2 or xz) to the empty
    directory ``root``. Returns how many device nodes had to be left out (not root)."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", encoding="utf-8",
                          errors="surrogateescape") as tar:
            applier = _Applier(root, source)
            applier.apply(tar)
    except tarfile.TarError as err:
        raise LayerError(f"cannot read {source} as a layer tar: {err}") from None
    return applier.skipped_devices
