"""Pieces shared by the main job's experiments: features, the square loss's Gram form, models, claims, metrics."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax import theory
from deq_jax.models import Model
from deq_jax.train import GramData, square_gram
from experiments.common import datasets as dq_data
from experiments.common import models as model_lib
from experiments.common.data_config import load_configured
from experiments.reproduce import compiling
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


@dataclasses.dataclass
class Context:
    """What every experiment gets: the data set, its features (the `data` section), checkpoints, progress flag, and
    the counts of runs computed and loaded from checkpoints (for the report)."""

    dataset: Any
    features: Features
    store: Any
    progress: bool
    log: Callable[[str], None] = lambda msg: None
    runs_loaded: int = 0
    runs_total: int = 0
    data_config: DataConfig | None = None
    _cache: dict = dataclasses.field(default_factory=dict)

    def square_problem(self, phi: np.ndarray, Y: np.ndarray) -> SquareProblem:
        """`square_problem(phi, Y)`, computed once per pair of arrays (experiments that share features share it)."""
        key = ("square_problem", id(phi), id(Y))
        if key not in self._cache:
            self._cache[key] = (phi, Y, square_problem(phi, Y))  # the arrays are kept, so their ids stay theirs
        return self._cache[key][2]

    def features_for(
        self,
        features: str | None,
        pca_dim: int | None = None,
        normalize_rows: bool = False,
        *,
        section: str = "data",
        pca_key: str = "pca_dim",
    ) -> Features:
        """The data set preprocessed another way (null `features`: the data section's), computed once per setting.
        `section.features` / `section.pca_key` are how the user set them (named in error messages).

        PCA-whitened features are ordered by variance, so `pca_whiten k` for k below the data section's own
        `pca_whiten` width is its first k columns (and the bias): sliced, not recomputed (the same numbers: the
        same standardisation and eigenvectors)."""
        key = (features, pca_dim, normalize_rows)
        if key in self._cache:
            return self._cache[key]
        cfg, base = self.data_config, self.features
        if features is None or (features == cfg.features and pca_dim == cfg.pca_dim):
            out = base
        elif features == "pca_whiten" and cfg.features == "pca_whiten" and pca_dim <= cfg.pca_dim:
            cols = list(range(pca_dim)) + ([base.phi_train.shape[1] - 1] if cfg.add_bias else [])
            out = base._replace(
                phi_train=base.phi_train[:, cols],
                phi_test=base.phi_test[:, cols],
                info={**base.info, "pca_dim": pca_dim, "output_dim": len(cols), "sliced_from_pca_dim": cfg.pca_dim},
            )
        else:
            out = make_features(
                self.dataset,
                cfg,
                features=features,
                pca_dim=pca_dim,
                settings={"features": f"{section}.features", "pca_dim": f"{section}.{pca_key}"},
            )
        if normalize_rows:
            out = out._replace(
                phi_train=_normalize_rows(out.phi_train, cfg.add_bias),
                phi_test=_normalize_rows(out.phi_test, cfg.add_bias),
                info={**out.info, "normalize_rows": True},
            )
        self._cache[key] = out
        return out


def load_dataset(cfg: DataConfig, *, progress: bool = False) -> Any:
    """The data set the config names (`experiments.common.data_config.load_configured`: a built-in set or the
    user's own files; the loaders' errors pass through)."""
    return load_configured(cfg, progress=progress)


def make_features(
    ds: Any,
    cfg: DataConfig,
    *,
    features: str | None = None,
    pca_dim: int | None = None,
    normalize_rows: bool = False,
    settings: dict | None = None,
) -> Features:
    """`experiments.common.datasets.preprocess` with the config's subset and seed, and its feature settings unless
    given.

    `normalize_rows` rescales each sample's features (the bias excluded) to norm sqrt(d), d their number: a fixed
    per-sample map that tames the outliers whitening creates, so that small subsets are well conditioned.
    `settings`: how the user spells the preprocessing settings (config keys), for the data package's messages.
    """
    if features is None:
        features, pca_dim = cfg.features, cfg.pca_dim
    pp = dq_data.preprocess(
        ds,
        n_train=cfg.n_train,
        n_test=cfg.n_test,
        features=features,
        pca_dim=pca_dim if features == "pca_whiten" else None,
        add_bias=cfg.add_bias,
        seed=cfg.seed,
        settings=settings,
    )
    x_train, x_test, info = pp.x_train, pp.x_test, dict(pp.info)
    if normalize_rows:
        x_train, x_test = (_normalize_rows(x, cfg.add_bias) for x in (x_train, x_test))
        info["normalize_rows"] = True
    k = pp.num_classes
    return Features(
        x_train,
        pp.y_train,
        dq_data.one_hot(pp.y_train, k).astype(np.float64),
        x_test,
        pp.y_test,
        dq_data.one_hot(pp.y_test, k).astype(np.float64),
        k,
        info,
    )


def _normalize_rows(x: np.ndarray, has_bias: bool) -> np.ndarray:
    d = x.shape[1] - int(has_bias)
    body = x[:, :d]
    norms = np.linalg.norm(body, axis=1, keepdims=True)
    body = body * (np.sqrt(d) / np.where(norms > 0, norms, 1.0))
    return np.concatenate([body, x[:, d:]], axis=1)


# ------------------------------------------------------------------------------------------ the shallow square problem


class SquareProblem(NamedTuple):
    """The shallow square-loss problem `L(W) = (1/2n) |phi W^T - Y|_F^2` of a feature set, from the library.

    `gram` (`deq_jax.train.square_gram`: `C = phi^T phi / n`, `D = phi^T Y / n`, `|Y|^2 / n`) is what training on
    the square loss's Gram route consumes (`make_step` with `GramData`: `O(m_y m^2)` per step, the same trajectory
    as the samples'); `W*`, `L*` come from `deq_jax.theory.shallow_optimum_square` (minimum norm, one refinement
    with the true residual) and the spectrum from `theory.feature_spectrum`, all from `m x m` Gram matrices
    (docs/theory.md section 10): nothing is `n x n`. Does not apply to cross-entropy, whose gradient needs every
    sample at every step.
    """

    gram: GramData
    W_star: np.ndarray
    L_star: float
    lambda_max: float
    lambda_min_plus: float
    rank: int

    @property
    def C(self) -> np.ndarray:
        return np.asarray(self.gram.C)

    @property
    def D(self) -> np.ndarray:
        return np.asarray(self.gram.D)


def square_problem(phi: np.ndarray, Y: np.ndarray) -> SquareProblem:
    phi, Y = jnp.asarray(phi, jnp.float64), jnp.asarray(Y, jnp.float64)
    W_star, L_star = theory.shallow_optimum_square(phi, Y)
    spectrum = spectrum_of(phi)
    return SquareProblem(gram=_square_gram(phi, Y), W_star=np.asarray(W_star), L_star=float(L_star), **spectrum)


_square_gram = compiling.jit(square_gram)  # compiled with the job's safe options (experiments.reproduce.compiling)


def spectrum_of(phi: Any) -> dict:
    """`lambda_max`, `lambda_min_plus` and `rank` of `C = phi^T phi / n` (`theory.feature_spectrum`), as numbers."""
    s = theory.feature_spectrum(jnp.asarray(phi, jnp.float64))
    return {
        "lambda_max": float(s["lambda_max"]),
        "lambda_min_plus": float(s["lambda_min_plus"]),
        "rank": int(s["rank"]),
    }


# --------------------------------------------------------------------------------------------- models


def build_models(names: tuple, width: int, out_dim: int, cfg: ModelConfig) -> list[tuple[str, Model]]:
    """`(label, model)` for each name; `deep_linear` expands into one model per depth of `cfg.depths`. The DELM is
    the exact one: the library's direct solve, differentiated by autodiff through the LU solve."""
    out: list[tuple[str, Model]] = []
    for name in names:
        if name == "delm":
            out.append(
                (
                    "DELM",
                    model_lib.build(
                        "delm",
                        width,
                        out_dim,
                        gamma=cfg.gamma,
                        sigma=cfg.sigma,
                        solver="direct",
                        init_scale=cfg.init_scale,
                    ),
                )
            )
        elif name == "linear":
            out.append(("linear", model_lib.build("linear", width, out_dim, init_scale=cfg.init_scale)))
        elif name == "deep_linear":
            for depth in cfg.depths:
                out.append(
                    (
                        f"deep linear H={depth}",
                        model_lib.build(
                            "deep_linear",
                            width,
                            out_dim,
                            depth=depth,
                            hidden=cfg.deep_hidden,
                            init_gain=cfg.deep_init_gain,
                        ),
                    )
                )
        else:  # the config's Literal type rules this out
            raise ValueError(f"unknown model {name!r}")
    return out


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in label.replace("=", ""))


