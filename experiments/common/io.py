"""The applications' one way to write files: atomic writes, the checkpoint store, configuration fingerprints.

Every file is written to a temporary file in its destination directory and moved into place with `os.replace`
(atomic on POSIX), so a reader, or a run killed mid-write, sees either the old file or the new one, never a torn one.
Files get the permissions of an ordinary file (0666 minus the umask): `tempfile.mkstemp` alone would leave 0600.
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
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str, suffix: str = ".tmp") -> Iterator[pathlib.Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    The temporary file exists (empty) with mode `0666 & ~umask`, as `open(path, "w")` would have created it."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: os.PathLike | str, data: bytes) -> None:
    # no fsync: os.replace is atomic against a killed process, which is the concern
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


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


class CheckpointMismatch(RuntimeError):
    """The checkpoints on disk were written by a run with another configuration."""


_KEY_RE = re.compile(r"[^A-Za-z0-9_.=-]+")


class CheckpointStore:
    """Named units of work under `root/`: a dict of numpy arrays plus a JSON-able `meta` dict per key, one `.npz`
    file each, written atomically. `root/fingerprint.txt` ties the store to one configuration (`open`)."""

    def __init__(self, root: os.PathLike | str):
        self.root = pathlib.Path(root)

    def open(self, fingerprint: str, *, fresh: bool) -> int:
        """Start a fresh store (deleting old checkpoints) or check that the existing one matches `fingerprint`.

        Returns the number of checkpoints found (0 when starting fresh).
        """
        stamp = self.root / "fingerprint.txt"
        if fresh and self.root.exists():
            shutil.rmtree(self.root)
        if self.root.exists() and stamp.exists():
            found = stamp.read_text().strip()
            if found != fingerprint:
                raise CheckpointMismatch(
                    f"the checkpoints in {self.root} were written with another configuration (fingerprint {found}, "
                    f"this one {fingerprint}); rerun with --fresh to discard them, or pick another --run-name"
                )
            return len(list(self.root.glob("*.npz")))
        self.root.mkdir(parents=True, exist_ok=True)
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
        path = self._path(key)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            arrays = {k[2:]: z[k] for k in z.files if k.startswith("a:")}
            meta = json.loads(str(z["meta"]))
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
