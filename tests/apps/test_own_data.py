"""The user's own data (`data: {dataset: files, files: ...}`): .npz and CSV files, validated like the built-in sets,
and the main job run end to end on them (the README's example)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import yaml
from reproduce_cases import TINY

from experiments.common import datasets as data
from experiments.common.config import ConfigError
from experiments.common.data_config import DataConfig, FilesConfig, load_configured
from experiments.reproduce import cli as reproduce
from experiments.reproduce.config import load_config


def _digits():
    ds = data.load_dataset("digits")
    return ds.x_train, ds.y_train, ds.x_test, ds.y_test


def _write_csv(path, x, y, label_column="label"):
    header = ",".join([f"f{j}" for j in range(x.shape[1])] + [label_column])
    rows = [",".join([repr(float(v)) for v in xi] + [str(int(yi))]) for xi, yi in zip(x, y, strict=True)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


def _rng_data(n=12, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), np.arange(n) % k, rng.normal(size=(n // 2, d)), np.arange(n // 2) % k


def test_npz_and_csv_load_the_same_dataset(tmp_path):
    x_tr, y_tr, x_te, y_te = _rng_data()
    np.savez(tmp_path / "all.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    _write_csv(tmp_path / "train.csv", x_tr, y_tr)
    _write_csv(tmp_path / "test.csv", x_te, y_te)
    np.savez(tmp_path / "train.npz", x=x_tr.reshape(-1, 2, 2), y=y_tr.astype(np.float64))  # images, integral floats
    np.savez(tmp_path / "test.npz", x=x_te, y=y_te)
    a = data.load_files(path=tmp_path / "all.npz")
    b = data.load_files(train=tmp_path / "train.csv", test=tmp_path / "test.csv")
    c = data.load_files(train=tmp_path / "train.npz", test=tmp_path / "test.npz", num_classes=5)
    for ds in (a, b, c):
        np.testing.assert_allclose(ds.x_train, x_tr)
        np.testing.assert_array_equal(ds.y_test, y_te)
        assert ds.y_train.dtype == np.int32 and ds.name == "files" and ds.image_shape == (4,)
    assert a.num_classes == b.num_classes == 3 and c.num_classes == 5
    pre = data.preprocess(b, features="pca_whiten", pca_dim=2)
    assert pre.x_train.shape == (12, 3) and pre.num_classes == 3


def _npz(tmp_path, **arrays):
    x_tr, y_tr, x_te, y_te = _rng_data()
    base = {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
    base.update(arrays)
    base = {k: v for k, v in base.items() if v is not None}
    np.savez(tmp_path / "d.npz", **base)
    return tmp_path / "d.npz"


@pytest.mark.parametrize(
    ("arrays", "error", "words"),
    [
        ({"x_train": np.zeros(12)}, data.DataShapeError, "at least 2-D"),
        ({"y_train": np.zeros((12, 2), int)}, data.DataShapeError, "must be 1-D"),
        ({"y_train": np.arange(11) % 3}, data.DataShapeError, "11 labels for 12 samples"),
        ({"x_test": np.zeros((6, 5))}, data.DataShapeError, "they must agree"),
        ({"x_train": np.full((12, 4), "a")}, data.DataTypeError, "real numbers"),
        ({"y_train": np.full(12, 0.5)}, data.DataTypeError, "must be integers"),
        ({"x_test": np.where(np.eye(6, 4) > 0, np.nan, 1.0)}, data.NonFiniteDataError, "NaN or infinite"),
        ({"y_test": np.array([0, 1, 2, -1, 0, 1])}, data.LabelRangeError, "row 3 holds -1"),
        ({"y_train": np.zeros(12, int), "y_test": np.zeros(6, int)}, data.LabelRangeError, "fewer than two"),
        ({"y_test": None}, data.DatasetFormatError, "lacks the array(s) y_test"),
    ],
)
def test_invalid_npz_is_a_named_error(tmp_path, arrays, error, words):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(
        error,
    ) as info:
        data.load_files(path=path)
    assert words in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, data.DatasetError)  # a UserError: one message, exit status 2


def test_label_out_of_range_of_num_classes_and_csv_errors(tmp_path):
    path = _npz(tmp_path)
    with pytest.raises(data.LabelRangeError, match=r"must lie in \[0, 2\) \(num_classes\)"):
        data.load_files(path=path, num_classes=2)
    x_tr, y_tr, x_te, y_te = _rng_data()
    _write_csv(tmp_path / "test.csv", x_te, y_te)
    _write_csv(tmp_path / "train.csv", x_tr, y_tr, label_column="class")
    with pytest.raises(data.DatasetFormatError, match="no column 'label'"):
        data.load_files(train=tmp_path / "train.csv", test=tmp_path / "test.csv")
    ds = data.load_files(train=tmp_path / "train.csv", test=tmp_path / "train.csv", label_column="class")
    assert ds.x_train.shape == (12, 4)
    (tmp_path / "bad.csv").write_text("a,label\n1.0,0\nx,1\n")
    with pytest.raises(data.DataTypeError, match="not a number"):
        data.load_files(train=tmp_path / "bad.csv", test=tmp_path / "test.csv")
    (tmp_path / "ragged.csv").write_text("a,b,label\n1.0,2.0,0\n1.0,1\n")
    with pytest.raises(data.DataShapeError, match="line 3 has 2 fields"):
        data.load_files(train=tmp_path / "ragged.csv", test=tmp_path / "test.csv")
    (tmp_path / "nan.csv").write_text("a,label\nnan,0\n1.0,1\n")
    with pytest.raises(data.NonFiniteDataError, match="first is row 0"):
        data.load_files(train=tmp_path / "nan.csv", test=tmp_path / "test.csv")
    with pytest.raises(data.DatasetNotFoundError, match=r"data\.files\.train"):
        data.load_files(train=tmp_path / "missing.csv", test=tmp_path / "test.csv")
    (tmp_path / "d.txt").write_text("")
    with pytest.raises(data.DatasetFormatError, match="must end in one of"):
        data.load_files(train=tmp_path / "d.txt", test=tmp_path / "test.csv")
    (tmp_path / "fake.npz").write_text("not a zip")
    with pytest.raises(data.DatasetFormatError, match=r"not a readable \.npz"):
        data.load_files(path=tmp_path / "fake.npz")


def test_config_section_is_validated():
    with pytest.raises(ValueError, match=r"files .* must be set when dataset is 'files'"):
        DataConfig(dataset="files")
    with pytest.raises(ValueError, match="and only then"):
        DataConfig(dataset="digits", files=FilesConfig(path="a.npz"))
    with pytest.raises(ValueError, match="not both"):
        FilesConfig(path="a.npz", train="b.csv", test="c.csv")
    with pytest.raises(ValueError, match="both train and test"):
        FilesConfig(train="b.csv")
    with pytest.raises(ConfigError, match=r"data\.files"):
        load_config(None, ["data.dataset=files", "data.files={path: a.npz, extra: 1}"])


def test_reproduce_runs_end_to_end_on_own_npz_and_csv(tmp_path, capsys):
    """The README's example: scikit-learn's digits written as an .npz and as CSV files, the main job (the tiny
    config's experiment 1, square loss) run on each from a config that points at them: the same features, the same
    numbers, every claim passes."""
    x_tr, y_tr, x_te, y_te = _digits()
    np.savez(tmp_path / "digits.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    _write_csv(tmp_path / "train.csv", x_tr, y_tr)
    _write_csv(tmp_path / "test.csv", x_te, y_te)
    base = yaml.safe_load(pathlib.Path(TINY).read_text())
    base["convergence"]["feature_sets"] = [{"features": "data", "losses": ["square"], "models": ["delm", "linear"]}]
    base["trust_region"]["enabled"] = False
    base["implicit_bias"]["enabled"] = False
    summaries = {}
    for name, files in (
        ("npz", {"path": str(tmp_path / "digits.npz")}),
        ("csv", {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}),
    ):
        cfg = {**base, "name": f"own_{name}", "data": {**base["data"], "dataset": "files", "files": files}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        rc = reproduce.main(
            ["--config", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / "out"), "--no-progress"]
        )
        assert rc == 0, capsys.readouterr().err
        summaries[name] = json.loads((tmp_path / "out" / f"own_{name}" / "summary.json").read_text())
    for s in summaries.values():
        assert s["all_passed"], [c for c in s["claims"] if not c["passed"]]
    a, b = ({c["key"]: c["measured"] for c in s["claims"]} for s in summaries.values())
    assert a.keys() == b.keys() and all(np.isclose(a[k], b[k], rtol=1e-6, atol=1e-12) for k in a)
    # a broken file is one message and exit status 2, before anything is written
    _write_csv(tmp_path / "bad.csv", x_te, np.where(np.arange(len(y_te)) == 7, -3, y_te))
    cfg = {**base, "name": "own_bad", "data": {**base["data"], "dataset": "files"}}
    cfg["data"]["files"] = {"train": str(tmp_path / "bad.csv"), "test": str(tmp_path / "test.csv")}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert (
        reproduce.main(["--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    )
    err = capsys.readouterr().err
    assert "row 7 holds -3" in err and "bad.csv" in err
    assert not (tmp_path / "out" / "own_bad").exists()


def test_load_configured_reads_the_section(tmp_path):
    path = _npz(tmp_path)
    ds = load_configured(DataConfig(dataset="files", files=FilesConfig(path=str(path))))
    assert ds.num_classes == 3 and ds.x_test.shape == (6, 4)


def test_sweep_reads_own_files(tmp_path):
    """A sweep's data set may be the user's files: the same preprocessed arrays as the built-in set they hold, and
    the sweep runs on them (results keyed by the data set's label)."""
    from sweep_cases import DATA, FAST, tiny

    from experiments.sweep import data as sweep_data
    from experiments.sweep.run import run_sweep

    x_tr, y_tr, x_te, y_te = _digits()
    np.savez(tmp_path / "digits.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    own = {**DATA, "dataset": "files", "label": "mine", "files": {"path": str(tmp_path / "digits.npz")}}
    cfg = tiny(datasets=[DATA, own])
    pre = sweep_data.load_datasets(cfg)
    np.testing.assert_array_equal(pre["mine"].x_train, pre["digits"].x_train)
    with pytest.raises(ConfigError, match=r"datasets\[0\]"):
        tiny(datasets=[{**DATA, "dataset": "files"}])
    bad = {**own, "files": {"path": str(tmp_path / "missing.npz")}}
    with pytest.raises(sweep_data.DataError, match=r"datasets\[0\] \(mine\).*missing.npz"):
        sweep_data.load_datasets(tiny(datasets=[bad]))
    result = run_sweep(tiny(datasets=[own], output_dir=str(tmp_path / "sweep")), progress=False, compiler_options=FAST)
    assert result.configurations and {c.dataset for c in result.configurations} == {"mine"}


def test_sweep_fingerprint_follows_the_files_content(tmp_path):
    from sweep_cases import DATA, tiny

    from experiments.sweep.config import fingerprint

    path = _npz(tmp_path)
    cfg = tiny(datasets=[{**DATA, "dataset": "files", "files": {"path": str(path)}}])
    before = fingerprint(cfg)
    assert fingerprint(cfg) == before
    x_tr, y_tr, x_te, y_te = _rng_data(seed=1)
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    assert fingerprint(cfg) != before  # same name, other data: a resumed sweep must not reuse its chunks
