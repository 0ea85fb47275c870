"""The front door: `solve(f, z0, params, x, *, solver, backward, ...) -> Solution`.

The forward solver finds `z* = f(z*, params, x)`; the backward strategy (`deq_jax._adjoint`) defines how gradients
with respect to `params` and `x` flow through `z*`.

Convergence rule (one rule, `deq_jax._rule`, for stopping and for `stats.converged`): with 2-norms over the whole
pytree state,

    |f(z) - z| <= tol * |f(z)| + atol        and z, f(z) finite and not diverged,

so "converged" means "within `tol` (relative) of being a fixed point", whatever the start: a far start, a zero start
and a warm start (e.g. the previous training step's equilibrium) are judged by the same rule on the value returned.
With `batch_axis=k`, the norms are taken per sample along axis `k` of every leaf, and every sample iterates until it
alone satisfies the rule or diverges, then stops moving: one sample that diverges (or is NaN) never changes another
sample's result (solvers that couple the samples by construction, `Broyden` and the dense routes, are the exception).
`Solution.stats` reports the worst sample, `Solution.samples` every sample. With `atol=0` (the default) an equilibrium
at exactly `z* = 0` is met only when the residual vanishes: pass `atol` for such problems.

Divergence: an iterate is `diverged` when it (or its image) is not finite, or when its largest entry exceeds
`eps^(-3/4)` times the scale of the start, `max(|z0|_inf, |f(z0)|_inf)` (1.5e5 in float32, 5.8e11 in float64; `eps`
of the state's dtype): such runaways can satisfy any residual test, so they never count as converged.

Warm starts and kept state enter through this one door: `z0` starts the forward solve, `adjoint_start` starts the
implicit backward solve (its cotangent is the backward solution, to carry on), and `solver_state` is what a
previous solve left in `Solution.state` (e.g. `Refine`'s LU factors).

State types: any pytree (arrays, tuples, dicts, NamedTuples) of floating arrays of any rank, 0-d included, mixed
float32/float64 included, for every solver and backward mode. Cast rule for `z0`: Python numbers and integer arrays
become JAX's default floating dtype (float32, or float64 with x64); booleans and complex states are refused.
`params`/`x`: Python numbers become arrays; integer leaves are passed through as data (no gradient, as in JAX).

Precision: on GPUs JAX's default float32 matmul precision is TF32, with which Anderson acceleration was measured to
stall at maxiter without any sign of it. Every solve traces its map, its mixing and its backward linear solve under
`jax.default_matmul_precision(precision)`, `"highest"` by default (`None` leaves JAX's setting).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp

from deq_jax import _checks
from deq_jax._adjoint import Backward, Implicit, OneStep, Representation, as_backward, implicit, precision_scope
from deq_jax._rule import Rule, growth_limit
from deq_jax._solution import Solution
from deq_jax._solver._base import AbstractSolver, Problem, Run, solver_class, solver_names
from deq_jax._solver.broyden import Broyden

Map = Callable[[Any, Any, Any], Any]
PRECISIONS = ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16")


def as_solver(solver: str | AbstractSolver) -> AbstractSolver:
    """A solver from its name (`"anderson"`, `"fixed_point"`, `"relaxed"`, `"broyden"`, `"direct"`, `"refine"`, or
    any registered solver's `name`) or an instance."""
    if isinstance(solver, AbstractSolver):
        return solver
    names = solver_names()
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a name ({', '.join(map(repr, names))}) or a solver instance; got {solver!r}")
    _checks.check_choice("solver", solver, names)
    return solver_class(solver)()


def _with_precision(f: Map, precision: str | None) -> Map:
    """`f` traced under the given matmul precision wherever it is traced: in the forward loop, and where the
    backward linearises it (transposed matmuls inherit the precision of the traced ones)."""
    if precision is None:
        return f

    def f_at_precision(z: Any, params: Any, x: Any) -> Any:
        with jax.default_matmul_precision(precision):
            return f(z, params, x)

    return f_at_precision


def _check_map(f: Map, z0: Any, params: Any, x: Any, has_aux: bool) -> None:
    """`f(z0, params, x)` must return a state like `z0` (plus aux with has_aux): checked on shapes, not values."""
    out = jax.eval_shape(f, z0, params, x)
    if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError(
                f"with has_aux=True, f must return a pair (z, aux); got {jax.tree_util.tree_structure(out)}"
            )
        out = out[0]
    problem = None
    if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(z0):  # type: ignore[operator]
        problem = f"structure {jax.tree_util.tree_structure(out)} where z0 has {jax.tree_util.tree_structure(z0)}"
        if not has_aux and isinstance(out, tuple) and len(out) == 2:
            problem += " (a map returning (z, aux) needs has_aux=True)"
    else:
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(out)[0], jax.tree_util.tree_leaves(z0), strict=False
        ):
            if a.shape != b.shape or a.dtype != b.dtype:
                problem = (
                    f"leaf {jax.tree_util.keystr(path) or '(root)'} of shape {a.shape} and dtype {a.dtype} "
                    f"where z0 has shape {b.shape} and dtype {b.dtype}"
                )
                break
    if problem:
        raise ValueError(
            f"f(z0, params, x) must return a state of z0's structure, shapes and dtypes (the cast rule "
            f"gives z0 the default float dtype for Python numbers and integers); it returns {problem}"
        )


