"""Experiment 2: the DELM's gradient descent, seen through `W = B U^{-1}`, is a trust-region Newton method of the
shallow model (docs/theory.md sections 5 and 11).

For each scale s of A (`A ~ s N(0, 1)`, `B ~ b_scale N(0, 1)`, the same draws scaled), the DELM trains on the
square loss by full-batch GD. Measured at every step, on the update that training applied:
- the change of W along it (forward mode through the closed form, and a central finite difference) against the
  first-order prediction `-eta P_t(G_t)` of the induced dynamics `dW/dt = -P_t(G_t)`;
- the trained step against the exact GD step `W(theta_t - eta g_t)` (g the exact gradient) to all orders
  (`deq_jax.theory.w_step_check`);
- the W-path against the path integrated from those predictions to second order in eta
  (`deq_jax.theory.predict_w_step`);
and at the checkpoints (every `check_every` steps while the gap is well above rounding level) the trust-region
norm `M = ((eta P)^{-1} - H) / lambda` densely (`deq_jax.theory.trust_region_check`): the step `-eta P(G)` solves
the trust-region subproblem in the norm M iff M is positive definite, i.e. iff `eta lambda_max(P H) < 1`.
Plain GD on the shallow model runs from the same `W_0` with the same learning rate; the two paths in W-space are
compared geometrically (distance of each DELM point from the GD path, normalised by `|W_0 - W*|`) and in time:
measurements, not claims.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from deq_jax import theory
from experiments.reproduce import compiling, dynamics
from experiments.reproduce.checkpoints import digest
from experiments.reproduce.common import Claim, Context, Features, build_models, checked, dtype_of, finite_max, fold
from experiments.reproduce.config import ReproduceConfig
from experiments.reproduce.runs import RunSpec, Trace, run_gd

NAME = "trust_region"


@dataclasses.dataclass
class TrustRegionCheck:
    step: int
    normalised_gap: float
    M_min_eig: float
    P_min_eig: float
    P_max_eig: float
    cosine_vs_gd: float


@dataclasses.dataclass
class TrustRegionScale:
    """One A scale: the DELM's run (and plain GD's from the same W_0) with its measurements."""

    a_scale: float
    key: str
    mutation: str | None
    loss_delm: np.ndarray
    loss_gd: np.ndarray
    normalised_gap: np.ndarray
    U_norm2: np.ndarray
    relative_residual: np.ndarray
    velocity_error: np.ndarray  # per step
    fd_velocity_error: np.ndarray  # per step
    step_error: np.ndarray  # per step: |W_{t+1} - W_gd| / |eta P_t(G_t)| (theory.w_step_check)
    path_error: np.ndarray  # |W_t - W_t(predicted)| / |W_0 - W*| per step
    checks: list
    distance_to_gd_path: np.ndarray
    distance_in_time: np.ndarray
    xy_delm: np.ndarray
    xy_gd: np.ndarray
    xy_predicted: np.ndarray
    out_of_plane: list

    @property
    def max_distance_to_gd_path(self) -> float:
        return float(np.max(self.distance_to_gd_path))


@dataclasses.dataclass
class TrustRegionResult:
    scales: list
    claims: list
    learning_rate: float
    stiffness0: float
    lambda_max: float
    lambda_min_plus: float
    L_star: float
    b_scale: float
    steps: int
    check_every: int
    width: int
    title: str = "Trust-region Newton relation"

    def metric_rows(self) -> Iterator[dict]:
        for s in self.scales:
            for t in range(len(s.loss_delm)):
                yield {
                    "experiment": NAME,
                    "run": s.key + "/DELM",
                    "loss_fn": "square",
                    "model": "DELM",
                    "a_scale": s.a_scale,
                    "step": t,
                    "loss": s.loss_delm[t],
                    "normalised_gap": s.normalised_gap[t],
                    "solver_relative_residual": s.relative_residual[t],
                    "U_norm2": s.U_norm2[t],
                }
            for t in range(len(s.loss_gd)):
                yield {
                    "experiment": NAME,
                    "run": s.key + "/GD",
                    "loss_fn": "square",
                    "model": "linear",
                    "a_scale": s.a_scale,
                    "step": t,
                    "loss": s.loss_gd[t],
                }


def distance_to_polyline(points: np.ndarray, polyline: np.ndarray) -> np.ndarray:
    """Euclidean distance of each point (row) to the piecewise-linear curve through `polyline`'s rows."""
    a, b = polyline[:-1], polyline[1:]
    ab = b - a
    ab2 = np.sum(ab * ab, axis=1)
    out = np.empty(points.shape[0])
    for i, p in enumerate(points):
        t = np.where(ab2 > 0, np.clip(np.sum((p - a) * ab, axis=1) / np.where(ab2 > 0, ab2, 1.0), 0.0, 1.0), 0.0)
        out[i] = np.sqrt(np.min(np.sum((a + t[:, None] * ab - p) ** 2, axis=1)))
    return out


