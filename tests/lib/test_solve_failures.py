"""Failure is never silent: backward solves that fail are loud (an error, or BackwardStats inside
deq_jax.value_and_grad and make_step's metrics); divergence upstream is data, not an error, so one diverged
configuration of a vmapped sweep does not stop the others; one bad sample in a batch is seen; a diverged iterate
never passes for an equilibrium."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import DTYPE, GAMMA, closed_form_equilibrium, closed_form_loss, delm_problem, rel_err

from deq_jax import DELM, DELMMap, Implicit, make_step, solve, value_and_grad

FAILED = "implicit backward did not solve \\(I - J\\^T\\) u = v"


def delm_loss(backward, gamma=GAMMA, tol=1e-5, dtype=DTYPE):
    A, B, phi, y = delm_problem(dtype)

    def loss(A, phi):
        sol = solve(
            DELMMap(gamma),
            jnp.zeros_like(phi),
            {"A": A},
            phi,
            solver="fixed_point",
            tol=tol,
            maxiter=300,
            backward=backward,
            batch_axis=0,
        )
        return 0.5 * jnp.mean(jnp.sum((sol.value @ B.T - y) ** 2, axis=1)), sol.stats

    return loss, (A, phi), (B, y)


@pytest.mark.float32
@pytest.mark.parametrize("backward", [Implicit("bicgstab", maxiter=1), Implicit("normal_cg", maxiter=2)])
def test_starved_backward_solves_are_counted_then_raised(backward):
    """The repros: a backward solve cut short gave dL/dA 4-13% wrong with every statistic saying converged. Inside
    value_and_grad it is counted with its residual; under plain jax.grad (jit) it raises and says what to change."""
    loss, args, (B, y) = delm_loss(backward)
    (_value, stats), grads, backward_stats = jax.jit(value_and_grad(loss, argnums=(0, 1), has_aux=True))(*args)
    assert bool(stats.converged)  # the forward solve was fine: only the backward failed
    ref = jax.grad(closed_form_loss, argnums=(0, 2))(args[0], B, args[1], y)
    assert rel_err(grads[0], ref[0]) > 1e-3  # the gradient really is wrong...
    assert int(backward_stats.solves) == 1 and int(backward_stats.failures) == 1  # ...and it says so
    assert int(backward_stats.nonfinite) == 0 and float(backward_stats.relative_residual) > 1e-3
    if backward.linear_solver == "bicgstab":
        with pytest.raises(Exception, match=FAILED + r".*relative residual .* > 1.0e-04.*bicgstab.*maxiter=1"):
            jax.block_until_ready(jax.jit(jax.grad(lambda *a: loss(*a)[0]))(*args))


def test_gmres_cut_short():
    """GMRES with one restart (20 Krylov vectors) on a 40 x 40 non-normal contraction: 1% wrong, counted."""
    n = 40
    M = 0.9 * jax.random.normal(jax.random.PRNGKey(0), (n, n), DTYPE) / jnp.sqrt(n)
    b = jnp.ones(n, DTYPE)
    f = lambda z, M, b: M @ z + b

    def loss(M, backward):
        return jnp.sum(solve(f, jnp.zeros(n, DTYPE), M, b, tol=1e-6, maxiter=500, backward=backward).value)

    ref = jax.grad(lambda M: jnp.sum(jnp.linalg.solve(jnp.eye(n, dtype=DTYPE) - M, b)))(M)
    _, g, stats = jax.jit(value_and_grad(loss), static_argnums=1)(M, Implicit("gmres", maxiter=1))
    assert rel_err(g, ref) > 1e-3 and int(stats.failures) == 1 and float(stats.relative_residual) > 1e-4


def test_unreachable_float32_tolerance_and_gamma_near_one():
    """float32 cannot measure a backward tol of 1e-10: refused up front, naming the finest tolerance it can; at
    gamma = 0.9999 (cond(U) ~ 2e4) CG on the normal equations cannot reach even 1e-5 in float32: counted as a
    failure, not returned as a gradient."""
    loss, args, _ = delm_loss(Implicit("gmres", tol=1e-10), gamma=GAMMA, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"Implicit.tol=1e-10 is finer than a float32 state can measure.*4.77e-07"):
        jax.jit(value_and_grad(loss, has_aux=True))(*args)
    loss, args, _ = delm_loss(Implicit("normal_cg"), gamma=0.9999, dtype=jnp.float32)
    _, _, stats = jax.jit(value_and_grad(loss, has_aux=True))(*args)
    assert int(stats.failures) == 1


@pytest.mark.float32
def test_divergence_upstream_does_not_stop_a_vmapped_sweep():
    """Two configurations vmapped, one fed a NaN (a diverged run): no error, the good one's gradient is exact, the
    bad one's is not finite and counted as non-finite (not as a backward failure)."""
    loss, (A, phi), (B, y) = delm_loss(Implicit("lu"))
    phis = jnp.stack([phi, phi.at[0, 0].set(jnp.nan)])
    grad = jax.jit(jax.vmap(jax.grad(lambda A, phi: loss(A, phi)[0]), in_axes=(None, 0)))
    g = grad(A, phis)  # plain jax.grad: would raise on a backward failure, must not on divergence
    # at tol 1e-5 the gradient error is at most about cond(U) * tol = 9 * 1e-5 (plus rounding)
    assert rel_err(g[0], jax.grad(closed_form_loss)(A, B, phi, y)) <= 2e-4
    assert not bool(jnp.all(jnp.isfinite(g[1])))
    (_, stats), _, backward = jax.jit(jax.vmap(value_and_grad(loss, has_aux=True), in_axes=(None, 0)))(A, phis)
    np.testing.assert_array_equal(stats.converged, [True, False])
    np.testing.assert_array_equal(backward.nonfinite, [0, 1])
    np.testing.assert_array_equal(backward.failures, [0, 0])


