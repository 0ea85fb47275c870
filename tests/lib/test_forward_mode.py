"""Forward mode and higher orders through the implicit solve, the backward's honesty about the forward solve, and
per-sample solves that are independent: each attacked against closed forms, finite differences and clean twins."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, GAMMA, X64, closed_form_loss, delm_problem, rel_err, requires_x64

from deq_jax import DELMMap, Implicit, NonConvergenceWarning, Result, solve, value_and_grad

TOL = 1e-12 if X64 else 1e-6
RTOL = 1e-9 if X64 else 1e-4
SOLVERS = ["anderson", "fixed_point", "relaxed", "broyden", "direct", "refine"]


def delm_loss(solver, backward=None, tol=TOL, maxiter=600, gamma=GAMMA):
    """The DELM's square loss through `solve` (per sample, batch_axis=0)."""
    _, B, phi, y = delm_problem(DTYPE)

    def loss(A, phi=phi):
        sol = solve(
            DELMMap(gamma),
            jnp.zeros_like(phi),
            {"A": A},
            phi,
            solver=solver,
            tol=tol,
            maxiter=maxiter,
            backward=backward or Implicit(),
            batch_axis=0,
        )
        return 0.5 * jnp.mean(jnp.sum((sol.value @ B.T - y) ** 2, axis=1))

    return loss


@pytest.mark.float32
@pytest.mark.parametrize("solver", SOLVERS)
def test_jvp_equals_the_closed_form_directional_derivative(solver):
    """jax.jvp through the implicit solve (every solver, its default backward linear solver) equals the closed
    form's gradient along a random direction, to the solve's tolerance."""
    A, B, phi, y = delm_problem(DTYPE)
    direction = jax.random.normal(jax.random.PRNGKey(5), A.shape, DTYPE)
    _, tangent = jax.jit(lambda A, d: jax.jvp(delm_loss(solver), (A,), (d,)))(A, direction)
    ref = jnp.vdot(jax.grad(closed_form_loss)(A, B, phi, y), direction)
    assert rel_err(tangent, ref) <= RTOL


@pytest.mark.parametrize("linear_solver", ["gmres", "bicgstab", "lu", "forward"])
def test_jacfwd_equals_jacrev(linear_solver):
    """Forward and reverse mode agree for every backward linear solver (the reverse one is JAX's transpose of the
    forward one: both measured)."""
    A, _, phi, _ = delm_problem(DTYPE)
    z = lambda phi: solve(
        DELMMap(GAMMA), jnp.zeros_like(phi), {"A": A}, phi, tol=TOL, backward=Implicit(linear_solver), batch_axis=0
    ).value[:3]
    fwd, rev = jax.jacfwd(z)(phi), jax.jacrev(z)(phi)
    assert rel_err(fwd, rev) <= RTOL


@requires_x64
@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_hessian_and_grad_of_grad_match_finite_differences(solver):
    """Second order through a nonlinear DEQ: jax.hessian (forward over reverse) and jax.grad(jax.grad(.)) (reverse
    over reverse) against central differences of the gradient in float64 (step 1e-5: error ~1e-10 by Taylor)."""
    W = 0.3 * jax.random.normal(jax.random.PRNGKey(0), (4, 4))
    f = lambda z, W, x: jnp.tanh(z @ W.T + x)

    def loss(x):
        z = solve(f, jnp.zeros_like(x), W, x, solver=solver, tol=1e-13, maxiter=500, batch_axis=0).value
        return jnp.sum(z**2) + jnp.sum(jnp.sin(z))

    x = jnp.arange(8.0).reshape(2, 4) / 8
    hessian = jax.hessian(loss)(x).reshape(8, 8)
    grad = jax.grad(loss)
    e = 1e-5
    basis = jnp.eye(8).reshape(8, 2, 4)
    fd = jnp.stack([(grad(x + e * d) - grad(x - e * d)).ravel() / (2 * e) for d in basis])
    assert float(jnp.max(jnp.abs(hessian - fd))) <= 1e-8
    assert rel_err(hessian, hessian.T) <= 1e-10  # symmetric, as a Hessian is
    grad_of_grad = jax.grad(lambda x: jnp.sum(grad(x) * jnp.arange(8.0).reshape(2, 4)))(x)
    assert rel_err(grad_of_grad.ravel(), hessian @ jnp.arange(8.0)) <= 1e-10


@pytest.mark.float32
def test_forward_mode_reports_its_failed_solve():
    """A starved tangent solve in forward mode is loud, as the backward's is in reverse mode."""
    A, *_ = delm_problem(DTYPE)
    loss = delm_loss("fixed_point", Implicit("bicgstab", maxiter=1))
    with pytest.raises(Exception, match="did not solve"):
        jax.block_until_ready(jax.jit(lambda A: jax.jvp(loss, (A,), (jnp.ones_like(A),)))(A))


