"""Real data sets for the experiments: loading from disk, checksummed download with a cache, preprocessing.

Data sets (`DATASETS`):

* ``digits`` -- scikit-learn's bundled 8x8 digits (1797 images, no download). It has no official split, so
  this module uses a fixed stratified split: ``sklearn.model_selection.train_test_split(test_size=0.2,
  random_state=0, stratify=y)``, i.e. 1437 train / 360 test images. Pixels 0..16 are scaled by 1/16.
* ``fashion_mnist``, ``mnist``, ``kmnist`` -- the four standard IDX ``.gz`` files (28x28 grey images, 10 classes),
  parsed here with numpy + gzip. Pixels are scaled by 1/255.
* ``cifar10``, ``cifar100`` -- the canonical python-pickle tarballs (32x32 colour images; CIFAR-100 uses the 100
  ``fine_labels``), or the directory that the tarball extracts to. Pixels are scaled by 1/255.
* ``svhn`` -- ``train_32x32.mat`` and ``test_32x32.mat`` (the cropped-digits format; label 10 means digit 0 and is
  mapped to 0). Pixels are scaled by 1/255.

Every `Dataset` holds flattened float32 images in [0, 1] and int32 labels. Colour images are flattened in
height-width-channel order, so ``x.reshape((-1,) + ds.image_shape)`` gives images of shape (32, 32, 3) for the
CIFAR and SVHN sets (the CIFAR files store channel-major rows; they are converted).

Where files are looked for, in this order, for each file a data set needs:

1. ``data_dir`` (argument), the standard file names directly inside it or inside ``data_dir/<name>/``;
2. the cache, ``cache_dir/<name>/`` (argument; default `default_cache_dir()`: ``$DEQ_JAX_DATA_DIR`` if set,
   else ``~/.cache/deq_jax/datasets``);
3. system directories from `SYSTEM_DATA_DIRS` (Fashion-MNIST: ``/usr/share/datasets/fashion-mnist``, installed by
   the Debian package ``dataset-fashion-mnist``);
4. a download into the cache (when ``download=True``), from the canonical host of each data set or from
   ``base_url`` / ``$DEQ_JAX_DATA_BASE_URL``.

Every file is checked against the MD5 table `CHECKSUMS` before it is read, wherever it was found; for gzip files
whose compressed bytes differ from the canonical file (the Debian package recompressed Fashion-MNIST), the MD5 of
the decompressed payload is accepted too where `CONTENT_CHECKSUMS` knows it. A mismatch raises `ChecksumError`
naming the file. Downloads go to a temporary file in the cache directory and are moved into place with
`os.replace` only after the checksum matched, so a failed or corrupt download leaves no file behind. Pickled CIFAR
batches are unpickled only after their checksum matched.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import pathlib
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Union

import numpy as np

__all__ = [
    "CHECKSUMS",
    "CONTENT_CHECKSUMS",
    "ChecksumError",
    "DATASETS",
    "DEFAULT_BASE_URLS",
    "Dataset",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "Preprocessed",
    "SYSTEM_DATA_DIRS",
    "default_cache_dir",
    "load_dataset",
    "one_hot",
    "preprocess",
]

PathLike = Union[str, "os.PathLike[str]"]

DATASETS: tuple[str, ...] = ("digits", "fashion_mnist", "mnist", "kmnist", "cifar10", "cifar100", "svhn")

FEATURES: tuple[str, ...] = ("raw", "standardize", "pca_whiten")

#: Seconds before a download's connection or read gives up.
DOWNLOAD_TIMEOUT_S: float = 60.0

_IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

#: Canonical download locations (those torchvision uses); a file's URL is this prefix + its file name.
DEFAULT_BASE_URLS: dict[str, str] = {
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "kmnist": "http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "cifar100": "https://www.cs.toronto.edu/~kriz/",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
}

#: MD5 of every file, as torchvision's ``datasets/mnist.py``, ``cifar.py`` and ``svhn.py`` list them. Keys of the
#: inner dicts are file names; for CIFAR, ``"<extracted dir>/<member>"`` keys check an already-extracted directory.
#: Tests (or users of a private mirror) may replace entries, e.g. with ``monkeypatch.setitem``.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "kmnist": {
        "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
        "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
        "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    },
    "cifar100": {
        "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
        "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    },
    "svhn": {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    },
}

#: MD5 of the decompressed payload of gzip files, accepted when the compressed bytes differ from the canonical
#: file (same data, other compressor settings). Fashion-MNIST's values are the published MD5s of the raw IDX files;
#: the Debian package's recompressed files decompress to exactly these.
CONTENT_CHECKSUMS: dict[str, dict[str, str]] = {
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

#: Read-only directories searched after the cache (files there are never modified or deleted).
SYSTEM_DATA_DIRS: dict[str, tuple[pathlib.Path, ...]] = {
    "fashion_mnist": (pathlib.Path("/usr/share/datasets/fashion-mnist"),),
}


class DatasetNotFoundError(FileNotFoundError):
    """The data set's files are not on disk and could not be downloaded; the message says where to put them."""


