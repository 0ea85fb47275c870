"""Tests of experiments.common.datasets: real file formats served by a local HTTP server on 127.0.0.1 (no internet),
the cache, IDX files as users have them (uncompressed, recompressed), CLI-facing errors, preprocess at n >> d."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pathlib
import pickle
import socket
import tarfile
import threading
import tracemalloc
from collections import Counter
from typing import Iterator, NamedTuple

import numpy as np
import pytest
import scipy.io

from experiments.common import cli
from experiments.common import datasets as data
from experiments.common.datasets import formats
from experiments.common.datasets import (ChecksumError, Dataset, DatasetFormatError, DatasetNotFoundError,
                                         DataSettingError, DatasetWarning, Setting)

FASHION_SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------------------------
# Small files in the real formats


def md5(raw: bytes) -> str:
    return hashlib.md5(raw).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


class Fake(NamedTuple):
    files: dict[str, bytes]  # download units: file name -> content
    x_train: np.ndarray  # images as the loader should return them (uint8, (n, *image_shape))
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def checksums(self) -> dict[str, str]:
        return {name: md5(raw) for name, raw in self.files.items()}


def make_idx(seed: int, n_train: int = 20, n_test: int = 10) -> Fake:
    rng = np.random.default_rng(seed)
    xtr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    xte = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    ytr = rng.integers(0, 10, n_train).astype(np.uint8)
    yte = rng.integers(0, 10, n_test).astype(np.uint8)
    files = {
        "train-images-idx3-ubyte.gz": gzip.compress(idx_bytes(xtr), mtime=0),
        "train-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(ytr), mtime=0),
        "t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(xte), mtime=0),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(yte), mtime=0),
    }
    return Fake(files, xtr, ytr, xte, yte)


def cifar_members(n_classes: int, seed: int) -> tuple[str, dict[str, bytes], Fake]:
    """Pickled batches (name -> bytes) as in the canonical tarballs, and the expected HWC images."""
    rng = np.random.default_rng(seed)
    if n_classes == 10:
        folder, train_names, label_key = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "labels"
        per_batch = 4
    else:
        folder, train_names, label_key = "cifar-100-python", ["train"], "fine_labels"
        per_batch = 20
    members: dict[str, bytes] = {}
    xs, ys = [], []
    for name in train_names:
        d = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, n_classes, per_batch).tolist()
        entry = {"data": d, label_key: y, "batch_label": name}
        if n_classes == 100:
            entry["coarse_labels"] = [v // 5 for v in y]
        members[name] = pickle.dumps(entry, protocol=2)
        xs.append(d)
        ys += y
    dte = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    yte = rng.integers(0, n_classes, 10).tolist()
    test_name = "test_batch" if n_classes == 10 else "test"
    members[test_name] = pickle.dumps({"data": dte, label_key: yte}, protocol=2)
    hwc = lambda d: d.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # noqa: E731
    fake = Fake({}, hwc(np.concatenate(xs)), np.array(ys), hwc(dte), np.array(yte))
    return folder, members, fake


def make_cifar(n_classes: int, seed: int = 3) -> Fake:
    folder, members, fake = cifar_members(n_classes, seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        meta = pickle.dumps({"label_names": [str(i) for i in range(n_classes)]}, protocol=2)
        info = tarfile.TarInfo(f"{folder}/{'batches.meta' if n_classes == 10 else 'meta'}")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    tar_name = "cifar-10-python.tar.gz" if n_classes == 10 else "cifar-100-python.tar.gz"
    return fake._replace(files={tar_name: buf.getvalue()})


def make_svhn(seed: int = 4) -> Fake:
    rng = np.random.default_rng(seed)
    files, arrays = {}, []
    for split, n in (("train", 12), ("test", 6)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.concatenate([[10, 1], rng.integers(1, 11, n - 2)]).astype(np.uint8).reshape(n, 1)
        buf = io.BytesIO()
        scipy.io.savemat(buf, {"X": x, "y": y})
        files[f"{split}_32x32.mat"] = buf.getvalue()
        arrays += [x.transpose(3, 0, 1, 2), np.where(y[:, 0] == 10, 0, y[:, 0])]
    return Fake(files, *arrays)


FAKES = {
    "mnist": lambda: make_idx(0),
    "fashion_mnist": lambda: make_idx(1),
    "kmnist": lambda: make_idx(2),
    "cifar10": lambda: make_cifar(10),
    "cifar100": lambda: make_cifar(100),
    "svhn": make_svhn,
}


def check_matches(ds: Dataset, fake: Fake, name: str) -> None:
    shape = ds.image_shape
    assert ds.name == name
    assert ds.num_classes == (100 if name == "cifar100" else 10)
    assert shape == fake.x_train.shape[1:]
    d = int(np.prod(shape))
    assert ds.x_train.shape == (len(fake.x_train), d) and ds.x_test.shape == (len(fake.x_test), d)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    np.testing.assert_allclose(ds.x_train.reshape((-1,) + shape), fake.x_train / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.x_test.reshape((-1,) + shape), fake.x_test / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, fake.y_train)
    np.testing.assert_array_equal(ds.y_test, fake.y_test)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


def free_port_url() -> str:
    """A base URL on which nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """Never touch the real cache, the internet or the system Fashion-MNIST copy unless a test asks.

    Any download a test does not point at its own server goes to a closed local port and fails at once.
    """
    monkeypatch.setenv("DEQ_JAX_DATA_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("DEQ_JAX_DATA_BASE_URL", free_port_url())
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "fashion_mnist", ())


