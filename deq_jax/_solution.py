"""What a solve returns: a result code whose members carry their messages, the statistics, and the backward's."""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Result(enum.IntEnum):
    """Why a solve ended. `Solution.result` holds the member's integer code (an array under `jit`/`vmap`);
    `Result(int(code)).message` says what it means and what to change."""

    successful = 0
    not_converged = 1
    diverged = 2
    nonfinite = 3
    backward_failed = 4

    @property
    def message(self) -> str:
        """One sentence: what happened and what to change."""
        return _MESSAGES[self]

    @classmethod
    def describe(cls, code: Any) -> str:
        """`"name: message"` for a concrete code (an int or a 0-d array)."""
        member = cls(int(np.asarray(code)))
        return f"{member.name}: {member.message}"


_MESSAGES = {
    Result.successful: "the convergence rule |f(z) - z| <= tol |f(z)| + atol holds at the returned value",
    Result.not_converged: (
        "the solver stopped with the convergence rule not met at the returned value (maxiter reached, or a direct "
        "solve's rounding above tol): raise maxiter, loosen tol, or use float64 or another solver"
    ),
    Result.diverged: (
        "an entry of the iterate grew beyond eps^(-3/4) times the start's scale: the map does not contract there, "
        "or the solver ran away (try FixedPoint or Relaxed, or a smaller step size in training)"
    ),
    Result.nonfinite: "the returned value or its image is NaN or infinite (bad input, or divergence)",
    Result.backward_failed: (
        "the implicit backward did not solve (I - J^T) u = v to its tolerance, so the gradient would be wrong"
    ),
}


class SolveStats(NamedTuple):
    """What a forward solve did, measured at the returned value. Under `vmap` each field gains the mapped axis."""

    iterations: Array
    """int32: solver steps taken (0 for `Direct`; a start that already satisfies the rule takes 0 or 1)."""
    residual: Array
    """`|f(z) - z|_2` over the pytree (with `batch_axis`: the largest per-sample value)."""
    relative_residual: Array
    """`|f(z) - z| / |f(z)|` (with `batch_axis`: the largest per-sample value)."""
    converged: Array
    """bool: the convergence rule holds (for every sample) and the solve did not diverge."""
    diverged: Array
    """bool: a non-finite value, or an entry beyond `eps^(-3/4)` times the start's scale."""
    factorisations: Array
    """int32: matrix factorisations computed by this solve (`Direct`: 1; `Refine`: 0 while kept factors serve)."""


class SampleStats(NamedTuple):
    """The statistics of every sample of a solve with `batch_axis` (each field has shape `(n,)`): every sample
    iterates until it alone meets the rule (or diverges), then stops moving."""

    iterations: Array
    """int32: solver steps this sample took before it met the rule or diverged (the loop's steps for solvers that
    move every sample together: `Refine`, `Direct`)."""
    residual: Array
    """`|f(z) - z|_2` of this sample."""
    relative_residual: Array
    """`|f(z) - z| / |f(z)|` of this sample."""
    converged: Array
    """bool: the rule holds for this sample and it did not diverge."""
    diverged: Array
    """bool: this sample is not finite, or grew beyond `eps^(-3/4)` times the start's scale."""
    result: Array
    """int32 `Result` code of this sample."""


class Solution(NamedTuple):
    """The result of `deq_jax.solve`."""

    value: Any
    """The equilibrium `z*`, of `z0`'s structure and dtypes (for `OneStep`: `f(z*)`, differentiable)."""
    result: Array
    """int32 code of `Result` (`Result.successful` when `stats.converged`)."""
    stats: SolveStats
    """The forward solve's statistics."""
    aux: Any = None
    """With `has_aux=True`: the map's aux output at the returned value (differentiable)."""
    state: Any = None
    """The solver's state to carry into the next solve (`solve(..., solver_state=...)`), e.g. `Refine`'s LU
    factors; None for solvers that carry nothing."""
    samples: SampleStats | None = None
    """With `batch_axis`: the statistics of every sample (`stats` summarises the worst one)."""


def result_code(converged: Array, diverged: Array, finite: Array) -> Array:
    """The `Result` code of a forward solve from its verdicts."""
    code = jnp.where(converged, Result.successful, Result.not_converged)
    code = jnp.where(diverged, Result.diverged, code)
    return jnp.where(finite, code, Result.nonfinite).astype(jnp.int32)


class BackwardStats(NamedTuple):
    """What the implicit backward passes of one `deq_jax.value_and_grad` call did (sums over the solves: vmapped
    solves count once per sample)."""

    solves: Array
    """int32: backward linear solves run."""
    failures: Array
    """int32: solves whose relative residual exceeded `FAILURE_MARGIN` x their tol, or whose solution was not
    finite while their inputs were."""
    nonfinite: Array
    """int32: solves whose cotangent or equilibrium was not finite (divergence upstream, never a failure)."""
    relative_residual: Array
    """Sum of `|(I - J^T) u - v| / |v|` over the solves (inf where `u` is not finite)."""
    iterations: Array
    """int32: steps of the backward solves that count them (`linear_solver="forward"`); Krylov solvers report 0."""
    unconverged_forward: Array
    """int32: backward passes taken through a forward solve that did not converge (or diverged): their gradient is
    not the implicit one (see `Implicit.unconverged_forward`)."""

    def metrics(self, prefix: str = "backward_") -> dict:
        """The fields as a flat metrics dict: `backward_solves`, `backward_failures`, ..."""
        return {prefix + k: v for k, v in self._asdict().items()}
