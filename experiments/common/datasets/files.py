"""Finding a data set's files, verifying them, downloading the missing ones into the cache.

Where each file (download unit) is looked for, in this order: ``data_dir`` and ``data_dir/<name>/``, the cache
``cache_dir/<name>/``, the system directories; then it is downloaded into the cache (when allowed). An IDX file
(``train-images-idx3-ubyte.gz``) may also be found uncompressed (``train-images-idx3-ubyte``).

Verification (see `registry.CHECKSUMS`): a file is accepted when its MD5 is the published one. An IDX file whose
bytes differ (an uncompressed copy, or a ``.gz`` recompressed by a mirror or a distribution) is accepted when the
digest of its decompressed content is the published one, or, for sets without a published content digest, when its
structure is right (a `DatasetWarning` says so). Anything else is a `ChecksumError` naming the file, what was
compared and both values. Files in ``data_dir`` and the system directories are never modified; a corrupt cached
file is replaced by a fresh download (or reported, when downloading is off).

Downloads go through `experiments.common.io.atomic_path` (a temporary file in the cache directory, with the
permissions of an ordinary file, moved into place only once verified), so a failed or corrupt download leaves no
file behind, and cache directories created for it are removed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import pathlib
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from experiments.common.datasets.errors import (
    ChecksumError,
    DatasetFormatError,
    DatasetNotFoundError,
    DataSettingError,
    DatasetWarning,
    Setting,
)
from experiments.common.datasets.formats import check_labels, gunzip, parse_idx
from experiments.common.datasets.registry import Spec
from experiments.common.io import atomic_path

__all__ = ["Found", "Resolver", "digest_bytes", "digest_file", "new_dirs_removed_on_error"]

_ALGOS = {32: "md5", 64: "sha256"}
_ALGO_NAMES = {"md5": "MD5", "sha256": "SHA-256"}


def algo_of(hexdigest: str) -> str:
    """The hash that a hex digest comes from, by its length: 32 digits MD5, 64 SHA-256."""
    algo = _ALGOS.get(len(hexdigest))
    if algo is None:
        raise ValueError(f"checksum {hexdigest!r} is neither an MD5 (32 hex digits) nor an SHA-256 (64)")
    return algo


def _hasher(algo: str) -> Any:
    return hashlib.new(algo, usedforsecurity=False)


def digest_file(path: pathlib.Path, algo: str = "md5") -> str:
    h = _hasher(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest_bytes(raw: bytes, algo: str = "md5") -> str:
    h = _hasher(algo)
    h.update(raw)
    return h.hexdigest()


class Found(NamedTuple):
    """A verified file: where it is, its decompressed content when verifying it had to read that (IDX), and how it
    was verified, in words."""

    path: pathlib.Path
    content: bytes | None
    verified_by: str


class Mismatch(NamedTuple):
    expected: str
    got: str
    verified_by: str
    detail: str  # the sentence for the message: what was compared and found


@contextlib.contextmanager
def new_dirs_removed_on_error(directory: pathlib.Path) -> Iterator[None]:
    """Remove again, if the block fails, the directories up to `directory` that did not exist before it (only
    while empty: a concurrent process's files are never touched)."""
    created = []
    d = directory
    while not d.exists() and d != d.parent:
        created.append(d)  # deepest first
        d = d.parent
    try:
        yield
    except BaseException:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise


@dataclass
class Resolver:
    """Finds each file of one data set on disk (verified) or downloads it into the cache."""

    spec: Spec
    checksums: dict[str, str]
    data_dir: pathlib.Path | None
    cache_dir: pathlib.Path  # cache_root / name
    system_dirs: tuple[pathlib.Path, ...]
    download: bool
    base_url: str
    progress: bool
    timeout: float
    settings: dict[str, Setting]

    # ------------------------------------------------------------------------------------------------------------
    # Where files may be

    def user_dirs(self) -> list[pathlib.Path]:
        return [] if self.data_dir is None else [self.data_dir, self.data_dir / self.spec.name]

    def searched(self) -> tuple[pathlib.Path, ...]:
        return (*self.user_dirs(), self.cache_dir, *self.system_dirs)

    def candidates(self, unit: str) -> tuple[str, ...]:
        """The names a download unit may have on disk: as published, then (IDX) uncompressed."""
        return (unit, unit[: -len(".gz")]) if self.spec.is_idx else (unit,)

    def url(self, unit: str) -> str:
        return self.base_url + unit

    # ------------------------------------------------------------------------------------------------------------
    # Verification

    def expected(self, key: str) -> str:
        md5 = self.checksums.get(key)
        if not md5:
            raise ChecksumError(
                f"{self.spec.name}: no checksum known for {key!r}; pass checksums={{{key!r}: '<md5>'}} to load_dataset",
                dataset=self.spec.name,
            )
        return md5.lower()

    def check(self, path: pathlib.Path, unit: str) -> Found | Mismatch:
        """Verify `path` (found under one of `candidates(unit)`) against the published checksums."""
        if not self.spec.is_idx:
            expected, got = self.expected(unit), digest_file(path)
            if got == expected:
                return Found(path, None, "MD5 of the file")
            return Mismatch(expected, got, "MD5 of the file", f"its MD5 is {got}, expected {expected}")
        content_name = unit[: -len(".gz")]
        if path.name != unit:  # uncompressed
            return self.check_content(path, path.read_bytes(), content_name, None)
        expected = self.checksums.get(unit, "").lower()
        got = digest_file(path)
        if got == expected:
            return Found(path, None, "MD5 of the file")
        try:
            content = gunzip(path, path)
        except DatasetFormatError:
            detail = f"its MD5 is {got}, expected {expected}, and it is not a readable gzip file"
            return Mismatch(expected, got, "MD5 of the file", detail)
        return self.check_content(path, content, content_name, got)

    def check_content(
        self, path: pathlib.Path, content: bytes, name: str, compressed_md5: str | None
    ) -> Found | Mismatch:
        """Verify an IDX file's decompressed content: by its published digest, else by its structure."""
        prefix = ""
        if compressed_md5 is not None:
            prefix = (
                f"its MD5 is {compressed_md5}, not the published file's {self.checksums.get(name + '.gz')} "
                f"(a recompressed copy is accepted when its content matches), and "
            )
        expected = self.checksums.get(name, "").lower()
        if expected:
            algo = algo_of(expected)
            how = f"{_ALGO_NAMES[algo]} of the decompressed content"
            got = digest_bytes(content, algo)
            if got == expected:
                return Found(path, content, how)
            return Mismatch(expected, got, how, f"{prefix}the {how} is {got}, expected {expected}")
        shape = self.spec.idx_shapes[name]
        found = "not an IDX file"
        try:
            array = parse_idx(content, path, len(shape))
            found = f"IDX shape {array.shape}"
            if array.shape != shape:
                raise DatasetFormatError(f"{found}, expected {shape}")
            if len(shape) == 1:
                check_labels(array, self.spec.num_classes, path)
        except DatasetFormatError as err:
            return Mismatch(
                f"IDX shape {shape}",
                found,
                "structure",
                f"{prefix}no digest of its decompressed content is published, and its structure is wrong: {err}",
            )
        warnings.warn(
            f"{self.spec.name}: {str(path)!r} is not the published file and no digest of its decompressed content "
            f"is published, so it was checked by its structure only (IDX, shape {shape}"
            + (f", labels in [0, {self.spec.num_classes})" if len(shape) == 1 else "")
            + "). "
            f"Use the published {name}.gz (checked by its MD5) to rule out altered content.",
            DatasetWarning,
            stacklevel=2,
        )
        return Found(path, content, "structure only (no published digest of the decompressed content)")

    def mismatch_error(self, path: pathlib.Path, mismatch: Mismatch, where: str, advice: str) -> ChecksumError:
        return ChecksumError(
            f"{self.spec.name}: {where} file {str(path)!r} is not the published file: {mismatch.detail}. "
            f"The file is corrupt, truncated or a different version. {advice}",
            dataset=self.spec.name,
            path=path,
            expected=mismatch.expected,
            got=mismatch.got,
            verified_by=mismatch.verified_by,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Finding and downloading

    def resolve(self, units: tuple[str, ...] | None = None) -> dict[str, Found]:
        """Each download unit, verified; downloads what is missing. Raises if any cannot be had."""
        units = self.spec.files if units is None else units
        found: dict[str, Found] = {}
        missing: list[str] = []
        for unit in units:
            hit = self.locate(unit)
            if hit is None:
                missing.append(unit)
            else:
                found[unit] = hit
        if missing and not self.download:
            raise self.not_found(
                missing, reason=f"downloading is off ({self.settings['download']} is false)", setting="download"
            )
        for i, unit in enumerate(missing):
            found[unit] = self.fetch(unit, still_missing=missing[i:])
        return found

    def locate(self, unit: str) -> Found | None:
        for d in self.user_dirs():
            for name in self.candidates(unit):
                path = d / name
                if path.is_file():
                    return self._accept(
                        path,
                        unit,
                        "data directory",
                        "It was left in place: replace it with the published file or remove it.",
                    )
        for name in self.candidates(unit):
            path = self.cache_dir / name
            if not path.is_file():
                continue
            result = self.check(path, unit)
            if isinstance(result, Found):
                return result
            if not self.download:
                raise self.mismatch_error(
                    path,
                    result,
                    "cached",
                    f"Delete it, or allow downloading ({self.settings['download']}: true) to replace it with "
                    f"{self.url(unit)}.",
                )
            warnings.warn(
                str(self.mismatch_error(path, result, "cached", "Removing it and downloading it again.")),
                DatasetWarning,
                stacklevel=3,
            )
            path.unlink()
        for d in self.system_dirs:
            for name in self.candidates(unit):
                path = d / name
                if path.is_file():
                    return self._accept(path, unit, "system", "It was left in place (a read-only system copy).")
        return None

    def _accept(self, path: pathlib.Path, unit: str, where: str, advice: str) -> Found:
        result = self.check(path, unit)
        if isinstance(result, Mismatch):
            raise self.mismatch_error(path, result, where, advice)
        return result

    def fetch(self, unit: str, still_missing: list[str]) -> Found:
        """Download one unit into the cache: a temporary file, verified, then moved into place."""
        url = self.url(unit)
        final = self.cache_dir / unit
        with new_dirs_removed_on_error(self.cache_dir):
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                writable = os.access(self.cache_dir, os.W_OK | os.X_OK)
            except OSError as err:
                writable, reason = False, f"{type(err).__name__}: {err}"
            else:
                reason = "permission denied"
            if not writable:
                raise DataSettingError(
                    f"{self.spec.name}: cannot write the download cache {str(self.cache_dir)!r} ({reason}); set "
                    f"{self.settings['cache_dir']} to a writable directory, or put the files in a directory given "
                    f"by {self.settings['data_dir']}.",
                    dataset=self.spec.name,
                    setting="cache_dir",
                    path=self.cache_dir,
                )
            with atomic_path(final, suffix=".part") as tmp:
                got = self._download(url, tmp, unit, still_missing)
                found = self._verify_download(tmp, unit, got, url)
        return Found(final, found.content, found.verified_by)

    def _download(self, url: str, tmp: pathlib.Path, unit: str, still_missing: list[str]) -> str:
        """Stream `url` into `tmp`; the MD5 of what was received. Network failures: `DatasetNotFoundError`."""
        h = _hasher("md5")
        try:
            # Any scheme urllib supports is allowed (a file:// mirror too); integrity comes from the checksum.
            with (
                open(tmp, "wb") as out,
                contextlib.closing(urllib.request.urlopen(url, timeout=self.timeout)) as resp,
            ):
                total = resp.headers.get("Content-Length")
                with _progress_bar(self.progress, total, f"{self.spec.name}/{unit}") as update:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        h.update(chunk)
                        update(len(chunk))
                if total is not None and total.isdigit() and out.tell() != int(total):
                    raise OSError(f"incomplete read: got {out.tell()} of {total} bytes")
        except urllib.error.HTTPError as err:
            raise self.not_found(
                still_missing, reason=f"downloading {url} failed (HTTP {err.code} {err.reason})", setting=None
            ) from err
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:
            # URLError: refused connection, DNS failure; OSError: timeout, reset; HTTPException: a broken
            # response; ValueError: an unsupported URL.
            why = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
            raise self.not_found(still_missing, reason=f"downloading {url} failed ({why})", setting=None) from err
        return h.hexdigest()

    def _verify_download(self, tmp: pathlib.Path, unit: str, got: str, url: str) -> Found:
        if self.spec.is_idx:
            expected = self.checksums.get(unit, "").lower()
            if got == expected:
                return Found(tmp, None, "MD5 of the file")
            try:
                result: Found | Mismatch = self.check_content(tmp, gunzip(tmp, tmp), unit[:-3], got)
            except DatasetFormatError:
                result = Mismatch(
                    expected,
                    got,
                    "MD5 of the file",
                    f"its MD5 is {got}, expected {expected}, and it is not a readable gzip file",
                )
        else:
            expected = self.expected(unit)
            result = (
                Found(tmp, None, "MD5 of the file")
                if got == expected
                else Mismatch(expected, got, "MD5 of the file", f"its MD5 is {got}, expected {expected}")
            )
        if isinstance(result, Found):
            return result
        raise ChecksumError(
            f"{self.spec.name}: the file downloaded from {url} is not the published {unit!r}: {result.detail}. "
            f"Nothing was saved in {str(self.cache_dir)!r}. The server sent a different or corrupt file: try again "
            f"later, choose another mirror ({self.settings['base_url']}), or put a verified copy in a directory "
            f"given by {self.settings['data_dir']}.",
            dataset=self.spec.name,
            path=None,
            expected=result.expected,
            got=result.got,
            verified_by=result.verified_by,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Messages

    def not_found(self, missing: list[str], *, reason: str, setting: str | None) -> DatasetNotFoundError:
        spec, s = self.spec, self.settings
        lines = [f"data set {spec.name!r} not found: {reason}.", "Missing files:"]
        width = max(len(f) for f in missing)
        for f in missing:
            lines.append(f"    {f:<{width}}   (or uncompressed: {f[:-3]})" if spec.is_idx else f"    {f}")
        lines.append("Put them, under these names, into one of these directories:")
        if self.data_dir is not None:
            lines.append(f"    {self.data_dir}   (the data directory: {s['data_dir']})")
            lines.append(f"    {self.data_dir / spec.name}")
        else:
            lines.append(f"    a directory of your choice, given by {s['data_dir']}")
        lines.append(f"    {self.cache_dir}   (the download cache: {s['cache_dir']})")
        for d in self.system_dirs:
            lines.append(f"    {d}   (system directory, read-only)")
        if spec.extracted_dir is not None:
            members = ", ".join(spec.extracted_members)
            lines.append(
                f"An already-extracted directory {spec.extracted_dir}/ (with {members}) in any of them works as well."
            )
        if self.download:
            lines.append(
                f"Or retry when {self.base_url} can be reached (downloads go into {self.cache_dir}), or "
                f"choose a mirror with {s['base_url']}."
            )
        else:
            lines.append(
                f"Or allow downloading ({s['download']}: true) to fetch them from {self.base_url} into "
                f"{self.cache_dir} ({s['base_url']} chooses a mirror)."
            )
        return DatasetNotFoundError(
            "\n".join(lines), dataset=spec.name, setting=setting, missing=missing, searched=self.searched()
        )


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: str | None, desc: str) -> Iterator[Callable[[int], Any]]:
    if not enabled:
        yield lambda n: None
        return
    try:
        from tqdm import tqdm  # optional: only where a bar is drawn
    except ImportError:  # tqdm is an optional dependency ('experiments' extra)
        warnings.warn("progress=True needs tqdm (pip install tqdm); downloading without a progress bar", stacklevel=4)
        yield lambda n: None
        return
    n_total = int(total) if total is not None and total.isdigit() else None
    with tqdm(total=n_total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
        yield bar.update
