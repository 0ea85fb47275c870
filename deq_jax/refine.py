"""LU-preconditioned iterative refinement: solve `X M = R` (or `X M^T = R`) with the LU factors of an earlier `M_old`.

In DELM training `M = U_t = I - gamma sigma(A_t)` moves a little at every step. Factorising it costs `2/3 m^3`;
one refinement sweep

    X <- X + (R - X M_t) M_old^{-1}

costs two triangular solves and one product with `M_t` (`O(k m^2)` for `k` right-hand sides). The error contracts
by `E <- E (M_old - M_t) M_old^{-1}` per sweep, fast while `M_t` stays near `M_old`; a warm start (the previous step's
solution) makes the first residual small. The result is exact to tolerance whatever the preconditioner: every sweep
measures the true residual `R - X M_t`, and the stopping rule is the one every solve uses,

    |f(X) - X| <= tol |f(X)| + atol,   f(X) = X + (R - X M_t)   (the fixed-point map, e.g. B + gamma W sigma(A)),

which depends on the returned X only, never on the start. When the sweeps needed grow, the factors have gone stale:
`deq_jax.warm` then factorises the current `U` for the next step.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from deq_jax import _checks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Refine:
    """The DELM solver "refine": LU factors of an earlier `U` kept across training steps, refined to tolerance.

    - `max_sweeps`: sweeps per solve before falling back to a fresh factorisation of the current `U` (after which one
      or two sweeps finish); a solve still above tolerance after that reports `converged=False`.
    - `refactor_after`: factorise the current `U` at the end of a step (for the next) when one of its solves needed
      more sweeps than this. A warm-started solve needs one sweep while `U` is near the factorised one; a sweep
      costs `O(k m^2)` against the factorisation's `2/3 m^3`, so two sweeps are still cheaper than refactorising.
    Without carried state (`model.apply`), "refine" is the direct solve.
    """

    max_sweeps: int = 6
    refactor_after: int = 2

    def __post_init__(self):
        _checks.check_positive("Refine.max_sweeps", self.max_sweeps, integer=True)
        _checks.check_positive("Refine.refactor_after", self.refactor_after, integer=True)


class Factors(NamedTuple):
    """LU factors of `M_old^T` with partial pivoting, `M_old^T[perm] = L Ru` (`lu` packs L, unit lower, and Ru), so
    `M_old = Ru^T L^T P`.

    `M^T` rather than `M` because LAPACK works column-major: a row-major `M^T` is a column-major `M`, and the
    solves below read `lu.T`, the column-major view of the row-major `lu`, so that neither factorising nor solving
    transposes an `m x m` array (measured: such transposing copies cost more than the rest of a refinement step)."""

    lu: Array
    perm: Array


class Refined(NamedTuple):
    """A refined solution and what it took: sweeps, `|residual|` and `|f(X)|` at the returned X."""

    value: Array
    sweeps: Array
    residual: Array
    scale: Array


def factor(M: Array) -> Factors:
    """`Factors` of `M` (`jax.lax.linalg.lu` of `M^T`); the permutation, not the pivots, is kept, so a solve needs no
    pivot-to-permutation loop."""
    lu, _, perm = jax.lax.linalg.lu(M.T)
    return Factors(lu, perm)


def right_solve(factors: Factors, R: Array, transpose: bool = False) -> Array:
    """`X` with `X M_old = R` (or `X M_old^T = R` for `transpose=True`); `R` has shape `(k, m)`.

    With `M^T = P^T L Ru` and `K = lu^T` (lower part `Ru^T`, unit upper part `L^T`): `X M = R` is
    `X Ru^T L^T = R P^T`; `X M^T = R` is `(X P^T) L Ru = R`.
    """
    K, perm = factors.lu.T, factors.perm
    tri = jax.lax.linalg.triangular_solve
    if transpose:
        Y = tri(K, R, left_side=False, lower=True, transpose_a=True)
        Y = tri(K, Y, left_side=False, lower=False, transpose_a=True, unit_diagonal=True)
        return jnp.zeros_like(Y).at[..., perm].set(Y)
    Y = tri(K, R[..., perm], left_side=False, lower=False, unit_diagonal=True)
    return tri(K, Y, left_side=False, lower=True)


def _norm(x: Array) -> Array:
    return jnp.sqrt(jnp.sum(x * x))


def converged(residual: Array, scale: Array, tol: float, atol: float) -> Array:
    """The start-independent rule `|f(X) - X| <= tol |f(X)| + atol`; False for NaN and for infinities (a diverged
    solve has `inf <= tol * inf`)."""
    return jnp.isfinite(residual) & jnp.isfinite(scale) & (residual <= tol * scale + atol)


def refine(times_M: Callable[[Array], Array], R: Array, x0: Optional[Array], factors: Factors, *, transpose: bool,
           tol: float, atol: float, max_sweeps: int) -> Refined:
    """Sweeps `X <- X + (R - X M) M_old^{-1}` from `x0` (None: zero, which saves one product) until the rule above
    holds or `max_sweeps` are done.

    `times_M(X)` is `X M` (or `X M^T`), the current matrix; `factors` are those of `M_old` (of `M_old^T`'s
    transpose for `transpose=True`, i.e. the same factors serve both). Not differentiable (a solve inside a step
    that computes its gradients explicitly); wrap inputs in `stop_gradient` where that matters.
    """
    def measure(x):
        r = R - times_M(x)
        return r, _norm(r), _norm(x + r)

    if x0 is None:
        x0, r0 = jnp.zeros_like(R), R
        res0 = scale0 = _norm(R)
    else:
        r0, res0, scale0 = measure(x0)

    def cond(carry):
        _, _, res, scale, k = carry
        return jnp.logical_and(k < max_sweeps, ~converged(res, scale, tol, atol))

    def body(carry):
        x, r, _, _, k = carry
        x = x + right_solve(factors, r, transpose)
        r, res, scale = measure(x)
        return x, r, res, scale, k + 1

    x, _, res, scale, k = jax.lax.while_loop(cond, body, (x0, r0, res0, scale0, jnp.zeros((), jnp.int32)))
    return Refined(x, k, res, scale)
