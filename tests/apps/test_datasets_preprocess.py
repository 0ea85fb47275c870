"""`preprocess`: raw, standardised and PCA-whitened features, subsets, bias column, one-hot targets, its argument
and setting errors, and PCA at scale (no n x n workspace) against an SVD reference."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from dataset_fakes import toy

from experiments.common import cli
from experiments.common import datasets as data
from experiments.common.datasets import Dataset, DataSettingError

pytestmark = pytest.mark.usefixtures("isolated")  # no real cache, internet or system copy


def test_preprocess_raw() -> None:
    ds = toy()
    p = data.preprocess(ds, features="raw", add_bias=False)
    assert p.x_train.dtype == np.float64
    np.testing.assert_array_equal(p.x_train, ds.x_train.astype(np.float64))
    np.testing.assert_array_equal(p.y_test, ds.y_test)
    assert p.info["n_train"] == 200 and p.info["kept_columns"] == 12 and p.num_classes == 4


def test_preprocess_standardize() -> None:
    p = data.preprocess(toy(), features="standardize", add_bias=False)
    assert p.x_train.shape == (200, 10) and p.x_test.shape == (50, 10)
    assert p.info["kept_columns"] == 10 and p.info["dropped_columns"] == 2
    assert 3 not in p.info["kept_column_indices"] and 7 not in p.info["kept_column_indices"]
    np.testing.assert_allclose(p.x_train.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(p.x_train.std(axis=0), 1.0, atol=1e-10)


def test_preprocess_standardize_uses_train_subset_statistics() -> None:
    ds = toy()
    x = ds.x_train.copy()
    x[:, 0] = 0.25  # constant on the train split only ...
    x_test = ds.x_test.copy()
    x_test[:, 0] = 0.75  # ... so it is dropped even though the test split differs
    p = data.preprocess(ds._replace(x_train=x, x_test=x_test), n_train=50, seed=1, add_bias=False)
    assert p.info["dropped_columns"] == 3 and p.x_test.shape == (50, 9)
    np.testing.assert_allclose(p.x_train.mean(axis=0), 0.0, atol=1e-10)


def test_preprocess_pca_whiten() -> None:
    p = data.preprocess(toy(), features="pca_whiten", pca_dim=6, add_bias=True)
    assert p.x_train.shape == (200, 7) and p.x_test.shape == (50, 7)
    np.testing.assert_array_equal(p.x_train[:, -1], 1.0)
    z = p.x_train[:, :-1]
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(z.T @ z / z.shape[0], np.eye(6), atol=1e-8)
    assert p.info["pca_dim"] == 6 and 0.0 < p.info["explained_variance_ratio"] <= 1.0
    assert p.info["output_dim"] == 7 and p.info["add_bias"] is True


def test_preprocess_bias_column() -> None:
    p = data.preprocess(toy(), features="standardize", add_bias=True)
    assert p.x_train.shape == (200, 11)
    np.testing.assert_array_equal(p.x_train[:, -1], 1.0)
    np.testing.assert_array_equal(p.x_test[:, -1], 1.0)


def test_preprocess_deterministic_subsets() -> None:
    ds = toy()
    a = data.preprocess(ds, n_train=30, n_test=20, seed=3)
    b = data.preprocess(ds, n_train=30, n_test=20, seed=3)
    c = data.preprocess(ds, n_train=30, n_test=20, seed=4)
    for k in range(4):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape == (30, 11) and a.y_test.shape == (20,)
    assert a.info["seed"] == 3 and a.info["n_train"] == 30 and a.info["n_test"] == 20
    # the subset rows are rows of the data set, with their labels
    idx = np.random.default_rng(3).permutation(200)[:30]
    np.testing.assert_array_equal(a.y_train, ds.y_train[idx])


@pytest.mark.parametrize(
    ("kwargs", "setting", "match"),
    [
        (
            {"n_train": 201},
            "n_train",
            (
                r"n_train = 201 is more than the 200 training samples of 'toy' \(set by config "
                r"key data\.n_train\); use at most 200"
            ),
        ),
        ({"n_test": 51}, "n_test", r"n_test = 51 is more than the 50 test samples"),
        ({"features": "pca_whiten", "pca_dim": 11}, "pca_dim", r"pca_dim = 11 is more than the 10 non-constant"),
        ({"features": "pca_whiten", "pca_dim": 8, "n_train": 5}, "pca_dim", r"pca_dim = 8 .*numerical rank 4"),
        ({"n_train": 1}, "n_train", r"at least 2 train samples"),
    ],
)
def test_preprocess_setting_errors_name_the_config_key(kwargs: dict, setting: str, match: str) -> None:
    """Values that do not fit the data are the user's to fix: a UserError (and ValueError) naming the setting."""
    with pytest.raises(DataSettingError, match=match) as err:
        data.preprocess(toy(), **kwargs)
    assert isinstance(err.value, cli.UserError) and isinstance(err.value, ValueError)
    assert err.value.setting == setting and err.value.dataset == "toy"
    with pytest.raises(DataSettingError, match=r"datasets\[1\]\." + setting):  # the sweep's spelling
        data.preprocess(toy(), settings={setting: f"datasets[1].{setting}"}, **kwargs)


