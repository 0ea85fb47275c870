"""How gradients flow through an equilibrium: the backward strategies, and the one implicit adjoint.

- `Implicit` (default): the implicit function theorem, `dz*/dtheta = (I - J)^{-1} df/dtheta` with `J = df/dz` at
  `z*`, as the JVP of the solve (`jax.custom_jvp`). Forward mode solves `(I - J) t = b` for the tangent `t`; JAX
  transposes that linear solve for reverse mode, which solves `(I - J^T) u = v` for the incoming cotangent `v`, from a
  start `u0` (`solve(..., adjoint_start=u0)`, zero by default), with the forward solver's own factorisation where it
  has one; higher orders (`jax.hessian`, `jax.grad(jax.grad(.))`) differentiate those solves again. Every such solve
  is MEASURED: `|(I - J^T) u - v| / |v|` (or its forward-mode twin).
- `OneStep`: the Jacobian-free (one-step) gradient: `f(stop_gradient(z*))`, cheap and approximate.
- `Unrolled`: autodiff through exactly `maxiter` forward steps (for verification and memory comparisons).

Backward failure: a backward solve FAILS when its measured relative residual exceeds `FAILURE_MARGIN * tol` (the
margin covers the rounding between a Krylov solver's own residual estimate and the recomputed one), or its solution
is not finite while its inputs are. Failure is never silent: inside `deq_jax.value_and_grad` it is data
(`BackwardStats`); under plain `jax.grad` it raises (or warns) at run time, under `jit` too (`Implicit.on_failure`).
A non-finite cotangent or equilibrium is divergence upstream, not a backward failure: it is counted as `nonfinite`.

A derivative through a forward solve that did not converge is not the implicit one (the theorem holds at an
equilibrium only): it is counted (`BackwardStats.unconverged_forward`) inside `deq_jax.value_and_grad`, and raises
under plain `jax.grad`/`jax.jvp` unless `Implicit(unconverged_forward="warn" | "ignore")`.

Carrying the backward solution: the cotangent that the implicit solve returns for `adjoint_start` is the backward
solution `u` itself (not a derivative). Differentiate with respect to the start (as `deq_jax.make_step` does) to
carry `u` into the next step's backward solve; pass a start that does not depend on what you differentiate.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from deq_jax import _checks, _jaxopt
from deq_jax._diagnose import NonConvergenceError, NonConvergenceWarning, raise_or_warn
from deq_jax._rule import Rule, norms, subtract
from deq_jax._solution import BackwardStats, Result
from deq_jax._solver._base import AbstractSolver, Problem

Array = jax.Array
FAILURE_MARGIN = 10.0  # a backward solve fails above FAILURE_MARGIN * tol (see the module docstring)
LINEAR_SOLVERS = ("forward", *_jaxopt.KRYLOV, "lu")
ON_FAILURE = ("raise", "warn", "ignore")


@dataclasses.dataclass(frozen=True)
class Implicit:
    """Implicit differentiation: solve `(I - J^T) u = v` to relative tolerance `tol` (`|r| <= tol |v|`).

    `linear_solver`: `"forward"` (the forward solver solves the backward equation `u = v + J^T u` too, reusing
    its factorisation: the default for `Direct` and `Refine`), `"bicgstab"` (the default for iterative solvers:
    measured the fastest per training step, 0.72x GMRES's time on a per-sample tanh DEQ, and it keeps a few vectors
    where GMRES keeps 20), `"gmres"` (restarts of 20; the most robust on non-normal Jacobians), `"normal_cg"` (CG
    on the normal equations) or `"lu"` (a dense Jacobian: states of at most `max_dense` numbers); None picks the
    solver's default. Plain CG is refused: the system is not symmetric.
    `tol=None` uses the forward solve's tolerance; `maxiter` caps the backward iterations (None: the forward's
    `maxiter` for `"forward"`, jax's default for the Krylov solvers).
    `on_failure`: a failed backward solve raises (`"raise"`, a `NonConvergenceError` at run time), warns (`"warn"`)
    or is not measured at all (`"ignore"`, one map VJP cheaper); inside `deq_jax.value_and_grad` it is recorded.
    `unconverged_forward`: a derivative taken through a forward solve that did not converge (the rule not met, or
    diverged) raises (`"raise"`), warns (`"warn"`) or passes (`"ignore"`: the approximate gradient, knowingly);
    inside `deq_jax.value_and_grad` it is counted (`BackwardStats.unconverged_forward`).
    """

    linear_solver: str | None = None
    tol: float | None = None
    maxiter: int | None = None
    on_failure: str = "raise"
    max_dense: int = 4096
    unconverged_forward: str = "raise"

    def __post_init__(self) -> None:
        if self.linear_solver == "cg":
            raise ValueError(
                "linear_solver 'cg' is refused for implicit differentiation: the backward system (I - J^T) u = v "
                "is not symmetric, so conjugate gradients converges to a wrong gradient without any warning "
                "(0.8% error measured on a DEQ). Use 'gmres', 'bicgstab', 'normal_cg' (CG on the normal equations), "
                "'lu' or 'forward'."
            )
        if self.linear_solver is not None:
            _checks.check_choice("linear_solver", self.linear_solver, LINEAR_SOLVERS)
        if self.tol is not None:
            _checks.check_positive("Implicit.tol", self.tol)
        if self.maxiter is not None:
            _checks.check_positive("Implicit.maxiter", self.maxiter, integer=True)
        _checks.check_choice("Implicit.on_failure", self.on_failure, ON_FAILURE)
        _checks.check_choice("Implicit.unconverged_forward", self.unconverged_forward, ON_FAILURE)
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
    eigenvalue 1); `stats.iterations` counts the solver's steps. With `Direct` (and `Refine`, which then carries
    nothing): plain autodiff through the LU solve. Memory grows with `maxiter`.
    """


