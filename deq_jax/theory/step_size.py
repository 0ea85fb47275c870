"""A justified step size for full-batch GD on the DELM's square loss (docs/theory.md sections 9 and 12).

GD moves `W = B U^{-1}` by `-eta P(G) + O(eta^2)`, with `P = J J^*` the induced preconditioner (`J` the Jacobian of
`(A, B) -> W`) and `H = I (x) C`, `C = phi^T phi / n`, the shallow Hessian. The quantity that decides the step is
`eta lambda_max(P H)`:
- `eta lambda_max(P H) < 1` is exactly the condition under which the trust-region norm `M = ((eta P)^{-1} - H) / lam`
  is positive definite (section 5; `trust_region_check` reports it as `step_size_ratio`);
- `eta lambda_max(P H) < 2` is linear stability of GD at a global minimiser: there `G = 0`, the Hessian of the loss
  in `(A, B)` is its Gauss-Newton part `J^* H J`, and `lambda_max(J^* H J) = lambda_max(P H)`.
Since `P(G) = G (U U^T)^{-1} + K K^*(G)` with `|K| <= gamma |W|_2 c_sigma |U^{-1}|_2`,
`lambda_max(P H) <= lambda_max(C) |U^{-1}|_2^2 (1 + gamma^2 c_sigma^2 |W|_2^2)`, where `c_sigma` bounds the
derivative of sigma (`sigma_derivative_bound`). `learning_rate_limit` is the reciprocal of that bound: any
`eta <= learning_rate_limit` has `eta lambda_max(P H) <= 1`. It is computed from measured norms (`u_norms`,
`spectral_norm(W)`), so a run can check at every step that it stayed inside (`eta / limit_t <= 1`, or `<= 2` for
stability alone).

The rule `eta = (1 - gamma)^2 / lambda_max(C)` used before rests on `|U^{-1}|_2 <= 1 / (1 - gamma)`, which is false
(it bounds the 1-norm; `u_inverse_norm_bound` gives the 2-norm bound, a factor up to `sqrt(1 + (m - 1) gamma)`
larger) and ignores the `K K^*` term. At small `A`, `|U^{-1}|_2 = 1 / (1 - gamma)` along the all-ones direction, so
the rule puts `eta lambda_max(C) |U^{-1}|_2^2` at 1: only a misalignment of the top eigenvectors of `P` and `C`
keeps `eta lambda_max(P H)` below 1. Features with a common offset (raw pixels) align them, and the rule then leaves
the trust-region range (tested: `eta lambda_max(P H) = 1.12`).
"""

from __future__ import annotations

import jax.numpy as jnp

from deq_jax import _checks
from deq_jax.maps import SIGMAS, Sigma
from deq_jax.theory._common import Array

#: `c_sigma >= sup_A |Dsigma_A|` (operator norm on (m, m) matrices, Frobenius norm) for the built-in sigmas
_SIGMA_DERIVATIVE_BOUNDS = {
    "column_softmax": lambda m: 0.5,
    "row_softmax": lambda m: 0.5,
    "scaled_tanh": lambda m: 1.0 / m,
}


def sigma_derivative_bound(sigma: str | Sigma, m: int) -> float:
    """`c_sigma`, a bound on `|Dsigma_A[S]|_F / |S|_F` over all `A` and `S`, for a built-in sigma.

    Softmax (by columns or by rows) acts on each column (row) `a` through `J = diag(s) - s s^T`, `s = softmax(a)`;
    `x^T J x` is the variance of `x` under the distribution `s`, at most `(max x - min x)^2 / 4 <= |x|^2 / 2`, so
    `c = 1/2` (attained in the limit of two equal entries). `scaled_tanh(A) = tanh(A) / m` has
    `Dsigma[S] = (1 - tanh(A)^2) * S / m`, so `c = 1/m`. Other sigmas: pass `dsigma_norm` to `learning_rate_limit`.

    Args:
      sigma: a built-in weight nonlinearity, by name or as the function in `deq_jax.maps.SIGMAS`.
      m: the width (enters the bound of `scaled_tanh`).

    Returns:
      `c_sigma`, a float. Raises `ValueError` for a sigma without a known bound.
    """
    _checks.check_positive("m", m, integer=True)
    for name, fn in SIGMAS.items():
        if sigma == name or sigma is fn:
            return _SIGMA_DERIVATIVE_BOUNDS[name](m)
    raise ValueError(
        f"no derivative bound is known for sigma {sigma!r}; pass dsigma_norm (a bound on "
        f"|Dsigma_A[S]|_F / |S|_F over all A, S) instead"
    )