class Server(NamedTuple):
    root: pathlib.Path
    url: str  # base URL with a {name} placeholder: files are served from root/<name>/
    requests: Counter

    def publish(self, name: str, files: dict[str, bytes]) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        for fname, raw in files.items():
            (self.root / name / fname).write_bytes(raw)


@pytest.fixture
def server(tmp_path: pathlib.Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    requests: Counter = Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            requests[self.path] += 1
            super().do_GET()

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Server(root, f"http://127.0.0.1:{httpd.server_address[1]}/{{name}}/", requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    return free_port_url()


def files_under(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ---------------------------------------------------------------------------------------------------------------
# Loading through downloads, the cache and data_dir


@pytest.mark.parametrize("name", list(FAKES))
def test_download_then_cache(name: str, server: Server, tmp_path: pathlib.Path, monkeypatch) -> None:
    fake = FAKES[name]()
    server.publish(name, fake.files)
    monkeypatch.setitem(data.CHECKSUMS, name, fake.checksums)
    cache = tmp_path / "cache"

    ds = data.load_dataset(name, cache_dir=cache, base_url=server.url)
    check_matches(ds, fake, name)
    assert sorted(p.name for p in files_under(cache)) == sorted(fake.files)  # no temp files left
    assert all(server.requests[f"/{name}/{f}"] == 1 for f in fake.files)

    # Second load: from the cache, no request; works offline too.
    ds2 = data.load_dataset(name, cache_dir=cache, base_url=server.url)
    ds3 = data.load_dataset(name, cache_dir=cache, download=False)
    assert sum(server.requests.values()) == len(fake.files)
    for a, b in ((ds, ds2), (ds, ds3)):
        np.testing.assert_array_equal(a.x_train, b.x_train)
        np.testing.assert_array_equal(a.y_test, b.y_test)


def test_checksums_argument_and_env_base_url(server: Server, tmp_path: pathlib.Path, monkeypatch) -> None:
    fake = make_idx(5)
    (server.root / "flat").mkdir()
    for fname, raw in fake.files.items():
        (server.root / "flat" / fname).write_bytes(raw)
    base = server.url.replace("{name}", "flat")
    monkeypatch.setenv("DEQ_JAX_DATA_BASE_URL", base)
    ds = data.load_dataset("kmnist", cache_dir=tmp_path / "c", checksums=fake.checksums, progress=True)
    check_matches(ds, fake, "kmnist")
    assert server.requests["/flat/train-images-idx3-ubyte.gz"] == 1


def test_default_cache_dir(monkeypatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("DEQ_JAX_DATA_DIR", str(tmp_path / "x"))
    assert data.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("DEQ_JAX_DATA_DIR")
    assert data.default_cache_dir() == pathlib.Path.home() / ".cache" / "deq_jax" / "datasets"


def test_cache_dir_defaults_to_env(server: Server, tmp_path: pathlib.Path, monkeypatch) -> None:
    fake = make_idx(6)
    server.publish("mnist", fake.files)
    ds = data.load_dataset("mnist", base_url=server.url, checksums=fake.checksums)
    check_matches(ds, fake, "mnist")
    assert sorted(p.name for p in files_under(tmp_path / "env-cache" / "mnist")) == sorted(fake.files)


@pytest.mark.parametrize("layout", ["flat", "subdir"])
def test_data_dir_loads_without_network(layout: str, server: Server, tmp_path: pathlib.Path) -> None:
    fake = make_idx(7)
    root = tmp_path / "user"
    target = root if layout == "flat" else root / "mnist"
    target.mkdir(parents=True)
    for fname, raw in fake.files.items():
        (target / fname).write_bytes(raw)
    ds = data.load_dataset(
        "mnist", data_dir=root, cache_dir=tmp_path / "cache", base_url=server.url, checksums=fake.checksums
    )
    check_matches(ds, fake, "mnist")
    assert sum(server.requests.values()) == 0
    assert files_under(tmp_path / "cache") == []


def test_data_dir_with_closed_port(closed_port_url: str, tmp_path: pathlib.Path, monkeypatch) -> None:
    fake = make_svhn()
    for fname, raw in fake.files.items():
        (tmp_path / fname).write_bytes(raw)
    monkeypatch.setitem(data.CHECKSUMS, "svhn", fake.checksums)
    ds = data.load_dataset("svhn", data_dir=tmp_path, base_url=closed_port_url)
    check_matches(ds, fake, "svhn")
    assert set(np.unique(ds.y_train)) <= set(range(10)) and 0 in ds.y_train  # label 10 -> 0


@pytest.mark.parametrize("n_classes", [10, 100])
@pytest.mark.parametrize("where", ["inside", "is_extracted_dir"])
def test_cifar_extracted_directory(n_classes: int, where: str, closed_port_url: str, tmp_path, monkeypatch) -> None:
    name = "cifar10" if n_classes == 10 else "cifar100"
    folder, members, fake = cifar_members(n_classes, seed=8)
    ext = tmp_path / "user" / name / folder
    ext.mkdir(parents=True)
    for member, raw in members.items():
        (ext / member).write_bytes(raw)
    monkeypatch.setitem(data.CHECKSUMS, name, {f"{folder}/{m}": md5(raw) for m, raw in members.items()})
    data_dir = tmp_path / "user" if where == "inside" else ext
    ds = data.load_dataset(name, data_dir=data_dir, base_url=closed_port_url, download=False)
    check_matches(ds, fake, name)

    # A corrupt member is reported by name and left in place.
    (ext / members.__iter__().__next__()).write_bytes(b"corrupt")
    with pytest.raises(ChecksumError, match=folder):
        data.load_dataset(name, data_dir=data_dir, download=False)
    assert (ext / next(iter(members))).read_bytes() == b"corrupt"


def test_cifar_hwc_order(server: Server, tmp_path, monkeypatch) -> None:
    fake = make_cifar(10)
    server.publish("cifar10", fake.files)
    ds = data.load_dataset("cifar10", cache_dir=tmp_path, base_url=server.url, checksums=fake.checksums)
    # Pixel (h=1, w=2) of channel c sits at c*1024 + 1*32 + 2 in the CIFAR row; here at (1*32 + 2)*3 + c.
    _, members, _ = cifar_members(10, 3)
    row = pickle.loads(members["data_batch_1"])["data"][0]
    for c in range(3):
        assert ds.x_train[0, (1 * 32 + 2) * 3 + c] == np.float32(row[c * 1024 + 34] / 255.0)


# ---------------------------------------------------------------------------------------------------------------
# Failures


def test_corrupt_download_leaves_nothing(server: Server, tmp_path: pathlib.Path) -> None:
    fake = make_idx(9)
    server.publish("mnist", fake.files)
    wrong = dict(fake.checksums)
    wrong["train-labels-idx1-ubyte.gz"] = "0" * 32
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError) as err:
        data.load_dataset("mnist", cache_dir=cache, base_url=server.url, checksums=wrong)
    msg = str(err.value)
    assert "train-labels-idx1-ubyte.gz" in msg and "0" * 32 in msg
    assert fake.checksums["train-labels-idx1-ubyte.gz"] in msg
    assert server.url.replace("{name}", "mnist") + "train-labels-idx1-ubyte.gz" in msg
    assert not (cache / "mnist" / "train-labels-idx1-ubyte.gz").exists()
    assert [p.name for p in files_under(cache)] == ["train-images-idx3-ubyte.gz"]  # the verified one before it

    # With every checksum wrong, the cache stays empty (no final file, no temp file).
    cache2 = tmp_path / "cache2"
    with pytest.raises(ChecksumError):
        data.load_dataset("mnist", cache_dir=cache2, base_url=server.url, checksums={f: "f" * 32 for f in fake.files})
    assert files_under(cache2) == []


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


def test_network_failure(closed_port_url: str, tmp_path: pathlib.Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DatasetNotFoundError) as err:
        data.load_dataset("svhn", cache_dir=cache, base_url=closed_port_url)
    msg = str(err.value)
    assert closed_port_url + "train_32x32.mat" in msg and "failed" in msg
    assert "train_32x32.mat" in msg and "test_32x32.mat" in msg
    assert files_under(cache) == []


def test_http_404(server: Server, tmp_path: pathlib.Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="HTTP 404"):
        data.load_dataset("cifar10", cache_dir=tmp_path / "c", base_url=server.url)
    assert files_under(tmp_path / "c") == []


def test_corrupt_cache_redownloads_or_errors(server: Server, tmp_path: pathlib.Path, monkeypatch) -> None:
    fake = make_idx(10)
    server.publish("fashion_mnist", fake.files)
    monkeypatch.setitem(data.CHECKSUMS, "fashion_mnist", fake.checksums)
    cache = tmp_path / "cache"
    data.load_dataset("fashion_mnist", cache_dir=cache, base_url=server.url)
    bad = cache / "fashion_mnist" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(b"truncated")

    with pytest.raises(ChecksumError, match="t10k-images-idx3-ubyte.gz"):
        data.load_dataset("fashion_mnist", cache_dir=cache, download=False)
    assert bad.read_bytes() == b"truncated"

    with pytest.warns(RuntimeWarning, match="downloading it again"):
        ds = data.load_dataset("fashion_mnist", cache_dir=cache, base_url=server.url)
    check_matches(ds, fake, "fashion_mnist")
    assert server.requests["/fashion_mnist/t10k-images-idx3-ubyte.gz"] == 2
    assert server.requests["/fashion_mnist/train-images-idx3-ubyte.gz"] == 1


def test_corrupt_data_dir_file_is_kept(server: Server, tmp_path: pathlib.Path) -> None:
    fake = make_idx(11)
    user = tmp_path / "user"
    user.mkdir()
    for fname, raw in fake.files.items():
        (user / fname).write_bytes(raw)
    (user / "train-labels-idx1-ubyte.gz").write_bytes(b"xx")
    with pytest.raises(ChecksumError, match=r"train-labels-idx1-ubyte\.gz(.|\n)*left in place"):
        data.load_dataset(
            "mnist", data_dir=user, cache_dir=tmp_path / "c", base_url=server.url, checksums=fake.checksums
        )
    assert (user / "train-labels-idx1-ubyte.gz").read_bytes() == b"xx"
    assert sum(server.requests.values()) == 0


@pytest.mark.parametrize(
    "payload, match",
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


# ---------------------------------------------------------------------------------------------------------------
# Bundled and system data


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
    want = train_test_split((bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int32), test_size=0.2,
                            random_state=0, stratify=bunch.target)
    for got, ref in zip((ds.x_train, ds.x_test, ds.y_train, ds.y_test), want):
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


# ---------------------------------------------------------------------------------------------------------------
# preprocess and one_hot


def toy(n_train: int = 200, n_test: int = 50, d: int = 12, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))
    x = (rng.normal(size=(n_train + n_test, d)) @ mix).astype(np.float32)
    x = (x - x.min()) / (x.max() - x.min())
    x[:, 3] = 0.0  # constant columns
    x[:, 7] = 0.5
    y = rng.integers(0, 4, n_train + n_test).astype(np.int32)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], "toy", 4, (d,))


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
    "kwargs, match",
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


@pytest.mark.parametrize(
    "kwargs, setting, match",
    [
        ({"n_train": 201}, "n_train", r"n_train = 201 is more than the 200 training samples of 'toy' \(set by config "
                                      r"key data\.n_train\); use at most 200"),
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


# ---------------------------------------------------------------------------------------------------------------
# IDX files as users have them: uncompressed, recompressed by a mirror


def raw_idx(fake: Fake) -> dict[str, bytes]:
    """The decompressed content of each IDX file, keyed by the uncompressed name."""
    return {fname[:-3]: gzip.decompress(raw) for fname, raw in fake.files.items()}


def with_content_digests(fake: Fake, algo: str = "md5") -> dict[str, str]:
    """The published-style table: MD5 of each .gz and a digest (MD5 or SHA-256) of each decompressed file."""
    table = dict(fake.checksums)
    table.update({name: hashlib.new(algo, raw).hexdigest() for name, raw in raw_idx(fake).items()})
    return table


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
    shapes = {"train-images-idx3-ubyte": (20, 28, 28), "train-labels-idx1-ubyte": (20,),
              "t10k-images-idx3-ubyte": (10, 28, 28), "t10k-labels-idx1-ubyte": (10,)}
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


def test_mirror_serving_recompressed_files(server: Server, tmp_path: pathlib.Path, monkeypatch) -> None:
    """A download whose bytes differ from the published .gz is kept when its content is the published one."""
    fake = make_idx(23)
    monkeypatch.setitem(data.CHECKSUMS, "fashion_mnist", with_content_digests(fake))
    server.publish("fashion_mnist", {f: gzip.compress(gzip.decompress(r), compresslevel=9, mtime=7)
                                     for f, r in fake.files.items()})
    cache = tmp_path / "cache"
    ds = data.load_dataset("fashion_mnist", cache_dir=cache, base_url=server.url)
    check_matches(ds, fake, "fashion_mnist")
    assert sorted(p.name for p in files_under(cache)) == sorted(fake.files)
    data.load_dataset("fashion_mnist", cache_dir=cache, download=False)  # the cached copies verify again

    # Corrupt content from the mirror: refused, nothing kept, no folder created.
    monkeypatch.setitem(data.CHECKSUMS["fashion_mnist"], "train-images-idx3-ubyte", "0" * 32)
    cache2 = tmp_path / "c2" / "deeper"
    with pytest.raises(ChecksumError, match=r"downloaded from .*train-images-idx3-ubyte\.gz(.|\n)*decompressed"):
        data.load_dataset("fashion_mnist", cache_dir=cache2, base_url=server.url)
    assert not (tmp_path / "c2").exists()


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


# ---------------------------------------------------------------------------------------------------------------
# Errors in the CLI's terms; nothing left behind


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


def test_failed_download_leaves_no_folder_and_files_are_readable(server: Server, tmp_path, monkeypatch) -> None:
    fake = make_svhn()
    server.publish("svhn", {"train_32x32.mat": fake.files["train_32x32.mat"]})  # the test file is missing: 404
    monkeypatch.setitem(data.CHECKSUMS, "svhn", fake.checksums)
    cache = tmp_path / "a" / "b"
    with pytest.raises(DatasetNotFoundError, match="HTTP 404") as err:
        data.load_dataset("svhn", cache_dir=cache, base_url=server.url)
    assert err.value.setting is None and err.value.missing == ("test_32x32.mat",)
    assert [p.name for p in files_under(cache)] == ["train_32x32.mat"]  # verified before the failure: kept
    assert (cache / "svhn" / "train_32x32.mat").stat().st_mode & 0o777 == 0o666 & ~_umask()

    with pytest.raises(DatasetNotFoundError):  # nothing verified at all: no folder either
        data.load_dataset("svhn", cache_dir=tmp_path / "x" / "y", base_url=free_port_url())
    assert not (tmp_path / "x").exists()


def test_cache_that_cannot_be_written_names_the_setting(tmp_path: pathlib.Path, server: Server) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataSettingError, match=r"cannot write the download cache(.|\n)*--cache-dir") as err:
        data.load_dataset("mnist", cache_dir=blocker, base_url=server.url)
    assert err.value.setting == "cache_dir" and isinstance(err.value, cli.UserError)
    assert blocker.read_text() == "not a directory" and sum(server.requests.values()) == 0


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------------------
# preprocess at scale (n >> d) and against an SVD reference


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
    assert p.info["explained_variance_ratio"] == pytest.approx((s[:k] ** 2).sum() / (s ** 2).sum(), rel=1e-12)
    std_only = data.preprocess(ds, features="standardize", add_bias=False)
    np.testing.assert_allclose(std_only.x_train, xs, atol=1e-12)
    np.testing.assert_allclose(std_only.x_test, xs_te, atol=1e-12)
