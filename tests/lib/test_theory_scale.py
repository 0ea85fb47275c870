"""deq_jax.theory at n >> m: spectra and optima from m x m Gram matrices against a float64 NumPy reference, the Gram
route's rank cutoff on rank-deficient and ill-conditioned features, and the compiled memory of every routine that
touches phi at n = 60000, m = 785 (compile only: an n x n workspace, 28.8 GB for an SVD of phi, fails it).

Runs with x64 on (float64) and off (float32: looser tolerances and a PrecisionWarning, both stated per check)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq_jax import theory
from deq_jax.theory import cross_entropy as ce_module
from deq_jax.theory import shallow

X64 = bool(jax.config.jax_enable_x64)
DT = jnp.float64 if X64 else jnp.float32
EPS = float(jnp.finfo(DT).eps)


def tol(f64, f32):
    return f64 if X64 else f32


def quiet(fn, *args, **kwargs):
    """Call a theory function; with x64 off it must say (PrecisionWarning) that it computes in float32."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    precision = [w for w in caught if issubclass(w.category, theory.PrecisionWarning)]
    assert bool(precision) != X64, [str(w.message) for w in caught]
    return out


def tall_problem(n=50000, m=8, m_y=3, rank=None, cond=30.0, seed=0):
    """Features with a common offset and column scales spread over `cond`, optionally of a given rank."""
    rng = np.random.default_rng(seed)
    r = m if rank is None else rank
    F = rng.standard_normal((n, r)) + 0.5
    G = np.linalg.qr(rng.standard_normal((m, m)))[0][:r] * np.geomspace(1.0, 1.0 / cond, r)[:, None]
    phi = F @ G
    y = phi @ rng.standard_normal((m, m_y)) + 0.3 * rng.standard_normal((n, m_y))
    return phi, y


def numpy_reference(phi, y):
    s = np.linalg.svd(phi, compute_uv=False)
    W = np.linalg.lstsq(phi, y, rcond=None)[0].T
    L = 0.5 * np.mean(np.sum((phi @ W.T - y) ** 2, axis=1))
    return s**2 / phi.shape[0], W, L


@pytest.mark.parametrize("rank", [None, 5])
def test_n_much_larger_than_m_matches_float64_numpy(rank):
    """n = 50000, m = 8: what crashed at full scale (an SVD of phi with an n x n workspace) now runs in the suite."""
    phi, y = tall_problem(rank=rank, cond=30.0 if X64 else 5.0)
    eig, W_ref, L_ref = numpy_reference(phi, y)
    spec = quiet(theory.feature_spectrum, jnp.asarray(phi, DT))
    r = 8 if rank is None else rank
    assert int(spec["rank"]) == r
    assert abs(float(spec["lambda_max"]) - eig[0]) < tol(1e-13, 1e-5) * eig[0]
    # lambda_min^+ carries an absolute error ~ eps lambda_max: relative error eps cond(C)
    assert abs(float(spec["lambda_min_plus"]) - eig[r - 1]) < tol(1e-12, 1e-4) * eig[0]
    W, L = quiet(theory.shallow_optimum_square, jnp.asarray(phi, DT), jnp.asarray(y, DT))
    # W*: eps cond(phi) after the refinement step (cond(phi) = 30 here); L* is quadratic in W's error
    assert np.linalg.norm(np.asarray(W) - W_ref) < tol(1e-12, 1e-4) * np.linalg.norm(W_ref)
    assert abs(float(L) - L_ref) < tol(1e-13, 1e-5) * L_ref
    if rank is not None:  # the rows of W* are orthogonal to the null space of phi
        null = np.linalg.svd(phi, full_matrices=False)[2][rank:]  # Vt is (m, m)
        assert np.linalg.norm(np.asarray(W, np.float64) @ null.T) < tol(1e-12, 1e-5) * np.linalg.norm(W_ref)


