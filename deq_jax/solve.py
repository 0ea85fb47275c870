"""One entry point for equilibrium solves: `solve(f, z0, params, x, solver=..., backward=...) -> Solution`.

(Over 400 lines on purpose: the stopping rule, the statistics and the three backward modes are one contract and are
read together; jaxopt and the loops that drive it live in `deq_jax._jaxopt`.)

The forward solver finds `z* = f(z*, params, x)`; the backward mode defines how gradients with respect to `params`
and `x` flow through `z*`:

- `Implicit` (default): the implicit function theorem, `dz*/dtheta = (I - J)^{-1} df/dtheta` with `J = df/dz` at
  `z*`, as a `jax.custom_vjp` (reverse mode only). Each backward pass solves `(I - J^T) u = v` for the incoming
  cotangent `v` with GMRES (default), BiCGSTAB, CG on the normal equations, or a dense LU, then MEASURES the solve:
  `|(I - J^T) u - v| / |v|`. Plain CG is refused: the system is not symmetric.
- `OneStep`: the Jacobian-free (one-step) gradient: `z = f(stop_gradient(z*), params, x)`, cheap and approximate.
- `Unrolled`: autodiff through exactly `maxiter` forward steps (for verification and memory comparisons).

Convergence rule (one rule, for stopping and for `stats.converged`): with 2-norms over the whole pytree state,

    |f(z) - z| <= tol * |f(z)| + atol        and z, f(z) finite and not diverged,

so "converged" means "within `tol` (relative) of being a fixed point", whatever the start: a far start, a zero start
and a warm start (e.g. the previous training step's equilibrium) are judged by the same rule on the value returned.
With `batch_axis=k`, the norms are taken per sample along axis `k` of every leaf and every sample must satisfy the
rule; the statistics report the worst sample. With `atol=0` (the default) an equilibrium at exactly `z* = 0` is met
only when the residual vanishes: pass `atol` for such problems.

Divergence: an iterate is `diverged` when it (or its image) is not finite, or when its largest entry exceeds
`eps^(-3/4)` times the scale of the start, `max(|z0|_inf, |f(z0)|_inf)` (1.5e5 in float32, 5.8e11 in float64; `eps`
of the state's dtype): such runaways (e.g. Broyden pushing an entry to 1e16, where rounding makes `f(z) - z`
exactly zero) can satisfy any residual test, so they never count as converged. Loops stop as soon as it happens.

Backward failure: a backward solve FAILS when its measured relative residual exceeds `10 * tol` (the margin covers
the rounding between a Krylov solver's own residual estimate and the recomputed one), or its solution is not
finite while its inputs are. Failure is never silent:
- inside `deq_jax.value_and_grad` (which `deq_jax.train.make_step` uses), it is data: `BackwardStats` counts the
  backward solves, the failures and the non-finite ones, and sums their relative residuals;
- otherwise (plain `jax.grad`) it raises at run time, under `jit` too, with what failed and what to change.
A non-finite cotangent or equilibrium is divergence upstream, not a backward failure: it is counted as `nonfinite`
and never raises, so one diverged configuration of a vmapped sweep does not stop the others.
`Implicit(check=False)` skips the measurement (one map VJP per backward pass) and the error.

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
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.flatten_util
import jax.numpy as jnp

from deq_jax import _checks
from deq_jax import _implicit
from deq_jax import _jaxopt
from deq_jax._implicit import BackwardStats, value_and_grad  # noqa: F401 (public here)

Array = jax.Array
Map = Callable[[Any, Any, Any], Any]


# ----------------------------------------------------------------------------- results

class SolveStats(NamedTuple):
    """What a forward solve did, measured at the returned value. Under `vmap` each field gains the mapped axis."""

    iterations: Array  # int32: solver steps taken (0 for `Direct`; a start that already satisfies the rule: 0 or 1)
    residual: Array  # |f(z) - z|_2 over the pytree (with batch_axis: the largest per-sample value)
    relative_residual: Array  # |f(z) - z| / |f(z)| (with batch_axis: the largest per-sample value)
    converged: Array  # bool: the convergence rule holds (every sample) and not diverged
    diverged: Array  # bool: a non-finite value, or an entry beyond eps^(-3/4) times the start's scale


class Solution(NamedTuple):
    value: Any  # the equilibrium z*, same structure and dtypes as z0
    stats: SolveStats
    aux: Any = None  # with has_aux=True: the map's aux output at the returned value (differentiable)


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
    """Limited-memory Broyden on `g(z) = f(z) - z` (jaxopt `Broyden`, on the flattened state).

    `inverse_jacobian_init = -1` starts the inverse-Jacobian estimate at `-I`, the right sign for DEQ residuals
    (`dg/dz = J - I` is near `-I` for a contraction); jaxopt's default `+1` was measured 10x slower or divergent.
    `history_size=None` keeps `maxiter` updates.
    """

    inverse_jacobian_init: float = -1.0
    history_size: Optional[int] = None

    def __post_init__(self):
        if self.history_size is not None:
            _checks.check_positive("Broyden.history_size", self.history_size, integer=True)


@dataclasses.dataclass(frozen=True)
class Direct:
    """An exact linear solve, for maps affine in z: `z (I - M)^T = c` where `f(z) = z @ M.T + c`.

    Uses the map's `affine(params, x)` when it has one (the DELM maps do: the closed form); otherwise the Jacobian is
    materialised at `z = 0` (`jax.jacfwd`), which is only sensible for small states (at most `max_dense` numbers).
    On a map that is not affine the result is not an equilibrium, and the statistics say so.
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
FAILURE_MARGIN = _implicit.FAILURE_MARGIN  # a backward solve fails above FAILURE_MARGIN * tol (module docstring)


