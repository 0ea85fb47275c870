"""deq_jax.theory, sections 5 and 11: the induced preconditioner against forward-mode and finite-difference
velocities of W (and a wrong preconditioner that must not match), P's symmetry and definiteness, and the content of
the trust-region relation. Runs with x64 on (float64) and off (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from theory_helpers import (  # noqa: F401 (autouse fixtures)
    F64,
    GAMMA,
    SIGMA_CASES,
    SLOW,
    _precision_warnings_expected,
    _slow_only_when_selected,
    normal,
    problem,
    rel,
    tol,
)

from deq_jax import square, theory
from deq_jax.models import DELM

# ----------------------------------------------------------------------------- induced preconditioner (section 5)


@jax.jit(static_argnames=("model",))
def _model_grads(params, phi, y, model):
    return jax.grad(lambda p: square(model.apply(p, phi)[0], y))(params)


def model_grads(params, phi, y, sigma):
    """dL/dA, dL/dB from the DELM model's own path (direct solve)."""
    m_y, m = params["B"].shape
    return _model_grads(params, phi, y, DELM(width=m, out_dim=m_y, gamma=GAMMA, sigma=sigma, tol=tol(1e-13, 1e-6)))


@pytest.mark.parametrize("sigma", SIGMA_CASES)
def test_induced_preconditioner_equals_forward_mode_velocity(sigma):
    params, phi, y = problem(seed=0, a_scale=1.5)
    grads = model_grads(params, phi, y, sigma)
    velocity = theory.delm_w_velocity(params, grads, GAMMA, sigma)
    W = theory.end_to_end(params["A"], params["B"], GAMMA, sigma)
    G = theory.square_loss_gradient(W, phi, y)
    P_G = theory.induced_preconditioner(params, G, GAMMA, sigma)
    assert rel(velocity, -P_G) < tol(1e-9, 1e-4)
    # the exact parameter gradient from G alone equals the model's
    g = theory.parameter_gradient(params, G, GAMMA, sigma)
    assert rel(g["A"], grads["A"]) < tol(1e-9, 1e-4) and rel(g["B"], grads["B"]) < tol(1e-9, 1e-4)
    # and a central finite difference of W along the gradient direction (error O(h^2))
    h = tol(1e-5, 1e-2)
    w_at = lambda t: theory.end_to_end(params["A"] - t * grads["A"], params["B"] - t * grads["B"], GAMMA, sigma)
    assert rel((w_at(h) - w_at(-h)) / (2 * h), -P_G) < tol(1e-7, 1e-2)


def test_wrong_preconditioner_does_not_match():
    """(U^T U)^{-1} in place of (U U^T)^{-1} is measurably wrong, so the test above can fail."""
    params, phi, y = problem(seed=2, a_scale=1.5)
    grads = model_grads(params, phi, y, "column_softmax")
    velocity = theory.delm_w_velocity(params, grads, GAMMA)
    G = theory.square_loss_gradient(theory.end_to_end(params["A"], params["B"], GAMMA), phi, y)
    P_G = theory.induced_preconditioner(params, G, GAMMA)
    U, G, P_G = (np.asarray(x, np.float64) for x in (theory.u_matrix(params["A"], GAMMA), G, P_G))
    wrong = P_G - G @ np.linalg.inv(U @ U.T) + G @ np.linalg.inv(U.T @ U)
    assert rel(velocity, -P_G) < tol(1e-9, 1e-4)
    assert rel(velocity, -wrong) > 1e-2
    # and without the K K^* term (plain B-only dynamics) it is wrong too
    assert rel(velocity, -G @ np.linalg.inv(U @ U.T)) > 1e-2


@pytest.mark.parametrize("sigma", SIGMA_CASES)
def test_preconditioner_matrix_symmetric_positive_definite(sigma):
    params, _phi, _y = problem(seed=3, a_scale=2.0)
    P = np.asarray(theory.preconditioner_matrix(params, GAMMA, sigma), np.float64)
    assert P.shape == (18, 18)
    assert np.linalg.norm(P - P.T) / np.linalg.norm(P) < tol(1e-13, 1e-5)
    assert np.linalg.eigvalsh(P)[0] > 0
    G = normal(4, (3, 6))
    assert rel(P @ np.asarray(G).ravel(), theory.induced_preconditioner(params, G, GAMMA, sigma).ravel()) < tol(
        1e-13, 1e-5
    )
    # the first term alone, G (U U^T)^{-1}, is a lower bound: P - (U U^T)^{-1} (x) I is positive semi-definite
    U = np.asarray(theory.u_matrix(params["A"], GAMMA, sigma), np.float64)
    first = np.kron(np.eye(3), np.linalg.inv(U @ U.T))
    assert np.linalg.eigvalsh(P - first)[0] > -tol(1e-12, 1e-4) * np.linalg.eigvalsh(P)[-1]


