"""The applications' one way to write files: atomic writes, the checkpoint store, configuration fingerprints.

Every file is written to a temporary file in its destination directory and moved into place with `os.replace`
(atomic on POSIX), so a reader, or a run killed mid-write, sees either the old file or the new one, never a torn one.
Files get the permissions of an ordinary file (0666 minus the umask): `tempfile.mkstemp` alone would leave 0600.
Within `staged()`, a set of files (a report and its tables) is written to temporary files first and moved into
place only once every one of them is written, so a write that fails (a full disk) leaves the previous set whole.
A write that fails is a `WriteError` (a `UserError`: one line naming the file, exit status 2); a checkpoint that
cannot be read is a `CheckpointCorrupt` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from experiments.common.cli import UserError


class WriteError(UserError):
    """A file that could not be written (a full disk, a read-only folder, a folder in a file's place); the message
    names the file and the system's reason."""


class CheckpointCorrupt(UserError):
    """A checkpoint file that cannot be read (truncated, overwritten, from another program); the message names it."""


def write_error(path: os.PathLike | str, err: OSError) -> WriteError:
    """`err`, raised while writing `path`, as one line: the file and the system's reason."""
    if isinstance(err, (FileExistsError, NotADirectoryError)):  # a file where a folder on the way should be
        for parent in pathlib.Path(path).parents:
            if parent.exists() and not parent.is_dir():
                return WriteError(f"cannot write {path}: {parent} is a file, not a folder")
    reason = err.strerror or str(err) or type(err).__name__
    return WriteError(f"cannot write {path}: {reason}" + (f" (errno {err.errno})" if err.errno else ""))


_staging = threading.local()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str, suffix: str = ".tmp") -> Iterator[pathlib.Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    The temporary file exists (empty) with mode `0666 & ~umask`, as `open(path, "w")` would have created it."""
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
    except OSError as err:
        raise write_error(path, err) from None
    tmp = pathlib.Path(name)
    staged_files = getattr(_staging, "files", None)
    handed_over = False
    try:
        yield tmp  # the caller's own errors (a download's) pass through as they are
        if staged_files is not None:  # within `staged()`: moved into place with the rest of the set
            staged_files.append((tmp, path))
            handed_over = True
            return
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise write_error(path, err) from None
    finally:
        if not handed_over and tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def staged() -> Iterator[None]:
    """Within (this thread): every file written through this module goes to a temporary file beside it; at a normal
    end all of them are moved into place (renames: no space needed, nothing left to fail but the rename), on an
    error none is and the temporary files are removed, so the previous files stay whole. A file written within
    cannot be read back before the end."""
    if getattr(_staging, "files", None) is not None:  # nested: the outer block moves them
        yield
        return
    files: list[tuple[pathlib.Path, pathlib.Path]] = []
    _staging.files = files
    try:
        yield
        _staging.files = None
        for i, (tmp, path) in enumerate(files):
            try:
                os.replace(tmp, path)
            except OSError as err:
                for later, _ in files[i + 1 :]:
                    later.unlink(missing_ok=True)
                raise write_error(path, err) from None
    except BaseException:
        for tmp, _ in files:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _staging.files = None


def write_bytes(path: os.PathLike | str, data: bytes) -> None:
    # no fsync: os.replace is atomic against a killed process, which is the concern
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
        except OSError as err:
            raise write_error(path, err) from None


def write_text(path: os.PathLike | str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: os.PathLike | str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def fingerprint(content: Any, length: int = 16) -> str:
    """A short, stable hash of JSON-able `content` (dict keys sorted): what results depend on, never where files
    live. Two runs with equal fingerprints compute the same numbers, so one may resume the other."""
    text = json.dumps(content, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def save_figure(fig: Any, path: os.PathLike | str, **kwargs: Any) -> None:
    """`fig.savefig` through a temporary file (the format is taken from `path`'s suffix)."""
    path = pathlib.Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", **kwargs)
    write_bytes(path, buf.getvalue())


class CheckpointMismatch(UserError, RuntimeError):
    """The checkpoints on disk were written by a run with another configuration."""


_KEY_RE = re.compile(r"[^A-Za-z0-9_.=-]+")


class CheckpointStore:
    """Named units of work under `root/`: a dict of numpy arrays plus a JSON-able `meta` dict per key, one `.npz`
    file each, written atomically. `root/fingerprint.txt` ties the store to one configuration (`open`)."""

    def __init__(self, root: os.PathLike | str, *, elsewhere: str = "another --run-name"):
        self.root = pathlib.Path(root)
        self.elsewhere = elsewhere  # the command's way to put results in another folder (the mismatch's advice)

    def open(self, fingerprint: str, *, fresh: bool) -> int:
        """Start a fresh store (deleting old checkpoints) or check that the existing one matches `fingerprint`.

        Returns the number of checkpoints found (0 when starting fresh).
        """
        stamp = self.root / "fingerprint.txt"
        if fresh and self.root.exists():
            try:
                shutil.rmtree(self.root)
            except OSError as err:
                raise write_error(self.root, err) from None
        if self.root.exists() and stamp.exists():
            found = stamp.read_text().strip()
            if found != fingerprint:
                raise CheckpointMismatch(
                    f"the checkpoints in {self.root} were written with another configuration (fingerprint {found}, "
                    f"this one {fingerprint}); rerun with --fresh to discard them, or pick {self.elsewhere}"
                )
            return len(list(self.root.glob("*.npz")))
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(self.root, err) from None
        write_text(stamp, fingerprint + "\n")
        return 0

    def _path(self, key: str) -> pathlib.Path:
        return self.root / (_KEY_RE.sub("_", key) + ".npz")

    def save(self, key: str, arrays: dict[str, Any], meta: dict | None = None) -> None:
        payload = {f"a:{k}": np.asarray(v) for k, v in arrays.items()}
        payload["meta"] = np.asarray(json.dumps(meta or {}, sort_keys=True))
        buf = io.BytesIO()
        np.savez(buf, **payload)
        write_bytes(self._path(key), buf.getvalue())

    def load(self, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
        """The arrays and meta saved under `key`, or None; `CheckpointCorrupt` (naming the file, which is left in
        place) if the file cannot be read."""
        path = self._path(key)
        if not path.exists():
            return None
        try:  # our own file handle: np.load leaves its own open when the file is not a zip archive
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
                arrays = {k[2:]: z[k] for k in z.files if k.startswith("a:")}
                meta = json.loads(str(z["meta"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise CheckpointCorrupt(
                f"checkpoint {path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:160]}); "
                f"delete that file to recompute what it held, or rerun with --fresh to discard every checkpoint"
            ) from None
        return arrays, meta

    def cached(self, key: str, compute: Callable[[], tuple[dict, dict]]) -> tuple[dict[str, np.ndarray], dict]:
        """The stored result of `key`, or `compute()`'s (arrays, meta), saved before it is returned."""
        hit = self.load(key)
        if hit is not None:
            return hit
        arrays, meta = compute()
        self.save(key, arrays, meta)
        return self.load(key)  # the same round trip as a resumed run, so both see identical values


class NullStore(CheckpointStore):
    """A store that keeps nothing (for library-style use and tests of single experiments)."""

    def __init__(self):
        super().__init__(os.devnull)

    def open(self, fingerprint: str, *, fresh: bool) -> int:
        return 0

    def save(self, key, arrays, meta=None) -> None:
        return None

    def load(self, key):
        return None

    def cached(self, key, compute):
        arrays, meta = compute()
        return {k: np.asarray(v) for k, v in arrays.items()}, json.loads(json.dumps(meta, sort_keys=True))
