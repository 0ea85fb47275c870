"""The step suite's training-run rows: consecutive steps of one training run through `deq_jax.make_step`'s
`TrainStep.update`, the solver state carried from step to step (label "warm") or reset to zero before every step
(label "zero start": the same step, started from zero), so that warm starts are measured on the trajectory they
serve, not on a repeated first step.

Each row
- builds `make_step(DELM(...), "square", optax.sgd(lr), jit=False)` and compiles its `update` with the training
  state donated, `jax.jit(update, donate_argnums=0)` (a training loop replaces the state by the next one, so XLA
  may reuse its buffers); `compile` is that program's `lower(...).compile()`;
- runs `--warm-steps` untimed training steps (the first from zero: by the last, the carried state is the previous
  step's solution in a run that has left its first, large moves), then its timed steps, each one more step of the
  same run: every timed step starts from the equilibrium (and adjoint, and LU factors) of the step before it;
- records every step's metrics (forward and backward iterations, the library's own convergence verdicts, LU
  refactorisations for "refine", the loss), the timed ones marked;
- is checked independently twice, before its timed steps and after them: a separate program computes the step's
  gradient at the run's current state through the same library path (`deq_jax.value_and_grad` of the loss through
  `DELM.apply` with the carried `Warm`, started from the same carried state) and returns the equilibrium, whose
  float64 residual and gradients (against the float64 closed form at the run's current parameters) are judged like
  every other row's. A warm start that passed a non-converged solve would be flagged.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import deq_jax
from deq_jax.losses import square
from deq_jax.train import make_step
from experiments.bench.jax_cases import precision_context
from experiments.bench.problem import Problem
from experiments.bench.protocol import Case, Check, Prepared
from experiments.common import models as model_lib

WARM = "warm"
ZERO_START = "zero start"
LABELS = (WARM, ZERO_START)
#: the per-step metrics a training-run row records (those the step returns)
RECORDED = (
    "loss",
    "iterations",
    "backward_iterations",
    "converged",
    "backward_failures",
    "factorisations",
    "relative_residual",
)


def is_training(row: dict) -> bool:
    """A row of a training run (warm or zero start)."""
    return row.get("label") in LABELS


def _numpy(tree: dict) -> dict:
    return {k: np.asarray(v) for k, v in tree.items()}


def _record(history: list, first_timed: int) -> dict:
    """Per-step metrics of a run as lists, and their summary over the timed steps."""
    fetched = jax.device_get(history)
    per_step = {key: [np.asarray(m[key]).item() for m in fetched] for key in RECORDED if fetched and key in fetched[0]}
    timed = lambda key: per_step[key][first_timed:] if key in per_step else []
    mean = lambda values: float(np.mean(values)) if len(values) else None
    not_converged = [k for k, ok in enumerate(per_step.get("converged", [])) if not ok]
    failures = [k for k, n in enumerate(per_step.get("backward_failures", [])) if n]
    losses = per_step.get("loss", [])
    return {
        "per_step": per_step,
        "steps": len(fetched),
        "first_timed_step": first_timed,
        "iterations_mean": mean(timed("iterations")),
        "backward_iterations_mean": mean(timed("backward_iterations")),
        # LU factorisations the steps' forward solves computed (refine: refactorisations; direct: one a step)
        "refactorisations": int(sum(per_step["factorisations"])) if "factorisations" in per_step else None,
        "refactorisations_timed": int(sum(timed("factorisations"))) if "factorisations" in per_step else None,
        "steps_not_converged_own": sorted(set(not_converged) | set(failures)),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_fell": bool(losses and np.isfinite(losses[-1]) and losses[-1] < losses[0]),
    }


def training_delm(
    p: Problem, formulation: str, solver: str, *, zero_start: bool = False, device: Any, precision: str | None
) -> Case:
    """A DELM training run through `TrainStep.update` (see the module docstring)."""

    def prepare() -> Prepared:
        model = model_lib.build(
            "delm",
            p.m,
            p.m_y,
            gamma=p.gamma,
            formulation=formulation,
            solver=solver,
            backward="implicit",
            tol=p.tol,
            maxiter=p.maxiter,
            precision=precision,
        )
        step = make_step(model, "square", optax.sgd(p.learning_rate), jit=False)
        params = jax.device_put({k: jnp.asarray(v) for k, v in p.delm.items()}, device)
        phi, y = jax.device_put((jnp.asarray(p.phi), jnp.asarray(p.y)), device)

        def start(state, phi):  # "zero start": the solver state a run's first step has, at every step
            return state._replace(warm=model.warm_start(state.params, phi)) if zero_start else state

        def update(state, phi, y):
            return step.update(start(state, phi), phi, y)

        def check(state, phi, y):
            state = start(state, phi)

            def objective(params, adjoint):  # the step's own gradient: the loss through the warm-started solve
                predictions, solution = model.apply(params, phi, state.warm._replace(adjoint=adjoint))
                return square(predictions, y), solution

            (_, solution), (grads, _), backward = deq_jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
                state.params, state.warm.adjoint
            )
            return grads, solution.stats, backward, solution.value, state.params

        with precision_context(precision):
            state = jax.jit(step.init)(params, phi)
            begin = time.perf_counter()
            compiled = jax.jit(update, donate_argnums=0).lower(state, phi, y).compile()
            compile_s = time.perf_counter() - begin
            check_fn = jax.jit(check)
        memory = compiled.memory_analysis()
        run_state, history = {"state": state}, []

        def run():
            new, metrics = compiled(run_state["state"], phi, y)
            run_state["state"] = new
            history.append(metrics)
            return jax.block_until_ready((new, metrics))

        def do_check() -> Check:
            with precision_context(precision):
                grads, stats, backward, equilibrium, at = check_fn(run_state["state"], phi, y)
            extra = {
                "backward_iterations": int(backward.iterations),
                "backward_converged": int(backward.failures) == 0 and int(backward.nonfinite) == 0,
            }
            own = bool(stats.converged) and extra["backward_converged"]
            return Check(
                iterations=int(stats.iterations),
                converged=own,
                state=np.asarray(equilibrium),
                grads=_numpy(grads),
                extra=extra,
                params=_numpy(at),
            )

        return Prepared(
            run=run,
            check=do_check,
            compile_s=compile_s,
            temp_bytes=None if memory is None else int(memory.temp_size_in_bytes),
            after_timing=lambda first_timed: (_record(history, first_timed), do_check()),
        )

    what = (
        "the carried solver state reset to zero before every step (the same step, started from zero)"
        if zero_start
        else "the solver state carried from step to step"
    )
    return Case(
        "deq_jax",
        "delm",
        formulation,
        solver,
        "implicit",
        prepare,
        label=ZERO_START if zero_start else WARM,
        note=f"consecutive steps of one training run through TrainStep.update, {what}",
    )
