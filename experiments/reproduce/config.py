"""The main job's configuration: frozen dataclasses validated by `experiments.common.config.from_dict`.

(One dataclass per config section, every key documented where it is declared: ~440 lines, all declarations.)

Every field has a default, so a YAML file names only what it changes; an unknown or misspelt key, a wrong type or an
out-of-range value is a `experiments.common.config.ConfigError` naming the key (range checks live in `__post_init__`).

    cfg = load_config("configs/digits.yaml", overrides=["convergence.steps=2000"])

What is computed and what is judged are kept apart: the `thresholds` sections (and the fit band of experiment 1)
only judge finished numbers, so changing them never recomputes a run (checkpoints are keyed by what each run's
numbers depend on, see `runs.run_identity`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence
from typing import Literal

from experiments.common import registry
from experiments.common.config import ConfigError, check_count, check_seed, from_dict, load_yaml
from experiments.common.data_config import DataConfig, FeatureKind, check_pca

ModelName = Literal[tuple(registry.MODELS)]
LossName = Literal[tuple(name for name in registry.LOSSES if name in ("square", "cross_entropy"))]
SigmaName = Literal[tuple(registry.SIGMAS)]
#: the iterative forward solvers of `registry.SOLVERS` (the exact DELM is the direct solve) and the Krylov solvers of
#: `registry.LINEAR_SOLVERS` (not the dense "lu")
IterativeSolverName = Literal["anderson", "fixed_point", "broyden"]
KrylovSolverName = Literal["gmres", "bicgstab", "normal_cg"]
#: the main job's preprocessing where the data section names none: PCA-whitened to 32 dimensions
DEFAULT_FEATURES = ("pca_whiten", 32)
#: deliberately wrong gradients for the mutation test of the claims (experiments/reproduce/mutations.py)
MutationName = Literal["one_step", "perturbed", "wrong_sigma"]
MUTATIONS: tuple[str, ...] = ("one_step", "perturbed", "wrong_sigma")


def _positive(name: str, value: float, *, integer: bool = False) -> None:
    kind = "a positive integer" if integer else "a positive number"
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be {kind}; got {value!r}")


def _unit(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in the open interval (0, 1); got {value!r}")


def _nonempty_unique(name: str, values: tuple, choices: tuple | None = None) -> None:
    if not values:
        extra = f" (valid choices: {', '.join(map(repr, choices))})" if choices else ""
        raise ValueError(f"{name} must list at least one entry{extra}; got an empty list")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat entries; got {list(values)}")


def _multiple(name: str, steps: int, chunk: int) -> None:
    if steps % chunk:
        raise ValueError(
            f"{name} ({steps}) must be a multiple of chunk ({chunk}), so every compiled chunk has one length"
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Settings shared by all experiments.

    DELM: `gamma` in (0, 1), `sigma` the weight nonlinearity, `A, B ~ init_scale N(0, 1)`; its reference runs solve
    the equilibrium exactly (the library's direct solve, differentiated by autodiff through the LU solve).
    Linear: `W ~ init_scale N(0, 1)`. Deep linear nets: one per entry of `depths`, hidden width `deep_hidden`
    (null: the feature width m), layers `~ N(0, deep_init_gain^2 / fan_in)`.
    """

    gamma: float = 0.8
    sigma: SigmaName = "column_softmax"
    init_scale: float = 0.1
    depths: tuple[int, ...] = (2, 3)
    deep_hidden: int | None = None
    deep_init_gain: float = 1.0

    def __post_init__(self):
        _unit("gamma", self.gamma)
        _positive("init_scale", self.init_scale)
        _positive("deep_init_gain", self.deep_init_gain)
        if self.deep_hidden is not None:
            _positive("deep_hidden", self.deep_hidden, integer=True)
        if len(set(self.depths)) != len(self.depths) or any(d < 2 for d in self.depths):
            raise ValueError(
                f"depths must be distinct integers >= 2 (depth 1 is the linear model); got {list(self.depths)}"
            )


