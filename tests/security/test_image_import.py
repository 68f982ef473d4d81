"""Image import treats every byte of an image as hostile (issue 17, section 5).

Each test builds a hostile image in the test (a ``docker save`` archive, or an OCI layout
directory) with entries that aim at a directory of the host the test owns, and checks that
nothing outside the layer was touched: not its mode, owner, times, xattrs, contents or link
counts. Device nodes are never kept (whiteouts excepted), and say so in one line.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from pynsbook import images
from pynsbook.images import layers

Entry = Tuple[tarfile.TarInfo, Optional[bytes]]


@pytest.fixture
def store(tmp_path, monkeypatch) -> images.Store:
    monkeypatch.setenv("PYNSBOOK_STORE", str(tmp_path / "store"))
    return images.Store()


@pytest.fixture
def host(tmp_path) -> str:
    """A host directory the hostile images aim at: a file, a subdirectory, a file in it."""
    top = tmp_path / "host"
    (top / "y").mkdir(parents=True)
    (top / "secret").write_text("host secret\n")
    (top / "y" / "inner").write_text("inner\n")
    os.chmod(top / "y", 0o751)
    os.chmod(top, 0o751)
    for p in (top / "y" / "inner", top / "secret", top / "y", top):
        os.utime(p, (1_000_000, 1_000_000))
    return str(top)


def _state(top: str) -> Dict[str, tuple]:
    """Everything an import could change below (and at) ``top``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in ["."] + dirnames + filenames:
            full = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(full)
            data = open(full, "rb").read() if stat.S_ISREG(st.st_mode) else None
            xattrs = sorted(os.listxattr(full, follow_symlinks=False))
            out[os.path.relpath(full, top)] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                                               st.st_nlink, data, xattrs)
    return out


# ---------------------------------------------------------------------------------------
# building images

def D(name: str, mode: int = 0o755, uid: int = 0, mtime: int = 0) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, mode, uid, uid, mtime
    return info, None


def F(name: str, data: str = "x", mode: int = 0o644, uid: int = 0) -> Entry:
    info = tarfile.TarInfo(name)
    info.mode, info.uid, info.gid, info.size = mode, uid, uid, len(data.encode())
    return info, data.encode()


def S(name: str, target: str) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
    return info, None


def H(name: str, target: str) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = tarfile.LNKTYPE, target, 0o644
    return info, None


def DEV(name: str, kind: bytes, major: int, minor: int, mode: int = 0o666) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor, info.mode = kind, major, minor, mode
    return info, None


def FIFO(name: str, mode: int = 0o620) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.FIFOTYPE, mode
    return info, None


