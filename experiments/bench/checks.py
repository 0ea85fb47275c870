"""The benchmarks' independent checks: float64 references and the verdict on every row.

Outside the timed step, and independently of each implementation's own bookkeeping, every row's returned
equilibrium gets its relative residual `|f(z) - z| / |f(z)|` recomputed in float64 (2-norms over the whole state:
deq_jax's start-independent rule, which judges the value returned whatever the start, so a warm start cannot pass
for convergence), and its gradients their relative error against a float64 reference: the DELM's closed form
(numpy, docs/theory.md sections 3 and 8) or, for the tanh DEQ, a float64 solve to tolerance 1e-12. A row is
"converged" when that residual is <= its tolerance, whatever the implementation said; where the implementation
claimed convergence and the check disagrees, the row is flagged. Per-sample rows also record their worst sample's
`|f(z_i) - z_i| / |f(z_i)|` (deq_jax's per-sample solves hold every sample to the rule).

The baselines (jaxopt, torchdeq) stop on an absolute tolerance; they are given `tol * |z*|`, `|z*|` = the float64
equilibrium's norm (`equilibrium_norm`), so that they stop by the same rule as deq_jax.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax import Implicit, solve
from deq_jax.maps import TanhMap
from experiments.bench.problem import Problem, closed_form
from experiments.bench.protocol import Check


def delm_reference(p: Problem, params: dict | None = None) -> dict:
    """The DELM's loss and gradients in float64 from the closed form (docs/theory.md sections 3 and 8), in numpy.

    `W = B U^{-1}`, `G = dL/dW = (phi W^T - Y)^T phi / n`, `dL/dB = G U^{-T}`, `dL/dS = gamma W^T dL/dB`,
    `dL/dA = S * (dL/dS - 1 1^T (S * dL/dS))` (the column softmax's Jacobian, column by column).
    At `params` (a training run's current parameters), or at the problem's initial ones (cached).
    """
    if params is not None:
        return _delm_reference(p, params)
    if "delm" not in p.references:
        p.references["delm"] = _delm_reference(p, p.delm)
    return p.references["delm"]


def _delm_reference(p: Problem, params: dict) -> dict:
    phi, y = p.phi.astype(np.float64), p.y.astype(np.float64)
    S, U, W = closed_form(p, params["A"], params["B"])
    R = phi @ W.T - y
    loss = 0.5 * np.mean(np.sum(R * R, axis=1))
    G = R.T @ phi / p.n
    dB = np.linalg.solve(U, G.T).T
    dS = p.gamma * W.T @ dB
    dA = S * (dS - np.sum(S * dS, axis=0, keepdims=True))
    return {"loss": float(loss), "grads": {"A": dA, "B": dB}}


def tanh_reference(p: Problem) -> dict:
    """The tanh DEQ's loss and gradients in float64: fixed-point iteration to relative residual 1e-12 with the
    implicit backward (GMRES to 1e-12), computed by deq_jax under `jax.enable_x64`."""
    if "tanh" in p.references:
        return p.references["tanh"]

    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, jnp.float64) for k, v in p.tanh.items()}
        phi, y = jnp.asarray(p.phi, jnp.float64), jnp.asarray(p.y, jnp.float64)

        def loss(params):
            inner = {k: params[k] for k in ("W", "U", "b")}
            sol = solve(
                TanhMap(p.contraction),
                jnp.zeros((p.n, p.m), jnp.float64),
                inner,
                phi,
                solver="fixed_point",
                backward=Implicit("gmres", tol=1e-12),
                tol=1e-12,
                maxiter=5000,
            )
            r = sol.value @ params["B"].T - y
            return 0.5 * jnp.mean(jnp.sum(r * r, axis=1)), (sol.stats, jnp.linalg.norm(sol.value))

        (value, (stats, z_norm)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        if not bool(stats.converged):
            raise RuntimeError(f"the float64 tanh reference did not converge: {stats}")
        p.references["tanh"] = {
            "loss": float(value),
            "grads": {k: np.asarray(v) for k, v in grads.items()},
            "z_norm": float(z_norm),
        }
    return p.references["tanh"]


def reference(p: Problem, problem: str, params: dict | None = None) -> dict:
    if problem == "delm":
        return delm_reference(p, params)
    if params is not None:
        raise ValueError("the tanh reference is computed at the problem's initial parameters only")
    return tanh_reference(p)


def equilibrium_norm(p: Problem, problem: str, formulation: str) -> float:
    """`|z*|_2` over the whole state (`= |f(z*)|`) in float64 at the initial parameters: W* `(m_y, m)` (transposed),
    Z* `(n, m)` (per sample), the tanh DEQ's Z*. `tol` times it is the absolute tolerance that makes a baseline's
    `|f(z) - z| <= tol_abs` the same rule as deq_jax's `|f(z) - z| <= tol |f(z)|` at the solution."""
    key = f"norm {problem} {formulation}"
    if key not in p.references:
        if problem == "tanh":
            p.references[key] = tanh_reference(p)["z_norm"]
        else:
            _, U, W = closed_form(p, p.delm["A"], p.delm["B"])
            z = W if formulation == "transposed" else np.linalg.solve(U, p.phi.astype(np.float64).T)
            p.references[key] = float(np.linalg.norm(z))
    return p.references[key]


def relative_residual(
    p: Problem, problem: str, formulation: str, state: np.ndarray, device: Any = None, params: dict | None = None
) -> float:
    """`|f(z) - z| / |f(z)|` in float64 over the whole state for the returned equilibrium `state`, the DELM at
    `params` (default: the problem's initial parameters)."""
    return residuals(p, problem, formulation, state, device, params)[0]


def residuals(
    p: Problem, problem: str, formulation: str, state: np.ndarray, device: Any = None, params: dict | None = None
) -> tuple[float, float | None]:
    """`(|f(z) - z| / |f(z)|` over the whole state, the worst sample's `|f(z_i) - z_i| / |f(z_i)|` (per-sample
    states; None for the transposed W))`, in float64.

    Computed with JAX under `jax.enable_x64` on `device` (the full-batch GPU problem's products are large).
    """

    with jax.enable_x64(True):
        put = lambda a: jax.device_put(np.asarray(a, np.float64), device)
        if problem == "delm":
            transposed = formulation == "transposed"
            delm = p.delm if params is None else params
            args = (put(state), put(delm["A"]), put(delm["B"] if transposed else p.phi), p.gamma)
            whole, worst = _residual_function("delm_transposed" if transposed else "delm_per_sample")(*args)
        else:
            args = (put(state), put(p.tanh["W"]), put(p.tanh["U"]), put(p.tanh["b"]), put(p.phi), p.contraction)
            whole, worst = _residual_function("tanh")(*args)
        return float(whole), None if problem == "delm" and formulation == "transposed" else float(worst)


@functools.cache
def _residual_function(kind: str):
    """The jitted relative residuals of each map (one compilation per kind and shape, shared by the rows)."""

    def ratios(fz, z):
        r = fz - z
        rows = jnp.linalg.norm(r, axis=-1) / jnp.linalg.norm(fz, axis=-1)
        return jnp.linalg.norm(r) / jnp.linalg.norm(fz), jnp.max(rows)

    def delm(z, A, c, gamma, transposed):
        S = jax.nn.softmax(A, axis=0)
        return ratios(c + gamma * (z @ S if transposed else z @ S.T), z)

    def tanh(z, W, U, b, x, contraction):
        Wc = W * jnp.minimum(1.0, contraction / jnp.linalg.norm(W))
        return ratios(jnp.tanh(z @ Wc.T + x @ U.T + b), z)

    functions = {
        "delm_transposed": functools.partial(delm, transposed=True),
        "delm_per_sample": functools.partial(delm, transposed=False),
        "tanh": tanh,
    }
    return jax.jit(functions[kind])


def relative_errors(grads: dict, ref: dict) -> dict:
    """`|g - g_ref|_F / |g_ref|_F` per parameter of `grads` (float64); `{}` for a row without gradients."""
    out = {}
    for k, r in ref.items():  # in the reference's order, which the tables' "1st, 2nd" columns follow
        if k in grads:
            g = np.asarray(grads[k], np.float64)
            out[k] = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), np.finfo(np.float64).tiny))
    return out


