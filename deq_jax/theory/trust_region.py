"""One DELM gradient step as a trust-region Newton step of the shallow square-loss model (docs/theory.md section 5).

The step `v = -eta P(G)` solves `min_v <G, v> + 1/2 <v, H v>` subject to `|v|_M <= delta` with
`M = ((eta P)^{-1} - H) / lam` and `delta = |v|_M`: the KKT condition `(H + lam M) v = -G` then holds for ANY eta
by construction of M, so its residual is an arithmetic check, not evidence. What is not automatic:
- `M` is a norm (positive definite) iff `eta lambda_max(P H) < 1`, i.e. `eta < eta_limit = 1 / lambda_max(P H)`;
- how the step relates to the shallow Newton step `v_N = -G C^+` (the minimiser of the unconstrained model,
  which lands on the optimum for the square loss): its direction (`newton_cosine`, against GD's `gd_newton_cosine`)
  and the fraction of the Newton model decrease it achieves (`model_decrease_ratio = q(v) / q(v_N)` in (0, 1] for
  a good step; for the square loss `q(v)` is the exact change of the loss in W-space).
Dense `(m_y m) x (m_y m)` matrices: small problems only (m_y m up to ~1000).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax import _checks
from deq_jax.losses import square
from deq_jax.maps import Sigma, get_sigma
from deq_jax.theory._common import Params, check_params, check_phi_y, program
from deq_jax.theory.closed_form import _w
from deq_jax.theory.dynamics import _precondition, _velocity, preconditioner_matrix
from deq_jax.theory.shallow import _sq_grad, default_rtol


@program(static_argnames=("sigma",))
def _square_velocities(A: Any, B: Any, phi: Any, y: Any, gamma: Any, sigma: Sigma) -> tuple:
    """Loss, G, P(G) and the jvp velocity of W at the reverse-mode gradient, for the square loss."""

    def loss_fn(a, b):
        return square(phi @ _w(a, b, gamma, sigma).T, y)

    loss, (gA, gB) = jax.value_and_grad(loss_fn, argnums=(0, 1))(A, B)
    G = _sq_grad(_w(A, B, gamma, sigma), phi, y)
    return loss, G, _precondition(A, B, G, gamma, sigma), _velocity(A, B, gA, gB, gamma, sigma)


def trust_region_check(
    params: Params,
    phi: Any,
    y: Any,
    learning_rate: float,
    gamma: float | Any,
    sigma: str | Sigma = "column_softmax",
    *,
    lam: float | str = 1.0,
) -> dict:
    """Measure at `params` what makes one DELM gradient step a trust-region Newton step of the shallow model.

    With `G = dL/dW`, `P` the induced preconditioner, `H(V) = V C` (`C = phi^T phi / n`) and `eta` the learning
    rate (module docstring for the meaning). `lam`: any `lam > 0` gives the same M up to scale; default `1.0`;
    `"balanced"` picks `lam = mean eigenvalue of (eta P)^{-1} - H`, so M's eigenvalues average 1.

    Args:
      params: `{"A": (m, m), "B": (m_y, m)}`, the DELM's parameters.
      phi: the features, `(n, m)`.
      y: the targets, `(n, m_y)` (square loss).
      learning_rate: the GD step size `eta`.
      gamma: the DELM's `gamma`, in `(0, 1)`.
      sigma: the weight nonlinearity, a name from `deq_jax.maps.SIGMAS` or a callable.
      lam: the trust-region multiplier, a positive number or `"balanced"`.

    Returns plain floats:
    - the relation's content: `M_min_eig`, `M_positive_definite`, `eta_limit` (`1 / lambda_max(P H)`),
      `step_size_ratio` (`eta / eta_limit`, < 1 iff M is positive definite), `newton_cosine`, `gd_newton_cosine`,
      `model_decrease_ratio`;
    - the dynamics: `velocity_rel_error` (`|velocity_jvp + P(G)| / |P(G)|`, where `velocity_jvp` is
      `delm_w_velocity` at the reverse-mode gradient through the closed form), `P_min_eig`, `P_max_eig`,
      `P_asymmetry`, `H_max_eig`, `cosine_vs_gd` (`cos(-P(G), -G)`);
    - the construction: `kkt_residual` (`|(H + lam M) v + G| / |G|`: holds by construction of M for every eta, so it
      checks arithmetic only), `delta` (`|v|_M`, nan where M is indefinite along v), `lambda`, `eta`, `loss`,
      `grad_norm` (`|G|_F`).
    """
    A, B = check_params(params)
    check_phi_y(phi, y)
    _checks.check_shape("phi", phi, (None, A.shape[0]), f"phi's columns are the width m = {A.shape[0]}")
    _checks.check_shape("y", y, (None, B.shape[0]), f"y's columns are the outputs m_y = {B.shape[0]}")
    _checks.check_positive("learning_rate", learning_rate)
    _checks.check_open_unit("gamma", gamma)
    sigma = get_sigma(sigma)
    if not (lam == "balanced" or (isinstance(lam, (int, float)) and not isinstance(lam, bool) and lam > 0)):
        raise ValueError(f"lam must be a positive number or 'balanced'; got {lam!r}")
    n, m = phi.shape
    m_y = B.shape[0]

    loss, G, PG, velocity = _square_velocities(A, B, phi, y, gamma, sigma)
    velocity_rel_error = jnp.linalg.norm(velocity + PG) / jnp.linalg.norm(PG)

    P = np.asarray(preconditioner_matrix(params, gamma, sigma), dtype=np.float64)
    P_asymmetry = np.linalg.norm(P - P.T) / np.linalg.norm(P)
    p_eig, p_vec = np.linalg.eigh(0.5 * (P + P.T))
    C = np.asarray(phi.T @ phi, dtype=np.float64) / n
    H = np.kron(np.eye(m_y), C)  # H[(i,j),(i,k)] = C[k,j] on row-major vec(V): vec(V C)
    eta = float(learning_rate)
    etaP_inv = (p_vec / (eta * p_eig)) @ p_vec.T  # (eta P)^{-1} from the symmetric eigendecomposition
    lam_value = float(np.mean(np.linalg.eigvalsh(etaP_inv - H))) if lam == "balanced" else float(lam)
    M = (etaP_inv - H) / lam_value
    M = 0.5 * (M + M.T)
    m_min = float(np.linalg.eigvalsh(M)[0])
    # lambda_max(P H) = lambda_max(P^{1/2} H P^{1/2})
    P_half = (p_vec * np.sqrt(np.maximum(p_eig, 0.0))) @ p_vec.T
    ph_max = float(np.linalg.eigvalsh(P_half @ H @ P_half)[-1])
    g = np.asarray(G, dtype=np.float64).ravel()
    pg = np.asarray(PG, dtype=np.float64).ravel()
    v = -eta * pg
    kkt = np.linalg.norm((H + lam_value * M) @ v + g) / np.linalg.norm(g)
    vMv = float(v @ M @ v)
    # the shallow Newton step v_N = -G C^+ (C^+ with feature_spectrum's cutoff)
    c_eig, c_vec = np.linalg.eigh(C)
    keep = c_eig > default_rtol(m, np.float64) * max(c_eig[-1], 0.0)
    C_pinv = (c_vec[:, keep] / c_eig[keep]) @ c_vec[:, keep].T
    v_newton = -(np.asarray(G, dtype=np.float64) @ C_pinv).ravel()

    def q(u):  # the quadratic model of the shallow loss: its exact change in W-space for the square loss
        return float(g @ u + 0.5 * u @ (H @ u))

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    return {
        "velocity_rel_error": float(velocity_rel_error),
        "P_min_eig": float(p_eig[0]),
        "P_max_eig": float(p_eig[-1]),
        "P_asymmetry": float(P_asymmetry),
        "H_max_eig": float(np.linalg.eigvalsh(C)[-1]),
        "M_min_eig": m_min,
        "M_positive_definite": bool(m_min > 0),
        "eta_limit": 1.0 / ph_max,
        "step_size_ratio": eta * ph_max,
        "newton_cosine": cos(v, v_newton),
        "gd_newton_cosine": cos(-g, v_newton),
        "model_decrease_ratio": q(v) / q(v_newton),
        "kkt_residual": float(kkt),
        "delta": float(np.sqrt(vMv)) if vMv >= 0 else float("nan"),
        "cosine_vs_gd": cos(pg, g),
        "lambda": lam_value,
        "eta": eta,
        "loss": float(loss),
        "grad_norm": float(np.linalg.norm(g)),
    }