Backward = Implicit | OneStep | Unrolled
_BACKWARDS: dict[str, Callable[[], Backward]] = {"implicit": Implicit, "one_step": OneStep, "unrolled": Unrolled}


def as_backward(backward: str | Backward) -> Backward:
    """A backward strategy from its name (`"implicit"`, `"one_step"`, `"unrolled"`) or an instance."""
    if isinstance(backward, (Implicit, OneStep, Unrolled)):
        return backward
    if not isinstance(backward, str):
        raise TypeError(
            f"backward must be a name ({', '.join(map(repr, _BACKWARDS))}) or a backward instance; got {backward!r}"
        )
    _checks.check_choice("backward", backward, _BACKWARDS)
    return _BACKWARDS[backward]()


def precision_scope(precision: str | None) -> Any:
    """`jax.default_matmul_precision(precision)`, or nothing for None."""
    return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


# ----------------------------------------------------------------------------- statistics out of the backward pass

_PROBES: list = []  # trace-time stack: the probe of the innermost deq_jax.value_and_grad being traced
_PROBE_SIZE = 6  # solves, failures, nonfinite, relative residual, iterations, unconverged forward solves
_LARGE = 1e30  # an infinite relative residual, as the probe's (summed, float32) slot records it


def value_and_grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False) -> Callable:
    """`jax.value_and_grad` that also returns the implicit backward passes' `BackwardStats`.

    `value_and_grad(fun, argnums, has_aux)(*args) -> (value, grads, backward_stats)` where `value` is
    `(loss, aux)` with has_aux. Inside it, a failed backward solve is recorded (never raised): read
    `backward_stats.failures` (`make_step` puts it in its metrics). Works under `jit` and `vmap`.

    How: every implicit solve traced inside `fun` takes a zero "probe" array as an extra input; its backward pass
    writes its statistics as the probe's cotangent, which this function differentiates for too. Whether statistics
    are collected is decided when `fun` is traced, so jit the result (`jax.jit(deq_jax.value_and_grad(loss))`), not
    `fun` alone: JAX reuses the first trace of a function that was `jax.jit`-compiled on its own.
    """
    single = isinstance(argnums, (int, np.integer))
    positions = (int(argnums),) if single else tuple(argnums)  # type: ignore[arg-type]

    def wrapped(*args: Any) -> Any:
        def with_probe(probe: Array, *args: Any) -> Any:
            _PROBES.append(probe)
            try:
                return fun(*args)
            finally:
                _PROBES.pop()

        probe = jnp.zeros((_PROBE_SIZE,), jnp.float32)
        inner = jax.value_and_grad(with_probe, argnums=(0, *(p + 1 for p in positions)), has_aux=has_aux)
        value, grads = inner(probe, *args)
        ct = grads[0]
        count = lambda i: jnp.round(ct[i]).astype(jnp.int32)
        stats = BackwardStats(
            solves=count(0),
            failures=count(1),
            nonfinite=count(2),
            relative_residual=jnp.where(ct[3] >= _LARGE, jnp.inf, ct[3]),
            iterations=count(4),
            unconverged_forward=count(5),
        )
        return value, (grads[1] if single else grads[1:]), stats

    return wrapped


