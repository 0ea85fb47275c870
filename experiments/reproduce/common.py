"""Pieces shared by the main job's experiments: features, models, claims, small measurements."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import datasets as dq_data
from deq_jax.models import DELM, DeepLinear, Linear, Model

from experiments.reproduce.config import DataConfig, ModelConfig


class Features(NamedTuple):
    """Preprocessed features (float64 NumPy, samples as rows), labels and one-hot targets."""

    phi_train: np.ndarray
    labels_train: np.ndarray
    Y_train: np.ndarray
    phi_test: np.ndarray
    labels_test: np.ndarray
    Y_test: np.ndarray
    num_classes: int
    info: dict


class Context(NamedTuple):
    """What every experiment gets: the data set, its features (the `data` section), checkpoints, progress flag."""

    dataset: Any
    features: "Features"
    store: Any
    progress: bool


def load_dataset(cfg: DataConfig, *, progress: bool = False) -> Any:
    """`experiments.common.datasets.load_dataset` as the config says (its errors pass through)."""
    return dq_data.load_dataset(cfg.dataset, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, download=cfg.download,
                                progress=progress)


def make_features(ds: Any, cfg: DataConfig, *, features: Optional[str] = None, pca_dim: Optional[int] = None,
                  normalize_rows: bool = False) -> Features:
    """`experiments.common.datasets.preprocess` with the config's subset and seed, and its feature settings unless given.

    `normalize_rows` rescales each sample's features (the bias excluded) to norm sqrt(d), d their number: a fixed
    per-sample map that tames the outliers whitening creates, so that small subsets are well conditioned.
    """
    if features is None:
        features, pca_dim = cfg.features, cfg.pca_dim
    pp = dq_data.preprocess(ds, n_train=cfg.n_train, n_test=cfg.n_test, features=features,
                            pca_dim=pca_dim if features == "pca_whiten" else None, add_bias=cfg.add_bias,
                            seed=cfg.seed)
    x_train, x_test, info = pp.x_train, pp.x_test, dict(pp.info)
    if normalize_rows:
        x_train, x_test = (_normalize_rows(x, cfg.add_bias) for x in (x_train, x_test))
        info["normalize_rows"] = True
    k = pp.num_classes
    return Features(x_train, pp.y_train, dq_data.one_hot(pp.y_train, k).astype(np.float64),
                    x_test, pp.y_test, dq_data.one_hot(pp.y_test, k).astype(np.float64), k, info)


def _normalize_rows(x: np.ndarray, has_bias: bool) -> np.ndarray:
    d = x.shape[1] - int(has_bias)
    body = x[:, :d]
    norms = np.linalg.norm(body, axis=1, keepdims=True)
    body = body * (np.sqrt(d) / np.where(norms > 0, norms, 1.0))
    return np.concatenate([body, x[:, d:]], axis=1)


def build_models(names: tuple, width: int, out_dim: int, cfg: ModelConfig) -> list[tuple[str, Model]]:
    """`(label, model)` for each name; `deep_linear` expands into one model per depth of `cfg.depths`."""
    out: list[tuple[str, Model]] = []
    for name in names:
        if name == "delm":
            out.append(("DELM", DELM(width=width, out_dim=out_dim, gamma=cfg.gamma, sigma=cfg.sigma,
                                     solver="direct", init_scale=cfg.init_scale)))
        elif name == "linear":
            out.append(("linear", Linear(width=width, out_dim=out_dim, init_scale=cfg.init_scale)))
        elif name == "deep_linear":
            for depth in cfg.depths:
                out.append((f"deep linear H={depth}", DeepLinear(width=width, out_dim=out_dim, depth=depth,
                                                                 hidden=cfg.deep_hidden,
                                                                 init_gain=cfg.deep_init_gain)))
        else:  # the config's Literal type rules this out
            raise ValueError(f"unknown model {name!r}")
    return out


def slug(label: str) -> str:
    return label.replace(" ", "_").replace("=", "")


def heldout_metrics(W: Any, phi: np.ndarray, labels: np.ndarray, Y: np.ndarray) -> dict:
    """Square loss (as `deq_jax.losses.square`), cross-entropy and accuracy of the end-to-end matrix `W` on
    `(phi, labels)`, in NumPy float64 (no compilation for the many shapes a run meets)."""
    pred = np.asarray(phi, np.float64) @ np.asarray(W, np.float64).T
    shifted = pred - pred.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
    return {"square_loss": float(np.mean(0.5 * np.sum((pred - Y) ** 2, axis=1))),
            "cross_entropy": float(-np.mean(log_probs[np.arange(len(labels)), labels])),
            "accuracy": float(np.mean(np.argmax(pred, axis=1) == labels))}


@dataclasses.dataclass(frozen=True)
class Claim:
    """One checked statement: `passed` iff `measured <op> threshold` (a NaN measurement never passes)."""

    experiment: str
    name: str
    measured: float
    threshold: float
    op: str  # "<=", ">=", ">" or "<"
    detail: str = ""

    @property
    def passed(self) -> bool:
        m, t = self.measured, self.threshold
        if m is None or (isinstance(m, float) and math.isnan(m)):
            return False
        return {"<=": m <= t, ">=": m >= t, ">": m > t, "<": m < t}[self.op]

    def as_dict(self) -> dict:
        return {"experiment": self.experiment, "name": self.name, "passed": bool(self.passed),
                "measured": _num(self.measured), "threshold": _num(self.threshold), "comparison": self.op,
                "detail": self.detail}


def _num(x: Any) -> Any:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


def measure_or_none(fn, *args, **kwargs) -> Optional[dict]:
    """A measurement that may not apply (e.g. a fit with too few points in its window): its result, or None."""
    try:
        return fn(*args, **kwargs)
    except ValueError:
        return None


def dtype_of(name: str):
    return jnp.float64 if name == "float64" else jnp.float32


def fold(seed: int, *path: int) -> jax.Array:
    """A PRNG key derived from the run seed and a fixed path of integers (one per use), so draws never collide."""
    key = jax.random.PRNGKey(seed)
    for p in path:
        key = jax.random.fold_in(key, p)
    return key
