"""Widget messages that arrive while a cell is running: handled at once, in a kernel thread
of their own.

The trap: ipywidgets talk to the kernel over the shell channel, and the kernel's main thread
handles shell messages one at a time. While a cell blocks (a foreground ``%%container`` run,
``time.sleep``, anything), a moved slider's ``comm_msg`` waits behind it, so the slider does
nothing until the cell ends.

The fix, for ipykernel 7 and later: those kernels receive every shell message in a "shell
channel" thread and pass it on to the main thread or to a *subshell* (a thread with its own
event loop, JEP 91). For ``comm_msg``/``comm_close``, the shell channel thread asks the
target comm which subshell should handle it (``comm._reply_subshell_for(data, default)``).
:func:`route_to_subshell` gives our panels' comms one subshell of this kernel, created on
first use, so their messages are handled in that thread whatever the main thread is doing.
Nothing waits on a front end: with no front end nothing arrives, and nothing is wrong.

Chosen over polling the shell queue from the blocked cell (jupyter-ui-poll's way) because:
- it needs no cooperation from the code that blocks: a cell running ``c.run(...)`` or
  ``time.sleep`` directly is covered as well as ``%%container``, and the stop button
  (SIGINT) still reaches the main thread as before;
- jupyter-ui-poll 1.1 calls ``Kernel.do_one_iteration``, which ipykernel 7.4 no longer has
  (its polling then silently does nothing), and replaying held ``execute_request`` messages
  by hand is the fragile part of that approach anyway.
The cost: it leans on two ipykernel details (the manager's ``_create_subshell``, run in the
shell channel thread, and the ``_reply_subshell_for`` hook). Both are feature-detected;
when either is missing :func:`route_to_subshell` returns a reason and the panel says that
its controls act between cells only (a ``--bg`` cell leaves the main thread free anyway).

Handlers routed here run in the subshell thread: they must be thread-safe against the
main thread (the panel's only call ``Container.update/freeze/thaw/stop``).
"""
from __future__ import annotations

import threading
from typing import Any, Iterable, Optional

__all__ = ["route_to_subshell", "subshell_id"]

_LOCK = threading.Lock()
_SUBSHELL: Optional[str] = None
_WHY_NOT: Optional[str] = None


def _kernel() -> Any:
    try:
        from ipykernel.kernelbase import Kernel
    except ImportError:
        return None
    return Kernel.instance() if Kernel.initialized() else None


def _create(kernel: Any, timeout: float = 5.0) -> str:
    thread = getattr(kernel, "shell_channel_thread", None)
    manager = getattr(thread, "manager", None) if thread is not None else None
    create = getattr(manager, "_create_subshell", None)
    if create is None or not getattr(kernel, "_supports_kernel_subshells", False):
        raise RuntimeError("this kernel has no subshells (ipykernel 7 or later has them)")
    done = threading.Event()
    result: dict = {}

    def make() -> None:  # runs in the shell channel thread, as the manager requires
        try:
            result["id"] = create()
        except BaseException as err:  # noqa: BLE001 - reported to the caller
            result["error"] = err
        finally:
            done.set()

    thread.io_loop.add_callback(make)
    if not done.wait(timeout):
        raise RuntimeError("the kernel's shell channel thread did not create a subshell")
    if "error" in result:
        raise RuntimeError(f"could not create a subshell: {result['error']}")
    return str(result["id"])


def subshell_id() -> Optional[str]:
    """This kernel's subshell for widget messages (created on first call), or None."""
    global _SUBSHELL, _WHY_NOT
    with _LOCK:
        if _SUBSHELL is not None or _WHY_NOT is not None:
            return _SUBSHELL
        kernel = _kernel()
        if kernel is None:
            _WHY_NOT = "not running in a Jupyter kernel"
            return None
        try:
            _SUBSHELL = _create(kernel)
        except RuntimeError as err:
            _WHY_NOT = str(err)
        return _SUBSHELL


def why_not() -> Optional[str]:
    """Why widget messages cannot be handled during a running cell (None if they can)."""
    subshell_id()
    return _WHY_NOT


def route_to_subshell(widgets: Iterable[Any]) -> Optional[str]:
    """Have the shell channel hand these widgets' messages to this kernel's widget
    subshell. Returns None when done, else the reason it cannot be done here."""
    sid = subshell_id()
    if sid is None:
        return _WHY_NOT
    for w in widgets:
        comm = getattr(w, "comm", None)
        if comm is None:
            continue
        if not hasattr(comm, "_reply_subshell_for"):
            return ("this ipykernel does not route widget messages to subshells "
                    "(ipykernel 7.4 or later does)")
        # an instance attribute: the kernel looks it up with getattr on the comm
        comm._reply_subshell_for = lambda data, default, _sid=sid: _sid
    return None