class ChecksumError(RuntimeError):
    """A data file's MD5 does not match the expected one."""


class DatasetFormatError(ValueError):
    """A data file has the right checksum (or none was known) but not the expected format."""


class Dataset(NamedTuple):
    """A data set with its official train/test split (a fixed stratified split for ``digits``).

    ``x_*`` are float32 of shape (n, prod(image_shape)) with values in [0, 1]; ``y_*`` are int32 class labels in
    ``[0, num_classes)``. Colour images are flattened in height-width-channel order.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    num_classes: int
    image_shape: tuple


class Preprocessed(NamedTuple):
    """The output of `preprocess`: transformed float64 features, int labels, and a record of what was done."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    info: dict


# ---------------------------------------------------------------------------------------------------------------
# Data set descriptions


@dataclass(frozen=True)
class _Spec:
    name: str
    files: tuple[str, ...]  # download units (what is fetched and cached)
    num_classes: int
    image_shape: tuple[int, ...]
    extracted_dir: Optional[str] = None  # CIFAR: the directory the tarball extracts to
    extracted_members: tuple[str, ...] = ()


_SPECS: dict[str, _Spec] = {
    "fashion_mnist": _Spec("fashion_mnist", _IDX_FILES, 10, (28, 28)),
    "mnist": _Spec("mnist", _IDX_FILES, 10, (28, 28)),
    "kmnist": _Spec("kmnist", _IDX_FILES, 10, (28, 28)),
    "cifar10": _Spec(
        "cifar10",
        ("cifar-10-python.tar.gz",),
        10,
        (32, 32, 3),
        extracted_dir="cifar-10-batches-py",
        extracted_members=tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
    ),
    "cifar100": _Spec(
        "cifar100",
        ("cifar-100-python.tar.gz",),
        100,
        (32, 32, 3),
        extracted_dir="cifar-100-python",
        extracted_members=("train", "test"),
    ),
    "svhn": _Spec("svhn", ("train_32x32.mat", "test_32x32.mat"), 10, (32, 32, 3)),
}


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


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
    data_dir: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
    download: bool = True,
    base_url: Optional[str] = None,
    progress: bool = False,
    checksums: Optional[Mapping[str, str]] = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Dataset:
    """Load a data set with its train/test split (see the module docstring for the formats and the search order).

    Args:
        name: one of `DATASETS`.
        data_dir: a directory holding the data set's files, directly or in ``data_dir/<name>/``; searched first.
            Files here are verified but never modified or deleted.
        cache_dir: the download cache root (default `default_cache_dir()`); files live in ``cache_dir/<name>/``.
        download: fetch missing files into the cache. With False, missing files raise `DatasetNotFoundError`.
        base_url: where to download from instead of the canonical host. A file's URL is
            ``base_url.rstrip("/") + "/" + file_name``; a ``{name}`` in ``base_url`` is replaced by the data set
            name (one mirror for all sets). Default: ``$DEQ_JAX_DATA_BASE_URL`` if set, else `DEFAULT_BASE_URLS`.
        progress: show a tqdm progress bar while downloading.
        checksums: MD5 per file name overriding `CHECKSUMS` for this call (e.g. for a private mirror's files).
        timeout: seconds before a download's connection or read gives up.

    ``digits`` is bundled with scikit-learn: the file and download arguments do not apply to it.

    Raises:
        ValueError: an unknown ``name`` or an invalid argument.
        DatasetNotFoundError: files missing and downloading disabled or failed (the message lists the files and
            the directories to put them in).
        ChecksumError: a found or downloaded file does not match its checksum.
        DatasetFormatError: a file is not in the expected format.
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"load_dataset: argument 'name' must be one of {DATASETS}; received {name!r}")
    data_path = _check_dir_arg("data_dir", data_dir, must_exist=True)
    cache_path = _check_dir_arg("cache_dir", cache_dir, must_exist=False)
    for arg, value in (("download", download), ("progress", progress)):
        if not isinstance(value, bool):
            raise ValueError(f"load_dataset: argument '{arg}' must be a bool; received {value!r}")
    if base_url is not None and (not isinstance(base_url, str) or not base_url.strip()):
        raise ValueError(
            f"load_dataset: argument 'base_url' must be a non-empty string or None; received {base_url!r}"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(
            f"load_dataset: argument 'timeout' must be a positive number of seconds; received {timeout!r}"
        )
    if checksums is not None and not isinstance(checksums, Mapping):
        raise ValueError(
            f"load_dataset: argument 'checksums' must be a mapping from file name to MD5 hex digest or None; "
            f"received {type(checksums).__name__}"
        )

    if name == "digits":
        return _load_digits()

    spec = _SPECS[name]
    table = dict(CHECKSUMS.get(name, {}))
    if checksums is not None:
        table.update({str(k): str(v).lower() for k, v in checksums.items()})
    resolver = _Resolver(
        spec=spec,
        checksums=table,
        content_checksums=dict(CONTENT_CHECKSUMS.get(name, {})) if checksums is None else {},
        data_dir=data_path,
        cache_dir=(cache_path if cache_path is not None else default_cache_dir()) / name,
        system_dirs=tuple(pathlib.Path(p) for p in SYSTEM_DATA_DIRS.get(name, ())),
        download=download,
        base_url=_resolve_base_url(name, base_url),
        progress=progress,
        timeout=float(timeout),
    )
    if spec.extracted_dir is not None:
        return _load_cifar(spec, resolver)
    paths = resolver.resolve_files()
    if name == "svhn":
        return _load_svhn(spec, paths)
    return _load_idx_dataset(spec, paths)


def one_hot(y: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot encode integer labels ``y`` of shape (n,) into a float32 array of shape (n, num_classes)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"one_hot: argument 'num_classes' must be a positive integer; received {num_classes!r}")
    y = np.asarray(y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise ValueError(
            f"one_hot: argument 'y' must be a 1-D array of integer labels; received shape {y.shape} dtype {y.dtype}"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"one_hot: argument 'y' must have labels in [0, {int(num_classes)}); "
            f"received labels in [{int(y.min())}, {int(y.max())}]"
        )
    out = np.zeros((y.shape[0], int(num_classes)), dtype=np.float32)
    out[np.arange(y.shape[0]), y.astype(np.int64)] = 1.0
    return out


#: Columns whose train standard deviation is at or below this are dropped by ``standardize``/``pca_whiten``.
ZERO_VARIANCE_TOL: float = 1e-10
#: ``pca_whiten`` refuses components whose variance is below this fraction of the largest one.
PCA_RANK_RTOL: float = 1e-10


def preprocess(
    ds: Dataset,
    *,
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    features: str = "standardize",
    pca_dim: Optional[int] = None,
    add_bias: bool = True,
    seed: int = 0,
) -> Preprocessed:
    """Subset a `Dataset` and turn its pixels into features, using train statistics only.

    Subsetting: with ``n_train`` (``n_test``) given, the first ``n_train`` indices of
    ``np.random.default_rng(seed).permutation(len(x_train))`` are taken (the test permutation is drawn next from
    the same generator); with None the whole split is kept in its original order. Same arguments, same output.

    Features:
        ``"raw"``: the [0, 1] pixel values as they are.
        ``"standardize"``: drop columns whose train standard deviation is <= `ZERO_VARIANCE_TOL` (computed on the
        train subset), then subtract the train mean and divide by the train standard deviation (ddof=0).
        ``"pca_whiten"``: standardize as above, then project onto the top ``pca_dim`` eigenvectors of the train
        covariance (ddof=0) and divide by the square roots of their eigenvalues, so the train features have
        identity covariance. ``pca_dim`` is required here (and only here) and must not exceed the number of kept
        columns or the numerical rank of the train data. Eigenvector signs are fixed (largest entry positive).

    ``add_bias`` appends a constant-1 column last. Returns float64 features, int32 labels and ``info``, a dict of
    plain Python values recording all of the above.
    """
    if not isinstance(ds, Dataset):
        raise ValueError(
            f"preprocess: argument 'ds' must be a Dataset (from load_dataset); received {type(ds).__name__}"
        )
    if not isinstance(features, str) or features not in FEATURES:
        raise ValueError(f"preprocess: argument 'features' must be one of {FEATURES}; received {features!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"preprocess: argument 'seed' must be a non-negative integer; received {seed!r}")
    if not isinstance(add_bias, bool):
        raise ValueError(f"preprocess: argument 'add_bias' must be a bool; received {add_bias!r}")
    shapes = {k: np.shape(getattr(ds, k)) for k in ("x_train", "y_train", "x_test", "y_test")}
    if (
        len(shapes["x_train"]) != 2
        or len(shapes["x_test"]) != 2
        or shapes["x_train"][1] != shapes["x_test"][1]
        or shapes["y_train"] != shapes["x_train"][:1]
        or shapes["y_test"] != shapes["x_test"][:1]
    ):
        raise ValueError(
            "preprocess: argument 'ds' must hold 2-D x arrays with equal column counts and 1-D labels of matching "
            f"lengths; received shapes {shapes}"
        )
    n_train_avail, n_test_avail = int(ds.x_train.shape[0]), int(ds.x_test.shape[0])
    _check_count("n_train", n_train, n_train_avail)
    _check_count("n_test", n_test, n_test_avail)
    if features == "pca_whiten":
        if pca_dim is None:
            raise ValueError("preprocess: argument 'pca_dim' is required when features='pca_whiten'; received None")
        if isinstance(pca_dim, bool) or not isinstance(pca_dim, (int, np.integer)) or pca_dim < 1:
            raise ValueError(f"preprocess: argument 'pca_dim' must be a positive integer; received {pca_dim!r}")
    elif pca_dim is not None:
        raise ValueError(
            f"preprocess: argument 'pca_dim' is only used with features='pca_whiten'; received pca_dim={pca_dim!r} "
            f"with features={features!r}"
        )

    rng = np.random.default_rng(int(seed))
    train_idx = np.arange(n_train_avail) if n_train is None else rng.permutation(n_train_avail)[: int(n_train)]
    test_idx = np.arange(n_test_avail) if n_test is None else rng.permutation(n_test_avail)[: int(n_test)]
    x_tr = np.asarray(ds.x_train)[train_idx].astype(np.float64)
    x_te = np.asarray(ds.x_test)[test_idx].astype(np.float64)
    y_tr = np.asarray(ds.y_train)[train_idx].astype(np.int32)
    y_te = np.asarray(ds.y_test)[test_idx].astype(np.int32)
    input_dim = int(x_tr.shape[1])

    info: dict[str, Any] = {
        "dataset": ds.name,
        "image_shape": list(ds.image_shape),
        "seed": int(seed),
        "n_train": int(train_idx.shape[0]),
        "n_test": int(test_idx.shape[0]),
        "n_train_available": n_train_avail,
        "n_test_available": n_test_avail,
        "train_subset": "all, original order" if n_train is None else "random permutation (seeded), first n_train",
        "test_subset": "all, original order" if n_test is None else "random permutation (seeded), first n_test",
        "features": features,
        "input_dim": input_dim,
    }

    if features == "raw":
        info["kept_columns"] = input_dim
        info["dropped_columns"] = 0
    else:
        if x_tr.shape[0] < 2:
            raise ValueError(
                f"preprocess: features={features!r} needs at least 2 train samples for train statistics; "
                f"received n_train={x_tr.shape[0]}"
            )
        mean = x_tr.mean(axis=0)
        std = x_tr.std(axis=0)
        keep = std > ZERO_VARIANCE_TOL
        if not keep.any():
            raise ValueError("preprocess: every column has zero variance on the train subset; nothing to standardize")
        x_tr = (x_tr[:, keep] - mean[keep]) / std[keep]
        x_te = (x_te[:, keep] - mean[keep]) / std[keep]
        info["kept_columns"] = int(keep.sum())
        info["dropped_columns"] = int((~keep).sum())
        info["kept_column_indices"] = np.flatnonzero(keep).tolist()
        info["zero_variance_tol"] = ZERO_VARIANCE_TOL
        if features == "pca_whiten":
            assert pca_dim is not None
            d = x_tr.shape[1]
            if pca_dim > d:
                raise ValueError(
                    f"preprocess: argument 'pca_dim' must be <= the number of kept (non-constant) columns, {d}; "
                    f"received {pca_dim}"
                )
            cov = x_tr.T @ x_tr / x_tr.shape[0]
            evals, evecs = np.linalg.eigh(cov)
            order = np.argsort(evals)[::-1]
            evals, evecs = evals[order], evecs[:, order]
            top = evals[:pca_dim]
            if top[-1] <= PCA_RANK_RTOL * max(float(evals[0]), np.finfo(np.float64).tiny):
                rank = int((evals > PCA_RANK_RTOL * evals[0]).sum())
                raise ValueError(
                    f"preprocess: argument 'pca_dim' must be <= the numerical rank of the standardized train data, "
                    f"{rank} (n_train={x_tr.shape[0]}); received {pca_dim}"
                )
            comps = evecs[:, :pca_dim]
            signs = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(pca_dim)])
            comps = comps * np.where(signs == 0, 1.0, signs)
            proj = comps / np.sqrt(top)
            x_tr = x_tr @ proj
            x_te = x_te @ proj
            info["pca_dim"] = int(pca_dim)
            info["explained_variance_ratio"] = float(top.sum() / evals[evals > 0].sum())

    if add_bias:
        x_tr = np.concatenate([x_tr, np.ones((x_tr.shape[0], 1))], axis=1)
        x_te = np.concatenate([x_te, np.ones((x_te.shape[0], 1))], axis=1)
    info["add_bias"] = add_bias
    info["output_dim"] = int(x_tr.shape[1])
    return Preprocessed(
        x_train=np.ascontiguousarray(x_tr, dtype=np.float64),
        y_train=y_tr,
        x_test=np.ascontiguousarray(x_te, dtype=np.float64),
        y_test=y_te,
        num_classes=int(ds.num_classes),
        info=info,
    )


# ---------------------------------------------------------------------------------------------------------------
# Argument helpers


def _check_dir_arg(arg: str, value: Optional[PathLike], *, must_exist: bool) -> Optional[pathlib.Path]:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value):
        raise ValueError(
            f"load_dataset: argument '{arg}' must be a path (str or os.PathLike) or None; received {value!r}"
        )
    path = pathlib.Path(value).expanduser()
    if must_exist and not path.is_dir():
        raise DatasetNotFoundError(
            f"load_dataset: argument '{arg}' must be an existing directory; received {str(path)!r}"
        )
    return path


def _check_count(arg: str, value: Optional[int], available: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"preprocess: argument '{arg}' must be a positive integer or None; received {value!r}")
    if value > available:
        raise ValueError(f"preprocess: argument '{arg}' must be <= the {available} samples available; received {value}")


def _resolve_base_url(name: str, base_url: Optional[str]) -> str:
    url = base_url if base_url is not None else os.environ.get("DEQ_JAX_DATA_BASE_URL", "") or DEFAULT_BASE_URLS[name]
    return url.replace("{name}", name).rstrip("/") + "/"


# ---------------------------------------------------------------------------------------------------------------
# Finding, verifying and downloading files


def _md5_file(path: pathlib.Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _md5_gunzip(path: pathlib.Path) -> Optional[str]:
    """MD5 of a gzip file's decompressed payload, or None if it is not a valid gzip file."""
    h = hashlib.md5(usedforsecurity=False)
    try:
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return h.hexdigest()


