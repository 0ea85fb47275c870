"""deq_jax.theory: the closed form, the shallow optimum and its spectrum, the PL inequality, the rate bound on a real
GD run, the induced preconditioner against forward-mode and finite-difference velocities, the trust-region relation's
content, the cross-entropy optimum (and its failures as data), the log-linear fit and argument errors. Every check
here has a counterpart that would fail if the claim were wrong (a wrong preconditioner, a too-large PL constant, a
too-large step, a corrupted solver).

Runs with x64 on (float64) and off (float32: `tol(f64, f32)` gives each check's tolerance in both)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deq_jax import theory
from deq_jax.maps import get_sigma
from deq_jax.models import DELM
from deq_jax.theory import cross_entropy as ce_module
from deq_jax.losses import square
from deq_jax.train import full_batch_gd, make_step

X64 = bool(jax.config.jax_enable_x64)
F64 = jnp.float64 if X64 else jnp.float32  # the suite runs with x64 on (float64) and off (float32)
GAMMA = 0.8


def tol(f64, f32):
    """A tolerance for float64 runs and one for float32 runs (x64 off)."""
    return f64 if X64 else f32


@pytest.fixture(autouse=True)
def _precision_warnings_expected():
    """With x64 off, theory's optima and spectra say they compute in float32 (PrecisionWarning): expected here."""
    with warnings.catch_warnings():
        if not X64:
            warnings.simplefilter("ignore", theory.PrecisionWarning)
        yield


@pytest.fixture(autouse=True)
def _slow_only_when_selected(request):
    """Tests marked `slow` add coverage, not new kinds of checks; they run with `pytest -m slow` (make test-slow)."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("slow: run with pytest -m slow")


SLOW = pytest.mark.slow
SIGMA_CASES = ["column_softmax"] + [pytest.param(s, marks=SLOW) for s in ("row_softmax", "scaled_tanh")]


# one shape for most tests, so the jit-compiled cores compile once
def normal(seed, shape):
    # NumPy draws: no per-shape compilation, which dominates small tests' time
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), F64)


def problem(seed=0, n=25, m=6, m_y=3, a_scale=1.0):
    rng = np.random.default_rng(seed)
    params = {"A": jnp.asarray(a_scale * rng.standard_normal((m, m)), F64),
              "B": jnp.asarray(rng.standard_normal((m_y, m)), F64)}
    return params, jnp.asarray(rng.standard_normal((n, m)), F64), jnp.asarray(rng.standard_normal((n, m_y)), F64)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def rank_deficient_phi(n=12, m=20, rank=None, seed=3):
    """n < m (or a given rank through a product of thin factors): a non-trivial null space."""
    r = min(n, m) if rank is None else rank
    return normal(seed, (n, r)) @ normal(seed + 1, (r, m))


# ----------------------------------------------------------------------------- closed form

@pytest.mark.parametrize("sigma", SIGMA_CASES)
def test_end_to_end_solves_its_equilibrium(sigma):
    params, _, _ = problem(seed=1, a_scale=2.0)
    W = theory.end_to_end(params["A"], params["B"], GAMMA, sigma)
    assert W.shape == (3, 6) and W.dtype == F64
    # the defining equilibrium W = B + gamma W sigma(A), checked in NumPy float64
    A, B, W = (np.asarray(x, np.float64) for x in (params["A"], params["B"], W))
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
    np.testing.assert_allclose(np.asarray(theory.spectral_norm(M)),
                               [np.linalg.norm(np.asarray(x, np.float64), 2) for x in M], rtol=tol(1e-13, 1e-5))


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
    assert abs(float(L) - 0.5 * np.mean(np.sum(residual ** 2, axis=1))) < tol(1e-14, 1e-6)
    assert rel(theory.min_norm_solution(phi, y), W) == 0.0
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
        1e-14, 1e-6)
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
    loss = lambda W: 0.5 * jnp.mean(jnp.sum((phi @ W.T - y) ** 2, axis=1))  # noqa: E731
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
    _, _, info = theory.shallow_optimum_cross_entropy(phi, labels, k, l2=1e-3, maxiter=1, tol=CE_TOL,
                                                      on_failure="ignore")
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
        return W + 1.0, jnp.asarray(1.0, phi.dtype), jnp.asarray(0.0, phi.dtype), jnp.int32(3), jnp.int32(9), \
            jnp.array(False)

    monkeypatch.setattr(ce_module, "_newton_cg_jit", corrupted)
    W, L, info = theory.shallow_optimum_cross_entropy(phi, labels, 3, l2=1e-3, tol=CE_TOL, on_failure="ignore")
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


# ----------------------------------------------------------------------------- induced preconditioner (section 5)

@jax.jit(static_argnames=("model",))
def _model_grads(params, phi, y, model):
    return jax.grad(lambda p: square(model.apply(p, phi)[0], y))(params)


def model_grads(params, phi, y, sigma):
    """dL/dA, dL/dB from the DELM model's own path (direct solve)."""
    m_y, m = params["B"].shape
    return _model_grads(params, phi, y, DELM(width=m, out_dim=m_y, gamma=GAMMA, sigma=sigma,
                                             tol=tol(1e-13, 1e-6)))


