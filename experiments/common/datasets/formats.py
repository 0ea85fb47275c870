"""File formats: IDX (MNIST-like), CIFAR python pickles, SVHN MATLAB files, scikit-learn's bundled digits.

Every reader returns flattened float32 images in [0, 1] (colour in height-width-channel order) and int32 labels,
and raises `DatasetFormatError` naming the file for anything it cannot read.
"""

from __future__ import annotations

import gzip
import importlib.util
import pathlib
import pickle
import zlib
from typing import Any, NamedTuple

import numpy as np

from experiments.common.datasets.errors import DatasetFormatError
from experiments.common.datasets.registry import Spec

__all__ = [
    "Dataset",
    "cifar_to_dataset",
    "gunzip",
    "idx_dataset",
    "load_digits",
    "load_svhn",
    "parse_idx",
    "unpickle_cifar_batch",
]


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


Where = str | Any  # a path, or "archive:member", for messages


def gunzip(raw_or_path: Any, where: Where) -> bytes:
    """The decompressed content of a gzip file (a path or its bytes); `DatasetFormatError` if it is not gzip."""
    try:
        if isinstance(raw_or_path, (bytes, bytearray)):
            return gzip.decompress(raw_or_path)
        with gzip.open(raw_or_path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetFormatError(f"{str(where)!r} is not a valid gzip file: {err}", path=_as_path(where)) from err


def parse_idx(raw: bytes, where: Where, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array (magic 0x00 0x00 0x08 ndim, big-endian int32 dims, then the data), no copy."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetFormatError(
            f"{str(where)!r} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}", path=_as_path(where)
        )
    if raw[2] != 0x08:
        raise DatasetFormatError(
            f"{str(where)!r}: IDX data type 0x{raw[2]:02x}, expected 0x08 (unsigned byte)", path=_as_path(where)
        )
    if raw[3] != ndim:
        raise DatasetFormatError(
            f"{str(where)!r}: IDX file has {raw[3]} dimension(s), expected {ndim}", path=_as_path(where)
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{str(where)!r}: IDX header truncated ({len(raw)} bytes)", path=_as_path(where))
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        raise DatasetFormatError(
            f"{str(where)!r}: IDX dims {dims} need {size} data bytes, the file has {len(raw) - header}",
            path=_as_path(where),
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def check_labels(labels: np.ndarray, num_classes: int, where: Where) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFormatError(
            f"{str(where)!r}: labels in [{int(labels.min())}, {int(labels.max())}], expected [0, {num_classes})",
            path=_as_path(where),
        )


def idx_dataset(spec: Spec, arrays: dict[str, tuple[np.ndarray, Where]]) -> Dataset:
    """A `Dataset` from the four parsed IDX arrays, keyed by decompressed file name (with where each came from)."""
    out = []
    for split in ("train", "t10k"):
        images, img_where = arrays[f"{split}-images-idx3-ubyte"]
        labels, lab_where = arrays[f"{split}-labels-idx1-ubyte"]
        if images.shape[1:] != spec.image_shape:
            raise DatasetFormatError(
                f"{str(img_where)!r}: images are {images.shape[1:]}, expected {spec.image_shape}",
                path=_as_path(img_where),
            )
        if labels.shape[0] != images.shape[0]:
            raise DatasetFormatError(
                f"{str(lab_where)!r} has {labels.shape[0]} labels but {str(img_where)!r} has {images.shape[0]} images",
                path=_as_path(lab_where),
            )
        check_labels(labels, spec.num_classes, lab_where)
        x = np.empty((images.shape[0], int(np.prod(spec.image_shape))), dtype=np.float32)
        np.divide(images.reshape(images.shape[0], -1), np.float32(255.0), out=x, dtype=np.float32)  # no temporary
        out.append((x, labels.astype(np.int32)))
    (x_tr, y_tr), (x_te, y_te) = out
    return Dataset(x_tr, y_tr, x_te, y_te, spec.name, spec.num_classes, spec.image_shape)


def unpickle_cifar_batch(raw: bytes, where: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: uint8 (N, 3072) channel-major rows and int32 labels. Only after its checksum matched."""
    try:
        entry = pickle.loads(raw, encoding="latin1")  # only after the checksum matched
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
    check_labels(labels, num_classes, where)
    return data, labels.astype(np.int32)


def cifar_to_dataset(
    spec: Spec, train: list[tuple[np.ndarray, np.ndarray]], test: tuple[np.ndarray, np.ndarray]
) -> Dataset:
    def convert(data: np.ndarray) -> np.ndarray:  # rows are R(1024) G(1024) B(1024), each row-major 32x32
        hwc = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return hwc.reshape(data.shape[0], -1).astype(np.float32) / np.float32(255.0)

    x_tr = convert(np.concatenate([d for d, _ in train]))
    y_tr = np.concatenate([lab for _, lab in train])
    return Dataset(x_tr, y_tr, convert(test[0]), test[1], spec.name, spec.num_classes, spec.image_shape)


def load_svhn(spec: Spec, paths: dict[str, Any]) -> Dataset:
    """SVHN's cropped-digit ``.mat`` files: X (32, 32, 3, N) uint8, y (N, 1) with 10 meaning digit 0."""
    from scipy.io import loadmat  # SVHN only: scipy.io costs ~0.3 s that the other data sets never need

    out = []
    for fname in spec.files:
        path = paths[fname]
        try:
            mat = loadmat(str(path))
        except Exception as err:  # scipy raises several types on bad input
            raise DatasetFormatError(f"{str(path)!r} is not a readable MATLAB .mat file: {err}", path=path) from err
        if "X" not in mat or "y" not in mat:
            raise DatasetFormatError(f"{str(path)!r}: expected variables 'X' and 'y'", path=path)
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise DatasetFormatError(f"{str(path)!r}: 'X' has shape {x.shape}, expected (32, 32, 3, N)", path=path)
        if y.shape[0] != x.shape[3]:
            raise DatasetFormatError(f"{str(path)!r}: {y.shape[0]} labels for {x.shape[3]} images", path=path)
        y = y.astype(np.int64)
        if y.size and (y.min() < 1 or y.max() > 10):
            raise DatasetFormatError(
                f"{str(path)!r}: labels in [{y.min()}, {y.max()}], expected 1..10 (10 = digit 0)", path=path
            )
        y[y == 10] = 0
        x = np.ascontiguousarray(x.transpose(3, 0, 1, 2)).reshape(x.shape[3], -1).astype(np.float32) / np.float32(255)
        out.append((x, y.astype(np.int32)))
    (x_tr, y_tr), (x_te, y_te) = out
    return Dataset(x_tr, y_tr, x_te, y_te, spec.name, spec.num_classes, spec.image_shape)


def _digits_csv() -> Any:
    """The path of scikit-learn's bundled `digits.csv.gz`, found without importing scikit-learn (whose import,
    through scipy.stats, costs ~2.5 s of CPU: more than everything else a small run of a command does)."""
    spec = importlib.util.find_spec("sklearn")  # locates the package; runs none of it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("load_dataset('digits') needs scikit-learn: pip install 'deq_jax[experiments]'")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"


def _approximate_mode(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-class draws: floor of the proportional share, the remainder to the largest fractional parts, ties
    broken by `rng` (scikit-learn's `utils.extmath._approximate_mode`, step for step: the split depends on it)."""
    continuous = counts / counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need -= add_now
            if need == 0:
                break
    return floored.astype(int)


def stratified_split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of `sklearn.model_selection.train_test_split(..., test_size, random_state=seed,
    stratify=y)`, computed with numpy alone in the same order of random draws (a test checks the equality)."""
    n = y.shape[0]
    n_test = int(np.ceil(test_size * n))
    n_train = n - n_test
    _, y_indices, counts = np.unique(y, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list = []
    test: list = []
    for i in range(counts.shape[0]):
        members = class_indices[i].take(rng.permutation(counts[i]), mode="clip")
        train.extend(members[: n_i[i]])
        test.extend(members[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits, pixels / 16, split ``train_test_split(test_size=0.2, random_state=0, stratify=y)``
    (read from scikit-learn's bundled file and split with numpy: the same arrays, without importing scikit-learn)."""
    path = _digits_csv()
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            table = np.loadtxt(fh, delimiter=",")
    except (OSError, ValueError, EOFError, zlib.error) as err:
        raise DatasetFormatError(
            f"{str(path)!r} (scikit-learn's bundled digits) cannot be read: {err}; reinstall scikit-learn",
            dataset="digits",
            path=path,
        ) from err
    if table.ndim != 2 or table.shape != (1797, 65):
        raise DatasetFormatError(
            f"{str(path)!r} (scikit-learn's bundled digits) holds an array of shape "
            f"{table.shape}, expected (1797, 65); reinstall scikit-learn",
            dataset="digits",
            path=path,
        )
    x = (table[:, :-1] / 16.0).astype(np.float32)
    y = table[:, -1].astype(np.int32)
    train, test = stratified_split(y, 0.2, seed=0)
    return Dataset(x[train], y[train], x[test], y[test], "digits", 10, (8, 8))


def _as_path(where: Where) -> Any:
    return where if isinstance(where, pathlib.Path) else None
