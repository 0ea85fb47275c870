"""The data sets: names, files, canonical download locations, published checksums, system directories.

Tests (and users of a private mirror) may change the tables in place, e.g. ``monkeypatch.setitem(CHECKSUMS,
"mnist", {...})``; the loader reads them at call time.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

__all__ = ["CHECKSUMS", "DATASETS", "DEFAULT_BASE_URLS", "FEATURES", "SPECS", "SYSTEM_DATA_DIRS", "Spec"]

DATASETS: tuple[str, ...] = ("digits", "fashion_mnist", "mnist", "kmnist", "cifar10", "cifar100", "svhn")

FEATURES: tuple[str, ...] = ("raw", "standardize", "pca_whiten")

#: The four IDX files of the MNIST-like sets, as published (gzip-compressed). Each may also be on disk
#: uncompressed under the same name without ``.gz`` (``train-images-idx3-ubyte``), or recompressed by a mirror.
IDX_FILES: tuple[str, ...] = (
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

# Checksums, per data set, keyed by file name. A digest of 32 hex digits is an MD5, of 64 an SHA-256.
#
# * ``<file>.gz`` / ``.tar.gz`` / ``.mat``: the MD5 of the published file, as torchvision lists them
#   (``torchvision/datasets/mnist.py`` classes MNIST, FashionMNIST, KMNIST; ``cifar.py``; ``svhn.py``).
# * ``<file>`` without ``.gz`` (IDX sets): the digest of the *decompressed* content. It verifies an uncompressed
#   copy, and a ``.gz`` whose compressed bytes differ from the published file (a mirror's or a distribution's
#   recompression of the same data). Sources:
#   - fashion_mnist: MD5s computed here from Debian's package ``dataset-fashion-mnist``
#     (/usr/share/datasets/fashion-mnist, recompressed .gz files). Their content is the published one: the
#     SHA-256s of the same decompressed files (train images c59f468a..., train labels bad3541b..., test images
#     5b4141f0..., test labels 0402a96d...) equal those that independent Fashion-MNIST loaders in public code pin.
#   - mnist: no published MD5 of the decompressed files was found (torchvision, TFDS, Keras and the mirrors
#     publish digests of the .gz files only); these are the SHA-256s of the decompressed files that MNIST
#     download scripts and loaders in public source code pin, identically in every one of the more than six
#     files found (Python, Rust, shell, Makefile; each gunzips the ossci/cvdf mirrors' .gz files; their
#     repositories were not recorded). Not checked here (no MNIST copy on this machine); the Fashion-MNIST
#     SHA-256s that such sources pin were checked against Debian's files and match.
#   - kmnist: no published digest of the decompressed files was found (torchvision, TFDS and the KMNIST repository
#     publish only the .gz files' MD5/SHA-256). Uncompressed or recompressed KMNIST files are therefore checked
#     by their structure only (IDX header, 60000/10000 images of 28 x 28, labels 0..9), with a `DatasetWarning`
#     that says so; the published .gz files are checked by their MD5 as always.
# * ``"<extracted dir>/<member>"`` (CIFAR): the members of an already-extracted tarball (torchvision's values).
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
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

#: Read-only directories searched after the cache (files there are never modified or deleted).
SYSTEM_DATA_DIRS: dict[str, tuple[pathlib.Path, ...]] = {
    "fashion_mnist": (pathlib.Path("/usr/share/datasets/fashion-mnist"),),
}


@dataclass(frozen=True)
class Spec:
    """One downloadable data set: its download units and what its images look like."""

    name: str
    files: tuple[str, ...]  # download units (what is fetched and cached)
    num_classes: int
    image_shape: tuple[int, ...]
    extracted_dir: str | None = None  # CIFAR: the directory the tarball extracts to
    extracted_members: tuple[str, ...] = ()
    #: IDX sets: the shape of each decompressed file, for the structural check of files without a known digest
    idx_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def is_idx(self) -> bool:
        return bool(self.idx_shapes)


def _mnist_like(name: str) -> Spec:
    shapes = {
        "train-images-idx3-ubyte": (60000, 28, 28),
        "train-labels-idx1-ubyte": (60000,),
        "t10k-images-idx3-ubyte": (10000, 28, 28),
        "t10k-labels-idx1-ubyte": (10000,),
    }
    return Spec(name, IDX_FILES, 10, (28, 28), idx_shapes=shapes)


SPECS: dict[str, Spec] = {
    "fashion_mnist": _mnist_like("fashion_mnist"),
    "mnist": _mnist_like("mnist"),
    "kmnist": _mnist_like("kmnist"),
    "cifar10": Spec(
        "cifar10",
        ("cifar-10-python.tar.gz",),
        10,
        (32, 32, 3),
        extracted_dir="cifar-10-batches-py",
        extracted_members=(*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
    ),
    "cifar100": Spec(
        "cifar100",
        ("cifar-100-python.tar.gz",),
        100,
        (32, 32, 3),
        extracted_dir="cifar-100-python",
        extracted_members=("train", "test"),
    ),
    "svhn": Spec("svhn", ("train_32x32.mat", "test_32x32.mat"), 10, (32, 32, 3)),
}