@pytest.mark.parametrize("sigma", SIGMA_CASES)
def test_induced_preconditioner_equals_forward_mode_velocity(sigma):
    params, phi, y = problem(seed=0, a_scale=1.5)
    grads = model_grads(params, phi, y, sigma)
    velocity = theory.delm_w_velocity(params, grads, GAMMA, sigma)
    W = theory.end_to_end(params["A"], params["B"], GAMMA, sigma)
    G = theory.square_loss_gradient(W, phi, y)
    P_G = theory.induced_preconditioner(params, G, GAMMA, sigma)
    assert rel(velocity, -P_G) < tol(1e-9, 1e-4)
    # the exact parameter gradient from G alone equals the model's
    g = theory.parameter_gradient(params, G, GAMMA, sigma)
    assert rel(g["A"], grads["A"]) < tol(1e-9, 1e-4) and rel(g["B"], grads["B"]) < tol(1e-9, 1e-4)
    # and a central finite difference of W along the gradient direction (error O(h^2))
    h = tol(1e-5, 1e-2)
    w_at = lambda t: theory.end_to_end(params["A"] - t * grads["A"], params["B"] - t * grads["B"], GAMMA, sigma)  # noqa
    assert rel((w_at(h) - w_at(-h)) / (2 * h), -P_G) < tol(1e-7, 1e-2)


def test_wrong_preconditioner_does_not_match():
    """(U^T U)^{-1} in place of (U U^T)^{-1} is measurably wrong, so the test above can fail."""
    params, phi, y = problem(seed=2, a_scale=1.5)
    grads = model_grads(params, phi, y, "column_softmax")
    velocity = theory.delm_w_velocity(params, grads, GAMMA)
    G = theory.square_loss_gradient(theory.end_to_end(params["A"], params["B"], GAMMA), phi, y)
    P_G = theory.induced_preconditioner(params, G, GAMMA)
    U, G, P_G = (np.asarray(x, np.float64) for x in (theory.u_matrix(params["A"], GAMMA), G, P_G))
    wrong = P_G - G @ np.linalg.inv(U @ U.T) + G @ np.linalg.inv(U.T @ U)
    assert rel(velocity, -P_G) < tol(1e-9, 1e-4)
    assert rel(velocity, -wrong) > 1e-2
    # and without the K K^* term (plain B-only dynamics) it is wrong too
    assert rel(velocity, -G @ np.linalg.inv(U @ U.T)) > 1e-2