@dataclasses.dataclass(frozen=True)
class Implicit:
    """Implicit differentiation: solve `(I - J^T) u = v` with `linear_solver` to relative tolerance `tol`.

    `tol=None` uses the forward solve's tolerance; `maxiter` caps the Krylov iterations (GMRES: restarts of 20).
    `"lu"` materialises the Jacobian (states of at most `max_dense` numbers). `check=True` measures every backward
    solve's residual and makes a failure loud (an error, or `BackwardStats` inside `deq_jax.value_and_grad`).
    """

    linear_solver: str = "gmres"
    tol: Optional[float] = None
    maxiter: Optional[int] = None
    check: bool = True
    max_dense: int = 4096

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
        if not isinstance(self.check, bool):
            raise TypeError(f"Implicit.check must be True or False; got {self.check!r}")
        _checks.check_positive("Implicit.max_dense", self.max_dense, integer=True)


@dataclasses.dataclass(frozen=True)
class OneStep:
    """Jacobian-free backward: differentiate one application of `f` at the (stopped) equilibrium.

    The value returned is `f(z*)`; the statistics describe `z*` (their residual is `|f(z*) - z*|`)."""


@dataclasses.dataclass(frozen=True)
class Unrolled:
    """Differentiate through exactly `maxiter` forward steps, whatever the start: the solver's steps until the
    convergence rule holds, then averaged steps `z <- (z + f(z)) / 2`. The gradient approaches the implicit one
    geometrically in the number of steps (for a map that contracts at `z*`, or is non-expansive without the
    eigenvalue 1); `stats.iterations` counts the solver's steps. With `Direct`: plain autodiff through the solve.
    Memory grows with `maxiter`.
    """


Backward = Union[Implicit, OneStep, Unrolled]
BACKWARDS: dict[str, Callable[[], Backward]] = {"implicit": Implicit, "one_step": OneStep, "unrolled": Unrolled}
PRECISIONS = ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16")


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


# ----------------------------------------------------------------------------- the convergence rule

def _wide(leaf: Array) -> Array:
    return leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))  # norms of bfloat16 states in float32