def _raise_or_warn(failed: Any, relative: Any, mode: str, message: Callable[[float], str]) -> None:
    """At run time: nothing unless some entry of `failed` is set; then `message(worst relative residual)` raised as
    a `NonConvergenceError` (`mode="raise"`) or warned."""
    failed, relative = np.asarray(failed), np.asarray(relative)
    if not np.any(failed):
        return
    text = message(float(np.max(np.where(failed, relative, -np.inf))))
    raise_or_warn(text, mode, NonConvergenceError, NonConvergenceWarning)


def _report_backward_failure(failed: Any, residual: Any, limit: Any, description: str, on_failure: str) -> None:
    limit = float(np.max(np.asarray(limit)))
    _raise_or_warn(
        failed,
        residual,
        on_failure,
        lambda worst: (
            f"deq_jax.solve: {Result.backward_failed.message}: relative residual {worst:.2e} > {limit:.1e} "
            f"({FAILURE_MARGIN:g} x tol = {limit / FAILURE_MARGIN:.1e}) with {description}. Raise "
            f"Implicit(maxiter=...), use linear_solver='lu' (small states), 'gmres' or 'forward', or loosen "
            f"Implicit(tol=...) (float32 cannot reach much below 1e-6); a map that barely contracts at the "
            f"equilibrium (gamma near 1) makes I - J^T ill-conditioned. To record failures as data instead, "
            f"differentiate with deq_jax.value_and_grad (make_step's metrics carry them), or pass "
            f"Implicit(on_failure='ignore') to skip the check."
        ),
    )


def _report_unconverged_forward(failed: Any, relative: Any, tol: Any, mode: str) -> None:
    tol = float(np.max(np.asarray(tol)))
    _raise_or_warn(
        failed,
        relative,
        mode,
        lambda worst: (
            f"deq_jax.solve: a gradient through a forward solve that did not converge (relative residual "
            f"{worst:.2e}, tol {tol:.1e}): the implicit function theorem holds at an equilibrium only, so this "
            f"gradient can be far off (measured: 99.6% off after 3 fixed-point steps at gamma 0.99). Raise maxiter, "
            f"loosen tol or use another solver; read Solution.stats / Solution.result. To record it as data "
            f"instead, differentiate with deq_jax.value_and_grad (BackwardStats.unconverged_forward, make_step's "
            f"metrics); to take the approximate gradient knowingly, pass Implicit(unconverged_forward='ignore')."
        ),
    )


# ----------------------------------------------------------------------------- the one implicit adjoint