@pytest.mark.parametrize("sigma", SIGMA_CASES)
def test_preconditioner_matrix_symmetric_positive_definite(sigma):
    params, phi, y = problem(seed=3, a_scale=2.0)
    P = np.asarray(theory.preconditioner_matrix(params, GAMMA, sigma), np.float64)
    assert P.shape == (18, 18)
    assert np.linalg.norm(P - P.T) / np.linalg.norm(P) < tol(1e-13, 1e-5)
    assert np.linalg.eigvalsh(P)[0] > 0
    G = normal(4, (3, 6))
    assert rel(P @ np.asarray(G).ravel(), theory.induced_preconditioner(params, G, GAMMA, sigma).ravel()) < tol(
        1e-13, 1e-5)
    # the first term alone, G (U U^T)^{-1}, is a lower bound: P - (U U^T)^{-1} (x) I is positive semi-definite
    U = np.asarray(theory.u_matrix(params["A"], GAMMA, sigma), np.float64)
    first = np.kron(np.eye(3), np.linalg.inv(U @ U.T))
    assert np.linalg.eigvalsh(P - first)[0] > -tol(1e-12, 1e-4) * np.linalg.eigvalsh(P)[-1]


def test_trust_region_relation_content():
    """What is not automatic: M is a norm iff eta < eta_limit = 1 / lambda_max(P H); the step's relation to the
    shallow Newton step. The KKT residual holds for every eta (it is M's construction), so it is no evidence."""
    params, phi, y = problem(seed=5, a_scale=0.5)
    eta = 0.5 / (float(theory.feature_spectrum(phi)["lambda_max"]) * float(theory.u_inverse_norm(params["A"],
                                                                                              GAMMA)) ** 2)
    r1 = theory.trust_region_check(params, phi, y, eta, GAMMA, lam=1.0)
    assert r1["velocity_rel_error"] < tol(1e-9, 1e-4) and r1["P_asymmetry"] < tol(1e-13, 1e-5)
    assert r1["M_positive_definite"] and abs(r1["step_size_ratio"] - eta / r1["eta_limit"]) < 1e-12
    # just below and just above the limit: definiteness flips exactly there
    below = theory.trust_region_check(params, phi, y, 0.99 * r1["eta_limit"], GAMMA)
    above = theory.trust_region_check(params, phi, y, 1.01 * r1["eta_limit"], GAMMA)
    assert below["M_positive_definite"] and not above["M_positive_definite"] and above["M_min_eig"] < 0
    assert above["kkt_residual"] < tol(1e-10, 1e-4) and below["kkt_residual"] < tol(1e-10, 1e-4)
    # the shallow Newton step: the square loss's model decrease q(v_N) is the whole gap L - L*
    G = np.asarray(theory.square_loss_gradient(theory.end_to_end(params["A"], params["B"], GAMMA), phi, y))
    _, L_star = theory.shallow_optimum_square(phi, y)
    assert 0 < r1["model_decrease_ratio"] <= 1 and -1 <= r1["newton_cosine"] <= 1
    gap = r1["loss"] - float(L_star)
    v = -eta * np.asarray(theory.induced_preconditioner(params, jnp.asarray(G, F64), GAMMA))
    C = np.asarray(theory.feature_gram(phi), np.float64)
    q_v = float(np.sum(G * v) + 0.5 * np.sum((v @ C) * v))
    assert abs(r1["model_decrease_ratio"] - q_v / -gap) < tol(1e-9, 1e-3)
    # any lam > 0 scales M (and delta) without changing its definiteness
    r2 = theory.trust_region_check(params, phi, y, eta, GAMMA, lam=2.0)
    rb = theory.trust_region_check(params, phi, y, eta, GAMMA, lam="balanced")
    assert abs(r2["M_min_eig"] - r1["M_min_eig"] / 2) < tol(1e-9, 1e-3) * r1["M_min_eig"]
    assert abs(r2["delta"] - r1["delta"] / np.sqrt(2)) < tol(1e-9, 1e-3) * r1["delta"]
    assert rb["lambda"] > 0 and rb["M_positive_definite"]


