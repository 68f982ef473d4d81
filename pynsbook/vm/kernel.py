"""Find a Linux kernel for the microVM: Debian's package, unpacked without installing, or
a kernel the user names.

A Debian kernel package is fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` into the cache (``$PYNSBOOK_VM_CACHE``, else
``${XDG_CACHE_HOME:-~/.cache}/pynsbook/vm``), so nothing is installed on the host and
the host's own kernel is untouched. The compressed ``vmlinuz`` is also unpacked to an ELF
``vmlinux`` when Python can decompress it: QEMU boots that directly through its PVH entry,
which saves seconds of in-guest decompression under software emulation.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .errors import KernelNotFound, VMSetupError

#: Debian's metapackage that always depends on the current kernel image package.
DEFAULT_META_PACKAGE = "linux-image-amd64"


@dataclass(frozen=True)
class Kernel:
    """A kernel to boot: the image QEMU loads and the modules tree that matches it."""

    image: Path
    release: str
    modules_dir: Optional[Path] = None
    config: Optional[Path] = None
    pvh: bool = False  #: ``image`` is an uncompressed ELF with a PVH entry point

    def describe(self) -> str:
        """One line for logs: release, image kind and where it lives."""
        kind = "vmlinux (PVH)" if self.pvh else "bzImage"
        return f"Linux {self.release}, {kind} {self.image}"


def cache_dir() -> Path:
    """Where kernels and initramfs images are kept between runs (created if missing)."""
    env = os.environ.get("PYNSBOOK_VM_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base).expanduser() / "pynsbook" / "vm"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(name: str = "lock") -> Iterator[None]:
    """Serialise cache writers (two lanes fetching the same kernel at once)."""
    lock_path = cache_dir() / f".{name}"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- Debian package


def default_package() -> str:
    """The kernel image package that ``linux-image-amd64`` currently depends on.

    Asks the local apt cache only (no network). ``$PYNSBOOK_VM_KERNEL_PACKAGE`` overrides.
    """
    env = os.environ.get("PYNSBOOK_VM_KERNEL_PACKAGE")
    if env:
        return env
    if shutil.which("apt-cache") is None:
        raise VMSetupError("apt-cache not found: pass a kernel path (--kernel) instead")
    proc = subprocess.run(
        ["apt-cache", "depends", DEFAULT_META_PACKAGE],
        capture_output=True, text=True, check=False,
    )
    found = re.findall(r"Depends:\s*(linux-image-[0-9][^\s<>]*)", proc.stdout)
    if proc.returncode != 0 or not found:
        cached = sorted(_cached_packages())
        if cached:
            return cached[-1]
        raise VMSetupError(
            f"cannot tell which kernel package {DEFAULT_META_PACKAGE} depends on "
            f"(apt-cache: {proc.stderr.strip() or 'no Depends line'}); "
            "run `apt-get update` or set PYNSBOOK_VM_KERNEL_PACKAGE"
        )
    return found[0]


def _cached_packages() -> Iterator[str]:
    root = cache_dir() / "kernels"
    if root.is_dir():
        for child in root.iterdir():
            if (child / ".complete").exists():
                yield child.name


def fetch_kernel(package: Optional[str] = None) -> Kernel:
    """Download and unpack a Debian kernel package into the cache, once; return it.

    ``package`` defaults to :func:`default_package`. A cached copy is reused without
    touching the network.
    """
    package = package or default_package()
    if not re.fullmatch(r"linux-image-[A-Za-z0-9.+~-]+", package):
        raise KernelNotFound(f"not a kernel package name: {package!r}")
    dest = cache_dir() / "kernels" / package
    with cache_lock("kernels"):
        if not (dest / ".complete").exists():
            _download_and_unpack(package, dest)
    return kernel_from_path(dest)


def _download_and_unpack(package: str, dest: Path) -> None:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise VMSetupError(f"{tool} not found: fetching a Debian kernel needs apt and dpkg")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pynsbook-vm-deb-", dir=dest.parent) as tmp:
        # apt drops privileges to _apt for downloads; let it write here.
        os.chmod(tmp, 0o777)
        proc = subprocess.run(
            ["apt-get", "download", "-q", package],
            cwd=tmp, capture_output=True, text=True, check=False,
        )
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or not debs:
            raise VMSetupError(
                f"`apt-get download {package}` failed: "
                f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no .deb']}"
            )
        unpack = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpack)], check=True)
        if dest.exists():
            shutil.rmtree(dest)
        unpack.rename(dest)
    kernel = kernel_from_path(dest)
    (dest / ".complete").write_text(kernel.release + "\n")


# --------------------------------------------------------------------------- user kernels


def kernel_from_path(path: "str | os.PathLike[str]", modules_dir: "str | os.PathLike[str] | None" = None) -> Kernel:
    """Describe the kernel at ``path``: a ``vmlinuz``/``bzImage``/``vmlinux`` file, or the
    root of an unpacked kernel package (with ``boot/vmlinuz-*`` and ``lib/modules/*``).

    Raises :class:`KernelNotFound` (a ``ValueError``) when there is no kernel there.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise KernelNotFound(f"kernel not found: {p} does not exist")
    root: Optional[Path] = None
    if p.is_dir():
        images = sorted((p / "boot").glob("vmlinuz-*")) or sorted(p.glob("vmlinuz*"))
        if not images:
            raise KernelNotFound(f"kernel not found: no boot/vmlinuz-* in directory {p}")
        root, image = p, images[-1]
    else:
        image = p
        if image.parent.name == "boot":
            root = image.parent.parent
    head = _read_head(image)
    if not (head[:4] == b"\x7fELF" or _is_bzimage(head)):
        raise KernelNotFound(f"not a kernel image (neither bzImage nor ELF): {image}")
    release = _release_from_name(image) or _release_from_bzimage(image) or "unknown"

    mods: Optional[Path] = Path(modules_dir).expanduser() if modules_dir else None
    if mods is not None and not mods.is_dir():
        raise KernelNotFound(f"modules directory not found: {mods}")
    if mods is None and root is not None and (root / "lib/modules" / release).is_dir():
        mods = root / "lib/modules" / release
    config = None
    if root is not None and (root / "boot" / f"config-{release}").exists():
        config = root / "boot" / f"config-{release}"

    if head[:4] == b"\x7fELF":
        return Kernel(image, release, mods, config, pvh=_has_pvh_note(image))
    vmlinux = _cached_vmlinux(image, release)
    if vmlinux is not None:
        return Kernel(vmlinux, release, mods, config, pvh=True)
    return Kernel(image, release, mods, config, pvh=False)


def _read_head(path: Path, size: int = 0x400) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError as err:
        raise KernelNotFound(f"cannot read kernel {path}: {err.strerror}") from err


def _is_bzimage(head: bytes) -> bool:
    return len(head) >= 0x206 and head[0x202:0x206] == b"HdrS"


def _release_from_name(image: Path) -> Optional[str]:
    m = re.match(r"(?:vmlinuz|vmlinux|bzImage)-(.+)$", image.name)
    return m.group(1) if m else None


def _release_from_bzimage(image: Path) -> Optional[str]:
    """The release string a bzImage carries in its setup header (``kernel_version``)."""
    head = _read_head(image, 0x8000)
    if not _is_bzimage(head):
        return None
    (ptr,) = struct.unpack_from("<H", head, 0x20E)
    start = ptr + 0x200
    if ptr == 0 or start >= len(head):
        return None
    text = head[start:start + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    return text.split(" ", 1)[0] or None


# --------------------------------------------------------------------------- vmlinux (PVH)


def _cached_vmlinux(image: Path, release: str) -> Optional[Path]:
    """An ELF vmlinux unpacked from ``image`` (kept beside it in the cache), or None when
    the payload's compression is one Python cannot undo (lz4, zstd...) or it lacks PVH."""
    st = image.stat()
    out = cache_dir() / "vmlinux" / f"vmlinux-{release}-{st.st_size}-{int(st.st_mtime)}"
    if out.exists():
        return out
    data = image.read_bytes()
    payload = _bzimage_payload(data)
    if payload is None:
        return None
    elf = _decompress(payload)
    if elf is None or elf[:4] != b"\x7fELF":
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(elf)
    if not _has_pvh_note(tmp):
        tmp.unlink()
        return None
    tmp.rename(out)
    return out


def _bzimage_payload(data: bytes) -> Optional[bytes]:
    if not _is_bzimage(data[:0x400]):
        return None
    setup_sects = data[0x1F1] or 4
    (version,) = struct.unpack_from("<H", data, 0x206)
    if version < 0x208:
        return None
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return data[start:start + length]


def _decompress(payload: bytes) -> Optional[bytes]:
    try:
        if payload[:6] == b"\xfd7zXZ\x00":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        if payload[:2] == b"\x1f\x8b":
            return gzip.GzipFile(fileobj=__import__("io").BytesIO(payload)).read()
    except (lzma.LZMAError, OSError, EOFError):
        return None
    return None


def _has_pvh_note(path: Path) -> bool:
    """True if the ELF has the Xen PHYS32_ENTRY note QEMU needs to boot it directly."""
    with open(path, "rb") as fh:
        ident = fh.read(64)
        if ident[:4] != b"\x7fELF" or ident[4] != 2:  # 64-bit only
            return False
        e_phoff, = struct.unpack_from("<Q", ident, 0x20)
        e_phentsize, e_phnum = struct.unpack_from("<HH", ident, 0x36)
        for i in range(e_phnum):
            fh.seek(e_phoff + i * e_phentsize)
            p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack("<IIQQQQ", fh.read(40))
            if p_type != 4:  # PT_NOTE
                continue
            fh.seek(p_offset)
            notes = fh.read(p_filesz)
            pos = 0
            while pos + 12 <= len(notes):
                namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
                name = notes[pos + 12:pos + 12 + namesz]
                if name.rstrip(b"\0") == b"Xen" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                    return True
                pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False
