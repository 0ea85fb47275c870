"""The shallow cross-entropy problem `min_W (1/n) sum_i CE(W phi_i, y_i) + (l2/2) |W|_F^2` (docs/theory.md section 13).

Solved by truncated Newton (conjugate gradients on Hessian-vector products, Armijo backtracking) in `O(n (m + m_y))`
memory: the only products with `phi` are `phi W^T` and `V^T phi` for `(m_y, m)` matrices `V`.

A failed solve is data, never a crash and never a silent `W`: `info["status"]` says what happened and
`info["converged"]` is decided by an independent check, the gradient norm recomputed at the returned `W` by a
separate program (`cross_entropy_gradient`), so that a fault inside the solver's program cannot pass as an optimum.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from deq_jax import _checks
from deq_jax.theory._common import Array, as_float64, check_phi, program

#: `info["status"]` values of `shallow_optimum_cross_entropy`
STATUSES = ("converged", "max_iterations", "line_search_failed", "non_finite", "not_verified")


class OptimumNotConverged(RuntimeError):
    """`shallow_optimum_cross_entropy` stopped before its gradient norm reached `tol`; `.info` holds the details."""

    def __init__(self, message: str, info: dict | None = None):
        super().__init__(message)
        self.info = info


def _softmax_parts(W: Array, phi: Array, targets: Array) -> tuple[Array, Array, Array]:
    """`logits = phi W^T`, the softmax `p` and the row weights `sum_k t_ik` (1 for one-hot or probability rows)."""
    logits = phi @ W.T
    return logits, jax.nn.softmax(logits, axis=-1), jnp.sum(targets, axis=-1, keepdims=True)


def _value_grad(W: Array, phi: Array, targets: Array, l2: Any) -> tuple[Array, Array, Array, Array]:
    """`L(W) = (1/n) sum_i [w_i lse(z_i) - t_i . z_i] + (l2/2) |W|^2` and `G = (w p - t)^T phi / n + l2 W` in closed
    form (`z = phi W^T`, `w_i = sum_k t_ik`); also `p` and `w` for Hessian-vector products."""
    logits, p, weight = _softmax_parts(W, phi, targets)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    value = jnp.mean(weight[:, 0] * lse[:, 0] - jnp.sum(targets * logits, axis=-1)) + 0.5 * l2 * jnp.sum(W * W)
    return value, (weight * p - targets).T @ phi / phi.shape[0] + l2 * W, p, weight


def _hvp(V: Array, phi: Array, p: Array, weight: Array, l2: Any) -> Array:
    """`H[V] = (w (p * Z - p sum_k p_k Z_k))^T phi / n + l2 V`, `Z = phi V^T`: the Hessian of `L` at the `W` of `p`."""
    Z = phi @ V.T
    pZ = p * Z
    return (weight * (pZ - p * jnp.sum(pZ, axis=-1, keepdims=True))).T @ phi / phi.shape[0] + l2 * V


def cross_entropy_gradient(W: Array, phi: Array, targets: Array, l2: float = 0.0) -> Array:
    """`G = dL/dW = (softmax(phi W^T) - Y)^T phi / n + l2 W` of the regularised mean cross-entropy.

    `O(n m m_y)` time, `O(n m_y)` extra memory.

    Args:
      W: the end-to-end matrix, `(m_y, m)`.
      phi: the features, `(n, m)`.
      targets: one-hot or probability rows, `(n, m_y)`.
      l2: the weight of the `(l2/2) |W|_F^2` penalty.

    Returns:
      `G`, `(m_y, m)`.
    """
    check_phi(phi)
    _checks.check_float_array("targets", targets)
    _checks.check_shape("targets", targets, (phi.shape[0], None), "one-hot rows, one per row of phi")
    _checks.check_float_array("W", W)
    _checks.check_shape("W", W, (targets.shape[1], phi.shape[1]), "W is (m_y, m)")
    return _ce_value_grad(W, phi, targets, l2)[1]


@program
def _ce_value_grad(W: Array, phi: Array, targets: Array, l2: Any) -> tuple[Array, Array]:
    """Objective and gradient at `W`, as a program of its own (the independent check of the solver's result)."""
    return _value_grad(W, phi, targets, l2)[:2]


def _cg(hvp: Callable[[Array], Array], b: Array, atol: Array, maxiter: Array) -> tuple[Array, Array]:
    """Conjugate gradients for `H x = b`, H symmetric positive definite; stops at `|r| <= atol`. `(x, iterations)`."""

    def cond(state):
        _, _, _, rs, i = state
        return (jnp.sqrt(rs) > atol) & (i < maxiter)

    def body(state):
        x, r, p, rs, i = state
        Hp = hvp(p)
        alpha = rs / jnp.vdot(p, Hp)
        x, r = x + alpha * p, r - alpha * Hp
        rs_new = jnp.vdot(r, r)
        return x, r, r + (rs_new / rs) * p, rs_new, i + 1

    x, *_, i = jax.lax.while_loop(cond, body, (jnp.zeros_like(b), b, b, jnp.vdot(b, b), jnp.zeros((), jnp.int32)))
    return x, i


def _newton_cg(phi, targets, l2, tol, maxiter, cg_maxiter):
    """Truncated Newton with Armijo backtracking from `W = 0`; stops at `|grad|_F <= tol`. Closed-form gradient and
    Hessian-vector products (no autodiff): two `(n, m) x (m, m_y)`-sized products per CG step."""
    eps = jnp.finfo(phi.dtype).eps

    def fun(W):
        return _value_grad(W, phi, targets, l2)[0]

    def cond(state):
        _, _, g, _, _, k, _, failed = state
        return (jnp.linalg.norm(g) > tol) & (k < maxiter) & ~failed

    def body(state):
        W, f, g, p, weight, k, cg_total, _ = state
        gnorm = jnp.linalg.norm(g)
        # forcing term min(0.5, sqrt|g|) |g|: superlinear convergence; the floor 0.1 tol lets |g| reach tol
        d, cg_iters = _cg(
            lambda v: _hvp(v, phi, p, weight, l2),
            -g,
            jnp.maximum(jnp.minimum(0.5, jnp.sqrt(gnorm)) * gnorm, 0.1 * tol),
            cg_maxiter,
        )
        slope = jnp.vdot(g, d)
        slack = 8 * eps * jnp.maximum(jnp.abs(f), 1.0)  # near the optimum f's changes are rounding: take full steps

        def ls_cond(ls):
            t, f_new, j = ls
            return (f_new > f + 1e-4 * t * slope + slack) & (j < 40)

        def ls_body(ls):
            t, _, j = ls
            return t / 2, fun(W + (t / 2) * d), j + 1

        t, f_new, _ = jax.lax.while_loop(ls_cond, ls_body, (jnp.ones((), phi.dtype), fun(W + d), 0))
        failed = (f_new > f + 1e-4 * t * slope + slack) | ~jnp.isfinite(f_new)
        W_new = jnp.where(failed, W, W + t * d)
        f_new, g_new, p_new, _ = _value_grad(W_new, phi, targets, l2)
        return W_new, f_new, g_new, p_new, weight, k + 1, cg_total + cg_iters, failed

    W0 = jnp.zeros((targets.shape[1], phi.shape[1]), phi.dtype)
    f0, g0, p0, weight = _value_grad(W0, phi, targets, l2)
    zero = jnp.zeros((), jnp.int32)
    state = (W0, f0, g0, p0, weight, zero, zero, jnp.zeros((), bool))
    W, f, g, _, _, k, cg_total, failed = jax.lax.while_loop(cond, body, state)
    return W, f, jnp.linalg.norm(g), k, cg_total, failed


_newton_cg_jit = program(_newton_cg)


def shallow_optimum_cross_entropy(
    phi: Array,
    labels: Array,
    num_classes: int,
    l2: float = 1e-4,
    tol: float = 1e-10,
    maxiter: int = 10000,
    *,
    cg_maxiter: int | None = None,
    on_failure: str = "raise",
) -> tuple[Array, Array, dict]:
    """`(W*, L*, info)` of `min_W (1/n) sum_i CE(W phi_i, label_i) + (l2/2) |W|_F^2`.

    `l2 > 0` makes the problem strongly convex, so the minimiser is unique (without it, separable data have no
    minimiser at all). Solved by truncated Newton (conjugate gradients on Hessian-vector products, Armijo
    backtracking) from `W = 0` until `|grad|_F <= tol`, in float64 where x64 is enabled (a `PrecisionWarning`
    otherwise). `maxiter` caps the Newton steps, `cg_maxiter` (default `max(2 m_y m, 100)`) the CG steps within
    each. `labels` are integers `(n,)` in `[0, num_classes)` or one-hot / probability rows `(n, num_classes)`.

    `L*` is the regularised objective at `W*`. `info`: `status` (one of `STATUSES`), `converged`, `grad_norm` (the
    independent recomputation at the returned `W`), `solver_grad_norm` (the solver's own), `iterations` (Newton
    steps), `cg_iterations` (Hessian-vector products), `line_search_failed`, `cross_entropy` (the unregularised
    mean CE at `W`), `l2`, `tol`, `method`.
    If not converged: `on_failure="raise"` (default) raises `OptimumNotConverged` (with `.info`), `"warn"` warns,
    `"ignore"` only reports. Then `W` is the solver's last iterate and `L*` its objective (NaN when non-finite):
    a caller turns `info["grad_norm"] <= info["tol"]` into a claim, which a NaN never passes.

    Args:
      phi: the features, `(n, m)`.
      labels: integer labels `(n,)` or one-hot / probability rows `(n, num_classes)`.
      num_classes: the number of classes `m_y`.
      l2: the weight of the penalty, `> 0`.
      tol: the gradient norm at which the solve stops.
      maxiter: the most Newton steps.
      cg_maxiter: the most conjugate-gradient steps within one Newton step.
      on_failure: `"raise"`, `"warn"` or `"ignore"`, when the solve does not converge.
    """
    check_phi(phi)
    _checks.check_positive("num_classes", num_classes, integer=True)
    _checks.check_positive("l2", l2)
    _checks.check_positive("tol", tol)
    _checks.check_positive("maxiter", maxiter, integer=True)
    _checks.check_choice("on_failure", on_failure, ("raise", "warn", "ignore"))
    n, m = phi.shape
    if cg_maxiter is None:
        cg_maxiter = max(2 * num_classes * m, 100)
    _checks.check_positive("cg_maxiter", cg_maxiter, integer=True)
    labels = jnp.asarray(labels)
    phi = as_float64(phi, "shallow_optimum_cross_entropy")
    if jnp.issubdtype(labels.dtype, jnp.integer):
        _checks.check_shape("labels", labels, (n,), "integer labels, one per row of phi")
        if _checks.is_concrete(labels) and n and not (int(labels.min()) >= 0 and int(labels.max()) < num_classes):
            raise ValueError(
                f"labels must lie in [0, num_classes={num_classes}); got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        targets = jax.nn.one_hot(labels, num_classes, dtype=phi.dtype)
    else:
        _checks.check_float_array("labels", labels)
        _checks.check_shape("labels", labels, (n, num_classes), "one-hot rows, one per row of phi")
        targets = labels.astype(phi.dtype)

    W, _, solver_gnorm, k, cg_total, failed = _newton_cg_jit(
        phi, targets, float(l2), float(tol), jnp.int32(maxiter), jnp.int32(cg_maxiter)
    )
    # the independent check: objective and gradient at the returned W, from a separate program (closed form)
    f, g = _ce_value_grad(W, phi, targets, float(l2))
    gnorm, solver_gnorm, f = float(jnp.linalg.norm(g)), float(solver_gnorm), float(f)
    finite = all(map(_isfinite, (gnorm, solver_gnorm, f))) and bool(jnp.all(jnp.isfinite(W)))
    if not finite:
        status = "non_finite"
    elif gnorm <= tol:
        status = "converged"
    elif bool(failed):
        status = "line_search_failed"
    elif int(k) >= maxiter:
        status = "max_iterations"
    else:  # the solver stopped, believing |g| <= tol, but the independent check disagrees
        status = "not_verified"
    info = {
        "status": status,
        "converged": status == "converged",
        "grad_norm": gnorm,
        "solver_grad_norm": solver_gnorm,
        "iterations": int(k),
        "cg_iterations": int(cg_total),
        "line_search_failed": bool(failed),
        "cross_entropy": f - 0.5 * float(l2) * float(jnp.sum(W * W)),
        "l2": float(l2),
        "tol": float(tol),
        "method": "newton-cg",
    }
    if not info["converged"] and on_failure != "ignore":
        message = (
            f"shallow_optimum_cross_entropy did not converge ({status}): |grad| = {gnorm:.3g} (tol {tol:g}) "
            f"after {info['iterations']} Newton steps ({info['cg_iterations']} CG steps); raise "
            f"maxiter/cg_maxiter, loosen tol or increase l2"
        )
        if on_failure == "raise":
            raise OptimumNotConverged(message, info)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return W, jnp.asarray(f, W.dtype), info


def _isfinite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
