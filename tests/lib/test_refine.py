"""LU-preconditioned refinement: the permuted triangular solves, and a stopping rule that ignores the start."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq_jax import Refine
from deq_jax import refine as R
from helpers import delm_problem, u_matrix

requires_x64 = pytest.mark.skipif(not jax.config.read("jax_enable_x64"), reason="float64 reference needs x64")


@requires_x64
def test_right_solve_both_ways_against_numpy():
    A, B, _, _ = delm_problem(jnp.float64)
    U = u_matrix(A)
    factors = R.factor(U)
    X = R.right_solve(factors, B)  # X U = B
    Y = R.right_solve(factors, B, transpose=True)  # Y U^T = B
    Un = np.asarray(U)
    # float64 solves of a matrix with condition number ~10: 1e-13 leaves room for rounding only
    np.testing.assert_allclose(X, np.linalg.solve(Un.T, np.asarray(B).T).T, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(Y, np.linalg.solve(Un, np.asarray(B).T).T, rtol=1e-13, atol=1e-14)


@requires_x64
def test_refine_converges_with_stale_factors_and_judges_the_returned_value_only():
    A, B, _, _ = delm_problem(jnp.float64)
    U_old, U = u_matrix(A), u_matrix(A * 1.05)  # factors of a neighbouring U: a preconditioner, not the inverse
    factors = R.factor(U_old)
    times_U = lambda X: X @ U
    W = np.linalg.solve(np.asarray(U).T, np.asarray(B).T).T
    out = R.refine(times_U, B, None, factors, transpose=False, tol=1e-12, atol=0.0, max_sweeps=50)
    assert 1 < int(out.sweeps) < 50  # stale factors: more than one sweep, far fewer than the cap
    np.testing.assert_allclose(out.value, W, rtol=1e-10)
    assert float(out.residual) <= 1e-12 * float(out.scale)
    # started at the solution: no sweep needed, and that is judged on the value, not on the start
    at_solution = R.refine(times_U, B, jnp.asarray(W), factors, transpose=False, tol=1e-12, atol=0.0, max_sweeps=50)
    assert int(at_solution.sweeps) == 0
    # started far away with a cap of one sweep: the residual says it is not there
    far = R.refine(times_U, B, 1e6 * jnp.ones_like(B), factors, transpose=False, tol=1e-12, atol=0.0, max_sweeps=1)
    assert not bool(R.converged(far.residual, far.scale, 1e-12, 0.0))
    nan = R.refine(times_U, B, jnp.full_like(B, jnp.nan), factors, transpose=False, tol=1e-12, atol=0.0,
                   max_sweeps=3)
    assert not bool(R.converged(nan.residual, nan.scale, 1e-12, 0.0))


def test_refine_options_are_checked():
    with pytest.raises(ValueError, match="Refine.max_sweeps must be a positive integer; got 0"):
        Refine(max_sweeps=0)
    with pytest.raises(ValueError, match="Refine.refactor_after must be a positive integer; got 1.5"):
        Refine(refactor_after=1.5)