@SLOW
def test_trust_region_check_on_digits():
    """The setting measured in docs/theory.md section 5: digits, standardised + bias, gamma 0.8, DELM init."""
    from experiments.common.datasets import load_dataset, one_hot, preprocess
    ds = load_dataset("digits", download=False)
    pp = preprocess(ds, features="standardize", add_bias=True)
    phi, y = jnp.asarray(pp.x_train, F64), jnp.asarray(one_hot(pp.y_train, 10), F64)
    m = phi.shape[1]
    params = DELM(width=m, out_dim=10, gamma=GAMMA).init(jax.random.PRNGKey(0), F64)
    eta = (1 - GAMMA) ** 2 / float(theory.feature_spectrum(phi)["lambda_max"])
    r = theory.trust_region_check(params, phi, y, eta, GAMMA)
    assert r["velocity_rel_error"] < tol(1e-9, 1e-4) and r["M_positive_definite"]
    assert abs(r["P_min_eig"] - 0.97) < 0.01 and 5.5 < r["M_min_eig"] < 6.5 and r["step_size_ratio"] < 1
    assert 0 < r["model_decrease_ratio"] <= 1


# ----------------------------------------------------------------------------- rate bound (sections 4 and 9)

def rate_problem():
    _, phi, y = problem(seed=12)
    return (phi - phi.mean(0)) / phi.std(0), y


def numpy_gd(params, phi, y, eta, steps=150):
    """Full-batch GD on the DELM in NumPy float64 with the gradients of docs/theory.md section 3 (an implementation
    independent of the library): the losses and A_t before each step."""
    A, B = (np.asarray(params[k], np.float64) for k in ("A", "B"))
    phi, y = np.asarray(phi, np.float64), np.asarray(y, np.float64)
    losses, A_history = [], []
    for _ in range(steps):
        S = np.exp(A - A.max(axis=0))
        S /= S.sum(axis=0)
        U = np.eye(len(A)) - GAMMA * S
        W = np.linalg.solve(U.T, B.T).T
        R = phi @ W.T - y
        losses.append(0.5 * np.mean(np.sum(R * R, axis=1)))
        A_history.append(A)
        GUt = np.linalg.solve(U, (R.T @ phi / len(phi)).T).T  # dL/dB = G U^{-T}
        D = GAMMA * W.T @ GUt  # dL/dsigma(A)
        A, B = A - eta * S * (D - np.sum(S * D, axis=0)), B - eta * GUt  # column-softmax vjp
    return np.array(losses), jnp.asarray(np.stack(A_history), F64)


def check_rate_bound(losses, A_history, phi, y, eta):
    spec = theory.feature_spectrum(phi)
    _, L_star = theory.shallow_optimum_square(phi, y)
    norms = theory.u_norms(A_history, GAMMA)  # batched over the run's history
    u_norms = np.asarray(norms["U_norm2"])
    for t in (0, len(u_norms) - 1):  # against NumPy float64
        U = np.asarray(theory.u_matrix(A_history[t], GAMMA), np.float64)
        assert abs(u_norms[t] - np.linalg.norm(U, 2)) < tol(1e-12, 1e-5) * u_norms[t]
        inv = np.linalg.norm(np.linalg.inv(U), 2)
        assert abs(float(norms["U_inv_norm2"][t]) - inv) < tol(1e-11, 1e-4) * inv
    gaps = np.asarray(losses, np.float64) - float(L_star)
    assert gaps[-1] < 0.1 * gaps[0] and np.all(gaps > 0)
    ratios = gaps[1:] / gaps[:-1]
    bound = np.asarray(theory.gd_rate_bound(eta, spec["lambda_min_plus"], u_norms[:-1]))
    assert bound.shape == (len(gaps) - 1,) and np.all((bound > 0) & (bound < 1))
    # float32: a gap of 1e-1 relative carries ~1e-6 / gap relative rounding: each ratio is known to ~1e-5
    assert np.max(ratios - bound) <= tol(0.0, 1e-4)
    # the bound along the run
    along = np.asarray(theory.flow_bound(gaps[0], spec["lambda_min_plus"], u_norms, eta))
    assert along.shape == gaps.shape and along[0] == pytest.approx(gaps[0], rel=tol(1e-15, 1e-6))
    assert np.all(gaps <= along * (1 + tol(1e-12, 1e-3)))
    # with lambda_max in place of lambda_min^+ the "bound" is violated: the check can fail
    wrong = np.asarray(theory.gd_rate_bound(eta, spec["lambda_max"], u_norms[:-1]))
    assert np.max(ratios - wrong) > 1e-3