FLAG = "reported converged but the independent residual is above tol"


def _judge(chk: Check, p: Problem, problem: str, formulation: str, tol: float, device: Any) -> dict:
    """The independent verdict on one check: float64 residual of the equilibrium, gradient errors against float64
    (at the parameters the check's step was taken at)."""
    ref = reference(p, problem, chk.params)
    residual, worst = residuals(p, problem, formulation, chk.state, device, chk.params)
    out = {
        "relative_residual": residual,
        "converged": bool(np.isfinite(residual) and residual <= tol),
        "grad_error": relative_errors(chk.grads, ref["grads"]),
    }
    if worst is not None:
        out["worst_sample_relative_residual"] = worst
    return out


def verify(row: dict, chk: Check, p: Problem, tol: float, direct: dict | None, device: Any) -> None:
    """Fill `row` with the independent verdict on what the row's computation returned (`chk`)."""
    row["iterations"] = chk.iterations
    row["converged_own"] = chk.converged
    row.update(_judge(chk, p, row["problem"], row["formulation"], tol, device))
    if direct is not None and row["problem"] == "delm" and chk.grads and chk.params is None:
        row["grad_error_vs_direct_f32"] = relative_errors(chk.grads, direct)  # same parameters only
    row.update(chk.extra)
    if chk.converged is True and not row["converged"]:
        row["flag"] = FLAG


def verify_again(row: dict, chk: Check, p: Problem, tol: float, device: Any, when: str) -> None:
    """A second independent check of a training run's row (e.g. after its timed steps, at its then parameters):
    recorded under `row[when]`; the row counts as converged only if both checks passed, and is flagged if the
    implementation claimed convergence that the check refutes."""
    verdict = _judge(chk, p, row["problem"], row["formulation"], tol, device)
    row[when] = dict(verdict, iterations=chk.iterations, converged_own=chk.converged, **chk.extra)
    row["converged"] = bool(row.get("converged")) and verdict["converged"]
    if chk.converged is True and not verdict["converged"]:
        row["flag"] = FLAG + f" ({when.replace('_', ' ')})"
