"""One entry point for equilibrium solves: `solve(f, z0, params, x, solver=..., backward=...) -> Solution`.

The forward solver finds `z* = f(z*, params, x)`; the backward mode defines how gradients with respect to
`params` and `x` flow through `z*`:

- `Implicit` (default): the implicit function theorem, `dz*/dtheta = (I - df/dz)^{-1} df/dtheta`, through jaxopt's
  `custom_fixed_point` (a `jax.custom_vjp`, so reverse mode only). The transposed system `(I - J^T) u = v` is not
  symmetric, so plain CG is refused; GMRES (default), BiCGSTAB, normal-equation CG, or a dense LU solve it.
- `OneStep`: the Jacobian-free (one-step) gradient: `z = f(stop_gradient(z*), params, x)`, cheap and approximate.
- `Unrolled`: autodiff through every iteration of the forward loop (for verification and memory comparisons).

Every solve reports `SolveStats`: iterations, absolute residual `|f(z) - z|`, relative residual
`|f(z) - z| / |f(z0)|` (for `z0 = 0` the scale is `|f(0)|`, i.e. the input's size) and `converged`, which is
`relative_residual <= tol` evaluated on the returned value. A solve that stops at `maxiter` says so.

Precision: on GPUs JAX's default float32 matmul precision is TF32, with which Anderson acceleration was measured
to stall at maxiter without any sign of it. Every solve therefore traces its map, its mixing and its backward linear
solve under `jax.default_matmul_precision(precision)`, `"highest"` by default (`None` leaves JAX's setting).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from deq_jax import _checks

with __import__("warnings").catch_warnings():
    # jaxopt 0.8.5 is its final release and warns on import; the library depends on it knowingly.
    __import__("warnings").filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)
    import jaxopt
    from jaxopt import linear_solve as _linear_solve
    from jaxopt.implicit_diff import custom_fixed_point

Array = jax.Array
Map = Callable[[Any, Any, Any], Any]


# ----------------------------------------------------------------------------- results

class SolveStats(NamedTuple):
    """What a solve did. Under `vmap` each field gains the mapped axis."""

    iterations: Array  # int32: forward iterations taken (0 for `Direct`)
    residual: Array  # |f(z) - z|_2 at the returned z, over the whole pytree
    relative_residual: Array  # residual / |f(z0)|_2
    converged: Array  # bool: relative_residual <= tol (False for NaN)


class Solution(NamedTuple):
    value: Any  # the equilibrium z*, same structure as z0
    stats: SolveStats


# ----------------------------------------------------------------------------- forward solvers

@dataclasses.dataclass(frozen=True)
class FixedPoint:
    """Plain fixed-point iteration `z <- f(z)` (jaxopt `FixedPointIteration`); about `log(tol)/log(gamma)` steps."""


@dataclasses.dataclass(frozen=True)
class Anderson:
    """Anderson acceleration (jaxopt `AndersonAcceleration`): mixes the last `history_size` iterates."""

    history_size: int = 5
    beta: float = 1.0
    ridge: float = 1e-5  # relative to the mean diagonal of the residual Gram matrix

    def __post_init__(self):
        if not (isinstance(self.history_size, int) and self.history_size >= 2):
            raise ValueError(f"Anderson.history_size must be an integer >= 2; got {self.history_size!r}")
        _checks.check_positive("Anderson.beta", self.beta)
        _checks.check_positive("Anderson.ridge", self.ridge)


@dataclasses.dataclass(frozen=True)
class Broyden:
    """Limited-memory Broyden on `g(z) = f(z) - z` (jaxopt `Broyden`).

    `inverse_jacobian_init = -1` starts the inverse-Jacobian estimate at `-I`, the right sign for DEQ residuals
    (`dg/dz = J - I` is near `-I` for a contraction); jaxopt's default `+1` was measured 10x slower or divergent.
    """

    inverse_jacobian_init: float = -1.0
    history_size: Optional[int] = None

    def __post_init__(self):
        if self.history_size is not None:
            _checks.check_positive("Broyden.history_size", self.history_size, integer=True)


@dataclasses.dataclass(frozen=True)
class Direct:
    """An exact linear solve, for maps affine in z: `z (I - M)^T = c` where `f(z) = z @ M.T + c`.

    Uses the map's `affine(params, x)` when it has one (the DELM maps do: the closed form); otherwise the
    Jacobian is materialised (`jax.jacfwd`), which is only sensible for small states (at most `max_dense` numbers).
    """

    max_dense: int = 16384


Solver = Union[FixedPoint, Anderson, Broyden, Direct]
SOLVERS: dict[str, Callable[[], Solver]] = {
    "fixed_point": FixedPoint,
    "anderson": Anderson,
    "broyden": Broyden,
    "direct": Direct,
}


# ----------------------------------------------------------------------------- backward modes

LINEAR_SOLVERS = ("gmres", "bicgstab", "normal_cg", "lu")


@dataclasses.dataclass(frozen=True)
class Implicit:
    """Implicit differentiation: solve `(I - J^T) u = v` with `linear_solver` to relative tolerance `tol`.

    `tol=None` uses the forward solve's tolerance. `"lu"` materialises the Jacobian (small states only).
    """

    linear_solver: str = "gmres"
    tol: Optional[float] = None
    maxiter: Optional[int] = None

    def __post_init__(self):
        if self.linear_solver == "cg":
            raise ValueError(
                "linear_solver 'cg' is refused for implicit differentiation: the backward system (I - J^T) u = v "
                "is not symmetric, so conjugate gradients converges to a wrong gradient without any warning "
                "(0.8% error measured on a DEQ). Use 'gmres', 'bicgstab', 'normal_cg' (CG on the normal equations) "
                "or 'lu'."
            )
        _checks.check_choice("linear_solver", self.linear_solver, LINEAR_SOLVERS)
        if self.tol is not None:
            _checks.check_positive("Implicit.tol", self.tol)
        if self.maxiter is not None:
            _checks.check_positive("Implicit.maxiter", self.maxiter, integer=True)


@dataclasses.dataclass(frozen=True)
class OneStep:
    """Jacobian-free backward: differentiate one application of `f` at the (stopped) equilibrium."""


@dataclasses.dataclass(frozen=True)
class Unrolled:
    """Differentiate through all `maxiter` iterations of the forward loop (memory grows with `maxiter`).

    With `Direct`, this is plain autodiff through the linear solve, which is already exact.
    """


Backward = Union[Implicit, OneStep, Unrolled]
BACKWARDS: dict[str, Callable[[], Backward]] = {"implicit": Implicit, "one_step": OneStep, "unrolled": Unrolled}


def as_solver(solver: Union[str, Solver]) -> Solver:
    """A solver from its name (`SOLVERS`) or an instance."""
    if isinstance(solver, (FixedPoint, Anderson, Broyden, Direct)):
        return solver
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a name ({', '.join(map(repr, SOLVERS))}) or a solver instance; got {solver!r}")
    _checks.check_choice("solver", solver, SOLVERS)
    return SOLVERS[solver]()


def as_backward(backward: Union[str, Backward]) -> Backward:
    """A backward mode from its name (`BACKWARDS`) or an instance."""
    if isinstance(backward, (Implicit, OneStep, Unrolled)):
        return backward
    if not isinstance(backward, str):
        raise TypeError(
            f"backward must be a name ({', '.join(map(repr, BACKWARDS))}) or a backward instance; got {backward!r}"
        )
    _checks.check_choice("backward", backward, BACKWARDS)
    return BACKWARDS[backward]()


# ----------------------------------------------------------------------------- helpers

def _norm(tree: Any) -> Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in leaves))


def _sub(a: Any, b: Any) -> Any:
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def _precision(precision: Optional[str]):
    return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


def _with_precision(f: Map, precision: Optional[str]) -> Map:
    """`f` traced under the given matmul precision wherever it is traced: in the forward loop, and where jaxopt
    linearises it for the backward pass (transposed matmuls inherit the precision of the traced ones)."""
    if precision is None:
        return f

    def f_at_precision(z, params, x):
        with jax.default_matmul_precision(precision):
            return f(z, params, x)

    return f_at_precision


def _f_at_start(f: Map, affine_f: Any, z0: Any, params: Any, x: Any) -> Any:
    """`f(z0)`, the scale of the relative residual. An affine map started from zero (as the models start) gives its
    offset `c` without the product with `M` (for the per-sample DELM an n x m x m matmul, the cost of one
    iteration); `lax.cond` keeps `f(z0)` for any other start, so the value is the same either way."""
    if not (hasattr(affine_f, "affine") and hasattr(z0, "shape")):
        return f(z0, params, x)
    out = jax.eval_shape(f, z0, params, x)
    offset = lambda: jnp.broadcast_to(affine_f.affine(params, x)[1], out.shape).astype(out.dtype)
    return jax.lax.cond(jnp.any(z0 != 0), lambda: f(z0, params, x), offset)


def _stats(f: Map, z: Any, params: Any, x: Any, scale: Array, iterations: Array, tol: float) -> SolveStats:
    """Residual of the returned value, measured independently of the solver's own bookkeeping."""
    z, params, x = jax.lax.stop_gradient((z, params, x))
    residual = _norm(_sub(f(z, params, x), z))
    relative = residual / jnp.maximum(scale, jnp.finfo(residual.dtype).tiny)
    return SolveStats(
        iterations=jnp.asarray(iterations, jnp.int32),
        residual=residual,
        relative_residual=relative,
        converged=relative <= tol,
    )


