"""pynsbook: run notebook cells as real Linux containers — namespaces, cgroup limits, an
overlay root — and measure them against virtual machines.

    >>> import pynsbook
    >>> pynsbook.run("print('hello from a container')", memory="64M").stdout
    'hello from a container\\n'

Names are imported lazily: a container's init imports ``pynsbook.engine`` on every start,
and must not pay for the notebook-side modules.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "run": "engine.container", "Container": "engine.container",
    "containers": "engine.container", "get": "engine.container",
    "doctor": "doctor", "RunResult": "results", "Stats": "results",
    "PynsbookError": "errors", "OptionError": "errors", "UnsupportedError": "errors",
    "ContainerError": "errors", "ContainerNotFound": "errors", "ContainerStateError": "errors",
    "load_ipython_extension": "magics", "unload_ipython_extension": "magics",
}
__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .doctor import doctor
    from .engine.container import Container, containers, get, run
    from .errors import (ContainerError, ContainerNotFound, ContainerStateError, OptionError,
                         PynsbookError, UnsupportedError)
    from .results import RunResult, Stats


#: subpackages reachable as attributes (``pynsbook.images.table()``) without an import
_SUBMODULES = ("images", "bench", "vm", "widgets", "monitor", "plot", "cgroups", "probe", "spec")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pynsbook' has no attribute {name!r}")
