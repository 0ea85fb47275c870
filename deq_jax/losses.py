"""Losses `loss(predictions, targets) -> scalar`, averaged over samples (rows): `L = (1/n) sum_i l(f(x_i), y_i)`.

All are convex in the predictions, so the shallow model's problem is convex (docs/theory.md section 2).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from deq_jax import _checks

Array = jax.Array
Loss = Callable[[Array, Array], Array]


def square(predictions: Array, targets: Array) -> Array:
    """`(1/n) sum_i 1/2 |f(x_i) - y_i|^2` with one-hot (or real) targets of the predictions' shape.

    With this scaling `dL/dW = (W Phi - Y) Phi^T / n` and the PL inequality `|G|^2 >= 2 lambda_min^+ (L - L*)` holds
    with `lambda_min^+` the smallest nonzero eigenvalue of `Phi Phi^T / n` (docs/theory.md section 4).
    """
    _checks.check_shape("targets", targets, predictions.shape, "square loss targets must match the predictions")
    return jnp.mean(jnp.sum(optax.l2_loss(predictions, targets), axis=-1))


def cross_entropy(predictions: Array, targets: Array) -> Array:
    """Softmax cross-entropy; `targets` are integer labels `(n,)` or one-hot / probability rows `(n, m_y)`."""
    if jnp.issubdtype(targets.dtype, jnp.integer):
        _checks.check_shape("targets", targets, predictions.shape[:-1], "integer labels, one per sample")
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(predictions, targets))
    _checks.check_shape("targets", targets, predictions.shape, "one-hot targets must match the predictions")
    return jnp.mean(optax.softmax_cross_entropy(predictions, targets))


def logistic(predictions: Array, targets: Array) -> Array:
    """Binary logistic loss on logits `(n,)` or `(n, 1)` with targets in {0, 1} of the same shape."""
    if predictions.ndim == 2 and predictions.shape[-1] != 1:
        raise ValueError(
            f"logistic loss needs one output (predictions of shape (n,) or (n, 1)); got {predictions.shape}"
        )
    _checks.check_shape("targets", targets, predictions.shape, "binary targets must match the predictions")
    return jnp.mean(optax.sigmoid_binary_cross_entropy(predictions, targets.astype(predictions.dtype)))


LOSSES: dict[str, Loss] = {"square": square, "cross_entropy": cross_entropy, "logistic": logistic}


def get_loss(loss: str | Loss) -> Loss:
    """A loss by name (`LOSSES`) or a callable passed through."""
    if callable(loss):
        return loss
    _checks.check_choice("loss", loss, LOSSES)
    return LOSSES[loss]
