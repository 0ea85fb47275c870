"""The DELM's closed form and the norms of `U = I - gamma sigma(A)` (docs/theory.md sections 1, 4 and 9).

`u_matrix`, `end_to_end`: `U` and `W = B U^{-1}`. `spectral_norm`: `|M|_2`. `u_norms` / `u_inverse_norm`: `|U|_2`
and `|U^{-1}|_2 = 1 / sigma_min(U)` from one SVD of the `m x m` matrix `U`, batched over a run's history of `A`.
`u_inverse_norm_bound`: the a-priori bound
`|U^{-1}|_2 <= sqrt(1 + (m - 1) gamma) / (1 - gamma) <= sqrt(m) / (1 - gamma)` for a stochastic `sigma(A)`
(docs/theory.md section 9; `1 / (1 - gamma)` bounds the 1-norm only).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from deq_jax import _checks
from deq_jax.maps import Sigma, get_sigma
from deq_jax.theory._common import Array, check_A_batched, check_AB, program


def u_matrix(A: Array, gamma: float | Array, sigma: str | Sigma = "column_softmax") -> Array:
    """`U = I - gamma sigma(A)`, so that `z* = U^{-1} phi(x)` and `W = B U^{-1}` (docs/theory.md section 1).

    For column-stochastic `sigma(A)`: `1^T U = (1 - gamma) 1^T`, `rho(I - U) = gamma` and
    `|U|_2 <= 1 + gamma |sigma(A)|_2 <= 1 + gamma sqrt(m)`.

    Args:
      A: the `(m, m)` weight matrix.
      gamma: the DELM's `gamma`, in `(0, 1)`.
      sigma: the weight nonlinearity, a name from `deq_jax.maps.SIGMAS` or a callable.

    Returns:
      `U`, `(m, m)`.
    """
    check_AB(A)
    _checks.check_open_unit("gamma", gamma)
    return _u(A, gamma, get_sigma(sigma))


# the checks above run eagerly; the array math goes through jit-compiled cores (one compile per shape and sigma,
# instead of one per primitive in eager mode)
@program(static_argnames=("sigma",))
def _u(A: Array, gamma: Any, sigma: Sigma) -> Array:
    return jnp.eye(A.shape[-1], dtype=A.dtype) - gamma * sigma(A)


@program(static_argnames=("sigma",))
def _w(A: Array, B: Array, gamma: Any, sigma: Sigma) -> Array:
    return jnp.linalg.solve(_u(A, gamma, sigma).T, B.T).T


def end_to_end(A: Array, B: Array, gamma: float | Array, sigma: str | Sigma = "column_softmax") -> Array:
    """The end-to-end matrix `W = B U^{-1}`, `(m_y, m)`, by one LU solve `U^T W^T = B^T` (`jnp.linalg.solve`).

    Plain autodiff (forward and reverse, any order) goes through the solve, which is what `delm_w_velocity` and
    `predict_w_step` rely on.

    Args:
      A: the `(m, m)` weight matrix.
      B: the `(m_y, m)` output matrix.
      gamma: the DELM's `gamma`, in `(0, 1)`.
      sigma: the weight nonlinearity, a name from `deq_jax.maps.SIGMAS` or a callable.

    Returns:
      `W`, `(m_y, m)`.
    """
    check_AB(A, B)
    _checks.check_open_unit("gamma", gamma)
    return _w(A, B, gamma, get_sigma(sigma))


def spectral_norm(M: Array) -> Array:
    """`|M|_2`, the largest singular value; batched over leading axes (`(..., p, q) -> (...)`).

    Args:
      M: a float matrix `(p, q)` or a batch of them `(..., p, q)`.

    Returns:
      The spectral norms, shaped like `M`'s leading axes.
    """
    _checks.check_float_array("M", M)
    if jnp.ndim(M) < 2:
        raise ValueError(f"M must have rank >= 2 (a matrix or a batch of matrices); got shape {jnp.shape(M)}")
    return _spectral_norm(M)


@program
def _spectral_norm(M: Array) -> Array:
    return jnp.linalg.svd(M, compute_uv=False)[..., 0]


def u_norms(A: Array, gamma: float | Array, sigma: str | Sigma = "column_softmax") -> dict:
    """`{"U_norm2": |U|_2, "U_inv_norm2": |U^{-1}|_2}` for `U = I - gamma sigma(A)`, from one SVD of `U`.

    `A` is `(m, m)` or a batch `(..., m, m)` (e.g. the history of a run); the results have the leading shape.
    `|U|_2` enters the rate bound (docs/theory.md section 4), `|U^{-1}|_2` the step-size limit (section 9):
    `|U^{-1}|_2 = 1 / sigma_min(U)` is accurate to about `eps cond_2(U)` relative, fine for `gamma` not near 1.

    Args:
      A: the weight matrix `(m, m)` or a batch of them `(..., m, m)`.
      gamma: the DELM's `gamma`, in `(0, 1)`.
      sigma: the weight nonlinearity, a name from `deq_jax.maps.SIGMAS` or a callable.

    Returns:
      `{"U_norm2": ..., "U_inv_norm2": ...}`, arrays shaped like `A`'s leading axes.
    """
    check_A_batched(A)
    _checks.check_open_unit("gamma", gamma)
    return _u_norms(A, gamma, get_sigma(sigma))


def u_inverse_norm(A: Array, gamma: float | Array, sigma: str | Sigma = "column_softmax") -> Array:
    """The measured `|U^{-1}|_2 = 1 / sigma_min(I - gamma sigma(A))`; batched over leading axes of `A`.

    For column-stochastic `sigma(A)` it can exceed `1 / (1 - gamma)` (which bounds the 1-norm), by up to a factor
    `sqrt(1 + (m - 1) gamma)`: see `u_inverse_norm_bound`.

    Args:
      A: the weight matrix `(m, m)` or a batch of them `(..., m, m)`.
      gamma: the DELM's `gamma`, in `(0, 1)`.
      sigma: the weight nonlinearity, a name from `deq_jax.maps.SIGMAS` or a callable.

    Returns:
      `|U^{-1}|_2`, shaped like `A`'s leading axes.
    """
    return u_norms(A, gamma, sigma)["U_inv_norm2"]


@program(static_argnames=("sigma",))
def _u_norms(A: Array, gamma: Any, sigma: Sigma) -> dict:
    m = A.shape[-1]
    flat = A.reshape((-1, m, m))
    s = jax.vmap(lambda a: jnp.linalg.svd(_u(a, gamma, sigma), compute_uv=False))(flat)  # descending
    lead = A.shape[:-2]
    return {"U_norm2": s[:, 0].reshape(lead), "U_inv_norm2": (1.0 / s[:, -1]).reshape(lead)}


def u_inverse_norm_bound(m: int, gamma: float) -> float:
    """A bound on `|U^{-1}|_2` valid for every `A` when `sigma(A)` is column- or row-stochastic (both softmaxes).

    `U^{-1} = sum_k gamma^k S^k` with `S = sigma(A)` entrywise non-negative. For column-stochastic `S`, every
    column of `S^k` sums to 1, so `|U^{-1}|_1 = 1 / (1 - gamma)`; the entries of `S^k` (k >= 1) sum to `m`, so a
    row sums to at most `m` and `|U^{-1}|_inf <= 1 + m gamma / (1 - gamma)`. Then
    `|U^{-1}|_2 <= sqrt(|U^{-1}|_1 |U^{-1}|_inf) = sqrt(1 + (m - 1) gamma) / (1 - gamma) <= sqrt(m) / (1 - gamma)`
    (row-stochastic: the same with the two norms exchanged). Nearly attained when every column of `sigma(A)`
    concentrates on one row: `m = 7, gamma = 0.8` gives `|U^{-1}|_2 -> 11.0` against this bound `12.04`, while
    `1 / (1 - gamma) = 5` (docs/theory.md section 9). Not valid for `scaled_tanh` or other sigmas: measure there.

    Args:
      m: the width (a positive integer).
      gamma: the DELM's `gamma`, in `(0, 1)`.

    Returns:
      The bound `sqrt(1 + (m - 1) gamma) / (1 - gamma)`, a float.
    """
    _checks.check_positive("m", m, integer=True)
    _checks.check_open_unit("gamma", gamma)
    return math.sqrt(1.0 + (m - 1) * float(gamma)) / (1.0 - float(gamma))
