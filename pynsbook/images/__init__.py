"""Images and layers: a union filesystem you can see.

An image is an ordered stack of read-only layers (directories in the store, addressed by
the sha256 of their content) plus a small config (env, workdir, default command). A
container of an image gets the layers as overlayfs lower directories and a writable
container layer of its own in the store, so that what it changes can be listed (``diff``)
and kept as a new layer (``commit``) while it runs.

    >>> from pynsbook import images
    >>> images.import_busybox("busybox")                 # Debian's busybox-static
    >>> with pynsbook.Container("c1", image="busybox") as c:
    ...     c.exec("rm /etc/hostname; echo hi > /root/hi")
    ...     print(images.diff(c))                          # D /etc/hostname, C /root, A /root/hi
    ...     images.commit(c, "busybox-hi")
    >>> print(images.table()); print(images.layers_table("busybox-hi"))

For the notebook magics: ``table()`` (``%container images``), ``layers_table(IMAGE)``
(``%container layers IMAGE``), ``commit(container, IMAGE)`` (``%container commit NAME
IMAGE``), ``diff(container)`` (``%container diff NAME``). Each returns an object that
prints as text and renders as HTML. Importers and the debootstrap recipe: importers.py.
"""
from __future__ import annotations

import os
import shutil
import stat
import sys
import time
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..errors import OptionError
from . import changes as _changes
from . import layers as _layers
from .importers import import_archive, import_busybox, import_dir, import_path
from .layers import LayerError
from .store import Config, Image, ImageError, Store
from .tarlayer import UnsafeLayer
from .views import Diff, Table

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.container import Container

__all__ = ["Store", "Image", "Config", "ImageError", "LayerError", "UnsafeLayer", "Table", "Diff",
           "import_path", "import_dir", "import_busybox", "import_archive", "get", "names",
           "remove", "table", "layers_table", "commit", "diff", "attach", "release", "driver",
           "disk_usage", "materialize"]


class _Attached:
    """A running container's image and container layer."""

    def __init__(self, store: Store, image: Image, path: str) -> None:
        self.store, self.image, self.path = store, image, path


_ATTACHED: "weakref.WeakKeyDictionary[Container, _Attached]" = weakref.WeakKeyDictionary()


def _fmt(n: int) -> str:
    from ..spec import format_size
    return format_size(n)


# ---------------------------------------------------------------------------------------
# the engine's hook (Container.start / Container._cleanup)

def attach(container: "Container") -> None:
    """Give a container its image: the layers as ``lowers`` (top first), a container
    layer in the store as ``upper_dir``, the image's env and workdir under its own."""
    name = container.spec.image
    st = Store()
    with st.lock():
        try:
            image = st.get(name)  # type: ignore[arg-type]
        except (ImageError, OptionError):
            raise OptionError("image", name, "the name of an image in the store "
                              "(see `pynsbook images ls`)") from None
        path = st.new_container_dir(f"{container.name}-{container.id}", image, container.name)
    if driver()[0] == "copy":
        # no overlayfs here: the container runs on a private copy of the image instead
        # (slower to start and no diff/commit, but the image's layers stay untouched)
        container.copy_root = os.path.join(path, "root")
        os.mkdir(container.copy_root, 0o755)
        _layers.flatten([st.diff_dir(d) for d in image.layers], container.copy_root)
    else:
        container.lowers = st.image_lowers(image)
        container.upper_dir = path
    spec = container.spec
    container.spec = spec.replace(env=tuple(image.config.env.items()) + tuple(spec.env),
                                  workdir=spec.workdir or image.config.workdir)
    _ATTACHED[container] = _Attached(st, image, path)


def release(container: "Container") -> None:
    """Remove a stopped container's layer (commit it first to keep it)."""
    att = _ATTACHED.pop(container, None)
    if att is not None:
        _layers.rmtree(att.path)


def _attached(container: "Container", what: str) -> _Attached:
    att = _ATTACHED.get(container)
    if att is None:
        raise ImageError(f"cannot {what} {container.name!r}: it does not run on an image "
                         "(start it with image=NAME or --image NAME)")
    if getattr(container, "copy_root", None):
        raise ImageError(f"cannot {what} {container.name!r}: it runs on a copy of its image "
                         "(this host refuses overlayfs), which has no separate container layer")
    if not os.path.isdir(att.path) or not getattr(container, "running", True):
        raise ImageError(f"cannot {what} {container.name!r}: it has stopped and its "
                         "container layer is gone (commit before stopping)")
    return att


# ---------------------------------------------------------------------------------------
# what the magics, the CLI and users call

def get(name: str) -> Image:
    return Store().get(name)


def names() -> List[str]:
    return Store().names()


def remove(name: str) -> List[str]:
    """Remove image ``name``; returns the layers removed with it (those no other image uses)."""
    return Store().remove(name)


def disk_usage() -> int:
    """Bytes the store uses on disk, each file counted once (like ``du -s``)."""
    return Store().disk_usage()


