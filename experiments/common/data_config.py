"""The data section of every subcommand's config: which data set, and how it becomes features.

One class, one validation, used by `reproduce` (its `data` section) and `sweep` (each entry of `datasets`). The
fields are the arguments of `experiments.common.datasets.load_dataset` and `preprocess`; `features: null` (the
default) means "the command's default preprocessing", which each command's config fills in explicitly with
`with_default_features` ("pca_whiten" to 32 dimensions for `reproduce`, "standardize" for `sweep`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from experiments.common.config import check_seed
from experiments.common.datasets.registry import DATASETS, FEATURES

DatasetName = Literal[DATASETS]
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
class DataConfig:
    """Which data set and how it becomes features (`experiments.common.datasets.load_dataset` + `preprocess`).

    `dataset`: the data set's name. `label`: names it in a sweep's results (default: `dataset`; unique within a
    sweep). `features`: "pca_whiten" (standardise, project on the top `pca_dim` principal components, unit
    variance), "standardize" or "raw"; null: the command's default. `n_train`/`n_test`: seeded random subsets (null:
    the whole split). `add_bias` appends a constant-1 feature. `seed`: the subsets' seed; `projection_seed`: a
    sweep's random projections to a width. `data_dir`/`cache_dir`: where files are looked for / downloaded to (null:
    the defaults of `experiments.common.datasets`, i.e. `$DEQ_JAX_DATA_DIR` or `~/.cache/deq_jax/datasets`).
    `download`: fetch missing files.
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

    def __post_init__(self):
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


__all__ = ["DataConfig", "DatasetName", "FeatureKind", "check_pca"]
