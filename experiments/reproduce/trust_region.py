"""Experiment 2: the DELM's gradient descent, seen through `W = B U^{-1}`, is a trust-region Newton method of the
shallow model (docs/theory.md section 5).

For each scale s of A (`A ~ s N(0, 1)`, `B ~ b_scale N(0, 1)`, the same draws scaled), the DELM trains on the
square loss by full-batch GD. At the chunk boundaries of the run (while the gap is well above rounding level):
- `deq_jax.theory.trust_region_check`: the velocity of W (forward mode through the closed form, at the reverse-mode
  gradient) against `-P(G)`, P's and the trust-region norm M's eigenvalues, the KKT residual of the subproblem;
- an independent central finite difference of `W(theta - h grad L)` through the library's DELM (direct solve) against
  `-P(G)`.
Plain GD on the shallow model runs from the same `W_0` with the same learning rate; the two paths in W-space are
compared geometrically (distance of each DELM point from the GD path, normalised by `|W_0 - W*|`) and in time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax import theory
from deq_jax.train import objective

from experiments.reproduce.runs import ProgramSpec, run_gd
from experiments.reproduce.common import Claim, Context, build_models, dtype_of, fold
from experiments.reproduce.config import ReproduceConfig

NAME = "trust_region"


def _norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(leaf ** 2) for leaf in jax.tree_util.tree_leaves(tree)))


def velocity_discrepancy(model: Any, params: dict, phi: jax.Array, y: jax.Array, rel_step: float) -> jax.Array:
    """`|v_fd + P(G)| / |P(G)|` for the central finite difference `v_fd = (W(theta + h d) - W(theta - h d)) / 2h`
    along `d = -dL/dtheta`, through the library's DELM (`end_to_end`, gradients of `deq_jax.train.objective`),
    `h = rel_step |theta| / |d|`; `P(G)` from `deq_jax.theory.induced_preconditioner`. One compiled program."""
    return _velocity_discrepancy(model, params, phi, y, rel_step)


@functools.partial(jax.jit, static_argnums=(0,))
def _velocity_discrepancy(model, params, phi, y, rel_step):
    grads = jax.grad(lambda p: objective(model, "square")(p, phi, y)[0])(params)
    h = rel_step * _norm(params) / _norm(grads)
    plus = jax.tree_util.tree_map(lambda p, g: p - h * g, params, grads)
    minus = jax.tree_util.tree_map(lambda p, g: p + h * g, params, grads)
    v_fd = (model.end_to_end(plus) - model.end_to_end(minus)) / (2 * h)
    G = theory.square_loss_gradient(model.end_to_end(params), phi, y)
    PG = theory.induced_preconditioner(params, G, model.gamma, model.sigma)
    return jnp.linalg.norm(v_fd + PG) / jnp.linalg.norm(PG)


def distance_to_polyline(points: np.ndarray, polyline: np.ndarray) -> np.ndarray:
    """For each row of `points` (T, d): the Euclidean distance to the piecewise-linear path through `polyline`."""
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


def programs(cfg: ReproduceConfig, ctx: Context) -> list[ProgramSpec]:
    """The compiled programs `run` will use (for `gd_runs.precompile`)."""
    n, m = ctx.features.phi_train.shape
    t = cfg.trust_region
    return [ProgramSpec(model, "square", t.chunk, True, n, dtype_of(cfg.dtype))
            for _, model in build_models(("delm", "linear"), m, ctx.features.num_classes, cfg.model)]


def run(cfg: ReproduceConfig, ctx: Context) -> dict:
    feats, store, progress = ctx.features, ctx.store, ctx.progress
    t, mc = cfg.trust_region, cfg.model
    dtype = dtype_of(cfg.dtype)
    phi_np, Y_np = feats.phi_train.astype(dtype), feats.Y_train.astype(dtype)
    phi, Y = jnp.asarray(phi_np), jnp.asarray(Y_np)
    n, m = phi.shape
    k = feats.num_classes
    spec = {k_: float(v) for k_, v in theory.feature_spectrum(jnp.asarray(feats.phi_train)).items()}
    lr = t.learning_rate.resolve(mc.gamma, spec["lambda_max"])
    W_star, L_star = theory.shallow_optimum_square(jnp.asarray(feats.phi_train), jnp.asarray(feats.Y_train))
    W_star, L_star = np.asarray(W_star), float(L_star)
    (_, delm), = build_models(("delm",), m, k, mc)
    (_, linear), = build_models(("linear",), m, k, mc)
    key = fold(cfg.seed, 3)
    B0 = dataclasses.replace(delm, init_scale=t.b_scale).init(key, dtype)["B"]

    scales = []
    for s in t.a_scales:
        params0 = {"A": dataclasses.replace(delm, init_scale=s).init(key, dtype)["A"], "B": B0}
        base = f"{NAME}/A{s:g}"
        res = run_gd(delm, "square", params0, phi_np, Y_np, learning_rate=lr, steps=t.steps, chunk=t.chunk,
                     keep=("loss", "W", "relative_residual", "U_norm2"), snapshots=True, store=store,
                     key=f"{base}/DELM", progress=progress, desc=f"[2] A scale {s:g} DELM")
        W_delm = np.concatenate([res.history["W"], res.W_final[None]])
        W0 = W_delm[0]
        gd = run_gd(linear, "square", {"W": jnp.asarray(W0, dtype)}, phi_np, Y_np, learning_rate=lr, steps=t.steps,
                    chunk=t.chunk, keep=("loss", "W", "relative_residual"), store=store, key=f"{base}/GD",
                    progress=progress, desc=f"[2] A scale {s:g} shallow GD")
        W_gd = np.concatenate([gd.history["W"], gd.W_final[None]])
        ng = (res.history["loss"] - L_star) / (res.history["loss"][0] - L_star)

        checks = []
        for step, params in res.snapshots:
            if step % t.check_every or step >= ng.size or ng[step] < t.check_floor:
                continue

            def compute(params=params):
                tr = theory.trust_region_check(params, phi, Y, lr, mc.gamma, mc.sigma)
                tr["fd_rel_error"] = float(velocity_discrepancy(delm, params, phi, Y, t.fd_step))
                return {}, tr

            _, tr = store.cached(f"{base}/check{step}", compute)
            checks.append({"step": step, "normalised_gap": float(ng[step]), **tr})

        scale0 = np.linalg.norm(W0 - W_star)
        geometric = distance_to_polyline(W_delm.reshape(len(W_delm), -1), W_gd.reshape(len(W_gd), -1)) / scale0
        in_time = np.linalg.norm((W_delm - W_gd).reshape(len(W_delm), -1), axis=1) / scale0
        (xy_delm, xy_gd), plane = plane_coordinates([W_delm, W_gd], W0, W_star)
        scales.append({
            "a_scale": s, "key": base, "learning_rate": lr, "checks": checks,
            "loss_delm": res.history["loss"], "loss_gd": gd.history["loss"], "normalised_gap": ng,
            "U_norm2": res.history["U_norm2"],
            "path_difference": float(np.max(geometric)), "distance_to_gd_path": geometric,
            "distance_in_time": in_time, "max_distance_in_time": float(np.max(in_time)),
            "xy_delm": xy_delm, "xy_gd": xy_gd, "out_of_plane": plane["out_of_plane"],
            "endpoint_distance": float(np.linalg.norm(W_delm[-1] - W_gd[-1]) / scale0),
            "relative_residual": res.history["relative_residual"],
        })

    return {"scales": scales, "claims": _claims(cfg, scales), "settings": {
        "learning_rate": lr, "lambda_max": spec["lambda_max"], "lambda_min_plus": spec["lambda_min_plus"],
        "L_star": L_star, "b_scale": t.b_scale, "steps": t.steps, "check_every": t.check_every}}


def _max(values) -> float:
    values = [v for v in values]
    if not values or any(isinstance(v, float) and math.isnan(v) for v in values):
        return math.nan
    return float(max(values))


def _claims(cfg: ReproduceConfig, scales: list) -> list[Claim]:
    t = cfg.trust_region.thresholds
    checks = [c for s in scales for c in s["checks"]]
    scale_list = ", ".join(f"{s['a_scale']:g}" for s in scales)
    where = f"{len(checks)} checkpoints over A scales {scale_list}"
    out = [
        Claim(NAME, "velocity of W along the DELM's gradient = -P(G) (forward mode; max relative error)",
              _max(c["velocity_rel_error"] for c in checks), t.velocity, "<=", where),
        Claim(NAME, "finite-difference velocity of W = -P(G) (max relative error)",
              _max(c["fd_rel_error"] for c in checks), t.finite_difference, "<=",
              f"central difference, relative step {cfg.trust_region.fd_step:g}"),
        Claim(NAME, "trust-region norm M positive definite (min eigenvalue of M)",
              -_max(-c["M_min_eig"] for c in checks), 0.0, ">", f"lambda = 1; {where}"),
        Claim(NAME, "KKT residual |(H + lambda M) v + G| / |G| at v = -eta P(G)",
              _max(c["kkt_residual"] for c in checks), t.kkt, "<=", where),
    ]
    for s in scales:
        cos = min((c["cosine_vs_gd"] for c in s["checks"]), default=math.nan)
        out.append(Claim(NAME, f"DELM path differs from shallow GD's (A scale {s['a_scale']:g}): max distance "
                               f"from the GD path / |W_0 - W*|",
                         s["path_difference"], t.path_difference, ">=",
                         f"min cosine of the velocities {cos:.6f}"))
    return out
