"""The DELM's dynamics in W-space as the main job measures them (docs/theory.md sections 5, 11 and 12).

Gradient descent on the DELM's parameters `theta = (A, B)` moves the end-to-end matrix `W(theta) = B U^{-1}` by
`W(theta - eta g) - W(theta) = -eta DW[g] + O(eta^2)`, and for the true gradient `g = DW^*[G]` (`G = dL/dW`)
the first-order term is `-eta P(G)` with the induced preconditioner `P = DW DW^*`. Measured here, with
`deq_jax.theory` doing the mathematics:

- `update_checks`: for the update `d = theta_{t+1} - theta_t` that training actually applied, the directional
  derivative `DW[d]` (`theory.delm_w_velocity`, forward mode through the closed form, and a central finite
  difference) against `-eta P_t(G_t)` (`theory.induced_preconditioner`); the exact GD step's prediction to second
  order (`theory.predict_w_step`), from which the trust-region experiment integrates the W-path; and the trained
  step against the exact GD step to all orders (`theory.w_step_check`'s `step_error`). Each is rounding iff the
  applied update is `-eta` times the true gradient (up to the null space of `DW`): a wrong gradient (one-step,
  perturbed, wrong sigma) shows.
- `curvature_operator` and `stiffness`: `lambda_max(P H)` for the shallow loss's curvature H, which decides the
  step size (`LearningRateConfig`) and the stability of the linearised W-dynamics (`eta lambda_max(P H) < 2`);
  `certified_stiffness`: the library's upper bound on it from measured norms (`theory.learning_rate_limit`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax import theory
from deq_jax.train import GramData
from experiments.common import registry
from experiments.reproduce import compiling

#: above this many entries of W (m_y m), lambda_max(P H) is estimated by power iteration instead of a dense eigensolve
DENSE_LIMIT = 512
POWER_ITERATIONS = 100
#: `theory.w_step_check`'s tolerance argument: only its `step_error` is used here (the claims judge it)
STEP_CHECK_RTOL = 1e-6


def _norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(leaf * leaf) for leaf in jax.tree_util.tree_leaves(tree)))


def closed_form(model: Any, params: dict) -> jax.Array:
    """`W = B (I - gamma sigma(A))^{-1}` through the library's closed form (independent of the model's solver)."""
    return theory.end_to_end(params["A"], params["B"], model.gamma, model.sigma)


def shallow_gradient(loss: Any, W: jax.Array, phi: Any, y: jax.Array | None, l2: float | None = None) -> jax.Array:
    """`G = dL/dW` of the shallow model's loss `L(W) = loss(phi W^T, y) + (l2/2) |W|_F^2` (any loss of predictions),
    or of the square loss's Gram form `W C - D^T` when `phi` is `GramData`."""
    if isinstance(phi, GramData):
        G = W @ phi.C - phi.D.T
    else:
        loss_fn = registry.LOSSES[loss] if isinstance(loss, str) else loss
        G = jax.grad(lambda w: loss_fn(phi @ w.T, y))(W)
    return G if l2 is None else G + l2 * W


