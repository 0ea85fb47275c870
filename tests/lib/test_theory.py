"""deq_jax.theory: the closed form, the shallow optimum and its spectrum, the PL inequality, the cross-entropy
optimum (and its failures as data) and the compiler options of the theory's programs. Every check here has a
counterpart that would fail if the claim were wrong (a too-large PL constant, a corrupted solver). The induced
preconditioner and trust region are in test_theory_preconditioner.py, the rate bound and the log-linear fit in
test_theory_rates.py, jit and argument errors in test_theory_api.py.

Runs with x64 on (float64) and off (float32: `tol(f64, f32)` gives each check's tolerance in both)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from theory_helpers import (  # noqa: F401 (autouse fixtures)
    F64,
    GAMMA,
    SIGMA_CASES,
    SLOW,
    _precision_warnings_expected,
    _slow_only_when_selected,
    normal,
    problem,
    rank_deficient_phi,
    rel,
    tol,
)

from deq_jax import theory
from deq_jax.maps import get_sigma
from deq_jax.models import DELM
from deq_jax.theory import cross_entropy as ce_module

# ----------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("sigma", SIGMA_CASES)
def test_end_to_end_solves_its_equilibrium(sigma):
    params, _, _ = problem(seed=1, a_scale=2.0)
    W = theory.end_to_end(params["A"], params["B"], GAMMA, sigma)
    assert W.shape == (3, 6) and W.dtype == F64
    # the defining equilibrium W = B + gamma W sigma(A), checked in NumPy float64
    _A, B, W = (np.asarray(x, np.float64) for x in (params["A"], params["B"], W))
    S = np.asarray(get_sigma(sigma)(params["A"]), np.float64)
    assert rel(B + GAMMA * W @ S, W) < tol(1e-13, 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("sigma", ["column_softmax", "row_softmax", "scaled_tanh"])
def test_end_to_end_matches_delm_model_and_per_sample_solve(sigma):
    params, phi, _ = problem(seed=1, a_scale=2.0)
    W = theory.end_to_end(params["A"], params["B"], GAMMA, sigma)
    W_model = jax.jit(DELM(width=6, out_dim=3, gamma=GAMMA, sigma=sigma).end_to_end)(params)
    assert rel(W, W_model) < tol(1e-12, 1e-5)
    # the generic DEQ form: z_i = gamma sigma(A) z_i + phi_i for every sample, predictions z @ B.T
    pred, _ = jax.jit(DELM(width=6, out_dim=3, gamma=GAMMA, sigma=sigma, formulation="per_sample").apply)(params, phi)
    assert rel(phi @ W.T, pred) < tol(1e-12, 1e-5)


@pytest.mark.parametrize("scale", [100.0, pytest.param(0.1, marks=SLOW)])
def test_u_matrix_column_stochastic_and_norm_bound(scale):
    m = 9
    A = scale * normal(2, (m, m))
    s = get_sigma("column_softmax")(A)
    np.testing.assert_allclose(np.asarray(s.sum(axis=0)), np.ones(m), atol=tol(1e-14, 1e-6))
    U = theory.u_matrix(A, GAMMA)
    # 1^T U = (1 - gamma) 1^T: the direction in which U^{-1} amplifies by 1 / (1 - gamma)
    np.testing.assert_allclose(np.asarray(U.sum(axis=0)), np.full(m, 1 - GAMMA), atol=tol(1e-14, 1e-6))
    norms = theory.u_norms(A, GAMMA)
    U64 = np.asarray(U, np.float64)
    assert abs(float(norms["U_norm2"]) - np.linalg.norm(U64, 2)) < tol(1e-13, 1e-5)
    assert abs(float(theory.spectral_norm(U)) - float(norms["U_norm2"])) < tol(1e-13, 1e-5)
    assert float(norms["U_norm2"]) <= 1 + GAMMA * np.sqrt(m)
    # the 2-norm of U^{-1}: below sqrt(1 + (m-1) gamma) / (1 - gamma), and at least 1 / (1 - gamma) (1^T U^{-1})
    inv = float(norms["U_inv_norm2"])
    assert 1 / (1 - GAMMA) * (1 - 1e-5) <= inv <= theory.u_inverse_norm_bound(m, GAMMA)


def test_spectral_norm_batched():
    M = normal(0, (4, 5, 3))
    np.testing.assert_allclose(
        np.asarray(theory.spectral_norm(M)),
        [np.linalg.norm(np.asarray(x, np.float64), 2) for x in M],
        rtol=tol(1e-13, 1e-5),
    )


# ----------------------------------------------------------------------------- shallow optimum and spectrum


def test_shallow_optimum_square_full_rank_matches_lstsq():
    _, phi, y = problem(seed=4)
    W, L = theory.shallow_optimum_square(phi, y)
    assert W.shape == (3, 6) and W.dtype == F64
    assert float(jnp.linalg.norm(theory.square_loss_gradient(W, phi, y))) < tol(1e-13, 1e-5)
    phi64, y64 = np.asarray(phi, np.float64), np.asarray(y, np.float64)
    W_np = np.linalg.lstsq(phi64, y64, rcond=None)[0].T
    assert rel(W, W_np) < tol(1e-12, 1e-5)
    residual = phi64 @ W_np.T - y64
    assert abs(float(L) - 0.5 * np.mean(np.sum(residual**2, axis=1))) < tol(1e-14, 1e-6)
    assert rel(theory.min_norm_solution(phi, y), W_np) < tol(1e-12, 1e-5)  # NumPy's lstsq, not the library
    # any other W is worse
    W2 = W + 1e-2 * normal(5, W.shape)
    assert float(optax.l2_loss(phi @ W2.T, y).sum(1).mean()) > float(L)


@pytest.mark.parametrize("shape", [(12, 20, None), (25, 6, 3)])
def test_shallow_optimum_square_rank_deficient_is_minimum_norm(shape):
    n, m, r = shape
    phi = rank_deficient_phi(n, m, r)
    y = normal(6, (n, 3))
    W, L = theory.shallow_optimum_square(phi, y)
    assert float(jnp.linalg.norm(theory.square_loss_gradient(W, phi, y))) < tol(1e-11, 1e-3)
    # the rows of W* lie in the row space of phi: orthogonal to its null space
    phi64 = np.asarray(phi, np.float64)
    _, s, Vt = np.linalg.svd(phi64)
    # the rank the Gram route resolves: singular values above sqrt(m eps) s_max (in float32, the rounding of the
    # product that built phi leaves singular values ~1e-8 s_max that NumPy's tighter rule would count)
    rank = int(np.sum(s > np.sqrt(theory.default_rtol(m, F64)) * s[0]))
    null = Vt[rank:].T
    assert null.shape[1] == m - rank > 0
    assert np.linalg.norm(np.asarray(W) @ null) < tol(1e-12, 1e-3) * np.linalg.norm(np.asarray(W))
    pinv = np.linalg.pinv(phi64, rcond=np.sqrt(theory.default_rtol(m, F64)))
    assert rel(W, (pinv @ np.asarray(y, np.float64)).T) < tol(1e-10, 1e-3)
    assert rel(theory.min_norm_solution(phi, y), (pinv @ np.asarray(y, np.float64)).T) < tol(1e-10, 1e-3)
    # another minimiser (add a null-space component): same loss, larger norm
    W_other = W + jnp.asarray(np.ones((3, 1)) @ null[:, :1].T, F64)
    L_other = 0.5 * jnp.mean(jnp.sum((phi @ W_other.T - y) ** 2, axis=1))
    assert abs(float(L_other) - float(L)) < tol(1e-10, 1e-4)
    assert float(jnp.linalg.norm(W_other)) > float(jnp.linalg.norm(W))


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_feature_spectrum_matches_eigvalsh(rank_deficient):
    phi = rank_deficient_phi(25, 6, 3) if rank_deficient else problem(seed=7)[1]
    spec = theory.feature_spectrum(phi)
    phi64 = np.asarray(phi, np.float64)
    eig = np.linalg.eigvalsh(phi64.T @ phi64 / 25)
    assert int(spec["rank"]) == (3 if rank_deficient else 6)
    assert abs(float(spec["lambda_max"]) - eig[-1]) < tol(1e-12, 1e-5) * eig[-1]
    expected_min = eig[-3] if rank_deficient else eig[0]  # smallest of the nonzero ones
    assert abs(float(spec["lambda_min_plus"]) - expected_min) < tol(1e-10, 1e-5) * eig[-1]
    # an explicit rtol above the smallest nonzero eigenvalue moves lambda_min_plus up
    spec2 = theory.feature_spectrum(phi, rtol=1.001 * expected_min / eig[-1])
    assert float(spec2["lambda_min_plus"]) > expected_min and int(spec2["rank"]) == int(spec["rank"]) - 1


def test_feature_gram_and_zero_features():
    _, phi, _ = problem(seed=7)
    C = theory.feature_gram(phi)
    assert C.shape == (6, 6) and rel(C, np.asarray(phi, np.float64).T @ np.asarray(phi, np.float64) / 25) < tol(
        1e-14, 1e-6
    )
    spec = theory.feature_spectrum(jnp.zeros((25, 6), F64))
    assert int(spec["rank"]) == 0 and np.isnan(float(spec["lambda_min_plus"]))
    W, L = theory.shallow_optimum_square(jnp.zeros((25, 6), F64), jnp.ones((25, 3), F64))
    assert float(jnp.abs(W).max()) == 0.0 and abs(float(L) - 1.5) < 1e-6


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_pl_inequality_and_its_constant_is_sharp(rank_deficient):
    phi = rank_deficient_phi(12, 20) if rank_deficient else problem(seed=8)[1]
    n, m = phi.shape
    y = normal(9, (n, 3))
    W_star, L_star = theory.shallow_optimum_square(phi, y)
    lam = float(theory.feature_spectrum(phi)["lambda_min_plus"])
    loss = lambda W: 0.5 * jnp.mean(jnp.sum((phi @ W.T - y) ** 2, axis=1))
    for seed in range(3):
        W = normal(100 + seed, (3, m))
        G = theory.square_loss_gradient(W, phi, y)
        assert float(jnp.sum(G * G)) >= 2 * lam * float(loss(W) - L_star) * (1 - tol(1e-12, 1e-4))
    # equality along the eigenvector of lambda_min^+: a constant 1% larger would be violated
    phi64 = np.asarray(phi, np.float64)
    eig, vec = np.linalg.eigh(phi64.T @ phi64 / n)
    k = int(np.argmin(np.abs(eig - lam)))
    W = W_star + jnp.asarray(np.outer(np.ones(3), vec[:, k]), F64)
    G = theory.square_loss_gradient(W, phi, y)
    ratio = float(jnp.sum(G * G)) / (2 * lam * float(loss(W) - L_star))
    assert abs(ratio - 1.0) < tol(1e-8, 1e-2)


# ----------------------------------------------------------------------------- cross-entropy optimum


def ce_problem():
    _, phi, _ = problem(seed=10)
    labels = jnp.asarray(np.random.default_rng(11).integers(0, 3, 25), jnp.int32)
    return phi, labels


CE_TOL = tol(1e-10, 1e-5)  # float32 gradients bottom out near eps |phi| |softmax - Y| ~ 1e-6


def test_shallow_optimum_cross_entropy():
    phi, labels = ce_problem()
    k, m = 3, 6
    W, L, info = theory.shallow_optimum_cross_entropy(phi, labels, k, l2=1e-3, tol=CE_TOL)
    assert W.shape == (k, m) and info["converged"] and info["status"] == "converged"
    assert info["grad_norm"] <= CE_TOL and info["solver_grad_norm"] <= CE_TOL
    targets = jax.nn.one_hot(labels, k, dtype=F64)

    def fun(W):
        return optax.softmax_cross_entropy(phi @ W.T, targets).mean() + 0.5e-3 * jnp.sum(W * W)

    assert float(jnp.linalg.norm(jax.grad(fun)(W))) <= 2 * CE_TOL  # checked independently of the solver
    assert abs(float(fun(W)) - float(L)) < tol(1e-14, 1e-6)
    assert abs(info["cross_entropy"] - (float(L) - 0.5e-3 * float(jnp.sum(W * W)))) < tol(1e-13, 1e-6)
    # the closed-form gradient used for the independent check agrees with autodiff
    W_rand = normal(200, (k, m))
    assert rel(theory.cross_entropy_gradient(W_rand, phi, targets, 1e-3), jax.grad(fun)(W_rand)) < tol(1e-13, 1e-5)
    for seed in range(3):
        W_rand = normal(200 + seed, (k, m))
        assert float(fun(W_rand)) > float(L)
        assert float(fun(W + 1e-3 * W_rand)) >= float(L)
    # one-hot targets give the same optimum; a capped solver says it did not converge
    W2, _, _ = theory.shallow_optimum_cross_entropy(phi, targets, k, l2=1e-3, tol=CE_TOL)
    assert rel(W2, W) < tol(1e-8, 1e-3)
    with pytest.raises(theory.OptimumNotConverged, match="max_iterations") as err:
        theory.shallow_optimum_cross_entropy(phi, labels, k, l2=1e-3, maxiter=1, tol=CE_TOL)
    assert err.value.info["iterations"] == 1 and not err.value.info["converged"]
    _, _, info = theory.shallow_optimum_cross_entropy(
        phi, labels, k, l2=1e-3, maxiter=1, tol=CE_TOL, on_failure="ignore"
    )
    assert not info["converged"] and info["iterations"] == 1 and info["status"] == "max_iterations"


@pytest.mark.parametrize("fault", ["nan_at_start", "wrong_but_claims_converged"])
def test_cross_entropy_optimum_failure_is_data(monkeypatch, fault):
    """A solver program that returns garbage (as a corrupted XLA executable did: W = 0 and |g| = nan after 0 steps,
    or a wrong W with a small claimed |g|) comes back as a failed optimum with its numbers, never as W*."""
    phi, labels = ce_problem()

    def corrupted(phi, targets, l2, tol, maxiter, cg_maxiter):
        W = jnp.zeros((targets.shape[1], phi.shape[1]), phi.dtype)
        if fault == "nan_at_start":
            return W, jnp.nan, jnp.nan, jnp.int32(0), jnp.int32(0), jnp.array(False)
        return (
            W + 1.0,
            jnp.asarray(1.0, phi.dtype),
            jnp.asarray(0.0, phi.dtype),
            jnp.int32(3),
            jnp.int32(9),
            jnp.array(False),
        )

    monkeypatch.setattr(ce_module, "_newton_cg_jit", corrupted)
    _W, _L, info = theory.shallow_optimum_cross_entropy(phi, labels, 3, l2=1e-3, tol=CE_TOL, on_failure="ignore")
    assert not info["converged"]
    assert info["status"] == ("non_finite" if fault == "nan_at_start" else "not_verified")
    assert info["status"] in theory.STATUSES
    if fault == "wrong_but_claims_converged":
        assert info["solver_grad_norm"] == 0.0 and info["grad_norm"] > 1e-2  # the independent check disagrees
    # a claim `grad_norm <= tol` fails (a NaN never passes), and the default raises with the same info
    assert not info["grad_norm"] <= info["tol"]
    with pytest.raises(theory.OptimumNotConverged, match=info["status"]) as err:
        theory.shallow_optimum_cross_entropy(phi, labels, 3, l2=1e-3, tol=CE_TOL)
    assert err.value.info["status"] == info["status"]
    with pytest.warns(RuntimeWarning, match="did not converge"):
        theory.shallow_optimum_cross_entropy(phi, labels, 3, l2=1e-3, tol=CE_TOL, on_failure="warn")


def test_theory_programs_are_compiled_without_ynnpack_fusions():
    """The cause of the main job's NaN optimum: XLA:CPU's YNNPACK fusions, whose runtime state was corrupted when the
    program was compiled concurrently with another (docs/theory.md section 13). Theory programs do without them."""
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU-backend option")
    from deq_jax.theory import _common

    if not _common._compiler_options():
        pytest.skip("this jaxlib has no YNNPACK fusion option")
    from deq_jax.theory import shallow

    _, phi, y = problem(seed=4)
    args = (jnp.ones((3, 6), F64), phi, y)
    assert "__ynn_fusion" not in shallow._sq_grad.lower(*args).compile().as_text()
    # the same program through a plain jax.jit does use them on this jaxlib: the option is what removes them
    assert "__ynn_fusion" in jax.jit(shallow._sq_grad._fn).lower(*args).compile().as_text()