def plane_coordinates(paths: list[np.ndarray], W0: np.ndarray, W_star: np.ndarray) -> tuple[list[np.ndarray], dict]:
    """2-D coordinates of W-space paths: axis 1 along `W_0 - W*`, axis 2 along the largest deviation of the first
    path from that line (orthogonal to axis 1), origin at `W*`. Returns the coordinates and the share of each path's
    offset from W* that the plane misses (max over points, relative to |W_0 - W*|)."""
    e1 = (W0 - W_star).ravel()
    scale = np.linalg.norm(e1)
    e1 = e1 / scale
    X = paths[0].reshape(len(paths[0]), -1) - W_star.ravel()
    resid = X - np.outer(X @ e1, e1)
    j = int(np.argmax(np.linalg.norm(resid, axis=1)))
    e2 = resid[j] / max(np.linalg.norm(resid[j]), np.finfo(float).tiny)
    coords, missed = [], []
    for path in paths:
        Z = path.reshape(len(path), -1) - W_star.ravel()
        xy = np.stack([Z @ e1, Z @ e2], axis=1)
        coords.append(xy)
        missed.append(float(np.max(np.linalg.norm(Z - xy[:, :1] * e1 - xy[:, 1:] * e2, axis=1)) / scale))
    return coords, {"out_of_plane": missed}


@dataclasses.dataclass
class TrustRegionPlan:
    features: Features
    width: int
    delm: RunSpec
    linear: RunSpec
    measured: compiling.Job | None = None  # `_measure`, started by `prepare`


DELM_KEEP = (
    "loss",
    "relative_residual",
    "converged",
    "U_norm2",
    "W",
    "predicted_step",
    "velocity_error",
    "fd_velocity_error",
    "step_error",
)


def plan(cfg: ReproduceConfig, ctx: Context) -> TrustRegionPlan:
    t = cfg.trust_region
    feats = ctx.features_for(t.features, t.pca_dim, section="trust_region")
    m, k = feats.phi_train.shape[1], feats.num_classes
    dtype = dtype_of(cfg.dtype)
    ((_, delm),) = build_models(("delm",), m, k, cfg.model)
    ((_, linear),) = build_models(("linear",), m, k, cfg.model)
    return TrustRegionPlan(
        features=feats,
        width=m,
        delm=RunSpec(
            delm,
            "square",
            t.chunk,
            None,
            dtype,
            Trace(u_norm=True, W_every_step=True, checks="all", fd_step=t.fd_step),
            mutation=cfg.mutation,
            fast_compile=cfg.fast_compile,
            gram=True,
        ),
        linear=RunSpec(
            linear, "square", t.chunk, None, dtype, Trace(W_every_step=True), fast_compile=cfg.fast_compile, gram=True
        ),
    )


def programs(p: TrustRegionPlan) -> list[RunSpec]:
    return [p.delm, p.linear]


