"""deq_jax.theory, sections 4 and 9: the per-step rate bound on a GD run (NumPy float64 GD with the gradients of
section 3, and the library's training path), its broadcasting, and the log-linear fit of a measured gap over an
explicit window. Runs with x64 on (float64) and off (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from theory_helpers import F64, GAMMA, SLOW, _precision_warnings_expected, _slow_only_when_selected, problem, tol  # noqa: F401 (autouse fixtures)

from deq_jax import theory
from deq_jax.models import DELM

# ----------------------------------------------------------------------------- rate bound (sections 4 and 9)


def rate_problem():
    _, phi, y = problem(seed=12)
    return (phi - phi.mean(0)) / phi.std(0), y


def numpy_gd(params, phi, y, eta, steps=150):
    """Full-batch GD on the DELM in NumPy float64 with the gradients of docs/theory.md section 3 (an implementation
    independent of the library): the losses and A_t before each step."""
    A, B = (np.asarray(params[k], np.float64) for k in ("A", "B"))
    phi, y = np.asarray(phi, np.float64), np.asarray(y, np.float64)
    losses, A_history = [], []
    for _ in range(steps):
        S = np.exp(A - A.max(axis=0))
        S /= S.sum(axis=0)
        U = np.eye(len(A)) - GAMMA * S
        W = np.linalg.solve(U.T, B.T).T
        R = phi @ W.T - y
        losses.append(0.5 * np.mean(np.sum(R * R, axis=1)))
        A_history.append(A)
        GUt = np.linalg.solve(U, (R.T @ phi / len(phi)).T).T  # dL/dB = G U^{-T}
        D = GAMMA * W.T @ GUt  # dL/dsigma(A)
        A, B = A - eta * S * (D - np.sum(S * D, axis=0)), B - eta * GUt  # column-softmax vjp
    return np.array(losses), jnp.asarray(np.stack(A_history), F64)


def check_rate_bound(losses, A_history, phi, y, eta):
    spec = theory.feature_spectrum(phi)
    _, L_star = theory.shallow_optimum_square(phi, y)
    norms = theory.u_norms(A_history, GAMMA)  # batched over the run's history
    u_norms = np.asarray(norms["U_norm2"])
    for t in (0, len(u_norms) - 1):  # against NumPy float64
        U = np.asarray(theory.u_matrix(A_history[t], GAMMA), np.float64)
        assert abs(u_norms[t] - np.linalg.norm(U, 2)) < tol(1e-12, 1e-5) * u_norms[t]
        inv = np.linalg.norm(np.linalg.inv(U), 2)
        assert abs(float(norms["U_inv_norm2"][t]) - inv) < tol(1e-11, 1e-4) * inv
    gaps = np.asarray(losses, np.float64) - float(L_star)
    assert gaps[-1] < 0.1 * gaps[0] and np.all(gaps > 0)
    ratios = gaps[1:] / gaps[:-1]
    bound = np.asarray(theory.gd_rate_bound(eta, spec["lambda_min_plus"], u_norms[:-1]))
    assert bound.shape == (len(gaps) - 1,) and np.all((bound > 0) & (bound < 1))
    # float32: a gap of 1e-1 relative carries ~1e-6 / gap relative rounding: each ratio is known to ~1e-5
    assert np.max(ratios - bound) <= tol(0.0, 1e-4)
    # the bound along the run
    along = np.asarray(theory.flow_bound(gaps[0], spec["lambda_min_plus"], u_norms, eta))
    assert along.shape == gaps.shape and along[0] == pytest.approx(gaps[0], rel=tol(1e-15, 1e-6))
    assert np.all(gaps <= along * (1 + tol(1e-12, 1e-3)))
    # with lambda_max in place of lambda_min^+ the "bound" is violated: the check can fail
    wrong = np.asarray(theory.gd_rate_bound(eta, spec["lambda_max"], u_norms[:-1]))
    assert np.max(ratios - wrong) > 1e-3


def test_gd_rate_bound_holds_on_a_delm_run():
    """The per-step form of section 4 on a GD run from the DELM's init, at the justified step size."""
    phi, y = rate_problem()
    rng = np.random.default_rng(13)  # the DELM's init scale: A, B ~ 0.1 N(0, 1)
    params = {
        "A": jnp.asarray(0.1 * rng.standard_normal((6, 6)), F64),
        "B": jnp.asarray(0.1 * rng.standard_normal((3, 6)), F64),
    }
    eta = float(
        theory.learning_rate_limit(
            theory.feature_spectrum(phi)["lambda_max"],
            theory.u_inverse_norm(params["A"], GAMMA),
            theory.spectral_norm(theory.end_to_end(params["A"], params["B"], GAMMA)),
            GAMMA,
        )
    )
    losses, A_history = numpy_gd(params, phi, y, eta)
    check_rate_bound(losses, A_history, phi, y, eta)