def test_refinement_step_recovers_the_digits_the_normal_equations_lose():
    """cond(phi) = 1e5: the normal equations alone lose ~eps cond^2 = 1e-6; one residual step gives ~eps cond."""
    if not X64:
        pytest.skip("needs float64: in float32 cond(phi) = 1e5 is beyond what the Gram route resolves (1 / sqrt(eps))")
    phi, y = tall_problem(cond=1e5, seed=1)  # n = 50000, m = 8: the shapes compiled above
    _, W_ref, _ = numpy_reference(phi, y)
    W = np.asarray(theory.min_norm_solution(jnp.asarray(phi), jnp.asarray(y)))
    C, D = phi.T @ phi / len(phi), y.T @ phi / len(phi)
    W_normal = np.linalg.solve(C, D.T).T  # the normal equations alone, in NumPy float64
    err, err_normal = (np.linalg.norm(w - W_ref) / np.linalg.norm(W_ref) for w in (W, W_normal))
    assert err < 1e-9 and err < 1e-2 * err_normal


def test_gram_rank_cutoff_treats_tiny_singular_values_as_null():
    """A direction with s / s_max = 1e-9 (lambda ratio 1e-18, below eps) is resolved by an SVD but is null for the
    Gram route (cutoff m eps on eigenvalues, sqrt(m eps) ~ 4e-8 on singular values). L* is then the optimum over the
    kept directions: above NumPy's by exactly the part of y along the cut direction, which NumPy fits only with a
    coefficient ~ |q^T y| / s larger and which gradient descent would approach at a rate ~1e-18 per unit step."""
    if not X64:
        pytest.skip("float64 statement: in float32 the cutoff is sqrt(m eps) ~ 1e-3 on singular values")
    rng = np.random.default_rng(2)
    n, m = 50000, 8
    Q = np.linalg.qr(rng.standard_normal((n, m)))[0]
    V = np.linalg.qr(rng.standard_normal((m, m)))[0]
    s = np.array([1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 1e-3, 1e-9]) * np.sqrt(n)
    phi = (Q * s) @ V.T
    y = rng.standard_normal((n, 3))
    assert np.linalg.matrix_rank(phi) == m  # NumPy's SVD rank sees all eight
    spec = theory.feature_spectrum(jnp.asarray(phi))
    assert int(spec["rank"]) == m - 1 and abs(float(spec["lambda_min_plus"]) - 1e-6) < 1e-12
    assert float(spec["cutoff"]) == pytest.approx(m * EPS * float(spec["lambda_max"]))
    W, L = theory.shallow_optimum_square(jnp.asarray(phi), jnp.asarray(y))
    assert np.linalg.norm(np.asarray(W) @ V[:, -1]) < 1e-6 * np.linalg.norm(np.asarray(W))  # nothing along it
    _, W_ref, L_ref = numpy_reference(phi, y)
    assert abs((float(L) - L_ref) - 0.5 * np.sum((Q[:, -1] @ y) ** 2) / n) < 1e-11 * L_ref  # rounding of L
    assert np.linalg.norm(W_ref @ V[:, -1]) > 1e5 * np.linalg.norm(np.asarray(W))  # |q^T y| / s, s = 4.5e-8
    # below the cutoff an eigenvalue is rounding: its computed value (of either sign) is within ~eps lambda_max
    eig = np.linalg.eigvalsh(np.asarray(theory.feature_gram(jnp.asarray(phi))))
    assert abs(eig[0]) < 10 * EPS * eig[-1]


def memory(fn, *shapes):
    return fn.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_compiled_memory_is_linear_in_n_at_full_scale():
    """n = 60000, m = 785, m_y = 10 (Fashion-MNIST, pixels + bias), compile only: the XLA workspace of the spectrum,
    the square optimum and the cross-entropy solver is O(n (m + m_y) + m^2) words. An SVD of phi (the previous
    feature_spectrum) needs 28.8 GB here. (The gradients are single products; their programs are no different.)"""
    n, m, k = 60000, 785, 10
    f = jnp.float64 if X64 else jnp.float32
    word = jnp.dtype(f).itemsize
    phi, y = jax.ShapeDtypeStruct((n, m), f), jax.ShapeDtypeStruct((n, k), f)
    jax.ShapeDtypeStruct((k, m), f)
    budget = word * (2 * n * (m + k) + 8 * m * m)  # far below n^2 words (2.9e10 bytes)
    used = {
        "feature_spectrum": memory(shallow._spectrum, phi, 1e-12),
        "min_norm_solution": memory(shallow._min_norm, phi, y, 1e-12),
        "shallow_optimum_cross_entropy": memory(
            ce_module._newton_cg_jit, phi, y, 0.1, 1e-10, jnp.int32(1), jnp.int32(1)
        ),
    }
    assert all(v <= budget for v in used.values()), (used, budget)
