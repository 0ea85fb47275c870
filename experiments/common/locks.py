"""One run per output folder: a lock file in the folder names the run that writes there.

    with folder_lock(out, flag="--out", log=print):
        ...  # compute, then write the results

The lock file (`run.lock`, or `NAME.lock` beside one output file) holds the owner's pid, host, start time and
command line, and is created whole or not at all (written to a temporary file, then hard-linked to its name, which
fails if the name exists; where a file system has no hard links, `O_CREAT | O_EXCL`). A second run is refused with
one line naming the owner (`FolderLocked`, a `UserError`: exit status 2). A lock whose owner is dead (the same host,
its pid not running; a run killed with SIGKILL leaves one) is taken over with a message. On another host the owner's
liveness cannot be checked: the message says which file to delete once that run is known to be gone.

Taking the lock is also the check that the folder can be written, before anything is computed: a path that is a
file, a read-only folder or a full disk is a one-line `experiments.common.io.WriteError`. Folders the lock created
are removed again when it is released if nothing else was written into them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

from experiments.common.cli import UserError
from experiments.common.io import write_error

LOCK_NAME = "run.lock"

_held: set[pathlib.Path] = set()  # the locks this process holds (a pid reused by this process is not an owner)
_held_guard = threading.Lock()


class FolderLocked(UserError):
    """Another run (alive, or on another host) holds the folder's lock."""


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {when}"


def _read(path: pathlib.Path) -> dict | None:
    """The lock's owner record; None if the file is gone; {} if it does not parse (not a lock of ours)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(path: pathlib.Path, owner: dict) -> bool:
    """Whether the lock's owner is certainly gone: a process of this host that no longer runs (or this process's own
    pid, from a process that had it before, while this process holds no such lock)."""
    pid, host = owner.get("pid"), owner.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return False
    if pid == os.getpid():
        with _held_guard:
            return path not in _held
    return not _alive(pid)


def _create(path: pathlib.Path, record: dict) -> bool:
    """Create `path` holding `record`, whole, unless it exists (False then)."""
    text = json.dumps(record, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
        try:  # no hard links here: create exclusively, then write (a reader may briefly see it empty)
            fd2 = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd2, "w") as fh:
            fh.write(text)
        return True
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)


def _missing_parents(folder: pathlib.Path) -> list[pathlib.Path]:
    """`folder` and its ancestors that do not exist yet, innermost first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


@contextlib.contextmanager
def folder_lock(
    folder: os.PathLike | str,
    *,
    flag: str,
    name: str = LOCK_NAME,
    target: os.PathLike | str | None = None,
    log: Callable[[str], None] | None = None,
) -> Iterator[pathlib.Path]:
    """Hold `folder/name` for the block: create the folder (removed again at the end if this lock created it and it
    stayed empty), refuse if another live run holds it (`FolderLocked`), take over a dead owner's lock (saying so
    through `log`). `flag` is how the user chose the folder (e.g. "--out") and `target` what it named (default: the
    folder; e.g. the output file whose folder this is), for the messages.

    Yields the lock file's path. Raises `experiments.common.io.WriteError` if the folder cannot be written."""
    folder = pathlib.Path(folder)
    named = f"{flag} {target if target is not None else folder}"
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise UserError(f"{named}: {p} is a file, not a folder")
    path = folder / name
    created = _missing_parents(folder)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.time(),
        "command": " ".join(sys.argv),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            if _create(path, record):
                break
            owner = _read(path)
            if owner is None:  # released meanwhile
                continue
            if not owner:  # being written (no hard links), or not a lock of ours
                fresh = True
                with contextlib.suppress(FileNotFoundError):
                    fresh = time.time() - path.stat().st_mtime < 2.0
                if fresh:
                    time.sleep(0.1)
                    continue
                raise FolderLocked(
                    f"{named}: the lock file {path} is not a run's lock record; delete it if no run writes to {folder}"
                )
            if _stale(path, owner):
                aside = path.with_name(f"{name}.stale-{os.getpid()}")
                try:
                    os.rename(path, aside)  # only one of several runs taking it over gets to rename it
                except FileNotFoundError:
                    continue
                if _read(aside) != owner:  # another run took it over first: this is its live lock, put it back
                    with contextlib.suppress(OSError):
                        os.link(aside, path)
                    aside.unlink(missing_ok=True)
                    continue
                aside.unlink(missing_ok=True)
                if log is not None:
                    log(f"taking over the lock {path} of a run that is gone ({_describe(owner)})")
                continue
            advice = (
                f"if that run is gone, delete {path}"
                if owner.get("host") != socket.gethostname()
                else "wait for it to finish"
            )
            raise FolderLocked(
                f"{named} is in use by another run ({_describe(owner)}); {advice}, or choose another {flag}"
            )
        else:
            raise FolderLocked(f"{named}: could not take the lock {path} (other runs keep taking it)")
    except OSError as err:
        _remove_empty(created)
        raise write_error(getattr(err, "filename", None) or path, err) from None
    except BaseException:
        _remove_empty(created)
        raise
    with _held_guard:
        _held.add(path)
    try:
        yield path
    finally:
        with _held_guard:
            _held.discard(path)
        owner = _read(path)
        if owner and owner.get("pid") == record["pid"] and owner.get("started") == record["started"]:
            path.unlink(missing_ok=True)
        _remove_empty(created)


def _remove_empty(created: list[pathlib.Path]) -> None:
    for p in created:  # innermost first
        try:
            p.rmdir()
        except OSError:
            break


__all__ = ["LOCK_NAME", "FolderLocked", "folder_lock"]
