"""Small problems and helpers shared by the main job's test files (runs, claims, command line)."""

from __future__ import annotations

import contextlib
import json

import jax.numpy as jnp
import numpy as np
from helpers import ROOT

from deq_jax import models, theory
from experiments.reproduce import bounds, convergence
from experiments.reproduce import cli as reproduce
from experiments.reproduce import runs as gd_runs
from experiments.reproduce.config import load_config

TINY = str(ROOT / "configs" / "tiny.yaml")


def tiny_data(n=9, m=9, k=10, seed=0):
    """Random data of the tiny config's shapes (m = 9 features, k = 10 classes), so that compiled programs are
    shared with the tiny job (on the Gram route they depend on m and k only)."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(n, m)) / 3  # lambda_max(phi^T phi / n) ~ 0.4: GD at eta = 0.05 is stable
    labels = rng.integers(0, k, n)
    return jnp.asarray(phi), jnp.asarray(np.eye(k)[labels]), labels


def run_spec(model, trace=gd_runs.Trace(u_norm=True), mutation=None, **kwargs):
    """The tiny config's programs (fast compilation, the square loss on its Gram route unless told otherwise),
    shared with the tiny job where the shapes agree."""
    kwargs = {"loss": "square", "rows": None, "gram": True, **kwargs}
    return gd_runs.RunSpec(
        model, chunk=50, dtype=jnp.float64, trace=trace, mutation=mutation, fast_compile=True, **kwargs
    )


DELM = models.DELM(9, 10)


def convergence_group(offset=0.0, pl_scale=1.0, length=400):
    """A synthetic convergence group whose DELM gap contracts at exactly (1 - x)^2 per step, x = eta lam / |U|^2:
    claims computed from it with `L*` shifted by `offset` and the PL constant scaled by `pl_scale`."""
    eta, lam, u = 0.1, 0.5, 1.2
    x = eta * lam / u**2
    L_true = 0.2
    loss = L_true + np.concatenate([[1.0], np.cumprod(np.full(length - 1, (1 - x) ** 2 * (1 - 1e-9)))])
    L_star = L_true + offset
    U = np.full(length, u)
    ng = (loss - L_star) / (loss[0] - L_star)
    fit = None
    with contextlib.suppress(ValueError):
        fit = theory.fit_log_linear(ng, lo=1e-9, hi=1e-2)
    W = np.zeros((len(range(0, length, 50)) + 1, 2, 2))
    run = convergence.ConvergenceRun(
        label="DELM",
        role="reference",
        key="k",
        description="",
        learning_rate=eta,
        steps=length,
        stopped_early=False,
        mutation=None,
        loss_history=loss,
        normalised_gap=ng,
        grad_norm=np.ones(length),
        relative_residual=np.zeros(length),
        nonconverged_solves=0,
        max_solver_residual=0.0,
        backward_solves=0,
        backward_failures=0,
        max_backward_residual=0.0,
        logged_steps=np.arange(0, length + 1, 50),
        W_logged=W,
        final_normalised_gap=float(ng[-1]),
        distance_to_optimum=0.0,
        train={},
        test={},
        fit=fit,
        bound=bounds.bound_analysis(loss, U, L_star, eta, lam * pl_scale, 1e-7),
        U_norm2=U,
        stiffness=np.full(len(W), 1.0),
    )
    return convergence.ConvergenceGroup(
        loss="square",
        loss_title="square loss",
        features="synthetic",
        width=2,
        reaches_optimum=True,
        gram_route=True,
        learning_rate=eta,
        stiffness0=1.0,
        stiffness_exact=True,
        pl_constant=lam * pl_scale,
        pl_name="lambda_min^+",
        L_star=L_star,
        optimum={"gradient_ratio": 1e-16},
        lambda_max=1.0,
        lambda_min_plus=lam,
        rank=2,
        runs=[run],
    )


def verdicts(group):
    cfg = load_config(TINY)
    return {c.key.rsplit("/", 1)[-1]: c for c in convergence.group_claims(cfg, group)}


def run_main(*args, out):
    return reproduce.main(["--config", TINY, "--out", str(out), "--no-progress", *args])


def read_summary(out, name="tiny"):
    return json.loads((out / name / "summary.json").read_text())
