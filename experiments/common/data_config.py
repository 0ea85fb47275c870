"""The data section of every subcommand's config: which data set, and how it becomes features.

One class, one validation, used by `reproduce` (its `data` section) and `sweep` (each entry of `datasets`). The
fields are the arguments of `experiments.common.datasets.load_dataset` and `preprocess`; `features: null` (the
default) means "the command's default preprocessing", which each command's config fills in explicitly with
`with_default_features` ("pca_whiten" to 32 dimensions for `reproduce`, "standardize" for `sweep`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Literal

from experiments.common.config import check_seed
from experiments.common.datasets.errors import SettingsArg
from experiments.common.datasets.files import digest_file
from experiments.common.datasets.formats import Dataset
from experiments.common.datasets.loader import load_dataset
from experiments.common.datasets.own import NAME as FILES
from experiments.common.datasets.own import load_files
from experiments.common.datasets.registry import DATASETS, FEATURES

#: the built-in data sets and "files" (the user's own, `FilesConfig`)
DatasetName = Literal[(*DATASETS, FILES)]
FeatureKind = Literal[FEATURES]

_LABEL = re.compile(r"[A-Za-z0-9_.-]+")


def check_pca(features: str | None, pca_dim: int | None, *, key: str = "pca_dim") -> None:
    """`pca_dim` (spelt `key`) is required for "pca_whiten" and only there."""
    if features == "pca_whiten":
        if pca_dim is None or pca_dim < 1:
            raise ValueError(f"{key} must be a positive integer when features is 'pca_whiten'; got {pca_dim!r}")
    elif pca_dim is not None:
        raise ValueError(
            f"{key} applies only to features 'pca_whiten'; set it to null for features {features!r} "
            f"(got {key}={pca_dim!r})"
        )


@dataclasses.dataclass(frozen=True)
class FilesConfig:
    """The user's own data (`dataset: files`), read by `experiments.common.datasets.own.load_files`.

    Either `path`: one `.npz` holding `x_train`, `y_train`, `x_test`, `y_test`; or `train` and `test`: each an
    `.npz` holding `x`, `y`, or a CSV with a header row whose column `label_column` holds integer labels and whose
    other columns are the features. `num_classes`: null = the largest label + 1. Paths are relative to the working
    directory.
    """

    path: str | None = None
    train: str | None = None
    test: str | None = None
    label_column: str = "label"
    num_classes: int | None = None

    def __post_init__(self):
        if self.path is not None and (self.train is not None or self.test is not None):
            raise ValueError(
                f"give either path (one .npz) or train and test, not both; got path={self.path!r}, "
                f"train={self.train!r}, test={self.test!r}"
            )
        if self.path is None and (self.train is None or self.test is None):
            raise ValueError(
                "give path (one .npz with x_train, y_train, x_test, y_test) or both train and test (.npz with x, y, "
                f"or .csv); got path=null, train={self.train!r}, test={self.test!r}"
            )
        for key in ("path", "train", "test"):
            if getattr(self, key) == "":
                raise ValueError(f"{key} must be a file path or null; got an empty string")
        if not self.label_column:
            raise ValueError("label_column must name the CSV column of the labels; got an empty string")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 or null; got {self.num_classes!r}")

    def digests(self) -> dict[str, str | None]:
        """SHA-256 of each file named (None where it cannot be read): what the files hold, for fingerprints of
        results computed from them (a sweep resumes only from chunks of the same data)."""
        out: dict[str, str | None] = {}
        for key in ("path", "train", "test"):
            name = getattr(self, key)
            if name is None:
                continue
            try:
                out[key] = digest_file(pathlib.Path(name).expanduser(), "sha256")
            except OSError:
                out[key] = None
        return out


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data set and how it becomes features (`experiments.common.datasets.load_dataset` + `preprocess`).

    `dataset`: the data set's name. `label`: names it in a sweep's results (default: `dataset`; unique within a
    sweep). `features`: "pca_whiten" (standardise, project on the top `pca_dim` principal components, unit
    variance), "standardize" or "raw"; null: the command's default. `n_train`/`n_test`: seeded random subsets (null:
    the whole split). `add_bias` appends a constant-1 feature. `seed`: the subsets' seed; `projection_seed`: a
    sweep's random projections to a width. `data_dir`/`cache_dir`: where files are looked for / downloaded to (null:
    the defaults of `experiments.common.datasets`, i.e. `$DEQ_JAX_DATA_DIR` or `~/.cache/deq_jax/datasets`).
    `download`: fetch missing files. `files`: the user's own data, with `dataset: files` (and only then; see
    `FilesConfig`): `.npz` or CSV, validated like the built-in sets.
    """

    dataset: DatasetName = "digits"
    label: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    features: FeatureKind | None = None
    pca_dim: int | None = None
    add_bias: bool = True
    seed: int = 0
    projection_seed: int = 0
    data_dir: str | None = None
    cache_dir: str | None = None
    download: bool = True
    files: FilesConfig | None = None

    def __post_init__(self):
        if (self.dataset == FILES) != (self.files is not None):
            raise ValueError(
                "files (path, or train and test) must be set when dataset is 'files', and only then; got "
                f"dataset={self.dataset!r}, files={'null' if self.files is None else 'set'}"
            )
        if self.label is not None and not _LABEL.fullmatch(self.label):
            raise ValueError(f"label must be a non-empty string of letters, digits, '_', '.', '-'; got {self.label!r}")
        for key in ("n_train", "n_test"):
            value = getattr(self, key)
            if value is not None and value < 2:
                raise ValueError(f"{key} must be an integer >= 2 or null (the whole split); got {value!r}")
        if self.features is not None:
            check_pca(self.features, self.pca_dim)
        elif self.pca_dim is not None and self.pca_dim < 1:  # checked again once the command's default is in
            raise ValueError(f"pca_dim must be a positive integer or null; got {self.pca_dim!r}")
        for key in ("seed", "projection_seed"):
            check_seed(key, getattr(self, key))

    @property
    def key(self) -> str:
        """The data set's name in results: `label`, else `dataset`."""
        return self.label or self.dataset

    def with_default_features(self, features: str, pca_dim: int | None = None) -> DataConfig:
        """This config with the command's default preprocessing where `features` is null (`pca_dim`, for
        "pca_whiten", where it is null too)."""
        if self.features is not None:
            return self
        dim = (self.pca_dim if self.pca_dim is not None else pca_dim) if features == "pca_whiten" else self.pca_dim
        return dataclasses.replace(self, features=features, pca_dim=dim)


def load_configured(
    cfg: DataConfig, *, progress: bool = False, settings: SettingsArg = None, key: str = "data"
) -> Dataset:
    """The data set a data section names: a built-in one through `experiments.common.datasets.load_dataset`, the
    user's own files (`dataset: files`) through `load_files`. `key` is the section's name in the user's config (for
    messages). The loaders' `DatasetError`s pass through."""
    if cfg.dataset == FILES:
        assert cfg.files is not None
        f = cfg.files
        return load_files(
            path=f.path,
            train=f.train,
            test=f.test,
            label_column=f.label_column,
            num_classes=f.num_classes,
            key=f"{key}.files",
        )
    return load_dataset(
        cfg.dataset,
        data_dir=cfg.data_dir,
        cache_dir=cfg.cache_dir,
        download=cfg.download,
        progress=progress,
        settings=settings,
    )


__all__ = ["DataConfig", "DatasetName", "FeatureKind", "FilesConfig", "check_pca", "load_configured"]
