"""deq_jax.theory: the 2-norm of U^{-1} (bound, counterexample, an adversarial search), the step-size limit against the
exact lambda_max(P H), the exact parameter gradient from G, and the per-step prediction of the W-path, which a
wrong training gradient (one-step, perturbed, wrong sigma in the backward) must miss by orders of magnitude.

Runs with x64 on (float64: the tolerances in comments) and off (float32: looser tolerances, stated per check)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from theory_helpers import F64 as DT
from theory_helpers import GAMMA, X64, _slow_only_when_selected, problem, rel, tol  # noqa: F401 (autouse fixture)

from deq_jax import theory
from deq_jax.maps import column_softmax, get_sigma, row_softmax

EPS = float(jnp.finfo(DT).eps)
N, M, M_Y = 25, 6, 3  # theory_helpers.problem's shape: the jit-compiled cores compile once for every theory file


# ----------------------------------------------------------------------------- |U^{-1}|_2


def concentrated_A(m, row=0, height=60.0):
    """Every column of column_softmax(A) concentrated on one row: sigma(A) -> e_row 1^T."""
    return jnp.zeros((m, m), DT).at[row].set(height)


def test_u_inverse_norm_counterexample_exceeds_one_over_one_minus_gamma():
    m = 7
    A = concentrated_A(m)
    measured = float(theory.u_inverse_norm(A, GAMMA))
    # the limit matrix I + gamma/(1-gamma) e_1 1^T, in NumPy float64
    limit = np.linalg.norm(np.eye(m) + GAMMA / (1 - GAMMA) * np.outer(np.eye(m)[0], np.ones(m)), 2)
    assert abs(measured - limit) < tol(1e-9, 1e-4) * limit and abs(limit - 11.036) < 1e-3
    assert measured > 2.2 / (1 - GAMMA)  # the false bound 1/(1-gamma) = 5 is exceeded by a factor 2.2
    bound = theory.u_inverse_norm_bound(m, GAMMA)
    assert measured <= bound <= np.sqrt(m) / (1 - GAMMA)
    assert abs(bound - np.sqrt(1 + 6 * GAMMA) / (1 - GAMMA)) < 1e-12
    # what does hold: the 1-norm is exactly 1/(1-gamma); the 2-norm is below sqrt(|.|_1 |.|_inf)
    Uinv = np.linalg.inv(np.asarray(theory.u_matrix(A, GAMMA), np.float64))
    assert abs(np.linalg.norm(Uinv, 1) - 1 / (1 - GAMMA)) < tol(1e-9, 1e-4)
    assert measured <= np.sqrt(np.linalg.norm(Uinv, 1) * np.linalg.norm(Uinv, np.inf)) * (1 + tol(1e-12, 1e-5))


@pytest.mark.parametrize("sigma", [column_softmax, pytest.param(row_softmax, marks=pytest.mark.slow)])
def test_u_inverse_norm_bound_survives_an_adversarial_search(sigma):
    """Gradient ascent on |U^{-1}|_2 over A from many starts never crosses the bound, and gets close to it."""
    m = 7
    bound = theory.u_inverse_norm_bound(m, GAMMA)
    log_norm = jax.jit(jax.vmap(jax.value_and_grad(lambda a: jnp.log(theory.u_inverse_norm(a, GAMMA, sigma)))))
    A = jnp.asarray(np.random.default_rng(0).standard_normal((8, m, m)) * 2.0, DT)
    best = 0.0
    for _ in range(40):
        value, grad = log_norm(A)
        best = max(best, float(jnp.exp(value).max()))
        A = A + 2.0 * grad / (jnp.linalg.norm(grad, axis=(1, 2), keepdims=True) + 1e-30)
    assert best <= bound * (1 + tol(1e-9, 1e-5))
    assert best > 0.85 * bound  # the search finds the concentrated regime: the bound is nearly attained


# ----------------------------------------------------------------------------- step-size limit


def test_learning_rate_limit_is_a_bound_on_the_exact_trust_region_limit():
    """eta <= learning_rate_limit => eta lambda_max(P H) <= 1 (M positive definite), at several scales of A."""
    _, phi, y = problem(1)
    lam_max = theory.feature_spectrum(phi)["lambda_max"]
    for seed, a_scale in [(2, 0.1), (4, 3.0)]:
        params, _, _ = problem(seed, a_scale=a_scale)
        W = theory.end_to_end(params["A"], params["B"], GAMMA)
        limit = float(
            theory.learning_rate_limit(
                lam_max, theory.u_inverse_norm(params["A"], GAMMA), theory.spectral_norm(W), GAMMA
            )
        )
        r = theory.trust_region_check(params, phi, y, limit, GAMMA)
        assert r["step_size_ratio"] <= 1.0 + tol(1e-12, 1e-5) and r["M_positive_definite"]
        assert r["eta_limit"] >= limit
        # lambda_max(P) against its bound, and the K K^* term matters: without it the "bound" can fail
        P_bound = float(
            theory.preconditioner_norm_bound(theory.u_inverse_norm(params["A"], GAMMA), theory.spectral_norm(W), GAMMA)
        )
        assert r["P_max_eig"] <= P_bound * (1 + tol(1e-12, 1e-5))
        # twice the exact limit leaves the trust-region range
        r2 = theory.trust_region_check(params, phi, y, 2.0 * r["eta_limit"], GAMMA)
        assert not r2["M_positive_definite"] and abs(r2["step_size_ratio"] - 2.0) < tol(1e-9, 1e-4)


def test_old_step_size_rule_can_leave_the_trust_region_range():
    """eta = (1 - gamma)^2 / lambda_max, justified by the false bound, has eta lambda_max(P H) > 1 at small A when
    C's top eigenvector is near the all-ones direction (features with a common offset, e.g. raw pixels)."""
    params, phi, y = problem(5, a_scale=0.1)
    phi = phi + 1.0
    lam_max = theory.feature_spectrum(phi)["lambda_max"]
    r = theory.trust_region_check(params, phi, y, (1 - GAMMA) ** 2 / float(lam_max), GAMMA)
    assert r["step_size_ratio"] > 1.05 and not r["M_positive_definite"]
    W = theory.end_to_end(params["A"], params["B"], GAMMA)
    limit = theory.learning_rate_limit(
        lam_max, theory.u_inverse_norm(params["A"], GAMMA), theory.spectral_norm(W), GAMMA
    )
    assert float(limit) < (1 - GAMMA) ** 2 / float(lam_max)