def _layer(entries: Sequence[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in entries:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _add(t: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


_CONFIG = json.dumps({"architecture": "amd64", "os": "linux",
                      "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}}).encode()


def docker_tar(path: str, layer_list: Sequence[Sequence[Entry]]) -> str:
    """A ``docker save`` archive with these layers (bottom first)."""
    with tarfile.open(path, "w") as t:
        names = []
        for i, entries in enumerate(layer_list):
            _add(t, f"l{i}/layer.tar", _layer(entries))
            names.append(f"l{i}/layer.tar")
        _add(t, "cfg.json", _CONFIG)
        _add(t, "manifest.json", json.dumps([{"Config": "cfg.json", "Layers": names}]).encode())
    return path


def oci_dir(path: str, layer_list: Sequence[Sequence[Entry]]) -> str:
    """An OCI image layout as a directory (as ``skopeo copy oci:DIR`` leaves it)."""
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs)

    def blob(data: bytes) -> Dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, digest), "wb") as f:
            f.write(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}
    descs = [dict(blob(_layer(e)), mediaType="application/vnd.oci.image.layer.v1.tar")
             for e in layer_list]
    config = dict(blob(_CONFIG), mediaType="application/vnd.oci.image.config.v1+json")
    manifest = json.dumps({"schemaVersion": 2, "layers": descs, "config": config})
    index = {"schemaVersion": 2, "manifests": [dict(blob(manifest.encode()),
             mediaType="application/vnd.oci.image.manifest.v1+json")]}
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)
    return path


def _import(tmp_path, layer_list: Sequence[Sequence[Entry]], name: str = "hostile") -> Optional[images.Image]:
    """Import; a refusal is as good as a safe import here (the caller checks the host)."""
    path = docker_tar(str(tmp_path / f"{name}.tar"), layer_list)
    try:
        return images.import_path(path, name)
    except images.LayerError as err:
        assert "\n" not in str(err) and "nothing was imported" in str(err)
        return None


def _store_files(store: images.Store) -> List[str]:
    return sorted(rel for rel, _, _ in layers.walk(store.root)) if os.path.isdir(store.root) else []


# ---------------------------------------------------------------------------------------
# (1) attributes set late must not follow a symlink that replaced the directory

@pytest.mark.parametrize("case", ["mode", "deeper", "opaque", "twice"])
def test_directory_attributes_never_follow_a_symlink_that_replaced_it(store, tmp_path, host, case):
    before = _state(host)
    entries = {
        # x's mode (and owner, time) are applied at the end; x is a symlink by then
        "mode": [D("x/", 0o700, uid=1234, mtime=42), S("x", host)],
        # x/y's attributes: through the symlink x, they would land on the host's y
        "deeper": [D("x/"), D("x/y/", 0o777, uid=1234, mtime=42), S("x", host)],
        # x/y marked opaque: an overlay xattr on the host's y
        "opaque": [D("x/"), D("x/y/"), F("x/y/.wh..wh..opq", ""), S("x", host)],
        # the directory comes back after the link: its attributes apply to the new one only
        "twice": [D("x/", 0o700), D("x/y/", 0o777), S("x", host), D("x/", 0o750), F("x/f")],
    }[case]
    image = _import(tmp_path, [entries])
    assert _state(host) == before
    assert image is not None  # nothing here is unsafe for the container itself
    diff = store.diff_dir(image.layers[0])
    x = os.lstat(os.path.join(diff, "x"))
    if case == "twice":
        assert stat.S_ISDIR(x.st_mode) and stat.S_IMODE(x.st_mode) == 0o750
        assert sorted(os.listdir(os.path.join(diff, "x"))) == ["f"]
    else:
        assert stat.S_ISLNK(x.st_mode) and os.readlink(os.path.join(diff, "x")) == host


def test_flattened_image_never_follows_an_upper_layer_symlink(store, tmp_path, host):
    """The copy fallback (materialize, PYNSBOOK_IMAGE_DRIVER=copy) applies layers in turn:
    a directory of a lower layer replaced by a symlink above it must not get its mode."""
    before = _state(host)
    image = _import(tmp_path, [[D("x/", 0o777), D("x/y/", 0o777, mtime=42)], [S("x", host)]])
    assert image is not None and len(image.layers) == 2
    flat = images.materialize("hostile", str(tmp_path / "flat"))
    assert _state(host) == before
    assert os.readlink(os.path.join(flat, "x")) == host


# ---------------------------------------------------------------------------------------
# (2) writes through a symlink planted by an earlier entry

@pytest.mark.parametrize("entries", [
    [S("d", "HOST"), F("d/secret", "pwned")],                   # a file under a linked dir
    [S("d", "HOST"), D("d/y/", 0o777)],                          # a directory under it
    [S("d", "HOST"), FIFO("d/fifo")],
    [S("d", "HOST/y"), F("d/.wh.inner", "")],                    # a whiteout under it
    [S("d", "HOST"), F("d/.wh..wh..opq", "")],                   # an opaque marker under it
    [S("f", "HOST/secret"), F("f", "pwned", mode=0o777)],        # the link itself replaced
    [D("a/"), S("a/b", "HOST"), F("a/b/secret", "pwned")],
    [S("d", "HOST"), D("d/")],                                   # a directory entry at the link
], ids=["file", "dir", "fifo", "whiteout", "opaque", "same-name", "deeper", "dir-at-link"])
def test_nothing_is_written_through_a_planted_symlink(store, tmp_path, host, entries):
    for info, _ in entries:
        info.linkname = info.linkname.replace("HOST", host)
    before = _state(host)
    _import(tmp_path, [entries])
    assert _state(host) == before


# ---------------------------------------------------------------------------------------
# (3) hard links

@pytest.mark.parametrize("entries, why", [
    ([H("h", "HOST/secret")], "absolute path"),
    ([H("h", "../../../../../../HOST/secret")], "climbs out of the root"),
    ([S("s", "HOST/secret"), H("h", "s")], "not a file earlier in the same layer"),
    ([S("d", "HOST"), H("h", "d/secret")], "not a file earlier in the same layer"),
    ([F("f"), S("f", "HOST/secret"), H("h", "f")], "not a file earlier in the same layer"),
    ([D("d/"), F("d/f"), S("d", "HOST"), H("h", "d/f")], "not a file earlier in the same layer"),
], ids=["absolute", "dotdot", "to-symlink", "through-symlink", "replaced-by-symlink",
        "parent-replaced"])
def test_hard_links_stay_inside_the_layer(store, tmp_path, host, entries, why):
    for info, _ in entries:
        info.linkname = info.linkname.replace("HOST", host.lstrip("/") if ".." in info.linkname
                                              else host)
    before = _state(host)
    good = _import(tmp_path, [[F("ok")]], name="good")
    files = _store_files(store)
    path = docker_tar(str(tmp_path / "bad.tar"), [entries])
    with pytest.raises(images.LayerError) as err:
        images.import_path(path, "bad")
    assert why in str(err.value) and "\n" not in str(err.value)
    assert _state(host) == before  # the link count of host/secret among the rest
    assert _store_files(store) == files and good is not None


# ---------------------------------------------------------------------------------------
# (4) names: absolute, '..'

@pytest.mark.parametrize("entry, why", [
    (F("../../../../../../HOST/secret", "pwned"), "climbs out of the root"),
    (F("HOST/secret", "pwned"), "absolute path"),
    (D("a/../../../../../../HOST/y/", 0o777), "climbs out of the root"),
    (S("../../../../../../HOST/new", "/etc"), "climbs out of the root"),
    (FIFO("HOST/fifo"), "absolute path"),
], ids=["dotdot-file", "absolute-file", "dotdot-dir", "dotdot-symlink", "absolute-fifo"])
def test_names_outside_the_root_are_refused(store, tmp_path, host, entry, why):
    info = entry[0]
    info.name = info.name.replace("/HOST", host).replace("HOST", host)
    before = _state(host)
    path = docker_tar(str(tmp_path / "bad.tar"), [[F("ok"), entry]])
    with pytest.raises(images.LayerError, match=why):
        images.import_path(path, "bad")
    assert _state(host) == before
    assert images.Store().names() == []


# ---------------------------------------------------------------------------------------
# (5) whiteouts

@pytest.mark.parametrize("name, why", [
    (".wh.../../../../../../../HOST/secret", "climbs out of the root"),
    ("a/.wh..", "is a whiteout of no file"),
    ("a/.wh...", "is a whiteout of no file"),
    ("a/.wh.", "is a whiteout of no file"),
], ids=["dotdot", "dot", "dotdot-only", "empty"])
def test_whiteouts_cannot_delete_outside_the_layer(store, tmp_path, host, name, why):
    before = _state(host)
    path = docker_tar(str(tmp_path / "bad.tar"),
                      [[D("a/"), F("a/f")], [D("a/"), F(name.replace("/HOST", host), "")]])
    with pytest.raises(images.LayerError, match=why):
        images.import_path(path, "bad")
    assert _state(host) == before


def test_whiteout_under_a_linked_directory_deletes_nothing_on_the_host(store, tmp_path, host):
    before = _state(host)
    _import(tmp_path, [[D("y/"), F("y/inner")], [S("y", host + "/y"), F("y/.wh.inner", ""),
                                                 F("y/.wh..wh..opq", "")]])
    assert _state(host) == before


# ---------------------------------------------------------------------------------------
# (6) device nodes

@pytest.mark.needs("root")
def test_device_nodes_are_left_out_in_one_line(store, tmp_path, capfd):
    entries = [D("dev/"), DEV("dev/sda", tarfile.BLKTYPE, 8, 0), DEV("dev/mem", tarfile.CHRTYPE, 1, 1),
               DEV("dev/gone", tarfile.CHRTYPE, 0, 0),  # an overlay-style whiteout: kept
               DEV("dev/tty\n1", tarfile.CHRTYPE, 4, 1),  # a name that would start a line
               FIFO("dev/fifo"), F("dev/file", "kept")]
    image = images.import_path(docker_tar(str(tmp_path / "dev.tar"), [[F("base")], entries]), "dev")
    err = capfd.readouterr().err
    diff = store.diff_dir(image.layers[1])
    for name in ("sda", "mem"):
        assert not os.path.lexists(os.path.join(diff, "dev", name)), name
    assert layers.is_whiteout(os.lstat(os.path.join(diff, "dev", "gone")))
    fifo = os.lstat(os.path.join(diff, "dev", "fifo"))
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o620
    lines = [line for line in err.splitlines() if "dev/sda" in line]
    assert len(lines) == 1 and "dev/mem" in lines[0] and "device" in lines[0], err
    assert "dev/tty\\n1" in lines[0] and not any(line.startswith("1") for line in err.splitlines())
    assert "dev/fifo" not in err and "dev/gone" not in err


@pytest.mark.needs("root")
def test_device_nodes_of_an_imported_directory_are_left_out(store, tmp_path, capfd):
    root = tmp_path / "rootfs"
    (root / "dev").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("x\n")
    os.mknod(root / "dev" / "sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.mknod(root / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    image = images.import_path(str(root), "dir")
    diff = store.diff_dir(image.layers[0])
    assert sorted(os.listdir(os.path.join(diff, "dev"))) == []
    assert open(os.path.join(diff, "etc", "hostname")).read() == "x\n"
    lines = [line for line in capfd.readouterr().err.splitlines() if "dev/sda" in line]
    assert len(lines) == 1 and "dev/null" in lines[0]


# ---------------------------------------------------------------------------------------
# (7) honest images keep working

HONEST = [[D("etc/"), F("etc/real", "real\n"), S("etc/link", "/etc/real"), S("etc/rel", "real"),
           D("usr/"), D("usr/bin/"), F("usr/bin/su", "su", mode=0o4755), F("usr/bin/wall", "w", mode=0o2755),
           H("etc/hard", "etc/real"), D("ro/", 0o555), F("ro/file", "ro\n"), D("tmp/", 0o1777),
           FIFO("run-fifo"), D("home/"), D("home/u/", 0o700, uid=1000), F("home/u/f", "u", uid=1000)],
          [D("etc/"), S("etc/real2", "/etc/link"), F("etc/.wh.rel", ""),
           D("ro/"), F("ro/.wh..wh..opq", ""), F("ro/new", "new\n")]]


def test_honest_image_imports_with_its_attributes(store, tmp_path):
    image = images.import_path(docker_tar(str(tmp_path / "ok.tar"), HONEST), "ok")
    low, top = (store.diff_dir(d) for d in image.layers)
    mode = lambda *p: stat.S_IMODE(os.lstat(os.path.join(low, *p)).st_mode)  # noqa: E731
    assert os.readlink(os.path.join(low, "etc/link")) == "/etc/real"
    assert mode("usr/bin/su") == 0o4755 and mode("usr/bin/wall") == 0o2755
    assert mode("ro") == 0o555 and mode("tmp") == 0o1777 and mode("home/u") == 0o700
    assert os.lstat(os.path.join(low, "etc/hard")).st_ino == os.lstat(os.path.join(low, "etc/real")).st_ino
    assert stat.S_ISFIFO(os.lstat(os.path.join(low, "run-fifo")).st_mode)
    if os.geteuid() == 0:
        assert os.lstat(os.path.join(low, "home/u/f")).st_uid == 1000
    assert layers.is_whiteout(os.lstat(os.path.join(top, "etc/rel")))
    assert layers.is_opaque(os.path.join(top, "ro"))
    flat = images.materialize("ok", str(tmp_path / "flat"))
    assert open(os.path.join(flat, "ro", "new")).read() == "new\n"
    assert not os.path.exists(os.path.join(flat, "ro", "file"))
    assert stat.S_IMODE(os.lstat(os.path.join(flat, "usr/bin/su")).st_mode) == 0o4755


@pytest.mark.needs("overlay")
def test_honest_image_with_absolute_symlinks_runs(store, tmp_path, no_leaks):
    import pynsbook
    images.import_path(docker_tar(str(tmp_path / "ok.tar"), HONEST), "ok")
    code = ("import os\n"
            "print(open('/etc/link').read().strip(), open('/etc/real2').read().strip(),"
            " os.readlink('/etc/link'), os.path.lexists('/etc/rel'), sorted(os.listdir('/ro')),"
            " oct(os.stat('/usr/bin/su').st_mode & 0o7777))\n")
    r = pynsbook.run(code, image="ok")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split() == ["real", "real", "/etc/real", "False", "['new']", "0o4755"]


# ---------------------------------------------------------------------------------------
# the image's own files (an OCI layout directory) are read without following links out

@pytest.mark.parametrize("how", ["relative", "absolute", "via-dir"])
def test_oci_directory_blob_linked_inside_is_read(store, tmp_path, how):
    """docker save and some copy tools link repeated blobs to one copy: that stays fine."""
    layout = oci_dir(str(tmp_path / "layout"), [[F("ok", "linked\n")]])
    index = json.load(open(os.path.join(layout, "index.json")))
    manifest = index["manifests"][0]["digest"].split(":")[1]
    blob = os.path.join(layout, "blobs", "sha256", manifest)
    os.makedirs(os.path.join(layout, "shared", "sub"))
    os.replace(blob, os.path.join(layout, "shared", "sub", "m"))
    target = {"relative": "../../shared/sub/m",
              "absolute": os.path.join(os.path.realpath(layout), "shared", "sub", "m"),
              "via-dir": "../../s/m"}[how]
    if how == "via-dir":
        os.symlink("shared/sub", os.path.join(layout, "s"))
    os.symlink(target, blob)
    image = images.import_path(layout, "linked")
    assert open(os.path.join(store.diff_dir(image.layers[0]), "ok")).read() == "linked\n"


@pytest.mark.parametrize("how", ["absolute", "dotdot", "via-dir"])
def test_oci_directory_blob_linked_outside_is_refused(store, tmp_path, host, how):
    layout = oci_dir(str(tmp_path / "layout"), [[F("ok")]])
    index = json.load(open(os.path.join(layout, "index.json")))
    manifest = index["manifests"][0]["digest"].split(":")[1]
    os.replace(os.path.join(layout, "blobs", "sha256", manifest), os.path.join(host, "manifest"))
    target = {"absolute": os.path.join(host, "manifest"),
              "dotdot": os.path.relpath(os.path.join(host, "manifest"), os.path.join(layout, "blobs", "sha256")),
              "via-dir": "../../h/manifest"}[how]
    if how == "via-dir":
        os.symlink(host, os.path.join(layout, "h"))
    os.symlink(target, os.path.join(layout, "blobs", "sha256", manifest))
    with pytest.raises(images.ImageError, match="outside"):
        images.import_path(layout, "linked")
    assert images.Store().names() == []


# ---------------------------------------------------------------------------------------
# a container's layer changes while it is copied (a commit of a running container)

def test_a_directory_swapped_for_a_symlink_while_walked_lists_nothing_of_the_host(tmp_path, host):
    src = tmp_path / "upper"
    (src / "a").mkdir(parents=True)
    (src / "a" / "mine").write_text("mine\n")
    seen = []
    for rel, _, _ in layers.walk(str(src)):
        seen.append(rel)
        if rel == "a":  # listed as a directory; the container swaps it before it is entered
            os.rename(src / "a", src / "a.old")
            os.symlink(host, src / "a")
    assert seen == ["a"]


def test_a_file_reached_through_a_swapped_directory_is_not_copied(tmp_path, host):
    src, dst = tmp_path / "upper", tmp_path / "copy"
    (src / "b").mkdir(parents=True)
    (src / "b" / "secret").write_text("mine\n")
    dst.mkdir()

    def swap(rel: str, st: os.stat_result) -> bool:
        if rel == "b/secret":  # listed in the real b; the path now leads to the host's file
            os.rename(src / "b", src / "b.old")
            os.symlink(host, src / "b")
        return False
    with pytest.raises(images.LayerError, match="changed while it was being copied"):
        layers.copy_tree(str(src), str(dst), skip=swap)
    assert not (dst / "b" / "secret").exists() or (dst / "b" / "secret").read_text() == "mine\n"
