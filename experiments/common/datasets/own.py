"""The user's own data: features and integer labels from `.npz` or CSV files, validated like the built-in sets.

Two layouts (config section `data.files`, see `experiments.common.data_config.FilesConfig`):

* one ``.npz`` file (``path``) holding four arrays: ``x_train`` `(n, d...)`, ``y_train`` `(n,)`, ``x_test``
  `(n_test, d...)`, ``y_test`` `(n_test,)`; features of more than two dimensions (images) are flattened;
* two files (``train``, ``test``), each a ``.npz`` with arrays ``x`` and ``y``, or a CSV with a header row whose
  column ``label_column`` (default ``label``) holds the labels and whose other columns are the features.

Checked before anything is computed, each with its own error (all `DatasetFormatError`s, hence `UserError`s:
one message, exit status 2), naming the file and the array or column:

* `DataShapeError`: features that are not at least 2-D, labels that are not 1-D, row counts of features and labels
  that differ, train and test with different feature counts, an empty split;
* `DataTypeError`: features that are not real numbers (booleans, strings, complex), labels that are not integers
  (a float label must be integral: ``3.0`` is accepted, ``2.5`` is not);
* `NonFiniteDataError`: a NaN or infinite feature, with its count and the first offending row;
* `LabelRangeError`: a label below 0 or not below the number of classes (``num_classes``, or max label + 1), fewer
  than two classes in the training split.

A missing file is a `DatasetNotFoundError`; a file that cannot be parsed (not an ``.npz``, a CSV with ragged rows or
text in a feature column, a missing array or label column) a `DatasetFormatError`. Features are kept as float64
(whatever scale they come in: the preprocessing standardises them); labels become int32.
"""

from __future__ import annotations

import csv
import pathlib
import zipfile

import numpy as np

from experiments.common.datasets.errors import DatasetFormatError, DatasetNotFoundError
from experiments.common.datasets.formats import Dataset

__all__ = [
    "DataShapeError",
    "DataTypeError",
    "LabelRangeError",
    "NonFiniteDataError",
    "SUFFIXES",
    "load_files",
]

#: the file types read, by suffix (lower case)
SUFFIXES: tuple[str, ...] = (".npz", ".csv")
#: the dataset name that the own files get in results and messages
NAME = "files"


class DataShapeError(DatasetFormatError):
    """An array of the user's data has the wrong number of dimensions or rows, or train and test disagree."""


class DataTypeError(DatasetFormatError):
    """Features that are not real numbers, or labels that are not integers."""


class NonFiniteDataError(DatasetFormatError):
    """A NaN or infinite feature value."""


class LabelRangeError(DatasetFormatError):
    """A label outside `[0, num_classes)`, or fewer than two classes to tell apart."""


def _err(cls: type, message: str, path: pathlib.Path) -> DatasetFormatError:
    return cls(message, dataset=NAME, path=path)


def _exists(path: pathlib.Path, key: str) -> pathlib.Path:
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise DatasetNotFoundError(
            f"data file {str(path)!r} {what} (set by config key {key}); paths are relative to the working directory",
            dataset=NAME,
            setting=None,
            path=path,
            missing=[str(path)],
        )
    if path.suffix.lower() not in SUFFIXES:
        raise _err(
            DatasetFormatError,
            f"data file {str(path)!r} (config key {key}) must end in one of {', '.join(SUFFIXES)}; "
            f"got {path.suffix or 'no suffix'!r}",
            path,
        )
    return path


def _read_npz(path: pathlib.Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [n for n in names if n not in z.files]
            if missing:
                raise _err(
                    DatasetFormatError,
                    f"{str(path)!r} lacks the array(s) {', '.join(missing)}: it must hold {', '.join(names)} "
                    f"(it holds {', '.join(z.files) or 'nothing'})",
                    path,
                )
            return {n: z[n] for n in names}
    except DatasetFormatError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise _err(DatasetFormatError, f"{str(path)!r} is not a readable .npz file: {err}", path) from err


def _read_csv(path: pathlib.Path, label_column: str) -> dict[str, np.ndarray]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise _err(DatasetFormatError, f"{str(path)!r} is not a readable CSV file: {err}", path) from err
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise _err(DataShapeError, f"{str(path)!r} is empty: it needs a header row and at least one data row", path)
    header = [c.strip() for c in rows[0]]
    if label_column not in header:
        raise _err(
            DatasetFormatError,
            f"{str(path)!r} has no column {label_column!r} (the labels; set data.files.label_column); its header "
            f"is {header[:8]}{' ...' if len(header) > 8 else ''}",
            path,
        )
    if len(header) < 2:
        raise _err(DataShapeError, f"{str(path)!r} has no feature column besides {label_column!r}", path)
    li = header.index(label_column)
    body = rows[1:]
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise _err(
                DataShapeError,
                f"{str(path)!r} line {i + 2} has {len(r)} fields; the header has {len(header)}",
                path,
            )
    try:
        table = np.array([[float(c) for c in r] for r in body], dtype=np.float64).reshape(len(body), len(header))
    except ValueError as err:
        raise _err(DataTypeError, f"{str(path)!r} holds a value that is not a number: {err}", path) from err
    return {"x": np.delete(table, li, axis=1), "y": table[:, li]}


def _features(x: np.ndarray, where: str, path: pathlib.Path) -> np.ndarray:
    if x.dtype == bool or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise _err(DataTypeError, f"{where} must hold real numbers (integers or floats); got dtype {x.dtype}", path)
    if x.ndim < 2:
        raise _err(DataShapeError, f"{where} must be (samples, features...), at least 2-D; got shape {x.shape}", path)
    if x.shape[0] == 0 or int(np.prod(x.shape[1:])) == 0:
        raise _err(DataShapeError, f"{where} is empty: shape {x.shape}", path)
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise _err(
            NonFiniteDataError,
            f"{where} has {int(bad.sum())} NaN or infinite value(s), in {rows.size} row(s); the first is row "
            f"{int(rows[0])}",
            path,
        )
    return x


def _labels(y: np.ndarray, n: int, where: str, path: pathlib.Path) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise _err(DataShapeError, f"{where} must be 1-D (one integer label per sample); got shape {y.shape}", path)
    if y.shape[0] != n:
        raise _err(DataShapeError, f"{where} has {y.shape[0]} labels for {n} samples of features", path)
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            first = int(np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))[0])
            raise _err(DataTypeError, f"{where} must be integers; row {first} holds {y[first]!r}", path)
    elif y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise _err(DataTypeError, f"{where} must be integers; got dtype {y.dtype}", path)
    if np.abs(y).max(initial=0) > np.iinfo(np.int32).max:
        raise _err(LabelRangeError, f"{where} holds labels too large for int32", path)
    return y.astype(np.int32)


