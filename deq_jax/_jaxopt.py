"""The only module that imports jaxopt (lazily: jaxopt imports scipy, which `import deq_jax` must not).

It builds jaxopt's solver objects and drives them with `init_state` / `update` inside deq_jax's own loops, so that
the stopping rule is deq_jax's (see `deq_jax.solve`), not jaxopt's absolute `tol`:

- `run` : a `lax.while_loop` that stops when the rule holds, when the iterate diverges, or at `maxiter`;
- `run_unrolled` : a `lax.scan` of exactly `maxiter` differentiable steps (the `Unrolled` backward): the solver's
  steps while the rule fails, then averaged map steps `z <- (z + f(z)) / 2`, so that the number of differentiated
  steps never depends on how close the start was.

It also holds the Krylov solvers of the implicit backward (`linear_solve`), jaxopt's wrappers around
`jax.scipy.sparse.linalg`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp

Tree = Any
# check(r, fz, ref) -> (done, diverged): the rule on the residual r = f(z) - z and f(z) at the evaluated point
Check = Callable[[Tree, Tree, jax.Array], tuple[jax.Array, jax.Array]]


@functools.lru_cache(maxsize=None)
def _jaxopt():
    with warnings.catch_warnings():
        # jaxopt 0.8.5 is its final release and warns on import; the library depends on it knowingly
        warnings.filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)
        import jaxopt
        from jaxopt import linear_solve
    return jaxopt, linear_solve


def _sub(a: Tree, b: Tree) -> Tree:
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def max_abs(tree: Tree) -> jax.Array:
    """Largest absolute entry over a pytree (0 for an empty one), in float32 or wider."""
    leaves = [jnp.max(jnp.abs(leaf)).astype(jnp.promote_types(leaf.dtype, jnp.float32))
              for leaf in jax.tree_util.tree_leaves(tree) if leaf.size]
    return functools.reduce(jnp.maximum, leaves) if leaves else jnp.zeros((), jnp.float32)


@functools.lru_cache(maxsize=None)
def _anderson_class():
    jaxopt, _ = _jaxopt()

    class RelativeRidgeAnderson(jaxopt.AndersonAcceleration):
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
                    state.params_history, state.residuals_history)

            extrapolated = jax.lax.cond(mix_now, mix, lambda _: params, None)
            next_params, aux = self._value_with_aux(extrapolated, *args, **kwargs)
            residual = _sub(next_params, extrapolated)
            pos = state.iter_num % m
            params_history = jax.tree_util.tree_map(lambda h, v: h.at[pos].set(v), state.params_history,
                                                    extrapolated)
            residuals_history = jax.tree_util.tree_map(lambda h, v: h.at[pos].set(v), state.residuals_history,
                                                       residual)
            row = jax.vmap(lambda hist: sum(jnp.vdot(a, b).astype(gram.dtype) for a, b in zip(
                jax.tree_util.tree_leaves(hist), jax.tree_util.tree_leaves(residual))))(residuals_history)
            gram = gram.at[pos, :].set(row).at[:, pos].set(row)
            next_state = state._replace(
                iter_num=state.iter_num + 1, error=jnp.sqrt(gram[pos, pos]).astype(jnp.asarray(state.error).dtype),
                params_history=params_history, residuals_history=residuals_history, residual_gram=gram, aux=aux,
                num_fun_eval=state.num_fun_eval + 1)
            return jaxopt.OptStep(params=next_params, state=next_state)

    return RelativeRidgeAnderson


class _Loop(NamedTuple):
    k: jax.Array  # solver steps taken
    z: Tree  # the iterate (flat for Broyden)
    state: Any  # the jaxopt solver's state
    done: jax.Array  # the stopping rule held at the last evaluated point
    diverged: jax.Array
    ref: jax.Array  # max(|z0|_inf, |f(z0)|_inf): the scale divergence is measured against


def _stepper(kind: str, options: dict, fz: Callable, z0: Tree, unroll: bool):
    """(z_init, init_state, step, first_check_tree): step(z, state) -> (z_next, state, r, f_at_evaluated_point).

    Broyden runs on the flattened state (`ravel_pytree` promotes mixed float32/float64 leaves to one dtype, which
    jaxopt's Broyden needs; 0-d and rank >= 3 leaves become plain vector entries); the residual trees it reports
    are unflattened again so the rule sees the state's own structure.
    """
    jaxopt, _ = _jaxopt()
    common = dict(maxiter=1, tol=0.0, implicit_diff=False, unroll=unroll, jit=True)
    if kind == "fixed_point":
        solver = jaxopt.FixedPointIteration(fixed_point_fun=fz, **common)

        def step(z, state):
            out = solver.update(z, state)
            return out.params, out.state, _sub(out.params, z), out.params

        return z0, solver.init_state(z0), step, None
    if kind == "anderson":
        solver = _anderson_class()(fixed_point_fun=fz, **options, **common)

        def step(z, state):
            out = solver.update(z, state)
            pos = (out.state.iter_num - 1) % solver.history_size
            r = jax.tree_util.tree_map(lambda h: h[pos], out.state.residuals_history)
            return out.params, out.state, r, out.params

        return z0, solver.init_state(z0), step, None
    flat0, unravel = jax.flatten_util.ravel_pytree(z0)
    g = lambda v: jax.flatten_util.ravel_pytree(_sub(fz(unravel(v)), unravel(v)))[0]
    solver = jaxopt.Broyden(fun=g, **options, **common)  # options carry an explicit history_size

    def step(v, state):
        out = solver.update(v, state)
        r = out.state.value
        return out.params, out.state, unravel(r), unravel(r + out.params)

    state = solver.init_state(flat0)
    return flat0, state, step, (unravel(state.value), unravel(state.value + flat0))


def _finish(kind: str, z0: Tree, z: Tree) -> Tree:
    return jax.flatten_util.ravel_pytree(z0)[1](z) if kind == "broyden" else z


def _start(z0, z_init, state, first, check, zero_k):
    ref = max_abs(z0)
    if first is None:  # the rule is first checked on f(z0), which the first step computes
        return _Loop(zero_k, z_init, state, jnp.asarray(False), jnp.asarray(False), ref)
    r0, f0 = first  # Broyden evaluates g(z0) in its init: a start that already satisfies the rule takes no step
    ref = jnp.maximum(ref, max_abs(f0))
    done, diverged = check(r0, f0, ref)
    return _Loop(zero_k, z_init, state, done, diverged, ref)


def _like(new, old):
    return new.astype(old.dtype) if hasattr(new, "astype") and hasattr(old, "dtype") else new


def _solver_step(step, check):
    def body(c: _Loop) -> _Loop:
        z, state, r, fz = step(c.z, c.state)
        ref = jnp.where(c.k == 0, jnp.maximum(c.ref, max_abs(fz)), c.ref)
        done, diverged = check(r, fz, ref)
        # the carry keeps its dtypes: jaxopt's update can return float64 statistics for a float32 state under x64
        z, state = jax.tree_util.tree_map(_like, (z, state), (c.z, c.state))
        return _Loop(c.k + 1, z, state, done, diverged, ref)

    return body


def run(kind: str, options: dict, fz: Callable, z0: Tree, check: Check, maxiter: int):
    """Iterate until the rule holds, the iterate diverges, or `maxiter` steps: `(z, iterations, ref)`."""
    z_init, state, step, first = _stepper(kind, options, fz, z0, unroll=False)
    c = _start(z0, z_init, state, first, check, jnp.zeros((), jnp.int32))
    c = jax.lax.while_loop(lambda c: (c.k < maxiter) & ~c.done & ~c.diverged, _solver_step(step, check), c)
    return _finish(kind, z0, c.z), c.k, c.ref


def run_unrolled(kind: str, options: dict, fz: Callable, z0: Tree, check: Check, maxiter: int):
    """Exactly `maxiter` differentiable steps: the solver's until the rule holds, then `z <- (z + f(z)) / 2`.

    The averaged tail has the same fixed point and, at `z*`, the Jacobian `(I + J) / 2`, whose spectrum lies inside
    the unit disc for every non-expansive map without the eigenvalue 1: the derivative of the unrolled loop then
    converges to the implicit one even where plain iteration's derivative oscillates (e.g. `J = -1`).
    """
    z_init, state, step, first = _stepper(kind, options, fz, z0, unroll=True)
    c = _start(z0, z_init, state, first, check, jnp.zeros((), jnp.int32))
    flat = kind == "broyden"
    unravel = jax.flatten_util.ravel_pytree(z0)[1] if flat else None
    solver_body = _solver_step(step, check)

    def tail(c: _Loop) -> _Loop:
        z = unravel(c.z) if flat else c.z
        z = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, z, fz(z))
        return c._replace(z=jax.flatten_util.ravel_pytree(z)[0] if flat else z)

    def body(c, _):
        return jax.lax.cond(c.done | c.diverged, tail, solver_body, c), None

    c, _ = jax.lax.scan(body, c, None, length=maxiter)
    return _finish(kind, z0, c.z), c.k, c.ref


def linear_solve(name: str, matvec: Callable, b: jax.Array, tol: float, maxiter) -> jax.Array:
    """`A u = b` for a flat vector `b` with jaxopt's Krylov solvers (relative tolerance `tol`, no absolute floor)."""
    _, ls = _jaxopt()
    kwargs = {} if maxiter is None else {"maxiter": maxiter}
    solver = {"gmres": ls.solve_gmres, "bicgstab": ls.solve_bicgstab, "normal_cg": ls.solve_normal_cg}[name]
    return solver(matvec, b, tol=tol, atol=0.0, **kwargs)
