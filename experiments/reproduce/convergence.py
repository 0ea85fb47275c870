"""Experiment 1: global linear convergence of the DELM to the shallow optimum (docs/theory.md section 4).

For each feature set and loss, every model trains by full-batch gradient descent from its seeded init:

    phi -> deq_jax.models.<Model> -> model.init(key, dtype) -> gradient descent (deq_jax.train.make_step, chunked)

and the training loss is compared with the shallow model's optimum `L*`, computed independently (the square
loss's least squares from `C = phi^T phi / n`, `D = phi^T Y / n`; a Newton solve, `deq_jax.theory`, for
cross-entropy, which carries an L2 penalty `(l2/2) |W|_F^2` on the end-to-end matrix so that the optimum exists; its
PL constant is then `l2`). The models of a group:
- the exact DELM (the reference): the library's direct solve, differentiated by autodiff through the LU solve;
- the DELM through the library's core (`variants`): an iterative forward solver with the implicit backward, in the
  transposed and/or the per-sample formulation, float64, tight tolerances; checked against the reference's path;
- the linear model and deep linear networks (baselines).
Measured: the normalised gap `(L_t - L*) / (L_0 - L*)`, its log-linear rate over an explicit band of gaps, the
per-step bound `gap_{t+1} / gap_t <= (1 - eta lambda / |U_t|_2^2)^2` from the run's own `|U_t|_2`, and the
stiffness `eta lambda_max(P_t H)` of the W-dynamics at the logged steps.

(One experiment in one module: its typed results, plan, measurements, run and claims, ~480 lines; the bound's
measurements are in `bounds.py`.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from deq_jax import Implicit, theory
from deq_jax.maps import random_projection
from deq_jax.models import DELM
from experiments.reproduce import compiling, dynamics
from experiments.reproduce.bounds import BoundAnalysis, bound_analysis, rate_factor
from experiments.reproduce.common import (
    Claim,
    Context,
    Features,
    SquareProblem,
    build_models,
    checked,
    dtype_of,
    finite_max,
    fold,
    heldout_metrics,
    slug,
    spectrum_of,
)
from experiments.reproduce.config import ConfigError, FeatureSetConfig, ReproduceConfig, VariantConfig
from experiments.reproduce.runs import RunSpec, Trace, run_gd

NAME = "convergence"
#: per-step metrics kept: the step's, the implicit backward's (variants), |U_t|_2 (the reference)
KEEP = (
    "loss",
    "grad_norm",
    "relative_residual",
    "converged",
    "U_norm2",
    "backward_solves",
    "backward_failures",
    "backward_nonfinite",
    "backward_relative_residual",
)
LOSS_TITLES = {"square": "square loss", "cross_entropy": "cross-entropy + L2"}
#: the linearised W-dynamics contract in every direction iff eta lambda_max(P_t H) < 2
STABILITY_LIMIT = 2.0


# --------------------------------------------------------------------------------------------- typed results


@dataclasses.dataclass
class ConvergenceRun:
    """One training run of a group. `role`: "reference" (the exact DELM), "variant" (a DELM through an iterative
    solver and the implicit backward) or "baseline" (linear model, deep linear nets)."""

    label: str
    role: str
    key: str
    description: str
    learning_rate: float
    steps: int
    stopped_early: bool
    mutation: str | None
    loss_history: np.ndarray
    normalised_gap: np.ndarray
    grad_norm: np.ndarray
    relative_residual: np.ndarray
    nonconverged_solves: int
    max_solver_residual: float
    backward_solves: int
    backward_failures: int
    max_backward_residual: float
    logged_steps: np.ndarray
    W_logged: np.ndarray
    final_normalised_gap: float
    distance_to_optimum: float
    train: dict
    test: dict
    fit: dict | None = None
    bound: BoundAnalysis | None = None
    U_norm2: np.ndarray | None = None
    stiffness: np.ndarray | None = None  # eta lambda_max(P_t H) at the logged steps
    certified_stiffness: np.ndarray | None = None  # its upper bound from measured norms, where it is estimated
    path_deviation: np.ndarray | None = None  # |W_t - W_t^ref| / |W_0 - W*| at the logged steps

    @property
    def is_delm(self) -> bool:
        return self.role in ("reference", "variant")


@dataclasses.dataclass
class ConvergenceGroup:
    """The runs of one feature set and loss, with what they are measured against."""

    loss: str
    loss_title: str
    features: str
    width: int
    reaches_optimum: bool
    gram_route: bool
    learning_rate: float
    stiffness0: float
    stiffness_exact: bool
    pl_constant: float
    pl_name: str
    L_star: float
    optimum: dict
    lambda_max: float
    lambda_min_plus: float
    rank: int
    runs: list

    @property
    def title(self) -> str:
        return f"{self.loss_title}, {self.features}, m={self.width}"

    @property
    def reference(self) -> ConvergenceRun:
        return next(r for r in self.runs if r.role == "reference")


@dataclasses.dataclass
class ConvergenceResult:
    groups: list
    claims: list
    title: str = "Global linear convergence"

    def metric_rows(self) -> Iterator[dict]:
        for g in self.groups:
            for r in g.runs:
                bound = r.bound.bound_ratio if r.bound is not None else None
                for t in range(len(r.loss_history)):
                    yield {
                        "experiment": NAME,
                        "run": r.key,
                        "loss_fn": g.loss,
                        "model": r.label,
                        "width": g.width,
                        "step": t,
                        "loss": r.loss_history[t],
                        "normalised_gap": r.normalised_gap[t],
                        "grad_norm": r.grad_norm[t],
                        "solver_relative_residual": r.relative_residual[t],
                        "U_norm2": None if r.U_norm2 is None else r.U_norm2[t],
                        "bound_ratio": None if bound is None else bound[t],
                    }


# --------------------------------------------------------------------------------------------- measurements


def _stop_at_floor(L_star: float, stop_gap: float):
    def stop(history: dict, chunk: dict, start: int):
        gap0 = float(history["loss"][0]) - L_star
        if not gap0 > 0:
            return None
        return {} if np.all((np.asarray(chunk["loss"]) - L_star) / gap0 <= stop_gap) else None

    return stop


def _optimum(loss: str, phi: np.ndarray, feats: Features, problem: SquareProblem | None, l2: float) -> tuple:
    """`(W*, L*, info)` from `deq_jax.theory`, checked by the gradient at `W*` relative to the gradient at 0, both
    recomputed from the samples (`square_loss_gradient`; the optimum's own independent check for cross-entropy).
    A solve that fails is data (its status in `info`, a NaN or large ratio: a failed claim), never a crash."""
    phi_j, Y = jnp.asarray(phi, jnp.float64), jnp.asarray(feats.Y_train, jnp.float64)
    if loss == "square":
        zero = jnp.zeros_like(jnp.asarray(problem.W_star))
        g_star, g_zero = (
            float(jnp.linalg.norm(theory.square_loss_gradient(W, phi_j, Y)))
            for W in (jnp.asarray(problem.W_star), zero)
        )
        return (
            problem.W_star,
            problem.L_star,
            {
                "method": "minimum-norm least squares from C = phi^T phi / n (deq_jax.theory.shallow_optimum_square)",
                "status": "converged",
                "gradient_ratio": _ratio(g_star, g_zero),
            },
        )
    W, L, info = theory.shallow_optimum_cross_entropy(
        phi_j, jnp.asarray(feats.labels_train), feats.num_classes, l2=l2, on_failure="ignore"
    )
    g_zero = float(jnp.linalg.norm(theory.cross_entropy_gradient(jnp.zeros_like(W), phi_j, Y, l2)))
    ratio = _ratio(info["grad_norm"], g_zero) if info["status"] != "non_finite" else math.nan
    return (
        np.asarray(W),
        float(L),
        {**info, "method": "Newton-CG (deq_jax.theory.shallow_optimum_cross_entropy)", "gradient_ratio": ratio},
    )


# --------------------------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class PlannedRun:
    label: str
    role: str
    spec: RunSpec
    description: str
    variant: VariantConfig | None = None


@dataclasses.dataclass
class GroupPlan:
    loss: str
    fs: FeatureSetConfig
    features_label: str
    phi: np.ndarray  # the real training features (n, m)
    phi_test: np.ndarray
    square: bool  # the square loss (its problem is computed by `run`: plans stay cheap, so compiling starts early)
    runs: list
    feats: Features  # the set's features, labels and targets (its samples: all, or a subset)
    measured: compiling.Job | None = None  # `_measure`, started by `prepare`

    @property
    def width(self) -> int:
        return self.phi.shape[1]


def _variant_model(base: DELM, v: VariantConfig) -> DELM:
    return dataclasses.replace(
        base,
        formulation=v.formulation,
        solver=v.solver,
        tol=v.tol,
        maxiter=v.maxiter,
        backward=Implicit(v.linear_solver, tol=v.tol, maxiter=None),
    )


def _describe_variant(v: VariantConfig) -> str:
    return f"{v.solver} + implicit backward ({v.linear_solver}), {v.formulation}, tol {v.tol:g}"


def _feature_sets(cfg: ReproduceConfig, ctx: Context) -> list[tuple[FeatureSetConfig, str, np.ndarray, np.ndarray]]:
    feats = ctx.features
    out = []
    for i, fs in enumerate(cfg.convergence.feature_sets):
        if fs.features == "data":
            d = feats.info
            label = f"{d.get('features', cfg.data.features)}" + (f" {d['pca_dim']}" if d.get("pca_dim") else "")
            out.append((fs, label + " (data)", feats.phi_train, feats.phi_test, feats))
        elif fs.features == "projection":
            m = feats.phi_train.shape[1]
            P = np.asarray(random_projection(fold(cfg.seed, 2), m, fs.width, jnp.float64))
            out.append((fs, "random projection of the data's features", feats.phi_train @ P, feats.phi_test @ P, feats))
        else:
            f2 = ctx.features_for(
                fs.features,
                fs.width if fs.features == "pca_whiten" else None,
                section=f"convergence.feature_sets[{i}]",
                pca_key="width",
            )
            label = fs.features + (f" {fs.width}" if fs.width else "")
            out.append((fs, label, f2.phi_train, f2.phi_test, f2))
    return [_subset(cfg, *entry) for entry in out]


def _subset(cfg: ReproduceConfig, fs: FeatureSetConfig, label: str, phi, phi_test, feats: Features) -> tuple:
    """The feature set's training samples: all, or `fs.n_train` of them (a seeded random subset, drawn from
    `data.seed`), with their labels and targets in `feats`."""
    feats = feats._replace(phi_train=phi, phi_test=phi_test)
    if fs.n_train is None:
        return fs, label, phi, phi_test, feats
    n = phi.shape[0]
    if fs.n_train > n:
        raise ConfigError(
            f"convergence.feature_sets: n_train = {fs.n_train} is more than the {n} training samples of the data "
            "section; use at most that many, or null for all"
        )
    rows = np.sort(np.random.default_rng(cfg.data.seed).permutation(n)[: fs.n_train])
    feats = feats._replace(phi_train=phi[rows], labels_train=feats.labels_train[rows], Y_train=feats.Y_train[rows])
    return fs, f"{label}, {fs.n_train} samples", feats.phi_train, phi_test, feats


def plan(cfg: ReproduceConfig, ctx: Context) -> list[GroupPlan]:
    """Every group and run of the experiment, with its compiled program (`RunSpec`): fed to precompilation and to
    `run` alike. Computes the features only (the square problems, optima and spectra are `run`'s, so that the
    programs start compiling while they are computed); trains nothing.

    The square loss trains on its Gram route (the reference, the baselines, the transposed variant); the per-sample
    variant solves one equilibrium per training sample, on the samples. Cross-entropy trains on the samples, with
    the L2 term on the end-to-end matrix, fused (`fused.Penalised`: one solve, two passes over the data per step)
    except for the per-sample variant (make_step's penalty)."""
    c = cfg.convergence
    dtype = dtype_of(cfg.dtype)
    k = ctx.features.num_classes
    groups = []
    for fs, label, phi, phi_test, feats in _feature_sets(cfg, ctx):
        width, n = phi.shape[1], phi.shape[0]
        for loss_name in fs.losses:
            square = loss_name == "square"
            common = dict(
                loss=loss_name,
                chunk=c.chunk,
                dtype=dtype,
                fast_compile=cfg.fast_compile,
                l2=None if square else c.cross_entropy_l2,
            )
            runs = []
            for model_label, model in build_models(fs.models, width, k, cfg.model):
                role = "reference" if isinstance(model, DELM) else "baseline"
                # baselines record W at every step (cheap), so that the trust-region experiment's shallow GD shares
                # their compiled program
                trace = Trace(u_norm=True) if role == "reference" else Trace(W_every_step=True)
                runs.append(
                    PlannedRun(
                        model_label,
                        role,
                        RunSpec(
                            model, rows=None if square else n, trace=trace, gram=square, fused=not square, **common
                        ),
                        "direct (LU) solve, autodiff through it" if role == "reference" else "",
                    )
                )
                if role == "reference":
                    for v in fs.variants:
                        vm = _variant_model(model, v)
                        on_gram = square and v.formulation == "transposed"
                        spec = RunSpec(
                            vm,
                            rows=None if on_gram else n,
                            mutation=cfg.mutation,
                            gram=on_gram,
                            fused=not square and v.formulation == "transposed",
                            **common,
                        )
                        runs.append(
                            PlannedRun(f"DELM {v.solver} {v.formulation}", "variant", spec, _describe_variant(v), v)
                        )
            groups.append(GroupPlan(loss_name, fs, label, phi, phi_test, square, runs, feats))
    return groups


def programs(groups: list[GroupPlan]) -> list[RunSpec]:
    return [r.spec for g in groups for r in g.runs]


# --------------------------------------------------------------------------------------------- the run


def _measure(cfg: ReproduceConfig, ctx: Context, gp: GroupPlan) -> dict:
    """What a group's runs are measured against and trained with, computed before any run: the shallow problem,
    its optimum, spectrum and curvature, and the step size from the reference's initial parameters."""
    c, feats = cfg.convergence, gp.feats
    problem = ctx.square_problem(gp.phi, feats.Y_train) if gp.square else None
    W_star, L_star, opt_info = _optimum(gp.loss, gp.phi, feats, problem, c.cross_entropy_l2)
    C = problem.C if problem is not None else np.asarray(theory.feature_gram(jnp.asarray(gp.phi)))
    curvature = dynamics.curvature_operator(gp.loss, C, c.cross_entropy_l2)
    ref_model = next(r for r in gp.runs if r.role == "reference").spec.model
    lr, stiff0 = dynamics.learning_rate(
        c.learning_rate, ref_model, ref_model.init(fold(cfg.seed, 1), dtype_of(cfg.dtype)), curvature
    )
    if problem is not None:
        spectrum = {"lambda_max": problem.lambda_max, "lambda_min_plus": problem.lambda_min_plus, "rank": problem.rank}
        pl, pl_name = problem.lambda_min_plus, "lambda_min^+"
    else:
        pl, pl_name = c.cross_entropy_l2, "l2"
        spectrum = spectrum_of(gp.phi)
    return dict(
        problem=problem,
        W_star=W_star,
        L_star=L_star,
        opt_info=opt_info,
        curvature=curvature,
        lr=lr,
        stiff0=stiff0,
        spectrum=spectrum,
        pl=pl,
        pl_name=pl_name,
    )


def prepare(cfg: ReproduceConfig, ctx: Context, groups: list[GroupPlan]) -> None:
    """Start every group's measurements (`_measure`) in the background, so that they overlap the training runs."""
    for gp in groups:
        gp.measured = compiling.background(functools.partial(_measure, cfg, ctx, gp))


def run(cfg: ReproduceConfig, ctx: Context, groups: list[GroupPlan]) -> ConvergenceResult:
    c = cfg.convergence
    dtype = dtype_of(cfg.dtype)
    results = []
    for gp in groups:
        feats = gp.feats
        loss_name, width, fs = gp.loss, gp.width, gp.fs
        m_ = compiling.wait(gp.measured) if gp.measured is not None else _measure(cfg, ctx, gp)
        problem, W_star, L_star, opt_info = m_["problem"], m_["W_star"], m_["L_star"], m_["opt_info"]
        curvature, lr, stiff0, spectrum = m_["curvature"], m_["lr"], m_["stiff0"], m_["spectrum"]
        pl, pl_name = m_["pl"], m_["pl_name"]
        ref_plan = next(r for r in gp.runs if r.role == "reference")
        runs: list[ConvergenceRun] = []
        for pr in gp.runs:
            model = pr.spec.model
            phi_t, y_t = (problem.gram, None) if pr.spec.gram else (gp.phi, feats.Y_train)
            key = f"{NAME}/{loss_name}/{slug(gp.features_label)}/m{width}/{slug(pr.label)}"
            monitor = None
            if pr.role == "reference":
                monitor = functools.partial(_stiffness_monitor, model, curvature, lr, stiff0.exact)
            res = run_gd(
                pr.spec,
                model.init(fold(cfg.seed, 1), dtype),
                phi_t,
                y_t,
                learning_rate=lr,
                steps=fs.steps or c.steps,
                stop=_stop_at_floor(L_star, c.stop_gap),
                stop_id=("gap", L_star, c.stop_gap),
                keep=KEEP,
                store=ctx.store,
                key=key,
                progress=ctx.progress,
                desc=f"[1] {loss_name} m={width} {pr.label}",
                monitor=monitor,
                monitor_id=("stiffness", stiff0.exact) if monitor else None,
            )
            ctx.runs_total += 1
            ctx.runs_loaded += int(res.from_checkpoint)
            h = res.history
            gap = h["loss"] - L_star
            with np.errstate(invalid="ignore", divide="ignore"):
                ng = gap / gap[0]
            W_T = res.W_final
            r = ConvergenceRun(
                label=pr.label,
                role=pr.role,
                key=key,
                description=pr.description,
                learning_rate=lr,
                steps=res.steps,
                stopped_early=res.stopped_early,
                mutation=pr.spec.mutation,
                loss_history=h["loss"],
                normalised_gap=ng,
                grad_norm=h["grad_norm"],
                relative_residual=h["relative_residual"],
                nonconverged_solves=int(np.size(h["converged"]) - np.sum(h["converged"])),
                max_solver_residual=finite_max(h["relative_residual"]),
                backward_solves=int(np.sum(h.get("backward_solves", 0))),
                backward_failures=int(np.sum(h.get("backward_failures", 0)) + np.sum(h.get("backward_nonfinite", 0))),
                max_backward_residual=_backward_residual(h),
                logged_steps=res.logged_steps,
                W_logged=res.W_logged,
                final_normalised_gap=float(ng[-1]),
                distance_to_optimum=_ratio(np.linalg.norm(W_T - W_star), np.linalg.norm(W_star)),
                train=heldout_metrics(W_T, gp.phi, feats.labels_train, feats.Y_train),
                test=heldout_metrics(W_T, gp.phi_test, feats.labels_test, feats.Y_test),
            )
            try:
                r.fit = theory.fit_log_linear(ng, lo=c.fit_lo, hi=c.fit_hi)
            except ValueError:  # too few gaps in the band: the claims below say so
                r.fit = None
            if "U_norm2" in h:
                r.U_norm2 = h["U_norm2"]
                r.bound = bound_analysis(h["loss"], h["U_norm2"], L_star, lr, pl, c.bound_floor)
            if "stiffness" in res.monitored:
                r.stiffness = res.monitored["stiffness"]
                r.certified_stiffness = res.monitored.get("certified_stiffness")
            runs.append(r)
        ref = next(r for r in runs if r.role == "reference")
        scale0 = np.linalg.norm(ref.W_logged[0] - W_star)
        for r in runs:
            if r.role == "variant":
                k_ = min(len(r.W_logged), len(ref.W_logged))
                dev = np.linalg.norm((r.W_logged[:k_] - ref.W_logged[:k_]).reshape(k_, -1), axis=1)
                r.path_deviation = dev / scale0 if scale0 > 0 else np.full(k_, np.nan)
        group = ConvergenceGroup(
            loss=loss_name,
            loss_title=LOSS_TITLES[loss_name],
            features=gp.features_label,
            width=width,
            reaches_optimum=fs.reaches_optimum,
            gram_route=ref_plan.spec.gram,
            learning_rate=lr,
            stiffness0=lr * stiff0.value,
            stiffness_exact=stiff0.exact,
            pl_constant=pl,
            pl_name=pl_name,
            L_star=L_star,
            optimum=opt_info,
            runs=runs,
            **spectrum,
        )
        results.append(group)
    claims = [claim for g in results for claim in group_claims(cfg, g)]
    return ConvergenceResult(groups=results, claims=claims)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 and np.isfinite(b) else math.nan


def _stiffness_monitor(model, curvature, lr: float, exact: bool, params) -> dict:
    """`eta lambda_max(P_t H)` at a logged step (dense, or a power-iteration estimate from below); where it is an
    estimate, also the library's certified upper bound (`dynamics.certified_stiffness`)."""
    out = {"stiffness": lr * dynamics.stiffness(model, params, curvature).value}
    if not exact:
        out["certified_stiffness"] = lr * dynamics.certified_stiffness(model, params, curvature)
    return out


def _backward_residual(h: dict) -> float:
    """The largest per-step mean relative residual of the implicit backward solves (`backward_relative_residual`
    sums over a step's solves); 0 where the run had no implicit backward (autodiff through a direct solve)."""
    if "backward_solves" not in h:
        return 0.0
    solves = np.asarray(h["backward_solves"], np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return finite_max(np.where(solves > 0, np.asarray(h["backward_relative_residual"]) / solves, 0.0))


# --------------------------------------------------------------------------------------------- claims


def group_claims(cfg: ReproduceConfig, g: ConvergenceGroup) -> list[Claim]:
    """The claims of one group, from its finished numbers and the thresholds (nothing here recomputes a run)."""
    t, c = cfg.convergence.thresholds, cfg.convergence
    tag = g.title
    gk = f"{NAME}/{g.loss}/{slug(g.features)}/m{g.width}"
    ref = g.reference
    out = [
        checked(
            NAME,
            f"{gk}/optimum",
            f"[{tag}] L* is the shallow optimum: |grad L(W*)| / |grad L(0)|",
            t.optimum_gradient,
            "<=",
            lambda: (
                g.optimum["gradient_ratio"],
                g.optimum.get("method", "")
                + (f", {g.optimum['iterations']} Newton steps" if "iterations" in g.optimum else "")
                + ("" if g.optimum.get("converged", True) else ", solver did NOT converge"),
            ),
        )
    ]
    for r in g.runs:
        if not r.is_delm and r.label != "linear":
            continue
        if g.reaches_optimum:
            why = " (checks L*)" if r.label == "linear" else ""
            out.append(
                checked(
                    NAME,
                    f"{gk}/{slug(r.label)}/reaches_optimum",
                    f"[{tag}] {r.label} reaches L*{why}: (L_T - L*)/(L_0 - L*), either sign",
                    t.normalised_gap,
                    "|x| <=",
                    lambda r=r: (r.final_normalised_gap, f"{r.steps} steps; a negative gap means L* is overestimated"),
                )
            )
    b = ref.bound
    if g.reaches_optimum:
        out.append(
            checked(
                NAME,
                f"{gk}/DELM/linear_rate",
                f"[{tag}] DELM gap decays linearly: R^2 of the log-linear fit",
                t.r2,
                ">=",
                lambda: (
                    (math.nan, "no gaps in the band")
                    if ref.fit is None
                    else (
                        ref.fit["r2"],
                        (
                            f"gaps in ({c.fit_lo:g}, {c.fit_hi:g}): steps {ref.fit['window'][0]}-"
                            f"{ref.fit['window'][1]}, rate {ref.fit['rate']:.6f}/step"
                        ),
                    )
                ),
            )
        )
    out.append(
        checked(
            NAME,
            f"{gk}/DELM/bound",
            f"[{tag}] DELM never slower than the bound: max_t gap_{{t+1}}/gap_t - (1 - eta {g.pl_name} / |U_t|_2^2)^2",
            t.bound_excess,
            "<=",
            lambda: (
                b.max_excess,
                (
                    f"{b.checked_steps} steps with gap > {c.bound_floor:g} gap_0; median "
                    f"ratio {b.median_ratio:.6f} vs bound {b.median_bound_ratio:.6f}"
                ),
            ),
        )
    )
    if g.reaches_optimum:
        out.append(
            checked(
                NAME,
                f"{gk}/DELM/rate_factor",
                f"[{tag}] DELM's rate is within a factor of its bound: fitted log-rate / the bound's",
                t.rate_factor,
                "<=",
                lambda: (rate_factor(ref.fit, b), "over the fit window; >= 1 when the bound holds"),
            )
        )
    out.append(
        checked(
            NAME,
            f"{gk}/DELM/stability",
            f"[{tag}] DELM stayed within its stability condition: max_t eta lambda_max(P_t H)",
            STABILITY_LIMIT,
            "<",
            lambda: (
                finite_max(ref.stiffness),
                f"at {np.size(ref.stiffness)} logged steps; "
                + (
                    "dense eigensolve"
                    if g.stiffness_exact
                    else "power iteration (approximate, from below); certified upper bound from |U_t^-1|_2, "
                    f"|W_t|_2 (deq_jax.theory.learning_rate_limit): "
                    f"{finite_max(ref.certified_stiffness):.3g}"
                )
                + f"; {g.stiffness0:.3g} at the start (the step-size rule)",
            ),
        )
    )
    for r in g.runs:
        if r.role != "variant":
            continue
        out.append(
            checked(
                NAME,
                f"{gk}/{slug(r.label)}/follows_exact_path",
                f"[{tag}] {r.label} follows the exact DELM's path: max_t |W_t - W_t(exact)| / |W_0 - W*|",
                t.path,
                "<=",
                lambda r=r: (
                    finite_max(r.path_deviation),
                    f"{np.size(r.path_deviation)} logged steps; {r.description}",
                ),
                sensitive=True,
            )
        )
    delm = [r for r in g.runs if r.is_delm]
    failed = sum(r.nonconverged_solves + r.backward_failures for r in delm)
    out.append(
        checked(
            NAME,
            f"{gk}/DELM/solves",
            f"[{tag}] every DELM equilibrium solve converged, forward and implicit backward: max relative residual",
            t.solver_residual,
            "<=",
            lambda: (
                finite_max([max(r.max_solver_residual, r.max_backward_residual) for r in delm])
                if not failed
                else math.nan,
                (
                    f"{sum(r.steps for r in delm)} forward solves, "
                    f"{sum(r.nonconverged_solves for r in delm)} not converged; "
                    f"{sum(r.backward_solves for r in delm)} implicit backward solves, "
                    f"{sum(r.backward_failures for r in delm)} failed"
                ),
            ),
        )
    )
    return out