def _measure(cfg: ReproduceConfig, ctx: Context, p: TrustRegionPlan) -> tuple:
    """The shallow problem, the initial parameters of every A scale and one step size for all of them (the rule
    applied to the stiffest start), computed before any run."""
    t, delm, dtype = cfg.trust_region, p.delm.model, dtype_of(cfg.dtype)
    g = ctx.square_problem(p.features.phi_train, p.features.Y_train)
    key = fold(cfg.seed, 3)
    B0 = dataclasses.replace(delm, init_scale=t.b_scale).init(key, dtype)["B"]
    inits = [{"A": dataclasses.replace(delm, init_scale=s).init(key, dtype)["A"], "B": B0} for s in t.a_scales]
    curvature = dynamics.curvature_operator("square", g.C)
    rates = [dynamics.learning_rate(t.learning_rate, delm, p0, curvature) for p0 in inits]
    lr = min(r[0] for r in rates)
    return g, inits, lr, max(r[1].value for r in rates) * lr


def prepare(cfg: ReproduceConfig, ctx: Context, p: TrustRegionPlan) -> None:
    """Start `_measure` in the background, so that it overlaps the training runs of the experiments before."""
    p.measured = compiling.background(functools.partial(_measure, cfg, ctx, p))


def run(cfg: ReproduceConfig, ctx: Context, p: TrustRegionPlan) -> TrustRegionResult:
    t = cfg.trust_region
    g, inits, lr, stiff0 = compiling.wait(p.measured) if p.measured is not None else _measure(cfg, ctx, p)
    dtype = dtype_of(cfg.dtype)
    delm = p.delm.model
    feats = p.features
    phi, Y = jnp.asarray(feats.phi_train, dtype), jnp.asarray(feats.Y_train, dtype)
    W_star, L_star = g.W_star, g.L_star

    scales = []
    for s, params0 in zip(t.a_scales, inits, strict=True):
        base = f"{NAME}/A{s:g}"
        res = run_gd(
            p.delm,
            params0,
            g.gram,
            None,
            learning_rate=lr,
            steps=t.steps,
            keep=DELM_KEEP,
            snapshots=True,
            store=ctx.store,
            key=f"{base}/DELM",
            progress=ctx.progress,
            desc=f"[2] A scale {s:g} DELM",
        )
        W_delm = np.concatenate([res.history["W"], res.W_final[None]])
        W0 = W_delm[0]
        gd = run_gd(
            p.linear,
            {"W": jnp.asarray(W0, dtype)},
            g.gram,
            None,
            learning_rate=lr,
            steps=t.steps,
            keep=("loss", "W"),
            store=ctx.store,
            key=f"{base}/GD",
            progress=ctx.progress,
            desc=f"[2] A scale {s:g} shallow GD",
        )
        ctx.runs_total += 2
        ctx.runs_loaded += int(res.from_checkpoint) + int(gd.from_checkpoint)
        W_gd = np.concatenate([gd.history["W"], gd.W_final[None]])
        ng = (res.history["loss"] - L_star) / (res.history["loss"][0] - L_star)
        W_pred = dynamics.integrated_path(W0, res.history["predicted_step"])

        checks = []
        for step, params in res.snapshots:
            if step % t.check_every or step >= ng.size or ng[step] < t.check_floor:
                continue

            def compute(params=params):
                tr = theory.trust_region_check(params, phi, Y, lr, delm.gamma, delm.sigma)
                return {}, {k: tr[k] for k in ("M_min_eig", "P_min_eig", "P_max_eig", "cosine_vs_gd")}

            _, tr = ctx.store.cached(f"{base}/check{step}@{_params_id(params, lr)}", compute)
            checks.append(TrustRegionCheck(step=step, normalised_gap=float(ng[step]), **tr))

        scale0 = np.linalg.norm(W0 - W_star)
        flat = lambda W: W.reshape(len(W), -1)
        geometric = distance_to_polyline(flat(W_delm), flat(W_gd)) / scale0
        in_time = np.linalg.norm(flat(W_delm - W_gd), axis=1) / scale0
        (xy_delm, xy_gd, xy_pred), plane = plane_coordinates([W_delm, W_gd, W_pred], W0, W_star)
        scales.append(
            TrustRegionScale(
                a_scale=s,
                key=base,
                mutation=p.delm.mutation,
                loss_delm=res.history["loss"],
                loss_gd=gd.history["loss"],
                normalised_gap=ng,
                U_norm2=res.history["U_norm2"],
                relative_residual=res.history["relative_residual"],
                velocity_error=res.history["velocity_error"],
                fd_velocity_error=res.history["fd_velocity_error"],
                step_error=res.history["step_error"],
                path_error=np.linalg.norm(flat(W_delm - W_pred), axis=1) / scale0,
                checks=checks,
                distance_to_gd_path=geometric,
                distance_in_time=in_time,
                xy_delm=xy_delm,
                xy_gd=xy_gd,
                xy_predicted=xy_pred,
                out_of_plane=plane["out_of_plane"],
            )
        )

    result = TrustRegionResult(
        scales=scales,
        claims=[],
        learning_rate=lr,
        stiffness0=stiff0,
        lambda_max=g.lambda_max,
        lambda_min_plus=g.lambda_min_plus,
        L_star=L_star,
        b_scale=t.b_scale,
        steps=t.steps,
        check_every=t.check_every,
        width=p.width,
    )
    result.claims = claims(cfg, result)
    return result


