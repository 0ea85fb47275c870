"""Fake data sets for the data package's tests: IDX, CIFAR and SVHN files made in memory, with their checksums,
and a tiny HTTP server's record type (the fixtures are in conftest.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import pathlib
import pickle
import socket
import tarfile
from collections import Counter
from typing import NamedTuple

import numpy as np
import scipy.io

from experiments.common.datasets import Dataset

FASHION_SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


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
    hwc = lambda d: d.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
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
    np.testing.assert_allclose(ds.x_train.reshape((-1, *shape)), fake.x_train / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.x_test.reshape((-1, *shape)), fake.x_test / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, fake.y_train)
    np.testing.assert_array_equal(ds.y_test, fake.y_test)
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0


def free_port_url() -> str:
    """A base URL on which nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


class Server(NamedTuple):
    root: pathlib.Path
    url: str  # base URL with a {name} placeholder: files are served from root/<name>/
    requests: Counter

    def publish(self, name: str, files: dict[str, bytes]) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        for fname, raw in files.items():
            (self.root / name / fname).write_bytes(raw)


def files_under(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def toy(n_train: int = 200, n_test: int = 50, d: int = 12, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))
    x = (rng.normal(size=(n_train + n_test, d)) @ mix).astype(np.float32)
    x = (x - x.min()) / (x.max() - x.min())
    x[:, 3] = 0.0  # constant columns
    x[:, 7] = 0.5
    y = rng.integers(0, 4, n_train + n_test).astype(np.int32)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], "toy", 4, (d,))


def raw_idx(fake: Fake) -> dict[str, bytes]:
    """The decompressed content of each IDX file, keyed by the uncompressed name."""
    return {fname[:-3]: gzip.decompress(raw) for fname, raw in fake.files.items()}


def with_content_digests(fake: Fake, algo: str = "md5") -> dict[str, str]:
    """The published-style table: MD5 of each .gz and a digest (MD5 or SHA-256) of each decompressed file."""
    table = dict(fake.checksums)
    table.update({name: hashlib.new(algo, raw).hexdigest() for name, raw in raw_idx(fake).items()})
    return table


def umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask
