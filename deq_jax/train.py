"""Training: one step (`make_step`) for any `Model`, compiled chunks of steps (`make_chunk`, driven from the host
by `deq_jax.fit`), and full-batch gradient descent (the theory's setting, one `lax.scan` that `vmap` batches over
seeds), all built on that one step.

A step is a pair of pure functions, as an optax transformation is:

    step = make_step(model, "square", optax.sgd(0.1))      # or learning_rate=0.1, or penalty=...
    state = step.init(params, phi)                          # TrainState(params, opt_state, warm)
    state, metrics = step.update(state, phi, y)

`state.warm` (a `deq_jax.models.Warm`) carries the solves' state between steps: the last equilibrium, the last
backward solution and the solver's state (e.g. `Refine`'s LU factors), so each solve starts from the previous
step's solution. The gradient is always `deq_jax.value_and_grad` of the loss through the model's solve: one
implicit adjoint, whose backward solution comes back as the cotangent of its start (see `deq_jax.solve`).
Calling the step object directly, `step(params, opt_state, phi, y) -> (params, opt_state, metrics)`, is a step
with nothing carried.

Every step's metrics carry the solves' statistics; `check_converged` turns a history into a verdict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deq_jax import _checks
from deq_jax._adjoint import value_and_grad
from deq_jax._solution import Solution
from deq_jax.losses import Loss, get_loss, invalid_targets, square
from deq_jax.models import Model, Warm

Array = jax.Array
Metrics = dict
Penalty = Callable[[Any], Any]  # params -> a scalar (array or number)


class TrainState(NamedTuple):
    """Everything a step carries: the parameters, the optimizer state and the solves' state (None: cold starts)."""

    params: Any
    opt_state: Any
    warm: Warm | None = None


# ----------------------------------------------------------------------------- the square loss's Gram route


class GramData(NamedTuple):
    """The square loss's sufficient statistics: `C = Phi^T Phi / n` `(m, m)`, `D = Phi^T Y / n` `(m, m_y)` and
    `yy = |Y|_F^2 / n`. For predictions `Phi W^T` (any model with `end_to_end`),

        L(W) = 1/(2n) |Phi W^T - Y|_F^2 = 1/2 <W C, W> - <W, D^T> + yy/2,   dL/dW = W C - D^T,

    so a full-batch step costs `O(m_y m^2)` instead of `O(n m m_y)` once C and D are computed (`O(n m^2)`, once).
    It applies to the square loss only: cross-entropy and the logistic loss are not functions of C and D.
    """

    C: Array
    D: Array
    yy: Array


def square_gram(phi: Array, y: Array) -> GramData:
    """`GramData` of features `phi` `(n, m)` and real (e.g. one-hot) targets `y` `(n, m_y)`."""
    _check_data(phi, y)
    _checks.check_float_array("y", y)
    _checks.check_ndim("y", y, (2,))
    n = phi.shape[0]
    with jax.default_matmul_precision("highest"):
        return GramData(phi.T @ phi / n, phi.T @ y / n, jnp.sum(y * y) / n)


def _gram_square_loss(W: Array, gram: GramData) -> Array:
    """`1/2 <W C, W> - <W, D^T> + yy/2`: the square loss of predictions `Phi W^T` (equal to `losses.square`)."""
    return 0.5 * jnp.sum((W @ gram.C) * W) - jnp.sum(W * gram.D.T) + 0.5 * gram.yy


# ----------------------------------------------------------------------------- one step


def _penalty(penalty: Penalty | None) -> Penalty:
    if penalty is None:
        return lambda params: 0.0
    if not callable(penalty):
        raise TypeError(f"penalty must be a callable penalty(params) -> scalar; got {penalty!r}")
    return penalty


def _solver_metrics(sol: Solution | None, dtype: Any) -> Metrics:
    if sol is None:  # explicit models: nothing to solve
        zero = jnp.zeros((), dtype)
        return {
            "iterations": jnp.zeros((), jnp.int32),
            "residual": zero,
            "relative_residual": zero,
            "converged": jnp.ones((), bool),
            "factorisations": jnp.zeros((), jnp.int32),
        }
    stats = sol.stats
    return {
        "iterations": stats.iterations,
        "residual": stats.residual,
        "relative_residual": stats.relative_residual,
        "converged": stats.converged,
        "factorisations": stats.factorisations,
    }


