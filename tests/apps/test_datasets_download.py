"""Loading data sets through downloads, the cache and data_dir: what is fetched, kept, refused and left behind.

Never the real cache, the internet or the system Fashion-MNIST copy (the `isolated` fixture)."""

from __future__ import annotations

import gzip
import pathlib

import numpy as np
import pytest
from dataset_fakes import (
    FAKES,
    Server,
    check_matches,
    cifar_members,
    files_under,
    free_port_url,
    make_idx,
    make_svhn,
    md5,
    umask,
    with_content_digests,
)

from experiments.common import cli
from experiments.common import datasets as data
from experiments.common.datasets import ChecksumError, DatasetNotFoundError, DataSettingError

pytestmark = pytest.mark.usefixtures("isolated")  # no real cache, internet or system copy


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
        data.load_dataset("mnist", cache_dir=cache2, base_url=server.url, checksums=dict.fromkeys(fake.files, "f" * 32))
    assert files_under(cache2) == []


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

    with pytest.raises(ChecksumError, match=r"t10k-images-idx3-ubyte\.gz"):
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


def test_mirror_serving_recompressed_files(server: Server, tmp_path: pathlib.Path, monkeypatch) -> None:
    """A download whose bytes differ from the published .gz is kept when its content is the published one."""
    fake = make_idx(23)
    monkeypatch.setitem(data.CHECKSUMS, "fashion_mnist", with_content_digests(fake))
    server.publish(
        "fashion_mnist", {f: gzip.compress(gzip.decompress(r), compresslevel=9, mtime=7) for f, r in fake.files.items()}
    )
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


def test_failed_download_leaves_no_folder_and_files_are_readable(server: Server, tmp_path, monkeypatch) -> None:
    fake = make_svhn()
    server.publish("svhn", {"train_32x32.mat": fake.files["train_32x32.mat"]})  # the test file is missing: 404
    monkeypatch.setitem(data.CHECKSUMS, "svhn", fake.checksums)
    cache = tmp_path / "a" / "b"
    with pytest.raises(DatasetNotFoundError, match="HTTP 404") as err:
        data.load_dataset("svhn", cache_dir=cache, base_url=server.url)
    assert err.value.setting is None and err.value.missing == ("test_32x32.mat",)
    assert [p.name for p in files_under(cache)] == ["train_32x32.mat"]  # verified before the failure: kept
    assert (cache / "svhn" / "train_32x32.mat").stat().st_mode & 0o777 == 0o666 & ~umask()

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
