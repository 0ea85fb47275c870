"""The data sets' file formats and checksums: IDX (raw, gzip, recompressed), CIFAR archives, SVHN .mat files,
the bundled digits, and the messages for files that are missing, malformed or misnamed.

Never the real cache, the internet or the system Fashion-MNIST copy (the `isolated` fixture)."""

from __future__ import annotations

import gzip
import hashlib
import io
import pathlib
import pickle
import tarfile

import numpy as np
import pytest
from dataset_fakes import (
    FASHION_SYSTEM_DIR,
    Server,
    check_matches,
    cifar_members,
    files_under,
    idx_bytes,
    make_cifar,
    make_idx,
    md5,
    raw_idx,
    toy,
    with_content_digests,
)

from experiments.common import cli
from experiments.common import datasets as data
from experiments.common.datasets import (
    ChecksumError,
    DatasetFormatError,
    DatasetNotFoundError,
    DatasetWarning,
    Setting,
    formats,
)

pytestmark = pytest.mark.usefixtures("isolated")  # no real cache, internet or system copy


def test_cifar_hwc_order(server: Server, tmp_path, monkeypatch) -> None:
    fake = make_cifar(10)
    server.publish("cifar10", fake.files)
    ds = data.load_dataset("cifar10", cache_dir=tmp_path, base_url=server.url, checksums=fake.checksums)
    # Pixel (h=1, w=2) of channel c sits at c*1024 + 1*32 + 2 in the CIFAR row; here at (1*32 + 2)*3 + c.
    _, members, _ = cifar_members(10, 3)
    row = pickle.loads(members["data_batch_1"])["data"][0]
    for c in range(3):
        assert ds.x_train[0, (1 * 32 + 2) * 3 + c] == np.float32(row[c * 1024 + 34] / 255.0)


def test_offline_missing_files_message(tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.delenv("DEQ_JAX_DATA_BASE_URL")  # the message names the canonical host (nothing is fetched)
    cache, user = tmp_path / "cache", tmp_path / "user"
    user.mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        data.load_dataset("kmnist", data_dir=user, cache_dir=cache, download=False)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    for fname in data.CHECKSUMS["kmnist"]:
        assert fname in msg
    assert str(user) in msg and str(user / "kmnist") in msg and str(cache / "kmnist") in msg
    assert "config key data.download: true" in msg and "codh.rois.ac.jp" in msg
    assert "--data-dir" in msg and "--cache-dir" in msg and "(or uncompressed: train-images-idx3-ubyte)" in msg
    assert err.value.setting == "download" and err.value.dataset == "kmnist"
    assert set(err.value.missing) == set(data.registry.IDX_FILES)
    assert err.value.searched == (user, user / "kmnist", cache / "kmnist")
    assert not cache.exists()


def test_offline_message_cifar_mentions_tarball_and_directory(tmp_path: pathlib.Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-python\.tar\.gz(.|\n)*cifar-100-python/"):
        data.load_dataset("cifar100", cache_dir=tmp_path, download=False)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x00\x00\x08\x03" + np.array([2, 28, 28], ">i4").tobytes() + b"\x00" * 10, "need 1568 data bytes"),
        (b"\x12\x34\x08\x03", "bad magic"),
        (b"\x00\x00\x0d\x03", "data type"),
        (b"\x00\x00\x08\x01" + np.array([2], ">i4").tobytes() + b"\x00\x00", "1 dimension"),
    ],
)
def test_malformed_idx_names_file(payload: bytes, match: str, tmp_path: pathlib.Path) -> None:
    fake = make_idx(12)
    files = dict(fake.files, **{"train-images-idx3-ubyte.gz": gzip.compress(payload)})
    for fname, raw in files.items():
        (tmp_path / fname).write_bytes(raw)
    checksums = {f: md5(raw) for f, raw in files.items()}
    with pytest.raises(DatasetFormatError, match=match) as err:
        data.load_dataset("mnist", data_dir=tmp_path, download=False, checksums=checksums)
    assert "train-images-idx3-ubyte.gz" in str(err.value)


def test_not_gzip_names_file(tmp_path: pathlib.Path) -> None:
    fake = make_idx(13)
    files = dict(fake.files, **{"t10k-labels-idx1-ubyte.gz": b"plain bytes"})
    for fname, raw in files.items():
        (tmp_path / fname).write_bytes(raw)
    with pytest.raises(DatasetFormatError, match=r"t10k-labels-idx1-ubyte\.gz.*gzip"):
        data.load_dataset("mnist", data_dir=tmp_path, checksums={f: md5(r) for f, r in files.items()})


def test_broken_cifar_archive(tmp_path: pathlib.Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(DatasetFormatError, match=r"cifar-10-python\.tar\.gz.*(pickle|data_batch_2)"):
        data.load_dataset("cifar10", data_dir=tmp_path, checksums={"cifar-10-python.tar.gz": md5(buf.getvalue())})
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DatasetFormatError, match=r"cifar-10-python\.tar\.gz.*not a readable"):
        data.load_dataset("cifar10", data_dir=tmp_path, checksums={"cifar-10-python.tar.gz": md5(b"not a tarball")})


def test_argument_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"'name'.*'digits'.*'svhn'.*received 'imagenet'"):
        data.load_dataset("imagenet")
    with pytest.raises(DatasetNotFoundError, match="data_dir"):
        data.load_dataset("mnist", data_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="'download'"):
        data.load_dataset("mnist", download="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'timeout'"):
        data.load_dataset("mnist", timeout=0)


def test_digits() -> None:
    ds = data.load_dataset("digits")
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == 1797
    assert ds.x_test.shape == (360, 64) and ds.x_train.shape == (1437, 64)
    assert ds.num_classes == 10 and ds.image_shape == (8, 8)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert np.bincount(ds.y_test, minlength=10).min() >= 35  # stratified: 35-37 per class
    # read and split without importing scikit-learn, yet exactly scikit-learn's arrays and split
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    want = train_test_split(
        (bunch.data / 16.0).astype(np.float32),
        bunch.target.astype(np.int32),
        test_size=0.2,
        random_state=0,
        stratify=bunch.target,
    )
    for got, ref in zip((ds.x_train, ds.x_test, ds.y_train, ds.y_test), want, strict=True):
        np.testing.assert_array_equal(got, ref)
    y = np.repeat(np.arange(7), [5, 9, 2, 13, 4, 4, 6])  # ties in the per-class remainders: drawn by the seed
    for seed in range(5):
        train, test = formats.stratified_split(y, 0.3, seed)
        ref_train, ref_test = train_test_split(np.arange(y.size), test_size=0.3, random_state=seed, stratify=y)
        np.testing.assert_array_equal(train, ref_train)
        np.testing.assert_array_equal(test, ref_test)


@pytest.mark.skipif(not FASHION_SYSTEM_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_system_copy(monkeypatch, tmp_path: pathlib.Path, closed_port_url: str) -> None:
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "fashion_mnist", (FASHION_SYSTEM_DIR,))
    ds = data.load_dataset("fashion_mnist", cache_dir=tmp_path, base_url=closed_port_url)
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10 and np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.x_train.max() == 1.0 and ds.x_train.min() == 0.0
    assert files_under(tmp_path) == []  # read in place, nothing copied


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_test": 0}, r"'n_test'.*positive integer.*received 0"),
        ({"features": "whiten"}, r"'features'.*'raw'.*received 'whiten'"),
        ({"features": "pca_whiten"}, r"'pca_dim' is required"),
        ({"features": "standardize", "pca_dim": 3}, r"'pca_dim' is only used"),
        ({"seed": -1}, r"'seed'"),
        ({"seed": 1.5}, r"'seed'"),
        ({"add_bias": 1}, r"'add_bias'"),
    ],
)
def test_preprocess_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        data.preprocess(toy(), **kwargs)
    assert not isinstance(err.value, cli.UserError)  # a caller's bug, not a user's setting


