"""From pixels to features: seeded subsets, standardisation, PCA whitening, a bias column; one-hot labels.

Everything scales as O(n d) in memory and O(n d^2) in time for n samples of d pixels: statistics and features are
computed over blocks of `ROW_BLOCK` rows (a float64 workspace of `ROW_BLOCK` x d, whatever n), and PCA diagonalises
the d x d covariance (`numpy.linalg.eigh`), never an n x n matrix nor an SVD of the n x d data. The full
Fashion-MNIST training set (60,000 x 784) is standardised and whitened in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from experiments.common.datasets.errors import DataSettingError, SettingsArg, resolve_settings
from experiments.common.datasets.formats import Dataset
from experiments.common.datasets.registry import FEATURES

__all__ = ["PCA_RANK_RTOL", "Preprocessed", "ROW_BLOCK", "ZERO_VARIANCE_TOL", "one_hot", "preprocess"]

#: Columns whose train standard deviation is at or below this are dropped by ``standardize``/``pca_whiten``.
ZERO_VARIANCE_TOL: float = 1e-10
#: ``pca_whiten`` refuses components whose variance is below this fraction of the largest one.
PCA_RANK_RTOL: float = 1e-10
#: Rows per block: bounds the float64 workspace (4096 x 784 x 8 bytes = 26 MB for MNIST-like images).
ROW_BLOCK: int = 4096


class Preprocessed(NamedTuple):
    """The output of `preprocess`: transformed float64 features, int labels, and a record of what was done."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    info: dict


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


