"""The error hierarchy: every failure pynsbook reports prints as one readable line.

Errors cross from the container's init back to the notebook as JSON, so each one is
rebuilt from its fields (``to_dict``/``from_dict``) and pickles cleanly.
"""
from __future__ import annotations

from typing import Any, Optional


class PynsbookError(Exception):
    """Base class: ``str(err)`` is one line a student can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self).__name__, self.to_dict()))

    def to_dict(self) -> dict:
        return {"kind": type(self).__name__, "message": self.message}


class OptionError(PynsbookError, ValueError):
    """A bad value for an option: names the value and the accepted form."""

    def __init__(self, option: str, value: Any, accepted: str) -> None:
        self.option, self.value, self.accepted = option, value, accepted
        super().__init__(f"invalid value {value!r} for {option}: expected {accepted}")

    def to_dict(self) -> dict:
        return {"kind": "OptionError", "option": self.option, "value": self.value,
                "accepted": self.accepted}


class UnsupportedError(PynsbookError):
    """The host cannot do what was asked: why, and the command that would enable it."""

    def __init__(self, what: str, reason: str, fix: Optional[str] = None) -> None:
        self.what, self.reason, self.fix = what, reason, fix
        text = f"{what}: {reason}"
        if fix:
            text += f" (to enable: {fix})"
        super().__init__(text)

    def to_dict(self) -> dict:
        return {"kind": "UnsupportedError", "what": self.what, "reason": self.reason,
                "fix": self.fix}


class ContainerError(PynsbookError):
    """The container could not be set up or run (a mount, a namespace, an exec failed)."""

    def __init__(self, message: str, errno: Optional[int] = None) -> None:
        self.errno = errno
        super().__init__(message)

    def to_dict(self) -> dict:
        return {"kind": "ContainerError", "message": self.message, "errno": self.errno}


class ContainerNotFound(PynsbookError, KeyError):
    """No container of that name in this session."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no container named {name!r} (see `pynsbook.containers()` or `%container ls`)")

    def to_dict(self) -> dict:
        return {"kind": "ContainerNotFound", "name": self.name}


class ContainerStateError(PynsbookError):
    """The operation does not fit the container's state (not started, already stopped)."""

    def to_dict(self) -> dict:
        return {"kind": "ContainerStateError", "message": self.message}


_KINDS = {cls.__name__: cls for cls in (PynsbookError, OptionError, UnsupportedError,
                                          ContainerError, ContainerNotFound, ContainerStateError)}


def _rebuild(kind: str, fields: dict) -> PynsbookError:
    return error_from_dict({**fields, "kind": kind})


def error_from_dict(fields: dict) -> PynsbookError:
    """Rebuild an error sent as JSON by the container's init."""
    fields = dict(fields)
    cls = _KINDS.get(fields.pop("kind", ""), PynsbookError)
    if cls is OptionError:
        return OptionError(fields["option"], fields["value"], fields["accepted"])
    if cls is UnsupportedError:
        return UnsupportedError(fields["what"], fields["reason"], fields.get("fix"))
    if cls is ContainerError:
        return ContainerError(fields["message"], fields.get("errno"))
    if cls is ContainerNotFound:
        return ContainerNotFound(fields["name"])
    return cls(fields.get("message", "unknown error"))
