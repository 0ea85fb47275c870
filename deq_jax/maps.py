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
from typing import Any, Callable, Union

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


def get_sigma(sigma: Union[str, Sigma]) -> Sigma:
    """Resolve a weight nonlinearity by name (see `SIGMAS`) or pass a callable through."""
    if callable(sigma):
        return sigma
    _checks.check_choice("sigma", sigma, SIGMAS)
    return SIGMAS[sigma]


# ----------------------------------------------------------------------------- feature maps phi(x)

def random_projection(key: Array, in_dim: int, width: int, dtype: Any = jnp.float32) -> Array:
    """A fixed (untrained) random projection matrix `P` of shape `(in_dim, width)`, entries `N(0, 1/in_dim)`.

    The features are `phi(x) = x @ P`; any width works, including widths below the number of classes or samples.
    """
    _checks.check_positive("in_dim", in_dim, integer=True)
    _checks.check_positive("width", width, integer=True)
    return jax.random.normal(key, (in_dim, width), dtype) / jnp.sqrt(jnp.asarray(in_dim, dtype))


def features(x: Array, projection: Array | None = None) -> Array:
    """`phi(x)`: the identity when `projection` is None, else `x @ projection`."""
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
    """

    gamma: float = 0.8
    sigma: Union[str, Sigma] = "column_softmax"

    def __post_init__(self):
        _check_gamma(self.gamma)
        get_sigma(self.sigma)

    def __call__(self, z: Array, params: Any, x: Array) -> Array:
        return self.gamma * z @ get_sigma(self.sigma)(params["A"]).T + x

    def affine(self, params: Any, x: Array) -> tuple[Array, Array]:
        return self.gamma * get_sigma(self.sigma)(params["A"]), x


@dataclasses.dataclass(frozen=True)
class DELMTransposedMap:
    """The end-to-end equilibrium `f(W, params, B) = B + gamma * W @ sigma(A)`, with fixed point `W = B U^{-1}`.

    `W` and `B` have shape `(m_y, m)`: `m_y` right-hand sides instead of one per sample (docs/theory.md, section 8).
    """

    gamma: float = 0.8
    sigma: Union[str, Sigma] = "column_softmax"

    def __post_init__(self):
        _check_gamma(self.gamma)
        get_sigma(self.sigma)

    def __call__(self, W: Array, params: Any, B: Array) -> Array:
        return B + self.gamma * W @ get_sigma(self.sigma)(params["A"])

    def affine(self, params: Any, B: Array) -> tuple[Array, Array]:
        return self.gamma * get_sigma(self.sigma)(params["A"]).T, B


@dataclasses.dataclass(frozen=True)
class TanhMap:
    """A nonlinear DEQ layer `f(z, params, x) = tanh(z @ W_c.T + x @ U.T + b)` with a contractive `W_c`.

    `W_c = W * min(1, c / |W|_F)`: since `|W_c|_2 <= |W_c|_F <= c < 1` and tanh is 1-Lipschitz, the map is a
    `c`-contraction in z for any parameters, so every solver has a unique fixed point to find.
    `params = {"W": (m, m), "U": (m, d), "b": (m,)}`; `z` is `(m,)` or `(n, m)`, `x` is `(d,)` or `(n, d)`.
    """

    contraction: float = 0.9

    def __post_init__(self):
        _checks.check_open_unit("contraction", self.contraction)

    def weight(self, W: Array) -> Array:
        norm = jnp.sqrt(jnp.sum(W * W))
        return W * jnp.minimum(1.0, self.contraction / jnp.maximum(norm, jnp.finfo(W.dtype).tiny))

    def __call__(self, z: Array, params: Any, x: Array) -> Array:
        return jnp.tanh(z @ self.weight(params["W"]).T + x @ params["U"].T + params["b"])

    def init(self, key: Array, width: int, in_dim: int, dtype: Any = jnp.float32) -> dict:
        _checks.check_positive("width", width, integer=True)
        _checks.check_positive("in_dim", in_dim, integer=True)
        kw, ku, kb = jax.random.split(key, 3)
        return {
            "W": jax.random.normal(kw, (width, width), dtype) / jnp.sqrt(width),
            "U": jax.random.normal(ku, (width, in_dim), dtype) / jnp.sqrt(in_dim),
            "b": 0.1 * jax.random.normal(kb, (width,), dtype),
        }
