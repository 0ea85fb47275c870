"""Limited-memory Broyden on the residual."""

from __future__ import annotations

import dataclasses
from typing import Any

from deq_jax import _checks, _jaxopt
from deq_jax._solver._base import AbstractSolver, Problem


@dataclasses.dataclass(frozen=True)
class Broyden(AbstractSolver):
    """Limited-memory Broyden on `g(z) = f(z) - z` (jaxopt's `Broyden`, on the flattened state).

    `inverse_jacobian_init = -1` starts the inverse-Jacobian estimate at `-I`, the right sign for DEQ residuals
    (`dg/dz = J - I` is near `-I` for a contraction); jaxopt's default `+1` was measured 10x slower or divergent.
    `history_size` bounds the memory (updates kept); None keeps `maxiter` of them.
    """

    name = "broyden"
    flat = True
    inverse_jacobian_init: float = -1.0
    history_size: int | None = None

    def __post_init__(self) -> None:
        _checks.check_finite("Broyden.inverse_jacobian_init", self.inverse_jacobian_init)
        if self.history_size is not None:
            _checks.check_positive("Broyden.history_size", self.history_size, integer=True)

    def _jaxopt(self, problem: Problem) -> Any:
        # solve() binds history_size=None to maxiter before the solver runs
        return _jaxopt.make(
            "broyden", lambda v: problem.fn(v) - v, gamma=self.inverse_jacobian_init, history_size=self.history_size
        )

    def init(self, problem: Problem, z0: Any, carried: Any) -> tuple[Any, tuple[Any, Any]]:
        state = self._jaxopt(problem).init_state(z0)
        return state, (state.value, state.value + z0)  # g(z0) is evaluated here: a start at z* takes no step

    def step(self, problem: Problem, z: Any, state: Any) -> tuple[Any, Any, Any, Any]:
        out = self._jaxopt(problem).update(z, state)
        r = out.state.value
        return out.params, out.state, r, r + out.params