def _norms(tree: Any, batch_axis: Optional[int]) -> Array:
    """2-norm over the pytree, or per sample along `batch_axis` (shape `(n,)`)."""
    def sq(leaf):
        leaf = jnp.abs(_wide(leaf)) ** 2
        if batch_axis is None:
            return jnp.sum(leaf)
        return jnp.sum(jnp.moveaxis(leaf, batch_axis, 0).reshape(leaf.shape[batch_axis], -1), axis=1)

    return jnp.sqrt(sum(sq(leaf) for leaf in jax.tree_util.tree_leaves(tree)))


@dataclasses.dataclass(frozen=True)
class _Rule:
    tol: Any  # a float, or a tracer (e.g. vmapped over)
    atol: Any
    batch_axis: Optional[int]
    growth: float  # eps^(-3/4) of the state's dtype

    def measure(self, r: Any, fz: Any) -> tuple[Array, Array, Array]:
        """(|r|, |f(z)|, rule holds) per sample (or scalars)."""
        res, scale = _norms(r, self.batch_axis), _norms(fz, self.batch_axis)
        return res, scale, res <= self.tol * scale + self.atol  # False for NaN

    def diverged(self, r: Any, fz: Any, ref: Array) -> Array:
        big = jnp.maximum(_jaxopt.max_abs(r), _jaxopt.max_abs(fz))
        return ~jnp.isfinite(big) | (_jaxopt.max_abs(fz) > self.growth * ref)

    def check(self, r: Any, fz: Any, ref: Array) -> tuple[Array, Array]:
        """The loops' stopping test: (rule holds for every sample, diverged)."""
        return jnp.all(self.measure(r, fz)[2]), self.diverged(r, fz, ref)

    def stats(self, z: Any, fz: Any, iterations: Array, ref: Optional[Array]) -> SolveStats:
        """The statistics of the returned value, measured independently of the solver's bookkeeping."""
        z, fz = jax.lax.stop_gradient((z, fz))
        r = jax.tree_util.tree_map(jnp.subtract, fz, z)
        res, scale, holds = self.measure(r, fz)
        relative = res / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)
        diverged = self.diverged(r, fz, jnp.asarray(jnp.inf if ref is None else ref))
        return SolveStats(
            iterations=jnp.asarray(iterations, jnp.int32),
            residual=jnp.max(res),
            relative_residual=jnp.max(relative),
            converged=jnp.all(holds) & ~diverged,
            diverged=diverged,
        )


def _growth(z0: Any) -> float:
    dtype = jnp.result_type(*[leaf.dtype for leaf in jax.tree_util.tree_leaves(z0)])
    return float(jnp.finfo(dtype).eps) ** -0.75


# ----------------------------------------------------------------------------- helpers

def _with_precision(f: Map, precision: Optional[str]) -> Map:
    """`f` traced under the given matmul precision wherever it is traced: in the forward loop, and where the
    backward linearises it (transposed matmuls inherit the precision of the traced ones)."""
    if precision is None:
        return f

    def f_at_precision(z, params, x):
        with jax.default_matmul_precision(precision):
            return f(z, params, x)

    return f_at_precision


def _check_map(f: Map, z0: Any, params: Any, x: Any, has_aux: bool) -> None:
    """`f(z0, params, x)` must return a state like `z0` (plus aux with has_aux): checked on shapes, not values."""
    out = jax.eval_shape(f, z0, params, x)
    if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError(f"with has_aux=True, f must return a pair (z, aux); got {jax.tree_util.tree_structure(out)}")
        out = out[0]
    problem = None
    if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(z0):
        problem = (f"structure {jax.tree_util.tree_structure(out)} where z0 has "
                   f"{jax.tree_util.tree_structure(z0)}")
        if not has_aux and isinstance(out, tuple) and len(out) == 2:
            problem += " (a map returning (z, aux) needs has_aux=True)"
    else:
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree_util.tree_leaves(z0)):
            if a.shape != b.shape or a.dtype != b.dtype:
                problem = (f"leaf {jax.tree_util.keystr(path) or '(root)'} of shape {a.shape} and dtype {a.dtype} where "
                           f"z0 has shape {b.shape} and dtype {b.dtype}")
                break
    if problem:
        raise ValueError(f"f(z0, params, x) must return a state of z0's structure, shapes and dtypes (the cast rule "
                         f"gives z0 the default float dtype for Python numbers and integers); it returns {problem}")