@dataclasses.dataclass(frozen=True)
class LearningRateConfig:
    """The step size, shared by every model of a group so that their runs are comparable (docs/theory.md
    section 12).

    `rule: measured` (default): `eta = scale / lambda_max(P_0 H)`, with `P_0` the DELM's induced preconditioner at
    its initial parameters and `H` the shallow loss's curvature (the square loss's `I (x) phi^T phi / n`; for
    cross-entropy its bound `I (x) phi^T phi / (2n) + l2 I`). To first order in eta the DELM's W moves by
    `-eta P_t(G_t)`, i.e. preconditioned gradient descent on the convex shallow problem, which contracts in every
    direction iff `eta lambda_max(P_t H) < 2` (and makes the trust-region norm M positive definite iff `< 1`).
    `scale = 1` puts the stiffest direction at the start exactly at `1`, half-way to the edge; the claims check
    that the run stayed within `2` (`1` for the trust-region experiment). `lambda_max(P_0 H)` is exact (dense) for
    `m_y m <= 512` and a power-iteration estimate above (stated as approximate in the report).
    `rule: bound`: `eta = scale * deq_jax.theory.learning_rate_limit(...)` at the init, the reciprocal of an upper
    bound on `lambda_max(P_0 H)` from measured norms (`|U_0^{-1}|_2`, `|W_0|_2`, `lambda_max(H)`): guaranteed
    `eta lambda_max(P_0 H) <= scale` at any width, but about 10x smaller than `measured` (so 10x more steps).
    (The old rule `(1 - gamma)^2 / lambda_max(phi^T phi / n)` rested on `|U^{-1}|_2 <= 1/(1 - gamma)`, which
    holds in the 1-norm only: in the 2-norm the bound is `sqrt(m)/(1 - gamma)`, `deq_jax.theory.u_inverse_norm_bound`.)
    `rule: fixed`: `eta = value`.
    """

    rule: Literal["measured", "bound", "fixed"] = "measured"
    scale: float = 1.0
    value: float | None = None

    def __post_init__(self):
        _positive("scale", self.scale)
        if self.rule == "fixed":
            if self.value is None:
                raise ValueError("value must be set (a positive number) when rule is 'fixed'; got null")
            _positive("value", self.value)
        elif self.value is not None:
            raise ValueError(
                f"value applies only to rule 'fixed' (rule is {self.rule!r}, eta = scale / "
                f"lambda_max(P_0 H) or its bound); got value={self.value!r}"
            )


@dataclasses.dataclass(frozen=True)
class VariantConfig:
    """A DELM trained through the library's core: an iterative forward solver and the implicit backward.

    `formulation`: "transposed" (the end-to-end equilibrium `W = B + gamma W sigma(A)`) or "per_sample" (one
    equilibrium per training sample). `linear_solver`: the implicit backward's solver of `(I - J^T) u = v`.
    `tol`: the forward and backward relative tolerance (tight, so that the run can follow the exact path)."""

    formulation: Literal[registry.FORMULATIONS] = "transposed"
    solver: IterativeSolverName = "anderson"
    linear_solver: KrylovSolverName = "gmres"
    tol: float = 1e-12
    maxiter: int = 200

    def __post_init__(self):
        _unit("tol", self.tol)
        check_count("maxiter", self.maxiter)


