"""Anderson acceleration."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from deq_jax import _checks, _jaxopt
from deq_jax._solver._base import AbstractSolver, Problem


@dataclasses.dataclass(frozen=True)
class Anderson(AbstractSolver):
    """Anderson acceleration (jaxopt's `AndersonAcceleration` with a scale-invariant ridge): mixes the last
    `history_size` iterates; `ridge` is relative to the mean diagonal of the residual Gram matrix. With a batch axis
    every sample has its own history weights: samples never influence each other."""

    name = "anderson"
    history_size: int = 5
    beta: float = 1.0
    ridge: float = 1e-5

    def __post_init__(self) -> None:
        if not (isinstance(self.history_size, int) and self.history_size >= 2):
            raise ValueError(f"Anderson.history_size must be an integer >= 2; got {self.history_size!r}")
        _checks.check_positive("Anderson.beta", self.beta)
        _checks.check_positive("Anderson.ridge", self.ridge)

    def _jaxopt(self, problem: Problem) -> Any:
        return _jaxopt.make(
            "anderson",
            problem.fn,
            history_size=self.history_size,
            beta=self.beta,
            ridge=self.ridge,
            batch_axis=problem.batch_axis,
        )

    def init(self, problem: Problem, z0: Any, carried: Any) -> tuple[Any, None]:
        return self._jaxopt(problem).init_state(z0), None

    def step(self, problem: Problem, z: Any, state: Any) -> tuple[Any, Any, Any, Any]:
        out = self._jaxopt(problem).update(z, state)
        pos = (out.state.iter_num - 1) % self.history_size
        r = jax.tree_util.tree_map(lambda h: h[pos], out.state.residuals_history)
        return out.params, out.state, r, out.params
