"""Images and layers: the store, importers (busybox, directories, OCI/docker tarballs with
whiteouts), safety checks, containers on images (copy-up, whiteouts), diff and commit."""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from typing import List, Optional, Sequence, Tuple

import pytest

from pynsbook import images
from pynsbook.errors import OptionError
from pynsbook.images import changes, layers
from tests import helpers

Entry = Tuple[str, str, str]  # (name, kind: d f s h, data: file content or link target)


@pytest.fixture
def store(tmp_path, monkeypatch) -> images.Store:
    monkeypatch.setenv("PYNSBOOK_STORE", str(tmp_path / "store"))
    return images.Store()


@pytest.fixture
def base(store) -> images.Image:
    return images.import_busybox("base")


def _listing(root: str) -> List[str]:
    return sorted(rel for rel, _, _ in layers.walk(root)) if os.path.isdir(root) else []


# ---------------------------------------------------------------------------------------
# building OCI and docker-save tarballs in the test

def _layer_tar(entries: Sequence[Entry], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as t:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.mode = 0o755 if kind == "d" else 0o644
            if kind == "d":
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            elif kind == "f":
                info.size = len(data)
                t.addfile(info, io.BytesIO(data.encode()))
            else:
                info.type = tarfile.SYMTYPE if kind == "s" else tarfile.LNKTYPE
                info.linkname = data
                t.addfile(info)
    return buf.getvalue()


def _add(t: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


def _image_tar(path: str, layer_list: Sequence[Sequence[Entry]], fmt: str = "oci",
               cmd: Optional[List[str]] = None) -> str:
    """An OCI image layout (fmt oci) or a docker save archive (fmt docker), as a tar file."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": ["GREETING=hello", "PATH=/bin"], "Cmd": cmd or ["/bin/sh"],
                                    "WorkingDir": "/srv"}}).encode()
    with tarfile.open(path, "w") as t:
        if fmt == "docker":
            names = []
            for i, entries in enumerate(layer_list):
                _add(t, f"layer{i}/layer.tar", _layer_tar(entries))
                names.append(f"layer{i}/layer.tar")
            _add(t, "cfg.json", config)
            _add(t, "manifest.json", json.dumps([{"Config": "cfg.json", "RepoTags": ["t:1"],
                                                  "Layers": names}]).encode())
            return path

        def blob(data: bytes) -> str:
            digest = hashlib.sha256(data).hexdigest()
            _add(t, f"blobs/sha256/{digest}", data)
            return f"sha256:{digest}"
        descs = []
        for i, entries in enumerate(layer_list):
            data = _layer_tar(entries, gz=i % 2 == 1)  # every other layer gzip-compressed
            descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if i % 2 else ""),
                          "digest": blob(data), "size": len(data)})
        manifest = json.dumps({"schemaVersion": 2, "config": {"digest": blob(config), "size": len(config),
                               "mediaType": "application/vnd.oci.image.config.v1+json"},
                               "layers": descs}).encode()
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob(manifest),
            "size": len(manifest), "platform": {"architecture": "amd64", "os": "linux"}}]}
        _add(t, "index.json", json.dumps(index).encode())
        _add(t, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
    return path


LAYERS: List[List[Entry]] = [
    [("a/", "d", ""), ("a/keep", "f", "keep"), ("a/gone", "f", "gone"), ("b/", "d", ""),
     ("b/old", "f", "old"), ("b/sub/", "d", ""), ("b/sub/deep", "f", "deep"),
     ("c", "f", "a file"), ("bin/", "d", ""), ("bin/sh", "s", "/bin/busybox")],
    # deletes a/gone, makes b opaque (order in the tar must not matter), turns file c into a dir
    [("b/", "d", ""), ("b/new", "f", "new"), ("b/.wh..wh..opq", "f", ""), ("a/.wh.gone", "f", ""),
     ("c/", "d", ""), ("c/inside", "f", "in"), ("a/.wh.never-was", "f", ""), ("h", "h", "c/inside")],
    # a whiteout beside a file of the same name in the same layer: the file wins
    [("a/.wh.both", "f", ""), ("a/both", "f", "both")],
]
EXPECTED = ["a", "a/both", "a/keep", "b", "b/new", "bin", "bin/sh", "c", "c/inside", "h"]


def _merged(st: images.Store, name: str) -> List[str]:
    image = st.get(name)
    tree, _ = changes.fold_layers([st.diff_dir(d) for d in image.layers])
    out: List[str] = []

    def walk(node, prefix: str) -> None:
        for n in sorted(node.children):
            out.append(prefix + n)
            walk(node.children[n], prefix + n + "/")
    walk(tree.root, "")
    return out


# ---------------------------------------------------------------------------------------
# the store

@pytest.mark.needs("busybox")
def test_two_images_on_one_base_store_it_once(store, base, tmp_path):
    alone = store.disk_usage()
    base_layer = store.layers_disk(base.layers)
    assert base_layer > 1 << 20  # the busybox binary
    for n in (1, 2):
        extra = tmp_path / f"extra{n}"
        (extra / "srv").mkdir(parents=True)
        (extra / "srv" / "app").write_text(f"app {n}\n")
        images.import_dir(str(extra), f"app{n}", base="base")
    both = store.disk_usage()
    assert len(store.layer_digests()) == 3
    assert both - alone < 100 << 10, (alone, both)  # two small layers, not two bases
    assert images.import_busybox("again").layers == base.layers  # same content, same layer
    assert len(store.layer_digests()) == 3 and store.disk_usage() - both < 16 << 10
    table = str(images.layers_table("app1"))
    assert "again, app2, base" in table and "app1" in table.splitlines()[0]
    print(f"\nstore: busybox alone {alone >> 10} KiB; with two images on it {both >> 10} KiB")

    # rm keeps what another image shares
    app1_top = images.get("app1").layers[-1]
    assert images.remove("app1") == [app1_top]
    assert "app1" not in store.names() and len(store.layer_digests()) == 2
    assert images.remove("base") == [] and images.remove("again") == []  # app2 uses it
    assert store.layer_digests() == sorted(images.get("app2").layers)
    assert len(images.remove("app2")) == 2
    assert store.layer_digests() == [] and store.names() == []


@pytest.mark.needs("busybox")
def test_layer_digest_is_the_sha256_of_its_canonical_tar(store, base):
    out = io.BytesIO()
    layers.canonical_tar(store.diff_dir(base.layers[0]), out)
    assert base.layers[0] == "sha256:" + hashlib.sha256(out.getvalue()).hexdigest()
    out.seek(0)
    with tarfile.open(fileobj=out) as t:  # an ordinary OCI layer tar, without times
        names = t.getnames()
        assert "bin/busybox" in names and all(m.mtime == 0 for m in t.getmembers())
    info = store.layer_info(base.layers[0])
    assert info.tar_size == len(out.getvalue()) and info.files >= 4


# ---------------------------------------------------------------------------------------
# importers and safety

@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_image_tarball_with_whiteouts_and_opaque_dir(store, tmp_path, fmt):
    path = _image_tar(str(tmp_path / "img.tar"), LAYERS, fmt)
    image = images.import_path(path, "t")
    assert len(image.layers) == 3
    assert _merged(store, "t") == EXPECTED
    top2 = store.diff_dir(image.layers[1])
    assert layers.is_whiteout(os.lstat(os.path.join(top2, "a", "gone")))
    assert layers.is_opaque(os.path.join(top2, "b"))
    assert not os.path.lexists(os.path.join(top2, "b", ".wh..wh..opq"))
    assert os.path.isfile(os.path.join(store.diff_dir(image.layers[2]), "a", "both"))
    assert image.config.env["GREETING"] == "hello" and image.config.workdir == "/srv"
    counts = changes.fold_layers([store.diff_dir(d) for d in image.layers])[1]
    assert counts[1]["D"] == 3  # a/gone, and b's old and sub hidden by the opaque b
    flat = images.materialize("t", str(tmp_path / "flat"))  # the copy fallback agrees
    assert _listing(flat) == EXPECTED and open(os.path.join(flat, "h")).read() == "in"


@pytest.mark.parametrize("bad, why", [
    ([("../evil", "f", "x")], "climbs out of the root"),
    ([("/etc/evil", "f", "x")], "absolute path"),
    ([("ok/", "d", ""), ("ok/up", "s", "../../../../etc")], "climbs above the root"),
    ([("x", "s", "/../../etc/shadow")], "climbs above the root"),
    ([("d", "s", "/etc"), ("d/passwd", "f", "x")], "goes through the symlink 'd'"),
    ([("h", "h", "../../etc/passwd")], "climbs out of the root"),
    ([("h", "h", "/etc/shadow")], "absolute path"),
    ([("h", "h", "missing")], "not a file earlier in the same layer"),
])
def test_unsafe_tarball_is_refused_and_store_unchanged(store, tmp_path, bad, why):
    good = _image_tar(str(tmp_path / "good.tar"), LAYERS[:1])
    images.import_path(good, "good")
    before = _listing(store.root)
    path = _image_tar(str(tmp_path / "bad.tar"), [LAYERS[0], bad])
    with pytest.raises(images.LayerError) as err:
        images.import_path(path, "bad")
    assert why in str(err.value) and "\n" not in str(err.value)
    assert "nothing was imported" in str(err.value)
    assert _listing(store.root) == before


def test_bad_input_gets_one_line(store, tmp_path):
    plain = tmp_path / "x.tar"
    plain.write_bytes(_layer_tar([("f", "f", "x")]))
    with pytest.raises(images.ImageError, match="neither an OCI"):
        images.import_path(str(plain), "x")
    good = _image_tar(str(tmp_path / "good.tar"), LAYERS[:1])
    images.import_path(good, "good")
    before = _listing(store.root)
    with pytest.raises(images.ImageError, match="already exists"):
        images.import_path(good, "good")
    with pytest.raises(OptionError):
        images.import_path(good, "../bad name")
    with pytest.raises(images.ImageError, match="no image named 'nope'"):
        images.remove("nope")
    assert _listing(store.root) == before
    from pynsbook.spec import make_spec
    with pytest.raises(OptionError, match="not both"):
        make_spec({"rootfs": str(tmp_path), "image": "good"})


# ---------------------------------------------------------------------------------------
# containers on images

@pytest.mark.needs("overlay", "busybox")
def test_whiteout_copy_up_diff_commit(store, base, no_leaks):
    import pynsbook
    base_dir = store.diff_dir(base.layers[0])
    passwd = open(os.path.join(base_dir, "etc/passwd")).read()
    with pynsbook.Container("imgtest", image="base") as c:
        r = c.exec("rm /etc/hostname && echo student:x:1000:1000::/home:/bin/sh >> /etc/passwd"
                   " && mkdir /srv && echo hi > /srv/hi")
        assert r.exit_code == 0, r.stderr
        upper = os.path.join(c.upper_dir, "upper")
        assert layers.is_whiteout(os.lstat(os.path.join(upper, "etc/hostname")))
        assert "student" in open(os.path.join(upper, "etc/passwd")).read()  # copied up
        d = images.diff(c)
        assert [("C", "/etc"), ("D", "/etc/hostname"), ("C", "/etc/passwd"), ("A", "/srv"),
                ("A", "/srv/hi")] == list(d)
        assert "D /etc/hostname" in str(d).splitlines()
        images.commit(c, "base-hi")
        with pytest.raises(images.ImageError, match="already exists"):
            images.commit(c, "base-hi")
    # the base layer is untouched, the container layer is gone
    assert open(os.path.join(base_dir, "etc/passwd")).read() == passwd
    assert os.path.isfile(os.path.join(base_dir, "etc/hostname"))
    assert os.listdir(os.path.join(store.root, "containers")) == []
    # the new image has the change, the old one does not
    new = pynsbook.run(["sh", "-c", "cat /srv/hi; ls /etc; tail -1 /etc/passwd"], image="base-hi")
    assert new.stdout.split() == ["hi", "group", "passwd", "student:x:1000:1000::/home:/bin/sh"]
    old = pynsbook.run(["sh", "-c", "ls /srv /etc"], image="base")
    assert "hostname" in old.stdout and old.exit_code != 0  # no /srv
    # Python runs on any image (the init forks it); the image's env and workdir apply
    r = pynsbook.run("import os; print(os.getcwd(), os.environ['PATH'])", image="base-hi")
    assert r.stdout.split()[0] == "/"
    assert len(images.get("base-hi").layers) == 2
    assert images.get("base-hi").layers[0] == base.layers[0]


@pytest.mark.needs("overlay")
def test_oci_image_runs_with_its_config(store, tmp_path, no_leaks):
    import pynsbook
    images.import_path(_image_tar(str(tmp_path / "i.tar"), LAYERS), "t")
    code = ("import os\nprint(os.getcwd() if os.path.isdir('/srv') else '-', os.environ['GREETING'])\n"
            "print(sorted(os.path.relpath(os.path.join(r, n), '/') for top in ('/a', '/b', '/c', '/h') "
            "for r, ds, fs in ([(os.path.dirname(top), [], [os.path.basename(top)])] + list(os.walk(top))) "
            "for n in ds + fs))")
    r = pynsbook.run(code, image="t")
    assert r.exit_code == 0, r.stderr
    # the image's WorkingDir (/srv) is made when missing, as docker run does
    assert r.stdout.splitlines()[0] == "/srv hello"
    assert eval(r.stdout.splitlines()[1]) == [p for p in EXPECTED if not p.startswith("bin")]


def test_missing_image_is_one_clear_line(store):
    import pynsbook
    with pytest.raises(OptionError, match="pynsbook images ls") as err:
        pynsbook.run(["true"], image="nope")
    assert "'nope'" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.needs("busybox")
def test_cli(store, base, capsys, tmp_path):
    from pynsbook import cli
    assert cli.main(["images", "ls"]) == 0
    assert "base" in capsys.readouterr().out
    assert cli.main(["images", "layers", "base"]) == 0
    assert base.layers[0][:19] in capsys.readouterr().out
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    assert cli.main(["images", "import", str(tmp_path / "d"), "top", "--base", "base"]) == 0
    assert cli.main(["images", "rm", "top"]) == 0
    assert "1 layer(s)" in capsys.readouterr().out
    assert cli.main(["images", "rm", "top"]) == 125
    assert "no image named 'top'" in capsys.readouterr().err
    assert images.doctor_note().startswith("images: overlay (kernel overlayfs")


@pytest.mark.needs("rootless_user", "userns", "overlay", "busybox")
def test_rootless_import_run_commit(tmp_path, base):
    """An unprivileged user: same busybox digest, whiteouts in a user namespace, commit."""
    import pwd
    import shutil
    import tempfile
    st = tempfile.mkdtemp(prefix="pynsbook-userstore-")  # pytest's tmp_path is root's only
    try:
        pw = pwd.getpwnam(helpers.TEST_USER)
        os.chown(st, pw.pw_uid, pw.pw_gid)
        out = _as_user(st)
    finally:
        shutil.rmtree(st)
    assert out["digest"] == base.layers[0]  # the same files are the same layer, whoever imports
    assert out["wh"] and ["D", "/etc/hostname"] in out["diff"]
    assert out["out"] == ["x", "group", "passwd"]


def _as_user(st: str) -> dict:
    return helpers.json_as_user(f"""
import os, json
os.environ['PYNSBOOK_STORE'] = {st!r}
import pynsbook
from pynsbook import images
from pynsbook.images import layers
img = images.import_busybox('bb')
with pynsbook.Container(image='bb') as c:
    c.exec('rm /etc/hostname; echo x > /root/x')
    wh = layers.is_whiteout(os.lstat(c.upper_dir + '/upper/etc/hostname'))
    d = [list(x) for x in images.diff(c)]
    images.commit(c, 'bb2')
r = pynsbook.run(['sh', '-c', 'cat /root/x; ls /etc'], image='bb2')
print(json.dumps({{'digest': img.layers[0], 'wh': wh, 'diff': d, 'out': r.stdout.split()}}))
""")


CONTAINER = pytest.mark.needs("userns") if os.geteuid() else pytest.mark.needs("root")


@CONTAINER
@pytest.mark.needs("busybox")
def test_copy_driver_runs_an_image_without_overlayfs_and_leaves_the_layers_untouched(
        store, monkeypatch):
    """Where overlayfs is refused, each container runs on a private copy of its image."""
    import pynsbook
    monkeypatch.setenv("PYNSBOOK_IMAGE_DRIVER", "copy")
    assert images.driver()[0] == "copy"
    image = images.import_busybox("bb")
    before = store.layers_disk(image.layers)
    r = pynsbook.run(["sh", "-c", "echo changed > /etc/passwd; rm /etc/hostname; cat /etc/passwd"],
                     image="bb")
    assert r.exit_code == 0 and r.stdout == "changed\n", r.stderr
    r = pynsbook.run(["sh", "-c", "head -c 4 /etc/passwd; test -e /etc/hostname && echo kept"],
                     image="bb")
    assert r.stdout.endswith("kept\n") and not r.stdout.startswith("chan"), r.stdout
    assert store.layers_disk(image.layers) == before
    with pynsbook.Container(image="bb") as c:
        with pytest.raises(images.ImageError, match="runs on a copy"):
            images.diff(c)
