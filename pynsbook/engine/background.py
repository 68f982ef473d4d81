"""One background thread for work that must not delay a result: removing containers that
have ended, and preparing spare containers. A single thread, so that this work queues
behind itself instead of competing for the interpreter with the run that follows.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Optional

_tasks: "queue.Queue[Optional[tuple]]" = queue.Queue()
_thread: Optional[threading.Thread] = None
_lock = threading.Lock()


def _work() -> None:
    while True:
        item = _tasks.get()
        try:
            if item is not None:
                fn, args = item
                fn(*args)
        except BaseException:
            pass  # a failed clean-up must not stop the ones behind it
        finally:
            _tasks.task_done()


def submit(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on the background thread, after what was submitted before."""
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_work, daemon=True, name="pynsbook-background")
            _thread.start()
    _tasks.put((fn, args))


def drain(timeout: float = 10.0) -> bool:
    """Wait until everything submitted has run (at interpreter exit); False on timeout."""
    deadline = time.monotonic() + timeout
    with _tasks.all_tasks_done:
        while _tasks.unfinished_tasks:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _tasks.all_tasks_done.wait(left)
    return True