def _nonfinite_rows(tree: Any) -> Array:
    """The number of rows (samples, the leading axis) holding a NaN or infinite entry in any floating leaf of
    `tree` (a 0-d leaf is one row)."""
    rows: Any = None
    for leaf in jax.tree_util.tree_leaves(tree):
        a = jnp.asarray(leaf)
        if not jnp.issubdtype(a.dtype, jnp.inexact):
            continue
        bad = ~jnp.isfinite(a)
        bad = jnp.any(bad.reshape(bad.shape[0], -1), axis=1) if bad.ndim > 1 else bad
        rows = bad if rows is None or rows.shape != bad.shape else rows | bad
    return jnp.zeros((), jnp.int32) if rows is None else jnp.sum(rows, dtype=jnp.int32)


def _data_metrics(loss_fn: Loss, predictions: Any, phi: Any, y: Any) -> Metrics:
    """`nonfinite_features`: samples (rows of phi) with a NaN/inf feature; `bad_targets`: samples whose target is
    outside the loss's domain (`losses.invalid_targets`). With `GramData` the samples are summed away: each counts
    1 when `C` (features) or `D`, `yy` (targets) hold a NaN/inf."""
    if isinstance(phi, GramData):
        return {
            "nonfinite_features": jnp.minimum(_nonfinite_rows(phi.C), 1),
            "bad_targets": jnp.minimum(_nonfinite_rows(phi.D) + _nonfinite_rows(phi.yy), 1),
        }
    return {"nonfinite_features": _nonfinite_rows(phi), "bad_targets": invalid_targets(loss_fn, predictions, y)}


def _metrics(value: Array, grads: Any, sol: Solution | None, backward: Any, data: Metrics) -> Metrics:
    """A step's metrics, built here only: `loss` (before the update), `grad_norm`, the data's
    `nonfinite_features` and `bad_targets` (non-zero: the loss is NaN because of the data, not of the step size),
    the forward solve's `iterations`, `residual`, `relative_residual`, `converged`, `factorisations`, and the
    implicit backward's `backward_solves`, `backward_failures` (solves that missed their tolerance),
    `backward_nonfinite`, `backward_relative_residual` (summed over the solves) and `backward_iterations`."""
    return {
        "loss": value,
        "grad_norm": optax.tree.norm(grads),
        **data,
        **_solver_metrics(sol, value.dtype),
        **backward.metrics(),
    }


def _optimizer(optimizer: optax.GradientTransformation | None, learning_rate: Any) -> optax.GradientTransformation:
    if optimizer is not None and learning_rate is not None:
        raise ValueError("pass either optimizer=... or learning_rate=... (plain SGD), not both; got both")
    if optimizer is None:
        if learning_rate is None:
            raise ValueError("pass optimizer=... (an optax GradientTransformation) or learning_rate=... (plain SGD)")
        _checks.check_positive("learning_rate", learning_rate)
        return optax.sgd(learning_rate)
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax GradientTransformation; got {optimizer!r}")
    return optimizer


def objective(model: Model, loss: str | Loss, penalty: Penalty | None = None) -> Callable:
    """`objective(params, phi, y, warm=None) -> (L, solution)`: the training loss `loss(predictions, y) +
    penalty(params)` of `model` on features `phi`, and its solve's `Solution` (None for explicit models).

    `penalty(params) -> scalar` is any regulariser, e.g. `(l2/2) |W|_F^2` on a DELM's end-to-end matrix:
    `lambda p: 0.5 * l2 * jnp.sum(model.end_to_end(p) ** 2)`."""
    with_data = _objective(model, loss, penalty)

    def fn(params: Any, phi: Array, y: Array, warm: Warm | None = None) -> tuple[Array, Solution | None]:
        value, (sol, _) = with_data(params, phi, y, warm)
        return value, sol

    return fn


