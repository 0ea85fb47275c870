"""Real data sets for the experiments: loading from disk, checksummed download with a cache, preprocessing.

Data sets (`DATASETS`):

* ``digits`` -- scikit-learn's bundled 8x8 digits (1797 images, no download). It has no official split, so
  this package uses a fixed stratified split: ``sklearn.model_selection.train_test_split(test_size=0.2,
  random_state=0, stratify=y)``, i.e. 1437 train / 360 test images. Pixels 0..16 are scaled by 1/16.
* ``fashion_mnist``, ``mnist``, ``kmnist`` -- the four standard IDX files (28x28 grey images, 10 classes), as
  published (``.gz``), recompressed by a mirror, or uncompressed (``train-images-idx3-ubyte``). Pixels / 255.
* ``cifar10``, ``cifar100`` -- the canonical python-pickle tarballs (32x32 colour images; CIFAR-100 uses the 100
  ``fine_labels``), or the directory that the tarball extracts to. Pixels / 255.
* ``files`` -- the user's own data: ``.npz`` or CSV files (`own.load_files`, config ``data.files``), validated
  (shapes, dtypes, finite values, labels in range; `DataShapeError`, `DataTypeError`, `NonFiniteDataError`,
  `LabelRangeError`).
* ``svhn`` -- ``train_32x32.mat`` and ``test_32x32.mat`` (the cropped-digits format; label 10 means digit 0 and is
  mapped to 0). Pixels / 255.

Every `Dataset` holds flattened float32 images in [0, 1] and int32 labels. Colour images are flattened in
height-width-channel order, so ``x.reshape((-1,) + ds.image_shape)`` gives images of shape (32, 32, 3).

Where files are looked for, in this order, for each file a data set needs:

1. ``data_dir`` (``--data-dir``, config key ``data.data_dir``), the standard file names directly inside it or
   inside ``data_dir/<name>/``;
2. the cache, ``cache_dir/<name>/`` (``--cache-dir``, ``data.cache_dir``; default `default_cache_dir()`:
   ``$DEQ_JAX_DATA_DIR`` if set, else ``~/.cache/deq_jax/datasets``);
3. system directories from `SYSTEM_DATA_DIRS` (Fashion-MNIST: ``/usr/share/datasets/fashion-mnist``, installed by
   the Debian package ``dataset-fashion-mnist``);
4. a download into the cache (when ``download``, config key ``data.download``), from the canonical host of each
   data set or from ``base_url`` / ``$DEQ_JAX_DATA_BASE_URL``.

Every file is verified against `CHECKSUMS` before it is read (see `files` for how). Errors are `DatasetError`s,
which are `experiments.common.cli.UserError`s: each CLI prints the message and exits with status 2. Their
``setting`` attribute names the loader setting to change and their messages name it as the user sets it (see
`SETTINGS`).

Modules: `registry` (names, files, checksums, URLs), `files` (locate, verify, download, cache), `formats` (IDX,
CIFAR, SVHN, digits), `preprocessing` (subsets, standardisation, PCA whitening, bias, one-hot), `loader`
(`load_dataset`), `errors`.
"""

from experiments.common.datasets.errors import (
    SETTINGS,
    ChecksumError,
    DatasetError,
    DatasetFormatError,
    DatasetNotFoundError,
    DataSettingError,
    DatasetWarning,
    Setting,
)
from experiments.common.datasets.formats import Dataset
from experiments.common.datasets.loader import DOWNLOAD_TIMEOUT_S, default_cache_dir, load_dataset
from experiments.common.datasets.own import (
    DataShapeError,
    DataTypeError,
    LabelRangeError,
    NonFiniteDataError,
    load_files,
)
from experiments.common.datasets.preprocessing import (
    PCA_RANK_RTOL,
    ZERO_VARIANCE_TOL,
    Preprocessed,
    one_hot,
    preprocess,
)
from experiments.common.datasets.registry import (
    CHECKSUMS,
    DATASETS,
    DEFAULT_BASE_URLS,
    FEATURES,
    SPECS,
    SYSTEM_DATA_DIRS,
)

__all__ = [
    "CHECKSUMS",
    "ChecksumError",
    "DATASETS",
    "DEFAULT_BASE_URLS",
    "DOWNLOAD_TIMEOUT_S",
    "DataSettingError",
    "DataShapeError",
    "DataTypeError",
    "LabelRangeError",
    "NonFiniteDataError",
    "Dataset",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetWarning",
    "FEATURES",
    "PCA_RANK_RTOL",
    "Preprocessed",
    "SETTINGS",
    "SPECS",
    "SYSTEM_DATA_DIRS",
    "Setting",
    "ZERO_VARIANCE_TOL",
    "default_cache_dir",
    "load_dataset",
    "load_files",
    "one_hot",
    "preprocess",
]
