"""The benchmark's independent checks: float64 references of the DELM's loss and gradients, relative residuals that
catch a wrong state, the Gauss-Newton curvature, and a second check that refutes a claimed convergence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import checks
from experiments.bench.problem import closed_form, gauss_newton_lambda_max, make_problem
from experiments.bench.protocol import Check


def test_delm_reference_matches_float64_autodiff():
    p = make_problem(n=20, width=7, classes=3, gamma=0.8, tol=1e-5, maxiter=50, learning_rate=1e-3, data="random")
    ref = checks.delm_reference(p)

    def loss(params):
        S = jax.nn.softmax(params["A"], axis=0)
        W = jnp.linalg.solve((jnp.eye(p.m, dtype=jnp.float64) - p.gamma * S).T, params["B"].T).T
        r = jnp.asarray(p.phi, jnp.float64) @ W.T - jnp.asarray(p.y, jnp.float64)
        return 0.5 * jnp.mean(jnp.sum(r * r, axis=1))

    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, jnp.float64) for k, v in p.delm.items()}
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert abs(float(value) - ref["loss"]) <= 1e-12 * abs(ref["loss"])  # two float64 routes to the same number
    errors = checks.relative_errors({k: np.asarray(v) for k, v in grads.items()}, ref["grads"])
    assert max(errors.values()) < 1e-10, errors


def test_relative_residual_detects_a_wrong_state():
    p = make_problem(n=10, width=6, classes=2, gamma=0.9, tol=1e-5, maxiter=50, learning_rate=1e-3, data="random")
    U = closed_form(p, p.delm["A"], p.delm["B"]).U  # the numpy reference's U = I - gamma sigma(A)
    z = np.linalg.solve(U, p.phi.astype(np.float64).T).T
    assert checks.relative_residual(p, "delm", "per_sample", z) < 1e-12
    assert checks.relative_residual(p, "delm", "per_sample", 0.9 * z) > 1e-3
    bad = z.copy()
    bad[3] *= 0.99  # one sample off: hidden in the whole state's norm, not in the worst sample's
    whole, worst = checks.residuals(p, "delm", "per_sample", bad)
    assert worst > 2 * whole and worst > 1e-3
    W = np.linalg.solve(U.T, p.delm["B"].astype(np.float64).T).T
    assert checks.relative_residual(p, "delm", "transposed", W) < 1e-12
    assert abs(checks.equilibrium_norm(p, "delm", "transposed") - np.linalg.norm(W)) <= 1e-12 * np.linalg.norm(W)


def test_gauss_newton_lambda_max_matches_the_dense_matrix():
    p = make_problem(n=15, width=5, classes=2, gamma=0.9, tol=1e-5, maxiter=50, learning_rate=None, data="random")
    phi = p.phi.astype(np.float64)

    def w_of(theta):  # (A, B) flattened -> row-major vec(W), from the closed form in float64
        return closed_form(p, theta[:25].reshape(5, 5), theta[25:].reshape(2, 5)).W.ravel()

    theta = np.concatenate([p.delm["A"].astype(np.float64).ravel(), p.delm["B"].astype(np.float64).ravel()])
    h = 1e-6  # central differences: error of order h^2, far below the 2e-3 asked of the eigenvalue
    J = np.stack([(w_of(theta + h * e) - w_of(theta - h * e)) / (2 * h) for e in np.eye(35)], axis=1)
    H = np.kron(np.eye(2), phi.T @ phi / p.n)  # vec(V C) for row-major vec(V)
    dense = np.linalg.eigvalsh(J.T @ H @ J)[-1]
    # a Rayleigh quotient never exceeds lambda_max (up to the differences' error); here the top two eigenvalues are
    # 0.1% apart, which slows the power iteration, and a step size needs no more than that
    estimate = gauss_newton_lambda_max(p)
    assert (1 - 2e-3) * dense <= estimate <= (1 + 1e-6) * dense
    assert p.learning_rate == pytest.approx(1.0 / estimate, rel=1e-12)


def test_profile_hand_written_step_has_the_closed_form_gradients():
    from experiments.bench import profile

    p = make_problem(n=20, width=7, classes=3, gamma=0.8, tol=1e-5, maxiter=50, learning_rate=1e-3, data="random")
    params = {k: jnp.asarray(v) for k, v in p.delm.items()}
    _, grads = jax.jit(profile._closed_form(p))(params, jnp.asarray(p.phi), jnp.asarray(p.y))
    errors = checks.relative_errors({k: np.asarray(v) for k, v in grads.items()}, checks.delm_reference(p)["grads"])
    assert max(errors.values()) < 1e-4, errors  # float32 LU solves of a well-conditioned U (gamma 0.8)


def test_a_second_check_flags_a_claim_it_refutes():
    p = make_problem(n=10, width=6, classes=2, gamma=0.9, tol=1e-5, maxiter=50, learning_rate=None, data="random")
    params = {k: v * 1.01 for k, v in p.delm.items()}  # a training run's later parameters
    ref = checks.delm_reference(p, params)
    W = closed_form(p, params["A"], params["B"]).W
    row = {"problem": "delm", "formulation": "transposed", "converged": True}
    checks.verify_again(row, Check(1, True, W, ref["grads"], params=params), p, 1e-5, None, "check_after_timing")
    assert row["converged"] and "flag" not in row and row["check_after_timing"]["relative_residual"] < 1e-12
    assert max(row["check_after_timing"]["grad_error"].values()) < 1e-12
    assert checks.relative_residual(p, "delm", "transposed", W) > 1e-3  # judged at the run's parameters, not p's
    stale = W * (1 + 1e-3)  # a start that was never solved from, claimed converged
    checks.verify_again(row, Check(0, True, stale, ref["grads"], params=params), p, 1e-5, None, "check_after_timing")
    assert not row["converged"] and row["flag"].startswith(checks.FLAG)