def update_checks(
    model: Any,
    loss: Any,
    params: dict,
    new_params: dict,
    phi: Any,
    y: jax.Array | None,
    learning_rate: jax.Array,
    fd_step: float | None = None,
    l2: float | None = None,
    velocity_only: bool = False,
) -> dict:
    """Compare the applied update `params -> new_params` with the induced dynamics (traceable).

    Returns `predicted_step`, the change of W that one exact GD step makes to second order in eta
    (`theory.predict_w_step(order=2) - W`, error `O(eta^3)`), `velocity_error`
    (`|DW[d] + eta P(G)| / |eta P(G)|`, forward mode), `step_error` (`|W_{t+1} - W_gd| / |eta P(G)|`, the trained
    step against the exact GD step to all orders) and `fd_velocity_error` (the same as `velocity_error` with
    `DW[d] ~ (W(theta + h d) - W(theta - h d)) / 2h`, `h = fd_step |theta| / |d|`; only with `fd_step`).
    `l2`: the loss carries `(l2/2) |W|_F^2` (cross-entropy's penalty). `velocity_only`: `velocity_error` alone (a
    smaller program, for runs that claim nothing else)."""
    gamma, sigma = model.gamma, model.sigma
    W = closed_form(model, params)
    G = shallow_gradient(loss, W, phi, y, l2)
    first = -learning_rate * theory.induced_preconditioner(params, G, gamma, sigma)
    d = jax.tree_util.tree_map(jnp.subtract, new_params, params)
    velocity = theory.delm_w_velocity(params, jax.tree_util.tree_map(jnp.negative, d), gamma, sigma)  # DW[d]
    scale = jnp.maximum(jnp.linalg.norm(first), jnp.finfo(W.dtype).tiny)
    out = {"velocity_error": jnp.linalg.norm(velocity - first) / scale}
    if velocity_only:
        return out
    out["predicted_step"] = theory.predict_w_step(params, G, learning_rate, gamma, sigma, order=2) - W
    out["step_error"] = theory.w_step_check(
        params, closed_form(model, new_params), G, learning_rate, gamma, sigma, rtol=STEP_CHECK_RTOL
    )["step_error"]
    if fd_step is not None:
        h = fd_step * _norm(params) / jnp.maximum(_norm(d), jnp.finfo(W.dtype).tiny)
        plus = jax.tree_util.tree_map(lambda p, e: p + h * e, params, d)
        minus = jax.tree_util.tree_map(lambda p, e: p - h * e, params, d)
        fd = (closed_form(model, plus) - closed_form(model, minus)) / (2 * h)
        out["fd_velocity_error"] = jnp.linalg.norm(fd - first) / scale
    return out


class Curvature(NamedTuple):
    """The shallow loss's curvature (or its upper bound) as an operator on W: `H(V) = scale V C + shift V`."""

    C: np.ndarray  # phi^T phi / n over the real samples, (m, m)
    scale: float
    shift: float
    description: str

    @property
    def lambda_max(self) -> float:
        """`lambda_max(H)`: `scale lambda_max(C) + shift`."""
        return self.scale * float(np.linalg.eigvalsh(np.asarray(self.C, np.float64))[-1]) + self.shift


def curvature_operator(loss_name: str, C: Any, l2: float = 0.0) -> Curvature:
    """Square loss: `H(V) = V C`, its Hessian. Cross-entropy + `(l2/2)|W|^2`: the bound `V C / 2 + l2 V` (every
    softmax Jacobian `diag(p) - p p^T` has eigenvalues <= 1/2), so `lambda_max(P H_CE) <= lambda_max(P H)`."""
    if loss_name == "square":
        return Curvature(np.asarray(C), 1.0, 0.0, "H = I (x) C")
    return Curvature(np.asarray(C), 0.5, float(l2), "H <= I (x) C/2 + l2 I")


class Stiffness(NamedTuple):
    value: float  # lambda_max(P H)
    exact: bool  # dense eigensolve (True) or power iteration (False: an estimate from below)


def stiffness(model: Any, params: dict, curvature: Curvature) -> Stiffness:
    """`lambda_max(P H)` at `params` (P H is similar to the symmetric `P^{1/2} H P^{1/2}`, eigenvalues >= 0):
    dense from `theory.preconditioner_matrix` up to `DENSE_LIMIT` entries of W, by power iteration above."""
    m_y, m = params["B"].shape
    C = jnp.asarray(curvature.C, params["B"].dtype)
    if m_y * m <= DENSE_LIMIT:
        P = np.asarray(theory.preconditioner_matrix(params, model.gamma, model.sigma), np.float64)
        P = 0.5 * (P + P.T)
        H = curvature.scale * np.kron(np.eye(m_y), np.asarray(curvature.C, np.float64)) + curvature.shift * np.eye(
            m_y * m
        )
        L = np.linalg.cholesky(P)
        return Stiffness(float(np.linalg.eigvalsh(L.T @ H @ L)[-1]), True)
    value = _power_iteration(params, C, curvature.scale, curvature.shift, model.gamma, model.sigma)
    return Stiffness(float(value), False)


