"""LU-preconditioned refinement: the permuted triangular solves, and a stopping rule that ignores the start."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq_jax import DELM, Refine, make_step
from deq_jax import refine as R
from helpers import delm_problem, u_matrix

pytestmark = pytest.mark.float32  # the whole file also runs with x64 off (float32), as users run JAX

X64 = jax.config.read("jax_enable_x64")
# solves of a matrix with condition number ~10: rounding only
DTYPE, EPS = (jnp.float64, 1e-13) if X64 else (jnp.float32, 1e-5)


def test_right_solve_both_ways_against_numpy():
    A, B, _, _ = delm_problem(DTYPE)
    U = u_matrix(A)
    factors = R.factor(U)
    X = R.right_solve(factors, B)  # X U = B
    Y = R.right_solve(factors, B, transpose=True)  # Y U^T = B
    Un, Bn = np.asarray(U, np.float64), np.asarray(B, np.float64)
    np.testing.assert_allclose(X, np.linalg.solve(Un.T, Bn.T).T, rtol=EPS, atol=EPS)
    np.testing.assert_allclose(Y, np.linalg.solve(Un, Bn.T).T, rtol=EPS, atol=EPS)


def test_refine_converges_with_stale_factors_and_judges_the_returned_value_only():
    A, B, _, _ = delm_problem(DTYPE)
    tol = 1e-12 if X64 else 1e-6
    U_old, U = u_matrix(A), u_matrix(A * 1.05)  # factors of a neighbouring U: a preconditioner, not the inverse
    factors = R.factor(U_old)
    times_U = lambda X: X @ U
    W = np.linalg.solve(np.asarray(U, np.float64).T, np.asarray(B, np.float64).T).T
    out = R.refine(times_U, B, None, factors, transpose=False, tol=tol, atol=0.0, max_sweeps=50)
    assert 1 < int(out.sweeps) < 50  # stale factors: more than one sweep, far fewer than the cap
    np.testing.assert_allclose(out.value, W, rtol=100 * tol)  # x cond(U) ~ 10
    assert float(out.residual) <= tol * float(out.scale)
    # started at the solution: no sweep needed, and that is judged on the value, not on the start
    at_solution = R.refine(times_U, B, out.value, factors, transpose=False, tol=tol, atol=0.0, max_sweeps=50)
    assert int(at_solution.sweeps) == 0
    # started far away with a cap of one sweep: the residual says it is not there
    far = R.refine(times_U, B, 1e6 * jnp.ones_like(B), factors, transpose=False, tol=tol, atol=0.0, max_sweeps=1)
    assert not bool(R.converged(far.residual, far.scale, tol, 0.0))
    nan = R.refine(times_U, B, jnp.full_like(B, jnp.nan), factors, transpose=False, tol=tol, atol=0.0, max_sweeps=3)
    assert not bool(R.converged(nan.residual, nan.scale, tol, 0.0))


def test_refine_options_are_checked():
    with pytest.raises(ValueError, match="Refine.max_sweeps must be a positive integer; got 0"):
        Refine(max_sweeps=0)
    with pytest.raises(ValueError, match="Refine.refactor_after must be a positive integer; got 1.5"):
        Refine(refactor_after=1.5)


def test_a_diverged_refined_run_never_reports_converged():
    """A step size far too large: the loss and W run to inf/NaN; `inf <= tol * inf` must not pass for convergence."""
    assert not bool(R.converged(jnp.inf, jnp.inf, 1e-5, 0.0))
    assert not bool(R.converged(jnp.nan, 1.0, 1e-5, 0.0))
    assert bool(R.converged(1e-7, 1.0, 1e-5, 0.0))
    model = DELM(16, 3, gamma=0.9, solver="refine")
    phi = jax.random.uniform(jax.random.PRNGKey(1), (64, 16), DTYPE)
    y = jax.nn.one_hot(jnp.arange(64) % 3, 3, dtype=DTYPE)
    step = make_step(model, "square", learning_rate=50.0)
    state = step.init(model.init(jax.random.PRNGKey(0), DTYPE), phi)
    for _ in range(60):  # float32 overflows within ~12 steps, float64 within ~25
        state, metrics = step.update(state, phi, y)
        if not np.isfinite(float(metrics["loss"])):
            break
    assert not np.isfinite(float(metrics["loss"])) and not bool(metrics["converged"])
