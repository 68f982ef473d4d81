"""Boot the microVM in QEMU, run a shell script in it, and bring its results back.

Every boot has a deadline. QEMU runs in a process group of its own and dies with its
parent (``PR_SET_PDEATHSIG``); on a timeout, an error or an interrupt it is killed by
its PID, so a failed boot never leaves a QEMU behind. KVM is used only when a short,
bounded probe boot succeeds (``/dev/kvm`` can exist and still fail a stock kernel);
otherwise QEMU emulates the CPU (``tcg``). Every result says which one it used.

The guest sees the host's root read-only over 9p (``multidevs=remap``), so the host's
Python and the project run in it; a fresh host temporary directory is shared writable at
:data:`~pynsbook.vm.initramfs.GUEST_DIR` ``/share`` and removed after the boot.
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from .errors import BootFailed, BootTimeout, VMSetupError
from .initramfs import EXIT_MARKER, FAIL_MARKER, GUEST_DIR, READY_MARKER
from .kernel import Kernel, cache_dir

#: Where the guest sees the writable share.
GUEST_SHARE = f"{GUEST_DIR}/share"
#: Where files the guest writes for the host go (collected into BootResult.files).
GUEST_OUT = f"{GUEST_SHARE}/out"

_KVM_FAILURE_WORDS = ("KVM internal error", "emulation failure", "kvm run failed",
                      "Could not access KVM", "failed to initialize kvm")


@dataclass
class BootResult:
    """What one boot did. ``ready_seconds`` is host-measured, from starting QEMU to the
    ready marker printed by the guest's init; ``guest_uptime_at_ready`` is the guest's
    own clock at that moment."""

    accel: str
    ready_seconds: float
    total_seconds: float
    exit_status: int
    guest_uptime_at_ready: Optional[float] = None
    console: List[str] = field(default_factory=list)
    files: Dict[str, bytes] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the payload exited with status 0."""
        return self.exit_status == 0


# --------------------------------------------------------------------------- host facts


def find_qemu() -> Path:
    """The QEMU binary (``$PYNSBOOK_VM_QEMU`` or qemu-system-x86_64 on PATH)."""
    cand = os.environ.get("PYNSBOOK_VM_QEMU") or shutil.which("qemu-system-x86_64")
    if not cand or not Path(cand).exists():
        raise VMSetupError("qemu-system-x86_64 not found: apt-get install --no-install-recommends qemu-system-x86")
    return Path(cand)


def host_tsc_khz() -> Optional[int]:
    """The host TSC rate, when the host kernel knows it exactly (``tsc_known_freq``).

    Passing it as ``tsc_early_khz`` spares the guest a TSC calibration that occasionally
    hangs under emulation. ``$PYNSBOOK_VM_TSC_KHZ`` overrides (``0`` turns it off).
    """
    env = os.environ.get("PYNSBOOK_VM_TSC_KHZ")
    if env is not None:
        return int(env) or None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    if " tsc_known_freq" not in flags or " constant_tsc" not in flags:
        return None
    for ln in text.splitlines():
        if ln.startswith("cpu MHz"):
            return int(float(ln.split(":")[1]) * 1000)
    return None


def kvm_usable() -> bool:
    """``/dev/kvm`` exists and we may open it (a precondition, not a proof: see probe)."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


# --------------------------------------------------------------------------- command line


def qemu_command(kernel: Kernel, initramfs: Path, share: Path, *, accel: str,
                 memory_mb: int = 2048, cpus: int = 2, root: str = "/",
                 kernel_args: Sequence[str] = (), extra_args: Sequence[str] = ()) -> List[str]:
    """The QEMU argv for a microVM that boots ``kernel`` with ``initramfs``.

    ``kernel_args`` (and ``$PYNSBOOK_VM_APPEND``) are added to the kernel command line.
    """
    append = ["console=ttyS0", "quiet", "reboot=t", "panic=-1", "pci=off", "rdinit=/init",
              "pynsbook_root_tag=hostroot", "pynsbook_share_tag=share"]
    tsc = host_tsc_khz()
    if tsc and accel == "tcg":
        append.append(f"tsc_early_khz={tsc}")
    append.extend(kernel_args)
    append.extend(os.environ.get("PYNSBOOK_VM_APPEND", "").split())
    cmd = [
        str(find_qemu()),
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
        "-accel", accel,
        "-cpu", "host" if accel == "kvm" else os.environ.get("PYNSBOOK_VM_CPU", "max"),
        "-m", str(memory_mb), "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
        "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-kernel", str(kernel.image), "-initrd", str(initramfs),
        "-append", " ".join(append),
        "-fsdev", f"local,id=hostroot,path={root},security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-device,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=share,path={share},security_model=none,multidevs=remap",
        "-device", "virtio-9p-device,fsdev=share,mount_tag=share",
        "-device", "virtio-rng-device",
    ]
    cmd.extend(extra_args)
    return cmd


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL QEMU if the Python that started it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - best effort only
        pass


def _kill(proc: "subprocess.Popen[bytes]") -> None:
    """Kill QEMU (its own process group, by its PID) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not honoured
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- boot


