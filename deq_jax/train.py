"""Training: one step (`make_step`), compiled chunks of steps (`make_chunk`), full-batch gradient descent (the
theory's setting, one `lax.scan` that `vmap` batches over seeds) and mini-batch training, all built on that step.

A step is a pair of pure functions, as an optax transformation is:

    step = make_step(model, "square", optax.sgd(0.1))      # or learning_rate=0.1, or penalty=...
    state = step.init(params, phi)                          # TrainState(params, opt_state, warm)
    state, metrics = step.update(state, phi, y)

`state.warm` carries the solver state between steps (the last equilibrium, the last backward solution, LU factors;
see `deq_jax.warm`), so each solve starts from the previous step's solution. Calling the step object directly,
`step(params, opt_state, phi, y) -> (params, opt_state, metrics)`, is a step with nothing carried.

Every step's metrics carry the solves' statistics; `check_converged` turns a history into a verdict: a diverged run
(loss NaN/inf or growing) is reported as divergence with the step size named, a solver that missed its tolerance as
such, with advice that fits the solver.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from deq_jax import _checks
from deq_jax.diagnose import (DivergenceError, DivergenceWarning, NonConvergenceError, NonConvergenceWarning,
                              check_converged)
from deq_jax.losses import Loss, get_loss, square
from deq_jax.models import Model
from deq_jax.solve import value_and_grad as value_and_grad_with_backward_stats
from deq_jax.warm import StepStats

__all__ = ["TrainState", "TrainStep", "GramData", "square_gram", "gram_square_loss", "objective", "make_step",
           "make_chunk", "full_batch_gd", "minibatch_train", "check_converged", "NonConvergenceWarning",
           "NonConvergenceError", "DivergenceWarning", "DivergenceError"]

Array = jax.Array
Metrics = dict
Penalty = Callable[[Any], Array]


class TrainState(NamedTuple):
    """Everything a step carries: the parameters, the optimizer state and the solver state (None: cold starts)."""

    params: Any
    opt_state: Any
    warm: Any = None


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


def gram_square_loss(W: Array, gram: GramData) -> Array:
    """`1/2 <W C, W> - <W, D^T> + yy/2`: the square loss of predictions `Phi W^T` (equal to `losses.square`)."""
    return 0.5 * jnp.sum((W @ gram.C) * W) - jnp.sum(W * gram.D.T) + 0.5 * gram.yy


# ----------------------------------------------------------------------------- one step

def _penalty(penalty: Optional[Penalty]) -> Penalty:
    if penalty is None:
        return lambda params: 0.0
    if not callable(penalty):
        raise TypeError(f"penalty must be a callable penalty(params) -> scalar; got {penalty!r}")
    return penalty


def objective(model: Model, loss: Union[str, Loss], penalty: Optional[Penalty] = None) -> Callable:
    """`objective(params, phi, y) -> (L, stats)`: the training loss (+ `penalty(params)`) and the solve's stats.

    `penalty(params) -> scalar` is any regulariser, e.g. weight decay, or `(l2/2) |W|_F^2` on a DELM's end-to-end
    matrix: `lambda p: 0.5 * l2 * jnp.sum(model.end_to_end(p) ** 2)` (with the direct solver XLA shares the LU
    with the prediction's; other solvers solve once more)."""
    loss_fn, pen = get_loss(loss), _penalty(penalty)

    def fn(params, phi, y):
        predictions, stats = model.apply(params, phi)
        return loss_fn(predictions, y) + pen(params), stats

    return fn


def _solver_metrics(stats: Any, dtype: Any) -> Metrics:
    if stats is None:  # explicit models: nothing to solve
        zero = jnp.zeros((), dtype)
        return {"iterations": jnp.zeros((), jnp.int32), "residual": zero, "relative_residual": zero,
                "converged": jnp.ones((), bool)}
    return {"iterations": stats.iterations, "residual": stats.residual,
            "relative_residual": stats.relative_residual, "converged": stats.converged}


def _metrics(value: Array, grads: Any, stats: Any, extra: Optional[Metrics] = None) -> Metrics:
    """A step's metrics, built here only: loss (before the update), grad_norm, the forward solve's iterations,
    residual, relative_residual, converged; where the step solved the backward (adjoint) system itself (carried
    state) also `backward_solves`, `backward_failures` (solves that missed their tolerance), `backward_nonfinite`,
    `backward_relative_residual` (summed over the solves), `backward_iterations`, and `refactored` (an LU was
    computed this step, solver "refine")."""
    step_stats = stats if isinstance(stats, StepStats) else StepStats(stats)
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), **_solver_metrics(step_stats.forward, value.dtype)}
    if step_stats.backward is not None:
        b = step_stats.backward
        upstream = jnp.isfinite(value) & jnp.isfinite(step_stats.forward.residual)  # else: divergence upstream
        metrics.update(backward_solves=jnp.ones((), jnp.int32),
                       backward_failures=(upstream & ~b.converged).astype(jnp.int32),
                       backward_nonfinite=(~upstream).astype(jnp.int32),
                       backward_relative_residual=jnp.where(upstream, b.relative_residual, 0.0),
                       backward_iterations=b.iterations)
    if step_stats.refactored is not None:
        metrics["refactored"] = step_stats.refactored
    if extra:  # e.g. the backward statistics of an autodiff step
        metrics.update(extra)
    return metrics


