"""Training: jit-compiled `value_and_grad` + optax steps, the full-batch gradient-descent loop of the theory
(one `lax.scan`, so a whole run is one compiled program that `vmap` can batch over seeds), and mini-batch training.

Every step's metrics carry the equilibrium solve's statistics; a run that contained a non-converged solve says so
(`check_converged`: a warning by default, an error on request), so a stalled solver never passes for a trained model.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from deq_jax import _checks
from deq_jax.losses import Loss, get_loss
from deq_jax.models import Model
from deq_jax.solve import value_and_grad as value_and_grad_with_backward_stats

Array = jax.Array
Metrics = dict


class NonConvergenceWarning(RuntimeWarning):
    """An equilibrium solve inside training stopped before reaching its tolerance."""


class NonConvergenceError(RuntimeError):
    """Raised by `check_converged(..., policy="raise")`."""


def _solver_metrics(stats: Any, dtype: Any) -> Metrics:
    if stats is None:  # explicit models: nothing to solve
        zero = jnp.zeros((), dtype)
        return {"iterations": jnp.zeros((), jnp.int32), "residual": zero, "relative_residual": zero,
                "converged": jnp.ones((), bool)}
    return {"iterations": stats.iterations, "residual": stats.residual,
            "relative_residual": stats.relative_residual, "converged": stats.converged}


def objective(model: Model, loss: Union[str, Loss]) -> Callable:
    """`objective(params, phi, y) -> (L, stats)`: the training loss and the solve's statistics (aux)."""
    loss_fn = get_loss(loss)

    def fn(params, phi, y):
        predictions, stats = model.apply(params, phi)
        return loss_fn(predictions, y), stats

    return fn


def make_step(model: Model, loss: Union[str, Loss], optimizer: optax.GradientTransformation, *, jit: bool = True):
    """`step(params, opt_state, phi, y) -> (params, opt_state, metrics)`, jit-compiled by default.

    `metrics`: loss (before the update), grad_norm, and the solve's iterations, residual, relative_residual,
    converged. Gradients go through the model's backward mode (implicit differentiation by default).
    """
    value_and_grad = value_and_grad_with_backward_stats(objective(model, loss), has_aux=True)

    def step(params, opt_state, phi, y):
        (value, stats), grads, backward = value_and_grad(params, phi, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), **_solver_metrics(stats, value.dtype),
                   **backward.metrics()}
        return params, opt_state, metrics

    return jax.jit(step) if jit else step


def _check_data(phi: Any, y: Any) -> None:
    _checks.check_float_array("phi", phi)
    _checks.check_ndim("phi", phi, (2,))
    if jnp.shape(y)[:1] != jnp.shape(phi)[:1]:
        raise ValueError(f"y must have one row per row of phi ({jnp.shape(phi)[0]}); got shape {jnp.shape(y)}")


def full_batch_gd(model: Model, loss: Union[str, Loss], params: Any, phi: Array, y: Array, *,
                  learning_rate: float, steps: int, optimizer: Optional[optax.GradientTransformation] = None
                  ) -> tuple[Any, Metrics]:
    """Full-batch gradient descent (the theory's setting) for `steps` steps, as one `lax.scan`.

    Returns the final params and a history of per-step metrics, each an array with a leading axis of length
    `steps` (the loss is evaluated before each update). Pure: wrap it in `jit`/`vmap` (e.g. over seeds).
    """
    _checks.check_positive("learning_rate", learning_rate)
    _checks.check_positive("steps", steps, integer=True)
    _check_data(phi, y)
    optimizer = optax.sgd(learning_rate) if optimizer is None else optimizer
    step = make_step(model, loss, optimizer, jit=False)

    def body(carry, _):
        params, opt_state = carry
        params, opt_state, metrics = step(params, opt_state, phi, y)
        return (params, opt_state), metrics

    (params, _), history = jax.lax.scan(body, (params, optimizer.init(params)), None, length=steps)
    return params, history


def minibatch_train(model: Model, loss: Union[str, Loss], params: Any, phi: Array, y: Array, *, key: Array,
                    optimizer: optax.GradientTransformation, batch_size: int, epochs: int) -> tuple[Any, Metrics]:
    """Mini-batch training (e.g. with `optax.adam`): each epoch a fresh permutation, the last partial batch
    dropped, all epochs in one compiled `lax.scan`. History has shape `(epochs, batches_per_epoch)` per metric."""
    _checks.check_positive("batch_size", batch_size, integer=True)
    _checks.check_positive("epochs", epochs, integer=True)
    _check_data(phi, y)
    n = phi.shape[0]
    if batch_size > n:
        raise ValueError(f"batch_size must be at most the number of samples ({n}); got {batch_size}")
    batches = n // batch_size
    step = make_step(model, loss, optimizer, jit=False)

    def epoch(carry, epoch_key):
        order = jax.random.permutation(epoch_key, n)[: batches * batch_size].reshape(batches, batch_size)

        def body(carry, idx):
            params, opt_state = carry
            params, opt_state, metrics = step(params, opt_state, phi[idx], y[idx])
            return (params, opt_state), metrics

        return jax.lax.scan(body, carry, order)

    (params, _), history = jax.lax.scan(epoch, (params, optimizer.init(params)), jax.random.split(key, epochs))
    return params, history


def check_converged(history: Metrics, policy: str = "warn") -> int:
    """Count the steps whose solve did not converge and act on it: `"warn"`, `"raise"` or `"ignore"`.

    Call it on a concrete history (outside `jit`). Returns the number of non-converged steps.
    """
    _checks.check_choice("policy", policy, ("warn", "raise", "ignore"))
    converged = jnp.asarray(history["converged"])
    failures = int(converged.size - jnp.sum(converged))
    if failures and policy != "ignore":
        worst = float(jnp.max(jnp.asarray(history["relative_residual"])))
        message = (f"{failures} of {converged.size} equilibrium solves did not reach their tolerance "
                   f"(worst relative residual {worst:.3g}); raise maxiter, loosen tol or use another solver")
        if policy == "raise":
            raise NonConvergenceError(message)
        warnings.warn(message, NonConvergenceWarning, stacklevel=2)
    return failures