def learning_rate_limit(
    lambda_max: float | Array,
    U_inv_norm2: float | Array,
    W_norm2: float | Array,
    gamma: float | Array,
    *,
    sigma: str | Sigma = "column_softmax",
    m: int | None = None,
    dsigma_norm: float | None = None,
) -> Array:
    """`1 / (lambda_max(C) |U^{-1}|_2^2 (1 + gamma^2 c_sigma^2 |W|_2^2))`: below it, `eta lambda_max(P H) <= 1`.

    `lambda_max`: of `C = phi^T phi / n` (`feature_spectrum`); `U_inv_norm2 = |U^{-1}|_2` (`u_norms`);
    `W_norm2 = |W|_2` (`spectral_norm(end_to_end(...))`); `c_sigma` from `sigma_derivative_bound(sigma, m)` (`m` is
    needed for `scaled_tanh` only) unless `dsigma_norm` gives it. Broadcasts over the array arguments, so a run's
    history of norms gives the limit at every step. See the module docstring for what the limit guarantees.

    Args:
      lambda_max: `lambda_max(C)`.
      U_inv_norm2: `|U^{-1}|_2`.
      W_norm2: `|W|_2`.
      gamma: the DELM's `gamma`.
      sigma: the weight nonlinearity, for `c_sigma` (ignored when `dsigma_norm` is given).
      m: the width, needed for `sigma="scaled_tanh"` only.
      dsigma_norm: `c_sigma`, for a sigma without a built-in bound.

    Returns:
      The largest step size with `eta lambda_max(P H) <= 1` by the bound, broadcast over the array arguments.
    """
    if dsigma_norm is None:
        if sigma == "scaled_tanh" and m is None:
            raise ValueError("sigma='scaled_tanh' needs m (its derivative bound is 1/m)")
        dsigma_norm = sigma_derivative_bound(sigma, 1 if m is None else m)
    return 1.0 / (jnp.asarray(lambda_max) * preconditioner_norm_bound(U_inv_norm2, W_norm2, gamma, dsigma_norm))


def preconditioner_norm_bound(
    U_inv_norm2: float | Array, W_norm2: float | Array, gamma: float | Array, dsigma_norm: float = 0.5
) -> Array:
    """`|U^{-1}|_2^2 (1 + gamma^2 c_sigma^2 |W|_2^2) >= lambda_max(P)`, the induced preconditioner's largest eigenvalue.

    From `P(G) = G (U U^T)^{-1} + K K^*(G)`: the first term has norm `|U^{-1}|_2^2`, the second `|K|^2` with
    `|K(S)|_F = gamma |W Dsigma[S] U^{-1}|_F <= gamma |W|_2 c_sigma |S|_F |U^{-1}|_2`. Broadcasts.

    Args:
      U_inv_norm2: `|U^{-1}|_2`.
      W_norm2: `|W|_2`.
      gamma: the DELM's `gamma`.
      dsigma_norm: `c_sigma` (`sigma_derivative_bound`; default: the softmaxes' 1/2).

    Returns:
      The bound on `lambda_max(P)`, broadcast over the array arguments.
    """
    _checks.check_positive("dsigma_norm", dsigma_norm)
    u, c = jnp.asarray(U_inv_norm2), jnp.asarray(gamma) * dsigma_norm * jnp.asarray(W_norm2)
    return u * u * (1.0 + c * c)