def test_gd_rate_bound_holds_on_a_delm_run():
    """The per-step form of section 4 on a GD run from the DELM's init, at the justified step size."""
    phi, y = rate_problem()
    rng = np.random.default_rng(13)  # the DELM's init scale: A, B ~ 0.1 N(0, 1)
    params = {"A": jnp.asarray(0.1 * rng.standard_normal((6, 6)), F64),
              "B": jnp.asarray(0.1 * rng.standard_normal((3, 6)), F64)}
    eta = float(theory.learning_rate_limit(theory.feature_spectrum(phi)["lambda_max"],
                                           theory.u_inverse_norm(params["A"], GAMMA),
                                           theory.spectral_norm(theory.end_to_end(params["A"], params["B"], GAMMA)),
                                           GAMMA))
    losses, A_history = numpy_gd(params, phi, y, eta)
    check_rate_bound(losses, A_history, phi, y, eta)


@SLOW
def test_gd_rate_bound_holds_on_the_library_training_path():
    """The same through the library's make_step (a Python loop) and full_batch_gd (one lax.scan)."""
    phi, y = rate_problem()
    model = DELM(width=6, out_dim=3, gamma=GAMMA, tol=tol(1e-12, 1e-6))
    params = model.init(jax.random.PRNGKey(13), F64)
    eta = float(theory.learning_rate_limit(theory.feature_spectrum(phi)["lambda_max"],
                                           theory.u_inverse_norm(params["A"], GAMMA),
                                           theory.spectral_norm(model.end_to_end(params)), GAMMA))
    step = make_step(model, "square", optax.sgd(eta))
    p, opt_state = params, optax.sgd(eta).init(params)
    losses, a_history = [], []
    for _ in range(150):
        a_history.append(p["A"])  # A_t before step t: the U_t of that step's bound
        p, opt_state, metrics = step(p, opt_state, phi, y)
        losses.append(float(metrics["loss"]))
    _, history = full_batch_gd(model, "square", params, phi, y, learning_rate=eta, steps=150)
    np.testing.assert_allclose(np.asarray(history["loss"]), losses, rtol=tol(1e-12, 1e-5))
    check_rate_bound(np.array(losses), jnp.stack(a_history), phi, y, eta)


def test_gd_rate_bound_broadcasts():
    b = theory.gd_rate_bound(0.1, 0.5, jnp.array([1.0, 2.0], F64))
    np.testing.assert_allclose(np.asarray(b), [1 - 0.1, 1 - 0.1 / 4], rtol=tol(1e-15, 1e-7))
    b2 = theory.gd_rate_bound(jnp.array([[0.1], [0.2]], F64), 0.5, jnp.array([1.0, 2.0], F64))
    assert b2.shape == (2, 2)
    np.testing.assert_allclose(np.asarray(theory.flow_bound(2.0, 0.5, jnp.array([1.0, 1.0, 1.0], F64), 0.1)),
                               [2.0, 1.8, 1.62], rtol=tol(1e-14, 1e-6))


# ----------------------------------------------------------------------------- log-linear fit

def test_fit_log_linear_recovers_geometric_rate():
    gaps = 3.0 * 0.97 ** np.arange(200)
    fit = theory.fit_log_linear(gaps)
    assert abs(fit["rate"] - 0.97) < 1e-12 and fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit["window"] == (0, 200) and fit["points"] == 200
    fit = theory.fit_log_linear(gaps, start=10, stop=50)
    assert fit["window"] == (10, 50) and abs(fit["rate"] - 0.97) < 1e-12
    # logged every 5 steps
    fit = theory.fit_log_linear(gaps[::5], steps=np.arange(0, 200, 5))
    assert abs(fit["rate"] - 0.97) < 1e-12