def _builder(f: Map, rep: Representation, z0: Any, uses_matrix: bool, batch_axis: int | None) -> Callable[..., Problem]:
    """`build(fn, params, x) -> Problem` on the solver's representation; for solvers that use the matrix, the
    equation `z K = c`: `K = I - M^T` from the map's `affine(params, x) -> (M, c)` (`f(z) = z M^T + c`), or from
    the dense Jacobian at zero on the flattened state."""

    def build(fn: Map, params: Any, x: Any) -> Problem:
        on_rep = lambda z: rep.to(fn(rep.back(z), params, x))
        samples = None if rep.flat else batch_axis
        if not uses_matrix:
            return Problem(on_rep, batch_axis=samples)

        def affine() -> tuple[jax.Array, jax.Array]:
            if rep.flat:
                zero = jnp.zeros_like(rep.to(z0))
                M, c = jax.jacfwd(on_rep)(zero), on_rep(zero)
            else:
                M, c = f.affine(params, x)  # type: ignore[attr-defined]
            return jnp.eye(M.shape[0], dtype=M.dtype) - M.T, c

        return Problem(on_rep, affine, batch_axis=samples)

    return build


def solve(
    f: Map,
    z0: Any,
    params: Any,
    x: Any,
    *,
    solver: str | AbstractSolver = "anderson",
    backward: str | Backward = "implicit",
    tol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int = 100,
    precision: str | None = "highest",
    has_aux: bool = False,
    batch_axis: int | None = None,
    solver_state: Any = None,
    adjoint_start: Any = None,
) -> Solution:
    """Find `z* = f(z*, params, x)` from `z0` and return it with its result code and statistics (the module
    docstring states the convergence rule, divergence, state types and the cast rule).

    Args:
      f: the equilibrium map `f(z, params, x)`, a pure function; with `has_aux=True` it returns `(z, aux)`. Maps
        affine in `z` may expose `affine(params, x) -> (M, c)` with `f(z) = z @ M.T + c` (for `Direct`/`Refine`).
      z0: initial state: a pytree of floating arrays (Python numbers and integer arrays are cast).
      params: parameters (pytree), differentiable.
      x: input (pytree), differentiable.
      solver: a solver instance (`Anderson(history_size=8)`, `Refine()`, ...) or its name (`"anderson"`,
        `"fixed_point"`, `"relaxed"`, `"broyden"`, `"direct"`, `"refine"`).
      backward: `Implicit(...)`, `OneStep()`, `Unrolled()`, or `"implicit"`, `"one_step"`, `"unrolled"`.
      tol, atol: the convergence rule `|f(z) - z| <= tol * |f(z)| + atol`, for stopping and `stats.converged`.
      maxiter: iteration cap of iterative solvers (the exact number of differentiated steps for `Unrolled`).
      precision: matmul precision inside the solve (`"highest"`, `"float32"`, `"tensorfloat32"`, `"bfloat16"`,
        `"default"`), or None to leave JAX's current setting.
      has_aux: `f` returns `(z, aux)`; `Solution.aux` is the aux of `f` at the returned value.
      batch_axis: an axis of every state leaf that indexes independent samples: every sample then iterates until
        it alone meets the rule (or diverges); `stats` reports the worst sample, `samples` each one.
      solver_state: what a previous solve returned in `Solution.state` (e.g. `Refine`'s LU factors), or None.
      adjoint_start: the start of the implicit backward solve (a pytree like `z0`; None: zero). Its cotangent is
        the backward solution `u`: differentiate with respect to it to carry `u` on (see `deq_jax.make_step`).

    Returns:
      `Solution(value, result, stats, aux, state, samples)`. Works under `jit`, `vmap`, `grad`, `jvp` and their
      compositions (`jax.hessian`, `jax.grad(jax.grad(.))`) for every solver and backward strategy (`Implicit` by
      its own JVP rule, the others by autodiff).

    Example:
      >>> f = DELMMap(gamma=0.9)
      >>> sol = solve(f, jnp.zeros_like(phi), {"A": A}, phi, solver=Anderson(), tol=1e-6, batch_axis=0)
      >>> sol.value, sol.stats.converged, Result(int(sol.result)).message
    """
    solver = as_solver(solver)
    backward = as_backward(backward)
    _checks.check_positive("tol", tol)
    _checks.check_nonnegative("atol", atol)
    _checks.check_positive("maxiter", maxiter, integer=True)
    if not callable(f):
        raise TypeError(f"f must be a callable f(z, params, x); got {f!r}")
    if precision is not None:
        _checks.check_choice("precision", precision, PRECISIONS)
    z0 = _checks.as_state("z0", z0)
    params = _checks.as_arguments("params", params)
    x = _checks.as_arguments("x", x)
    batch_axis = _checks.check_batch_axis(batch_axis, z0)
    _checks.check_tolerance("tol", tol, z0)  # the state's dtype bounds what the rule can measure
    if isinstance(backward, Implicit) and backward.tol is not None:
        _checks.check_tolerance("Implicit.tol", backward.tol, z0)
    if solver.uses_matrix:
        _checks.check_factorisable(
            f"solver {solver.name!r}", z0, "Use an iterative solver ('anderson', 'fixed_point', 'broyden') or cast z0"
        )
    if isinstance(solver, Broyden) and solver.history_size is None:
        solver = dataclasses.replace(solver, history_size=maxiter)

    map_with_affine, f = f, _with_precision(f, precision)
    _check_map(f, z0, params, x, has_aux)
    fz = (lambda z, p, x: f(z, p, x)[0]) if has_aux else f
    rule = Rule(tol, atol, batch_axis, growth_limit(z0))
    size = sum(leaf.size for leaf in jax.tree_util.tree_leaves(z0))
    is_array = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(z0))  # one array, not a pytree
    dense = solver.uses_matrix and not (hasattr(map_with_affine, "affine") and is_array)
    if isinstance(backward, Implicit) and backward.linear_solver == "lu" and size > backward.max_dense:
        raise ValueError(
            f"Implicit(linear_solver='lu') materialises a {size} x {size} Jacobian, above "
            f"Implicit.max_dense={backward.max_dense}; use 'gmres' or raise max_dense"
        )
    if dense and size > getattr(solver, "max_dense", 16384):
        raise ValueError(
            f"solver {solver.name!r} on a map without an `affine(params, x)` method materialises a "
            f"{size} x {size} Jacobian, above its max_dense; give the map an `affine` method or use an "
            f"iterative solver"
        )
    rep = Representation(solver.flat or dense, jax.flatten_util.ravel_pytree(z0)[1])
    build = _builder(map_with_affine, rep, z0, solver.uses_matrix, batch_axis)
    loop_rule = dataclasses.replace(rule, view=rep.back, to=rep.to) if rep.flat else rule

    with precision_scope(precision):
        if isinstance(backward, Implicit):
            tol_b = tol if backward.tol is None else backward.tol
            u0 = jax.tree_util.tree_map(jnp.zeros_like, z0) if adjoint_start is None else adjoint_start
            u0 = _checks.as_state("adjoint_start", u0)
            run = implicit(
                backward, solver, build, rep, fz, loop_rule, maxiter, tol_b, precision, z0, params, x, solver_state, u0
            )
        elif isinstance(backward, OneStep):
            p, xx = jax.lax.stop_gradient((params, x))
            run = solver.run(build(fz, p, xx), rep.to(z0), solver_state, loop_rule, maxiter)
            return _one_step(f, has_aux, rule, rep, run, params, x)
        else:
            run = solver.run_unrolled(build(fz, params, x), rep.to(z0), loop_rule, maxiter)
        return _finish(f, has_aux, rule, rep, run, params, x)