def _direct(f: Map, fz: Map, z0: Any, params: Any, x: Any, max_dense: int) -> Any:
    """Exact solution of the affine fixed-point equation (differentiable by ordinary autodiff)."""
    if hasattr(f, "affine") and not isinstance(z0, (tuple, list, dict)):
        M, c = f.affine(params, x)
        eye = jnp.eye(M.shape[0], dtype=M.dtype)
        if c.ndim == 1:
            return jnp.linalg.solve(eye - M, c)
        return jnp.linalg.solve(eye - M, c.reshape(-1, c.shape[-1]).T).T.reshape(c.shape)
    flat0, unravel = jax.flatten_util.ravel_pytree(z0)
    g = lambda v: jax.flatten_util.ravel_pytree(fz(unravel(v), params, x))[0]
    zero = jnp.zeros_like(flat0)
    J = jax.jacfwd(g)(zero)
    return unravel(jnp.linalg.solve(jnp.eye(flat0.size, dtype=J.dtype) - J, g(zero)))


def _kind(solver: Solver, maxiter: int) -> tuple[str, dict]:
    if isinstance(solver, FixedPoint):
        return "fixed_point", {}
    if isinstance(solver, Anderson):
        return "anderson", dict(history_size=solver.history_size, beta=solver.beta, ridge=solver.ridge)
    return "broyden", dict(gamma=solver.inverse_jacobian_init, history_size=solver.history_size or maxiter)


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
    atol: float = 0.0,
    maxiter: int = 100,
    precision: Optional[str] = "highest",
    has_aux: bool = False,
    batch_axis: Optional[int] = None,
) -> Solution:
    """Find `z* = f(z*, params, x)` from `z0` and return it with its statistics (see the module docstring for the
    convergence rule, divergence, backward failures, state types and the cast rule).

    Args:
      f: the equilibrium map `f(z, params, x)`, a pure function (any callable; see `deq_jax.maps`); with
        `has_aux=True` it returns `(z, aux)`.
      z0: initial state: a pytree of floating arrays (Python numbers and integer arrays are cast, see above).
      params: parameters (pytree), differentiable.
      x: input (pytree), differentiable.
      solver: `"anderson"`, `"fixed_point"`, `"broyden"`, `"direct"` or an instance (`Anderson(history_size=...)`).
      backward: `"implicit"`, `"one_step"`, `"unrolled"` or an instance (`Implicit(linear_solver="lu")`).
      tol, atol: the convergence rule `|f(z) - z| <= tol * |f(z)| + atol`, for stopping and for `stats.converged`.
      maxiter: iteration cap of iterative solvers (the exact number of differentiated steps for `Unrolled`).
      precision: matmul precision inside the solve (`"highest"`, `"float32"`, `"tensorfloat32"`, `"bfloat16"`,
        `"default"`), or None to leave JAX's current setting.
      has_aux: `f` returns `(z, aux)`; `Solution.aux` is the aux of `f` at the returned value.
      batch_axis: an axis of every state leaf that indexes independent samples: the rule then holds per sample and
        the statistics report the worst one.

    Returns:
      `Solution(value, stats, aux)`. Works under `jit`, `vmap` and `grad` (reverse mode for `Implicit`; forward and
      reverse for the other modes and for `Direct`).

    Example:
      >>> f = DELMMap(gamma=0.9)
      >>> sol = solve(f, jnp.zeros_like(phi), {"A": A}, phi, solver="anderson", tol=1e-6, batch_axis=0)
      >>> sol.value, sol.stats.converged
    """
    solver = as_solver(solver)
    backward = as_backward(backward)
    _checks.check_positive("tol", tol)
    if not (isinstance(atol, jax.core.Tracer) or (isinstance(atol, (int, float)) and atol >= 0)):
        raise ValueError(f"atol must be a number >= 0; got {atol!r}")
    _checks.check_positive("maxiter", maxiter, integer=True)
    if not callable(f):
        raise TypeError(f"f must be a callable f(z, params, x); got {f!r}")
    if precision is not None:
        _checks.check_choice("precision", precision, PRECISIONS)
    z0 = _checks.as_state("z0", z0)
    params = _checks.as_arguments("params", params)
    x = _checks.as_arguments("x", x)
    batch_axis = _checks.check_batch_axis(batch_axis, z0)

    affine_f, f = f, _with_precision(f, precision)
    _check_map(f, z0, params, x, has_aux)
    fz = (lambda z, p, x: f(z, p, x)[0]) if has_aux else f
    rule = _Rule(tol, atol, batch_axis, _growth(z0))
    size = sum(leaf.size for leaf in jax.tree_util.tree_leaves(z0))
    if isinstance(backward, Implicit) and backward.linear_solver == "lu" and size > backward.max_dense:
        raise ValueError(f"Implicit(linear_solver='lu') materialises a {size} x {size} Jacobian, above "
                         f"Implicit.max_dense={backward.max_dense}; use 'gmres' or raise max_dense")
    if isinstance(solver, Direct) and not hasattr(affine_f, "affine") and size > solver.max_dense:
        raise ValueError(f"solver 'direct' on a map without an `affine(params, x)` method materialises a "
                         f"{size} x {size} Jacobian, above Direct.max_dense={solver.max_dense}; give the map an "
                         f"`affine` method or use an iterative solver")

    def finish(z, iterations, ref):
        # the one extra map application: the statistics' independent residual (and the aux, differentiable)
        out = f(z, params, x) if has_aux else f(*jax.lax.stop_gradient((z, params, x)))
        value, aux = out if has_aux else (out, None)
        return Solution(z, rule.stats(z, value, iterations, ref), aux)

    with _implicit.precision_scope(precision):
        if isinstance(solver, Direct):
            if isinstance(backward, OneStep):
                z_star = _direct(affine_f, fz, z0, *jax.lax.stop_gradient((params, x)), solver.max_dense)
                return _one_step(f, has_aux, rule, z_star, params, x, 0, None)
            return finish(_direct(affine_f, fz, z0, params, x, solver.max_dense), 0, None)

        kind, options = _kind(solver, maxiter)
        if isinstance(backward, Implicit):
            tol_b = tol if backward.tol is None else backward.tol
            z, iterations, ref = _implicit.implicit(backward, kind, options, fz, rule, maxiter, tol_b, precision,
                                              z0, params, x)
            return finish(z, *jax.lax.stop_gradient((iterations, ref)))
        if isinstance(backward, OneStep):
            p, xx = jax.lax.stop_gradient((params, x))
            z_star, iterations, ref = _jaxopt.run(kind, options, lambda z: fz(z, p, xx), z0, rule.check, maxiter)
            return _one_step(f, has_aux, rule, z_star, params, x, iterations, ref)
        z, iterations, ref = _jaxopt.run_unrolled(kind, options, lambda z: fz(z, params, x), z0, rule.check,
                                                  maxiter)
        return finish(z, *jax.lax.stop_gradient((iterations, ref)))


def _one_step(f: Map, has_aux: bool, rule: _Rule, z_star: Any, params: Any, x: Any, iterations, ref) -> Solution:
    """`f(stop_gradient(z*))`: its value is returned, and it is also the statistics' evaluation at `z*`."""
    z_star = jax.lax.stop_gradient(z_star)
    out = f(z_star, params, x)
    value, aux = out if has_aux else (out, None)
    return Solution(value, rule.stats(z_star, value, iterations, ref), aux)