def diff(container: "Container") -> Diff:
    """What a running container changed in its image: A(dded), C(hanged), D(eleted) paths."""
    att = _attached(container, "diff")
    lowers = [att.store.diff_dir(d) for d in att.image.layers]
    return Diff(_changes.changes(lowers, _changes.upper_of(att.path)))


def commit(container: "Container", image: str, message: str = "") -> Image:
    """Keep a running container's layer as a new image: its image's layers plus one."""
    from .store import check_name
    check_name(image)
    att = _attached(container, "commit")
    st = att.store
    upper = _changes.upper_of(att.path)

    def empty_mount_point(rel: str, s: os.stat_result) -> bool:
        return rel in _layers.MOUNT_POINTS and stat.S_ISDIR(s.st_mode) and \
            not os.listdir(os.path.join(upper, rel))

    with st.lock(), st.staging() as stage:
        st.require_new(image)
        diff_dir = os.path.join(stage, "l0", "diff")
        os.makedirs(diff_dir)
        left_out = _layers.copy_tree(upper, diff_dir, skip=empty_mount_point)
        base = att.image
        by = message or f"commit of container {container.name} (image {base.name})"
        digest = st.prepare_layer(diff_dir, by)
        has_files = bool(os.listdir(diff_dir))
        new = Image(name=image, layers=base.layers + ([digest] if has_files else []),
                    config=base.config, created=time.time(), source=by, parent=base.name)
        new = st.create_image(new, [(digest, diff_dir)] if has_files else [])
    if left_out:
        sys.stderr.write(_layers.describe_left_out(f"commit of {container.name}", left_out) + "\n")
    return new


def materialize(name: str, dest: str) -> str:
    """Flatten image ``name`` into the new directory ``dest`` (whiteouts and opaque
    directories applied): the copy fallback where overlayfs is refused, and a way to look
    at an image with ordinary tools. Usable as ``--rootfs dest``."""
    st = Store()
    image = st.get(name)
    os.mkdir(dest, 0o755)
    try:
        _layers.flatten([st.diff_dir(d) for d in image.layers], dest)
    except BaseException:
        _layers.rmtree(dest)
        raise
    return dest


def table() -> Table:
    """The images: layers, disk used, disk used by nobody else, default command."""
    st = Store()
    imgs = st.images()
    users: Dict[str, List[str]] = {}
    for im in imgs:
        for d in im.layers:
            users.setdefault(d, []).append(im.name)
    rows = []
    for im in imgs:
        own = [d for d in im.layers if len(users[d]) == 1]
        rows.append([im.name, len(im.layers), _fmt(st.layers_disk(im.layers)),
                     _fmt(st.layers_disk(own)), " ".join(im.config.cmd), im.parent or "",
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(im.created))])
    total = st.disk_usage() if os.path.isdir(st.root) else 0
    footer = (f"{len(imgs)} image(s), {len(users)} layer(s): {_fmt(total)} on disk in {st.root}"
              " (a layer shared by several images is stored once)")
    return Table(["IMAGE", "LAYERS", "SIZE", "UNIQUE", "CMD", "PARENT", "CREATED"], rows,
                 footer=footer)


def layers_table(name: str) -> Table:
    """An image's layers, top first: digest, size, files added/changed/deleted relative to
    the layers below, and which other images share the layer."""
    st = Store()
    image = st.get(name)
    _, counts = _changes.fold_layers([st.diff_dir(d) for d in image.layers])
    others = {d: [im.name for im in st.images() if im.name != name and d in im.layers]
              for d in image.layers}
    rows = []
    for i in reversed(range(len(image.layers))):
        d = image.layers[i]
        info = st.layer_info(d)
        c = counts[i]
        rows.append([d[:19], _fmt(st.layers_disk([d])), c["A"], c["C"], c["D"],
                     ", ".join(others[d]) or "-", info.created_by])
    return Table(["LAYER", "SIZE", "ADDED", "CHANGED", "DELETED", "SHARED WITH", "CREATED BY"],
                 rows, title=f"image {name}: {len(image.layers)} layer(s), top first")


def driver() -> Tuple[str, str]:
    """How image roots get mounted here: ``("overlay", why)`` or the missing fallback."""
    from .. import probe
    ok, reason, fix = probe.overlay()
    if os.environ.get("PYNSBOOK_IMAGE_DRIVER") == "copy":
        ok, reason, fix = False, "PYNSBOOK_IMAGE_DRIVER=copy", "unset PYNSBOOK_IMAGE_DRIVER"
    if ok:
        return ("overlay", "kernel overlayfs" + (" in a user namespace" if os.geteuid() else ""))
    return ("copy", f"the kernel overlay is refused ({reason}): each container gets a "
            f"private copy of its image (slower starts, no diff or commit; fix: {fix})")


def doctor_note() -> str:
    kind, why = driver()
    return f"images: {kind} ({why}); store {Store().root}"