def _split(raw: dict[str, np.ndarray], xk: str, yk: str, path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    x = _features(np.asarray(raw[xk]), f"{str(path)!r}: {xk}", path)
    return x, _labels(np.asarray(raw[yk]), x.shape[0], f"{str(path)!r}: {yk}", path)


def _read_one(path: pathlib.Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    if path.suffix.lower() == ".npz":
        return _split(_read_npz(path, ("x", "y")), "x", "y", path)
    raw = _read_csv(path, label_column)
    where = f"{str(path)!r}"
    x = _features(raw["x"], f"{where}: the feature columns", path)
    return x, _labels(raw["y"], x.shape[0], f"{where}: column {label_column!r}", path)


def load_files(
    *,
    path: str | pathlib.Path | None = None,
    train: str | pathlib.Path | None = None,
    test: str | pathlib.Path | None = None,
    label_column: str = "label",
    num_classes: int | None = None,
    key: str = "data.files",
) -> Dataset:
    """The user's data set from files (see the module docstring), as a `Dataset` named ``files``.

    Exactly one layout: `path` (one .npz with x_train, y_train, x_test, y_test), or `train` and `test` (each .npz
    with x, y, or CSV). `num_classes`: the number of classes (None: the largest label + 1, over both splits).
    `key` is how the user's config names this section (in messages). Raises the errors of the module docstring.
    """
    if (path is None) == (train is None and test is None) or (path is None and (train is None or test is None)):
        raise ValueError(
            f"{key}: give either path (one .npz with x_train, y_train, x_test, y_test) or both train and test; "
            f"got path={path!r}, train={train!r}, test={test!r}"
        )
    if path is not None:
        p = _exists(pathlib.Path(path).expanduser(), f"{key}.path")
        if p.suffix.lower() != ".npz":
            raise _err(
                DatasetFormatError,
                f"{str(p)!r} (config key {key}.path) must be an .npz file holding x_train, y_train, x_test, y_test; "
                f"for CSV files give {key}.train and {key}.test",
                p,
            )
        raw = _read_npz(p, ("x_train", "y_train", "x_test", "y_test"))
        (x_tr, y_tr), (x_te, y_te) = _split(raw, "x_train", "y_train", p), _split(raw, "x_test", "y_test", p)
        p_tr = p_te = p
    else:
        p_tr = _exists(pathlib.Path(train).expanduser(), f"{key}.train")  # type: ignore[arg-type]
        p_te = _exists(pathlib.Path(test).expanduser(), f"{key}.test")  # type: ignore[arg-type]
        (x_tr, y_tr), (x_te, y_te) = _read_one(p_tr, label_column), _read_one(p_te, label_column)
    if x_tr.shape[1] != x_te.shape[1]:
        raise _err(
            DataShapeError,
            f"train ({str(p_tr)!r}) has {x_tr.shape[1]} features per sample, test ({str(p_te)!r}) "
            f"{x_te.shape[1]}: they must agree",
            p_te,
        )
    k = int(max(y_tr.max(), y_te.max())) + 1 if num_classes is None else int(num_classes)
    for y, p, split in ((y_tr, p_tr, "train"), (y_te, p_te, "test")):
        bad = np.flatnonzero((y < 0) | (y >= k))
        if bad.size:
            raise _err(
                LabelRangeError,
                f"{split} labels ({str(p)!r}) must lie in [0, {k}) "
                f"({'num_classes' if num_classes is not None else 'the largest label + 1'}); row {int(bad[0])} "
                f"holds {int(y[bad[0]])} ({bad.size} label(s) out of range)",
                p,
            )
    if np.unique(y_tr).size < 2:
        raise _err(LabelRangeError, f"the training labels ({str(p_tr)!r}) hold fewer than two classes", p_tr)
    return Dataset(x_tr, y_tr, x_te, y_te, NAME, k, (x_tr.shape[1],))