def preprocess(
    ds: Dataset,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    features: str = "standardize",
    pca_dim: int | None = None,
    add_bias: bool = True,
    seed: int = 0,
    settings: SettingsArg = None,
) -> Preprocessed:
    """Subset a `Dataset` and turn its pixels into features, using train statistics only.

    Subsetting: with ``n_train`` (``n_test``) given, the first ``n_train`` indices of
    ``np.random.default_rng(seed).permutation(len(x_train))`` are taken (the test permutation is drawn next from
    the same generator); with None the whole split is kept in its original order. Same arguments, same output.

    Features, with train mean ``mu`` and standard deviation ``s`` (ddof=0) per column:
        ``"raw"``: the [0, 1] pixel values as they are.
        ``"standardize"``: drop columns with ``s <=`` `ZERO_VARIANCE_TOL` (on the train subset), then
        ``(x - mu) / s``.
        ``"pca_whiten"``: standardise as above, then project onto the top ``pca_dim`` eigenvectors ``V_k`` of the
        train covariance ``C = X_s^T X_s / n`` (d x d) and divide by the square roots of their eigenvalues
        ``lambda_k``: ``x_s V_k diag(lambda_k)^(-1/2)``, so the train features have identity covariance.
        ``pca_dim`` is required here (and only here) and must not exceed the number of kept columns or the
        numerical rank of the train data. Eigenvector signs are fixed (largest entry positive).

    ``add_bias`` appends a constant-1 column last. Returns float64 features, int32 labels and ``info``, a dict of
    plain Python values recording all of the above. ``settings`` names the settings in messages (see
    `SETTINGS`).

    Raises:
        DataSettingError (a `UserError` and a `ValueError`): ``n_train``/``n_test`` above the split's size,
            ``pca_dim`` above the kept columns or the rank, too few samples for statistics; ``setting`` names it.
        ValueError: an argument of the wrong type or value (a programming error).
    """
    names = resolve_settings(settings)
    _check_args(ds, features, pca_dim, seed, add_bias)
    n_train_avail, n_test_avail = int(ds.x_train.shape[0]), int(ds.x_test.shape[0])
    _check_count("n_train", n_train, n_train_avail, ds.name, "training", names)
    _check_count("n_test", n_test, n_test_avail, ds.name, "test", names)

    rng = np.random.default_rng(int(seed))
    train_idx = None if n_train is None else rng.permutation(n_train_avail)[: int(n_train)]
    test_idx = None if n_test is None else rng.permutation(n_test_avail)[: int(n_test)]
    x_tr = np.asarray(ds.x_train) if train_idx is None else np.asarray(ds.x_train)[train_idx]
    x_te = np.asarray(ds.x_test) if test_idx is None else np.asarray(ds.x_test)[test_idx]
    y_tr = np.asarray(ds.y_train if train_idx is None else np.asarray(ds.y_train)[train_idx]).astype(np.int32)
    y_te = np.asarray(ds.y_test if test_idx is None else np.asarray(ds.y_test)[test_idx]).astype(np.int32)
    n, d = int(x_tr.shape[0]), int(x_tr.shape[1])

    info: dict[str, Any] = {
        "dataset": ds.name,
        "image_shape": list(ds.image_shape),
        "seed": int(seed),
        "n_train": n,
        "n_test": int(x_te.shape[0]),
        "n_train_available": n_train_avail,
        "n_test_available": n_test_avail,
        "train_subset": "all, original order" if n_train is None else "random permutation (seeded), first n_train",
        "test_subset": "all, original order" if n_test is None else "random permutation (seeded), first n_test",
        "features": features,
        "input_dim": d,
    }

    if features == "raw":
        info["kept_columns"], info["dropped_columns"] = d, 0
        out_tr, out_te = _transform(x_tr, None, add_bias), _transform(x_te, None, add_bias)
    else:
        if n < 2:
            raise DataSettingError(
                f"features {features!r} need at least 2 train samples for train statistics; n_train = {n} (set by "
                f"{names['n_train']})",
                dataset=ds.name,
                setting="n_train",
            )
        mean = _column_mean(x_tr)
        std = np.sqrt(_column_var(x_tr, mean))
        keep = std > ZERO_VARIANCE_TOL
        if not keep.any():
            raise DataSettingError(
                f"every column of {ds.name!r} has zero variance on the {n} train samples; nothing "
                f"to standardize (set by {names['features']})",
                dataset=ds.name,
                setting="features",
            )
        k = int(keep.sum())
        info["kept_columns"], info["dropped_columns"] = k, d - k
        info["kept_column_indices"] = np.flatnonzero(keep).tolist()
        info["zero_variance_tol"] = ZERO_VARIANCE_TOL
        step = _Standardize(keep, mean[keep], std[keep])
        if features == "pca_whiten":
            assert pca_dim is not None
            if pca_dim > k:
                raise DataSettingError(
                    f"pca_dim = {pca_dim} is more than the {k} non-constant columns of {ds.name!r} (set by "
                    f"{names['pca_dim']}); use at most {k}",
                    dataset=ds.name,
                    setting="pca_dim",
                )
            cov = _centered_cov(x_tr, mean, keep) / np.outer(step.std, step.std)  # of the standardised data
            step.proj, top, total = _whitening(cov, int(pca_dim), n, ds.name, names)
            info["pca_dim"] = int(pca_dim)
            info["explained_variance_ratio"] = float(top.sum() / total)
        out_tr, out_te = _transform(x_tr, step, add_bias), _transform(x_te, step, add_bias)

    info["add_bias"] = add_bias
    info["output_dim"] = int(out_tr.shape[1])
    return Preprocessed(
        x_train=out_tr, y_train=y_tr, x_test=out_te, y_test=y_te, num_classes=int(ds.num_classes), info=info
    )


# ---------------------------------------------------------------------------------------------------------------
# Blockwise statistics and transforms (O(ROW_BLOCK d) workspace)


class _Standardize:
    """``(x[:, keep] - mean) / std``, then ``@ proj`` when whitening."""

    def __init__(self, keep: np.ndarray, mean: np.ndarray, std: np.ndarray):
        self.keep, self.mean, self.std = keep, mean, std
        self.all_kept = bool(keep.all())
        self.proj: np.ndarray | None = None

    @property
    def out_dim(self) -> int:
        return int(self.mean.shape[0] if self.proj is None else self.proj.shape[1])

    def __call__(self, block: np.ndarray) -> np.ndarray:
        z = block.astype(np.float64) if self.all_kept else block[:, self.keep].astype(np.float64)
        z -= self.mean
        z /= self.std
        return z if self.proj is None else z @ self.proj


