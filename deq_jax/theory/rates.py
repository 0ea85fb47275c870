"""The convergence bound of docs/theory.md section 4 in its per-step form, and a log-linear fit of a measured gap.

`gd_rate_bound` / `flow_bound`: the contraction `1 - 2 eta lambda / |U_t|_2^2` per step and its product along a run,
from the run's own `|U_t|_2` (`closed_form.u_norms`). `fit_log_linear`: the rate of a measured gap over an explicit
window (section 9). Pure arithmetic on arrays (`gd_rate_bound`, `flow_bound`: jit-able) or NumPy measurements.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from deq_jax.theory._common import Array


def gd_rate_bound(learning_rate: float | Array, lambda_min_plus: float | Array, U_norm2: float | Array) -> Array:
    """The gradient-flow contraction of the gap `L - L*` over a time `eta`: `1 - 2 x` with
    `x = eta lambda_min^+ / |U|_2^2` (theory.md 4 and 9).

    It is first order in `eta` (from `dL/dt <= -|G|^2 / |U|_2^2 <= -2 lambda_min^+ (L - L*) / |U|_2^2`): one gradient
    descent *step* can exceed it by its second-order term `x^2`, and does on a tight case
    (`tests/lib/test_properties.py::test_gd_rate_bound_is_reached_and_exceeded_at_second_order`). The per-step bound
    for a gradient step is `(1 - x)^2 = gd_rate_bound + x^2`, which the main job's claim checks. Broadcasts over all
    arguments.

    Args:
      learning_rate: the GD step size `eta`.
      lambda_min_plus: `lambda_min^+` of `C = phi^T phi / n` (`feature_spectrum`).
      U_norm2: `|U|_2` at the step's parameters (`u_norms`).

    Returns:
      The factor, broadcast over the arguments.
    """
    lr = jnp.asarray(learning_rate)
    lam = jnp.asarray(lambda_min_plus)
    u = jnp.asarray(U_norm2)
    return 1.0 - 2.0 * lr * lam / (u * u)


def flow_bound(
    gap0: float | Array, lambda_min_plus: float | Array, U_norm2_history: Array, learning_rate: float | Array
) -> Array:
    """The gap bound along a run, aligned with its history: `bound[t] = gap0 prod_{s<t} (1 - 2 eta lambda / |U_s|^2)`.

    `U_norm2_history[t]` is `|U_t|_2` at the parameters *before* step t (where `history["loss"][t]` is evaluated),
    so `bound[0] = gap0` and `bound` has the history's length T (the factor of the last step is not used).
    Computed as `exp(cumsum(log factor))`; a factor `<= 0` (a step size beyond the bound's range) gives 0 after it.

    Args:
      gap0: the initial gap `L_0 - L*`.
      lambda_min_plus: `lambda_min^+` of `C = phi^T phi / n` (`feature_spectrum`).
      U_norm2_history: `|U_t|_2` for every step t, a 1-D array of length T.
      learning_rate: the GD step size `eta`.

    Returns:
      The bound on the gap at every step, shape `(T,)`.
    """
    u = jnp.asarray(U_norm2_history)
    if u.ndim != 1:
        raise ValueError(f"U_norm2_history must be a 1-D array over steps; got shape {u.shape}")
    factors = gd_rate_bound(learning_rate, lambda_min_plus, u)
    log_f = jnp.log(jnp.maximum(factors, 0.0))
    cum = jnp.concatenate([jnp.zeros((1,), log_f.dtype), jnp.cumsum(log_f)[:-1]])
    return jnp.asarray(gap0) * jnp.exp(cum)


def fit_log_linear(
    gaps: Any,
    start: int | None = None,
    stop: int | None = None,
    lo: float | None = None,
    hi: float | None = None,
    *,
    steps: Any | None = None,
) -> dict:
    """Least-squares fit of `log(gap_t) = log(c) + slope * t` over an explicit window (theory.md section 9).

    Window: the index range `[start, stop)` (Python slice semantics, default all), narrowed, when `lo` and/or `hi`
    are given, to the gap band `lo < gap < hi`: it starts at the first index whose gap is `< hi` and ends before the
    first later index whose gap is `<= lo` (or not positive or not finite), so it is one contiguous stretch.
    `steps` gives the x values (default `0, 1, ...`; e.g. when gaps were logged every k steps).
    Returns `{"rate": exp(slope)` (the per-step factor), `"slope"`, `"intercept"`, `"r2"`, `"window": (i0, i1)`,
    `"points"}`; at least 3 points are required.
    """
    g = np.asarray(gaps, dtype=np.float64)
    if g.ndim != 1:
        raise ValueError(f"gaps must be a 1-D sequence; got shape {g.shape}")
    x_all = np.arange(g.size, dtype=np.float64) if steps is None else np.asarray(steps, dtype=np.float64)
    if x_all.shape != g.shape:
        raise ValueError(f"steps must have the shape of gaps {g.shape}; got {x_all.shape}")
    i0, i1, _ = slice(start, stop).indices(g.size)
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"the gap band needs lo < hi; got lo={lo!r}, hi={hi!r}")
    if hi is not None:
        below = np.flatnonzero(g[i0:i1] < hi)
        i0 = i1 if below.size == 0 else i0 + int(below[0])
    usable = np.isfinite(g[i0:i1]) & (g[i0:i1] > (0.0 if lo is None else lo))
    bad = np.flatnonzero(~usable)
    if bad.size:
        i1 = i0 + int(bad[0])
    points = i1 - i0
    if points < 3:
        raise ValueError(
            f"fit_log_linear needs at least 3 positive, finite gaps in the window; the window "
            f"(start={start}, stop={stop}, lo={lo}, hi={hi}) selected indices [{i0}, {i1}) of {g.size}"
        )
    x, z = x_all[i0:i1], np.log(g[i0:i1])
    slope, intercept = np.polyfit(x, z, 1)
    ss_res = float(np.sum((z - (intercept + slope * x)) ** 2))
    ss_tot = float(np.sum((z - z.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return {
        "rate": float(np.exp(slope)),
        "slope": float(slope),
        "intercept": float(intercept),
        "r2": r2,
        "window": (int(i0), int(i1)),
        "points": int(points),
    }
