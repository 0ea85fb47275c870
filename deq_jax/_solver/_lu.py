"""LU factors kept for right-hand-side solves `X K = R` and `X K^T = R` (samples as rows), shared by `Direct`,
`Refine` and the implicit backward that reuses the forward's factors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Factors(NamedTuple):
    """LU factors of `K^T` with partial pivoting, `K^T[perm] = L R` (`lu` packs L, unit lower, and R).

    `K^T` rather than `K` because LAPACK works column-major: a row-major `K^T` is a column-major `K`, and the solves
    read `lu.T`, the column-major view of the row-major `lu`, so neither factorising nor solving transposes an
    `m x m` array (measured: such transposing copies cost more than the rest of a refinement step)."""

    lu: Array
    perm: Array


def factor(K: Array) -> Factors:
    """`Factors` of `K` (`jax.lax.linalg.lu` of `K^T`); the permutation, not the pivots, is kept, so a solve needs
    no pivot-to-permutation loop."""
    lu, _, perm = jax.lax.linalg.lu(K.T)
    return Factors(lu, perm)


def right_solve(factors: Factors, R: Array, transpose: bool = False) -> Array:
    """`X` with `X K = R` (or `X K^T = R` for `transpose=True`); `R` has shape `(k, m)` or `(m,)`.

    With `K^T = P^T L Ru` and `G = lu^T` (lower part `Ru^T`, unit upper part `L^T`): `X K = R` is
    `X Ru^T L^T = R P^T`; `X K^T = R` is `(X P^T) L Ru = R`.
    """
    if R.ndim == 1:
        return right_solve(factors, R[None, :], transpose)[0]
    G, perm = factors.lu.T, factors.perm
    tri = jax.lax.linalg.triangular_solve
    if transpose:
        Y = tri(G, R, left_side=False, lower=True, transpose_a=True)
        Y = tri(G, Y, left_side=False, lower=False, transpose_a=True, unit_diagonal=True)
        return jnp.zeros_like(Y).at[..., perm].set(Y)
    Y = tri(G, R[..., perm], left_side=False, lower=False, unit_diagonal=True)
    return tri(G, Y, left_side=False, lower=True)


def when(pred: Array, fn: Callable[[Any], Any], operand: Any) -> Any:
    """`fn(operand)` if `pred` else `operand`, as a loop of at most one trip. Under `vmap` a `lax.cond` with a
    batched predicate becomes a select that runs `fn` (here an LU) for every member every time; a loop runs it only
    when some member needs it."""

    def body(carry: tuple[Array, Any]) -> tuple[Array, Any]:
        _, x = carry
        return jnp.zeros_like(pred), fn(x)

    return jax.lax.while_loop(lambda carry: carry[0], body, (pred, operand))[1]