@dataclasses.dataclass(frozen=True)
class FeatureSetConfig:
    """One group of runs of experiment 1 (for each of its losses): which features, which models.

    `features`: "data" (the data section's features), "projection" (a fixed random projection of them to `width`,
    e.g. below the number of classes), or "pca_whiten" / "standardize" (the data set preprocessed again that way;
    `width` is pca_dim for pca_whiten, null otherwise). `variants`: DELMs trained through an iterative solver with
    the implicit backward, each checked against the exact (direct) DELM's path. `reaches_optimum`: claim that the
    runs reach L* and that the DELM's rate is within `rate_factor` of its bound (false for ill-conditioned features,
    where L* is out of reach in `steps`: the gap and the rate are then reported, and the per-step bound is claimed).
    `steps`: this set's step budget (null: `convergence.steps`; a multiple of `convergence.chunk`).
    `n_train`: train on this many of the training samples (a random subset drawn with `data.seed`; null: all), e.g.
    the per-sample formulation at full width, whose equilibria cost `O(n m^2)` per solver iteration.
    """

    features: Literal["data", "projection", "pca_whiten", "standardize"] = "data"
    width: int | None = None
    losses: tuple[LossName, ...] = ("square", "cross_entropy")
    models: tuple[ModelName, ...] = ("delm", "linear", "deep_linear")
    variants: tuple[VariantConfig, ...] = ()
    reaches_optimum: bool = True
    steps: int | None = None
    n_train: int | None = None

    def __post_init__(self):
        if self.features in ("projection", "pca_whiten"):
            if self.width is None:
                raise ValueError(f"width must be a positive integer for features {self.features!r}; got null")
            _positive("width", self.width, integer=True)
        elif self.width is not None:
            raise ValueError(
                f"width applies only to features 'projection' and 'pca_whiten'; set it to null for "
                f"features {self.features!r} (got width={self.width!r})"
            )
        _nonempty_unique("losses", self.losses, ("square", "cross_entropy"))
        _nonempty_unique("models", self.models, ("delm", "linear", "deep_linear"))
        if "delm" not in self.models:
            raise ValueError(f"models must include 'delm' (the claims are about it); got {list(self.models)}")
        forms = [v.formulation for v in self.variants]
        if len(set(forms)) != len(forms):
            raise ValueError(f"variants must not repeat a formulation; got {forms}")
        if self.steps is not None:
            _positive("steps", self.steps, integer=True)
        if self.n_train is not None and self.n_train < 2:
            raise ValueError(f"n_train must be an integer >= 2 or null (all samples); got {self.n_train!r}")


@dataclasses.dataclass(frozen=True)
class ConvergenceThresholds:
    """Pass/fail thresholds of experiment 1's claims (REPORT.md justifies each)."""

    optimum_gradient: float = 1e-8
    normalised_gap: float = 1e-6
    r2: float = 0.99
    bound_excess: float = 1e-6
    rate_factor: float = 2.0
    path: float = 1e-7
    solver_residual: float = 1e-10

    def __post_init__(self):
        for key in ("optimum_gradient", "normalised_gap", "bound_excess", "path", "solver_residual"):
            _positive(key, getattr(self, key))
        _unit("r2", self.r2)
        if not self.rate_factor > 1:
            raise ValueError(f"rate_factor must be a number > 1; got {self.rate_factor!r}")


@dataclasses.dataclass(frozen=True)
class ConvergenceConfig:
    """Experiment 1: global linear convergence of full-batch gradient descent to the shallow optimum `L*`.

    For each feature set and each of its losses, every model of the set trains from its seeded init. Cross-entropy
    carries an L2 penalty `(cross_entropy_l2 / 2) |W|_F^2` on the end-to-end matrix, so that the shallow problem
    has a unique minimiser even on separable data. A run stops early once its normalised gap
    `(L_t - L*) / (L_0 - L*)` stayed below `stop_gap` for a whole chunk (rounding level).
    Analysis only (never recomputes a run): the rate fit uses the band `fit_lo < gap < fit_hi`, the bound check
    the steps with gap above `bound_floor`.
    """

    enabled: bool = True
    feature_sets: tuple[FeatureSetConfig, ...] = (
        FeatureSetConfig(variants=(VariantConfig("transposed"),)),
        FeatureSetConfig(
            features="projection",
            width=5,
            models=("delm", "linear"),
            variants=(VariantConfig("per_sample", linear_solver="bicgstab"),),
        ),
    )
    steps: int = 3000
    chunk: int = 50
    learning_rate: LearningRateConfig = LearningRateConfig()
    cross_entropy_l2: float = 0.1
    stop_gap: float = 1e-13
    fit_hi: float = 1e-2
    fit_lo: float = 1e-9
    bound_floor: float = 1e-7
    thresholds: ConvergenceThresholds = ConvergenceThresholds()

    def __post_init__(self):
        if not self.feature_sets:
            raise ValueError("feature_sets must list at least one feature set; got an empty list")
        _positive("steps", self.steps, integer=True)
        _positive("chunk", self.chunk, integer=True)
        _multiple("steps", self.steps, self.chunk)
        _positive("cross_entropy_l2", self.cross_entropy_l2)
        _unit("stop_gap", self.stop_gap)
        _unit("fit_lo", self.fit_lo)
        _unit("fit_hi", self.fit_hi)
        _unit("bound_floor", self.bound_floor)
        if not self.fit_lo < self.fit_hi:
            raise ValueError(f"fit_lo must be below fit_hi; got fit_lo={self.fit_lo!r}, fit_hi={self.fit_hi!r}")
        for i, fs in enumerate(self.feature_sets):
            if fs.steps is not None and fs.steps % self.chunk:
                raise ValueError(f"feature_sets[{i}].steps ({fs.steps}) must be a multiple of chunk ({self.chunk})")