def test_fit_log_linear_band_selects_the_tail():
    # a fast transient (rate 0.5) down to 1e-2, then rate 0.9 down to a rounding floor of zeros
    head = 1.0 * 0.5 ** np.arange(7)  # 1 ... 0.0156
    tail = 1e-2 * 0.9 ** np.arange(200)  # 1e-2 ... 7e-12
    gaps = np.concatenate([head, tail, np.zeros(5), [1e-3]])
    fit = theory.fit_log_linear(gaps, lo=1e-9, hi=1e-2)
    i0, i1 = fit["window"]
    assert np.all(gaps[i0:i1] < 1e-2) and np.all(gaps[i0:i1] > 1e-9)
    assert i0 == 8 and gaps[i1] <= 1e-9  # first index below hi; stops at the first gap <= lo
    assert abs(fit["rate"] - 0.9) < 1e-12 and fit["r2"] > 1 - 1e-12
    whole = theory.fit_log_linear(gaps, stop=7 + 200)
    assert whole["r2"] < fit["r2"] and abs(whole["rate"] - 0.9) > 1e-3
    with pytest.raises(ValueError, match="at least 3"):
        theory.fit_log_linear(gaps, lo=1e-3, hi=1.1e-3)
    with pytest.raises(ValueError, match="lo < hi"):
        theory.fit_log_linear(gaps, lo=1e-2, hi=1e-9)


# ----------------------------------------------------------------------------- transformations and errors

def check_under_jit(functions):
    params, phi, y = problem(seed=6, a_scale=1.0)
    G = normal(1, (3, 6))

    def everything(p, g, x, t):
        return {name: fn(p, g, x, t) for name, fn in functions.items()}

    eager, jitted = everything(params, G, phi, y), jax.jit(everything)(params, G, phi, y)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol(1e-12, 1e-4), atol=tol(1e-14, 1e-5))


def test_array_functions_work_under_jit():
    check_under_jit({
        "W": lambda p, g, x, t: theory.end_to_end(p["A"], p["B"], GAMMA),
        "PG": lambda p, g, x, t: theory.induced_preconditioner(p, g, GAMMA),
        "grad": lambda p, g, x, t: theory.parameter_gradient(p, g, GAMMA),
        "opt": lambda p, g, x, t: theory.shallow_optimum_square(x, t),
        "spec": lambda p, g, x, t: theory.feature_spectrum(x),
        "G": lambda p, g, x, t: theory.square_loss_gradient(g, x, t),
        "norms": lambda p, g, x, t: theory.u_norms(p["A"], GAMMA),
        "bound": lambda p, g, x, t: theory.flow_bound(1.0, 0.1, jnp.ones(4, F64), 0.1)})
    # gamma may be traced (sweeps vmap over it)
    params, _, _ = problem(seed=6)
    Ws = jax.vmap(lambda g: theory.end_to_end(params["A"], params["B"], g))(jnp.array([0.5, 0.8], F64))
    assert rel(Ws[1], theory.end_to_end(params["A"], params["B"], 0.8)) < tol(1e-14, 1e-6)


@SLOW
def test_derivative_functions_work_under_jit():
    check_under_jit({
        "v": lambda p, g, x, t: theory.delm_w_velocity(p, {"A": p["A"], "B": g}, GAMMA),
        "next": lambda p, g, x, t: theory.predict_w_step(p, g, 0.01, GAMMA),
        "check": lambda p, g, x, t: theory.w_step_check(p, theory.end_to_end(p["A"], p["B"], GAMMA) + 0.01 * g, g,
                                                        0.01, GAMMA),
        "grad_ce": lambda p, g, x, t: theory.cross_entropy_gradient(g, x, jax.nn.softmax(t), 0.1)})


