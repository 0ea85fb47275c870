"""An exact linear solve for affine maps."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from deq_jax import _checks
from deq_jax._rule import Rule
from deq_jax._solver._base import AbstractSolver, Problem, Run
from deq_jax._solver._lu import factor, right_solve


@dataclasses.dataclass(frozen=True)
class Direct(AbstractSolver):
    """An exact linear solve for maps affine in `z`: `z K = c` where `f(z) = c + z (I - K)` (one LU).

    Uses the map's `affine(params, x) -> (M, c)` with `f(z) = z @ M.T + c` when it has one (the DELM maps do: the
    closed form); otherwise the Jacobian is materialised at `z = 0` (`jax.jacfwd`), which is only sensible for small
    states (at most `max_dense` numbers). On a map that is not affine the result is not an equilibrium, and the
    statistics say so. The implicit backward reuses the factors (`Implicit(linear_solver="forward")`, its default
    here): one LU per forward-and-backward pass.
    """

    name = "direct"
    uses_matrix = True
    max_dense: int = 16384

    def __post_init__(self) -> None:
        _checks.check_positive("Direct.max_dense", self.max_dense, integer=True)

    def run(self, problem: Problem, z0: Any, carried: Any, rule: Rule, maxiter: int) -> Run:
        assert problem.affine is not None
        K, c = problem.affine()
        factors = factor(K) if carried is None else carried  # carried: the forward's factors, in the backward
        z = right_solve(factors, c, problem.transpose)
        made = jnp.asarray(carried is None, jnp.int32)
        return Run(z, jnp.zeros((), jnp.int32), None, None, made, backward_state=factors)

    def run_unrolled(self, problem: Problem, z0: Any, rule: Rule, maxiter: int) -> Run:
        return self.run(problem, z0, None, rule, maxiter)  # plain autodiff through the LU and its solves

    def default_linear_solver(self) -> str:
        return "forward"
