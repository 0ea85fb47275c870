"""Ctrl-C and SIGTERM, taken at safe points.

Python's default SIGINT handler raises KeyboardInterrupt at whatever bytecode runs when the signal arrives; inside
a garbage-collection callback (jax registers one) the exception is printed as "Exception ignored" and swallowed,
and the job runs on as if nothing had happened (seen: a SIGINT during the main job lost that way). So while the
job runs, the first SIGINT or SIGTERM only records the request; the job raises KeyboardInterrupt itself at the next
safe point (`check()`: every chunk of a training run, between runs, while waiting for a compilation), which the
command's runner turns into one line and exit status 130. A second signal raises at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_requested = threading.Event()


def _handler(signum, frame):
    if _requested.is_set():  # asked twice: do not wait for a safe point
        raise KeyboardInterrupt
    _requested.set()


@contextlib.contextmanager
def trap() -> Iterator[None]:
    """Within this block (main thread only), SIGINT and SIGTERM request an interrupt instead of raising."""
    _requested.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested.clear()


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if an interrupt was requested (call at safe points)."""
    if _requested.is_set():
        raise KeyboardInterrupt
