"""The solver interface and the loops that drive it.

A forward solver is a small frozen dataclass (its fields are its options) with two methods,

    init(problem, z0, carried) -> (state, first)       first: None, or (r0, f0) when init already evaluated f(z0)
    step(problem, z, state) -> (z_next, state, r, fz)  r = f(w) - w and fz = f(w) at the point w it evaluated

and the loops here stop it by the one convergence rule (`deq_jax._rule`): when the rule holds at the evaluated point,
when the iterate diverges, or at `maxiter`. A solver that is better driven by its own loop (an exact solve, a
refinement that measures before it steps) overrides `run`. Adding a solver is one file with one such class and one
export in `deq_jax/__init__.py`: the class registers its `name` for `solve(..., solver="name")` itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from deq_jax._rule import Rule, max_abs

Array = jax.Array
Tree = Any

_REGISTRY: dict[str, type] = {}


class Problem(NamedTuple):
    """What a solver sees: the map `fn(z) = f(z, params, x)` on the solver's representation of the state (the
    pytree, or its flattening for solvers with `flat = True`), and for affine maps `affine() -> (K, c)`, the
    equation `z K = c` (`f(z) = c + z (I - K)`; `transpose=True`: `z K^T = c`, the backward's equation). A solver
    that mixes iterates keeps the samples along `batch_axis` apart (one NaN sample must not reach the others)."""

    fn: Callable[[Tree], Tree]
    affine: Callable[[], tuple[Array, Array]] | None = None
    transpose: bool = False
    batch_axis: int | None = None  # the axis of every state leaf that indexes independent samples (pytree states)


class Run(NamedTuple):
    """What a solver's loop returns: the value, the steps, the divergence reference scale, the state to carry into
    the next solve, the factorisations it computed, `(r, fz)` measured at `value` when the loop measured there (else
    None), and the state the implicit backward may reuse."""

    value: Tree
    iterations: Array
    ref: Array | None
    state: Any
    factorisations: Array
    measured: tuple[Tree, Tree] | None = None
    backward_state: Any = None  # what the implicit backward may reuse (e.g. the forward's LU factors)
    steps: Array | None = None  # with a batch axis: the steps each sample took (None: `iterations` for every one)


@dataclasses.dataclass(frozen=True)
class AbstractSolver:
    """The base of every forward solver (see the module docstring)."""

    name: ClassVar[str] = ""
    flat: ClassVar[bool] = False  # works on the flattened state (one vector of the promoted dtype)
    uses_matrix: ClassVar[bool] = False  # needs `Problem.affine` (an affine map, or a dense Jacobian)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTRY[cls.name] = cls

    def init(self, problem: Problem, z0: Tree, carried: Any) -> tuple[Any, tuple[Tree, Tree] | None]:
        """The solver's state for a run from `z0` (`carried`: what an earlier solve left, or None)."""
        raise NotImplementedError

    def step(self, problem: Problem, z: Tree, state: Any) -> tuple[Tree, Any, Tree, Tree]:
        """One step from `z`: `(z_next, state, r, fz)` with `r = f(w) - w`, `fz = f(w)` at the evaluated `w`."""
        raise NotImplementedError

    def run(self, problem: Problem, z0: Tree, carried: Any, rule: Rule, maxiter: int) -> Run:
        """Iterate until the rule holds, the iterate diverges, or `maxiter` steps."""
        return iterate(self, problem, z0, carried, rule, maxiter)

    def run_unrolled(self, problem: Problem, z0: Tree, rule: Rule, maxiter: int) -> Run:
        """Exactly `maxiter` differentiable steps (the `Unrolled` backward)."""
        return unrolled(self, problem, z0, rule, maxiter)

    def default_linear_solver(self) -> str:
        """The implicit backward's linear solver when `Implicit(linear_solver=None)`."""
        return "bicgstab"  # measured fastest per step (a tanh DEQ: 0.72x GMRES's time), and a few vectors of memory

    @staticmethod
    def registered() -> dict[str, type]:
        """Every solver class by its `name`, sorted (what `solve(..., solver="name")` accepts)."""
        return {name: _REGISTRY[name] for name in sorted(_REGISTRY)}


def solver_names() -> tuple[str, ...]:
    """The names `solve(..., solver=name)` accepts, sorted."""
    return tuple(sorted(_REGISTRY))


def solver_class(name: str) -> type:
    """The solver class registered under `name`."""
    return _REGISTRY[name]


class _Loop(NamedTuple):
    k: Array  # solver steps taken
    z: Tree
    state: Any
    done: Array  # the rule held at the last evaluated point (per sample with a batch axis)
    diverged: Array  # per sample with a batch axis
    ref: Array  # max(|z0|_inf, |f(z0)|_inf): the scale divergence is measured against
    steps: Array  # steps each sample took before it stopped (a scalar without a batch axis)


def _like(new: Any, old: Any) -> Any:
    return new.astype(old.dtype) if hasattr(new, "astype") and hasattr(old, "dtype") else new


def _start(z0: Tree, state: Any, first: tuple[Tree, Tree] | None, rule: Rule, samples: int | None) -> _Loop:
    ref = max_abs(rule.view(z0) if rule.view else z0)
    zero = jnp.zeros((), jnp.int32)
    shape = () if samples is None else (samples,)
    steps = jnp.zeros(shape, jnp.int32)
    if first is None:  # the rule is first checked on f(z0), which the first step computes
        no = jnp.zeros(shape, bool)
        return _Loop(zero, z0, state, no, no, ref, steps)
    r0, f0 = first  # a start that already satisfies the rule takes no step
    ref = jnp.maximum(ref, max_abs(rule.view(f0) if rule.view else f0))
    done, diverged = rule.verdicts(r0, f0, ref) if samples is not None else rule.check(r0, f0, ref)
    return _Loop(zero, z0, state, done, diverged, ref, steps)


def _body(solver: AbstractSolver, problem: Problem, rule: Rule) -> Callable[[_Loop], _Loop]:
    """One step of every sample; with a per-sample problem (`problem.batch_axis`), a sample that met the rule or
    diverged keeps its value (it stops moving). A solver on the flattened state couples the samples (Broyden's
    secant updates): its iterate is never edited, and the loop stops when every sample meets the rule."""

    def body(c: _Loop) -> _Loop:
        z, state, r, fz = solver.step(problem, c.z, c.state)
        ref = jnp.where(c.k == 0, jnp.maximum(c.ref, max_abs(rule.view(fz) if rule.view else fz)), c.ref)
        done, diverged = rule.verdicts(r, fz, ref) if c.done.ndim else rule.check(r, fz, ref)
        frozen = c.done | c.diverged  # judged at an earlier step: this step's value is not taken
        if c.done.ndim:
            z = rule.keep(frozen, c.z, z)
            done, diverged = jnp.where(frozen, c.done, done), jnp.where(frozen, c.diverged, diverged)
        # the carry keeps its dtypes: jaxopt's update can return float64 statistics for a float32 state under x64
        z, state = jax.tree_util.tree_map(_like, (z, state), (c.z, c.state))
        return _Loop(c.k + 1, z, state, done, diverged, ref, c.steps + (~frozen).astype(jnp.int32))

    return body


def _samples(problem: Problem, z0: Tree) -> int | None:
    """The number of samples the loop stops one by one (None: the loop judges the batch as a whole)."""
    if problem.batch_axis is None:
        return None
    return int(jax.tree_util.tree_leaves(z0)[0].shape[problem.batch_axis])


def iterate(solver: AbstractSolver, problem: Problem, z0: Tree, carried: Any, rule: Rule, maxiter: int) -> Run:
    """The common loop: a `lax.while_loop` over `solver.step`, every sample stopped by the rule or its divergence,
    the loop by all samples stopping or `maxiter`."""
    state, first = solver.init(problem, z0, carried)
    c = _start(z0, state, first, rule, _samples(problem, z0))
    c = jax.lax.while_loop(lambda c: (c.k < maxiter) & ~jnp.all(c.done | c.diverged), _body(solver, problem, rule), c)
    steps = c.steps if c.steps.ndim else None
    return Run(c.z, c.k, c.ref, None, jnp.zeros((), jnp.int32), steps=steps)


def unrolled(solver: AbstractSolver, problem: Problem, z0: Tree, rule: Rule, maxiter: int) -> Run:
    """Exactly `maxiter` differentiable steps: the solver's until the rule holds, then `z <- (z + f(z)) / 2`.

    The averaged tail has the same fixed point and, at `z*`, the Jacobian `(I + J) / 2`, whose spectrum lies inside
    the unit disc for every non-expansive map without the eigenvalue 1: the derivative of the unrolled loop then
    converges to the implicit one even where plain iteration's derivative oscillates (e.g. `J = -1`).
    """
    state, first = solver.init(problem, z0, None)
    c = _start(z0, state, first, rule, _samples(problem, z0))
    solver_body = _body(solver, problem, rule)

    def tail(c: _Loop) -> _Loop:
        return c._replace(z=jax.tree_util.tree_map(lambda a, b: (a + b) / 2, c.z, problem.fn(c.z)))

    def body(c: _Loop, _: None) -> tuple[_Loop, None]:
        return jax.lax.cond(jnp.all(c.done | c.diverged), tail, solver_body, c), None

    c, _ = jax.lax.scan(body, c, None, length=maxiter)
    return Run(c.z, c.k, c.ref, None, jnp.zeros((), jnp.int32))