def unconverged_loss(backward):
    """The measured case: 3 fixed-point steps at gamma 0.99, far from the equilibrium."""
    return delm_loss("fixed_point", backward, tol=1e-6, maxiter=3, gamma=0.99)


@pytest.mark.float32
def test_a_gradient_through_an_unconverged_forward_solve_is_refused_or_counted():
    """The repro: after 3 steps the implicit gradient was 99.6% off with every backward statistic clean. Now plain
    jax.grad (and jax.jvp) raise, value_and_grad counts it, and the opt-outs give the approximate gradient."""
    A, B, phi, y = delm_problem(DTYPE)
    for transform in (jax.grad, lambda f: lambda A: jax.jvp(f, (A,), (jnp.ones_like(A),))):
        with pytest.raises(Exception, match="did not converge"):
            jax.block_until_ready(jax.jit(transform(unconverged_loss(None)))(A))
    _, g, stats = jax.jit(value_and_grad(unconverged_loss(None)))(A)
    assert int(stats.unconverged_forward) == 1 and int(stats.failures) == 0
    exact = jax.grad(lambda A: closed_form_loss(A, B, phi, y, gamma=0.99))(A)
    assert rel_err(g, exact) > 0.1  # the gradient it flags is really wrong
    quiet = jax.grad(unconverged_loss(Implicit(unconverged_forward="ignore")))(A)
    assert rel_err(quiet, g) <= RTOL
    with pytest.warns(NonConvergenceWarning, match="did not converge"):
        jax.block_until_ready(jax.grad(unconverged_loss(Implicit(unconverged_forward="warn")))(A))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, clean = value_and_grad(delm_loss("fixed_point", tol=1e-6))(A)
    assert int(clean.unconverged_forward) == 0 and int(clean.solves) == 1


def batch_with_a_bad_sample(bad):
    A, _, phi, _ = delm_problem(DTYPE, n=32)
    return A, phi, phi.at[3].set(bad)


@pytest.mark.float32
@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "relaxed", "refine", "direct"])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_one_bad_sample_never_changes_another(solver, bad):
    """Under jit, a batch of 32 with one NaN (or infinite) sample: every other sample iterates to its own equilibrium,
    exactly as in the clean batch; the batch and the bad sample are flagged, the others are not."""
    A, clean, dirty = batch_with_a_bad_sample(bad)
    tol = TOL if X64 else 1e-5  # float32: relaxed steps end a little above 1e-6 from rounding alone
    run = jax.jit(
        lambda phi: solve(
            DELMMap(0.95), jnp.zeros_like(phi), {"A": A}, phi, solver=solver, tol=tol, maxiter=2000, batch_axis=0
        )
    )
    good, bad_run = run(clean), run(dirty)
    others = np.arange(32) != 3
    assert bool(good.stats.converged) and not bool(bad_run.stats.converged)
    assert np.array_equal(np.asarray(bad_run.samples.converged), others)
    assert int(bad_run.samples.result[3]) != Result.successful
    np.testing.assert_allclose(bad_run.value[others], good.value[others], rtol=0, atol=10 * tol)
    if solver not in ("refine", "direct"):  # they move every sample together
        np.testing.assert_array_equal(bad_run.samples.iterations[others], good.samples.iterations[others])


@pytest.mark.parametrize("solver", ["anderson", "fixed_point"])
def test_per_sample_statistics_equal_vmapped_solves(solver):
    """Solution.samples (one batched solve) says what a vmap of single-sample solves says, per sample (in float64:
    in float32 a batched and a single matmul round differently, which can move a sample's count by one)."""
    A, _, phi, _ = delm_problem(DTYPE, n=16)
    phi = phi * jnp.logspace(-2, 2, 16, dtype=DTYPE)[:, None]  # samples of very different scales
    args = dict(solver=solver, tol=1e-8 if X64 else 1e-5, maxiter=300)
    batched = solve(DELMMap(0.9), jnp.zeros_like(phi), {"A": A}, phi, batch_axis=0, **args)
    single = jax.vmap(lambda p: solve(DELMMap(0.9), jnp.zeros_like(p), {"A": A}, p, **args))(phi)
    np.testing.assert_array_equal(batched.samples.iterations, single.stats.iterations)
    np.testing.assert_array_equal(batched.samples.converged, single.stats.converged)
    np.testing.assert_allclose(batched.samples.relative_residual, single.stats.relative_residual, rtol=1e-3)
    assert int(batched.stats.iterations) == int(jnp.max(single.stats.iterations))
    assert float(batched.stats.relative_residual) == pytest.approx(float(jnp.max(single.stats.relative_residual)))


def test_backward_iterations_are_reported():
    """The backward solve's own steps reach BackwardStats (the "forward" route counts them)."""
    A, *_ = delm_problem(DTYPE)
    _, _, stats = value_and_grad(delm_loss("anderson", Implicit("forward")))(A)
    assert int(stats.iterations) > 0 and int(stats.failures) == 0
