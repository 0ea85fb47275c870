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
        - With `batch_axis`, every sample has its own Gram matrix and mixing weights (jaxopt mixes the whole state
          with one set): samples never influence each other, and one NaN sample leaves the others' iterates exact.
        """

        batch_axis = None  # set per instance by `make`: the axis of every leaf that indexes independent samples

        def init_state(self, init_params, *args, **kwargs):
            state = super().init_state(init_params, *args, **kwargs)
            if self.batch_axis is None:
                return state
            n = jax.tree_util.tree_leaves(init_params)[0].shape[self.batch_axis]
            return state._replace(residual_gram=jnp.zeros((n, *state.residual_gram.shape), state.residual_gram.dtype))

        def _per_sample(self, h):
            """A history leaf `(m, ...)` as `(m, n, rest)`: its samples on axis 1 (n = 1 without a batch axis)."""
            if self.batch_axis is None:
                return h.reshape(h.shape[0], 1, -1)
            h = jnp.moveaxis(h, self.batch_axis + 1, 1)
            return h.reshape(h.shape[0], h.shape[1], -1)

        def update(self, params, state, *args, **kwargs):
            m = self.history_size
            gram = state.residual_gram if self.batch_axis is not None else state.residual_gram[None]  # (n, m, m)
            mix_now = jnp.logical_and(state.iter_num % self.mixing_frequency == 0, state.iter_num >= m)

            def mix(_):
                # per sample: argmin_alpha |sum_i alpha_i r_i|^2 + ridge |alpha|^2 subject to sum_i alpha_i = 1
                trace = jnp.trace(gram, axis1=1, axis2=2)
                ridge = self.ridge * trace / m + jnp.finfo(gram.dtype).tiny
                eye = jnp.eye(m, dtype=gram.dtype)
                w = jnp.linalg.solve(gram + ridge[:, None, None] * eye, jnp.ones(gram.shape[:2], gram.dtype)[..., None])
                alpha = w[..., 0] / jnp.sum(w[..., 0], axis=1, keepdims=True)  # (n, m)

                def combine(h):
                    mixed = jnp.einsum("nm,mnd->nd", alpha.astype(h.dtype), self._per_sample(h))
                    if self.batch_axis is None:
                        return mixed.reshape(h.shape[1:])
                    shape = list(h.shape[1:])
                    moved = [shape[self.batch_axis], *shape[: self.batch_axis], *shape[self.batch_axis + 1 :]]
                    return jnp.moveaxis(mixed.reshape(moved), 0, self.batch_axis)

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
            # row[n, j] = <r_j, r_new> per sample, summed over the leaves
            row = sum(
                jnp.einsum("mnd,nd->nm", self._per_sample(h), self._per_sample(v[None])[0]).astype(gram.dtype)
                for h, v in zip(
                    jax.tree_util.tree_leaves(residuals_history), jax.tree_util.tree_leaves(residual), strict=False
                )
            )
            gram = gram.at[:, pos, :].set(row).at[:, :, pos].set(row)
            next_state = state._replace(
                iter_num=state.iter_num + 1,
                error=jnp.sqrt(jnp.max(gram[:, pos, pos])).astype(jnp.asarray(state.error).dtype),
                params_history=params_history,
                residuals_history=residuals_history,
                residual_gram=gram if self.batch_axis is not None else gram[0],
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
        batch_axis = options.pop("batch_axis", None)
        solver = _anderson_class()(fixed_point_fun=fn, **options, **common)
        object.__setattr__(solver, "batch_axis", batch_axis)  # not a dataclass field: jaxopt's solvers are frozen
        return solver
    return jaxopt.Broyden(fun=fn, **options, **common)
