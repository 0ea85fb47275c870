"""The relaxed (damped) fixed-point iteration: where plain iteration oscillates, damping converges, with the
implicit gradient of the closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, X64

from deq_jax import Relaxed, solve

pytestmark = pytest.mark.float32

TOL = 1e-10 if X64 else 1e-5


def oscillating(z, p, x):
    """`f(z) = -p z + x`: Jacobian `-p`; plain iteration contracts by `p` per step, damping 1/2 by `(1 - p) / 2`."""
    return -p * z + x


def test_damping_converges_where_plain_iteration_oscillates():
    x, p = jnp.linspace(-1.0, 1.0, 5, dtype=DTYPE), jnp.asarray(0.95, DTYPE)
    z_star = x / (1 + p)
    run = jax.jit(
        lambda solver: solve(oscillating, jnp.zeros_like(x), p, x, solver=solver, tol=TOL, maxiter=2000),
        static_argnums=0,
    )
    relaxed, plain = run(Relaxed(0.5)), run("fixed_point")
    assert bool(relaxed.stats.converged) and bool(plain.stats.converged)
    # |1 - d(1 + p)| = 0.025 per step against 0.95: a handful of steps against hundreds
    assert int(relaxed.stats.iterations) <= 10 < 100 < int(plain.stats.iterations)
    np.testing.assert_allclose(relaxed.value, z_star, rtol=10 * TOL, atol=10 * TOL)
    assert bool(run(Relaxed(1.0)).stats.converged)  # damping 1 is plain iteration
    assert int(run("relaxed").stats.iterations) == int(relaxed.stats.iterations)  # the name resolves to the default


def test_relaxed_implicit_gradient_matches_the_closed_form():
    x, p = jnp.linspace(0.5, 1.5, 4, dtype=DTYPE), jnp.asarray(0.9, DTYPE)
    loss = lambda p, x: jnp.sum(solve(oscillating, jnp.zeros_like(x), p, x, solver=Relaxed(), tol=TOL).value ** 2)
    g_p, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x)
    # z* = x / (1 + p): dL/dp = -2 sum(z* x) / (1 + p)^2, dL/dx = 2 z* / (1 + p)
    z = x / (1 + p)
    np.testing.assert_allclose(g_p, -2 * jnp.sum(z * x) / (1 + p) ** 2, rtol=100 * TOL)
    np.testing.assert_allclose(g_x, 2 * z / (1 + p), rtol=100 * TOL)


def test_relaxed_damping_is_checked():
    with pytest.raises(ValueError, match=r"Relaxed\.damping must be a positive number; got 0"):
        Relaxed(0)
    with pytest.raises(ValueError, match=r"Relaxed.damping must be in \(0, 1\]; got 1.5"):
        Relaxed(1.5)