@pytest.mark.parametrize("check", [True, False])  # on_failure="raise" (measured) or "ignore"
def test_backward_stats_add_up_over_the_solves_of_a_step(check):
    """Solves vmapped inside the differentiated function each count (as samples of one sweep would), under jit;
    on_failure="ignore" (the opt-out) measures nothing: no residual, no failure, no error."""
    f = lambda z, p, x: 0.5 * jnp.cos(z) + p * x
    backward = Implicit("bicgstab", on_failure="raise" if check else "ignore")

    def loss(p, xs):
        return jnp.sum(jax.vmap(lambda x: solve(f, 0.0, p, x, backward=backward, tol=1e-6).value)(xs))

    p, xs = jnp.asarray(0.5, DTYPE), jnp.linspace(0, 1, 5, dtype=DTYPE)
    _value, g, stats = jax.jit(value_and_grad(loss))(p, xs)
    assert int(stats.solves) == 5 and int(stats.failures) == 0 and int(stats.nonfinite) == 0
    # one contraction per sample: dz*/dp = x / (1 + 0.5 sin z*)
    z = jax.vmap(lambda x: solve(f, 0.0, p, x, tol=1e-6).value)(xs)
    np.testing.assert_allclose(g, jnp.sum(xs / (1 + 0.5 * jnp.sin(z))), rtol=1e-4)
    if check:
        assert 0 <= float(stats.relative_residual) <= 5 * 10 * 1e-6
    else:
        assert float(stats.relative_residual) == 0.0


@pytest.mark.float32
def test_one_bad_sample_among_many_is_seen():
    """50 samples start at their equilibrium, one tiny-input sample starts far away: one global norm calls the batch
    converged after 2 steps; with batch_axis=0 the worst sample's relative residual is reported and the solve goes
    on until that sample, too, is at its equilibrium."""
    A = delm_problem(DTYPE)[0]
    phi = jax.random.normal(jax.random.PRNGKey(1), (51, 7), DTYPE).at[-1].multiply(1e-4)
    z_star = closed_form_equilibrium(A, phi)
    z0 = z_star.at[-1].set(1.0)
    run = jax.jit(
        lambda tol, batch_axis, maxiter: solve(
            DELMMap(GAMMA), z0, {"A": A}, phi, solver="fixed_point", tol=tol, maxiter=maxiter, batch_axis=batch_axis
        ),
        static_argnums=(1, 2),
    )
    hidden = run(1e-2, None, 2)
    assert bool(hidden.stats.converged)  # the bad sample vanishes in the batch's norm...
    assert float(rel_err(hidden.value[-1], z_star[-1])) > 0.1
    seen = run(1e-2, 0, 2)
    assert not bool(seen.stats.converged) and float(seen.stats.relative_residual) > 0.1  # ...not per sample
    fixed = jax.jit(lambda: solve(DELMMap(GAMMA), z0, {"A": A}, phi, solver="anderson", tol=1e-4, batch_axis=0))()
    assert bool(fixed.stats.converged) and float(fixed.stats.relative_residual) <= 1e-4
    assert float(rel_err(fixed.value[-1], z_star[-1])) <= 1e-3


@pytest.mark.float32
def test_diverged_iterates_never_pass_for_an_equilibrium():
    """A map whose iterates run off to 1e16, where f(z) - z is exactly zero (as Broyden's runaway was), and a map
    that overflows: both report diverged, not converged, and stop at once instead of running to maxiter."""
    big = 1e30 if jnp.float32 == DTYPE else 1e16
    # no equilibrium (2|z| + 1 > z), but exactly f(z) = z once |z| >= big
    runaway = lambda z, p, x: jnp.where(jnp.abs(z) >= big, z, 2 * jnp.abs(z) + x)
    for solver in ["fixed_point", "anderson", "broyden"]:
        sol = solve(runaway, jnp.zeros(3, DTYPE), 0.0, jnp.ones(3, DTYPE), solver=solver, tol=1e-5, maxiter=200)
        assert not bool(sol.stats.converged), solver
        if solver == "fixed_point":  # the iterates double until |z| = big: stopped at the guard, not at maxiter
            assert bool(sol.stats.diverged) and int(sol.stats.iterations) < 60
    sol = solve(
        lambda z, p, x: jnp.exp(z) + x, jnp.zeros(3, DTYPE), 0.0, jnp.ones(3, DTYPE), solver="fixed_point", maxiter=200
    )
    assert bool(sol.stats.diverged) and not bool(sol.stats.converged) and int(sol.stats.iterations) < 10


def test_make_step_metrics_carry_the_backward_statistics():
    """The one edit in train.make_step: its metrics carry backward_solves / backward_failures / ... ."""
    model = DELM(
        width=7,
        out_dim=3,
        formulation="per_sample",
        solver="anderson",
        tol=1e-5,
        backward=Implicit("bicgstab", maxiter=1),
    )
    _, _, phi, y = delm_problem(DTYPE)
    params = model.init(jax.random.PRNGKey(0), DTYPE)
    optimizer = optax.sgd(0.1)
    _, _, metrics = make_step(model, "square", optimizer)(params, optimizer.init(params), phi, y)
    assert int(metrics["backward_solves"]) == 1 and int(metrics["backward_failures"]) == 1
    assert float(metrics["backward_relative_residual"]) > 1e-4