def test_sigma_derivative_bound():
    rng = np.random.default_rng(6)
    for sigma, c in [("column_softmax", 0.5), ("row_softmax", 0.5), ("scaled_tanh", 1.0 / M)]:
        assert theory.sigma_derivative_bound(sigma, M) == c
        f = get_sigma(sigma)
        fn = jax.jit(lambda a, s, f=f: jax.jvp(f, (a,), (s,))[1])
        worst = 0.0
        for _ in range(20):
            A = jnp.asarray(rng.standard_normal((M, M)) * rng.uniform(0, 5), DT)
            S = jnp.asarray(rng.standard_normal((M, M)), DT)
            worst = max(worst, float(jnp.linalg.norm(fn(A, S)) / jnp.linalg.norm(S)))
        assert worst <= c * (1 + 1e-5)
    with pytest.raises(ValueError, match="no derivative bound is known"):
        theory.sigma_derivative_bound(jnp.tanh, M)
    with pytest.raises(ValueError, match="needs m"):
        theory.learning_rate_limit(1.0, 1.0, 1.0, GAMMA, sigma="scaled_tanh")


def test_learning_rate_limit_hand_computed():
    """`1 / (lambda_max |U^{-1}|_2^2 (1 + gamma^2 c^2 |W|_2^2))` by hand at lambda_max = 2, |U^{-1}| = 3, |W| = 4,
    gamma = 1/2: softmax (c = 1/2) gives 1 / (2 * 9 * 2) = 1/36, so a limit off by any factor (doubled, c^2
    dropped, gamma not squared) fails; scaled_tanh at m = 4 (c = 1/4): 1 / (2 * 9 * 1.25); an explicit c = 1: 1/90."""
    assert float(theory.learning_rate_limit(2.0, 3.0, 4.0, 0.5)) == pytest.approx(1 / 36, rel=1e-6)
    assert float(theory.learning_rate_limit(2.0, 3.0, 4.0, 0.5, sigma="row_softmax")) == pytest.approx(1 / 36, rel=1e-6)
    assert float(theory.learning_rate_limit(2.0, 3.0, 4.0, 0.5, sigma="scaled_tanh", m=4)) == pytest.approx(
        1 / 22.5, rel=1e-6
    )
    assert float(theory.learning_rate_limit(2.0, 3.0, 4.0, 0.5, dsigma_norm=1.0)) == pytest.approx(1 / 90, rel=1e-6)
    # its denominator's factor: |U^{-1}|^2 (1 + gamma^2 c^2 |W|^2), default c = 1/2; broadcast over a history
    assert float(theory.preconditioner_norm_bound(3.0, 4.0, 0.5)) == pytest.approx(18.0, rel=1e-6)
    assert float(theory.preconditioner_norm_bound(3.0, 4.0, 0.5, 0.25)) == pytest.approx(11.25, rel=1e-6)
    history = theory.learning_rate_limit(jnp.array([2.0, 1.0], DT), jnp.array([3.0, 1.0], DT), 0.0, 0.5)
    np.testing.assert_allclose(np.asarray(history), [1 / 18, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="dsigma_norm must be a positive number"):
        theory.preconditioner_norm_bound(3.0, 4.0, 0.5, 0.0)
    assert theory.sigma_derivative_bound(get_sigma("row_softmax"), 3) == 0.5  # the function itself, not its name
    assert theory.sigma_derivative_bound("scaled_tanh", 8) == 0.125
    with pytest.raises(ValueError, match="m must be a positive integer"):
        theory.sigma_derivative_bound("column_softmax", 0)


# ----------------------------------------------------------------------------- the W-path prediction

NOISE = np.random.default_rng(0).standard_normal((2, M, M))  # the "perturbed" gradient's 1e-3 relative noise


@jax.jit
def gradients(params, phi, y, noise):
    """{kind: (dL/dA, dL/dB)} as a training step would use them: exact, one-step (Jacobian-free: f(W) = B + gamma W
    sigma(A) differentiated once at the stopped equilibrium), perturbed (1e-3 relative noise), wrong sigma in the
    backward (row softmax's derivative). One program for all four."""
    A, B = params["A"], params["B"]
    U = jnp.eye(M, dtype=A.dtype) - GAMMA * column_softmax(A)
    W = jnp.linalg.solve(U.T, B.T).T
    G = (phi @ W.T - y).T @ phi / phi.shape[0]
    GUt = jnp.linalg.solve(U, G.T).T  # the exact dL/dB
    gA = jax.vjp(column_softmax, A)[1](GAMMA * W.T @ GUt)[0]
    return {
        "exact": (gA, GUt),
        "one_step": (jax.vjp(column_softmax, A)[1](GAMMA * W.T @ G)[0], G),
        "perturbed": (gA * (1 + 1e-3 * noise[0]), GUt * (1 + 1e-3 * noise[1, :M_Y])),
        "wrong_sigma": (jax.vjp(row_softmax, A)[1](GAMMA * W.T @ GUt)[0], GUt),
    }


def train_path(kind, steps=4, eta=0.005):
    """A few GD steps on (A, B) with the given gradient: the params before each step, W after it and G at W_t."""
    params, phi, y = problem(8, a_scale=0.5)
    A, B = (np.asarray(params[k]) for k in ("A", "B"))
    As, Bs, W_next, G = [], [], [], []
    for _ in range(steps):
        gA, gB = gradients({"A": A, "B": B}, phi, y, NOISE)[kind]
        As.append(A), Bs.append(B)
        G.append(np.asarray(theory.square_loss_gradient(theory.end_to_end(A, B, GAMMA), phi, y)))
        A, B = A - eta * np.asarray(gA), B - eta * np.asarray(gB)
        W_next.append(np.asarray(theory.end_to_end(A, B, GAMMA)))
    return {"A": np.stack(As), "B": np.stack(Bs)}, np.stack(W_next), np.stack(G), eta


def test_w_path_prediction_separates_the_exact_gradient_from_wrong_ones():
    results = {}
    for kind in ("exact", "one_step", "perturbed", "wrong_sigma"):
        params, W_next, G, eta = train_path(kind)
        c = theory.w_step_check(params, W_next, G, eta, GAMMA, rtol=tol(1e-9, 1e-4))
        assert c["step_error"].shape == (4,)
        results[kind] = float(jnp.max(c["step_error"]))
        # the O(eta^2) remainder of the first-order form, exactly and to leading order
        np.testing.assert_allclose(np.asarray(c["second_order_term"]), np.asarray(c["remainder"]), rtol=0.05)
        assert float(jnp.max(c["remainder"])) < 1e-2
        if kind == "exact":
            assert bool(jnp.all(c["consistent"]))
            # the trained step misses the first-order prediction by exactly the remainder, and the exact step by
            # rounding only
            np.testing.assert_allclose(
                np.asarray(c["first_order_error"]), np.asarray(c["remainder"]), rtol=tol(1e-6, 0.2)
            )
            assert results[kind] <= float(jnp.max(c["tolerance"]))
            # one step at a time (A of shape (m, m)) gives what the batched call gives for that step
            one = theory.w_step_check(
                {"A": params["A"][1], "B": params["B"][1]}, W_next[1], G[1], eta, GAMMA, rtol=tol(1e-9, 1e-4)
            )
            for key in ("step_error", "remainder", "first_order_error", "predicted_step"):
                assert float(one[key]) == pytest.approx(float(c[key][1]), rel=tol(1e-9, 1e-4)), key
        else:
            assert not bool(jnp.any(c["consistent"])), kind
    # orders of magnitude: the one-step gradient misses by O(1), a wrong sigma by O(0.1), 1e-3 noise by ~1e-3
    assert results["one_step"] > 0.1 and results["wrong_sigma"] > 1e-2 and results["perturbed"] > 1e-4
    assert results["one_step"] > tol(1e8, 1e2) * results["exact"]
    assert results["perturbed"] > tol(1e5, 1.0) * results["exact"]


def test_predict_w_step_orders():
    params, phi, y = problem(9, a_scale=0.5)
    W = theory.end_to_end(params["A"], params["B"], GAMMA)
    G = theory.square_loss_gradient(W, phi, y)
    g = theory.parameter_gradient(params, G, GAMMA)
    errors = {}
    for eta in (0.004, 0.002):
        truth = theory.end_to_end(params["A"] - eta * g["A"], params["B"] - eta * g["B"], GAMMA)
        first = theory.predict_w_step(params, G, eta, GAMMA, order=1)
        np.testing.assert_allclose(
            np.asarray(first),
            np.asarray(W - eta * theory.induced_preconditioner(params, G, GAMMA)),
            rtol=tol(1e-12, 1e-5),
            atol=tol(1e-14, 1e-6),
        )
        second = theory.predict_w_step(params, G, eta, GAMMA)
        errors[eta] = (rel(first, truth), rel(second, truth))
    if X64:  # halving eta: the first-order error falls 4x (eta^2), the second-order error 8x (eta^3)
        assert 3.5 < errors[0.004][0] / errors[0.002][0] < 4.5
        assert 7.0 < errors[0.004][1] / errors[0.002][1] < 9.0
    assert errors[0.002][1] < errors[0.002][0] * tol(1e-2, 1.0)


def test_w_step_check_errors():
    params, phi, y = problem(0)
    G = jnp.ones((M_Y, M), DT)
    with pytest.raises(ValueError, match=r"W_next must have shape \(3, 6\)"):
        theory.w_step_check(params, jnp.ones((M, M_Y), DT), G, 0.1, GAMMA)
    with pytest.raises(ValueError, match="learning_rate must be a positive number"):
        theory.w_step_check(params, G, G, 0.0, GAMMA)
    with pytest.raises(ValueError, match=r"B must have shape \(2, \*, 6\)"):
        theory.w_step_check({"A": jnp.stack([params["A"]] * 2), "B": params["B"]}, G, G, 0.1, GAMMA)
    with pytest.raises(ValueError, match="unknown order"):
        theory.predict_w_step(params, G, 0.1, GAMMA, order=3)
    W = theory.end_to_end(params["A"], params["B"], GAMMA)
    with pytest.raises(TypeError, match="W_next must be a floating-point array"):
        theory.w_step_check(params, jnp.ones((M_Y, M), jnp.int32), G, 0.1, GAMMA)
    with pytest.raises(ValueError, match=r"G must have shape \(3, 6\).*G = dL/dW at W_t, shaped like B"):
        theory.w_step_check(params, W, jnp.ones((M, M_Y), DT), 0.1, GAMMA)
    with pytest.raises(ValueError, match=r"y must have shape \(\*, 3\).*y's columns are the outputs m_y = 3"):
        theory.trust_region_check(params, phi, y[:, :2], 0.1, GAMMA)


def test_parameter_gradient_is_the_chain_rule_of_section_3():
    """theory.parameter_gradient against this file's own closed form (the "exact" training gradient below); both are
    checked against the DELM model's autodiff in test_theory.py."""
    params, phi, y = problem(7, a_scale=1.5)
    W = theory.end_to_end(params["A"], params["B"], GAMMA)
    g = theory.parameter_gradient(params, theory.square_loss_gradient(W, phi, y), GAMMA)
    gA, gB = gradients(params, phi, y, NOISE)["exact"]
    assert rel(g["A"], gA) < tol(1e-12, 1e-5) and rel(g["B"], gB) < tol(1e-12, 1e-5)