def boot(kernel: Kernel, initramfs: Path, script: str, *, accel: str = "auto",
         timeout: float = 600.0, ready_timeout: Optional[float] = None,
         memory_mb: int = 2048, cpus: int = 2, env: Optional[Mapping[str, str]] = None,
         on_line: Optional[Callable[[str], None]] = None,
         kernel_args: Sequence[str] = (), extra_args: Sequence[str] = ()) -> BootResult:
    """Boot the VM, run ``script`` (``/bin/sh``, as root) in it and return a
    :class:`BootResult`.

    ``timeout`` bounds the whole boot; ``ready_timeout`` (default: ``timeout``) bounds
    the time to the ready marker. On either, QEMU is killed and :class:`BootTimeout` is
    raised. Lines the guest prints go to ``on_line`` as they arrive. Files the script
    writes under ``$PYNSBOOK_VM_OUT`` come back in ``BootResult.files``. A non-zero exit
    of the script is not an error: read ``exit_status``.
    """
    if accel == "auto":
        accel = choose_accel(kernel, initramfs)
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be auto, kvm or tcg, not {accel!r}")
    ready_timeout = timeout if ready_timeout is None else min(ready_timeout, timeout)

    sweep_stale_shares()
    share = Path(tempfile.mkdtemp(prefix="pynsbook-vm-"))
    try:
        (share / "owner").write_text(f"{os.getpid()}\n")
        os.chmod(share, 0o755)  # the guest's unprivileged users reach out/ through it
        (share / "out").mkdir()
        os.chmod(share / "out", 0o777)
        exports = {"PYNSBOOK_VM_OUT": GUEST_OUT, "PYNSBOOK_VM_ACCEL": accel, **(env or {})}
        lines = [f"export {k}={shlex.quote(v)}" for k, v in exports.items()]
        (share / "payload").write_text("\n".join(lines) + "\n" + script + "\n")
        cmd = qemu_command(kernel, initramfs, share, accel=accel, memory_mb=memory_mb,
                           cpus=cpus, kernel_args=kernel_args, extra_args=extra_args)
        result = _run(cmd, accel, timeout, ready_timeout, on_line)
        result.files = _collect(share / "out")
        return result
    finally:
        shutil.rmtree(share, ignore_errors=True)