def _linear_solver(backward: Implicit, tol: float, precision: Optional[str]) -> Callable:
    tol = backward.tol if backward.tol is not None else tol
    kwargs = {} if backward.maxiter is None else {"maxiter": backward.maxiter}
    base = {
        "gmres": functools.partial(_linear_solve.solve_gmres, tol=tol, atol=0.0, **kwargs),
        "bicgstab": functools.partial(_linear_solve.solve_bicgstab, tol=tol, atol=0.0, **kwargs),
        "normal_cg": functools.partial(_linear_solve.solve_normal_cg, tol=tol, atol=0.0, **kwargs),
        "lu": _linear_solve.solve_lu,
    }[backward.linear_solver]

    def linear_solve(matvec, b):
        # the backward pass is traced after solve() returns: set the precision here too
        with _precision(precision):
            return base(matvec, b)

    return linear_solve


def _direct(f: Map, z0: Any, params: Any, x: Any, max_dense: int) -> Any:
    """Exact solution of the affine fixed-point equation (differentiable by ordinary autodiff)."""
    if hasattr(f, "affine"):
        M, c = f.affine(params, x)
        eye = jnp.eye(M.shape[0], dtype=M.dtype)
        if c.ndim == 1:
            return jnp.linalg.solve(eye - M, c)
        return jnp.linalg.solve(eye - M, c.reshape(-1, c.shape[-1]).T).T.reshape(c.shape)
    flat0, unravel = jax.flatten_util.ravel_pytree(z0)
    if flat0.size > max_dense:
        raise ValueError(
            f"solver 'direct' on a map without an `affine(params, x)` method materialises a "
            f"{flat0.size} x {flat0.size} Jacobian, above Direct.max_dense={max_dense}; give the map an `affine` "
            f"method or use an iterative solver"
        )
    g = lambda v: jax.flatten_util.ravel_pytree(f(unravel(v), params, x))[0]
    zero = jnp.zeros_like(flat0)
    c = g(zero)
    J = jax.jacfwd(g)(zero)
    return unravel(jnp.linalg.solve(jnp.eye(flat0.size, dtype=J.dtype) - J, c))