def test_preprocess_rejects_non_dataset() -> None:
    with pytest.raises(ValueError, match=r"'ds'.*Dataset"):
        data.preprocess((1, 2, 3))  # type: ignore[arg-type]


def test_one_hot() -> None:
    out = data.one_hot(np.array([0, 2, 1, 2]), 3)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.eye(3, dtype=np.float32)[[0, 2, 1, 2]])
    with pytest.raises(ValueError, match=r"'y'.*\[0, 3\)"):
        data.one_hot(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="'num_classes'"):
        data.one_hot(np.array([0]), 0)
    with pytest.raises(ValueError, match="'y'"):
        data.one_hot(np.array([[0, 1]]), 2)


def test_pca_at_n_much_larger_than_d_needs_no_n_by_n_workspace() -> None:
    """n = 50000 samples of d = 30: an n x n array (20 GB) or an SVD of the n x d data would show in the peak."""
    n, d = 50000, 30
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(n + 10, d)) @ rng.normal(size=(d, d))).astype(np.float32)
    y = rng.integers(0, 3, n + 10).astype(np.int32)
    ds = Dataset(x[:n], y[:n], x[n:], y[n:], "wide", 3, (d,))
    tracemalloc.start()
    try:
        p = data.preprocess(ds, features="pca_whiten", pca_dim=8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out_bytes = n * 9 * 8
    workspace = data.preprocessing.ROW_BLOCK * d * 8
    assert peak < out_bytes + 4 * workspace + 2 * d * d * 8 + (1 << 20), peak  # output + blocks, O(n d) at most
    z = p.x_train[:, :-1]
    np.testing.assert_allclose(z.T @ z / n, np.eye(8), atol=1e-9)  # whitened, across many row blocks
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-9)


@pytest.mark.parametrize("block", [7, 4096])  # ragged blocks, and one block
def test_pca_matches_an_svd_reference(block: int, monkeypatch) -> None:
    monkeypatch.setattr(data.preprocessing, "ROW_BLOCK", block)
    ds = toy()
    k = 5
    p = data.preprocess(ds, features="pca_whiten", pca_dim=k, add_bias=False)
    # Reference: standardise with numpy, then the thin SVD X_s = U S V^T; whitened train features are sqrt(n) U.
    keep = ds.x_train.std(axis=0) > 1e-10
    mean, std = ds.x_train[:, keep].astype(np.float64).mean(0), ds.x_train[:, keep].astype(np.float64).std(0)
    xs = (ds.x_train[:, keep] - mean) / std
    xs_te = (ds.x_test[:, keep] - mean) / std
    _, s, vt = np.linalg.svd(xs, full_matrices=False)
    v = vt[:k].T * np.sign(vt[:k].T[np.argmax(np.abs(vt[:k].T), axis=0), np.arange(k)])  # the same sign rule
    proj = v / (s[:k] / np.sqrt(xs.shape[0]))
    # eigh of the d x d covariance vs SVD of the data: equal to ~cond * eps; these components are well separated
    np.testing.assert_allclose(p.x_train, xs @ proj, atol=1e-9)
    np.testing.assert_allclose(p.x_test, xs_te @ proj, atol=1e-9)
    assert p.info["explained_variance_ratio"] == pytest.approx((s[:k] ** 2).sum() / (s**2).sum(), rel=1e-12)
    std_only = data.preprocess(ds, features="standardize", add_bias=False)
    np.testing.assert_allclose(std_only.x_train, xs, atol=1e-12)
    np.testing.assert_allclose(std_only.x_test, xs_te, atol=1e-12)
