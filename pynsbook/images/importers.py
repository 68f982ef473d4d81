"""Importers: where images come from.

- ``import_busybox(name)``: a minimal image made of Debian's busybox-static (one static
  binary and a symlink per applet), an /etc/passwd and the usual directories.
- ``import_dir(path, name, base=None)``: any directory as one layer; with ``base`` the
  layer goes on top of that image's layers (like a Dockerfile ``COPY``).
- ``import_archive(path, name)``: an OCI image layout (``oci-layout``, ``index.json``,
  ``blobs/``) or a ``docker save`` tarball (``manifest.json``), as a directory or a tar
  file: each layer applied in order to a layer directory of its own, whiteouts and opaque
  directories honoured (tarlayer.py), the config's Env, Entrypoint+Cmd and WorkingDir kept.
- ``import_path(path, name)`` picks one of the last two.

A Debian image, with debootstrap (``apt-get install debootstrap``; as root)::

    debootstrap --variant=minbase bookworm /var/tmp/bookworm http://deb.debian.org/debian
    pynsbook images import /var/tmp/bookworm debian
    pynsbook run --image debian -- cat /etc/debian_version

and a layer on top of it, from a container's changes (Python API; the notebook has
``%container commit``)::

    with pynsbook.Container("build", image="debian", net="host") as c:
        c.exec("apt-get update && apt-get install -y --no-install-recommends python3")
        pynsbook.images.commit(c, "debian-python")
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from typing import IO, Any, Dict, List, Optional, Tuple

from . import layers as L
from .store import Config, Image, ImageError, Store, check_name
from .tarlayer import apply_tar, clean_name

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_BUSYBOX_DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "home", "var",
                 "var/tmp", "tmp") + L.MOUNT_POINTS
_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"


# ---------------------------------------------------------------------------------------
# busybox

def find_busybox() -> str:
    """Debian's static busybox (package busybox-static), or ImageError saying how to get it."""
    for path in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""):
        if path and os.path.isfile(path) and is_static_elf(path):
            return os.path.realpath(path)
    raise ImageError("no static busybox found (a dynamic one would need the host's libraries "
                     "in the image): apt-get install busybox-static")


