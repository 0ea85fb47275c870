"""The convergence bound of docs/theory.md section 4, measured along a run: the per-step ratio of the gap against
the bound from the run's own `|U_t|_2`, from both sides (never slower; and how much faster, `rate_factor`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from experiments.reproduce.common import finite_max


@dataclasses.dataclass
class BoundAnalysis:
    """Observed per-step ratios `gap_{t+1} / gap_t` against the bound from the run's own `|U_t|_2`."""

    ratio: np.ndarray
    checked: np.ndarray
    bound_ratio: np.ndarray
    flow_ratio: np.ndarray
    cumulative_bound: np.ndarray
    max_excess: float
    max_flow_excess: float
    checked_steps: int
    median_ratio: float
    median_bound_ratio: float
    U_norm2_range: tuple


def bound_analysis(
    loss_hist: np.ndarray, U_norm2: np.ndarray, L_star: float, learning_rate: float, pl: float, floor: float
) -> BoundAnalysis:
    """Observed per-step ratios `gap_{t+1} / gap_t` against the bound from the run's own `|U_t|_2`.

    `theory.gd_rate_bound` gives the gradient-flow bound per step, `r_t = 1 - 2 x_t` with
    `x_t = eta lambda / |U_t|_2^2`: first order in eta. One gradient *step* contracts the shallow model's slowest
    direction, preconditioned by `1/|U_t|_2^2`, by exactly `(1 - x_t)^2 = r_t + x_t^2`; that is the per-step bound
    checked (`bound_ratio`). Both are compared only where the gaps are above `floor * gap_0`, below which the ratio
    of two rounding-level numbers says nothing. An empty comparison gives NaN maxima (a failed claim, never a crash).
    """
    gap = np.asarray(loss_hist, np.float64) - L_star
    ng = gap / gap[0] if gap.size and gap[0] != 0 else np.full(gap.shape, np.nan)
    flow_ratio = gd_rate_bound(learning_rate, pl, U_norm2)
    bound_ratio = ((1.0 + flow_ratio) / 2.0) ** 2
    cumulative = np.concatenate([[1.0], np.cumprod(bound_ratio[:-1])]) if gap.size else np.zeros(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        valid = (ng[1:] > floor) & (ng[:-1] > floor)
        ratio = np.full(gap.shape, np.nan)
        ratio[:-1] = gap[1:] / gap[:-1]
    excess = ratio[:-1][valid] - bound_ratio[:-1][valid]
    flow_excess = ratio[:-1][valid] - flow_ratio[:-1][valid]
    checked_mask = np.zeros(gap.shape, bool)
    checked_mask[:-1] = valid
    return BoundAnalysis(
        ratio=ratio,
        checked=checked_mask,
        bound_ratio=bound_ratio,
        flow_ratio=flow_ratio,
        cumulative_bound=cumulative,
        max_excess=finite_max(excess),
        max_flow_excess=finite_max(flow_excess),
        checked_steps=int(valid.sum()),
        median_ratio=float(np.median(ratio[:-1][valid])) if valid.any() else math.nan,
        median_bound_ratio=float(np.median(bound_ratio[:-1][valid])) if valid.any() else math.nan,
        U_norm2_range=(float(np.min(U_norm2)), float(np.max(U_norm2))) if np.size(U_norm2) else (math.nan, math.nan),
    )


def gd_rate_bound(learning_rate: float, pl: float, U_norm2: Any) -> np.ndarray:
    """`deq_jax.theory.gd_rate_bound` (`1 - 2 eta lambda / |U_t|_2^2`) in NumPy: the same formula without an eager
    XLA compilation for every run's history length (a test checks that the two agree)."""
    u = np.asarray(U_norm2, np.float64)
    return 1.0 - 2.0 * learning_rate * pl / (u * u)


def rate_factor(fit: dict | None, bound: BoundAnalysis | None) -> float:
    """How many times faster than its bound the gap decays over the fit window: the fitted log-rate over the mean
    log of the per-step bound there (>= 1 when the bound holds; large when the bound says little)."""
    if fit is None or bound is None:
        return math.nan
    i0, i1 = fit["window"]
    predicted = float(np.mean(np.log(bound.bound_ratio[i0:i1])))
    return fit["slope"] / predicted if predicted < 0 else math.nan
