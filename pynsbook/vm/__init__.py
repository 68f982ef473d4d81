"""Build and boot a QEMU microVM that shares the host's filesystem.

Used by the cgroup-v2 test lane (``tests/vm/lane.py``) and by the container-versus-VM
benchmarks. Standard library only, so it imports on any host; it needs
``qemu-system-x86`` and ``busybox-static`` to boot, and apt/dpkg to fetch a kernel.

    from pynsbook import vm
    kernel = vm.fetch_kernel()                 # or vm.kernel_from_path("/boot/vmlinuz-...")
    initramfs = vm.build_initramfs(kernel)
    result = vm.boot(kernel, initramfs, "cat /sys/fs/cgroup/cgroup.controllers", timeout=120)
    result.accel, result.ready_seconds, result.exit_status, result.console
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional, Tuple

from .errors import BootFailed, BootTimeout, KernelNotFound, VMError, VMSetupError
from .initramfs import DEFAULT_MODULES, build_initramfs, resolve_modules
from .kernel import Kernel, cache_dir, default_package, fetch_kernel, kernel_from_path
from .qemu import BootResult, boot, choose_accel, find_qemu, kvm_usable, probe_kvm

__all__ = [
    "BootFailed", "BootResult", "BootTimeout", "DEFAULT_MODULES", "Kernel", "KernelNotFound",
    "VMError", "VMSetupError", "boot", "build_initramfs", "cache_dir", "choose_accel",
    "default_package", "fetch_kernel", "find_qemu", "kernel_from_path", "kvm_usable",
    "probe_kvm", "resolve_modules", "shell_quote", "prepare",
]


def shell_quote(word: str) -> str:
    """Quote one word for the guest's ``/bin/sh``."""
    return shlex.quote(word)


def prepare(kernel_path: Optional[str] = None) -> Tuple[Kernel, Path]:
    """The kernel (``kernel_path``, else Debian's, fetched once) and its cached initramfs."""
    kernel = kernel_from_path(kernel_path) if kernel_path else fetch_kernel()
    return kernel, build_initramfs(kernel)