def heldout_metrics(W: Any, phi: np.ndarray, labels: np.ndarray, Y: np.ndarray) -> dict:
    """Square loss (as `deq_jax.losses.square`), cross-entropy and accuracy of the end-to-end matrix `W` on
    `(phi, labels)`, in NumPy float64 (no compilation for the many shapes a run meets)."""
    pred = np.asarray(phi, np.float64) @ np.asarray(W, np.float64).T
    shifted = pred - pred.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
    return {
        "square_loss": float(np.mean(0.5 * np.sum((pred - Y) ** 2, axis=1))),
        "cross_entropy": float(-np.mean(log_probs[np.arange(len(labels)), labels])),
        "accuracy": float(np.mean(np.argmax(pred, axis=1) == labels)),
    }


def dtype_of(name: str):
    return jnp.float64 if name == "float64" else jnp.float32


def fold(seed: int, *path: int) -> jax.Array:
    """A PRNG key derived from the run seed and a fixed path of integers (one per use), so draws never collide."""
    key = jax.random.PRNGKey(seed)
    for p in path:
        key = jax.random.fold_in(key, p)
    return key


# --------------------------------------------------------------------------------------------- claims

OPS = ("<=", ">=", "<", ">", "|x| <=")


@dataclasses.dataclass(frozen=True)
class Claim:
    """One checked statement: `passed` iff `measured <op> threshold` (a NaN or missing measurement never passes).

    `op` `"|x| <="` is two-sided: `|measured| <= threshold` (e.g. a signed gap that must be small either way).
    `sensitive`: the claim depends on the gradient that training applied being the true one; under a wrong gradient
    (`--mutation`) it must fail. `key`: a stable identifier (experiment/group/what), for the mutation table."""

    experiment: str
    key: str
    name: str
    measured: float | None
    threshold: float
    op: str
    detail: str = ""
    sensitive: bool = False

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}; got {self.op!r}")

    @property
    def passed(self) -> bool:
        m, t = self.measured, self.threshold
        if m is None or not math.isfinite(float(m)):
            return False
        m = float(m)
        return {"<=": m <= t, ">=": m >= t, ">": m > t, "<": m < t, "|x| <=": abs(m) <= t}[self.op]

    def as_dict(self) -> dict:
        return {
            "experiment": self.experiment,
            "key": self.key,
            "name": self.name,
            "passed": bool(self.passed),
            "measured": _num(self.measured),
            "threshold": _num(self.threshold),
            "comparison": self.op,
            "gradient_sensitive": self.sensitive,
            "detail": self.detail,
        }


def _num(x: Any) -> Any:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


def checked(
    experiment: str,
    key: str,
    name: str,
    threshold: float,
    op: str,
    measure: Callable[[], tuple],
    *,
    sensitive: bool = False,
) -> Claim:
    """A claim whose measurement cannot crash the job: `measure()` returns `(value, detail)`; an empty measurement,
    a NaN or an exception becomes a failed claim that says why."""
    try:
        value, detail = measure()
    except (ValueError, ArithmeticError, KeyError, IndexError, TypeError, np.linalg.LinAlgError) as err:
        value, detail = math.nan, f"not measured: {type(err).__name__}: {err}"
    if value is None:
        value = math.nan
    return Claim(experiment, key, name, float(value), threshold, op, detail, sensitive)


def finite_max(values: Any) -> float:
    """The largest value, NaN if there is none or any is NaN (so an empty or failed measurement fails its claim)."""
    a = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    if a.size == 0 or np.isnan(a).any():
        return math.nan
    return float(a.max())