def test_trust_region_relation_content():
    """What is not automatic: M is a norm iff eta < eta_limit = 1 / lambda_max(P H); the step's relation to the
    shallow Newton step. The KKT residual holds for every eta (it is M's construction), so it is no evidence."""
    params, phi, y = problem(seed=5, a_scale=0.5)
    eta = 0.5 / (
        float(theory.feature_spectrum(phi)["lambda_max"]) * float(theory.u_inverse_norm(params["A"], GAMMA)) ** 2
    )
    r1 = theory.trust_region_check(params, phi, y, eta, GAMMA, lam=1.0)
    assert r1["velocity_rel_error"] < tol(1e-9, 1e-4) and r1["P_asymmetry"] < tol(1e-13, 1e-5)
    assert r1["M_positive_definite"] and abs(r1["step_size_ratio"] - eta / r1["eta_limit"]) < 1e-12
    # just below and just above the limit: definiteness flips exactly there
    below = theory.trust_region_check(params, phi, y, 0.99 * r1["eta_limit"], GAMMA)
    above = theory.trust_region_check(params, phi, y, 1.01 * r1["eta_limit"], GAMMA)
    assert below["M_positive_definite"] and not above["M_positive_definite"] and above["M_min_eig"] < 0
    assert above["kkt_residual"] < tol(1e-10, 1e-4) and below["kkt_residual"] < tol(1e-10, 1e-4)
    # the shallow Newton step: the square loss's model decrease q(v_N) is the whole gap L - L*
    G = np.asarray(theory.square_loss_gradient(theory.end_to_end(params["A"], params["B"], GAMMA), phi, y))
    _, L_star = theory.shallow_optimum_square(phi, y)
    assert 0 < r1["model_decrease_ratio"] <= 1 and -1 <= r1["newton_cosine"] <= 1
    gap = r1["loss"] - float(L_star)
    v = -eta * np.asarray(theory.induced_preconditioner(params, jnp.asarray(G, F64), GAMMA))
    C = np.asarray(theory.feature_gram(phi), np.float64)
    q_v = float(np.sum(G * v) + 0.5 * np.sum((v @ C) * v))
    assert abs(r1["model_decrease_ratio"] - q_v / -gap) < tol(1e-9, 1e-3)
    # any lam > 0 scales M (and delta) without changing its definiteness
    r2 = theory.trust_region_check(params, phi, y, eta, GAMMA, lam=2.0)
    rb = theory.trust_region_check(params, phi, y, eta, GAMMA, lam="balanced")
    assert abs(r2["M_min_eig"] - r1["M_min_eig"] / 2) < tol(1e-9, 1e-3) * r1["M_min_eig"]
    assert abs(r2["delta"] - r1["delta"] / np.sqrt(2)) < tol(1e-9, 1e-3) * r1["delta"]
    assert rb["lambda"] > 0 and rb["M_positive_definite"]
    assert r1["eta"] == eta and r1["grad_norm"] == pytest.approx(np.linalg.norm(G), rel=tol(1e-12, 1e-5))
    assert r1["loss"] == pytest.approx(
        0.5
        * np.mean(
            np.sum(
                (np.asarray(phi) @ np.asarray(theory.end_to_end(params["A"], params["B"], GAMMA)).T - np.asarray(y))
                ** 2,
                axis=1,
            )
        ),
        rel=tol(1e-12, 1e-5),
    )


@SLOW
def test_trust_region_check_on_digits():
    """The setting measured in docs/theory.md section 5: digits, standardised + bias, gamma 0.8, DELM init."""
    from experiments.common.datasets import load_dataset, one_hot, preprocess

    ds = load_dataset("digits", download=False)
    pp = preprocess(ds, features="standardize", add_bias=True)
    phi, y = jnp.asarray(pp.x_train, F64), jnp.asarray(one_hot(pp.y_train, 10), F64)
    m = phi.shape[1]
    params = DELM(width=m, out_dim=10, gamma=GAMMA).init(jax.random.PRNGKey(0), F64)
    eta = (1 - GAMMA) ** 2 / float(theory.feature_spectrum(phi)["lambda_max"])
    r = theory.trust_region_check(params, phi, y, eta, GAMMA)
    assert r["velocity_rel_error"] < tol(1e-9, 1e-4) and r["M_positive_definite"]
    assert abs(r["P_min_eig"] - 0.97) < 0.01 and 5.5 < r["M_min_eig"] < 6.5 and r["step_size_ratio"] < 1
    assert 0 < r["model_decrease_ratio"] <= 1
