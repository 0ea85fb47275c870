"""The benchmarks' independent checks: float64 references and the verdict on every row.

Outside the timed step, and independently of each implementation's own bookkeeping, every row's returned
equilibrium gets its relative residual `|f(z) - z| / |f(0)|` recomputed in float64, and its gradients their relative
error against a float64 reference: the DELM's closed form (numpy, docs/theory.md sections 3 and 8) or, for the tanh
DEQ, a float64 solve to tolerance 1e-12. A row is "converged" when that residual is <= its tolerance, whatever the
implementation said; where the implementation claimed convergence and the check disagrees, the row is flagged.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import numpy as np

from experiments.bench.problem import Problem
from experiments.bench.protocol import Check


def _softmax0(A: np.ndarray) -> np.ndarray:
    e = np.exp(A - A.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def delm_reference(p: Problem) -> dict:
    """The DELM's loss and gradients in float64 from the closed form (docs/theory.md sections 3 and 8), in numpy.

    `W = B U^{-1}`, `G = dL/dW = (phi W^T - Y)^T phi / n`, `dL/dB = G U^{-T}`, `dL/dS = gamma W^T dL/dB`,
    `dL/dA = S * (dL/dS - 1 1^T (S * dL/dS))` (the column softmax's Jacobian, column by column).
    """
    if "delm" in p.references:
        return p.references["delm"]
    A, B = p.delm["A"].astype(np.float64), p.delm["B"].astype(np.float64)
    phi, y = p.phi.astype(np.float64), p.y.astype(np.float64)
    S = _softmax0(A)
    U = np.eye(p.m) - p.gamma * S
    W = np.linalg.solve(U.T, B.T).T
    R = phi @ W.T - y
    loss = 0.5 * np.mean(np.sum(R * R, axis=1))
    G = R.T @ phi / p.n
    dB = np.linalg.solve(U, G.T).T
    dS = p.gamma * W.T @ dB
    dA = S * (dS - np.sum(S * dS, axis=0, keepdims=True))
    p.references["delm"] = {"loss": float(loss), "grads": {"A": dA, "B": dB}}
    return p.references["delm"]


def tanh_reference(p: Problem) -> dict:
    """The tanh DEQ's loss and gradients in float64: fixed-point iteration to relative residual 1e-12 with the
    implicit backward (GMRES to 1e-12), computed by deq_jax under `jax.enable_x64`."""
    if "tanh" in p.references:
        return p.references["tanh"]
    import jax
    import jax.numpy as jnp

    from deq_jax.maps import TanhMap
    from deq_jax.solve import Implicit, solve

    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, jnp.float64) for k, v in p.tanh.items()}
        phi, y = jnp.asarray(p.phi, jnp.float64), jnp.asarray(p.y, jnp.float64)

        def loss(params):
            inner = {k: params[k] for k in ("W", "U", "b")}
            sol = solve(TanhMap(p.contraction), jnp.zeros((p.n, p.m), jnp.float64), inner, phi,
                        solver="fixed_point", backward=Implicit("gmres", tol=1e-12), tol=1e-12, maxiter=5000)
            r = sol.value @ params["B"].T - y
            return 0.5 * jnp.mean(jnp.sum(r * r, axis=1)), sol.stats

        (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        if not bool(stats.converged):
            raise RuntimeError(f"the float64 tanh reference did not converge: {stats}")
        p.references["tanh"] = {"loss": float(value), "grads": {k: np.asarray(v) for k, v in grads.items()}}
    return p.references["tanh"]


def reference(p: Problem, problem: str) -> dict:
    return delm_reference(p) if problem == "delm" else tanh_reference(p)


def relative_residual(p: Problem, problem: str, formulation: str, state: np.ndarray, device: Any = None) -> float:
    """`|f(z) - z| / |f(0)|` in float64 for the returned equilibrium `state` (deq_jax's definition).

    Computed with JAX under `jax.enable_x64` on `device` (the full-batch GPU problem's products are large).
    """
    import jax

    with jax.enable_x64(True):
        put = lambda a: jax.device_put(np.asarray(a, np.float64), device)
        if problem == "delm":
            transposed = formulation == "transposed"
            args = (put(state), put(p.delm["A"]), put(p.delm["B"] if transposed else p.phi), p.gamma)
            return float(_residual_function("delm_transposed" if transposed else "delm_per_sample")(*args))
        args = (put(state), put(p.tanh["W"]), put(p.tanh["U"]), put(p.tanh["b"]), put(p.phi), p.contraction)
        return float(_residual_function("tanh")(*args))


@functools.lru_cache(maxsize=None)
def _residual_function(kind: str):
    """The jitted relative residual of each map (one compilation per kind and shape, shared by the rows)."""
    import jax
    import jax.numpy as jnp

    def delm(z, A, c, gamma, transposed):
        S = jax.nn.softmax(A, axis=0)
        return jnp.linalg.norm(c + gamma * (z @ S if transposed else z @ S.T) - z) / jnp.linalg.norm(c)

    def tanh(z, W, U, b, x, contraction):
        Wc = W * jnp.minimum(1.0, contraction / jnp.linalg.norm(W))
        injection = x @ U.T + b
        return jnp.linalg.norm(jnp.tanh(z @ Wc.T + injection) - z) / jnp.linalg.norm(jnp.tanh(injection))

    functions = {"delm_transposed": functools.partial(delm, transposed=True),
                 "delm_per_sample": functools.partial(delm, transposed=False), "tanh": tanh}
    return jax.jit(functions[kind])


def relative_errors(grads: dict, ref: dict) -> dict:
    """`|g - g_ref|_F / |g_ref|_F` per parameter of `grads` (float64); `{}` for a row without gradients."""
    out = {}
    for k, r in ref.items():  # in the reference's order, which the tables' "1st, 2nd" columns follow
        if k in grads:
            g = np.asarray(grads[k], np.float64)
            out[k] = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), np.finfo(np.float64).tiny))
    return out


def verify(row: dict, chk: Check, p: Problem, tol: float, direct: Optional[dict], device: Any) -> None:
    """Fill `row` with the independent verdict on what the row's computation returned (`chk`)."""
    ref = reference(p, row["problem"])
    row["iterations"] = chk.iterations
    row["converged_own"] = chk.converged
    row["relative_residual"] = relative_residual(p, row["problem"], row["formulation"], chk.state, device)
    row["converged"] = bool(np.isfinite(row["relative_residual"]) and row["relative_residual"] <= tol)
    row["grad_error"] = relative_errors(chk.grads, ref["grads"])
    if direct is not None and row["problem"] == "delm" and chk.grads:
        row["grad_error_vs_direct_f32"] = relative_errors(chk.grads, direct)
    row.update(chk.extra)
    if chk.converged is True and not row["converged"]:
        row["flag"] = "reported converged but the independent residual is above tol"
