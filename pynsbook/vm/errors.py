"""Errors raised by :mod:`pynsbook.vm`.

Every error prints as one readable line, so the command line can show it without a
traceback. They live here rather than in ``pynsbook.errors`` so that the VM layer stays
usable on its own (the lane runner imports it with nothing else of the project).
"""

from __future__ import annotations


class VMError(Exception):
    """Base class of everything :mod:`pynsbook.vm` raises on purpose."""


class KernelNotFound(VMError, ValueError):
    """The kernel the user named does not exist or is not a kernel image."""


class VMSetupError(VMError):
    """A host tool or file the VM needs is missing (qemu, busybox-static, apt-get...)."""


class BootFailed(VMError):
    """QEMU exited, or the guest's init failed, before the payload finished."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        super().__init__(message)
        self.console_tail = console_tail

    def __reduce__(self):  # keep the console tail when pickled across processes
        return (type(self), (self.args[0], self.console_tail))


class BootTimeout(BootFailed):
    """The guest did not get ready, or did not finish, within its timeout; QEMU was killed."""