@pytest.mark.parametrize("algo", ["md5", "sha256"])
def test_uncompressed_and_recompressed_idx_files_load(algo: str, tmp_path: pathlib.Path, monkeypatch) -> None:
    """A user's copy: two files uncompressed, one recompressed (other bytes, same content), one as published."""
    fake = make_idx(20)
    monkeypatch.setitem(data.CHECKSUMS, "mnist", with_content_digests(fake, algo))
    raw = raw_idx(fake)
    user = tmp_path / "user"
    user.mkdir()
    (user / "train-images-idx3-ubyte").write_bytes(raw["train-images-idx3-ubyte"])
    (user / "t10k-labels-idx1-ubyte").write_bytes(raw["t10k-labels-idx1-ubyte"])
    recompressed = gzip.compress(raw["train-labels-idx1-ubyte"], compresslevel=1, mtime=123)
    assert recompressed != fake.files["train-labels-idx1-ubyte.gz"]  # the case that used to be refused
    (user / "train-labels-idx1-ubyte.gz").write_bytes(recompressed)
    (user / "t10k-images-idx3-ubyte.gz").write_bytes(fake.files["t10k-images-idx3-ubyte.gz"])
    ds = data.load_dataset("mnist", data_dir=user, cache_dir=tmp_path / "cache", download=False)
    check_matches(ds, fake, "mnist")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("form", ["recompressed", "uncompressed"])
def test_real_corruption_is_still_refused(form: str, tmp_path: pathlib.Path, monkeypatch) -> None:
    fake = make_idx(21)
    monkeypatch.setitem(data.CHECKSUMS, "mnist", with_content_digests(fake, "sha256"))
    for fname, raw in fake.files.items():
        (tmp_path / fname).write_bytes(raw)
    content = bytearray(raw_idx(fake)["train-labels-idx1-ubyte"])
    content[-1] = (content[-1] + 1) % 10  # one label changed: still a well-formed IDX file
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    bad = tmp_path / ("train-labels-idx1-ubyte.gz" if form == "recompressed" else "train-labels-idx1-ubyte")
    bad.write_bytes(gzip.compress(bytes(content), mtime=1) if form == "recompressed" else bytes(content))
    with pytest.raises(ChecksumError, match=r"train-labels-idx1-ubyte(.|\n)*SHA-256 of the decompressed") as err:
        data.load_dataset("mnist", data_dir=tmp_path, download=False)
    e = err.value
    assert e.path == bad and e.verified_by == "SHA-256 of the decompressed content" and e.setting is None
    assert e.expected == hashlib.sha256(raw_idx(fake)["train-labels-idx1-ubyte"]).hexdigest()
    assert e.got == hashlib.sha256(bytes(content)).hexdigest() and e.got in str(e) and e.expected in str(e)
    assert "left in place" in str(e) and bad.exists()


def test_without_a_published_content_digest_a_structural_check_says_so(tmp_path: pathlib.Path, monkeypatch) -> None:
    """KMNIST publishes no digest of its decompressed files: other copies pass a structural check, with a warning."""
    fake = make_idx(22)
    monkeypatch.setitem(data.CHECKSUMS, "kmnist", fake.checksums)  # .gz MD5s only, like the real table
    shapes = {
        "train-images-idx3-ubyte": (20, 28, 28),
        "train-labels-idx1-ubyte": (20,),
        "t10k-images-idx3-ubyte": (10, 28, 28),
        "t10k-labels-idx1-ubyte": (10,),
    }
    for name, shape in shapes.items():  # the fake's sizes in place of 60000 / 10000
        monkeypatch.setitem(data.SPECS["kmnist"].idx_shapes, name, shape)
    for fname, raw in fake.files.items():
        (tmp_path / fname).write_bytes(raw)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw_idx(fake)["t10k-images-idx3-ubyte"])
    with pytest.warns(DatasetWarning, match=r"t10k-images-idx3-ubyte(.|\n)*structure only"):
        ds = data.load_dataset("kmnist", data_dir=tmp_path, download=False)
    check_matches(ds, fake, "kmnist")

    # A file of the wrong structure is refused, and the error says what was checked.
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(fake.x_test[:9]))
    with pytest.raises(ChecksumError, match=r"no digest of its decompressed content is published(.|\n)*shape") as err:
        data.load_dataset("kmnist", data_dir=tmp_path, download=False)
    assert err.value.verified_by == "structure"