@dataclasses.dataclass(frozen=True)
class TrustRegionThresholds:
    velocity: float = 1e-8
    finite_difference: float = 1e-6
    step: float = 1e-8
    path: float = 1e-4

    def __post_init__(self):
        for key in ("velocity", "finite_difference", "step", "path"):
            _positive(key, getattr(self, key))


@dataclasses.dataclass(frozen=True)
class TrustRegionConfig:
    """Experiment 2: the DELM's gradient descent seen in W-space is a trust-region Newton method of the shallow model.

    For each `a_scales` entry s: a DELM with `A ~ s N(0, 1)`, `B ~ b_scale N(0, 1)` runs `steps` GD steps on the
    square loss. At every step, the change of `W = B U^{-1}` along the parameter update that training applied is
    compared with `-eta P_t(G_t)` (forward mode through the closed form, and a central finite difference with
    relative step `fd_step`), and the W-path with the path integrated from `-eta P_t(G_t)` (to second order in
    eta). Every `check_every`
    steps (a multiple of `chunk`) while the normalised gap is above `check_floor`, the trust-region norm M is built
    densely (`(m_y m)^2` matrices: feasible widths only) and its smallest eigenvalue measured. Plain GD on the
    shallow model runs from the same W_0 (for comparison, not a claim).
    `learning_rate.scale` 0.5 keeps `eta lambda_max(P_t H) < 1`, the condition for M to be positive definite.
    `features` / `pca_dim`: this experiment's features (null: the data section's), e.g. a PCA width at which the
    dense `(m_y m)^2` checks are feasible.
    """

    enabled: bool = True
    features: FeatureKind | None = None
    pca_dim: int | None = None
    a_scales: tuple[float, ...] = (0.1, 1.0, 3.0)
    b_scale: float = 0.1
    steps: int = 400
    chunk: int = 50
    learning_rate: LearningRateConfig = LearningRateConfig(scale=0.5)
    check_every: int = 100
    check_floor: float = 1e-8
    fd_step: float = 1e-5
    thresholds: TrustRegionThresholds = TrustRegionThresholds()

    def __post_init__(self):
        check_pca(self.features, self.pca_dim)
        _nonempty_unique("a_scales", self.a_scales)
        for s in self.a_scales:
            _positive("a_scales[...]", s)
        _positive("b_scale", self.b_scale)
        _positive("steps", self.steps, integer=True)
        _positive("chunk", self.chunk, integer=True)
        _multiple("steps", self.steps, self.chunk)
        _positive("check_every", self.check_every, integer=True)
        _multiple("check_every", self.check_every, self.chunk)
        _unit("check_floor", self.check_floor)
        _unit("fd_step", self.fd_step)


@dataclasses.dataclass(frozen=True)
class ImplicitBiasThresholds:
    velocity: float = 1e-8
    null_space: float = 1e-10

    def __post_init__(self):
        for key in ("velocity", "null_space"):
            _positive(key, getattr(self, key))