@SLOW
def test_gd_rate_bound_holds_on_the_library_training_path():
    """The same through the library's make_step (a Python loop) and full_batch_gd (one lax.scan)."""
    from deq_jax import full_batch_gd, make_step

    phi, y = rate_problem()
    model = DELM(width=6, out_dim=3, gamma=GAMMA, tol=tol(1e-12, 1e-6))
    params = model.init(jax.random.PRNGKey(13), F64)
    eta = float(
        theory.learning_rate_limit(
            theory.feature_spectrum(phi)["lambda_max"],
            theory.u_inverse_norm(params["A"], GAMMA),
            theory.spectral_norm(model.end_to_end(params)),
            GAMMA,
        )
    )
    step = make_step(model, "square", optax.sgd(eta))
    p, opt_state = params, optax.sgd(eta).init(params)
    losses, a_history = [], []
    for _ in range(150):
        a_history.append(p["A"])  # A_t before step t: the U_t of that step's bound
        p, opt_state, metrics = step(p, opt_state, phi, y)
        losses.append(float(metrics["loss"]))
    _, history = full_batch_gd(model, "square", params, phi, y, learning_rate=eta, steps=150)
    np.testing.assert_allclose(np.asarray(history["loss"]), losses, rtol=tol(1e-12, 1e-5))
    check_rate_bound(np.array(losses), jnp.stack(a_history), phi, y, eta)


def test_gd_rate_bound_broadcasts():
    b = theory.gd_rate_bound(0.1, 0.5, jnp.array([1.0, 2.0], F64))
    np.testing.assert_allclose(np.asarray(b), [1 - 0.1, 1 - 0.1 / 4], rtol=tol(1e-15, 1e-7))
    b2 = theory.gd_rate_bound(jnp.array([[0.1], [0.2]], F64), 0.5, jnp.array([1.0, 2.0], F64))
    assert b2.shape == (2, 2)
    np.testing.assert_allclose(
        np.asarray(theory.flow_bound(2.0, 0.5, jnp.array([1.0, 1.0, 1.0], F64), 0.1)),
        [2.0, 1.8, 1.62],
        rtol=tol(1e-14, 1e-6),
    )


# ----------------------------------------------------------------------------- log-linear fit


def test_fit_log_linear_recovers_geometric_rate():
    gaps = 3.0 * 0.97 ** np.arange(200)
    fit = theory.fit_log_linear(gaps)
    assert abs(fit["rate"] - 0.97) < 1e-12 and fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit["window"] == (0, 200) and fit["points"] == 200
    fit = theory.fit_log_linear(gaps, start=10, stop=50)
    assert fit["window"] == (10, 50) and abs(fit["rate"] - 0.97) < 1e-12
    # logged every 5 steps
    fit = theory.fit_log_linear(gaps[::5], steps=np.arange(0, 200, 5))
    assert abs(fit["rate"] - 0.97) < 1e-12


def test_fit_log_linear_band_selects_the_tail():
    # a fast transient (rate 0.5) down to 1e-2, then rate 0.9 down to a rounding floor of zeros
    head = 1.0 * 0.5 ** np.arange(7)  # 1 ... 0.0156
    tail = 1e-2 * 0.9 ** np.arange(200)  # 1e-2 ... 7e-12
    gaps = np.concatenate([head, tail, np.zeros(5), [1e-3]])
    fit = theory.fit_log_linear(gaps, lo=1e-9, hi=1e-2)
    i0, i1 = fit["window"]
    assert np.all(gaps[i0:i1] < 1e-2) and np.all(gaps[i0:i1] > 1e-9)
    assert i0 == 8 and gaps[i1] <= 1e-9  # first index below hi; stops at the first gap <= lo
    assert abs(fit["rate"] - 0.9) < 1e-12 and fit["r2"] > 1 - 1e-12
    whole = theory.fit_log_linear(gaps, stop=7 + 200)
    assert whole["r2"] < fit["r2"] and abs(whole["rate"] - 0.9) > 1e-3
    with pytest.raises(ValueError, match="at least 3"):
        theory.fit_log_linear(gaps, lo=1e-3, hi=1.1e-3)
    with pytest.raises(ValueError, match="lo < hi"):
        theory.fit_log_linear(gaps, lo=1e-2, hi=1e-9)
