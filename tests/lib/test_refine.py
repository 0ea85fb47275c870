"""LU-preconditioned refinement (`Refine`): the permuted triangular solves, a stopping rule that ignores the start,
and the refactorisation policy, counted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import GAMMA, delm_problem, u_matrix

from deq_jax import DELM, DELMTransposedMap, Refine, make_step, solve
from deq_jax._rule import holds
from deq_jax._solver._lu import factor, right_solve
from deq_jax._solver.refine import RefineState

pytestmark = pytest.mark.float32  # the whole file also runs with x64 off (float32), as users run JAX

X64 = jax.config.read("jax_enable_x64")
# solves of a matrix with condition number ~10: rounding only
DTYPE, EPS = (jnp.float64, 1e-13) if X64 else (jnp.float32, 1e-5)
TOL = 1e-12 if X64 else 1e-6


def test_right_solve_both_ways_against_numpy():
    A, B, _, _ = delm_problem(DTYPE)
    U = u_matrix(A)
    factors = factor(U)
    X = right_solve(factors, B)  # X U = B
    Y = right_solve(factors, B, transpose=True)  # Y U^T = B
    Un, Bn = np.asarray(U, np.float64), np.asarray(B, np.float64)
    np.testing.assert_allclose(X, np.linalg.solve(Un.T, Bn.T).T, rtol=EPS, atol=EPS)
    np.testing.assert_allclose(Y, np.linalg.solve(Un, Bn.T).T, rtol=EPS, atol=EPS)
    np.testing.assert_allclose(right_solve(factors, B[0]), X[0], rtol=EPS, atol=EPS)  # one right-hand side


def _refined(A, B, start, state, maxiter=50, refine=None):
    """`W U = B` (the transposed DELM map, K = U) by `Refine` from `start`, with the carried `state`."""
    refine = Refine(max_sweeps=50) if refine is None else refine
    return solve(
        DELMTransposedMap(GAMMA), start, {"A": A}, B, solver=refine, tol=TOL, maxiter=maxiter, solver_state=state
    )


def test_refine_converges_with_stale_factors_and_judges_the_returned_value_only():
    A, B, _, _ = delm_problem(DTYPE)
    stale = RefineState(factor(u_matrix(A)), jnp.asarray(False))  # factors of a neighbouring U: a preconditioner
    A_new = A * 1.05
    W = np.linalg.solve(np.asarray(u_matrix(A_new), np.float64).T, np.asarray(B, np.float64).T).T
    run = jax.jit(_refined, static_argnums=(4, 5))
    out = run(A_new, B, jnp.zeros_like(B), stale, 50)
    assert 1 < int(out.stats.iterations) < 50 and int(out.stats.factorisations) == 0  # more than one sweep
    np.testing.assert_allclose(out.value, W, rtol=100 * TOL)  # x cond(U) ~ 10
    assert bool(out.stats.converged) and float(out.stats.relative_residual) <= TOL
    # started at the solution: no sweep needed, and that is judged on the value, not on the start
    assert int(run(A_new, B, out.value, stale, 50).stats.iterations) == 0
    # started far away with a cap of one sweep: the residual says it is not there
    far = run(A_new, B, 1e6 * jnp.ones_like(B), stale, 1)
    assert not bool(far.stats.converged) and int(far.result) != 0
    nan = run(A_new, B, jnp.full_like(B, jnp.nan), stale, 3)
    assert not bool(nan.stats.converged) and bool(nan.stats.diverged)


def test_refactorisation_policy_is_counted():
    """A solve that needed more than `refactor_after` sweeps marks its factors stale, and the next solve factorises
    first (one factorisation, then at most a sweep or two); a solve within `refactor_after` sweeps does not; a solve
    that stalls at `max_sweeps` factorises in the middle and still converges."""
    A, B, _, _ = delm_problem(DTYPE)
    fresh = RefineState(factor(u_matrix(A)), jnp.asarray(False))
    slow = Refine(max_sweeps=50, refactor_after=1)
    run = jax.jit(_refined, static_argnums=(4, 5))
    first = run(A * 1.05, B, jnp.zeros_like(B), fresh, 50, slow)  # stale factors: several sweeps, not a stall
    assert 1 < int(first.stats.iterations) < 50 and int(first.stats.factorisations) == 0
    assert bool(first.state.stale)
    second = run(A * 1.05, B, jnp.zeros_like(B), first.state, 50, slow)
    assert int(second.stats.factorisations) == 1 and int(second.stats.iterations) <= 2 and not bool(second.state.stale)
    third = run(A * 1.05, B, second.value, second.state, 50, slow)  # fresh factors, warm start: nothing to do
    assert int(third.stats.factorisations) == 0 and int(third.stats.iterations) == 0
    # a stall: the identity's factors contract by gamma only; after max_sweeps = 2 the current K is factorised
    identity = RefineState(factor(jnp.eye(7, dtype=DTYPE)), jnp.asarray(False))
    stalled = run(A, B, jnp.zeros_like(B), identity, 50, Refine(max_sweeps=2, refactor_after=1))
    assert bool(stalled.stats.converged) and int(stalled.stats.factorisations) == 1
    assert 2 < int(stalled.stats.iterations) <= 5
    np.testing.assert_allclose(stalled.state.factors.lu, factor(u_matrix(A)).lu, rtol=EPS, atol=EPS)


def test_refine_without_carried_state_unrolled_is_the_exact_solve():
    """`Refine` with `Unrolled` (nothing carried): plain autodiff through the LU solve, the closed form's gradient."""
    A, B, _, _ = delm_problem(DTYPE)

    def loss(A, B, solver):
        W = solve(DELMTransposedMap(GAMMA), jnp.zeros_like(B), {"A": A}, B, solver=solver, backward="unrolled").value
        return jnp.sum(jnp.sin(W))

    def reference(A, B):
        return jnp.sum(jnp.sin(jnp.linalg.solve(u_matrix(A).T, B.T).T))

    got = jax.grad(loss, argnums=(0, 1))(A, B, Refine())
    want = jax.grad(reference, argnums=(0, 1))(A, B)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=100 * EPS, atol=100 * EPS)


def test_refine_options_are_checked():
    with pytest.raises(ValueError, match=r"Refine\.max_sweeps must be a positive integer; got 0"):
        Refine(max_sweeps=0)
    with pytest.raises(ValueError, match=r"Refine\.refactor_after must be a positive integer; got 1\.5"):
        Refine(refactor_after=1.5)


def test_a_diverged_refined_run_never_reports_converged():
    """A step size far too large: the loss and W run to inf/NaN; `inf <= tol * inf` must not pass for convergence."""
    assert not bool(holds(jnp.inf, jnp.inf, 1e-5, 0.0))
    assert not bool(holds(jnp.nan, 1.0, 1e-5, 0.0))
    assert bool(holds(1e-7, 1.0, 1e-5, 0.0))
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
