"""The row protocol of the benchmarks: what a row is (`Case`), what building it gives (`Prepared`), and what its
untimed check returns (`Check`).

A `Case` is cheap to build (its `prepare` is lazy: nothing is imported, compiled or allocated until it runs), so a
suite can list every row, torch rows included, on a machine without torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

#: backward modes whose gradient is an approximation by design (the Jacobian-free one-step gradient)
APPROXIMATE_BACKWARDS = ("one_step",)


@dataclasses.dataclass
class Check:
    """What one row's computation returned, gathered outside the timed step."""

    iterations: int | None  # forward iterations (0 for direct solves)
    converged: bool | None  # the implementation's own verdict (None where it has none)
    state: Any  # the equilibrium (z for per-sample, W for transposed), a numpy array
    grads: dict  # parameter name -> gradient (numpy); empty for rows that compute no gradient
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. torchdeq's backward iterations
    params: dict | None = None  # the parameters the gradient was taken at (numpy); None: the problem's initial


@dataclasses.dataclass
class Prepared:
    """A row ready to time: `run()` performs one full training step and waits for it to finish."""

    run: Callable[[], Any]
    check: Callable[[], Check]
    compile_s: float | None = None  # jax: trace + XLA compile of the whole step
    temp_bytes: int | None = None  # XLA temporary memory of the compiled step
    reset: Callable[[], None] | None = None  # untimed, before each timed step (torch: restore the parameters)
    peak_memory: Callable[[], int | None] | None = None  # device peak bytes after a step, where measurable
    # a training run (state carried from step to step): how many untimed steps before its timed ones (instead of
    # the suite's --warmup), and, after the timed steps, its per-step record and a second check at its then state
    warmup: int | None = None
    after_timing: Callable[[int], tuple[dict, Check]] | None = None  # (index of the first timed step)


@dataclasses.dataclass
class Case:
    """One row of a benchmark table; `prepare()` builds (and, for JAX, compiles) it."""

    impl: str  # "deq_jax" | "inline" | "torchdeq" | "torch"
    problem: str  # "delm" | "tanh"
    formulation: str  # "transposed" | "per_sample"
    solver: str  # "direct" | "anderson" | "fixed_point" | "broyden" | "lu_factor" (the bare factorisation)
    backward: str  # "implicit[...]" | "one_step" | "unrolled" | "autodiff" | "" (no gradient)
    prepare: Callable[[], Prepared]
    label: str = ""  # extra words for the row name (e.g. "100 it")
    note: str = ""
    tol: float | None = None  # the row's relative tolerance if not the problem's

    @property
    def name(self) -> str:
        parts = [self.impl, self.problem, self.formulation, self.solver, self.backward, self.label]
        return " ".join(part for part in parts if part)

    @property
    def approximate_gradient(self) -> bool:
        """True where the gradient is approximate by design (the plots and tables mark these rows)."""
        return self.backward in APPROXIMATE_BACKWARDS