def preconditioner_operator(params: dict, gamma: float, sigma: Any):
    """`V -> P(V) = J J^*(V)`, `J` the Jacobian of `(A, B) -> W` through the library's closed form
    (`theory.end_to_end`): linearised once (one LU of U, kept as a residual), then applied any number of times
    at `O(m_y m^2)` each (`theory.induced_preconditioner` factorises U at every call: fine for one application,
    not for a power iteration at m ~ 800). Traceable."""
    W_of = lambda p: theory.end_to_end(p["A"], p["B"], gamma, sigma)
    _W, J = jax.linearize(W_of, params)
    J_adjoint = jax.linear_transpose(J, params)

    def apply(V):
        (g,) = J_adjoint(V)
        return J(g)

    return apply


def _power_iteration_fn(params, C, scale, shift, gamma, sigma):
    P = preconditioner_operator(params, gamma, sigma)
    V0 = jax.random.normal(jax.random.PRNGKey(0), params["B"].shape, params["B"].dtype)

    def body(_, carry):
        V, _ = carry
        PV = P(scale * V @ C + shift * V)
        return PV / jnp.linalg.norm(PV), jnp.linalg.norm(PV)

    _, value = jax.lax.fori_loop(0, POWER_ITERATIONS, body, (V0 / jnp.linalg.norm(V0), jnp.zeros((), C.dtype)))
    return value


_power_iteration = compiling.jit(_power_iteration_fn, static_argnames=("gamma", "sigma"))


def certified_stiffness(model: Any, params: dict, curvature: Curvature) -> float:
    """An upper bound on `lambda_max(P H)` from measured norms: `1 / theory.learning_rate_limit(...)` with
    `lambda_max(H)`, the measured `|U^{-1}|_2` (`theory.u_inverse_norm`) and `|W|_2` (docs/theory.md section 12).
    Valid at any width (no eigensolve of P); conservative (about 10x the exact value at a small init)."""
    A = params["A"]
    limit = theory.learning_rate_limit(
        curvature.lambda_max,
        theory.u_inverse_norm(A, model.gamma, model.sigma),
        theory.spectral_norm(closed_form(model, params)),
        model.gamma,
        sigma=model.sigma,
        m=A.shape[0],
    )
    return float(1.0 / limit)


def learning_rate(rule: Any, model: Any, params0: dict, curvature: Curvature) -> tuple[float, Stiffness]:
    """`eta` from a `LearningRateConfig` and the DELM's initial parameters, and the stiffness `lambda_max(P_0 H)`:
    `measured`: `scale / lambda_max(P_0 H)`; `bound`: `scale` times `theory.learning_rate_limit` at the init (so
    `eta lambda_max(P_0 H) <= scale` is guaranteed, not measured); `fixed`: `value`."""
    stiff = stiffness(model, params0, curvature)
    if rule.rule == "fixed":
        return float(rule.value), stiff
    if rule.rule == "bound":
        return float(rule.scale / certified_stiffness(model, params0, curvature)), stiff
    return float(rule.scale / stiff.value), stiff


def integrated_path(W0: np.ndarray, predicted_steps: np.ndarray) -> np.ndarray:
    """The W-path integrated from the predicted steps (`update_checks`' `predicted_step`, the trust-region dynamics
    `-eta P_t(G_t)` to second order in eta) from `W_0`: `W0 + cumsum` (index t = before step t)."""
    steps = np.asarray(predicted_steps)
    return np.concatenate([np.asarray(W0)[None], np.asarray(W0)[None] + np.cumsum(steps, axis=0)])


__all__ = [
    "Curvature",
    "Stiffness",
    "certified_stiffness",
    "closed_form",
    "curvature_operator",
    "integrated_path",
    "learning_rate",
    "preconditioner_operator",
    "shallow_gradient",
    "stiffness",
    "update_checks",
]