def _objective(model: Model, loss: str | Loss, penalty: Penalty | None) -> Callable:
    """`objective`'s function returning `(L, (solution, data metrics))`."""
    loss_fn, pen = get_loss(loss), _penalty(penalty)

    def fn(params: Any, phi: Array, y: Array, warm: Warm | None = None) -> tuple[Array, tuple[Any, Metrics]]:
        predictions, sol = model.apply(params, phi, warm)
        data = _data_metrics(loss_fn, jax.lax.stop_gradient(predictions), phi, y)
        return loss_fn(predictions, y) + pen(params), (sol, data)

    return fn


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A training step as a pair of pure functions (jit-compiled unless `make_step(..., jit=False)`).

    - `init(params, phi) -> TrainState`: optimizer state and the solves' state for data `phi` (or `GramData`);
    - `update(state, phi, y) -> (TrainState, metrics)`: one step; `phi` may be `GramData` (then `y` is unused);
    - `rebatch(state, phi) -> TrainState`: keep from `state.warm` what does not depend on the samples, for a step on
      other samples (mini-batches);
    - `step(params, opt_state, phi, y) -> (params, opt_state, metrics)`: one step without carried solver state.
    """

    init: Callable
    update: Callable
    rebatch: Callable
    cold: Callable

    def __call__(self, params: Any, opt_state: Any, phi: Any, y: Any) -> tuple[Any, Any, Metrics]:
        """One step with nothing carried: `(params, opt_state, metrics)`."""
        return self.cold(params, opt_state, phi, y)


def make_step(
    model: Model,
    loss: str | Loss,
    optimizer: optax.GradientTransformation | None = None,
    *,
    learning_rate: Any = None,
    penalty: Penalty | None = None,
    warm_start: bool = True,
    jit: bool = True,
) -> TrainStep:
    """The training step of `model` on `loss(predictions, y) + penalty(params)`.

    Args:
      model: any `Model` (the built-ins or a user's own).
      loss: a callable `loss(predictions, targets) -> scalar` (`square`, `cross_entropy`, `logistic` or your own;
        their names are accepted too).
      optimizer: an optax transformation; or give `learning_rate` for plain SGD (exactly one of the two).
      penalty: `penalty(params) -> scalar` added to the loss (e.g. weight decay), differentiated with it.
      warm_start: carry the solves' state between steps (`model.warm_start`); the solves are judged by a
        start-independent rule, so this changes the cost of a step, not what counts as converged.
      jit: compile `init`, `update` and `rebatch`.
    Returns:
      A `TrainStep`. Gradients go through the model's backward (implicit differentiation by default).
    """
    loss_fn, pen = get_loss(loss), _penalty(penalty)
    optimizer = _optimizer(optimizer, learning_rate)
    on_samples = _objective(model, loss, penalty)

    def objective_(params: Any, phi: Any, y: Any, warm: Warm | None) -> tuple[Array, tuple[Any, Metrics]]:
        if isinstance(phi, GramData):
            if loss_fn is not square:
                raise ValueError(
                    "GramData (C = Phi^T Phi / n, D = Phi^T Y / n) serves the square loss only; "
                    f"got loss {getattr(loss, '__name__', loss)!r}: pass the features and targets"
                )
            W, sol = model.end_to_end_solution(params, warm)
            return _gram_square_loss(W, phi) + pen(params), (sol, _data_metrics(loss_fn, None, phi, y))
        _check_batch(phi, y)
        return on_samples(params, phi, y, warm)

    def gradient(params: Any, phi: Any, y: Any, warm: Warm | None) -> tuple[Any, ...]:
        if warm is None:
            cold = lambda p: objective_(p, phi, y, None)
            (value, (sol, data)), grads, backward = value_and_grad(cold, has_aux=True)(params)
            return value, grads, sol, backward, None, data
        # the backward solution leaves the implicit solve as the cotangent of its start: carried on
        (value, (sol, data)), (grads, adjoint), backward = value_and_grad(
            lambda p, u: objective_(p, phi, y, warm._replace(adjoint=u)), argnums=(0, 1), has_aux=True
        )(params, warm.adjoint)
        return value, grads, sol, backward, Warm(sol.value, adjoint, sol.state), data

    def init(params: Any, phi: Any) -> TrainState:
        opt_state = optimizer.init(params)
        warm = model.warm_start(params, None if isinstance(phi, GramData) else phi) if warm_start else None
        return TrainState(params, opt_state, warm)

    def update(state: TrainState, phi: Any, y: Any) -> tuple[TrainState, Metrics]:
        params, opt_state, warm = state
        value, grads, sol, backward, warm, data = gradient(params, phi, y, warm)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return TrainState(params, opt_state, warm), _metrics(value, grads, sol, backward, data)

    def rebatch(state: TrainState, phi: Any) -> TrainState:
        if state.warm is None:
            return state
        return state._replace(warm=model.warm_start(state.params, phi, previous=state.warm))

    wrap = jax.jit if jit else (lambda f: f)
    init, update, rebatch = wrap(init), wrap(update), wrap(rebatch)

    def cold(params: Any, opt_state: Any, phi: Any, y: Any) -> tuple[Any, Any, Metrics]:
        state, metrics = update(TrainState(params, opt_state, None), phi, y)
        return state.params, state.opt_state, metrics

    return TrainStep(init=init, update=update, rebatch=rebatch, cold=cold)


# ----------------------------------------------------------------------------- many steps


def make_chunk(
    step: TrainStep, length: int, *, record: Callable[[Any], Metrics] | None = None, jit: bool = True
) -> Callable:
    """`run(state, phi, y) -> (state, history)`: `length` steps in one `lax.scan` (one compiled program).

    `history[k]` has a leading axis of length `length`; `record(params) -> dict` adds arrays computed at the params
    each step's loss is evaluated at (e.g. the end-to-end W). `deq_jax.fit` drives such chunks from the host.
    """
    _checks.check_positive("length", length, integer=True)

    def run(state, phi, y):
        def body(state, _):
            extra = {} if record is None else record(state.params)
            state, metrics = step.update(state, phi, y)
            return state, {**metrics, **extra}

        return jax.lax.scan(body, state, None, length=length)

    return jax.jit(run) if jit else run


def full_batch_gd(
    model: Model,
    loss: str | Loss,
    params: Any,
    phi: Array,
    y: Array,
    *,
    steps: int,
    learning_rate: Any = None,
    optimizer: optax.GradientTransformation | None = None,
    penalty: Penalty | None = None,
    warm_start: bool = True,
    gram: bool = False,
) -> tuple[Any, Metrics]:
    """Full-batch gradient descent (the theory's setting) for `steps` steps, as one `lax.scan`.

    `learning_rate` (plain SGD) or `optimizer`, exactly one. `gram=True` (square loss, models with `end_to_end`):
    every step uses `GramData` computed once, `O(m_y m^2)` per step instead of `O(n m m_y)`, the same trajectory.
    Returns the final params and a history of per-step metrics, each an array with a leading axis of length
    `steps` (the loss is evaluated before each update). Pure: wrap it in `jit`/`vmap` (e.g. over seeds).
    """
    _checks.check_positive("steps", steps, integer=True)
    _check_data(phi, y)
    step = make_step(
        model, loss, optimizer, learning_rate=learning_rate, penalty=penalty, warm_start=warm_start, jit=False
    )
    data = square_gram(phi, y) if gram else phi
    state, history = make_chunk(step, steps, jit=False)(step.init(params, data), data, y)
    return state.params, history


def _check_batch(phi: Any, y: Any) -> None:
    """Shapes only (static, so checked under `jit` too): at least one sample, and one target row per sample (for
    array features and targets; a user's model may take other pytrees)."""
    n = getattr(phi, "shape", (None,))[:1]
    if n == (0,):
        raise ValueError(
            f"phi holds no samples (shape {phi.shape}): a training step needs at least one sample (an empty batch "
            "has no mean loss)"
        )
    y_shape = tuple(y.shape) if hasattr(y, "shape") else np.shape(y) if isinstance(y, list) else None
    if n != (None,) and y_shape is not None and y_shape[:1] != tuple(n):
        raise ValueError(f"y must have one row per row of phi ({n[0]}); got shape {y_shape}")


def _check_data(phi: Any, y: Any) -> None:
    _checks.check_float_array("phi", phi)
    _checks.check_ndim("phi", phi, (2,))
    _check_batch(phi, y)
