"""Verdicts on a training history: bad data first, then divergence, then unconverged solves (each is the cause of
what follows it).

Bad data (NaN/inf features, targets outside the loss's domain, recorded by `make_step` as `nonfinite_features` and
`bad_targets`) makes the loss NaN whatever the step size: `check_converged` names the data. A loss that is already
non-finite at step 0, before any update, is not the step size's doing either. Otherwise a run whose loss became
NaN/inf or grew diverged: its step size is too large for the problem, and every solve that "did not converge" after
that point only follows from non-finite or exploding parameters. Blaming the solver there sends the user to the
wrong knob, so `check_converged` names the step size. Solver advice comes only when the loss behaved, and fits the
solver: iterative solvers have `maxiter`, a direct solve does not.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from deq_jax import _checks

Metrics = dict


class NonConvergenceWarning(RuntimeWarning):
    """An equilibrium solve inside training stopped before reaching its tolerance."""


class NonConvergenceError(RuntimeError):
    """Raised by `check_converged(..., on_failure="raise")` when a solve missed its tolerance."""


class DivergenceWarning(RuntimeWarning):
    """The training loss became NaN/inf or grew: the step size is too large for the problem."""


class DivergenceError(RuntimeError):
    """Raised by `check_converged(..., on_failure="raise")` when the training loss diverged."""


class DataWarning(RuntimeWarning):
    """The training data held NaN/inf features or targets outside the loss's domain: the loss is NaN because of
    the data, not of the step size or the solver."""


class DataError(ValueError):
    """Raised by `check_converged(..., on_failure="raise")` when the training data was bad (see `DataWarning`)."""


#: the per-step metrics (`make_step`'s) that count bad samples, and what they mean
DATA_METRICS = {
    "nonfinite_features": "samples with NaN/inf features",
    "bad_targets": "samples with targets outside the loss's domain (NaN/inf, labels outside [0, classes), ...)",
}


#: a loss that ends more than this fraction above where it started has grown (noise of mini-batch means included)
GROWTH = 0.1


def divergence(history: Metrics) -> str | None:
    """What went wrong with the loss, or None: non-finite (the first step where it was), or grown from the first
    step to the last (for a mini-batch history `(epochs, batches)`, the first and last epochs' means)."""
    loss = np.asarray(history["loss"], dtype=float)
    flat = loss.reshape(-1)
    bad = np.flatnonzero(~np.isfinite(flat))
    if bad.size:
        first_bad = int(bad[0])
        what = "NaN" if np.isnan(flat[first_bad]) else "infinite"
        return f"the loss became {what} at step {first_bad} (it was {flat[0]:.4g} at step 0)"
    start, end = (loss[0].mean(), loss[-1].mean()) if loss.ndim == 2 else (flat[0], flat[-1])
    if flat.size > 1 and end > start + GROWTH * abs(start):
        return f"the loss grew from {start:.4g} to {end:.4g}"
    return None


def data_problems(history: Metrics) -> str | None:
    """What was wrong with the data, or None: per `DATA_METRICS` entry recorded in `history`, the steps that saw
    bad samples (the first of them, and the most bad samples in one step)."""
    found = []
    for key, meaning in DATA_METRICS.items():
        if key not in history:
            continue
        counts = np.asarray(history[key]).reshape(-1)
        steps = np.flatnonzero(counts > 0)
        if steps.size:
            found.append(
                f"{steps.size} of {counts.size} steps saw {meaning} ({key}: first at step {int(steps[0])}, up to "
                f"{int(counts.max())} samples in one step)"
            )
    return "; ".join(found) or None


def _nonfinite_at_start(history: Metrics) -> str | None:
    """'NaN' or 'infinite' when the loss of step 0 (evaluated before any update) was not finite, else None."""
    if "loss" not in history:
        return None
    first = float(np.asarray(history["loss"], dtype=float).reshape(-1)[0])
    return None if np.isfinite(first) else ("NaN" if np.isnan(first) else "infinite")


def _solver_advice(model: Any) -> str:
    solver = getattr(model, "solver", None)  # models without a solver (or without this field) get generic advice
    name = solver if isinstance(solver, str) else getattr(solver, "name", type(solver).__name__.lower())
    if name in ("direct", "refine"):
        return (
            f"the {name} solve (an LU factorisation, no maxiter) left a residual above tol: U is close to "
            "singular for this dtype (gamma near 1?) or tol is below its precision; use float64 or loosen tol"
        )
    if solver is None:
        return "raise maxiter (iterative solvers), loosen tol or use another solver"
    return f"raise maxiter, loosen tol or use another solver than {name!r}"


def raise_or_warn(message: str, on_failure: str, error: type, warning: type) -> None:
    """`message` raised as `error` (`on_failure="raise"`) or warned as `warning` (from the caller's caller)."""
    if on_failure == "raise":
        raise error(message)
    warnings.warn(message, warning, stacklevel=3)


def _solves_follow(failures: int, steps: int, cause: str) -> str:
    """The sentence that blames `failures` solves above their tolerance on `cause`, not on the solver ("" for 0)."""
    if not failures:
        return ""
    return (
        f" {failures} of {steps} steps had an equilibrium solve above its tolerance, which follows from {cause}, "
        "not from the solver."
    )


def check_converged(history: Metrics, on_failure: str = "warn", *, learning_rate: Any = None, model: Any = None) -> int:
    """Judge a concrete training history (outside `jit`); `on_failure` is `"warn"`, `"raise"` or `"ignore"`.

    - Bad data (`nonfinite_features` or `bad_targets` non-zero in some step), or a loss already NaN/inf at step 0,
      before any update: `DataWarning` / `DataError`, naming the data (and, at step 0, the initial parameters).
    - Divergence (loss NaN/inf, or grown): `DivergenceWarning` / `DivergenceError`, naming the step size
      (`learning_rate` if given) as the cause.
    - Otherwise, solves that missed their tolerance (the forward `converged` and, where recorded,
      `backward_failures` / `backward_nonfinite`): `NonConvergenceWarning` / `NonConvergenceError` with advice for
      `model`'s solver.
    Returns the number of steps with an unconverged solve.
    """
    _checks.check_choice("on_failure", on_failure, ("warn", "raise", "ignore"))
    ok = np.asarray(history["converged"], bool)
    backward_failed = np.zeros_like(ok)
    for key in ("backward_failures", "backward_nonfinite"):
        if key in history:
            backward_failed = backward_failed | (np.asarray(history[key]) > 0)
    ok = ok & ~backward_failed
    failures = int(ok.size - np.sum(ok))
    if on_failure == "ignore":
        return failures
    data, at_start = data_problems(history), _nonfinite_at_start(history)
    if data or at_start:
        if data:
            message = f"the training data is bad: {data}. "
        else:
            message = (
                f"the loss was {at_start} at step 0, before any update, so the step size is not the cause: "
                "check the data (NaN/inf features, targets outside the loss's domain) and the initial parameters. "
            )
        message += (
            "A NaN loss from such samples is a data error, not divergence: clean or drop them (e.g. with "
            "np.isfinite on the features, labels in [0, classes)) and run again."
        )
        message += _solves_follow(failures, ok.size, "the data (or from parameters it made non-finite)")
        raise_or_warn(message, on_failure, DataError, DataWarning)
        return failures
    diverged = divergence(history) if "loss" in history else None
    if diverged:
        rate = f"learning_rate={learning_rate:g}" if isinstance(learning_rate, (int, float)) else "the learning rate"
        message = (
            f"training diverged: {diverged}. The step size is too large for this problem: lower {rate} "
            "(e.g. 10x) and run again."
        )
        message += _solves_follow(failures, ok.size, "the divergence (exploding or non-finite parameters)")
        raise_or_warn(message, on_failure, DivergenceError, DivergenceWarning)
        return failures
    if failures:
        worst = float(np.nanmax(np.asarray(history["relative_residual"])))
        message = (
            f"{failures} of {ok.size} steps had an equilibrium solve that did not reach its tolerance "
            f"(worst forward relative residual {worst:.3g}): {_solver_advice(model)}"
        )
        if np.any(backward_failed):
            message += (
                f"; in {int(np.sum(backward_failed))} steps the backward (adjoint) solve missed its "
                "tolerance: see Implicit(tol=..., maxiter=...)"
            )
        raise_or_warn(message, on_failure, NonConvergenceError, NonConvergenceWarning)
    return failures