def _params_id(params: dict, lr: float) -> str:
    return digest(*[np.asarray(params[k]) for k in ("A", "B")], np.asarray(lr))


def claims(cfg: ReproduceConfig, r: TrustRegionResult) -> list[Claim]:
    """The experiment's claims from its finished numbers and the thresholds."""
    t = cfg.trust_region.thresholds
    scales = r.scales
    checks = [c for s in scales for c in s.checks]
    where = f"{sum(len(s.velocity_error) for s in scales)} steps over A scales " + ", ".join(
        f"{s.a_scale:g}" for s in scales
    )

    def worst(attr: str):
        values = [finite_max(getattr(s, attr)) for s in scales]
        i = int(np.nanargmax(values)) if values and not all(math.isnan(v) for v in values) else 0
        return finite_max(values), (f"{where}; worst at A scale {scales[i].a_scale:g}" if scales else where)

    return [
        checked(
            NAME,
            f"{NAME}/velocity",
            "every update moves W by -eta P_t(G_t) (forward mode: max_t |DW[d_t] + eta P_t(G_t)| / |eta P_t(G_t)|)",
            t.velocity,
            "<=",
            lambda: worst("velocity_error"),
            sensitive=True,
        ),
        checked(
            NAME,
            f"{NAME}/finite_difference",
            "the same by central finite differences of the closed form",
            t.finite_difference,
            "<=",
            lambda: (worst("fd_velocity_error")[0], f"relative step {cfg.trust_region.fd_step:g}"),
            sensitive=True,
        ),
        checked(
            NAME,
            f"{NAME}/exact_step",
            "every trained step lands where the exact GD step does, to all orders "
            "(max_t |W_{t+1} - W(theta_t - eta g_t)| / |eta P_t(G_t)|, g_t the exact "
            "gradient: deq_jax.theory.w_step_check)",
            t.step,
            "<=",
            lambda: worst("step_error"),
            sensitive=True,
        ),
        checked(
            NAME,
            f"{NAME}/path",
            "the W-path follows the path integrated from dW = -eta P_t(G_t) (to second "
            "order in eta): max_t |W_t - W_t(predicted)| / |W_0 - W*|",
            t.path,
            "<=",
            lambda: worst("path_error"),
            sensitive=True,
        ),
        checked(
            NAME,
            f"{NAME}/M_positive_definite",
            "the trust-region norm M is positive definite (min eigenvalue "
            "of M = (eta P)^-1 - H; equivalently eta lambda_max(P H) < 1)",
            0.0,
            ">",
            lambda: (
                -finite_max([-c.M_min_eig for c in checks]),
                (
                    f"{len(checks)} checkpoints, dense eigensolves; eta lambda_max(P_0 H) = "
                    f"{r.stiffness0:.3g} at the stiffest start"
                ),
            ),
        ),
    ]