def sweep_stale_shares() -> List[Path]:
    """Remove share directories left by boots whose Python was SIGKILLed (its QEMU died
    with it, through PR_SET_PDEATHSIG, but nothing could remove the directory)."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob("pynsbook-vm-*"):
        try:
            pid = int((path / "owner").read_text())
        except (OSError, ValueError):
            # no owner file: older than this format, or being created right now
            if time.time() - path.stat().st_mtime < 3600:
                continue
            pid = 0
        if pid and Path(f"/proc/{pid}").exists():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _run(cmd: List[str], accel: str, timeout: float, ready_timeout: float,
         on_line: Optional[Callable[[str], None]]) -> BootResult:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_die_with_parent)
    console: List[str] = []
    errors: List[str] = []
    ready_at: Optional[float] = None
    guest_ready: Optional[float] = None
    exit_status: Optional[int] = None
    failure: Optional[str] = None
    partial = {proc.stdout.fileno(): b"", proc.stderr.fileno(): b""}  # type: ignore[union-attr]
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
    sel.register(proc.stderr, selectors.EVENT_READ)  # type: ignore[arg-type]

    def tail() -> str:
        return "\n".join((console + errors)[-40:])

    try:
        open_fds = 2
        while open_fds:
            now = time.monotonic()
            limit = start + (timeout if ready_at is not None else ready_timeout)
            if now >= limit:
                what = "finish" if ready_at is not None else "get ready"
                budget = timeout if ready_at is not None else ready_timeout
                raise BootTimeout(f"VM ({accel}) did not {what} within {budget:.0f} s; "
                                  "QEMU was killed", tail())
            for key, _ in sel.select(timeout=min(1.0, limit - now)):
                fd = key.fileobj.fileno()  # type: ignore[union-attr]
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_fds -= 1
                    chunk = b"\n" if partial[fd] else b""
                data = partial[fd] + chunk
                *done, partial[fd] = data.split(b"\n")
                for raw in done:
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    if fd == proc.stderr.fileno():  # type: ignore[union-attr]
                        errors.append(line)
                        if accel == "kvm" and any(w in line for w in _KVM_FAILURE_WORDS):
                            failure = f"KVM failed: {line.strip()}"
                        continue
                    if line.startswith(READY_MARKER):
                        ready_at = time.monotonic() - start
                        guest_ready = _float(line[len(READY_MARKER):])
                    elif line.startswith(EXIT_MARKER):
                        exit_status = int(line[len(EXIT_MARKER):].split()[0])
                    elif line.startswith(FAIL_MARKER):
                        failure = "guest init failed:" + line[len(FAIL_MARKER):]
                    else:
                        console.append(line)
                        if on_line is not None:
                            on_line(line)
            if failure:
                raise BootFailed(failure, tail())
            if exit_status is not None:
                break
        try:
            proc.wait(timeout=max(1.0, min(10.0, start + timeout - time.monotonic())))
        except subprocess.TimeoutExpired:
            pass  # the guest said it finished; a slow power-off is not a failure
        if exit_status is None:
            raise BootFailed(f"QEMU exited (status {proc.returncode}) before the guest "
                             f"finished: {' / '.join(errors[-3:]) or 'no message'}", tail())
        return BootResult(accel=accel, ready_seconds=ready_at or 0.0,
                          total_seconds=time.monotonic() - start, exit_status=exit_status,
                          guest_uptime_at_ready=guest_ready, console=console)
    finally:
        _kill(proc)
        sel.close()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _float(text: str) -> Optional[float]:
    try:
        return float(text.split()[0])
    except (ValueError, IndexError):
        return None


def _collect(out: Path, limit: int = 64 << 20) -> Dict[str, bytes]:
    files: Dict[str, bytes] = {}
    total = 0
    for path in sorted(out.rglob("*")):
        if path.is_file() and not path.is_symlink():
            size = path.stat().st_size
            if total + size > limit:
                break
            files[str(path.relative_to(out))] = path.read_bytes()
            total += size
    return files


# --------------------------------------------------------------------------- KVM probe


def probe_kvm(kernel: Kernel, initramfs: Path, timeout: float = 20.0) -> bool:
    """Boot once under KVM with a short deadline; True if the guest got ready.

    Here ``/dev/kvm`` exists but a stock kernel dies under it after about a minute, so
    the deadline, not the device, decides. The answer is cached per host kernel, QEMU
    and guest kernel in the VM cache (``kvm-probe.json``).
    """
    if not kvm_usable():
        return False
    qemu = find_qemu()
    key = "|".join((os.uname().release, str(qemu), str(qemu.stat().st_mtime_ns),
                    kernel.release, str(kernel.pvh)))
    path = cache_dir() / "kvm-probe.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return bool(known[key])
    try:
        ok = boot(kernel, initramfs, "true", accel="kvm", timeout=timeout).ok
    except BootFailed:
        ok = False
    known[key] = ok
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(known, indent=1))
    tmp.rename(path)
    return ok


def choose_accel(kernel: Kernel, initramfs: Path) -> str:
    """``$PYNSBOOK_VM_ACCEL`` if set (kvm or tcg), else kvm when the probe boots, else tcg."""
    forced = os.environ.get("PYNSBOOK_VM_ACCEL", "").strip()
    if forced and forced != "auto":
        return forced
    return "kvm" if probe_kvm(kernel, initramfs) else "tcg"
