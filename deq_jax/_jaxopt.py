"""The one adapter to jaxopt, and the only module that imports it (lazily: jaxopt imports scipy, which
`import deq_jax` must not).

- `make`: jaxopt's FixedPointIteration, AndersonAcceleration (with a scale-invariant, dtype-keeping mixing step)
  and Broyden, built for one `update` at a time; the solvers in `deq_jax._solver` drive them in deq_jax's loops.
- `linear_solve`: the Krylov solvers of the implicit backward, jaxopt's wrappers around `jax.scipy.sparse.linalg`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from deq_jax._rule import subtract

Tree = Any


@functools.cache
def _jaxopt():
    with warnings.catch_warnings():
        # jaxopt 0.8.5 is its final release and warns on import; the library depends on it knowingly
        warnings.filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)
        import jaxopt
        from jaxopt import linear_solve
    return jaxopt, linear_solve


@functools.cache
def _anderson_class():
    jaxopt, _ = _jaxopt()

    class RelativeRidgeAnderson(jaxopt.AndersonAcceleration):  # type: ignore[name-defined]  # lazy import
        """jaxopt's Anderson (its state and history) with a mixing step that is scale-invariant and keeps dtypes.

        - The ridge is relative to the residual Gram matrix's mean diagonal: jaxopt adds an absolute `ridge`, which
          dominates once residuals are small and decays the mixing to plain averaging (measured: 359 iterations
          where fixed-point iteration took 213, float64, tol 1e-10; 19 with the relative ridge).
        - The mixing weights are cast to the state's dtype: jaxopt builds them in the default float dtype, which
          turns a float32 (or bfloat16) state into float64 under `jax_enable_x64` and breaks its `lax.cond`.
        """

        def update(self, params, state, *args, **kwargs):
            m = self.history_size
            gram = state.residual_gram
            mix_now = jnp.logical_and(state.iter_num % self.mixing_frequency == 0, state.iter_num >= m)

            def mix(_):
                # argmin_alpha |sum_i alpha_i r_i|^2 + ridge |alpha|^2 subject to sum_i alpha_i = 1
                ridge = self.ridge * jnp.trace(gram) / m + jnp.finfo(gram.dtype).tiny
                w = jnp.linalg.solve(gram + ridge * jnp.eye(m, dtype=gram.dtype), jnp.ones(m, gram.dtype))
                alpha = w / jnp.sum(w)
                combine = lambda h: jnp.tensordot(alpha.astype(h.dtype), h, axes=1)
                return jax.tree_util.tree_map(
                    lambda p, r: combine(p) + jnp.asarray(self.beta, p.dtype) * combine(r),
                    state.params_history,
                    state.residuals_history,
                )

            extrapolated = jax.lax.cond(mix_now, mix, lambda _: params, None)
            next_params, aux = self._value_with_aux(extrapolated, *args, **kwargs)
            residual = subtract(next_params, extrapolated)
            pos = state.iter_num % m
            params_history = jax.tree_util.tree_map(lambda h, v: h.at[pos].set(v), state.params_history, extrapolated)
            residuals_history = jax.tree_util.tree_map(lambda h, v: h.at[pos].set(v), state.residuals_history, residual)
            row = jax.vmap(
                lambda hist: sum(
                    jnp.vdot(a, b).astype(gram.dtype)
                    for a, b in zip(jax.tree_util.tree_leaves(hist), jax.tree_util.tree_leaves(residual), strict=False)
                )
            )(residuals_history)
            gram = gram.at[pos, :].set(row).at[:, pos].set(row)
            next_state = state._replace(
                iter_num=state.iter_num + 1,
                error=jnp.sqrt(gram[pos, pos]).astype(jnp.asarray(state.error).dtype),
                params_history=params_history,
                residuals_history=residuals_history,
                residual_gram=gram,
                aux=aux,
                num_fun_eval=state.num_fun_eval + 1,
            )
            return jaxopt.OptStep(params=next_params, state=next_state)

    return RelativeRidgeAnderson


KRYLOV = ("gmres", "bicgstab", "normal_cg")


def linear_solve(name: str, matvec: Callable, b: jax.Array, tol: Any, maxiter: Any, init: Any = None) -> jax.Array:
    """`A u = b` for a flat vector `b` with jaxopt's Krylov solvers (relative tolerance `tol`, no absolute floor),
    started from `init` (None: zero)."""
    _, ls = _jaxopt()
    kwargs = {} if maxiter is None else {"maxiter": maxiter}
    solver = {"gmres": ls.solve_gmres, "bicgstab": ls.solve_bicgstab, "normal_cg": ls.solve_normal_cg}[name]
    return solver(matvec, b, init=init, tol=tol, atol=0.0, **kwargs)


def make(kind: str, fn: Callable, **options: Any) -> Any:
    """jaxopt's solver object `kind` ("fixed_point", "anderson" or "broyden") for one step at a time: deq_jax's
    loops drive it with `init_state` / `update` and stop it by deq_jax's rule, never by jaxopt's absolute `tol`."""
    jaxopt, _ = _jaxopt()
    common = dict(maxiter=1, tol=0.0, implicit_diff=False, unroll=True, jit=True)
    if kind == "fixed_point":
        return jaxopt.FixedPointIteration(fixed_point_fun=fn, **common)
    if kind == "anderson":
        return _anderson_class()(fixed_point_fun=fn, **options, **common)
    return jaxopt.Broyden(fun=fn, **options, **common)