@dataclasses.dataclass(frozen=True)
class Representation:
    """How a solver sees the state: the pytree itself, or its flattening (`flat=True`)."""

    flat: bool
    unravel: Callable[[Array], Any]

    def to(self, tree: Any) -> Any:
        return jax.flatten_util.ravel_pytree(tree)[0] if self.flat else tree

    def back(self, z: Any) -> Any:
        return self.unravel(z) if self.flat else z


def _float0_zeros(tree: Any) -> Any:
    """Zero cotangents for `tree`: float0 for integer and boolean leaves, as JAX requires."""

    def zero(leaf: Any) -> Any:
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            return jnp.zeros_like(leaf)
        return np.zeros(leaf.shape, jax.dtypes.float0)

    return jax.tree_util.tree_map(zero, tree)


def _ravel(tree: Any) -> Array:
    return jax.flatten_util.ravel_pytree(tree)[0]


def _linked(tree: Any) -> Any:
    """`tree` with every leaf tied (with a zero weight) to every other: `custom_linear_solve` transposes only a
    right-hand side whose leaves are all linear in the differentiated inputs, and some of ours (the probe's slot, a
    parameter's slot) may not be. The tie is a `select` on a False predicate, not a product with zero: its transpose
    sends exact zeros back, never `0 * inf = nan`."""
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if len(leaves) < 2:
        return tree
    total = sum(jnp.sum(leaf).astype(jnp.float32) for leaf in leaves)
    never = jnp.zeros((), bool)

    def tie(leaf: Array) -> Array:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            return leaf
        return leaf + jnp.where(never, total, jnp.zeros((), jnp.float32)).astype(leaf.dtype)

    return jax.tree_util.tree_map(tie, tree)


def _add(a: Any, b: Any) -> Any:
    return jax.tree_util.tree_map(jnp.add, a, b)


