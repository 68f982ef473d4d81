"""Tests of pynsbook.vm itself.

The fast ones run against a fake QEMU (a script that prints what the guest would print),
so the marker parsing, the timeouts and the clean-up are tested everywhere. The slow ones
boot the real microVM; they are ``no_vm`` (never run inside the VM lane) and need QEMU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Set

import pytest

from pynsbook import vm
from pynsbook.vm.initramfs import EXIT_MARKER, READY_MARKER, CpioWriter

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def qemu_pids() -> Set[int]:
    """PIDs of QEMUs (and fakes) that pynsbook.vm started: their argv names our share."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"/pynsbook-vm-" in a for a in argv) and any(b"id=share" in a for a in argv):
            pids.add(int(entry.name))
    return pids


def share_dirs() -> Set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("pynsbook-vm-*")}


def fake_qemu(tmp_path: Path, body: str) -> Path:
    """A stand-in for qemu-system-x86_64 running ``body`` (Python; ``share`` is the
    writable share's host path, ``argv`` the arguments)."""
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""\
        import os, sys, time
        argv = sys.argv[1:]
        share = next(a.split("path=")[1].split(",")[0] for a in argv if a.startswith("local,id=share"))
        """) + textwrap.dedent(body))
    script.chmod(0o755)
    return script


@pytest.fixture
def fake_kernel(tmp_path: Path) -> vm.Kernel:
    image = tmp_path / "vmlinux"
    image.write_bytes(b"\x7fELF" + b"\0" * 60)
    initrd = tmp_path / "initramfs.cpio"
    initrd.write_bytes(b"")
    return vm.Kernel(image=image, release="test", pvh=True)


# --------------------------------------------------------------------------- kernels


def test_missing_kernel_path_is_a_clear_value_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-vmlinuz"
    with pytest.raises(ValueError) as info:
        vm.kernel_from_path(missing)
    assert isinstance(info.value, vm.KernelNotFound)
    assert isinstance(info.value, vm.VMError)
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_a_file_that_is_not_a_kernel_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "vmlinuz-1.0"
    bogus.write_text("hello")
    with pytest.raises(vm.KernelNotFound, match="not a kernel image"):
        vm.kernel_from_path(bogus)


def test_a_directory_without_a_kernel_is_refused(tmp_path: Path) -> None:
    with pytest.raises(vm.KernelNotFound, match="no boot/vmlinuz"):
        vm.kernel_from_path(tmp_path)


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYNSBOOK_VM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert vm.cache_dir() == tmp_path / "xdg" / "pynsbook" / "vm"
    monkeypatch.setenv("PYNSBOOK_VM_CACHE", str(tmp_path / "mine"))
    assert vm.cache_dir() == tmp_path / "mine" and (tmp_path / "mine").is_dir()


# --------------------------------------------------------------------------- initramfs


def test_cpio_writer_makes_an_archive_busybox_reads(tmp_path: Path) -> None:
    w = CpioWriter()
    w.directory("bin")
    w.file("bin/hello", b"hi there\n", 0o755)
    w.symlink("bin/sh", "hello")
    w.chardev("console", 5, 1)
    data = w.finish()
    assert data.startswith(b"070701") and len(data) % 4 == 0
    assert b"TRAILER!!!" in data
    cpio = "/bin/busybox" if Path("/bin/busybox").exists() else None
    if cpio is None:
        pytest.skip("busybox is not installed")
    listing = subprocess.run([cpio, "cpio", "-t", "-v"], input=data, capture_output=True,
                             check=True).stdout.decode()
    assert "bin/hello" in listing and "bin/sh -> hello" in listing
    assert any(line.startswith("crw") and line.endswith("console") for line in listing.splitlines())


def test_guest_init_moves_the_new_root_onto_slash() -> None:
    init = vm.initramfs.init_scripts()["init"]
    # a plain chroot would make the guest kernel refuse user namespaces
    assert "mount --move . /" in init and "chroot ." in init


# --------------------------------------------------------------------------- boot (fake QEMU)


def test_boot_reports_markers_exit_status_and_files(tmp_path: Path, fake_kernel: vm.Kernel,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_qemu(tmp_path, f"""
        payload = open(os.path.join(share, "payload")).read()
        assert "PYNSBOOK_VM_ACCEL=tcg" in payload and "echo hello" in payload
        print("booting...", flush=True)
        time.sleep(0.2)
        print("{READY_MARKER} 1.25\\r", flush=True)
        print("hello from the guest\\r", flush=True)
        open(os.path.join(share, "out", "result.txt"), "w").write("42")
        print("{EXIT_MARKER} 3 2.5", flush=True)
    """)
    monkeypatch.setenv("PYNSBOOK_VM_QEMU", str(fake))
    seen = []
    before = share_dirs()
    result = vm.boot(fake_kernel, tmp_path / "initramfs.cpio", "echo hello", accel="tcg",
                     timeout=30, on_line=seen.append)
    assert result.accel == "tcg"
    assert 0.2 <= result.ready_seconds < 10 and result.guest_uptime_at_ready == 1.25
    assert result.exit_status == 3 and not result.ok
    assert result.files == {"result.txt": b"42"}
    assert seen == ["booting...", "hello from the guest"] == result.console
    assert not share_dirs() - before


def test_a_boot_past_its_timeout_is_killed_with_its_children(tmp_path: Path, fake_kernel: vm.Kernel,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_qemu(tmp_path, f"""
        import subprocess
        subprocess.Popen(["sleep", "300"])   # a helper process, as QEMU may have
        print("{READY_MARKER} 1.0", flush=True)
        time.sleep(300)
    """)
    monkeypatch.setenv("PYNSBOOK_VM_QEMU", str(fake))
    before_pids, before_dirs = qemu_pids(), share_dirs()
    t0 = time.monotonic()
    with pytest.raises(vm.BootTimeout, match="did not finish within 2 s; QEMU was killed"):
        vm.boot(fake_kernel, tmp_path / "initramfs.cpio", "sleep 300", accel="tcg", timeout=2)
    assert time.monotonic() - t0 < 15
    assert not qemu_pids() - before_pids and not share_dirs() - before_dirs
    leftovers = subprocess.run(["pgrep", "-f", f"^sleep 300$"], capture_output=True, text=True)
    # the fake's child was in QEMU's process group, which was killed as a whole
    assert all(int(p) in before_pids for p in leftovers.stdout.split()) or not leftovers.stdout


def test_a_guest_that_never_gets_ready_times_out(tmp_path: Path, fake_kernel: vm.Kernel,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYNSBOOK_VM_QEMU", str(fake_qemu(tmp_path, "time.sleep(300)")))
    with pytest.raises(vm.BootTimeout, match="did not get ready within 1 s"):
        vm.boot(fake_kernel, tmp_path / "initramfs.cpio", "true", accel="tcg",
                timeout=30, ready_timeout=1)


def test_qemu_dying_early_is_a_boot_failure(tmp_path: Path, fake_kernel: vm.Kernel,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_qemu(tmp_path, "sys.stderr.write('qemu: cannot load kernel\\n'); sys.exit(1)")
    monkeypatch.setenv("PYNSBOOK_VM_QEMU", str(fake))
    with pytest.raises(vm.BootFailed, match="cannot load kernel"):
        vm.boot(fake_kernel, tmp_path / "initramfs.cpio", "true", accel="tcg", timeout=30)


# --------------------------------------------------------------------------- real boots


@pytest.fixture(scope="module")
def prepared():
    try:
        return vm.prepare(os.environ.get("PYNSBOOK_VM_KERNEL"))
    except vm.VMSetupError as err:
        pytest.skip(f"no kernel for the VM: {err}")


@pytest.mark.no_vm
@pytest.mark.needs("qemu")
def test_real_boot_reaches_ready_and_reports_accel_and_time(prepared) -> None:
    kernel, initramfs = prepared
    result = vm.boot(kernel, initramfs,
                     "cat /sys/fs/cgroup/cgroup.subtree_control > $PYNSBOOK_VM_OUT/controllers;"
                     " unshare -Ur true && echo userns-ok", timeout=180, ready_timeout=120)
    assert result.accel in ("kvm", "tcg")
    assert 0 < result.ready_seconds < result.total_seconds
    assert result.ok, result.console
    assert {"cpu", "memory", "pids"} <= set(result.files["controllers"].decode().split())
    assert "userns-ok" in result.console


@pytest.mark.no_vm
@pytest.mark.needs("qemu")
def test_real_boot_past_its_timeout_leaves_no_qemu(prepared) -> None:
    kernel, initramfs = prepared
    before_pids, before_dirs = qemu_pids(), share_dirs()
    with pytest.raises(vm.BootTimeout) as info:
        vm.boot(kernel, initramfs, "sleep 600", accel="tcg", timeout=12)
    assert "QEMU was killed" in str(info.value)
    assert not qemu_pids() - before_pids and not share_dirs() - before_dirs


@pytest.mark.no_vm
@pytest.mark.needs("qemu")
def test_lane_runner_fails_a_lane_that_times_out(prepared) -> None:
    before_pids, before_dirs = qemu_pids(), share_dirs()
    proc = subprocess.run([sys.executable, str(REPO / "tests/vm/lane.py"), "--lane", "root",
                           "--checks-only", "--accel", "tcg", "--timeout", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "root" in proc.stdout and "timed out" in proc.stdout
    assert not qemu_pids() - before_pids and not share_dirs() - before_dirs


def test_shares_of_dead_owners_are_swept_and_live_ones_kept(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / "pynsbook-vm-stale", tmp_path / "pynsbook-vm-live"
    for path, pid in ((stale, dead.pid), (live, os.getpid())):
        (path / "out").mkdir(parents=True)
        (path / "owner").write_text(f"{pid}\n")
    assert vm.qemu.sweep_stale_shares() == [stale]
    assert live.is_dir() and not stale.exists()
