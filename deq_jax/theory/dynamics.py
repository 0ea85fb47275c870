"""The dynamics that the DELM's gradient descent induces on `W = B U^{-1}` (docs/theory.md sections 5 and 11).

Gradient flow on `(A, B)` moves `W` by `dW/dt = -P(G)`, `P(G) = G (U U^T)^{-1} + K(K^*(G))` (`induced_preconditioner`),
where `G = dL/dW` and `K(S) = gamma W Dsigma_A[S] U^{-1}` is the change of `W` along a change `S` of `A`. The exact
parameter gradient is a function of `G` alone: `dL/dB = G U^{-T}`, `dL/dA = K^*(G)` (`parameter_gradient`).

A GD step of size `eta` moves `W` along the curve `w(s) = W(A - s dL/dA, B - s dL/dB)` to `w(eta)`:
`W_{t+1} = W_t - eta P_t(G_t) + (eta^2 / 2) w''(0) + O(eta^3)`. `predict_w_step` gives this prediction to first or
second order; `w_step_check` compares a trained step with it and with the exact step `w(eta)`, relative to the
step's size, reporting the `O(eta^2)` remainder exactly: a training step whose gradient is not the exact one (a
one-step/Jacobian-free backward, a perturbed gradient, a wrong sigma in the backward) misses by the relative size of
its gradient error, orders of magnitude above the rounding floor an exact gradient leaves.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from deq_jax import _checks
from deq_jax.maps import Sigma, get_sigma
from deq_jax.theory._common import Array, Params, check_params, program
from deq_jax.theory.closed_form import _u, _w


def delm_w_velocity(
    params: Params, grads: Params, gamma: float | Array, sigma: str | Sigma = "column_softmax"
) -> Array:
    """`dW/dt = d/dt W(A - t dL/dA, B - t dL/dB) at t = 0`: the velocity of `W = B U^{-1}` along the DELM's
    gradient flow, by `jax.jvp` through the closed form (`end_to_end`).

    Args:
      params: `{"A": (m, m), "B": (m_y, m)}`, the DELM's parameters.
      grads: `{"A": dL/dA, "B": dL/dB}`, shaped like `params`.
      gamma: the DELM's `gamma`, in `(0, 1)`.
      sigma: the weight nonlinearity, a name from `deq_jax.maps.SIGMAS` or a callable.

    Returns:
      `dW/dt`, `(m_y, m)`.
    """
    A, B = check_params(params)
    gA, gB = check_params(grads, "grads")
    _checks.check_shape("grads['A']", gA, A.shape)
    _checks.check_shape("grads['B']", gB, B.shape)
    _checks.check_open_unit("gamma", gamma)
    return _velocity(A, B, gA, gB, gamma, get_sigma(sigma))


@program(static_argnames=("sigma",))
def _velocity(A: Array, B: Array, gA: Array, gB: Array, gamma: Any, sigma: Sigma) -> Array:
    return jax.jvp(lambda a, b: _w(a, b, gamma, sigma), (A, B), (-gA, -gB))[1]


def _check_G(params: Params, G: Any, gamma: Any) -> tuple[Array, Array]:
    A, B = check_params(params)
    _checks.check_float_array("G", G)
    _checks.check_shape("G", G, B.shape, "G = dL/dW has the shape of B, (m_y, m)")
    _checks.check_open_unit("gamma", gamma)
    return A, B


def induced_preconditioner(
    params: Params, G: Array, gamma: float | Array, sigma: str | Sigma = "column_softmax"
) -> Array:
    """`P(G) = G (U U^T)^{-1} + K(K^*(G))`, so that the DELM's gradient flow moves `W` by `dW/dt = -P(G)`.

    `K(S) = gamma W Dsigma_A[S] U^{-1}` (`W = B U^{-1}`) is the change of W along a change S of A (a `jvp` of
    sigma) and `K^*(G) = Dsigma_A^*[gamma W^T G U^{-T}] = dL/dA` its adjoint (a `vjp` of sigma). The first term is
    `dL/dB U^{-1}` with `dL/dB = G U^{-T}`: `(U U^T)^{-1} = U^{-T} U^{-1}`, not `(U^T U)^{-1}` (docs/theory.md 5).

    Args:
      params: `{"A": (m, m), "B": (m_y, m)}`, the DELM's parameters.
      G: `dL/dW` at `W = end_to_end(A, B)`, `(m_y, m)`.
      gamma: the DELM's `gamma`, in `(0, 1)`.
      sigma: the weight nonlinearity, a name from `deq_jax.maps.SIGMAS` or a callable.

    Returns:
      `P(G)`, `(m_y, m)`.
    """
    A, B = _check_G(params, G, gamma)
    return _precondition(A, B, G, gamma, get_sigma(sigma))


def parameter_gradient(params: Params, G: Array, gamma: float | Array, sigma: str | Sigma = "column_softmax") -> Params:
    """The exact `{"A": dL/dA, "B": dL/dB}` from `G = dL/dW` by the chain rule (docs/theory.md sections 3 and 8):
    `dL/dB = G U^{-T}`, `dL/dA = Dsigma_A^*[gamma W^T G U^{-T}] = K^*(G)`. Closed form, independent of any solver.

    Args:
      params: `{"A": (m, m), "B": (m_y, m)}`, the DELM's parameters.
      G: `dL/dW` at `W = end_to_end(A, B)`, `(m_y, m)`.
      gamma: the DELM's `gamma`, in `(0, 1)`.
      sigma: the weight nonlinearity, a name from `deq_jax.maps.SIGMAS` or a callable.

    Returns:
      `{"A": dL/dA, "B": dL/dB}`, shaped like `params`.
    """
    A, B = _check_G(params, G, gamma)
    gA, gB = _parameter_gradient(A, B, G, gamma, get_sigma(sigma))
    return {"A": gA, "B": gB}


class _Factored:
    """`U = I - gamma sigma(A)` with one LU factorisation, and the products with `U^{-1}` the dynamics need."""

    def __init__(self, A: Array, gamma: Any, sig: Sigma):
        self.lu = jax.scipy.linalg.lu_factor(_u(A, gamma, sig))

    def right(self, X: Array) -> Array:  # X U^{-1}: U^T Y^T = X^T
        return jax.scipy.linalg.lu_solve(self.lu, X.T, trans=1).T

    def right_t(self, X: Array) -> Array:  # X U^{-T}: U Y^T = X^T
        return jax.scipy.linalg.lu_solve(self.lu, X.T, trans=0).T


def _gradient_parts(A, B, G, gamma, sig):
    """`(U, W, dL/dA, dL/dB)` from G by the chain rule, with one LU of U."""
    U = _Factored(A, gamma, sig)
    W = U.right(B)
    GUt = U.right_t(G)  # dL/dB = G U^{-T}
    (gA,) = jax.vjp(sig, A)[1](gamma * W.T @ GUt)  # dL/dA = Dsigma^*[gamma W^T G U^{-T}]
    return U, W, gA, GUt


@program(static_argnames=("sig",))
def _parameter_gradient(A: Array, B: Array, G: Array, gamma: Any, sig: Sigma) -> tuple[Array, Array]:
    return _gradient_parts(A, B, G, gamma, sig)[2:]


def _precondition_parts(A, B, G, gamma, sig):
    U, W, gA, GUt = _gradient_parts(A, B, G, gamma, sig)
    dsigma = jax.jvp(sig, (A,), (gA,))[1]
    # P(G) = G U^{-T} U^{-1} + K(K^*(G)), K(S) = gamma W Dsigma[S] U^{-1}: one solve for both terms
    return U.right(GUt + gamma * W @ dsigma), (U, W, gA, GUt, dsigma)


@program(static_argnames=("sig",))
def _precondition(A: Array, B: Array, G: Array, gamma: Any, sig: Sigma) -> Array:
    return _precondition_parts(A, B, G, gamma, sig)[0]


def preconditioner_matrix(params: Params, gamma: float | Array, sigma: str | Sigma = "column_softmax") -> Array:
    """`P` as a dense `(m_y m) x (m_y m)` matrix acting on row-major `vec(G) = G.ravel()` (small problems only).

    Column k is `vec(P(E_k))` for the k-th basis matrix; `P = J J^*` (J the Jacobian of `(A, B) -> W`) is
    symmetric positive definite.
    """
    A, B = check_params(params)
    _checks.check_open_unit("gamma", gamma)
    return _preconditioner_matrix(A, B, gamma, get_sigma(sigma))


@program(static_argnames=("sigma",))
def _preconditioner_matrix(A: Array, B: Array, gamma: Any, sigma: Sigma) -> Array:
    d = B.size
    basis = jnp.eye(d, dtype=B.dtype).reshape(d, *B.shape)
    cols = jax.vmap(lambda E: _precondition(A, B, E, gamma, sigma).ravel())(basis)
    return cols.T


# ----------------------------------------------------------------------------- the per-step prediction


def _curve_derivatives(A, B, G, gamma, sig):
    """`w(0) = W`, `w'(0) = -P(G)`, `w''(0)` of the GD curve `w(s) = W(A - s g_A, B - s g_B)` (g the exact gradient),
    and `w` itself. With `w U(s) = B(s)`: `B' = -g_B`, `B'' = 0`, `U' = gamma Dsigma[g_A]`,
    `U'' = -gamma D^2sigma[g_A, g_A]`, so `w'' = (-2 w' U' - w U'') U^{-1}` (one LU of U, no autodiff through it)."""
    PG, (U, W, gA, GUt, dsigma) = _precondition_parts(A, B, G, gamma, sig)
    v1 = -PG
    d2sigma = jax.jvp(lambda a: jax.jvp(sig, (a,), (gA,))[1], (A,), (gA,))[1]
    v2 = U.right(-2.0 * gamma * v1 @ dsigma + gamma * W @ d2sigma)

    def w(s):
        return _w(A - s * gA, B - s * GUt, gamma, sig)

    return W, v1, v2, w


def predict_w_step(
    params: Params,
    G: Array,
    learning_rate: float | Array,
    gamma: float | Array,
    sigma: str | Sigma = "column_softmax",
    order: int = 2,
) -> Array:
    """The `W` one exact GD step of size `eta` leads to, from the induced dynamics: `W - eta P(G)` (`order=1`) or
    `W - eta P(G) + (eta^2 / 2) w''(0)` (`order=2`, error `O(eta^3)`), `w(s) = W(A - s dL/dA, B - s dL/dB)` with the
    exact gradient of `parameter_gradient`. (docs/theory.md section 11.)

    Args:
      params: `{"A": (m, m), "B": (m_y, m)}`, the DELM's parameters.
      G: `dL/dW` at `W = end_to_end(A, B)`, `(m_y, m)`.
      learning_rate: the step size `eta`.
      gamma: the DELM's `gamma`, in `(0, 1)`.
      sigma: the weight nonlinearity, a name from `deq_jax.maps.SIGMAS` or a callable.
      order: 1 or 2, the order of the prediction in `eta`.

    Returns:
      The predicted `W` after the step, `(m_y, m)`.
    """
    A, B = _check_G(params, G, gamma)
    _checks.check_positive("learning_rate", learning_rate)
    if order not in (1, 2):
        raise ValueError(f"unknown order {order!r}; valid choices are 1, 2")
    return _predict(A, B, G, learning_rate, gamma, get_sigma(sigma), float(order == 2))


@program(static_argnames=("sig",))
def _predict(A, B, G, eta, gamma, sig, second):
    W, v1, v2, _ = _curve_derivatives(A, B, G, gamma, sig)
    eta = jnp.asarray(eta, W.dtype)
    return W + eta * v1 + second * 0.5 * eta * eta * v2


def w_step_check(
    params: Params,
    W_next: Array,
    G: Array,
    learning_rate: float | Array,
    gamma: float | Array,
    sigma: str | Sigma = "column_softmax",
    *,
    rtol: float = 1e-6,
) -> dict:
    """Compare a trained step `W_t -> W_next` with the induced dynamics (docs/theory.md section 11).

    `params` are the DELM's parameters before the step (`W_t = end_to_end(params)`), `W_next` the trained end-to-end
    matrix after it (e.g. the run's `model.end_to_end(params_{t+1})`), `G = dL/dW` at `W_t` (`square_loss_gradient`
    or `cross_entropy_gradient`) and `learning_rate` the plain-SGD step. Batched: with `params["A"]` of shape
    `(T, m, m)` (and `B`, `W_next`, `G` with the same leading `T`), every quantity has shape `(T,)`.

    With `g` the exact gradient (`parameter_gradient`) and `W_gd = W(A - eta g_A, B - eta g_B)` the exact GD step,
    every quantity is relative to the predicted first-order step `|eta P(G)|_F`:
    - `first_order_error`: `|W_next - (W_t - eta P(G))|`, the miss of the induced dynamics to first order; for an
      exact gradient it equals `remainder`;
    - `remainder`: `|W_gd - (W_t - eta P(G))|`, the exact `O(eta^2)` remainder of the first-order form, and
      `second_order_term`: `|eta^2/2 w''(0)|`, its leading term (`w(s)` the GD curve);
    - `step_error`: `|W_next - W_gd|`, the trained step against the exact one (all orders): rounding for an exact
      gradient, about `delta` for a gradient with relative error `delta` (a one-step backward: O(1));
    - `rounding`: `eps cond_2(U) (|W_t| + |W_next|)`, the floor set by the solves for `W`;
    - `tolerance`: `max(rtol, 10 rounding)` and `consistent`: `step_error <= tolerance` (`rtol`: the gradient
      accuracy the training path promises, e.g. its solver tolerance);
    - `step`: `|W_next - W_t|_F`, `predicted_step`: `|eta P(G)|_F`.

    `gamma` and `sigma` are the DELM's (a name from `deq_jax.maps.SIGMAS` or a callable). Returns the dict of the
    quantities above, arrays (shape `()`, or `(T,)` when batched).
    """
    A, B = _check_batched(params)
    _checks.check_float_array("W_next", W_next)
    _checks.check_float_array("G", G)
    _checks.check_shape("W_next", W_next, B.shape, "the trained end-to-end matrix after the step, shaped like B")
    _checks.check_shape("G", G, B.shape, "G = dL/dW at W_t, shaped like B")
    _checks.check_positive("learning_rate", learning_rate)
    _checks.check_open_unit("gamma", gamma)
    _checks.check_positive("rtol", rtol)
    sig = get_sigma(sigma)

    def check(a, b, w, g):
        return _step_check(a, b, w, g, learning_rate, gamma, rtol, sig)

    return check(A, B, W_next, G) if A.ndim == 2 else jax.vmap(check)(A, B, W_next, G)


def _check_batched(params: Any) -> tuple[Array, Array]:
    if not isinstance(params, dict) or not {"A", "B"} <= set(params):
        raise ValueError("params must be a dict with keys 'A' and 'B' (the DELM's parameters)")
    if jnp.ndim(params["A"]) == 2:
        return check_params(params)
    A, B = params["A"], params["B"]
    _checks.check_float_array("A", A)
    _checks.check_float_array("B", B)
    _checks.check_ndim("A", A, (2, 3))
    if A.ndim != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"A must be (m, m) or a batch (T, m, m); got shape {tuple(A.shape)}")
    _checks.check_shape("B", B, (A.shape[0], None, A.shape[1]), "B is (T, m_y, m) for a batch of A (T, m, m)")
    return A, B


@program(static_argnames=("sig",))
def _step_check(A: Array, B: Array, W_next: Array, G: Array, eta: Any, gamma: Any, rtol: Any, sig: Sigma) -> dict:
    W, v1, v2, w = _curve_derivatives(A, B, G, gamma, sig)
    eta = jnp.asarray(eta, W.dtype)
    norm = jnp.linalg.norm
    first = W + eta * v1
    scale = norm(eta * v1)
    W_gd = w(eta)
    s = jnp.linalg.svd(_u(A, gamma, sig), compute_uv=False)
    rounding = jnp.finfo(W.dtype).eps * (s[0] / s[-1]) * (norm(W) + norm(W_next)) / scale
    step_error = norm(W_next - W_gd) / scale
    tolerance = jnp.maximum(rtol, 10.0 * rounding)
    return {
        "first_order_error": norm(W_next - first) / scale,
        "remainder": norm(W_gd - first) / scale,
        "second_order_term": norm(0.5 * eta * eta * v2) / scale,
        "step_error": step_error,
        "rounding": rounding,
        "tolerance": tolerance,
        "consistent": step_error <= tolerance,
        "step": norm(W_next - W),
        "predicted_step": scale,
    }