def implicit(
    spec: Implicit,
    solver: AbstractSolver,
    build: Callable[..., Problem],
    rep: Representation,
    fz: Callable,
    rule: Rule,
    maxiter: int,
    tol_b: Any,
    precision: str | None,
    z0: Any,
    params: Any,
    x: Any,
    carried: Any,
    u0: Any,
) -> Any:
    """The forward solve with the implicit function theorem as its JVP, so that forward mode, reverse mode (JAX
    transposes the JVP) and higher orders all hold.

    The JVP solves `(I - J) t = b` with `b = (df/dtheta) dtheta`, as one `jax.lax.custom_linear_solve` whose
    transpose solves `(I - J^T) u = v`; both solves are measured and report their failures. The right-hand side
    carries two more slots with the identity as their matrix: the probe (its cotangent becomes the backward's
    statistics, see `value_and_grad`) and the adjoint start (its cotangent becomes the backward solution `u`).

    `build(fn, params, x)` makes the solver's `Problem` for the map `fn(z, params, x)` on the representation `rep`.
    Returns the solver's `Run` (value in `rep`'s representation), with `(r, f(z))` measured at its value."""
    f_conv, consts = jax.closure_convert(fz, z0, params, x)  # closed-over tracers become explicit inputs
    collected = bool(_PROBES)
    probe = _PROBES[-1] if collected else jnp.zeros((_PROBE_SIZE,), jnp.float32)
    route = spec.linear_solver or solver.default_linear_solver()
    description = f"Implicit(linear_solver={route!r}, tol={spec.tol}, maxiter={spec.maxiter})"
    fn_of = lambda consts: lambda z, p, xx: f_conv(z, p, xx, *consts)

    def forward(z0: Any, consts: Any, params: Any, x: Any, tols: Array, carried: Any) -> Any:
        r = dataclasses.replace(rule, tol=tols[0], atol=tols[1])
        problem = build(fn_of(consts), params, x)
        run = solver.run(problem, rep.to(z0), carried, r, maxiter)
        if run.measured is None:  # the statistics' independent evaluation at the returned value
            fz = problem.fn(run.value)
            run = run._replace(measured=(subtract(fz, run.value), fz))
        return run

    @jax.custom_jvp
    def layer(z0: Any, consts: Any, params: Any, x: Any, tols: Array, carried: Any, u0: Any, probe: Array) -> Any:
        return forward(z0, consts, params, x, tols, carried)

    @layer.defjvp
    def layer_jvp(primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        z0, consts, params, x, tols, _carried, u0, probe = primals
        if route in ("lu", "gmres"):  # dense LU (and GMRES's small least-squares solve) need float32 or float64
            _checks.check_factorisable(
                f"the implicit derivative's linear solver {route!r}", z0, "Use Implicit(linear_solver='bicgstab')."
            )
        _, d_consts, d_params, d_x, _, _, d_u0, d_probe = tangents
        out = layer(*primals)  # itself, so that a higher-order derivative differentiates it by this rule again
        z, f_here = rep.back(out.value), fn_of(consts)
        r, fz = (rep.back(t) for t in out.measured)
        judge = dataclasses.replace(rule, tol=tols[0], atol=tols[1], view=None, to=None)  # on the pytree itself
        holds, diverged = judge.check(r, fz, _reference(out.ref))
        forward_failed = ~holds | diverged
        forward_relative = norms(r) / jnp.maximum(norms(fz), jnp.finfo(jnp.float32).tiny)
        with precision_scope(precision):
            _, b = jax.jvp(lambda c, p, xx: fn_of(c)(z, p, xx), (consts, params, x), (d_consts, d_params, d_x))
        context = (spec, route, solver, build, rep, f_here, z, params, x, out.backward_state, tols[2], maxiter)
        check = _Check(spec, collected, description, forward_failed, forward_relative, tols)

        def matvec(w: tuple) -> tuple:
            t, s, q = w
            return subtract(t, jax.jvp(lambda v: f_here(v, params, x), (z,), (t,))[1]), s, q

        def tangent_solve(_: Callable, rhs: tuple) -> tuple:
            b, s, q = rhs
            with precision_scope(precision):
                t, _iterations, relative, failed, nonfinite = _linear_solve(*context, b, _zeros(b), transpose=False)
            check.report(failed, relative, nonfinite)
            return t, s, q

        def adjoint_solve(_: Callable, cts: tuple) -> tuple:
            v, s, q = cts
            with precision_scope(precision):
                u, iterations, relative, failed, nonfinite = _linear_solve(*context, v, u0, transpose=True)
            stat = check.report(failed, relative, nonfinite, iterations)
            return u, s + stat.astype(s.dtype), _add(q, u)

        rhs = _linked((b, d_probe.astype(probe.dtype), d_u0))
        t, s, q = jax.lax.custom_linear_solve(matvec, rhs, tangent_solve, adjoint_solve)
        t = _linked((t, s, q))[0]  # the probe's and the start's slots flow back through the output's cotangent
        return out, _float0_zeros(out)._replace(value=rep.to(t))

    dtype = jnp.promote_types(jnp.result_type(*[leaf.dtype for leaf in jax.tree_util.tree_leaves(z0)]), jnp.float32)
    tols = jnp.stack([jnp.asarray(t, dtype) for t in (rule.tol, rule.atol, tol_b)])
    return layer(z0, consts, params, x, tols, carried, u0, probe)


def _reference(ref: Any) -> Array:
    return jnp.asarray(jnp.inf if ref is None else ref)


def _zeros(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


@dataclasses.dataclass(frozen=True)
class _Check:
    """The verdicts a linear solve of the implicit derivative reports: its own failure, and the forward solve's."""

    spec: Implicit
    collected: bool
    description: str
    forward_failed: Array
    forward_relative: Array
    tols: Array

    def report(self, failed: Array, relative: Array, nonfinite: Array, iterations: Any = 0) -> Array:
        """Raise or warn at run time (outside `deq_jax.value_and_grad`), and return the probe's statistics."""
        # a residual that is not finite (the solution overflowed) counts as inf; divergence upstream adds nothing
        relative = jnp.where(nonfinite, 0, jnp.where(jnp.isnan(relative), jnp.inf, relative))
        forward_failed = self.forward_failed & ~nonfinite & (self.spec.unconverged_forward != "ignore")
        if not self.collected:
            if self.spec.on_failure != "ignore":
                jax.debug.callback(
                    _report_backward_failure,
                    failed,
                    relative,
                    FAILURE_MARGIN * self.tols[2],
                    self.description,
                    self.spec.on_failure,
                )
            if self.spec.unconverged_forward != "ignore":
                jax.debug.callback(
                    _report_unconverged_forward,
                    forward_failed,
                    self.forward_relative,
                    self.tols[0],
                    self.spec.unconverged_forward,
                )
        stat = jnp.stack(
            [
                jnp.ones((), jnp.float32),
                failed.astype(jnp.float32),
                nonfinite.astype(jnp.float32),
                jnp.minimum(relative.astype(jnp.float32), _LARGE),  # finite: the probe's slot is summed
                jnp.asarray(iterations, jnp.float32),
                forward_failed.astype(jnp.float32),
            ]
        )
        return stat


def _linear_solve(
    spec: Implicit,
    route: str,
    solver: AbstractSolver,
    build: Callable[..., Problem],
    rep: Representation,
    f: Callable,
    z: Any,
    params: Any,
    x: Any,
    bstate: Any,
    tol: Array,
    maxiter: int,
    rhs: Any,
    start: Any,
    *,
    transpose: bool,
) -> tuple[Any, Any, Array, Array, Array]:
    """The solution of `(I - J) t = rhs` (or `(I - J^T) u = rhs` with `transpose`) from `start`, the iterations it
    took, its measured relative residual, and its failed and non-finite-input flags."""
    flat_rhs, unravel = jax.flatten_util.ravel_pytree(rhs)
    flat_z = _ravel(z)
    g = lambda w: f(w, params, x)
    if transpose:
        _, vjp = jax.vjp(g, z)
        apply_J = lambda w: vjp(w)[0]
    else:
        _, apply_J = jax.linearize(g, z)
    matvec = lambda w: w - _ravel(apply_J(unravel(w)))
    iterations: Any = 0
    if route == "forward":
        problem = build(f, params, x)  # the forward's matrix K, should the linear solve factorise again
        forward_affine = problem.affine
        affine = None if forward_affine is None else (lambda: (forward_affine()[0], rep.to(rhs)))
        linear = Problem(lambda w: rep.to(_add(rhs, apply_J(rep.back(w)))), affine, transpose=transpose)
        rule = Rule(tol, 0.0, None, float("inf"), scale=norms(rhs))
        run = solver.run(linear, rep.to(start), bstate, rule, spec.maxiter or maxiter)
        solution, iterations = _ravel(rep.back(run.value)), run.iterations
    elif route == "lu":
        jacobian = jax.jacfwd(lambda w: _ravel(g(unravel(w))))(flat_z)
        eye = jnp.eye(flat_rhs.size, dtype=flat_rhs.dtype)
        solution = jnp.linalg.solve(eye - (jacobian.T if transpose else jacobian), flat_rhs)
    else:
        solution = _jaxopt.linear_solve(route, matvec, flat_rhs, tol, spec.maxiter, init=_ravel(start))
    upstream = jnp.all(jnp.isfinite(flat_rhs)) & jnp.all(jnp.isfinite(flat_z))
    if spec.on_failure == "ignore":
        relative, failed = jnp.zeros((), flat_rhs.dtype), jnp.asarray(False)
    else:
        r = matvec(solution) - flat_rhs
        relative = jnp.linalg.norm(r) / jnp.maximum(jnp.linalg.norm(flat_rhs), jnp.finfo(flat_rhs.dtype).tiny)
        failed = upstream & ~(relative <= FAILURE_MARGIN * tol)  # a non-finite solution with finite inputs fails too
    return unravel(solution), iterations, relative, failed, ~upstream
