"""The DELM's dynamics in W-space as the main job measures them (docs/theory.md sections 4, 5 and 9).

Gradient descent on the DELM's parameters `theta = (A, B)` moves the end-to-end matrix `W(theta) = B U^{-1}` by
`W(theta - eta g) - W(theta) = -eta DW[g] + O(eta^2)`, and for the true gradient `g = DW^*[G]` (`G = dL/dW`)
the first-order term is `-eta P(G)` with the induced preconditioner `P = DW DW^*`. Measured here:

- `update_checks`: for the update `d = theta_{t+1} - theta_t` that training actually applied, the directional
  derivative `DW[d]` (forward mode through the closed form, and a central finite difference) against
  `-eta P_t(G_t)`. Equal up to rounding iff the applied update is `-eta` times the true gradient, up to the null
  space of `DW`: a wrong gradient (one-step, perturbed, wrong sigma) shows here at once.
- `curvature_operator` and `stiffness`: `lambda_max(P H)` for the shallow loss's curvature H, which decides the
  step size (`LearningRateConfig`) and the stability of the linearised W-dynamics (`eta lambda_max(P H) < 2`).

The library pieces used: `deq_jax.theory.end_to_end` (closed form), `induced_preconditioner`,
`preconditioner_matrix`. When the theory module provides its own step-size rule and W-path predictor, these
functions are where the main job switches to them.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.scipy.linalg
import jax.numpy as jnp
import numpy as np

from deq_jax import theory
from deq_jax.losses import get_loss
from deq_jax.maps import get_sigma

#: above this many entries of W (m_y m), lambda_max(P H) is estimated by power iteration instead of a dense eigensolve
DENSE_LIMIT = 512
POWER_ITERATIONS = 100


def _norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(leaf * leaf) for leaf in jax.tree_util.tree_leaves(tree)))


def closed_form(model: Any, params: dict) -> jax.Array:
    """`W = B (I - gamma sigma(A))^{-1}` through the library's closed form (independent of the model's solver)."""
    return theory.end_to_end(params["A"], params["B"], model.gamma, model.sigma)


def shallow_gradient(loss: Any, W: jax.Array, phi: jax.Array, y: jax.Array) -> jax.Array:
    """`G = dL/dW` of the shallow model's loss `L(W) = loss(phi W^T, y)` (any loss of predictions)."""
    loss_fn = get_loss(loss)
    return jax.grad(lambda w: loss_fn(phi @ w.T, y))(W)


def update_checks(model: Any, loss: Any, params: dict, new_params: dict, phi: jax.Array, y: jax.Array,
                  learning_rate: jax.Array, fd_step: Optional[float] = None) -> dict:
    """Compare the W-velocity of the applied update with `-eta P_t(G_t)` (traceable; one step of a scan).

    Returns `predicted_step`, the change of W that one exact GD step makes to second order in eta,
    `-eta P(G) + (eta^2 / 2) D^2W[g, g]` with `g = DW^*[G]` the true gradient (so that a path integrated from these
    steps follows the exact one to O(eta^3) per step), `velocity_error` (`|DW[d] + eta P(G)| / |eta P(G)|`, forward
    mode) and `fd_velocity_error` (the same with `DW[d] ~ (W(theta + h d) - W(theta - h d)) / 2h`,
    `h = fd_step |theta| / |d|`; only with `fd_step`)."""
    W_of = lambda p: closed_form(model, p)  # noqa: E731
    W, vjp = jax.vjp(W_of, params)
    G = shallow_gradient(loss, W, phi, y)
    predicted = -learning_rate * theory.induced_preconditioner(params, G, model.gamma, model.sigma)
    (g,) = vjp(G)  # the true gradient DW^*[G]
    curvature = jax.jvp(lambda p: jax.jvp(W_of, (p,), (g,))[1], (params,), (g,))[1]  # D^2W[g, g]
    d = jax.tree_util.tree_map(jnp.subtract, new_params, params)
    velocity = jax.jvp(lambda p: closed_form(model, p), (params,), (d,))[1]
    scale = jnp.maximum(jnp.linalg.norm(predicted), jnp.finfo(W.dtype).tiny)
    out = {"predicted_step": predicted + 0.5 * learning_rate ** 2 * curvature,
           "velocity_error": jnp.linalg.norm(velocity - predicted) / scale}
    if fd_step is not None:
        h = fd_step * _norm(params) / jnp.maximum(_norm(d), jnp.finfo(W.dtype).tiny)
        plus = jax.tree_util.tree_map(lambda p, e: p + h * e, params, d)
        minus = jax.tree_util.tree_map(lambda p, e: p - h * e, params, d)
        fd = (closed_form(model, plus) - closed_form(model, minus)) / (2 * h)
        out["fd_velocity_error"] = jnp.linalg.norm(fd - predicted) / scale
    return out


class Curvature(NamedTuple):
    """The shallow loss's curvature (or its upper bound) as an operator on W: `H(V) = scale V C + shift V`."""

    C: np.ndarray  # phi^T phi / n over the real samples, (m, m)
    scale: float
    shift: float
    description: str


