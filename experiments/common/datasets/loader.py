"""`load_dataset`: a data set by name, from the user's files, the cache, a system copy or a download."""

from __future__ import annotations

import os
import pathlib
import tarfile
import zlib
from collections.abc import Mapping
from typing import Union

from experiments.common.datasets import registry
from experiments.common.datasets.errors import DatasetFormatError, DatasetNotFoundError, SettingsArg, resolve_settings
from experiments.common.datasets.files import Found, Mismatch, Resolver, digest_file
from experiments.common.datasets.formats import (
    Dataset,
    cifar_to_dataset,
    gunzip,
    idx_dataset,
    load_digits,
    load_svhn,
    parse_idx,
    unpickle_cifar_batch,
)

__all__ = ["DOWNLOAD_TIMEOUT_S", "default_cache_dir", "load_dataset"]

PathLike = Union[str, "os.PathLike[str]"]

#: Seconds before a download's connection or read gives up.
DOWNLOAD_TIMEOUT_S: float = 60.0


def default_cache_dir() -> pathlib.Path:
    """The download cache: ``$DEQ_JAX_DATA_DIR`` if set (and non-empty), else ``~/.cache/deq_jax/datasets``.

    Each data set lives in its own subdirectory ``<cache>/<name>/``. Nothing is created here.
    """
    env = os.environ.get("DEQ_JAX_DATA_DIR", "")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "deq_jax" / "datasets"