def _stop(run: Run) -> Run:
    """Everything but the value leaves the solve without a gradient (counts, scales, carried state)."""
    return run._replace(
        **{
            k: jax.lax.stop_gradient(getattr(run, k))
            for k in ("iterations", "ref", "state", "factorisations", "measured")
        }
    )


def _finish(f: Map, has_aux: bool, rule: Rule, rep: Representation, run: Run, params: Any, x: Any) -> Solution:
    run = _stop(run)
    z = rep.back(run.value)
    if has_aux:  # the aux at the returned value, differentiable
        fz, aux = f(z, params, x)
    elif run.measured is not None:  # the solver's loop measured at the returned value already
        fz, aux = rep.back(run.measured[1]), None
    else:  # the one extra map application: the statistics' independent residual
        fz, aux = f(*jax.lax.stop_gradient((z, params, x))), None
    stats, result, samples = rule.stats(z, fz, run.iterations, run.ref, run.factorisations, run.steps)
    return Solution(z, result, stats, aux, run.state, samples)


def _one_step(f: Map, has_aux: bool, rule: Rule, rep: Representation, run: Run, params: Any, x: Any) -> Solution:
    """`f(stop_gradient(z*))`: its value is returned, and it is also the statistics' evaluation at `z*`."""
    run = _stop(run)
    z_star = jax.lax.stop_gradient(rep.back(run.value))
    out = f(z_star, params, x)
    value, aux = out if has_aux else (out, None)
    stats, result, samples = rule.stats(z_star, value, run.iterations, run.ref, run.factorisations, run.steps)
    return Solution(value, result, stats, aux, run.state, samples)