@dataclasses.dataclass(frozen=True)
class ImplicitBiasConfig:
    """Experiment 3: which of the many minimisers each model reaches when n < m.

    Features: the data set preprocessed again with `features` / `pca_dim` (null: the `data` section's features) and,
    with `normalize_rows`, every sample's features scaled to the same norm (well-conditioned small subsets, so the
    runs reach the target in few steps). For each seed: `n_train` training samples drawn (seeded) from them, so
    that the square loss has a whole affine set of minimisers with L* = 0; every model of `models` (plus each depth of
    `model.depths` for deep_linear) trains by full-batch GD from its seeded init until its training loss first falls
    below `target_loss` (matched training loss), at most `max_steps`. Measured at that step: test loss and accuracy on
    the whole test split, the distance of W from the minimum-norm interpolant; for the DELM, at every step, the change
    of W along the applied update against `-eta P_t(G_t)`.
    `init_scale` / `deep_init_gain` replace `model.init_scale` / `model.deep_init_gain` here (null: keep them): a
    small init keeps the part of W that the data do not determine from being decided by the init's noise.
    """

    enabled: bool = True
    features: FeatureKind | None = "pca_whiten"
    pca_dim: int | None = 60
    normalize_rows: bool = True
    n_train: int = 20
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    models: tuple[ModelName, ...] = ("delm", "linear", "deep_linear")
    target_loss: float = 1e-3
    max_steps: int = 20000
    chunk: int = 500
    learning_rate: LearningRateConfig = LearningRateConfig()
    init_scale: float | None = 0.001
    deep_init_gain: float | None = 0.5
    thresholds: ImplicitBiasThresholds = ImplicitBiasThresholds()

    def __post_init__(self):
        for key in ("init_scale", "deep_init_gain"):
            if getattr(self, key) is not None:
                _positive(key, getattr(self, key))
        check_pca(self.features, self.pca_dim)
        if self.n_train < 2:
            raise ValueError(f"n_train must be an integer >= 2; got {self.n_train!r}")
        _nonempty_unique("seeds", self.seeds)
        for i, s in enumerate(self.seeds):
            check_seed(f"seeds[{i}]", s)
        _nonempty_unique("models", self.models, ("delm", "linear", "deep_linear"))
        _positive("target_loss", self.target_loss)
        _positive("max_steps", self.max_steps, integer=True)
        _positive("chunk", self.chunk, integer=True)
        _multiple("max_steps", self.max_steps, self.chunk)


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    """The main job: `python -m experiments reproduce --config configs/<name>.yaml`.

    `name` is the default run name (results go to `<out>/<name>/`), `seed` seeds model inits and the random
    projection, `dtype` is the floating type of every array (the claims' thresholds assume float64).
    `mutation` (normally null; set by `--mutation`): train the DELMs under test with a deliberately wrong gradient,
    to show which claims notice (the mutation test of the claims). `fast_compile`: compile the training programs
    with XLA's LLVM optimisation off (~2x faster compilation, 2-4x slower execution: for configurations whose time
    is compilation, such as the test suite's tiny one; the numbers agree to rounding, and runs are checkpointed
    apart).
    """

    name: str = "digits"
    seed: int = 0
    dtype: Literal["float64", "float32"] = "float64"
    mutation: MutationName | None = None
    fast_compile: bool = False
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    convergence: ConvergenceConfig = ConvergenceConfig()
    trust_region: TrustRegionConfig = TrustRegionConfig()
    implicit_bias: ImplicitBiasConfig = ImplicitBiasConfig()

    def __post_init__(self):
        object.__setattr__(self, "data", self.data.with_default_features(*DEFAULT_FEATURES))
        if not self.name or any(c in self.name for c in "/\\") or self.name in (".", ".."):
            raise ValueError(f"name must be a non-empty file name (no slashes); got {self.name!r}")
        check_seed("seed", self.seed)
        if not (self.convergence.enabled or self.trust_region.enabled or self.implicit_bias.enabled):
            raise ValueError(
                "at least one of convergence.enabled, trust_region.enabled, implicit_bias.enabled must be true"
            )


def load_config(path: str | pathlib.Path | None, overrides: Sequence[str] = ()) -> ReproduceConfig:
    """Read and validate a YAML config (None: all defaults) with `section.key=value` overrides applied on top."""
    data = {} if path is None else load_yaml(path)
    return from_dict(ReproduceConfig, data, overrides=list(overrides))


__all__ = [
    "ConfigError",
    "ConvergenceConfig",
    "DataConfig",
    "FeatureSetConfig",
    "ImplicitBiasConfig",
    "LearningRateConfig",
    "ModelConfig",
    "MUTATIONS",
    "ReproduceConfig",
    "TrustRegionConfig",
    "VariantConfig",
    "load_config",
]