@dataclass
class _Resolver:
    """Finds each file of one data set on disk (verified) or downloads it into the cache."""

    spec: _Spec
    checksums: dict[str, str]
    content_checksums: dict[str, str]
    data_dir: Optional[pathlib.Path]
    cache_dir: pathlib.Path
    system_dirs: tuple[pathlib.Path, ...]
    download: bool
    base_url: str
    progress: bool
    timeout: float

    def user_dirs(self) -> list[pathlib.Path]:
        if self.data_dir is None:
            return []
        return [self.data_dir, self.data_dir / self.spec.name]

    def expected_md5(self, key: str) -> str:
        md5 = self.checksums.get(key)
        if not md5:
            raise ChecksumError(
                f"{self.spec.name}: no checksum known for {key!r}; pass checksums={{{key!r}: '<md5>'}} to load_dataset"
            )
        return md5.lower()

    def verify(self, path: pathlib.Path, key: str) -> Optional[str]:
        """None if ``path`` matches its checksum, else the MD5 it has."""
        expected = self.expected_md5(key)
        got = _md5_file(path)
        if got == expected:
            return None
        content = self.content_checksums.get(key)
        if content and path.name.endswith(".gz") and _md5_gunzip(path) == content.lower():
            return None
        return got

    def mismatch_message(self, path: pathlib.Path, key: str, got: str, where: str) -> str:
        expected = self.expected_md5(key)
        extra = ""
        if self.content_checksums.get(key):
            extra = f" (nor does its decompressed payload match MD5 {self.content_checksums[key]})"
        return (
            f"{self.spec.name}: checksum mismatch for {where} file {str(path)!r}: expected MD5 {expected}, "
            f"got {got}{extra}. The file is corrupt, truncated or a different version"
        )

    def resolve_files(self, names: Optional[tuple[str, ...]] = None) -> dict[str, pathlib.Path]:
        """Path of each download unit, verified; downloads what is missing. Raises if any cannot be had."""
        names = self.spec.files if names is None else names
        found: dict[str, pathlib.Path] = {}
        missing: list[str] = []
        for fname in names:
            path = self.find_on_disk(fname)
            if path is None:
                missing.append(fname)
            else:
                found[fname] = path
        if missing and not self.download:
            reason = "downloading is disabled (download=False)"
            raise DatasetNotFoundError(self.not_found_message(missing, reason=reason))
        for i, fname in enumerate(missing):
            found[fname] = self.fetch(fname, still_missing=missing[i:])
        return found

    def find_on_disk(self, fname: str) -> Optional[pathlib.Path]:
        for d in self.user_dirs():
            path = d / fname
            if path.is_file():
                got = self.verify(path, fname)
                if got is not None:
                    raise ChecksumError(
                        self.mismatch_message(path, fname, got, "data_dir")
                        + ". It was left in place: replace it with the original file or remove it."
                    )
                return path
        path = self.cache_dir / fname
        if path.is_file():
            got = self.verify(path, fname)
            if got is None:
                return path
            if not self.download:
                raise ChecksumError(
                    self.mismatch_message(path, fname, got, "cached")
                    + f". Delete it, or pass download=True to replace it with a fresh download from {self.url(fname)}."
                )
            warnings.warn(
                self.mismatch_message(path, fname, got, "cached") + "; removing it and downloading it again.",
                RuntimeWarning,
                stacklevel=4,
            )
            path.unlink()
        for d in self.system_dirs:
            path = d / fname
            if path.is_file():
                got = self.verify(path, fname)
                if got is not None:
                    raise ChecksumError(self.mismatch_message(path, fname, got, "system"))
                return path
        return None

    def url(self, fname: str) -> str:
        return self.base_url + fname

    def not_found_message(self, missing: list[str], *, reason: str) -> str:
        spec = self.spec
        lines = [f"Data set {spec.name!r} not found: {reason}.", "Missing file(s):"]
        lines += [f"    {f}" for f in missing]
        lines.append("Put them (the standard file names, unchanged) into one of these directories:")
        if self.data_dir is not None:
            lines.append(f"    {self.data_dir}   (data_dir)")
            lines.append(f"    {self.data_dir / spec.name}")
        else:
            lines.append("    <data_dir> or <data_dir>/" + spec.name + "   (then pass data_dir=... to load_dataset)")
        lines.append(f"    {self.cache_dir}   (the cache; set cache_dir=... or $DEQ_JAX_DATA_DIR to move it)")
        for d in self.system_dirs:
            lines.append(f"    {d}   (system directory, read-only)")
        if spec.extracted_dir is not None:
            members = ", ".join(spec.extracted_members)
            lines.append(
                f"An already-extracted directory {spec.extracted_dir}/ (with {members}) in any of those directories "
                f"works as well."
            )
        urls = ", ".join(self.url(f) for f in missing)
        if self.download:
            lines.append(
                f"Or retry when {urls} can be reached (downloads go into {self.cache_dir}), or pick a reachable "
                f"mirror with base_url=... or $DEQ_JAX_DATA_BASE_URL."
            )
        else:
            lines.append(
                f"Or enable downloading: load_dataset({spec.name!r}, download=True) fetches {urls} into "
                f"{self.cache_dir} (base_url=... or $DEQ_JAX_DATA_BASE_URL selects a mirror)."
            )
        return "\n".join(lines)

    def fetch(self, fname: str, still_missing: Optional[list[str]] = None) -> pathlib.Path:
        """Download one file into the cache: temp file, verify, then atomic rename. Leaves nothing on failure."""
        url = self.url(fname)
        expected = self.expected_md5(fname)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        final = self.cache_dir / fname
        fd, tmp_name = tempfile.mkstemp(prefix=f".{fname}.", suffix=".part", dir=self.cache_dir)
        tmp = pathlib.Path(tmp_name)
        try:
            h = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out:
                try:
                    # Any scheme urllib supports is allowed (a file:// mirror too); integrity comes from the MD5.
                    with contextlib.closing(urllib.request.urlopen(url, timeout=self.timeout)) as resp:  # noqa: S310
                        total = resp.headers.get("Content-Length")
                        with _progress_bar(self.progress, total, f"{self.spec.name}/{fname}") as update:
                            while chunk := resp.read(1 << 20):
                                out.write(chunk)
                                h.update(chunk)
                                update(len(chunk))
                        if total is not None and total.isdigit() and out.tell() != int(total):
                            raise OSError(f"incomplete read: got {out.tell()} of {total} bytes")
                except urllib.error.HTTPError as err:
                    reason = f"downloading {url} failed (HTTP {err.code} {err.reason})"
                    raise DatasetNotFoundError(self.not_found_message(still_missing or [fname], reason=reason)) from err
                except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:
                    # URLError: refused connection, DNS failure; OSError: timeout, reset; HTTPException: a broken
                    # response; ValueError: an unsupported URL.
                    reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
                    raise DatasetNotFoundError(
                        self.not_found_message(still_missing or [fname], reason=f"downloading {url} failed ({reason})")
                    ) from err
            got = h.hexdigest()
            if got != expected:
                raise ChecksumError(
                    f"{self.spec.name}: checksum mismatch for downloaded file {fname!r} from {url}: expected MD5 "
                    f"{expected}, got {got}. Nothing was saved in {self.cache_dir}. The server sent a different or "
                    f"corrupt file; try again later or place a verified copy in the directories load_dataset searches."
                )
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return final


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: Optional[str], desc: str) -> Iterator[Callable[[int], Any]]:
    if not enabled:
        yield lambda n: None
        return
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional dependency ('experiments' extra)
        warnings.warn("progress=True needs tqdm (pip install tqdm); downloading without a progress bar", stacklevel=4)
        yield lambda n: None
        return
    n_total = int(total) if total is not None and total.isdigit() else None
    with tqdm(total=n_total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
        yield bar.update


# ---------------------------------------------------------------------------------------------------------------
# Format readers


def _load_digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # scikit-learn is in the 'experiments' extra
        raise ImportError("load_dataset('digits') needs scikit-learn: pip install 'deq_jax[experiments]'") from err
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return Dataset(x_tr, y_tr, x_te, y_te, "digits", 10, (8, 8))


def _parse_idx(raw: bytes, path: pathlib.Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array (magic 0x00 0x00 0x08 ndim, big-endian int32 dims, then the data)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetFormatError(f"{str(path)!r} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}")
    if raw[2] != 0x08:
        raise DatasetFormatError(f"{str(path)!r}: IDX data type 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
    if raw[3] != ndim:
        raise DatasetFormatError(f"{str(path)!r}: IDX file has {raw[3]} dimension(s), expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{str(path)!r}: IDX header truncated ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        raise DatasetFormatError(
            f"{str(path)!r}: IDX dims {dims} need {size} data bytes, the file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_gzip(path: pathlib.Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetFormatError(f"{str(path)!r} is not a valid gzip file: {err}") from err


def _load_idx_dataset(spec: _Spec, paths: dict[str, pathlib.Path]) -> Dataset:
    out = []
    for split in ("train", "t10k"):
        img_path = paths[f"{split}-images-idx3-ubyte.gz"]
        lab_path = paths[f"{split}-labels-idx1-ubyte.gz"]
        images = _parse_idx(_read_gzip(img_path), img_path, 3)
        labels = _parse_idx(_read_gzip(lab_path), lab_path, 1)
        if images.shape[1:] != spec.image_shape:
            raise DatasetFormatError(f"{str(img_path)!r}: images are {images.shape[1:]}, expected {spec.image_shape}")
        if labels.shape[0] != images.shape[0]:
            raise DatasetFormatError(
                f"{str(lab_path)!r} has {labels.shape[0]} labels but {str(img_path)!r} has {images.shape[0]} images"
            )
        _check_labels(labels, spec.num_classes, lab_path)
        out.append((images.reshape(images.shape[0], -1).astype(np.float32) / 255.0, labels.astype(np.int32)))
    (x_tr, y_tr), (x_te, y_te) = out
    return Dataset(x_tr, y_tr, x_te, y_te, spec.name, spec.num_classes, spec.image_shape)


def _check_labels(labels: np.ndarray, num_classes: int, where: Any) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFormatError(
            f"{str(where)!r}: labels in [{int(labels.min())}, {int(labels.max())}], expected [0, {num_classes})"
        )


def _unpickle_batch(raw: bytes, where: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        entry = pickle.loads(raw, encoding="latin1")  # noqa: S301 (only after the checksum matched)
    except Exception as err:  # pickle raises many types on bad input
        raise DatasetFormatError(f"{where!r} is not a readable CIFAR pickle: {err}") from err
    if not isinstance(entry, dict):
        raise DatasetFormatError(f"{where!r}: expected a pickled dict, got {type(entry).__name__}")
    entry = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}
    label_key = "labels" if "labels" in entry else "fine_labels"
    if "data" not in entry or label_key not in entry:
        raise DatasetFormatError(f"{where!r}: expected keys 'data' and 'labels'/'fine_labels', got {sorted(entry)}")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetFormatError(f"{where!r}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise DatasetFormatError(f"{where!r}: {labels.shape} labels for {data.shape[0]} images")
    _check_labels(labels, num_classes, where)
    return data, labels.astype(np.int32)


def _cifar_to_dataset(spec: _Spec, train: list[tuple[np.ndarray, np.ndarray]], test: tuple) -> Dataset:
    def convert(data: np.ndarray) -> np.ndarray:  # rows are R(1024) G(1024) B(1024), each row-major 32x32
        hwc = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return hwc.reshape(data.shape[0], -1).astype(np.float32) / 255.0

    x_tr = convert(np.concatenate([d for d, _ in train]))
    y_tr = np.concatenate([lab for _, lab in train])
    return Dataset(x_tr, y_tr, convert(test[0]), test[1], spec.name, spec.num_classes, spec.image_shape)


def _load_cifar(spec: _Spec, resolver: _Resolver) -> Dataset:
    """CIFAR from an extracted directory or the tarball: data_dir (itself, then data_dir/<name>), cache, download.

    In each user directory an extracted ``cifar-*-py*/`` directory is preferred over the tarball beside it.
    """
    assert spec.extracted_dir is not None
    tar_name = spec.files[0]
    user_dirs = resolver.user_dirs()
    if resolver.data_dir is not None and resolver.data_dir.name == spec.extracted_dir:
        ext_dir = resolver.data_dir  # data_dir is the extracted directory itself
        if any((ext_dir / m).exists() for m in spec.extracted_members):
            return _load_cifar_extracted(spec, resolver, ext_dir)
    for d in user_dirs:
        ext_dir = d / spec.extracted_dir
        if ext_dir.is_dir() and any((ext_dir / m).exists() for m in spec.extracted_members):
            return _load_cifar_extracted(spec, resolver, ext_dir)
        if (d / tar_name).is_file():
            break  # resolve_files below finds and verifies this tarball
    tar_path = resolver.resolve_files((tar_name,))[tar_name]
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
                    raise DatasetFormatError(f"{str(tar_path)!r}: the archive has no file {arcname!r}")
                with f:
                    raw = f.read()
                batches.append(_unpickle_batch(raw, f"{tar_path}:{arcname}", spec.num_classes))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DatasetFormatError(f"{str(tar_path)!r} is not a readable .tar.gz archive: {err}") from err
    return _cifar_to_dataset(spec, batches[:-1], batches[-1])


def _load_cifar_extracted(spec: _Spec, resolver: _Resolver, ext_dir: pathlib.Path) -> Dataset:
    batches = []
    for member in spec.extracted_members:
        path = ext_dir / member
        key = f"{spec.extracted_dir}/{member}"
        if not path.is_file():
            raise DatasetNotFoundError(
                f"{spec.name}: extracted directory {str(ext_dir)!r} lacks {member!r} (it needs "
                f"{', '.join(spec.extracted_members)}); complete it, or remove it to use {spec.files[0]} instead"
            )
        got = resolver.verify(path, key)
        if got is not None:
            raise ChecksumError(resolver.mismatch_message(path, key, got, "data_dir") + ". It was left in place.")
        batches.append(_unpickle_batch(path.read_bytes(), str(path), spec.num_classes))
    return _cifar_to_dataset(spec, batches[:-1], batches[-1])


def _load_svhn(spec: _Spec, paths: dict[str, pathlib.Path]) -> Dataset:
    from scipy.io import loadmat

    out = []
    for fname in spec.files:
        path = paths[fname]
        try:
            mat = loadmat(str(path))
        except Exception as err:  # scipy raises several types on bad input
            raise DatasetFormatError(f"{str(path)!r} is not a readable MATLAB .mat file: {err}") from err
        if "X" not in mat or "y" not in mat:
            raise DatasetFormatError(f"{str(path)!r}: expected variables 'X' and 'y'")
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise DatasetFormatError(f"{str(path)!r}: 'X' has shape {x.shape}, expected (32, 32, 3, N)")
        if y.shape[0] != x.shape[3]:
            raise DatasetFormatError(f"{str(path)!r}: {y.shape[0]} labels for {x.shape[3]} images")
        y = y.astype(np.int64)
        if y.size and (y.min() < 1 or y.max() > 10):
            raise DatasetFormatError(f"{str(path)!r}: labels in [{y.min()}, {y.max()}], expected 1..10 (10 = digit 0)")
        y[y == 10] = 0
        x = np.ascontiguousarray(x.transpose(3, 0, 1, 2)).reshape(x.shape[3], -1).astype(np.float32) / 255.0
        out.append((x, y.astype(np.int32)))
    (x_tr, y_tr), (x_te, y_te) = out
    return Dataset(x_tr, y_tr, x_te, y_te, spec.name, spec.num_classes, spec.image_shape)
