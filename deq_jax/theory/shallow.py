"""The shallow square-loss problem `min_W (1/n) sum_i 1/2 |W phi_i - y_i|^2`, computed from `m x m` Gram matrices.

Everything here costs `O(n m^2)` time and `O(n m + m^2)` memory (the input itself plus `m x m` work): the only
products with `phi` are `phi^T phi`, `phi^T y` and `phi W^T`. (An SVD of the `n x m` matrix `phi` through XLA's CPU
lowering allocates an `n x n` workspace: 28.8 GB at n = 60000.) Compiled memory is tested at n = 60000, m = 785.

Numerics of the Gram route (docs/theory.md section 10). `C = phi^T phi / n` holds the squared singular values
`lambda_i = s_i^2 / n` of `phi`; its eigenvalues come out with an absolute error of about `eps lambda_max`
(measured ~1e-16 lambda_max in float64 at n = 60000, m = 65), against `eps s_max` for the singular values of an
SVD. Consequences:
- rank: an eigenvalue is counted as nonzero when it exceeds `rtol lambda_max`, default `rtol = m eps` (NumPy's
  `matrix_rank(C, hermitian=True)` rule). In singular values this is `s > sqrt(m eps) s_max` (1.2e-7 s_max at
  m = 65 in float64; 2.8e-3 s_max in float32): directions with a smaller singular value count as null, where an
  SVD of `phi` would resolve down to `max(n, m) eps s_max`. `L*` is then the optimum over the kept directions: it
  exceeds the exact infimum by `|q^T y|^2 / 2n` per cut direction (q its left singular vector), the part of y that
  only a coefficient ~ `|q^T y| / s` could fit, and that gradient descent approaches at a rate
  `<= rtol lambda_max` per unit step: never, in practice. `rtol=0` keeps everything (with no accuracy there).
- `lambda_min^+`: relative error about `eps lambda_max / lambda_min^+ = eps cond(C)` (full digits for whitened
  features; 1e-9 relative at cond(C) = 1e7). When `cond(C)` approaches `1 / rtol`, the smallest eigenvalue is
  indistinguishable from zero and is cut.
- `W*`: the normal equations alone give a relative error ~ `eps cond(C) = eps cond(phi)^2`; one refinement step
  with the true residual `y - phi W^T` (corrected semi-normal equations) brings it to ~ `eps cond(phi)` for
  `cond(phi)` well below `1 / sqrt(eps)`. `L*` is quadratic in the error of `W*`, so it is accurate regardless.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from deq_jax.losses import square
from deq_jax.theory._common import Array, as_float64, check_phi, check_phi_y, check_rtol, check_W, program


def default_rtol(m: int, dtype: Any) -> float:
    """The default relative eigenvalue cutoff of `C = phi^T phi / n`: `m eps` (NumPy's hermitian rank rule).

    Args:
      m: the number of features (columns of `phi`).
      dtype: the floating dtype the spectrum is computed in.

    Returns:
      The cutoff, a float.
    """
    return max(int(m), 1) * float(jnp.finfo(dtype).eps)


def feature_gram(phi: Array) -> Array:
    """`C = Phi Phi^T / n = phi^T phi / n`, `(m, m)`: the shallow square loss's Hessian per output (section 4).

    Float64 where x64 is enabled (a `PrecisionWarning` otherwise); `O(n m^2)` time, `O(m^2)` extra memory.

    Args:
      phi: the features, `(n, m)`.

    Returns:
      `C`, `(m, m)`.
    """
    check_phi(phi)
    return _gram(as_float64(phi, "feature_gram"))


@program
def _gram(phi: Array) -> Array:
    return phi.T @ phi / phi.shape[0]


def feature_spectrum(phi: Array, rtol: float | None = None) -> dict:
    """Extreme eigenvalues of `C = phi^T phi / n` (the shallow square loss's Hessian per output), from the Gram matrix.

    Returns `{"lambda_max", "lambda_min_plus", "rank", "cutoff"}`: `lambda_min_plus` is the smallest eigenvalue
    `> cutoff = rtol lambda_max` (the `lambda_min^+` of the PL inequality, docs/theory.md section 4) and `rank` how
    many eigenvalues exceed the cutoff. Default `rtol = m eps` (see the module docstring for what the Gram route
    resolves: singular values below `sqrt(rtol) s_max` count as zero). `min_norm_solution` uses the same cutoff, so
    `rank` is the rank that `W*` sees. A zero `phi` gives rank 0 and `lambda_min_plus = nan`.
    Float64 where x64 is enabled (a `PrecisionWarning` otherwise); `O(n m^2)` time, `O(m^2)` extra memory.

    Args:
      phi: the features, `(n, m)`.
      rtol: the relative eigenvalue cutoff (default `default_rtol`).
    """
    check_phi(phi)
    phi = as_float64(phi, "feature_spectrum")
    if rtol is None:
        rtol = default_rtol(phi.shape[1], phi.dtype)
    check_rtol(rtol)
    return _spectrum(phi, rtol)


@program
def _spectrum(phi: Array, rtol: Any) -> dict:
    eig = jnp.linalg.eigvalsh(_gram(phi))  # ascending
    lambda_max = jnp.maximum(eig[-1], 0.0)
    cutoff = rtol * lambda_max
    above = eig > cutoff
    lambda_min_plus = jnp.min(jnp.where(above, eig, jnp.inf))
    return {
        "lambda_max": lambda_max,
        "lambda_min_plus": jnp.where(jnp.isfinite(lambda_min_plus), lambda_min_plus, jnp.nan),
        "rank": jnp.sum(above).astype(jnp.int32),
        "cutoff": cutoff,
    }


def min_norm_solution(phi: Array, y: Array, rtol: float | None = None) -> Array:
    """`W* = (C^+ phi^T y / n)^T`, `(m_y, m)`: the minimum-Frobenius-norm minimiser of the square loss.

    `C^+` keeps the eigenvalues of `C = phi^T phi / n` above `rtol lambda_max` (default `m eps`, as
    `feature_spectrum`), so `W*`'s rows lie in the span of those eigenvectors (the numerical row space of `phi`).
    One refinement step with the residual `y - phi W^T` follows (module docstring). Float64 where x64 is enabled;
    `O(n m (m + m_y))` time, `O(n m_y + m^2)` extra memory.

    Args:
      phi: the features, `(n, m)`.
      y: the targets, `(n, m_y)`.
      rtol: the relative eigenvalue cutoff (default `default_rtol`).

    Returns:
      `W*`, `(m_y, m)`.
    """
    check_phi_y(phi, y)
    phi = as_float64(phi, "min_norm_solution")
    if rtol is None:
        rtol = default_rtol(phi.shape[1], phi.dtype)
    check_rtol(rtol)
    return _min_norm(phi, jnp.asarray(y, phi.dtype), rtol)


@program
def _min_norm(phi: Array, y: Array, rtol: Any) -> Array:
    n = phi.shape[0]
    eig, V = jnp.linalg.eigh(_gram(phi))
    keep = eig > rtol * jnp.maximum(eig[-1], 0.0)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, eig, 1.0), 0.0)

    def solve(D):  # W with W C = D restricted to the kept eigenvectors: D V diag(1/lambda) V^T
        return ((D @ V) * inv) @ V.T

    W = solve(y.T @ phi / n)
    return W + solve((y - phi @ W.T).T @ phi / n)


def shallow_optimum_square(phi: Array, y: Array, rtol: float | None = None) -> tuple[Array, Array]:
    """`(W*, L*)` of the convex shallow problem `min_W (1/n) sum_i 1/2 |W phi_i - y_i|^2` (the project's scaling).

    `W*` is the minimum-norm minimiser (`min_norm_solution`); `L* = (1/2n) |phi W*^T - y|_F^2` (from the residual,
    not from Gram quantities, which would cancel) is the DELM's global optimum too (same function class,
    docs/theory.md section 1). Float64 where x64 is enabled; `L*` is a 0-d array (use `float(L)` outside `jit`).

    Args:
      phi: the features, `(n, m)`.
      y: the targets, `(n, m_y)`.
      rtol: the relative eigenvalue cutoff of `min_norm_solution` (default `default_rtol`).

    Returns:
      `(W*, L*)`: `(m_y, m)` and a 0-d array.
    """
    W = min_norm_solution(phi, y, rtol)
    return W, _square_at(W, jnp.asarray(phi, W.dtype), jnp.asarray(y, W.dtype))


@program
def _square_at(W: Array, phi: Array, y: Array) -> Array:
    return square(phi @ W.T, y)


def square_loss_gradient(W: Array, phi: Array, y: Array) -> Array:
    """`G = dL/dW = (phi W^T - y)^T phi / n` for the square loss `L = (1/n) sum_i 1/2 |W phi_i - y_i|^2`.

    Args:
      W: the end-to-end matrix, `(m_y, m)`.
      phi: the features, `(n, m)`.
      y: the targets, `(n, m_y)`.

    Returns:
      `G`, `(m_y, m)`.
    """
    check_phi_y(phi, y)
    check_W(W, phi, y)
    return _sq_grad(W, phi, y)


@program
def _sq_grad(W: Array, phi: Array, y: Array) -> Array:
    return (phi @ W.T - y).T @ phi / phi.shape[0]
