"""LU-preconditioned iterative refinement with factors kept across solves."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deq_jax import _checks
from deq_jax._rule import Rule, max_abs, subtract
from deq_jax._solver._base import AbstractSolver, Problem, Run
from deq_jax._solver._lu import Factors, factor, right_solve, when
from deq_jax._solver.direct import Direct

Array = jax.Array


class RefineState(NamedTuple):
    """What `Refine` carries from one solve to the next: the LU factors of an earlier `K`, and whether the solve
    that used them last needed more than `refactor_after` sweeps (then the next solve factorises its own `K`)."""

    factors: Factors
    stale: Array


@dataclasses.dataclass(frozen=True)
class Refine(AbstractSolver):
    """Iterative refinement with the LU factors of an earlier matrix, for affine maps (e.g. the DELM in training).

    In training, `K = U_t = I - gamma sigma(A_t)` moves a little at every step. Factorising costs `2/3 m^3`; one
    sweep `z <- z + (f(z) - z) K_old^{-1}` costs two triangular solves and one map application (`O(k m^2)` for `k`
    right-hand sides), and the error contracts by `E <- E (K_old - K) K_old^{-1}` per sweep. Every sweep measures the
    true residual `f(z) - z`, so the result is exact to tolerance whatever the factors.

    Carry `Solution.state` into the next solve (`solve(..., solver_state=...)`) to keep the factors; without it the
    first solve factorises. `max_sweeps`: sweeps after which a solve that has not converged factorises its current
    `K` and finishes with it. `refactor_after`: a solve that needed more sweeps than this marks its factors stale, and
    the next solve factorises its own `K` first (two sweeps still cost less than one factorisation).
    The implicit backward reuses the factors and refines from its own start (`Implicit(linear_solver="forward")`).
    """

    name = "refine"
    uses_matrix = True
    max_sweeps: int = 6
    refactor_after: int = 2

    def __post_init__(self) -> None:
        _checks.check_positive("Refine.max_sweeps", self.max_sweeps, integer=True)
        _checks.check_positive("Refine.refactor_after", self.refactor_after, integer=True)

    def initial_state(self, K: Array) -> RefineState:
        """A `RefineState` with fresh factors of `K` (e.g. to start training with kept factors)."""
        return RefineState(factor(K), jnp.zeros((), bool))

    def run(self, problem: Problem, z0: Any, carried: Any, rule: Rule, maxiter: int) -> Run:
        assert problem.affine is not None
        K = lambda: problem.affine()[0]
        if carried is None:
            factors, made = factor(K()), jnp.ones((), jnp.int32)
        else:
            factors = when(carried.stale, lambda _: factor(K()), carried.factors)
            made = carried.stale.astype(jnp.int32)

        def measure(z: Any) -> tuple[Any, Any]:
            fz = problem.fn(z)
            return subtract(fz, z), fz

        r0, f0 = measure(z0)
        ref = jnp.maximum(max_abs(z0), max_abs(f0))

        def frozen(r: Any, fz: Any) -> Array:  # per sample with a batch axis: met the rule, or diverged
            done, diverged = rule.verdicts(r, fz, ref)
            return done | diverged

        def cond(c: tuple) -> Array:
            k, _, r, fz, _, _, _ = c
            return (k < maxiter) & ~jnp.all(frozen(r, fz))

        def body(c: tuple) -> tuple:
            k, z, r, fz, factors, made, since = c
            stalled = since >= self.max_sweeps
            factors = when(stalled, lambda _: factor(K()), factors)
            made, since = made + stalled.astype(jnp.int32), jnp.where(stalled, 0, since)
            kept = frozen(r, fz)  # a sample that is done (or NaN) keeps its value, its residual and its image
            z_new = jax.tree_util.tree_map(lambda a, d: a + right_solve(factors, d, problem.transpose), z, r)
            r_new, fz_new = measure(z_new)
            z, r, fz = (rule.keep(kept, old, new) for old, new in ((z, z_new), (r, r_new), (fz, fz_new)))
            return k + 1, z, r, fz, factors, made, since + 1

        zero = jnp.zeros((), jnp.int32)
        k, z, r, fz, factors, made, _ = jax.lax.while_loop(cond, body, (zero, z0, r0, f0, factors, made, zero))
        state = RefineState(factors, k > self.refactor_after)
        return Run(z, k, ref, state, made, measured=(r, fz), backward_state=RefineState(factors, jnp.asarray(False)))

    def run_unrolled(self, problem: Problem, z0: Any, rule: Rule, maxiter: int) -> Run:
        return Direct().run_unrolled(problem, z0, rule, maxiter)  # nothing carried: an exact, differentiable solve

    def default_linear_solver(self) -> str:
        return "forward"
