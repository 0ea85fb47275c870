"""A sweep's data: each data set loaded and preprocessed once, features per width, and the optimum L*.

Errors are the user's to fix and name the config key (`datasets[i]...`) or the `--data-dir` flag; they are raised
before anything is compiled or written.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax import theory
from deq_jax.maps import features, random_projection
from experiments.common import datasets as data_lib
from experiments.common.cli import UserError
from experiments.common.data_config import load_configured
from experiments.common.datasets.errors import Setting
from experiments.sweep.config import SweepConfig


class DataError(UserError):
    """A data set of the sweep cannot be loaded or preprocessed as configured."""


class FeatureData(NamedTuple):
    """Features and labels of one (data set, width): float arrays in the sweep's dtype, int32 labels."""

    phi_train: np.ndarray  # (n, m)
    labels_train: np.ndarray  # (n,)
    phi_test: np.ndarray  # (n_test, m)
    labels_test: np.ndarray  # (n_test,)
    num_classes: int
    info: dict

    def targets(self, loss: str, split: str = "train") -> np.ndarray:
        """Square loss: one-hot rows in the features' dtype; cross-entropy: the integer labels."""
        labels = self.labels_train if split == "train" else self.labels_test
        if loss == "square":
            return data_lib.one_hot(labels, self.num_classes).astype(self.phi_train.dtype)
        return labels


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _settings(i: int) -> dict[str, Setting]:
    """How the sweep spells the loader's settings for `datasets[i]` (the loader's messages use these)."""
    key = f"datasets[{i}]"
    out = {name: Setting(key=f"{key}.{name}") for name in ("download", "n_train", "n_test", "features", "pca_dim")}
    out["data_dir"] = Setting(flag="--data-dir", key=f"{key}.data_dir")
    out["cache_dir"] = Setting(env="DEQ_JAX_DATA_DIR")
    return out


def load_datasets(config: SweepConfig, *, progress: bool = False) -> dict[str, data_lib.Preprocessed]:
    """Every data set of the sweep, loaded and preprocessed, by label; a `DataError` (one line) otherwise."""
    out = {}
    for i, spec in enumerate(config.datasets):
        where, settings = f"datasets[{i}] ({spec.key})", _settings(i)
        try:
            ds = load_configured(spec, progress=progress, settings=settings, key=f"datasets[{i}]")
            out[spec.key] = data_lib.preprocess(
                ds,
                n_train=spec.n_train,
                n_test=spec.n_test,
                features=spec.features,
                pca_dim=spec.pca_dim,
                add_bias=spec.add_bias,
                seed=spec.seed,
                settings=settings,
            )
        except data_lib.DatasetNotFoundError as err:
            if err.setting == "data_dir" or not err.missing:  # a data folder that does not exist; a failed download
                raise DataError(f"{where}: {_one_line(err)}") from None
            # files missing: the loader's message lists them and the folders searched over several lines
            first = str(err).strip().splitlines()[0].rstrip(".")
            advice = (
                f"allow downloading (datasets[{i}].download: true)"
                if not spec.download
                else "check the network or set $DEQ_JAX_DATA_BASE_URL to a mirror"
            )
            raise DataError(
                f"{where}: {first}. Missing: {', '.join(err.missing)}. Put them in a folder and pass "
                f"--data-dir FOLDER (or set datasets[{i}].data_dir), or {advice}."
            ) from None
        except data_lib.DatasetError as err:  # checksums, formats, settings that do not fit the data
            raise DataError(f"{where}: {_one_line(err)}") from None
    return out


def prepare_features(
    pre: data_lib.Preprocessed, width: int | None, dtype: Any, projection_seed: int = 0
) -> FeatureData:
    """`phi` for one width: the preprocessed features cast to `dtype`, or their fixed random projection
    `x @ P`, `P = random_projection(PRNGKey(projection_seed), d, width)` (the same P for train and test)."""
    x_train = jnp.asarray(pre.x_train, dtype)
    x_test = jnp.asarray(pre.x_test, dtype)
    info = dict(pre.info)
    if width is not None:
        P = random_projection(jax.random.PRNGKey(projection_seed), x_train.shape[1], width, dtype)
        x_train, x_test = features(x_train, P), features(x_test, P)
        info.update(projection_width=width, projection_seed=projection_seed)
    return FeatureData(
        np.asarray(x_train),
        np.asarray(pre.y_train, np.int32),
        np.asarray(x_test),
        np.asarray(pre.y_test, np.int32),
        int(pre.num_classes),
        info,
    )


def shallow_square_optimum(phi: np.ndarray, targets: np.ndarray) -> float:
    """`L* = min_W (1/n) sum_i 1/2 |W phi_i - y_i|^2`, the shallow (hence also the DELM's) optimum on these
    features: `deq_jax.theory.shallow_optimum_square` in float64 (x64 enabled for this call only, so that gaps of
    float32 runs are not limited by the optimum's own rounding)."""
    with jax.enable_x64(True):
        _, L_star = theory.shallow_optimum_square(np.asarray(phi, np.float64), np.asarray(targets, np.float64))
        return float(L_star)


__all__ = ["DataError", "FeatureData", "load_datasets", "prepare_features", "shallow_square_optimum"]
