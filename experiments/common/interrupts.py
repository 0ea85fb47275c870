"""Ctrl-C and SIGTERM, for every subcommand: one request flag, raised at once or at the next safe point.

Python's default SIGINT handler raises KeyboardInterrupt at whatever bytecode runs when the signal lands. Inside a
garbage-collection callback (jax registers one) or a `__del__`, Python prints "Exception ignored" and runs on, so
the request would be lost. Two modes share one flag and one handler:

- `handled()` (entered by `experiments.common.cli.run` around every command): SIGINT (unless the process ignores
  it, as a background job does) and SIGTERM raise KeyboardInterrupt where the program is, so that it stops at once.
  A KeyboardInterrupt swallowed on its way is not printed but raised again `RERAISE_S` later (a SIGALRM to the same
  handler), and `check()` raises it at the next safe point.
- `safe_points()` (around work that should stop only between steps: a training run that checkpoints, a benchmark
  that writes its files at the end): within, the first signal only records the request, `check()` raises it at the
  next safe point, and a second signal raises at once (a user who does not want to wait).

The command's runner turns the KeyboardInterrupt into one line on stderr and exit status 130.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

RERAISE_S = 0.05  # after a swallowed interrupt: long enough to leave the callback that swallowed it

_requested = threading.Event()
_deferred = False  # within `safe_points()`: the first signal waits for `check()`


def _handler(signum, frame):
    """Record the request; raise KeyboardInterrupt unless it is the first one within `safe_points()`."""
    if _deferred and not _requested.is_set():
        _requested.set()
        return
    _requested.set()
    raise KeyboardInterrupt


def requested() -> bool:
    """Whether Ctrl-C or SIGTERM arrived (within `handled()` or `safe_points()`)."""
    return _requested.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C or SIGTERM arrived: call it at safe points of long work (between chunks,
    runs, rows, before writing files). A no-op when nothing was requested, and outside `handled()`."""
    if _requested.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Within (main thread only): SIGINT (unless ignored) and SIGTERM raise KeyboardInterrupt at once; one swallowed
    on its way is raised again shortly after (SIGALRM) and by `check()`. Outside: the previous handlers."""
    _requested.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _handler),
        signal.SIGALRM: signal.signal(signal.SIGALRM, _handler),
    }
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _handler)
    hook = sys.unraisablehook

    def unraisable(info):
        if isinstance(info.exc_value, KeyboardInterrupt) and _requested.is_set():
            signal.setitimer(signal.ITIMER_REAL, RERAISE_S)
        else:
            hook(info)

    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.unraisablehook = hook
        for signum, old in previous.items():
            signal.signal(signum, old)
        _requested.clear()


@contextlib.contextmanager
def safe_points() -> Iterator[None]:
    """Within (main thread only): the first SIGINT or SIGTERM only records the request, which `check()` raises; a
    second raises at once. Inside `handled()` it uses that block's handlers, elsewhere it installs them itself."""
    global _deferred
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with contextlib.ExitStack() as stack:
        if signal.getsignal(signal.SIGTERM) is not _handler:  # not inside `handled()`
            stack.enter_context(handled())
        outer, _deferred = _deferred, True
        try:
            yield
        finally:
            _deferred = outer


__all__ = ["RERAISE_S", "check", "handled", "requested", "safe_points"]
