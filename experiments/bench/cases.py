"""The rows of each suite. One line per row (or per small family of rows): to add a row, add its case here.

- `step` (`make bench`): one DELM training step with the direct, Anderson, fixed-point and Broyden solvers
  (implicit backward) in both formulations, each next to the same computation written inline with plain JAX +
  jaxopt; the bare m x m LU factorisation (the yardstick of the transposed step); training runs with warm starts
  (`TRAINING_RUNS`, experiments/bench/training.py: the state carried by `TrainStep.update`) next to the same runs
  started from zero at every step; and the implicit vs unrolled backward's XLA temporary memory at exactly
  `MEMORY_ITERATIONS` fixed-point iterations.
- `peer`: the same step (and a nonlinear tanh DEQ) through every deq_jax forward solver x backward mode, the inline
  baseline, torchdeq and plain PyTorch, with the same data, tolerance and stopping rule.
- `gpu`: the peer suite's rows (the CLI runs them at full batch on a GPU).

The torch and torchdeq rows are always listed here (building a `Case` imports nothing); the CLI leaves them out,
with a note, where torch or torchdeq is not installed. The `profile` suite is not a list of training steps: its
entries live in `experiments/bench/profile.py`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from experiments.bench import jax_cases as bj
from experiments.bench import torch_cases as bt
from experiments.bench import training
from experiments.bench.problem import Problem
from experiments.bench.protocol import Case

FORMULATIONS = ("transposed", "per_sample")
STEP_SOLVERS = ("direct", "anderson", "fixed_point", "broyden")
ITERATIVE = ("anderson", "fixed_point", "broyden")
MEMORY_ITERATIONS = 100  # the unrolled-vs-implicit comparison runs exactly this many fixed-point iterations
#: unreachable on purpose (0.9^100 = 2.7e-5 at gamma 0.9), so both backward modes run all MEMORY_ITERATIONS
#: iterations; float32's finest measurable tolerance is 4.8e-7 (deq_jax refuses finer ones)
MEMORY_TOL = 5e-7
MEMORY_LABEL = f"{MEMORY_ITERATIONS} it"
#: (formulation, solver, with a zero-start twin): the training runs of the step suite. "refine" keeps LU factors
#: across steps; "direct" factorises at every step (its warm path, the yardstick of "refine"); the iterative solvers
#: are run twice, warm and from zero, so that their ratio is the warm start's gain
TRAINING_RUNS = (
    ("transposed", "refine", False),
    ("transposed", "direct", False),
    ("transposed", "anderson", True),
    ("per_sample", "fixed_point", True),
    ("per_sample", "anderson", True),
)


@dataclasses.dataclass(frozen=True)
class Where:
    """Where the rows run: the JAX device, the matmul precision, and the torch device ("cpu" or "gpu")."""

    device: Any
    precision: str | None
    torch_device: str = "cpu"

    @property
    def jax(self) -> dict:
        return {"device": self.device, "precision": self.precision}


def _memory_row(p: Problem, w: Where, formulation: str, backward: str, linear_solver: str | None = None) -> Case:
    """A fixed-point row that runs exactly MEMORY_ITERATIONS iterations (the XLA temporary memory comparison)."""
    return bj.deq_jax_delm(
        p,
        formulation,
        "fixed_point",
        backward,
        tol=MEMORY_TOL,
        maxiter=MEMORY_ITERATIONS,
        **w.jax,
        linear_solver=linear_solver,
        backward_tol=p.tol if backward == "implicit" else None,
        unconverged_forward="ignore",  # the forward stops at maxiter by design: its gradient is taken knowingly
        label=MEMORY_LABEL,
        note=f"forward tol {MEMORY_TOL:g}: runs all {MEMORY_ITERATIONS} iterations by design (memory comparison); "
        f"implicit backward at tol {p.tol:g}",
    )


def step_suite(p: Problem, w: Where) -> list[Case]:
    cases: list[Case] = []
    for formulation in FORMULATIONS:
        for solver in STEP_SOLVERS:
            cases.append(bj.deq_jax_delm(p, formulation, solver, "implicit", **w.jax))
            cases.append(bj.inline_delm(p, formulation, solver, **w.jax))
    cases.append(bj.lu_factor(p, **w.jax))
    for formulation, solver, twin in TRAINING_RUNS:
        cases.append(training.training_delm(p, formulation, solver, **w.jax))
        if twin:
            cases.append(training.training_delm(p, formulation, solver, zero_start=True, **w.jax))
    # the default backward (the model's choice: "forward" or BiCGSTAB) next to BiCGSTAB named explicitly
    cases.append(_memory_row(p, w, "transposed", "implicit"))
    cases.append(_memory_row(p, w, "transposed", "unrolled"))
    cases.append(_memory_row(p, w, "per_sample", "implicit"))
    cases.append(_memory_row(p, w, "per_sample", "implicit", linear_solver="bicgstab"))
    cases.append(_memory_row(p, w, "per_sample", "unrolled"))
    return cases


def peer_suite(p: Problem, w: Where) -> list[Case]:
    jx, tdev = w.jax, w.torch_device
    cases: list[Case] = []
    # DELM, per-sample (the generic DEQ form; torchdeq's natural use)
    cases.append(bj.deq_jax_delm(p, "per_sample", "direct", "implicit", **jx))
    cases.append(bj.deq_jax_delm(p, "per_sample", "direct", "one_step", **jx))
    for solver in ITERATIVE:
        for backward in ("implicit", "one_step", "unrolled"):
            cases.append(bj.deq_jax_delm(p, "per_sample", solver, backward, **jx))
    for linear_solver in ("bicgstab", "normal_cg"):
        cases.append(bj.deq_jax_delm(p, "per_sample", "anderson", "implicit", linear_solver=linear_solver, **jx))
    for solver in STEP_SOLVERS:
        cases.append(bj.inline_delm(p, "per_sample", solver, **jx))
    cases.append(bt.torch_direct_delm(p, "per_sample", device=tdev))
    for solver in ITERATIVE:
        for backward in ("implicit", "one_step"):
            cases.append(bt.torchdeq_delm(p, "per_sample", solver, backward, device=tdev))
    # DELM, transposed (end to end: m_y right-hand sides)
    cases.append(bj.deq_jax_delm(p, "transposed", "direct", "implicit", **jx))
    for solver in ITERATIVE:
        for backward in ("implicit", "one_step", "unrolled"):
            cases.append(bj.deq_jax_delm(p, "transposed", solver, backward, **jx))
    cases.append(bj.inline_delm(p, "transposed", "direct", **jx))
    cases.append(bj.inline_delm(p, "transposed", "anderson", **jx))
    cases.append(bt.torch_direct_delm(p, "transposed", device=tdev))
    for solver in ("anderson", "fixed_point"):
        cases.append(bt.torchdeq_delm(p, "transposed", solver, "implicit", device=tdev))
    # a nonlinear DEQ
    for solver in ("anderson", "fixed_point"):
        cases.append(bj.deq_jax_tanh(p, solver, "implicit", **jx))
        cases.append(bj.deq_jax_tanh(p, solver, "implicit", linear_solver="bicgstab", **jx))
        cases.append(bj.inline_tanh(p, solver, **jx))
        cases.append(bt.torchdeq_tanh(p, solver, "implicit", device=tdev))
    return cases


#: suite name -> its rows (the `profile` and `sweep` suites are not lists of training steps)
SUITES: dict[str, Callable[[Problem, Where], list[Case]]] = {"step": step_suite, "peer": peer_suite, "gpu": peer_suite}


def select(cases: list[Case], rows: str | None, skip: str | None) -> list[Case]:
    """The cases whose name matches the regular expression `rows` (all if None) and not `skip`."""
    return [c for c in cases if (rows is None or re.search(rows, c.name)) and not (skip and re.search(skip, c.name))]
