"""Equilibrium maps `f(z, params, x) -> z` as pure functions, weight nonlinearities `sigma` and feature maps `phi`.

Conventions (see docs/theory.md, with samples as rows as everywhere in deq_jax):
- a state `z` has the width `m` on its last axis: one sample `(m,)` or a batch `(n, m)`;
- the DELM map is `f(z) = gamma * z @ sigma(A).T + phi`, i.e. `z_i = gamma * sigma(A) z_i + phi(x_i)` per sample;
- the transposed (end-to-end) map is `f(W) = B + gamma * W @ sigma(A)`, whose fixed point is
  `W = B (I - gamma sigma(A))^{-1}`, the end-to-end matrix of the DELM.

A map is any callable `f(z, params, x)`. Maps that are affine in `z` may also expose
`affine(params, x) -> (M, c)` with `f(z) = z @ M.T + c`; the `direct` solver then solves `z (I - M).T = c` exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from deq_jax import _checks

Array = jax.Array
Sigma = Callable[[Array], Array]


# ----------------------------------------------------------------------------- weight nonlinearities sigma(A)


def column_softmax(A: Array) -> Array:
    """`sigma(A)[i, j] = exp(A[i, j]) / sum_k exp(A[k, j])`: column-stochastic, so `rho(gamma sigma(A)) <= gamma`."""
    return jax.nn.softmax(A, axis=0)


def row_softmax(A: Array) -> Array:
    """Row-stochastic softmax: `|sigma(A)|_inf = 1`, so `gamma sigma(A)` is a `gamma`-contraction in the inf-norm."""
    return jax.nn.softmax(A, axis=1)


def scaled_tanh(A: Array) -> Array:
    """`tanh(A) / m`: every row has absolute sum `< 1`, so `gamma sigma(A)` contracts in the inf-norm."""
    return jnp.tanh(A) / A.shape[0]


SIGMAS: dict[str, Sigma] = {
    "column_softmax": column_softmax,
    "row_softmax": row_softmax,
    "scaled_tanh": scaled_tanh,
}


def get_sigma(sigma: str | Sigma) -> Sigma:
    """Resolve a weight nonlinearity by name (see `SIGMAS`) or pass a callable through.

    Args:
      sigma: a name from `SIGMAS` or a callable.

    Returns:
      The function `A -> sigma(A)`. Raises `ValueError` for an unknown name.
    """
    if callable(sigma):
        return sigma
    _checks.check_choice("sigma", sigma, SIGMAS)
    return SIGMAS[sigma]


# ----------------------------------------------------------------------------- feature maps phi(x)


def random_projection(key: Array, in_dim: int, width: int, dtype: Any = jnp.float32) -> Array:
    """A fixed (untrained) random projection matrix `P` of shape `(in_dim, width)`, entries `N(0, 1/in_dim)`.

    The features are `phi(x) = x @ P`; any width works, including widths below the number of classes or samples.

    Args:
      key: a PRNG key.
      in_dim: the input dimension.
      width: the number of features `m`.
      dtype: the floating dtype of `P`.

    Returns:
      `P`, `(in_dim, width)`.
    """
    _checks.check_positive("in_dim", in_dim, integer=True)
    _checks.check_positive("width", width, integer=True)
    return jax.random.normal(key, (in_dim, width), dtype) / jnp.sqrt(jnp.asarray(in_dim, dtype))


def features(x: Array, projection: Array | None = None) -> Array:
    """`phi(x)`: the identity when `projection` is None, else `x @ projection`.

    Args:
      x: the inputs, `(..., in_dim)`.
      projection: `None` or a matrix `(in_dim, m)` (e.g. `random_projection`).

    Returns:
      The features, `(..., m)`.
    """
    if projection is None:
        return x
    _checks.check_shape("projection", projection, (x.shape[-1], None), "its first axis must match x's last axis")
    return x @ projection


# ----------------------------------------------------------------------------- equilibrium maps


def _check_gamma(gamma: Any) -> None:
    _checks.check_open_unit("gamma", gamma)


@dataclasses.dataclass(frozen=True)
class DELMMap:
    """The DELM layer `f(z, params, x) = gamma * z @ sigma(A).T + x` (x is `phi(x)`), per sample or batched.

    `params` is a mapping with key `"A"` of shape `(m, m)`; `z` and `x` have shape `(m,)` or `(n, m)`.
    Hashable, so it can be a static argument of `jit`.

    Attributes:
      gamma: the weight of the linear term, in `(0, 1)`.
      sigma: the weight nonlinearity, a name from `SIGMAS` or a callable `(m, m) -> (m, m)`.
    """

    gamma: float = 0.8
    sigma: str | Sigma = "column_softmax"

    def __post_init__(self) -> None:
        _check_gamma(self.gamma)
        get_sigma(self.sigma)

    def __call__(self, z: Array, params: Any, x: Array) -> Array:
        """Apply the map.

        Args:
          z: the state, `(m,)` or `(n, m)`.
          params: `{"A": (m, m)}`.
          x: the features `phi(x)`, shaped like `z`.

        Returns:
          `f(z, params, x)`, shaped like `z`.
        """
        return self.gamma * z @ get_sigma(self.sigma)(params["A"]).T + x

    def affine(self, params: Any, x: Array) -> tuple[Array, Array]:
        """The map as `f(z) = z @ M.T + c`, for the `direct` solver.

        Args:
          params: `{"A": (m, m)}`.
          x: the features `phi(x)`, `(m,)` or `(n, m)`.

        Returns:
          `(M, c) = (gamma sigma(A), x)`.
        """
        return self.gamma * get_sigma(self.sigma)(params["A"]), x


@dataclasses.dataclass(frozen=True)
class DELMTransposedMap:
    """The end-to-end equilibrium `f(W, params, B) = B + gamma * W @ sigma(A)`, with fixed point `W = B U^{-1}`.

    `W` and `B` have shape `(m_y, m)`: `m_y` right-hand sides instead of one per sample (docs/theory.md, section 8).

    Attributes:
      gamma: the weight of the linear term, in `(0, 1)`.
      sigma: the weight nonlinearity, a name from `SIGMAS` or a callable `(m, m) -> (m, m)`.
    """

    gamma: float = 0.8
    sigma: str | Sigma = "column_softmax"

    def __post_init__(self) -> None:
        _check_gamma(self.gamma)
        get_sigma(self.sigma)

    def __call__(self, W: Array, params: Any, B: Array) -> Array:
        """Apply the map.

        Args:
          W: the state, `(m_y, m)`.
          params: `{"A": (m, m)}`.
          B: the output matrix, `(m_y, m)`.

        Returns:
          `f(W, params, B)`, shaped like `W`.
        """
        return B + self.gamma * W @ get_sigma(self.sigma)(params["A"])

    def affine(self, params: Any, B: Array) -> tuple[Array, Array]:
        """The map as `f(W) = W @ M.T + c`, for the `direct` solver.

        Args:
          params: `{"A": (m, m)}`.
          B: the output matrix, `(m_y, m)`.

        Returns:
          `(M, c) = (gamma sigma(A).T, B)`.
        """
        return self.gamma * get_sigma(self.sigma)(params["A"]).T, B


NORMS = ("frobenius", "spectral")


@dataclasses.dataclass(frozen=True)
class TanhMap:
    """A nonlinear DEQ layer `f(z, params, x) = tanh(z @ W_c.T + x @ U.T + b)` with a contractive `W_c`.

    `W_c = W * min(1, c / N(W))` with `c = contraction` and `N` the norm chosen by `norm`. Since tanh is
    1-Lipschitz, `|f(z) - f(z')| <= |W_c|_2 |z - z'|`: the map contracts in z with factor `|W_c|_2`, which
    `contraction` bounds (exactly for "frobenius", up to the power iteration's estimate for "spectral").
    `params = {"W": (m, m), "U": (m, d), "b": (m,)}`; `z` is `(m,)` or `(n, m)`, `x` is `(d,)` or `(n, d)`.

    - `norm="frobenius"` (default): `N(W) = |W|_F >= |W|_2`, so `|W_c|_2 <= c` for any parameters (a guaranteed
      contraction). The price is depth: at `init` (entries `N(0, 1/m)`), `|W|_F ~ sqrt(m)` while `|W|_2 ~ 2`, so
      `|W_c|_2 ~ 2 c / sqrt(m)`: about 0.16 for m = 128, c = 0.9. The layer is then nearly shallow: Anderson meets
      a relative tolerance of 1e-5 in about 6 iterations, and training must grow `W_c`'s spectrum against the
      Frobenius cap to make the equilibrium matter.
    - `norm="spectral"`: `N(W)` is `|W|_2` estimated by `power_iterations` steps of power iteration on `W^T W` from
      a fixed start (the singular vectors are held constant in the derivative, as in spectral normalisation, so
      the gradient of `N` is `u v^T`). At `init`, `|W_c|_2 ~ c`: a genuinely deep layer (Anderson needs several
      times more iterations; the README gives measured counts). Power iteration approaches `|W|_2` from below, so
      `|W_c|_2` can exceed `c` slightly; with `c <= 0.95` and the default 20 steps it stays below 1 in practice,
      and every solve reports the convergence it reached either way (`Solution.stats`).

    Attributes:
      contraction: the bound `c` in `(0, 1)` on `N(W_c)`, hence on the map's contraction factor.
      norm: "frobenius" (a guaranteed bound, a shallow layer at init) or "spectral" (a deep layer, an estimate).
      power_iterations: the power iteration's steps for `norm="spectral"`.
    """

    contraction: float = 0.9
    norm: str = "frobenius"
    power_iterations: int = 20

    def __post_init__(self) -> None:
        _checks.check_open_unit("contraction", self.contraction)
        _checks.check_choice("norm", self.norm, NORMS)
        _checks.check_positive("power_iterations", self.power_iterations, integer=True)

    def weight_norm(self, W: Array) -> Array:
        """`N(W)`: `|W|_F` ("frobenius"), or the power-iteration estimate of `|W|_2` ("spectral").

        Args:
          W: the raw weight, `(m, m)`.

        Returns:
          A scalar.
        """
        if self.norm == "frobenius":
            return jnp.sqrt(jnp.sum(W * W))
        fixed = jax.lax.stop_gradient(W)
        # a fixed start, drawn in float32 whatever W's dtype: the same start (and estimate) in every precision
        v = jax.random.normal(jax.random.PRNGKey(0), (W.shape[1],), jnp.float32).astype(W.dtype)

        def power_step(_: Any, v: Array) -> Array:
            w = fixed.T @ (fixed @ v)
            return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(W.dtype).tiny)

        v = jax.lax.fori_loop(0, self.power_iterations, power_step, v / jnp.linalg.norm(v))
        u = fixed @ v
        u = jax.lax.stop_gradient(u / jnp.maximum(jnp.linalg.norm(u), jnp.finfo(W.dtype).tiny))
        return u @ W @ v  # = sigma_max at convergence; its derivative in W is u v^T

    def weight(self, W: Array) -> Array:
        """The contractive weight `W_c = W * min(1, c / N(W))`.

        Args:
          W: the raw weight, `(m, m)`.

        Returns:
          `W_c`, `(m, m)`, with `N(W_c) <= c`.
        """
        norm = self.weight_norm(W)
        return W * jnp.minimum(1.0, self.contraction / jnp.maximum(norm, jnp.finfo(W.dtype).tiny))

    def __call__(self, z: Array, params: Any, x: Array) -> Array:
        """Apply the map.

        Args:
          z: the state, `(m,)` or `(n, m)`.
          params: `{"W": (m, m), "U": (m, d), "b": (m,)}`.
          x: the input, `(d,)` or `(n, d)`.

        Returns:
          `f(z, params, x)`, shaped like `z`.
        """
        return jnp.tanh(z @ self.weight(params["W"]).T + x @ params["U"].T + params["b"])

    def init(self, key: Array, width: int, in_dim: int, dtype: Any = jnp.float32) -> dict:
        """Random parameters: `W`, `U` with entries `N(0, 1/fan_in)`, `b` with entries `N(0, 0.01)`.

        Args:
          key: a PRNG key.
          width: the state's width `m`.
          in_dim: the input's width `d`.
          dtype: the floating dtype of the parameters.

        Returns:
          `{"W": (m, m), "U": (m, d), "b": (m,)}`.
        """
        _checks.check_positive("width", width, integer=True)
        _checks.check_positive("in_dim", in_dim, integer=True)
        kw, ku, kb = jax.random.split(key, 3)
        return {
            "W": jax.random.normal(kw, (width, width), dtype) / jnp.sqrt(width),
            "U": jax.random.normal(ku, (width, in_dim), dtype) / jnp.sqrt(in_dim),
            "b": 0.1 * jax.random.normal(kb, (width,), dtype),
        }
