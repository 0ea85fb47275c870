"""Losses `loss(predictions, targets) -> scalar`, averaged over samples (rows): `L = (1/n) sum_i l(f(x_i), y_i)`.

All are convex in the predictions, so the shallow model's problem is convex (docs/theory.md section 2).

Targets outside a loss's domain are data errors, never a silent number: integer labels outside `[0, classes)` (which
indexing would otherwise wrap or turn into NaN), NaN/inf targets, probability rows that are not distributions,
binary targets outside [0, 1]. Concrete targets are checked eagerly (`ValueError` naming the samples); under `jit`
the loss of a batch holding such a target is NaN, and `invalid_targets` counts them (`make_step` records the count
as the `bad_targets` metric).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deq_jax import _checks

Array = jax.Array
Loss = Callable[[Array, Array], Array]


def _as_array(targets: Any) -> Any:
    return targets if hasattr(targets, "dtype") and hasattr(targets, "shape") else np.asarray(targets)


def _check_samples(predictions: Array) -> None:
    if np.ndim(predictions) >= 1 and np.shape(predictions)[0] == 0:  # shapes are static: refused under jit too
        raise ValueError(
            f"predictions hold no samples (shape {tuple(np.shape(predictions))}): the mean loss over an empty batch "
            "is undefined; every batch needs at least one sample"
        )


def _rows(bad: Any) -> Array:
    """Per sample (leading axis): any entry bad."""
    bad = jnp.asarray(bad)
    return bad if bad.ndim <= 1 else jnp.any(bad.reshape(bad.shape[0], -1), axis=1)


def _clean(targets: Any, bad: Array, fill: Any) -> Array:
    """`targets` with the bad samples' rows replaced by `fill` (a valid target): the guarded loss is NaN, but its
    gradient stays finite (zero), so a bad batch leaves the parameters as they were instead of making them NaN."""
    t = jnp.asarray(targets)
    rows = jnp.reshape(bad, bad.shape + (1,) * (t.ndim - bad.ndim))
    return jnp.where(rows, jnp.asarray(fill, t.dtype), t)


def _guard(loss: Array, bad: Array, targets: Any, domain: str) -> Array:
    """Eagerly (concrete targets): `ValueError` naming the bad samples; traced: NaN when any sample is bad."""
    if _checks.is_concrete(targets) and _checks.is_concrete(bad):
        flags = np.asarray(bad).reshape(-1)
        if flags.any():
            where = np.flatnonzero(flags)
            values = np.asarray(targets).reshape(len(flags), -1)[where[:5]]
            shown = ", ".join(
                f"sample {i}: {v[0] if v.size == 1 else v.tolist()}" for i, v in zip(where[:5], values, strict=False)
            )
            raise ValueError(
                f"targets must be {domain}; {where.size} of {flags.size} samples are not ({shown}"
                f"{', ...' if where.size > 5 else ''}). This is a data error: fix the targets"
            )
        return loss
    return jnp.where(jnp.any(bad), jnp.nan, loss)


def square(predictions: Array, targets: Array) -> Array:
    """`(1/n) sum_i 1/2 |f(x_i) - y_i|^2` with one-hot (or real) targets of the predictions' shape.

    With this scaling `dL/dW = (W Phi - Y) Phi^T / n` and the PL inequality `|G|^2 >= 2 lambda_min^+ (L - L*)` holds
    with `lambda_min^+` the smallest nonzero eigenvalue of `Phi Phi^T / n` (docs/theory.md section 4). Targets must
    be finite.
    """
    targets = _as_array(targets)
    _check_samples(predictions)
    _checks.check_shape("targets", targets, predictions.shape, "square loss targets must match the predictions")
    bad = _square_problems(targets)
    loss = jnp.mean(jnp.sum(optax.l2_loss(predictions, _clean(targets, bad, 0)), axis=-1))
    return _guard(loss, bad, targets, "finite")


def _square_problems(targets: Any) -> Array:
    return _rows(~jnp.isfinite(targets))


def cross_entropy(predictions: Array, targets: Array) -> Array:
    """Softmax cross-entropy; `targets` are integer labels `(n,)` in `[0, classes)`, or one-hot / probability rows
    `(n, m_y)` (finite, non-negative, each summing to 1)."""
    targets = _as_array(targets)
    _check_samples(predictions)
    if jnp.issubdtype(targets.dtype, jnp.integer):
        _checks.check_shape("targets", targets, predictions.shape[:-1], "integer labels, one per sample")
        bad, domain = _cross_entropy_problems(predictions, targets)
        # a label outside the classes is clipped here (it never indexes out of range) and flagged by _guard
        safe = jnp.clip(targets, 0, predictions.shape[-1] - 1)
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(predictions, safe))
        return _guard(loss, bad, targets, domain)
    if np.shape(targets) == tuple(predictions.shape[:-1]) and jnp.issubdtype(targets.dtype, jnp.floating):
        raise ValueError(
            f"targets of shape {tuple(np.shape(targets))} (one per sample) must be integer labels; got dtype "
            f"{targets.dtype}. Cast them, e.g. labels.astype(jnp.int32), or pass one-hot rows of shape "
            f"{tuple(predictions.shape)}"
        )
    _checks.check_shape("targets", targets, predictions.shape, "one-hot targets must match the predictions")
    bad, domain = _cross_entropy_problems(predictions, targets)
    uniform = 1.0 / predictions.shape[-1]
    loss = jnp.mean(optax.softmax_cross_entropy(predictions, _clean(targets, bad, uniform)))
    return _guard(loss, bad, targets, domain)


def _cross_entropy_problems(predictions: Array, targets: Any) -> tuple[Array, str]:
    classes = predictions.shape[-1]
    if jnp.issubdtype(targets.dtype, jnp.integer):
        return _rows((targets < 0) | (targets >= classes)), f"integer labels in [0, {classes}) for {classes} classes"
    t = jnp.asarray(targets)
    slack = max(1e-4, 8 * float(jnp.finfo(t.dtype).eps) * classes) if jnp.issubdtype(t.dtype, jnp.floating) else 0.0
    sums = jnp.sum(t, axis=-1)
    bad = ~jnp.all(jnp.isfinite(t) & (t >= 0), axis=-1) | ~(jnp.abs(sums - 1) <= slack)
    return _rows(bad), "probability rows (finite, non-negative, summing to 1)"


def logistic(predictions: Array, targets: Array) -> Array:
    """Binary logistic loss on logits `(n,)` or `(n, 1)` with targets in {0, 1} (or probabilities in [0, 1]) of the
    same shape."""
    targets = _as_array(targets)
    if predictions.ndim == 2 and predictions.shape[-1] != 1:
        raise ValueError(
            f"logistic loss needs one output (predictions of shape (n,) or (n, 1)); got {predictions.shape}"
        )
    _check_samples(predictions)
    _checks.check_shape("targets", targets, predictions.shape, "binary targets must match the predictions")
    bad = _logistic_problems(targets)
    t = _clean(targets, bad, 0).astype(predictions.dtype)
    loss = jnp.mean(optax.sigmoid_binary_cross_entropy(predictions, t))
    return _guard(loss, bad, targets, "in [0, 1] (binary labels or probabilities)")


def _logistic_problems(targets: Any) -> Array:
    t = jnp.asarray(targets)
    if jnp.issubdtype(t.dtype, jnp.bool_):
        return _rows(jnp.zeros(t.shape, bool))
    return _rows(~((t >= 0) & (t <= 1)))  # NaN fails both


LOSSES: dict[str, Loss] = {"square": square, "cross_entropy": cross_entropy, "logistic": logistic}


def invalid_targets(loss: Loss, predictions: Array, targets: Any) -> Array:
    """The number of samples whose target is outside `loss`'s domain (an int32 scalar; works under `jit`): for the
    built-in losses as each documents it (labels outside `[0, classes)`, probability rows that are not
    distributions, binary targets outside [0, 1], NaN/inf); for any other loss, targets that are not finite.
    `predictions` only lends its shape (the number of classes)."""
    targets = _as_array(targets)
    if loss is cross_entropy:
        bad = _cross_entropy_problems(predictions, targets)[0]
    elif loss is logistic:
        bad = _logistic_problems(targets)
    elif jnp.issubdtype(targets.dtype, jnp.floating):
        bad = _square_problems(targets)
    else:
        bad = jnp.zeros((), bool)
    return jnp.sum(jnp.asarray(bad), dtype=jnp.int32)


def get_loss(loss: str | Loss) -> Loss:
    """A loss by name (`LOSSES`) or a callable passed through."""
    if callable(loss):
        return loss
    _checks.check_choice("loss", loss, LOSSES)
    return LOSSES[loss]
