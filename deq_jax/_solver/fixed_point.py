"""Plain fixed-point iteration."""

from __future__ import annotations

import dataclasses
from typing import Any

from deq_jax import _jaxopt
from deq_jax._rule import subtract
from deq_jax._solver._base import AbstractSolver, Problem


@dataclasses.dataclass(frozen=True)
class FixedPoint(AbstractSolver):
    """Plain fixed-point iteration `z <- f(z)` (jaxopt's `FixedPointIteration`): about `log(tol) / log(gamma)`
    steps for a `gamma`-contraction."""

    name = "fixed_point"

    def init(self, problem: Problem, z0: Any, carried: Any) -> tuple[Any, None]:
        return _jaxopt.make("fixed_point", problem.fn).init_state(z0), None

    def step(self, problem: Problem, z: Any, state: Any) -> tuple[Any, Any, Any, Any]:
        out = _jaxopt.make("fixed_point", problem.fn).update(z, state)
        return out.params, out.state, subtract(out.params, z), out.params
