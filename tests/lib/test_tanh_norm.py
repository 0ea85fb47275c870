"""TanhMap's two weight norms: the Frobenius cap (a guaranteed, shallow contraction at init) and the spectral
estimate (a deep layer: |W_c|_2 near the contraction), and what they do to the solve's iterations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq_jax

pytestmark = pytest.mark.float32


def spectral(a):
    return float(np.linalg.norm(np.asarray(a, np.float64), 2))


def test_frobenius_is_shallow_and_spectral_is_deep_at_init():
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 32), jnp.float32)
    iterations = {}
    for norm in ("frobenius", "spectral"):
        f = deq_jax.TanhMap(0.9, norm=norm)
        params = f.init(jax.random.PRNGKey(0), 128, 32, jnp.float32)
        W_c = f.weight(params["W"])
        if norm == "frobenius":
            assert float(jnp.linalg.norm(W_c)) <= 0.9 * (1 + 1e-6)
            assert spectral(W_c) < 0.25  # 2 c / sqrt(m) ~ 0.16: the cap leaves the layer nearly shallow
        else:
            assert 0.88 < spectral(W_c) < 0.95  # the power-iteration estimate is close, from below
        sol = deq_jax.solve(f, jnp.zeros((64, 128), jnp.float32), params, x, solver="anderson", tol=1e-5, batch_axis=0)
        assert bool(sol.stats.converged)
        iterations[norm] = int(sol.stats.iterations)
    assert iterations["spectral"] > 1.5 * iterations["frobenius"], iterations


def test_spectral_norm_gradient_is_u_v_transposed():
    f = deq_jax.TanhMap(0.9, norm="spectral", power_iterations=200)
    W = jax.random.normal(jax.random.PRNGKey(2), (12, 12), jnp.float32)
    value, grad = jax.value_and_grad(f.weight_norm)(W)
    u, s, vt = np.linalg.svd(np.asarray(W, np.float64))
    assert abs(float(value) - s[0]) < 1e-4 * s[0]
    np.testing.assert_allclose(np.asarray(grad), np.outer(u[:, 0], vt[0]), atol=1e-3)


def test_norm_is_checked():
    with pytest.raises(ValueError, match="norm"):
        deq_jax.TanhMap(0.9, norm="nuclear")
    with pytest.raises(ValueError, match="power_iterations"):
        deq_jax.TanhMap(0.9, norm="spectral", power_iterations=0)
