"""Experiment 1: global linear convergence of the DELM to the shallow optimum (docs/theory.md section 4).

For each loss and each width (the features' own width m, and a fixed random projection to a width below the number
of classes), every model trains by full-batch gradient descent from its seeded init:

    phi -> deq_jax.models.<Model> -> model.init(key, dtype) -> gradient descent (deq_jax.train.make_step, chunked)

and the training loss is compared with the shallow model's optimum `L*`, computed independently by
`deq_jax.theory` (least squares for the square loss; a Newton solve for cross-entropy). Cross-entropy carries an L2
penalty `(l2/2) |W|_F^2` on the end-to-end matrix (documented choice: without it separable data have no minimiser),
so `L*` is the regularised optimum and the PL constant of the bound is `l2` (strong convexity) instead of
`lambda_min^+`. Measured per run: the normalised gap `(L_t - L*) / (L_0 - L*)`, its log-linear rate over an explicit
band of gaps, and, for the DELM, the per-step bound `gap_{t+1} / gap_t <= 1 - 2 eta lambda / |U_t|_2^2` from the
run's own `|U_t|_2`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from deq_jax import theory
from deq_jax.maps import random_projection
from deq_jax.train import check_converged

from experiments.reproduce.runs import ProgramSpec, regularised_cross_entropy, run_gd, with_probe_rows
from experiments.reproduce.common import (Claim, Context, Features, build_models, dtype_of, measure_or_none, fold,
                                          heldout_metrics, slug)
from experiments.reproduce.config import ReproduceConfig

NAME = "convergence"
LOSS_TITLES = {"square": "square loss", "cross_entropy": "cross-entropy + L2"}


def _stop_at_floor(L_star: float, stop_gap: float):
    def stop(history: dict, chunk: dict, start: int):
        gap0 = float(history["loss"][0]) - L_star
        if not gap0 > 0:
            return None
        return {} if np.all((np.asarray(chunk["loss"]) - L_star) / gap0 <= stop_gap) else None

    return stop


def _optimum(loss: str, phi: np.ndarray, feats: Features, l2: float) -> tuple[np.ndarray, float, dict]:
    if loss == "square":
        W, L = theory.shallow_optimum_square(jnp.asarray(phi), jnp.asarray(feats.Y_train))
        return np.asarray(W), float(L), {"method": "min-norm least squares (SVD pseudo-inverse)"}
    # a solve that stops short is data (a failed claim below), not a crash
    W, L, info = theory.shallow_optimum_cross_entropy(jnp.asarray(phi), jnp.asarray(feats.labels_train),
                                                      feats.num_classes, l2=l2, on_failure="ignore")
    return np.asarray(W), float(L), info


def bound_analysis(loss_hist: np.ndarray, U_norm2: np.ndarray, L_star: float, learning_rate: float, pl: float,
                   floor: float) -> dict:
    """Observed per-step ratios `gap_{t+1} / gap_t` against the bound from the run's own `|U_t|_2`.

    `theory.gd_rate_bound` gives the gradient-flow bound per step, `r_t = 1 - 2 x_t` with
    `x_t = eta lambda / |U_t|_2^2`: first order in eta. One gradient *step* contracts the shallow model's slowest
    direction, preconditioned by `1/|U_t|_2^2`, by exactly `(1 - x_t)^2 = r_t + x_t^2`; that is the per-step bound
    checked (`bound_ratio`). Both are compared only where the gaps are above `floor * gap_0`, below which the ratio
    of two rounding-level numbers says nothing. `flow_excess` reports how far the first-order form was exceeded (by
    at most the `x_t^2` discretisation term where the claim passes).
    """
    gap = loss_hist - L_star
    ng = gap / gap[0]
    flow_ratio = np.asarray(theory.gd_rate_bound(learning_rate, pl, U_norm2))
    bound_ratio = ((1.0 + flow_ratio) / 2.0) ** 2
    cumulative = np.concatenate([[1.0], np.cumprod(bound_ratio[:-1])])
    valid = (ng[1:] > floor) & (ng[:-1] > floor)
    ratio = np.full(gap.shape, np.nan)
    ratio[:-1] = gap[1:] / gap[:-1]
    excess = ratio[:-1][valid] - bound_ratio[:-1][valid]
    flow_excess = ratio[:-1][valid] - flow_ratio[:-1][valid]
    checked = np.zeros(gap.shape, bool)
    checked[:-1] = valid
    in_band = ng > floor
    return {
        "ratio": ratio,
        "checked": checked,
        "bound_ratio": bound_ratio,
        "flow_ratio": flow_ratio,
        "cumulative_bound": cumulative,
        "max_excess": float(np.max(excess)) if excess.size else math.nan,
        "max_flow_excess": float(np.max(flow_excess)) if excess.size else math.nan,
        "checked_steps": int(valid.sum()),
        "median_ratio": float(np.median(ratio[:-1][valid])) if valid.any() else math.nan,
        "median_bound_ratio": float(np.median(bound_ratio[:-1][valid])) if valid.any() else math.nan,
        "max_cumulative_excess": float(np.max(ng[in_band] / cumulative[in_band] - 1.0)),
        "U_norm2_range": [float(np.min(U_norm2)), float(np.max(U_norm2))],
    }


def programs(cfg: ReproduceConfig, ctx: Context) -> list[ProgramSpec]:
    """The compiled programs `run` will use, in order (for `gd_runs.precompile`)."""
    c = cfg.convergence
    n, m = ctx.features.phi_train.shape
    widths = [(m, c.models)] + ([(c.small_width, c.small_width_models)] if c.small_width is not None else [])
    specs = []
    for loss_name in c.losses:
        for width, names in widths:
            loss = "square" if loss_name == "square" else regularised_cross_entropy(n, c.cross_entropy_l2)
            rows = n if loss_name == "square" else n + width
            specs += [ProgramSpec(model, loss, c.chunk, True, rows, dtype_of(cfg.dtype))
                      for _, model in build_models(names, width, ctx.features.num_classes, cfg.model)]
    return specs


def run(cfg: ReproduceConfig, ctx: Context) -> dict:
    feats, store, progress = ctx.features, ctx.store, ctx.progress
    c, mc = cfg.convergence, cfg.model
    dtype = dtype_of(cfg.dtype)
    n, m = feats.phi_train.shape
    k = feats.num_classes
    widths = [("full", m, feats.phi_train, feats.phi_test, c.models)]
    if c.small_width is not None:
        P = np.asarray(random_projection(fold(cfg.seed, 2), m, c.small_width, jnp.float64))
        widths.append(("small", c.small_width, feats.phi_train @ P, feats.phi_test @ P, c.small_width_models))

    runs, claims, settings = [], [], []
    for loss_name in c.losses:
        for wkey, width, phi, phi_test, names in widths:
            spec = {k_: float(v) for k_, v in theory.feature_spectrum(jnp.asarray(phi)).items()}
            lr = c.learning_rate.resolve(mc.gamma, spec["lambda_max"])
            W_star, L_star, opt_info = _optimum(loss_name, phi, feats, c.cross_entropy_l2)
            if loss_name == "square":
                pl, loss, train_phi, train_y = spec["lambda_min_plus"], "square", phi, feats.Y_train
            else:
                pl = c.cross_entropy_l2
                loss = regularised_cross_entropy(n, c.cross_entropy_l2)
                train_phi, train_y = with_probe_rows(phi, feats.Y_train)
            settings.append({"loss": loss_name, "width": width, "projection": wkey == "small",
                             "learning_rate": lr, "pl_constant": pl, "L_star": L_star,
                             "lambda_max": spec["lambda_max"], "lambda_min_plus": spec["lambda_min_plus"],
                             "rank": int(spec["rank"]), "optimum": dict(opt_info)})
            for label, model in build_models(names, width, k, mc):
                key = f"{NAME}/{loss_name}/m{width}/{slug(label)}"
                params0 = model.init(fold(cfg.seed, 1), dtype)
                res = run_gd(model, loss, params0, train_phi.astype(dtype), train_y.astype(dtype),
                             learning_rate=lr, steps=c.steps, chunk=c.chunk, stop=_stop_at_floor(L_star, c.stop_gap),
                             store=store, key=key, progress=progress,
                             desc=f"[1] {loss_name} m={width} {label}")
                h = res.history
                gap = h["loss"] - L_star
                ng = gap / gap[0]
                W_T = res.W_final
                r = {
                    "key": key, "loss": loss_name, "width": width, "projection": wkey == "small", "model": label,
                    "is_delm": label == "DELM", "learning_rate": lr, "L_star": L_star, "pl_constant": pl,
                    "steps": res.steps, "stopped_early": res.stopped_early,
                    "loss_history": h["loss"], "normalised_gap": ng, "grad_norm": h["grad_norm"],
                    "relative_residual": h["relative_residual"],
                    "final_normalised_gap": float(ng[-1]),
                    "distance_to_optimum": float(np.linalg.norm(W_T - W_star) / np.linalg.norm(W_star)),
                    "fit": measure_or_none(theory.fit_log_linear, ng, lo=c.fit_lo, hi=c.fit_hi),
                    "train": heldout_metrics(W_T, phi, feats.labels_train, feats.Y_train),
                    "test": heldout_metrics(W_T, phi_test, feats.labels_test, feats.Y_test),
                    "nonconverged_solves": check_converged(h, policy="ignore"),
                    "max_solver_residual": float(np.max(h["relative_residual"])),
                }
                if "U_norm2" in h:
                    r["U_norm2"] = h["U_norm2"]
                    r["bound"] = bound_analysis(h["loss"], h["U_norm2"], L_star, lr, pl, c.bound_floor)
                runs.append(r)
            claims += _claims(cfg, loss_name, width, wkey,
                              [r for r in runs if r["loss"] == loss_name and r["width"] == width], settings)
    delm = [r for r in runs if r["is_delm"]]
    claims.append(Claim(NAME, "every DELM equilibrium solve exact (max relative residual |f(W) - W| / |B|)",
                        max(r["max_solver_residual"] for r in delm), c.thresholds.solver_residual, "<=",
                        f"{sum(r['steps'] for r in delm)} solves, direct LU"))
    return {"runs": runs, "claims": claims, "settings": settings}


def _claims(cfg: ReproduceConfig, loss: str, width: int, wkey: str, runs: list, settings: list) -> list[Claim]:
    t = cfg.convergence.thresholds
    c = cfg.convergence
    tag = f"{LOSS_TITLES[loss]}, m={width}" + (" (random projection)" if wkey == "small" else "")
    out = []
    setting = next(s for s in settings if s["loss"] == loss and s["width"] == width)
    if loss == "cross_entropy":
        o = setting["optimum"]
        out.append(Claim(NAME, f"[{tag}] L* solved independently: |grad| of the regularised objective at W*",
                         o["grad_norm"], o["tol"], "<=",
                         f"Newton-CG, {o['iterations']} steps, {o['cg_iterations']} Hessian-vector products"))
    delm = next(r for r in runs if r["is_delm"])
    out.append(Claim(NAME, f"[{tag}] DELM reaches L*: normalised gap (L_T - L*)/(L_0 - L*)",
                     delm["final_normalised_gap"], t.normalised_gap, "<=", f"{delm['steps']} steps"))
    fit = delm["fit"]
    out.append(Claim(NAME, f"[{tag}] DELM gap decays linearly: R^2 of the log-linear fit",
                     math.nan if fit is None else fit["r2"], t.r2, ">=",
                     "no gaps in the band" if fit is None else
                     f"gaps in ({c.fit_lo:g}, {c.fit_hi:g}): steps {fit['window'][0]}-{fit['window'][1]}, "
                     f"rate {fit['rate']:.6f}/step"))
    b = delm["bound"]
    lam = "l2" if loss == "cross_entropy" else "lambda_min^+"
    out.append(Claim(NAME, f"[{tag}] DELM never slower than the bound: max_t gap_{{t+1}}/gap_t - "
                           f"(1 - eta {lam} / |U_t|_2^2)^2",
                     b["max_excess"], t.bound_excess, "<=",
                     f"{b['checked_steps']} steps with gap > {c.bound_floor:g} gap_0; median ratio "
                     f"{b['median_ratio']:.6f} vs bound {b['median_bound_ratio']:.6f}; first-order (flow) form "
                     f"exceeded by at most {b['max_flow_excess']:.2g}"))
    linear = next((r for r in runs if r["model"] == "linear"), None)
    if linear is not None:
        out.append(Claim(NAME, f"[{tag}] linear GD reaches the same L* (checks L*)",
                         linear["final_normalised_gap"], t.normalised_gap, "<=", f"{linear['steps']} steps"))
    return out