class _RelativeRidgeAnderson(jaxopt.AndersonAcceleration):
    """jaxopt's Anderson (its state, loop and stopping rule) with a mixing step that is scale-invariant and keeps dtypes.

    - The ridge is relative to the residual Gram matrix's mean diagonal: jaxopt adds an absolute `ridge`, which
      dominates once residuals are small and decays the mixing to plain averaging (measured: 359 iterations where
      fixed-point iteration took 213, float64, tol 1e-10; 19 with the relative ridge).
    - The mixing weights are cast to the state's dtype: jaxopt builds them in the default float dtype, which turns a
      float32 (or bfloat16) state into float64 under `jax_enable_x64` and breaks its `lax.cond`.
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
        params_history = jax.tree_util.tree_map(lambda h, v: h.at[pos].set(v), state.params_history, extrapolated)
        residuals_history = jax.tree_util.tree_map(lambda h, v: h.at[pos].set(v), state.residuals_history, residual)
        row = jax.vmap(lambda hist: sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(hist),
                                                                       jax.tree_util.tree_leaves(residual))),
                       )(residuals_history).astype(gram.dtype)
        gram = gram.at[pos, :].set(row).at[:, pos].set(row)
        next_state = state._replace(
            iter_num=state.iter_num + 1, error=jnp.sqrt(gram[pos, pos]).astype(jnp.asarray(state.error).dtype),
            params_history=params_history, residuals_history=residuals_history, residual_gram=gram, aux=aux,
            num_fun_eval=state.num_fun_eval + 1)
        return jaxopt.OptStep(params=next_params, state=next_state)


def _iterative(solver: Solver, f: Map, abs_tol: Array, maxiter: int, unroll: bool):
    """The jaxopt solver object (implicit_diff off: deq_jax decides how to differentiate)."""
    common = dict(maxiter=maxiter, tol=abs_tol, implicit_diff=False, unroll=unroll, jit=True)
    if isinstance(solver, FixedPoint):
        return jaxopt.FixedPointIteration(fixed_point_fun=f, **common)
    if isinstance(solver, Anderson):
        return _RelativeRidgeAnderson(
            fixed_point_fun=f, history_size=solver.history_size, beta=solver.beta, ridge=solver.ridge, **common
        )
    residual_fun = lambda z, params, x: _sub(f(z, params, x), z)
    return jaxopt.Broyden(
        fun=residual_fun, gamma=solver.inverse_jacobian_init, history_size=solver.history_size, **common
    )


# ----------------------------------------------------------------------------- the entry point

def solve(
    f: Map,
    z0: Any,
    params: Any,
    x: Any,
    *,
    solver: Union[str, Solver] = "anderson",
    backward: Union[str, Backward] = "implicit",
    tol: float = 1e-5,
    maxiter: int = 100,
    precision: Optional[str] = "highest",
) -> Solution:
    """Find `z* = f(z*, params, x)` from `z0` and return it with its statistics.

    Args:
      f: the equilibrium map `f(z, params, x)`, a pure function (any callable; see `deq_jax.maps`).
      z0: initial state (a pytree of float arrays; an array for `Direct` with `affine` maps and for LU backward).
      params: parameters (pytree), differentiable.
      x: input (pytree), differentiable.
      solver: `"anderson"`, `"fixed_point"`, `"broyden"`, `"direct"` or an instance (`Anderson(history_size=...)`).
      backward: `"implicit"`, `"one_step"`, `"unrolled"` or an instance (`Implicit(linear_solver="lu")`).
      tol: relative tolerance on `|f(z) - z| / |f(z0)|`, for stopping and for `stats.converged`.
      maxiter: iteration cap of iterative solvers (also the unrolled length for `Unrolled`).
      precision: matmul precision inside the solve (`"highest"`, `"float32"`, `"tensorfloat32"`, `"bfloat16"`,
        `"default"`), or None to leave JAX's current setting.

    Returns:
      `Solution(value, stats)`. Works under `jit`, `vmap` and `grad` (reverse mode for `Implicit`; forward and
      reverse for the other modes and for `Direct`).

    Example:
      >>> f = DELMMap(gamma=0.9)
      >>> sol = solve(f, jnp.zeros_like(phi), {"A": A}, phi, solver="anderson", tol=1e-6)
      >>> sol.value, sol.stats.converged
    """
    solver = as_solver(solver)
    backward = as_backward(backward)
    _checks.check_positive("tol", tol)
    _checks.check_positive("maxiter", maxiter, integer=True)
    if not callable(f):
        raise TypeError(f"f must be a callable f(z, params, x); got {f!r}")
    _checks.check_float_array("z0", z0)
    _checks.check_float_array("params", params)
    _checks.check_float_array("x", x)
    if precision is not None:
        _checks.check_choice(
            "precision", precision, ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16")
        )

    affine_f, f = f, _with_precision(f, precision)
    with _precision(precision):
        scale = jax.lax.stop_gradient(_norm(_f_at_start(f, affine_f, z0, params, x)))

        if isinstance(solver, Direct):
            if isinstance(backward, OneStep):
                z_star = _direct(affine_f, z0, *jax.lax.stop_gradient((params, x)), solver.max_dense)
                z = f(jax.lax.stop_gradient(z_star), params, x)
            else:
                z = _direct(affine_f, z0, params, x, solver.max_dense)
            return Solution(z, _stats(f, z, params, x, scale, 0, tol))

        def forward(z_init, params, x):
            # the stopping threshold is derived from this function's own arguments: a tracer closed over from outside
            # would leak through jaxopt's custom_vjp under vmap(jit(grad(...)))
            abs_tol = tol * jax.lax.stop_gradient(_norm(_f_at_start(f, affine_f, z_init, params, x)))
            run = _iterative(solver, f, abs_tol, maxiter, unroll=isinstance(backward, Unrolled))
            z, state = run.run(z_init, params, x)
            return z, state.iter_num

        if isinstance(backward, Implicit):
            fp = lambda z, params, x: f(z, params, x)  # a plain signature for custom_fixed_point to bind against
            linear_solve = _linear_solver(backward, tol, precision)

            @custom_fixed_point(fp, has_aux=True, solve=linear_solve, reference_signature=fp)
            def implicit_forward(z_init, params, x):
                z, iterations = forward(z_init, params, x)
                return z, iterations

            z, iterations = implicit_forward(z0, params, x)
        elif isinstance(backward, OneStep):
            z_star, iterations = forward(z0, *jax.lax.stop_gradient((params, x)))
            z = f(jax.lax.stop_gradient(z_star), params, x)
        else:
            z, iterations = forward(z0, params, x)
        return Solution(z, _stats(f, z, params, x, scale, iterations, tol))