def test_bad_input_errors():
    params, phi, y = problem(seed=0)
    with pytest.raises(ValueError, match="y must have one row per row of phi"):
        theory.shallow_optimum_square(phi, y[:7])
    with pytest.raises(ValueError, match="rank 2"):
        theory.shallow_optimum_square(phi[0], y)
    with pytest.raises(TypeError, match="phi must be a floating-point array"):
        theory.feature_spectrum(jnp.ones((3, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"W must have shape \(3, 6\)"):
        theory.square_loss_gradient(jnp.ones((6, 3), F64), phi, y)
    with pytest.raises(ValueError, match="A must be square"):
        theory.end_to_end(jnp.ones((3, 6), F64), jnp.ones((3, 6), F64), GAMMA)
    with pytest.raises(ValueError, match=r"B must have shape \(\*, 6\)"):
        theory.end_to_end(params["A"], jnp.ones((3, 5), F64), GAMMA)
    with pytest.raises(ValueError, match="gamma must be a number in the open interval"):
        theory.u_matrix(params["A"], 1.0)
    with pytest.raises(ValueError, match="unknown sigma"):
        theory.u_matrix(params["A"], GAMMA, "softmax")
    with pytest.raises(ValueError, match="A must be square matrices"):
        theory.u_norms(jnp.ones((2, 3, 4), F64), GAMMA)
    with pytest.raises(ValueError, match="m must be a positive integer"):
        theory.u_inverse_norm_bound(0, GAMMA)
    with pytest.raises(ValueError, match="keys 'A' and 'B'"):
        theory.induced_preconditioner({"A": params["A"]}, params["B"], GAMMA)
    with pytest.raises(ValueError, match=r"G must have shape \(3, 6\)"):
        theory.induced_preconditioner(params, jnp.ones((6, 3), F64), GAMMA)
    with pytest.raises(ValueError, match=r"phi must have shape \(\*, 6\)"):
        theory.trust_region_check(params, jnp.ones((25, 5), F64), y, 0.1, GAMMA)
    with pytest.raises(ValueError, match="lam must be a positive number"):
        theory.trust_region_check(params, phi, y, 0.1, GAMMA, lam=0.0)
    with pytest.raises(ValueError, match="learning_rate must be a positive number"):
        theory.trust_region_check(params, phi, y, -0.1, GAMMA)
    with pytest.raises(ValueError, match="labels must lie in"):
        theory.shallow_optimum_cross_entropy(phi, jnp.arange(25) % 5, 4)
    with pytest.raises(ValueError, match=r"labels must have shape \(25\)"):
        theory.shallow_optimum_cross_entropy(phi, jnp.zeros((9,), jnp.int32), 4)
    with pytest.raises(ValueError, match="l2 must be a positive number"):
        theory.shallow_optimum_cross_entropy(phi, jnp.zeros((25,), jnp.int32), 4, l2=0.0)
    with pytest.raises(ValueError, match=r"targets must have shape \(25, \*\)"):
        theory.cross_entropy_gradient(jnp.ones((3, 6), F64), phi, jnp.ones((7, 3), F64))
    with pytest.raises(ValueError, match="rtol must be"):
        theory.feature_spectrum(phi, rtol=-1.0)
    with pytest.raises(ValueError, match="rtol must be"):
        theory.min_norm_solution(phi, y, rtol=1.0)
    with pytest.raises(ValueError, match="gaps must be a 1-D"):
        theory.fit_log_linear(np.ones((3, 3)))
    with pytest.raises(ValueError, match="steps must have the shape"):
        theory.fit_log_linear(np.ones(5), steps=np.arange(4))
    with pytest.raises(ValueError, match="U_norm2_history must be a 1-D"):
        theory.flow_bound(1.0, 0.1, jnp.ones((2, 2), F64), 0.1)
    with pytest.raises(ValueError, match="contains NaN"):
        theory.feature_spectrum(jnp.full((3, 2), jnp.nan, F64))


def test_precision_warning_says_when_float64_is_missing():
    """With x64 off the optima and spectra say they are float32 (a PrecisionWarning naming the fix); with it on,
    they are float64 whatever the input dtype."""
    _, phi, y = problem(seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        W, _ = theory.shallow_optimum_square(phi.astype(jnp.float32), y.astype(jnp.float32))
    flagged = [w for w in caught if issubclass(w.category, theory.PrecisionWarning)]
    if X64:
        assert W.dtype == jnp.float64 and not flagged
    else:
        assert W.dtype == jnp.float32 and flagged and "jax_enable_x64" in str(flagged[0].message)