def load_dataset(
    name: str,
    *,
    data_dir: PathLike | None = None,
    cache_dir: PathLike | None = None,
    download: bool = True,
    base_url: str | None = None,
    progress: bool = False,
    checksums: Mapping[str, str] | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    settings: SettingsArg = None,
) -> Dataset:
    """Load a data set with its train/test split (see the package docstring for the formats and the search order).

    Args:
        name: one of `DATASETS`.
        data_dir: a directory holding the data set's files, directly or in ``data_dir/<name>/``; searched first.
            Files here are verified but never modified or deleted. It must exist.
        cache_dir: the download cache root (default `default_cache_dir()`); files live in ``cache_dir/<name>/``.
            Created only when a download succeeds.
        download: fetch missing files into the cache. With False, missing files raise `DatasetNotFoundError`.
        base_url: where to download from instead of the canonical host. A file's URL is
            ``base_url.rstrip("/") + "/" + file_name``; a ``{name}`` in ``base_url`` is replaced by the data set
            name (one mirror for all sets). Default: ``$DEQ_JAX_DATA_BASE_URL`` if set, else `DEFAULT_BASE_URLS`.
        progress: show a tqdm progress bar while downloading.
        checksums: digests per file name added to (or replacing entries of) `CHECKSUMS` for this call, e.g. for a
            private mirror's files: MD5 (32 hex digits) or SHA-256 (64).
        timeout: seconds before a download's connection or read gives up.
        settings: how the calling application names the loader's settings in messages (see `SETTINGS`), e.g.
            ``{"data_dir": Setting(key="datasets[0].data_dir")}``; a string is taken as a config key.

    ``digits`` is bundled with scikit-learn: the file and download arguments do not apply to it.

    Raises (every one a `DatasetError`, i.e. a `UserError` the CLIs report in one message with exit status 2):
        DatasetNotFoundError: ``data_dir`` does not exist, or files are missing and downloading is off or failed
            (the message lists the files and the directories to put them in).
        ChecksumError: a found or downloaded file is not the published one.
        DatasetFormatError: a file is not in the expected format.
        DataSettingError: the cache directory cannot be written.
    ValueError (a programming error, not a user's): an unknown ``name`` or an argument of the wrong type.
    """
    if not isinstance(name, str) or name not in registry.DATASETS:
        raise ValueError(f"load_dataset: argument 'name' must be one of {registry.DATASETS}; received {name!r}")
    names = resolve_settings(settings)
    data_path = _check_dir_arg("data_dir", data_dir)
    cache_path = _check_dir_arg("cache_dir", cache_dir)
    for arg, value in (("download", download), ("progress", progress)):
        if not isinstance(value, bool):
            raise ValueError(f"load_dataset: argument '{arg}' must be a bool; received {value!r}")
    if base_url is not None and (not isinstance(base_url, str) or not base_url.strip()):
        raise ValueError(f"load_dataset: argument 'base_url' must be a non-empty string or None; received {base_url!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"load_dataset: argument 'timeout' must be a positive number of seconds; received {timeout!r}")
    if checksums is not None and not isinstance(checksums, Mapping):
        raise ValueError(
            f"load_dataset: argument 'checksums' must be a mapping from file name to hex digest or None; "
            f"received {type(checksums).__name__}"
        )
    if data_path is not None and not data_path.is_dir():
        what = "is not a directory" if data_path.exists() else "does not exist"
        raise DatasetNotFoundError(
            f"data directory {str(data_path)!r} {what} (set by {names['data_dir']}); point it at the directory "
            f"holding the {name} files, or leave it unset to use the cache and downloads",
            dataset=name,
            setting="data_dir",
            path=data_path,
        )

    if name == "digits":
        return load_digits()

    spec = registry.SPECS[name]
    table = {k: v.lower() for k, v in registry.CHECKSUMS.get(name, {}).items()}
    if checksums is not None:
        table.update({str(k): str(v).lower() for k, v in checksums.items()})
    resolver = Resolver(
        spec=spec,
        checksums=table,
        data_dir=data_path,
        cache_dir=(cache_path if cache_path is not None else default_cache_dir()) / name,
        system_dirs=tuple(pathlib.Path(p) for p in registry.SYSTEM_DATA_DIRS.get(name, ())),
        download=download,
        base_url=_resolve_base_url(name, base_url),
        progress=progress,
        timeout=float(timeout),
        settings=names,
    )
    if spec.extracted_dir is not None:
        return _load_cifar(resolver)
    found = resolver.resolve()
    if spec.is_idx:
        return _load_idx(resolver, found)
    return load_svhn(spec, {unit: f.path for unit, f in found.items()})


def _load_idx(resolver: Resolver, found: dict[str, Found]) -> Dataset:
    arrays = {}
    for unit, hit in found.items():
        name = unit[: -len(".gz")]
        content = hit.content
        if content is None:
            content = gunzip(hit.path, hit.path) if hit.path.name.endswith(".gz") else hit.path.read_bytes()
        arrays[name] = (parse_idx(content, hit.path, len(resolver.spec.idx_shapes[name])), hit.path)
    return idx_dataset(resolver.spec, arrays)


def _load_cifar(resolver: Resolver) -> Dataset:
    """CIFAR from an extracted directory or the tarball: data_dir (itself, then data_dir/<name>), cache, download.

    In each user directory an extracted ``cifar-*-py*/`` directory is preferred over the tarball beside it.
    """
    spec = resolver.spec
    assert spec.extracted_dir is not None
    tar_name = spec.files[0]
    if resolver.data_dir is not None and resolver.data_dir.name == spec.extracted_dir:
        ext_dir = resolver.data_dir  # data_dir is the extracted directory itself
        if any((ext_dir / m).exists() for m in spec.extracted_members):
            return _load_cifar_extracted(resolver, ext_dir)
    for d in resolver.user_dirs():
        ext_dir = d / spec.extracted_dir
        if ext_dir.is_dir() and any((ext_dir / m).exists() for m in spec.extracted_members):
            return _load_cifar_extracted(resolver, ext_dir)
        if (d / tar_name).is_file():
            break  # resolve below finds and verifies this tarball
    tar_path = resolver.resolve((tar_name,))[tar_name].path
    batches = []
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            for member in spec.extracted_members:
                arcname = f"{spec.extracted_dir}/{member}"
                try:
                    f = tar.extractfile(arcname)
                except KeyError:
                    f = None
                if f is None:
                    raise DatasetFormatError(
                        f"{str(tar_path)!r}: the archive has no file {arcname!r}", dataset=spec.name, path=tar_path
                    )
                with f:
                    raw = f.read()
                batches.append(unpickle_cifar_batch(raw, f"{tar_path}:{arcname}", spec.num_classes))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DatasetFormatError(
            f"{str(tar_path)!r} is not a readable .tar.gz archive: {err}", dataset=spec.name, path=tar_path
        ) from err
    return cifar_to_dataset(spec, batches[:-1], batches[-1])


def _load_cifar_extracted(resolver: Resolver, ext_dir: pathlib.Path) -> Dataset:
    spec = resolver.spec
    batches = []
    for member in spec.extracted_members:
        path = ext_dir / member
        key = f"{spec.extracted_dir}/{member}"
        if not path.is_file():
            raise DatasetNotFoundError(
                f"{spec.name}: the extracted directory {str(ext_dir)!r} lacks {member!r} (it needs "
                f"{', '.join(spec.extracted_members)}); complete it, or remove it to use {spec.files[0]} instead",
                dataset=spec.name,
                setting="data_dir",
                path=path,
                missing=[key],
                searched=[ext_dir],
            )
        expected, got = resolver.expected(key), digest_file(path)
        if got != expected:
            mismatch = Mismatch(expected, got, "MD5 of the file", f"its MD5 is {got}, expected {expected}")
            raise resolver.mismatch_error(path, mismatch, "data directory", "It was left in place.")
        batches.append(unpickle_cifar_batch(path.read_bytes(), str(path), spec.num_classes))
    return cifar_to_dataset(spec, batches[:-1], batches[-1])


def _check_dir_arg(arg: str, value: PathLike | None) -> pathlib.Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value):
        raise ValueError(
            f"load_dataset: argument '{arg}' must be a path (str or os.PathLike) or None; received {value!r}"
        )
    return pathlib.Path(value).expanduser()


def _resolve_base_url(name: str, base_url: str | None) -> str:
    url = (
        base_url
        if base_url is not None
        else os.environ.get("DEQ_JAX_DATA_BASE_URL", "") or registry.DEFAULT_BASE_URLS[name]
    )
    return url.replace("{name}", name).rstrip("/") + "/"