def _optimizer(optimizer: Optional[optax.GradientTransformation], learning_rate: Any) -> optax.GradientTransformation:
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


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A training step as a pair of pure functions (jit-compiled unless `make_step(..., jit=False)`).

    - `init(params, phi) -> TrainState`: optimizer state and the solver state for data `phi` (or `GramData`);
    - `update(state, phi, y) -> (TrainState, metrics)`: one step; `phi` may be `GramData` (then `y` is unused);
    - `rebatch(state, phi) -> TrainState`: keep from `state.warm` what does not depend on the samples, for a step on
      other samples (mini-batches);
    - `step(params, opt_state, phi, y) -> (params, opt_state, metrics)`: one step without carried solver state.
    """

    init: Callable
    update: Callable
    rebatch: Callable
    cold: Callable

    def __call__(self, params, opt_state, phi, y):
        return self.cold(params, opt_state, phi, y)


def make_step(model: Model, loss: Union[str, Loss], optimizer: Optional[optax.GradientTransformation] = None, *,
              learning_rate: Any = None, penalty: Optional[Penalty] = None, warm_start: bool = True,
              jit: bool = True) -> TrainStep:
    """The training step of `model` on `loss(predictions, y) + penalty(params)`.

    Args:
      model: any `Model` (init/apply); the built-ins or a user's own.
      loss: a name of `LOSSES` or a callable `loss(predictions, targets) -> scalar`.
      optimizer: an optax transformation; or give `learning_rate` for plain SGD (exactly one of the two).
      penalty: `penalty(params) -> scalar` added to the loss (e.g. weight decay), differentiated with it.
      warm_start: carry the solver state between steps (models with `warm_start`, e.g. the DELM); the solves are
        judged by a start-independent rule, so this changes the cost of a step, not what counts as converged.
    Gradients go through the model's backward mode (implicit differentiation by default).
    """
    loss_fn, pen = get_loss(loss), _penalty(penalty)
    optimizer = _optimizer(optimizer, learning_rate)
    # autodiff through the model; implicit backward solves inside it report their statistics (never silent)
    plain = value_and_grad_with_backward_stats(objective(model, loss, penalty), has_aux=True)
    warm_capable = warm_start and hasattr(model, "warm_start") and hasattr(model, "warm_value_and_grad")

    def gram_value_and_grad(params, gram, warm):
        if loss_fn is not square:
            raise ValueError("GramData (C = Phi^T Phi / n, D = Phi^T Y / n) serves the square loss only; "
                             f"got loss {getattr(loss, '__name__', loss)!r}: pass the features and targets instead")
        if not hasattr(model, "end_to_end"):
            raise ValueError(f"GramData needs a model with end_to_end(params) (predictions phi @ W.T); "
                             f"{type(model).__name__} has none: pass the features and targets instead")
        obj = lambda p, W: gram_square_loss(W, gram) + pen(p)
        if warm is not None and hasattr(model, "end_to_end_value_and_grad"):
            return (*model.end_to_end_value_and_grad(params, obj, warm), None)

        def fn(p):
            if hasattr(model, "end_to_end_solution"):  # the DELM: keep the solve's statistics
                sol = model.end_to_end_solution(p)
                return obj(p, sol.value), sol.stats
            return obj(p, model.end_to_end(p)), None

        # as on the samples route: implicit backward solves report their statistics (a failure is data)
        (value, stats), grads, backward = value_and_grad_with_backward_stats(fn, has_aux=True)(params)
        return value, grads, warm, stats, backward.metrics()

    def init(params, phi):
        opt_state = optimizer.init(params)
        if not warm_capable:
            return TrainState(params, opt_state, None)
        return TrainState(params, opt_state, model.warm_start(params, None if isinstance(phi, GramData) else phi))

    def update(state, phi, y):
        params, opt_state, warm = state
        extra = None
        if isinstance(phi, GramData):
            value, grads, warm, stats, extra = gram_value_and_grad(params, phi, warm)
        elif warm is not None:
            value, grads, warm, stats = model.warm_value_and_grad(
                params, phi, lambda p, predictions: loss_fn(predictions, y) + pen(p), warm)
        else:
            (value, stats), grads, backward = plain(params, phi, y)
            extra = backward.metrics()
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return TrainState(params, opt_state, warm), _metrics(value, grads, stats, extra)

    def rebatch(state, phi):
        if state.warm is None:
            return state
        return state._replace(warm=model.warm_start(state.params, phi, previous=state.warm))

    wrap = jax.jit if jit else (lambda f: f)
    init, update, rebatch = wrap(init), wrap(update), wrap(rebatch)

    def cold(params, opt_state, phi, y):  # the compiled `update` itself, with nothing carried
        state, metrics = update(TrainState(params, opt_state, None), phi, y)
        return state.params, state.opt_state, metrics

    return TrainStep(init=init, update=update, rebatch=rebatch, cold=cold)


# ----------------------------------------------------------------------------- many steps

def make_chunk(step: TrainStep, length: int, *, record: Optional[Callable[[Any], Metrics]] = None,
               jit: bool = True) -> Callable:
    """`run(state, phi, y) -> (state, history)`: `length` steps in one `lax.scan` (one compiled program).

    `history[k]` has a leading axis of length `length`; `record(params) -> dict` adds arrays computed at the params
    each step's loss is evaluated at (e.g. the end-to-end W). `deq_jax.loop.fit` drives such chunks from the host.
    """
    _checks.check_positive("length", length, integer=True)

    def run(state, phi, y):
        def body(state, _):
            extra = {} if record is None else record(state.params)
            state, metrics = step.update(state, phi, y)
            return state, {**metrics, **extra}

        return jax.lax.scan(body, state, None, length=length)

    return jax.jit(run) if jit else run


def _check_data(phi: Any, y: Any) -> None:
    _checks.check_float_array("phi", phi)
    _checks.check_ndim("phi", phi, (2,))
    if jnp.shape(y)[:1] != jnp.shape(phi)[:1]:
        raise ValueError(f"y must have one row per row of phi ({jnp.shape(phi)[0]}); got shape {jnp.shape(y)}")


def full_batch_gd(model: Model, loss: Union[str, Loss], params: Any, phi: Array, y: Array, *, steps: int,
                  learning_rate: Any = None, optimizer: Optional[optax.GradientTransformation] = None,
                  penalty: Optional[Penalty] = None, warm_start: bool = True, gram: bool = False
                  ) -> tuple[Any, Metrics]:
    """Full-batch gradient descent (the theory's setting) for `steps` steps, as one `lax.scan`.

    `learning_rate` (plain SGD) or `optimizer`, exactly one. `gram=True` (square loss, models with `end_to_end`):
    every step uses `GramData` computed once, `O(m_y m^2)` per step instead of `O(n m m_y)`, the same trajectory.
    Returns the final params and a history of per-step metrics, each an array with a leading axis of length
    `steps` (the loss is evaluated before each update). Pure: wrap it in `jit`/`vmap` (e.g. over seeds).
    """
    _checks.check_positive("steps", steps, integer=True)
    _check_data(phi, y)
    step = make_step(model, loss, optimizer, learning_rate=learning_rate, penalty=penalty, warm_start=warm_start,
                     jit=False)
    data = square_gram(phi, y) if gram else phi
    state, history = make_chunk(step, steps, jit=False)(step.init(params, data), data, y)
    return state.params, history


def minibatch_train(model: Model, loss: Union[str, Loss], params: Any, phi: Array, y: Array, *, key: Array,
                    optimizer: optax.GradientTransformation, batch_size: int, epochs: int,
                    penalty: Optional[Penalty] = None, warm_start: bool = True) -> tuple[Any, Metrics]:
    """Mini-batch training (e.g. with `optax.adam`): each epoch a fresh permutation, the last partial batch
    dropped, all epochs in one compiled `lax.scan`. History has shape `(epochs, batches_per_epoch)` per metric.

    With `warm_start`, what does not depend on the samples carries from batch to batch (the DELM's end-to-end W,
    dL/dB and LU factors); a per-sample equilibrium z starts from zero on each new batch."""
    _checks.check_positive("batch_size", batch_size, integer=True)
    _checks.check_positive("epochs", epochs, integer=True)
    _check_data(phi, y)
    n = phi.shape[0]
    if batch_size > n:
        raise ValueError(f"batch_size must be at most the number of samples ({n}); got {batch_size}")
    batches = n // batch_size
    step = make_step(model, loss, optimizer, penalty=penalty, warm_start=warm_start, jit=False)

    def epoch(state, epoch_key):
        order = jax.random.permutation(epoch_key, n)[: batches * batch_size].reshape(batches, batch_size)

        def body(state, idx):
            phi_b = phi[idx]
            return step.update(step.rebatch(state, phi_b), phi_b, y[idx])

        return jax.lax.scan(body, state, order)

    state = step.init(params, phi[:batch_size])
    state, history = jax.lax.scan(epoch, state, jax.random.split(key, epochs))
    return state.params, history