@pytest.mark.skipif(not FASHION_SYSTEM_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_published_content_digests(tmp_path: pathlib.Path) -> None:
    """The real table: Debian's recompressed .gz files verify by their content, and so do uncompressed copies."""
    labels_gz = FASHION_SYSTEM_DIR / "t10k-labels-idx1-ubyte.gz"
    table = data.CHECKSUMS["fashion_mnist"]
    assert md5(labels_gz.read_bytes()) != table["t10k-labels-idx1-ubyte.gz"]  # recompressed: other bytes
    for fname in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / fname[:-3]).write_bytes(gzip.decompress((FASHION_SYSTEM_DIR / fname).read_bytes()))
    (tmp_path / "train-images-idx3-ubyte.gz").symlink_to(FASHION_SYSTEM_DIR / "train-images-idx3-ubyte.gz")
    (tmp_path / "train-labels-idx1-ubyte.gz").symlink_to(FASHION_SYSTEM_DIR / "train-labels-idx1-ubyte.gz")
    ds = data.load_dataset("fashion_mnist", data_dir=tmp_path, download=False)
    assert ds.x_test.shape == (10000, 784) and np.bincount(ds.y_test).tolist() == [1000] * 10


def test_checksum_table_is_well_formed() -> None:
    """Every IDX set has the published .gz MD5s; content digests are MD5 or SHA-256 hex, where one is published."""
    hexdigits = set("0123456789abcdef")
    for name in ("mnist", "fashion_mnist", "kmnist"):
        table = data.CHECKSUMS[name]
        for fname in data.registry.IDX_FILES:
            assert len(table[fname]) == 32 and set(table[fname]) <= hexdigits
            content = table.get(fname[:-3])
            if name == "kmnist":
                assert content is None  # none published: the structural check applies
            else:
                assert len(content) in (32, 64) and set(content) <= hexdigits


def test_errors_are_user_errors_naming_flag_and_key(tmp_path: pathlib.Path, capsys) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetNotFoundError) as err:
        data.load_dataset("mnist", data_dir=missing)
    e = err.value
    assert isinstance(e, cli.UserError) and isinstance(e, FileNotFoundError)
    assert e.setting == "data_dir" and e.path == missing and e.dataset == "mnist"
    assert str(missing) in str(e) and "--data-dir" in str(e) and "config key data.data_dir" in str(e)
    assert "load_dataset" not in str(e) and "argument" not in str(e)
    assert not missing.exists()

    # Through the CLIs' runner: one message, exit status 2, no traceback.
    def body() -> int:
        data.load_dataset("kmnist", cache_dir=tmp_path / "cache", download=False)
        return 0

    assert cli.run("prog", body) == cli.EXIT_USAGE
    stderr = capsys.readouterr().err
    assert stderr.startswith("prog: error: data set 'kmnist' not found") and "Traceback" not in stderr
    assert not (tmp_path / "cache").exists()


def test_settings_spelled_by_the_application(tmp_path: pathlib.Path) -> None:
    settings = {"data_dir": Setting(key="datasets[0].data_dir"), "download": "datasets[0].download"}
    with pytest.raises(DatasetNotFoundError) as err:
        data.load_dataset("svhn", cache_dir=tmp_path, download=False, settings=settings)
    msg = str(err.value)
    assert "config key datasets[0].download: true" in msg and "given by config key datasets[0].data_dir" in msg
    assert "--data-dir" not in msg
    assert "--cache-dir, config key data.cache_dir or $DEQ_JAX_DATA_DIR" in msg  # the default spelling
    with pytest.raises(ValueError, match="unknown setting 'datadir'"):
        data.load_dataset("svhn", settings={"datadir": "x"})