def _blocks(n: int) -> Iterator[slice]:
    for start in range(0, n, ROW_BLOCK):
        yield slice(start, min(start + ROW_BLOCK, n))


def _accumulate(acc: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``acc + rows[0] + rows[1] + ...`` added in order, as numpy's ``sum(axis=0)`` of the whole array would:
    the block-by-block statistics equal the one-shot ones bit for bit."""
    return np.add.reduce(np.concatenate([acc[None], rows]), axis=0)


def _column_mean(x: np.ndarray) -> np.ndarray:
    acc = np.zeros(x.shape[1])
    for b in _blocks(x.shape[0]):
        acc = _accumulate(acc, x[b].astype(np.float64))
    return acc / x.shape[0]


def _column_var(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``mean((x - mean)^2)`` per column (ddof=0), as ``numpy.var`` computes it."""
    acc = np.zeros(x.shape[1])
    for b in _blocks(x.shape[0]):
        z = x[b].astype(np.float64)
        z -= mean
        np.square(z, out=z)
        acc = _accumulate(acc, z)
    return acc / x.shape[0]


def _centered_cov(x: np.ndarray, mean: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``(x_k - mean_k)^T (x_k - mean_k) / n`` over the kept columns: d x d, summed over row blocks."""
    k = int(keep.sum())
    acc = np.zeros((k, k))
    for b in _blocks(x.shape[0]):
        z = x[b][:, keep].astype(np.float64)
        z -= mean[keep]
        acc += z.T @ z
    return acc / x.shape[0]


def _whitening(cov: np.ndarray, pca_dim: int, n: int, name: str, names: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """The whitening projection ``V_k diag(lambda_k)^(-1/2)`` (signs fixed), the top eigenvalues, their total."""
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    top = evals[:pca_dim]
    if top[-1] <= PCA_RANK_RTOL * max(float(evals[0]), np.finfo(np.float64).tiny):
        rank = int((evals > PCA_RANK_RTOL * evals[0]).sum())
        raise DataSettingError(
            f"pca_dim = {pca_dim} is more than the numerical rank {rank} of the standardized train data of {name!r} "
            f"(n_train = {n}; set by {names['pca_dim']}); use at most {rank}, or more train samples",
            dataset=name,
            setting="pca_dim",
        )
    comps = evecs[:, :pca_dim]
    signs = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(pca_dim)])
    comps = comps * np.where(signs == 0, 1.0, signs)
    return comps / np.sqrt(top), top, float(evals[evals > 0].sum())


def _transform(x: np.ndarray, step: _Standardize | None, add_bias: bool) -> np.ndarray:
    """The features of every row of `x`, written block by block into one float64 array (bias column last)."""
    width = x.shape[1] if step is None else step.out_dim
    out = np.empty((x.shape[0], width + int(add_bias)))
    for b in _blocks(x.shape[0]):
        out[b, :width] = x[b] if step is None else step(x[b])
    if add_bias:
        out[:, width] = 1.0
    return out


# ---------------------------------------------------------------------------------------------------------------
# Argument checks


def _check_args(ds: Any, features: Any, pca_dim: Any, seed: Any, add_bias: Any) -> None:
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


def _check_count(arg: str, value: int | None, available: int, name: str, split: str, names: dict) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"preprocess: argument '{arg}' must be a positive integer or None; received {value!r}")
    if value > available:
        raise DataSettingError(
            f"{arg} = {value} is more than the {available} {split} samples of {name!r} (set by {names[arg]}); use at "
            f"most {available}, or null for all of them",
            dataset=name,
            setting=arg,
        )
