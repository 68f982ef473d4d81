"""The image store: content-addressed layers, named images, per-container layers.

Layout under ``${PYNSBOOK_STORE:-${XDG_DATA_HOME:-~/.local/share}/pynsbook}``::

    layers/<hex>/diff/          the layer's files, in overlay format (see layers.py)
    layers/<hex>/layer.json     digest, sizes, counts, where it came from
    images/<name>.json          {"name", "layers": [digest, ... bottom first], "config", ...}
    containers/<id>/            a running container's layer: upper/ and work/ (the engine
                                makes them) and owner.json (pid, image); removed at stop
    tmp/                        layers being built; moved into layers/ only when complete
    lock                        flock(2): one writer at a time

A layer is stored once however many images list it; an image is an ordered list of layer
digests plus a small config (env, workdir, cmd). Removing an image removes the layers no
other image (and no running container) uses. Every change is built in tmp/ and moved in
with rename(2), so a failed import leaves the store as it was.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from ..errors import OptionError, PynsbookError
from . import layers as L

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # as --name and --image take
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_FORM = ("an image name of letters, digits, '_', '.' and '-', starting with a letter or digit, "
             "at most 63 characters")


class ImageError(PynsbookError):
    """An image operation that cannot be done (a missing image, a name clash, ...)."""


def default_root() -> str:
    if os.environ.get("PYNSBOOK_STORE"):
        return os.path.abspath(os.path.expanduser(os.environ["PYNSBOOK_STORE"]))
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "pynsbook")


def check_name(name: str, label: str = "image name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise OptionError(label, name, NAME_FORM)
    return name


@dataclass
class Config:
    """What a container of this image starts with unless told otherwise."""

    env: Dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    cmd: List[str] = field(default_factory=lambda: ["/bin/sh"])

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        return cls(env=dict(d.get("env") or {}), workdir=d.get("workdir") or "/",
                   cmd=list(d.get("cmd") or ["/bin/sh"]))


@dataclass
class Image:
    name: str
    layers: List[str]  # digests, bottom layer first (as OCI manifests list them)
    config: Config
    created: float = 0.0
    source: str = ""
    parent: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["config"] = asdict(self.config)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Image":
        return cls(name=d["name"], layers=list(d["layers"]), config=Config.from_dict(d.get("config") or {}),
                   created=d.get("created", 0.0), source=d.get("source", ""), parent=d.get("parent"))


@dataclass
class LayerInfo:
    digest: str
    disk: int          # bytes on disk (du of diff/)
    tar_size: int      # bytes of the canonical tar
    files: int
    whiteouts: int
    opaque: int
    entries: int
    created: float
    created_by: str

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LayerInfo":
        return cls(**{k: d.get(k, 0 if k not in ("digest", "created_by") else "")
                      for k in cls.__dataclass_fields__})


class Store:
    """One image store on disk. Cheap to create; every method reads the disk afresh."""

    def __init__(self, root: Optional[str] = None) -> None:
        self.root = root or default_root()

    # -- paths -------------------------------------------------------------------------

    def _dir(self, name: str) -> str:
        path = os.path.join(self.root, name)
        os.makedirs(path, exist_ok=True)
        return path

    def layer_dir(self, digest: str) -> str:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or not _HEX_RE.match(hexd):
            raise ImageError(f"not a layer digest: {digest!r}")
        return os.path.join(self.root, "layers", hexd)

    def diff_dir(self, digest: str) -> str:
        return os.path.join(self.layer_dir(digest), "diff")

    def _image_path(self, name: str) -> str:
        return os.path.join(self.root, "images", check_name(name) + ".json")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        """A fresh directory under tmp/, removed afterwards whatever happens."""
        path = os.path.join(self._dir("tmp"), secrets.token_hex(8))
        os.mkdir(path, 0o700)
        try:
            yield path
        finally:
            L.rmtree(path)

    # -- images ------------------------------------------------------------------------

    def names(self) -> List[str]:
        d = os.path.join(self.root, "images")
        if not os.path.isdir(d):
            return []
        return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".json"))

    def exists(self, name: str) -> bool:
        return os.path.exists(self._image_path(name))

    def get(self, name: str) -> Image:
        try:
            with open(self._image_path(name)) as f:
                return Image.from_dict(json.load(f))
        except FileNotFoundError:
            raise ImageError(f"no image named {name!r} (see `pynsbook images ls`)") from None

    def images(self) -> List[Image]:
        out = []
        for n in self.names():
            try:
                out.append(self.get(n))
            except ImageError:
                continue  # removed meanwhile
        return out

    def require_new(self, name: str) -> None:
        if self.exists(name):
            raise ImageError(f"an image named {name!r} already exists "
                             f"(remove it with `pynsbook images rm {name}`, or pick another name)")

    def save(self, image: Image) -> None:
        """Write the image's JSON (refusing a name that exists): call under lock()."""
        self.require_new(image.name)
        for digest in image.layers:
            if not os.path.isdir(self.diff_dir(digest)):
                raise ImageError(f"image {image.name!r} lists a layer the store lacks: {digest}")
        path = self._image_path(image.name)
        self._dir("images")
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "w") as f:
            json.dump(image.to_dict(), f, indent=1)
        os.rename(tmp, path)

    def remove(self, name: str) -> List[str]:
        """Remove an image and the layers nothing else uses. Returns the removed digests."""
        with self.lock():
            image = self.get(name)
            users = [c for c, info in self.live_containers().items() if info.get("image") == name]
            if users:
                raise ImageError(f"image {name!r} is in use by running container(s) "
                                 f"{', '.join(users)}: stop them first")
            os.unlink(self._image_path(name))
            return self.gc(candidates=image.layers)

    # -- layers ------------------------------------------------------------------------

    def prepare_layer(self, diff: str, created_by: str, skip_mount_points: bool = False) -> str:
        """Digest the layer directory ``diff`` (``<staging>/<any>/diff``) and write its
        layer.json beside it. Nothing in the store changes until ``add_layers``."""
        if os.path.basename(diff) != "diff":
            raise ValueError("a prepared layer lives in a directory named diff")
        digest, counts = L.digest_dir(diff, skip_mount_points)
        info = {"digest": digest, "disk": L.disk_usage([diff]), "tar_size": counts["tar_size"],
                "files": counts["files"], "whiteouts": counts["whiteouts"],
                "opaque": counts["opaque"], "entries": counts["entries"],
                "created": time.time(), "created_by": created_by}
        with open(os.path.join(os.path.dirname(diff), "layer.json"), "w") as f:
            json.dump(info, f, indent=1)
        return digest

    def add_layers(self, prepared: List[Tuple[str, str]]) -> List[str]:
        """Move prepared ``(digest, diff)`` layers into layers/ (those the store lacks).
        Returns the digests that are new. Call under lock()."""
        new = []
        self._dir("layers")
        for digest, diff in prepared:
            target = self.layer_dir(digest)
            if os.path.isdir(os.path.join(target, "diff")) or digest in new:
                continue
            L.rmtree(target)  # a half-made layer from a crash (no diff/): replace it
            os.rename(os.path.dirname(diff), target)
            new.append(digest)
        return new

    def create_image(self, image: Image, prepared: List[Tuple[str, str]]) -> Image:
        """Store the prepared layers and the image, all or nothing. Call under lock()."""
        self.require_new(image.name)
        new = self.add_layers(prepared)
        try:
            self.save(image)
        except BaseException:
            self.gc(candidates=new)
            raise
        return image

    def layer_info(self, digest: str) -> LayerInfo:
        with open(os.path.join(self.layer_dir(digest), "layer.json")) as f:
            return LayerInfo.from_dict(json.load(f))

    def layer_digests(self) -> List[str]:
        d = os.path.join(self.root, "layers")
        if not os.path.isdir(d):
            return []
        return sorted("sha256:" + h for h in os.listdir(d) if _HEX_RE.match(h))

    def gc(self, candidates: Optional[List[str]] = None) -> List[str]:
        """Remove layers no image and no running container lists. Call under lock()."""
        used: Set[str] = set()
        for image in self.images():
            used.update(image.layers)
        for info in self.live_containers().values():
            used.update(info.get("layers", []))
        removed = []
        for digest in (candidates if candidates is not None else self.layer_digests()):
            if digest not in used and os.path.isdir(self.layer_dir(digest)):
                L.rmtree(self.layer_dir(digest))
                removed.append(digest)
        return removed

    def image_lowers(self, image: Image) -> List[str]:
        """The image's layer directories, TOP layer first (overlayfs's lowerdir order)."""
        return [self.diff_dir(d) for d in reversed(image.layers)]

    # -- container layers ----------------------------------------------------------------

    def new_container_dir(self, cid: str, image: Image, container_name: str) -> str:
        self.sweep_containers()
        path = os.path.join(self._dir("containers"), cid)
        os.mkdir(path, 0o700)
        with open(os.path.join(path, "owner.json"), "w") as f:
            json.dump({"pid": os.getpid(), "start": _start_time(os.getpid()),
                       "image": image.name, "layers": image.layers, "name": container_name}, f)
        return path

    def live_containers(self) -> Dict[str, Dict[str, Any]]:
        """Container layers whose owning process still runs, by container directory name."""
        out = {}
        base = os.path.join(self.root, "containers")
        for cid in (os.listdir(base) if os.path.isdir(base) else []):
            info = _owner(os.path.join(base, cid))
            if info is not None and _alive(info):
                out[cid] = info
        return out

    def sweep_containers(self) -> None:
        """Remove container layers left behind by processes that died without stopping."""
        base = os.path.join(self.root, "containers")
        for cid in (os.listdir(base) if os.path.isdir(base) else []):
            path = os.path.join(base, cid)
            info = _owner(path)
            if info is not None and not _alive(info):
                L.rmtree(path)

    # -- disk --------------------------------------------------------------------------

    def disk_usage(self) -> int:
        """Bytes the whole store uses on disk, each inode once (like ``du -s``)."""
        return L.disk_usage([self.root])

    def layers_disk(self, digests: List[str], seen: Optional[Set[Tuple[int, int]]] = None) -> int:
        return L.disk_usage([self.layer_dir(d) for d in digests], seen)


def _owner(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(path, "owner.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _start_time(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except OSError:
        return None


def _alive(info: Dict[str, Any]) -> bool:
    pid = info.get("pid")
    return isinstance(pid, int) and _start_time(pid) is not None and _start_time(pid) == info.get("start")
