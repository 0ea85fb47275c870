"""Relaxed (damped) fixed-point iteration."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from deq_jax import _checks
from deq_jax._rule import subtract
from deq_jax._solver._base import AbstractSolver, Problem


@dataclasses.dataclass(frozen=True)
class Relaxed(AbstractSolver):
    """Relaxed (Krasnoselskii-Mann) iteration `z <- z + damping (f(z) - z)`, `0 < damping <= 1`.

    It has the fixed points of `f`, and at `z*` the Jacobian `(1 - damping) I + damping J`: for a non-expansive map
    whose Jacobian has eigenvalues near `-1` (where plain iteration oscillates and Anderson's history can stall) a
    damping of 1/2 maps them into the unit disc. `damping = 1` is plain fixed-point iteration. Memory is one state,
    whatever `maxiter`.
    """

    name = "relaxed"
    damping: float = 0.5

    def __post_init__(self) -> None:
        _checks.check_positive("Relaxed.damping", self.damping)
        if not self.damping <= 1:
            raise ValueError(f"Relaxed.damping must be in (0, 1]; got {self.damping!r}")

    def init(self, problem: Problem, z0: Any, carried: Any) -> tuple[None, None]:
        return None, None

    def step(self, problem: Problem, z: Any, state: Any) -> tuple[Any, Any, Any, Any]:
        fz = problem.fn(z)
        r = subtract(fz, z)
        z_next = jax.tree_util.tree_map(lambda a, d: a + jnp.asarray(self.damping, a.dtype) * d, z, r)
        return z_next, state, r, fz
