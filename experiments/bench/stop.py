"""Ctrl-C and SIGTERM during a benchmark run: noted at once, acted on at the next checkpoint.

A KeyboardInterrupt raised inside whatever Python happens to run when the signal lands can be swallowed: inside a
garbage-collection callback (JAX registers one) Python prints "Exception ignored" and carries on, and the run would
complete and write its files after the user asked it to stop. So the handler only records the request, and the
runner calls `checkpoint()` before every row it builds, every step it runs and every file it writes: there the
request becomes a KeyboardInterrupt, which the command line reports in one line with exit status 130, before
anything is written. A second signal raises at once (a user who does not want to wait for the current step).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_requested = threading.Event()


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Within: SIGINT and SIGTERM request a stop (see the module docstring); outside, the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _requested.is_set():
            raise KeyboardInterrupt
        _requested.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    _requested.clear()
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _requested.clear()


def checkpoint() -> None:
    """Raise KeyboardInterrupt if a stop was requested."""
    if _requested.is_set():
        raise KeyboardInterrupt
