"""Weight nonlinearities, feature maps and equilibrium maps (float64 by default, float32 with x64 off)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, X64

from deq_jax import DELMMap, DELMTransposedMap, TanhMap, random_projection
from deq_jax.maps import SIGMAS, features, get_sigma

RTOL = 1e-12 if X64 else 1e-5  # a few rounding errors of the dtype


@pytest.mark.float32
@pytest.mark.parametrize("name", sorted(SIGMAS))
def test_every_sigma_makes_the_map_contractive(name):
    """gamma * sigma(A) must have spectral radius < 1 for any A, so the equilibrium exists and is unique."""
    sigma = get_sigma(name)
    for seed, scale in [(0, 0.1), (1, 3.0), (2, 30.0)]:
        A = scale * jax.random.normal(jax.random.PRNGKey(seed), (9, 9), DTYPE)
        S = np.asarray(sigma(A))
        gamma = 0.95
        assert np.max(np.abs(np.linalg.eigvals(gamma * S))) < 1.0
        if name == "column_softmax":
            np.testing.assert_allclose(S.sum(axis=0), 1.0, rtol=RTOL, atol=RTOL)
            # positive in exact arithmetic; at scale 30 some entries underflow to 0 in float32 (exp(-100))
            assert (S > 0).all() if (X64 or scale < 10) else (S >= 0).all()
        if name == "row_softmax":
            np.testing.assert_allclose(S.sum(axis=1), 1.0, rtol=RTOL, atol=RTOL)
        if name == "scaled_tanh":
            assert np.abs(S).sum(axis=1).max() < 1.0


def test_column_softmax_definition():
    A = jnp.array([[0.0, 1.0], [2.0, 3.0]], DTYPE)
    S = get_sigma("column_softmax")(A)
    np.testing.assert_allclose(S[:, 0], np.exp([0, 2]) / np.exp([0, 2]).sum(), rtol=RTOL, atol=RTOL)
    assert get_sigma(jnp.tanh) is jnp.tanh  # callables pass through


def test_delm_map_per_sample_and_batched_agree():
    A = jax.random.normal(jax.random.PRNGKey(0), (5, 5), DTYPE)
    z = jax.random.normal(jax.random.PRNGKey(1), (4, 5), DTYPE)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 5), DTYPE)
    f = DELMMap(0.7)
    batched = f(z, {"A": A}, x)
    S = get_sigma("column_softmax")(A)
    for i in range(4):
        np.testing.assert_allclose(batched[i], 0.7 * S @ z[i] + x[i], rtol=RTOL, atol=RTOL)
        np.testing.assert_allclose(f(z[i], {"A": A}, x[i]), batched[i], rtol=RTOL, atol=RTOL)
    M, c = f.affine({"A": A}, x)
    np.testing.assert_allclose(z @ M.T + c, batched, rtol=RTOL, atol=RTOL)


def test_transposed_map_fixed_point_is_the_end_to_end_matrix():
    A = jax.random.normal(jax.random.PRNGKey(0), (5, 5), DTYPE)
    B = jax.random.normal(jax.random.PRNGKey(1), (3, 5), DTYPE)
    U = jnp.eye(5) - 0.6 * get_sigma("column_softmax")(A)
    W = B @ jnp.linalg.inv(U)
    f = DELMTransposedMap(0.6)
    np.testing.assert_allclose(f(W, {"A": A}, B), W, rtol=RTOL, atol=RTOL)
    M, c = f.affine({"A": A}, B)
    np.testing.assert_allclose(W @ M.T + c, W, rtol=RTOL, atol=RTOL)


def test_maps_are_hashable_static_arguments():
    f = DELMMap(0.5, "row_softmax")
    assert hash(f) == hash(DELMMap(0.5, "row_softmax"))
    out = jax.jit(lambda f, z: f(z, {"A": jnp.eye(3)}, z), static_argnums=0)(f, jnp.ones(3))
    assert out.shape == (3,)


def test_tanh_map_is_a_contraction_for_any_weights():
    f = TanhMap(0.9)
    params = f.init(jax.random.PRNGKey(0), width=6, in_dim=3, dtype=DTYPE)
    params["W"] = 50.0 * params["W"]  # far from contractive before the rescaling
    x = jnp.ones((3,), DTYPE)
    z1, z2 = jax.random.normal(jax.random.PRNGKey(1), (2, 6), DTYPE)
    ratio = jnp.linalg.norm(f(z1, params, x) - f(z2, params, x)) / jnp.linalg.norm(z1 - z2)
    assert float(ratio) <= 0.9 + RTOL
    assert float(jnp.linalg.norm(f.weight(params["W"]), 2)) <= 0.9 + RTOL


def test_random_projection_any_width():
    x = jax.random.normal(jax.random.PRNGKey(0), (20, 64), jnp.float32)
    for width in [5, 64, 200]:
        P = random_projection(jax.random.PRNGKey(1), 64, width)
        phi = features(x, P)
        assert phi.shape == (20, width) and phi.dtype == jnp.float32
    np.testing.assert_array_equal(features(x), x)
    # fixed: the same key gives the same projection
    np.testing.assert_array_equal(
        random_projection(jax.random.PRNGKey(1), 64, 5), random_projection(jax.random.PRNGKey(1), 64, 5)
    )


@pytest.mark.float32
def test_tanh_map_init_scales():
    """`W ~ N(0, 1/width)`, `U ~ N(0, 1/in_dim)`, `b ~ 0.1 N(0, 1)`: sample standard deviations within 5 standard
    errors (relative standard error of a standard deviation from N draws: 1/sqrt(2N))."""
    width, in_dim = 200, 50
    p = TanhMap(0.9).init(jax.random.PRNGKey(7), width=width, in_dim=in_dim, dtype=DTYPE)
    assert p["W"].shape == (width, width) and p["U"].shape == (width, in_dim) and p["b"].shape == (width,)
    for leaf, std in [(p["W"], 1 / np.sqrt(width)), (p["U"], 1 / np.sqrt(in_dim)), (p["b"], 0.1)]:
        x = np.asarray(leaf, np.float64)
        assert leaf.dtype == DTYPE and abs(x.std() / std - 1) <= 5 / np.sqrt(2 * x.size), (x.shape, x.std(), std)
        assert abs(x.mean()) <= 5 * std / np.sqrt(x.size)


@pytest.mark.float32
def test_random_projection_entries_are_n_0_1_over_in_dim():
    """The documented scale: entries N(0, 1/in_dim), so |phi(x)|^2 ~ |x|^2 width / in_dim. 60000 entries: the sample
    mean has standard deviation 1/sqrt(in_dim N) and the sample variance a relative one of sqrt(2/N) = 0.6%; allow
    5 of each (a scale off by sqrt(2) is 40% in the variance, one by 1/sqrt(width) a factor 3)."""
    for in_dim, width, seed in [(400, 150, 3), (25, 2400, 4)]:
        P = np.asarray(random_projection(jax.random.PRNGKey(seed), in_dim, width, DTYPE), np.float64)
        N = P.size
        assert P.shape == (in_dim, width) and N == 60000
        assert abs(P.mean()) <= 5 / np.sqrt(in_dim * N)
        assert abs(P.var() * in_dim - 1.0) <= 5 * np.sqrt(2 / N)
        # Gaussian tails, not a uniform or a sign matrix of the same variance: kurtosis 3 (sd sqrt(24/N) = 0.02)
        assert abs(np.mean(P**4) / P.var() ** 2 - 3.0) <= 5 * np.sqrt(24 / N)


def test_map_argument_errors():
    with pytest.raises(ValueError, match="width must be a positive integer; got 0"):
        random_projection(jax.random.PRNGKey(0), 4, 0)
    with pytest.raises(ValueError, match="in_dim must be a positive integer; got -3"):
        random_projection(jax.random.PRNGKey(0), -3, 2)
    with pytest.raises(ValueError, match=r"projection must have shape \(8, \*\).*got shape \(4, 2\)"):
        features(jnp.ones((3, 8)), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"contraction must be a number in the open interval \(0, 1\); got 1.5"):
        TanhMap(1.5)
    with pytest.raises(ValueError, match="gamma"):
        DELMMap(0.0)