def is_static_elf(path: str) -> bool:
    """An ELF file without an interpreter (PT_INTERP): runs in an empty root."""
    import struct
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def import_busybox(name: str = "busybox", store: Optional[Store] = None) -> Image:
    store = store or Store()
    check_name(name)
    binary = find_busybox()
    applets = subprocess.run([binary, "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    with store.lock(), store.staging() as stage:
        store.require_new(name)
        diff = os.path.join(stage, "l0", "diff")
        os.makedirs(diff)
        for d in _BUSYBOX_DIRS:
            os.makedirs(os.path.join(diff, d), exist_ok=True)
            os.chmod(os.path.join(diff, d), 0o1777 if d in ("tmp", "var/tmp") else
                     0o700 if d == "root" else 0o755)
        shutil.copyfile(binary, os.path.join(diff, "bin/busybox"))
        os.chmod(os.path.join(diff, "bin/busybox"), 0o755)
        for applet in applets:
            parts = clean_name(applet, binary)
            if parts == ["bin", "busybox"] or len(parts) < 2:
                continue  # linuxrc and the binary itself
            os.makedirs(os.path.join(diff, *parts[:-1]), exist_ok=True)
            link = os.path.join(diff, *parts)
            if not os.path.lexists(link):
                os.symlink("/bin/busybox", link)
        for fname, text in (("etc/passwd", _PASSWD), ("etc/group", _GROUP),
                            ("etc/hostname", "busybox\n")):
            with open(os.path.join(diff, fname), "w") as f:
                f.write(text)
            os.chmod(os.path.join(diff, fname), 0o644)
        version = subprocess.run([binary], capture_output=True, text=True).stdout.split("\n")[0]
        digest = store.prepare_layer(diff, f"busybox from {binary}: {version.strip()}")
        image = Image(name=name, layers=[digest], created=time.time(),
                      config=Config(env={"PATH": DEFAULT_PATH}, workdir="/", cmd=["/bin/sh"]),
                      source=f"busybox ({binary})")
        return store.create_image(image, [(digest, diff)])


# ---------------------------------------------------------------------------------------
# a directory

def import_dir(path: str, name: str, base: Optional[str] = None, store: Optional[Store] = None,
               config: Optional[Config] = None) -> Image:
    """The directory ``path`` as one layer (on top of image ``base`` if given)."""
    store = store or Store()
    check_name(name)
    src = os.path.abspath(path)
    if not os.path.isdir(src):
        raise ImageError(f"cannot import {path}: not a directory")
    with store.lock(), store.staging() as stage:
        store.require_new(name)
        below = store.get(base) if base else None
        diff = os.path.join(stage, "l0", "diff")
        os.makedirs(diff)
        try:
            left_out = L.copy_tree(src, diff, opaque=False)
        except PermissionError as err:
            raise ImageError(f"cannot import {path}: {err.strerror}: {err.filename} "
                             "(import it as root, or make it readable)") from None
        root_st = os.stat(src)
        L.set_attrs(diff, root_st.st_mode, root_st.st_uid, root_st.st_gid, None)
        digest = store.prepare_layer(diff, f"directory {src}")
        cfg = config or (below.config if below else Config(env={"PATH": DEFAULT_PATH}))
        image = Image(name=name, layers=(below.layers if below else []) + [digest],
                      config=cfg, created=time.time(), source=f"directory {src}",
                      parent=base)
        image = store.create_image(image, [(digest, diff)])
    if left_out:
        sys.stderr.write(L.describe_left_out(f"import of {src}", left_out) + "\n")
    return image


# ---------------------------------------------------------------------------------------
# OCI image layouts and docker save tarballs

class _Bundle:
    """Files of an OCI layout or docker-save export, in a directory or a tar file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tar: Optional[tarfile.TarFile] = None
        self.members: Dict[str, tarfile.TarInfo] = {}
        if os.path.isfile(path):
            try:
                self.tar = tarfile.open(path, "r:*")
            except tarfile.TarError as err:
                raise ImageError(f"cannot import {path}: not a tar archive ({err})") from None
            for m in self.tar.getmembers():
                key = "/".join(p for p in m.name.split("/") if p not in ("", "."))
                self.members[key] = m
        elif not os.path.isdir(path):
            raise ImageError(f"cannot import {path}: no such file or directory")

    def close(self) -> None:
        if self.tar:
            self.tar.close()

    def exists(self, name: str) -> bool:
        if self.tar:
            return name in self.members
        return os.path.isfile(os.path.join(self.path, name))

    def open(self, name: str, hops: int = 0) -> IO[bytes]:
        parts = clean_name(name, self.path)
        key = "/".join(parts)
        if self.tar is None:
            return self._open_in_dir(parts, name)
        m = self.members.get(key)
        if m is None:
            raise ImageError(f"cannot import {self.path}: it has no {name}")
        if m.issym() and hops < 4:  # docker save links repeated layers to the first copy
            target = m.linkname if m.linkname.startswith("/") else \
                "/".join(parts[:-1] + [m.linkname])
            return self.open("/".join(_normalize(target)), hops + 1)
        f = self.tar.extractfile(m) if m.isreg() else None
        if f is None:
            raise ImageError(f"cannot import {self.path}: {name} is not a file")
        return f

    def _open_in_dir(self, parts: List[str], name: str) -> IO[bytes]:
        """Open ``parts`` below the layout directory for reading. Its symlinks (docker save
        links repeated layers to the first copy) are followed by hand, one component at a
        time, only while they stay inside; the kernel never follows one (O_NOFOLLOW), so a
        link swapped in meanwhile makes the open fail rather than leave the layout."""
        outside = ImageError(f"cannot import {self.path}: {name} points outside it")
        real_top = os.path.realpath(self.path)
        fds = [os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
        todo, hops = list(parts), 0
        try:
            while todo:
                comp = todo.pop(0)
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if len(fds) == 1:
                        raise outside
                    os.close(fds.pop())
                    continue
                st = os.stat(comp, dir_fd=fds[-1], follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > 40:
                        raise ImageError(f"cannot import {self.path}: {name}: too many symlinks")
                    target = os.readlink(comp, dir_fd=fds[-1])
                    if target.startswith("/"):  # only an absolute name of a path inside
                        if not (target + "/").startswith(real_top + "/"):
                            raise outside
                        while len(fds) > 1:
                            os.close(fds.pop())
                        target = target[len(real_top):]
                    todo = target.split("/") + todo
                    continue
                if todo:
                    fds.append(os.open(comp, L.DIR_FLAGS, dir_fd=fds[-1]))
                    continue
                fd = os.open(comp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=fds[-1])
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise ImageError(f"cannot import {self.path}: {name} is not a file")
                return open(fd, "rb")
            raise ImageError(f"cannot import {self.path}: {name} is not a file")
        except FileNotFoundError:
            raise ImageError(f"cannot import {self.path}: it has no {name}") from None
        except OSError as err:
            raise ImageError(f"cannot import {self.path}: cannot open {name}: {err.strerror}") from None
        finally:
            for fd in fds:
                os.close(fd)

    def json(self, name: str) -> Any:
        with self.open(name) as f:
            try:
                return json.load(f)
            except ValueError as err:
                raise ImageError(f"cannot import {self.path}: {name} is not JSON ({err})") from None


def _normalize(path: str) -> List[str]:
    out: List[str] = []
    for p in path.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if out:
                out.pop()
            continue
        out.append(p)
    return out


class _HashingReader:
    """Reads a file object and hashes what passed, to check a blob against its digest."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return "sha256:" + self.sha.hexdigest()


_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _blob(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise ImageError(f"unsupported blob digest {digest!r} (sha256 only)")
    return f"blobs/sha256/{hexd}"


def _pick(manifests: List[Dict[str, Any]], path: str) -> Dict[str, Any]:
    if not manifests:
        raise ImageError(f"cannot import {path}: its index lists no image")
    for m in manifests:
        plat = m.get("platform") or {}
        if plat.get("os", "linux") == "linux" and plat.get("architecture", _ARCH) == _ARCH:
            return m
    raise ImageError(f"cannot import {path}: no image for linux/{_ARCH} in it")


def _read_layout(b: _Bundle) -> Tuple[List[Tuple[str, Optional[str], str]], Dict[str, Any]]:
    """(layers as (member, expected digest or None, media type), image config JSON)."""
    if b.exists("manifest.json"):  # docker save (newer ones also write an OCI index)
        entries = b.json("manifest.json")
        if not isinstance(entries, list) or not entries:
            raise ImageError(f"cannot import {b.path}: manifest.json lists no image")
        entry = entries[0]
        cfg = b.json(entry["Config"])
        return [(name, None, "") for name in entry.get("Layers", [])], cfg
    if b.exists("index.json"):
        desc = _pick(b.json("index.json").get("manifests", []), b.path)
        for _ in range(4):
            if desc.get("mediaType") not in _INDEX_TYPES:
                break
            desc = _pick(b.json(_blob(desc["digest"])).get("manifests", []), b.path)
        manifest = b.json(_blob(desc["digest"]))
        cfg = b.json(_blob(manifest["config"]["digest"]))
        return [(_blob(layer["digest"]), layer["digest"], layer.get("mediaType", ""))
                for layer in manifest.get("layers", [])], cfg
    raise ImageError(f"cannot import {b.path}: neither an OCI image layout (index.json) nor "
                     "a docker save archive (manifest.json), nor a directory to import")


def _config(cfg: Dict[str, Any]) -> Config:
    c = cfg.get("config") or cfg.get("container_config") or {}
    env = {}
    for item in c.get("Env") or []:
        k, _, v = item.partition("=")
        env[k] = v
    env.setdefault("PATH", DEFAULT_PATH)
    cmd = list(c.get("Entrypoint") or []) + list(c.get("Cmd") or [])
    return Config(env=env, workdir=c.get("WorkingDir") or "/", cmd=cmd or ["/bin/sh"])


def import_archive(path: str, name: str, store: Optional[Store] = None) -> Image:
    """An OCI image layout or docker-save export (a directory or a tar file)."""
    store = store or Store()
    check_name(name)
    b = _Bundle(path)
    try:
        with store.lock(), store.staging() as stage:
            store.require_new(name)
            layer_list, cfg = _read_layout(b)
            prepared: List[Tuple[str, str]] = []
            left_out: List[str] = []
            for i, (member, expected, media) in enumerate(layer_list):
                if "zstd" in media:
                    raise ImageError(f"cannot import {path}: layer {i + 1} is zstd-compressed, "
                                     "which this Python cannot read (re-export it with gzip)")
                diff = os.path.join(stage, f"l{i}", "diff")
                os.makedirs(diff)
                label = f"{os.path.basename(path)}, layer {i + 1}"
                with b.open(member) as raw:
                    reader = _HashingReader(raw)
                    left_out += [f"{e} in layer {i + 1}" for e in
                                 apply_tar(reader, diff, label)]  # type: ignore[arg-type]
                    got = reader.drain()
                if expected and got != expected:
                    raise ImageError(f"cannot import {path}: layer {i + 1} does not match its "
                                     f"digest ({got[:19]}… instead of {expected[:19]}…)")
                digest = store.prepare_layer(diff, f"{label} ({expected or member})")
                if store_entries(diff) == 0:
                    continue  # an empty layer (an ENV or LABEL step): nothing to stack
                prepared.append((digest, diff))
            image = Image(name=name, layers=[d for d, _ in prepared], config=_config(cfg),
                          created=time.time(), source=os.path.abspath(path))
            if not image.layers:
                raise ImageError(f"cannot import {path}: the image has no files")
            image = store.create_image(image, prepared)
    finally:
        b.close()
    if left_out:
        sys.stderr.write(L.describe_left_out(f"import of {os.path.basename(path)}", left_out) + "\n")
    return image


def store_entries(diff: str) -> int:
    with open(os.path.join(os.path.dirname(diff), "layer.json")) as f:
        return int(json.load(f)["entries"])


def import_path(path: str, name: str, base: Optional[str] = None,
                store: Optional[Store] = None) -> Image:
    """A directory holding a root filesystem, or an OCI layout / docker save (dir or tar)."""
    if os.path.isdir(path) and not (os.path.exists(os.path.join(path, "index.json")) or
                                    os.path.exists(os.path.join(path, "manifest.json"))):
        return import_dir(path, name, base=base, store=store)
    if base:
        raise ImageError("--base goes with a directory import; an OCI or docker archive "
                         "brings all its layers")
    return import_archive(path, name, store=store)