def curvature_operator(loss_name: str, C: np.ndarray, l2: float = 0.0) -> Curvature:
    """Square loss: `H(V) = V C`, its Hessian. Cross-entropy + `(l2/2)|W|^2`: the bound `V C / 2 + l2 V` (every
    softmax Jacobian `diag(p) - p p^T` has eigenvalues <= 1/2), so `lambda_max(P H_CE) <= lambda_max(P H)`."""
    if loss_name == "square":
        return Curvature(np.asarray(C), 1.0, 0.0, "H = I (x) C")
    return Curvature(np.asarray(C), 0.5, float(l2), "H <= I (x) C/2 + l2 I")


class Stiffness(NamedTuple):
    value: float  # lambda_max(P H)
    exact: bool  # dense eigensolve (True) or power iteration (False: an estimate from below)


def stiffness(model: Any, params: dict, curvature: Curvature) -> Stiffness:
    """`lambda_max(P H)` at `params` (P H is similar to the symmetric `P^{1/2} H P^{1/2}`, eigenvalues >= 0)."""
    m_y, m = params["B"].shape
    C = jnp.asarray(curvature.C, params["B"].dtype)
    if m_y * m <= DENSE_LIMIT:
        P = np.asarray(theory.preconditioner_matrix(params, model.gamma, model.sigma), np.float64)
        P = 0.5 * (P + P.T)
        H = curvature.scale * np.kron(np.eye(m_y), np.asarray(curvature.C, np.float64)) \
            + curvature.shift * np.eye(m_y * m)
        L = np.linalg.cholesky(P)
        return Stiffness(float(np.linalg.eigvalsh(L.T @ H @ L)[-1]), True)
    value = _power_iteration(params, C, curvature.scale, curvature.shift, model.gamma, model.sigma)
    return Stiffness(float(value), False)


def preconditioner_operator(params: dict, gamma: float, sigma: Any):
    """`V -> P(V)` with U's LU factors computed once (`theory.induced_preconditioner` refactorises U at every call,
    four m x m factorisations: fine for one application, not for a power iteration at m ~ 800). Traceable."""
    sig = get_sigma(sigma)
    A, B = params["A"], params["B"]
    U = jnp.eye(A.shape[0], dtype=A.dtype) - gamma * sig(A)
    lu = jax.scipy.linalg.lu_factor(U)
    solve_U = lambda R: jax.scipy.linalg.lu_solve(lu, R.T).T  # R U^{-T}: solves U X^T = R^T  # noqa: E731
    solve_Ut = lambda R: jax.scipy.linalg.lu_solve(lu, R.T, trans=1).T  # R U^{-1}: U^T X^T = R^T  # noqa: E731
    W = solve_Ut(B)
    _, sigma_vjp = jax.vjp(sig, A)

    def apply(G):
        GUt = solve_U(G)  # G U^{-T}
        first = solve_Ut(GUt)  # G U^{-T} U^{-1} = G (U U^T)^{-1}
        (S,) = sigma_vjp(gamma * W.T @ GUt)  # K^*(G) = dL/dA
        dsigma = jax.jvp(sig, (A,), (S,))[1]
        return first + gamma * solve_Ut(W @ dsigma)  # + K(K^*(G))

    return apply


@functools.partial(jax.jit, static_argnames=("gamma", "sigma"))
def _power_iteration(params, C, scale, shift, gamma, sigma):
    P = preconditioner_operator(params, gamma, sigma)
    V0 = jax.random.normal(jax.random.PRNGKey(0), params["B"].shape, params["B"].dtype)

    def body(_, carry):
        V, _ = carry
        PV = P(scale * V @ C + shift * V)
        return PV / jnp.linalg.norm(PV), jnp.linalg.norm(PV)

    _, value = jax.lax.fori_loop(0, POWER_ITERATIONS, body, (V0 / jnp.linalg.norm(V0), jnp.zeros((), C.dtype)))
    return value


def learning_rate(rule: Any, model: Any, params0: dict, curvature: Curvature) -> tuple[float, Stiffness]:
    """`eta` from a `LearningRateConfig` and the DELM's initial parameters: `scale / lambda_max(P_0 H)` or fixed."""
    stiff = stiffness(model, params0, curvature)
    if rule.rule == "fixed":
        return float(rule.value), stiff
    return float(rule.scale / stiff.value), stiff


def integrated_path(W0: np.ndarray, predicted_steps: np.ndarray) -> np.ndarray:
    """The W-path integrated from the predicted steps (`update_checks`' `predicted_step`, the trust-region dynamics
    `-eta P_t(G_t)` to second order in eta) from `W_0`: `W0 + cumsum` (index t = before step t)."""
    steps = np.asarray(predicted_steps)
    return np.concatenate([np.asarray(W0)[None], np.asarray(W0)[None] + np.cumsum(steps, axis=0)])


__all__ = ["Curvature", "Stiffness", "closed_form", "curvature_operator", "integrated_path", "learning_rate",
           "preconditioner_operator", "shallow_gradient", "stiffness", "update_checks"]
