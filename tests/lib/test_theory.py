"""deq_jax.theory: the closed form, the shallow optimum and its spectrum, the PL inequality, the rate bound on a real
GD run, the induced preconditioner against forward-mode and finite-difference velocities, the trust-region check on
digits, the log-linear fit and argument errors. Every check here has a counterpart that would fail if the claim
were wrong (a wrong preconditioner, a too-large PL constant, a too-large step)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deq_jax import theory
from experiments.common.datasets import load_dataset, one_hot, preprocess
from deq_jax.maps import get_sigma
from deq_jax.models import DELM
from deq_jax.train import full_batch_gd, make_step, objective

F64 = jnp.float64
GAMMA = 0.8
SIGMAS = ["column_softmax", "row_softmax", "scaled_tanh"]


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
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def rank_deficient_phi(n=12, m=20, rank=None, seed=3):
    """n < m (or a given rank through a product of thin factors): a non-trivial null space."""
    r = min(n, m) if rank is None else rank
    return normal(seed, (n, r)) @ normal(seed + 1, (r, m))


# ----------------------------------------------------------------------------- closed form

@pytest.mark.parametrize("sigma", SIGMAS)
def test_end_to_end_matches_delm_model_and_per_sample_solve(sigma):
    params, phi, _ = problem(seed=1, a_scale=2.0)
    W = theory.end_to_end(params["A"], params["B"], GAMMA, sigma)
    assert W.shape == (3, 6) and W.dtype == F64
    W_model = jax.jit(DELM(width=6, out_dim=3, gamma=GAMMA, sigma=sigma).end_to_end)(params)
    assert rel(W, W_model) < 1e-12
    # the generic DEQ form: z_i = gamma sigma(A) z_i + phi_i for every sample, predictions z @ B.T
    pred, _ = jax.jit(DELM(width=6, out_dim=3, gamma=GAMMA, sigma=sigma, formulation="per_sample").apply)(params, phi)
    assert rel(phi @ W.T, pred) < 1e-12
    # and the defining equilibrium W = B + gamma W sigma(A)
    assert rel(params["B"] + GAMMA * W @ get_sigma(sigma)(params["A"]), W) < 1e-13


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0, 100.0])
def test_u_matrix_column_stochastic_and_norm_bound(scale):
    m = 9
    A = scale * normal(2, (m, m))
    s = get_sigma("column_softmax")(A)
    np.testing.assert_allclose(np.asarray(s.sum(axis=0)), np.ones(m), atol=1e-14)
    U = theory.u_matrix(A, GAMMA)
    # 1^T U = (1 - gamma) 1^T: the direction in which U^{-1} amplifies by 1 / (1 - gamma)
    np.testing.assert_allclose(np.asarray(U.sum(axis=0)), np.full(m, 1 - GAMMA), atol=1e-14)
    norm = float(theory.spectral_norm(U))
    assert abs(norm - np.linalg.norm(np.asarray(U), 2)) < 1e-13
    assert norm <= 1 + GAMMA * np.sqrt(m)


def test_spectral_norm_batched():
    M = normal(0, (4, 5, 3))
    np.testing.assert_allclose(np.asarray(theory.spectral_norm(M)), [np.linalg.norm(np.asarray(x), 2) for x in M],
                               rtol=1e-13)


# ----------------------------------------------------------------------------- shallow optimum and spectrum

def test_shallow_optimum_square_full_rank_matches_lstsq():
    _, phi, y = problem(seed=4)
    W, L = theory.shallow_optimum_square(phi, y)
    assert W.shape == (3, 6) and W.dtype == F64
    assert float(jnp.linalg.norm(theory.square_loss_gradient(W, phi, y))) < 1e-13
    W_np = np.linalg.lstsq(np.asarray(phi), np.asarray(y), rcond=None)[0].T
    assert rel(W, W_np) < 1e-12
    residual = np.asarray(phi) @ W_np.T - np.asarray(y)
    assert abs(float(L) - 0.5 * np.mean(np.sum(residual ** 2, axis=1))) < 1e-14
    assert rel(theory.min_norm_solution(phi, y), W) == 0.0
    # any other W is worse
    W2 = W + 1e-3 * normal(5, W.shape)
    assert float(optax.l2_loss(phi @ W2.T, y).sum(1).mean()) > float(L)


@pytest.mark.parametrize("shape", [(12, 20, None), (25, 6, 3)])
def test_shallow_optimum_square_rank_deficient_is_minimum_norm(shape):
    n, m, r = shape
    phi = rank_deficient_phi(n, m, r)
    y = normal(6, (n, 3))
    W, L = theory.shallow_optimum_square(phi, y)
    assert float(jnp.linalg.norm(theory.square_loss_gradient(W, phi, y))) < 1e-12
    # the rows of W* lie in the row space of phi: orthogonal to its null space
    _, s, Vt = np.linalg.svd(np.asarray(phi))
    rank = int(np.sum(s > max(n, m) * np.finfo(np.float64).eps * s[0]))
    null = Vt[rank:].T
    assert null.shape[1] == m - rank > 0
    assert np.linalg.norm(np.asarray(W) @ null) < 1e-12 * np.linalg.norm(np.asarray(W))
    assert rel(W, (np.linalg.pinv(np.asarray(phi)) @ np.asarray(y)).T) < 1e-10
    # another minimiser (add a null-space component): same loss, larger norm
    W_other = W + jnp.asarray(np.ones((3, 1)) @ null[:, :1].T)
    L_other = 0.5 * jnp.mean(jnp.sum((phi @ W_other.T - y) ** 2, axis=1))
    assert abs(float(L_other) - float(L)) < 1e-10
    assert float(jnp.linalg.norm(W_other)) > float(jnp.linalg.norm(W))


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_feature_spectrum_matches_eigvalsh(rank_deficient):
    phi = rank_deficient_phi(25, 6, 3) if rank_deficient else problem(seed=7)[1]
    spec = theory.feature_spectrum(phi)
    eig = np.linalg.eigvalsh(np.asarray(phi.T @ phi) / 25)
    assert int(spec["rank"]) == np.linalg.matrix_rank(np.asarray(phi)) == (3 if rank_deficient else 6)
    assert abs(float(spec["lambda_max"]) - eig[-1]) < 1e-12 * eig[-1]
    expected_min = eig[-3] if rank_deficient else eig[0]  # smallest of the nonzero ones
    assert abs(float(spec["lambda_min_plus"]) - expected_min) < 1e-10 * eig[-1]
    # an explicit rtol above the smallest nonzero eigenvalue moves lambda_min_plus up
    spec2 = theory.feature_spectrum(phi, rtol=1.0001 * expected_min / eig[-1])
    assert float(spec2["lambda_min_plus"]) > expected_min and int(spec2["rank"]) == int(spec["rank"]) - 1


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_pl_inequality_and_its_constant_is_sharp(rank_deficient):
    phi = rank_deficient_phi(12, 20) if rank_deficient else problem(seed=8)[1]
    n, m = phi.shape
    y = normal(9, (n, 3))
    W_star, L_star = theory.shallow_optimum_square(phi, y)
    lam = float(theory.feature_spectrum(phi)["lambda_min_plus"])
    loss = lambda W: 0.5 * jnp.mean(jnp.sum((phi @ W.T - y) ** 2, axis=1))  # noqa: E731
    for seed in range(5):
        W = normal(100 + seed, (3, m))
        G = theory.square_loss_gradient(W, phi, y)
        assert float(jnp.sum(G * G)) >= 2 * lam * float(loss(W) - L_star)
    # equality along the eigenvector of lambda_min^+: a constant 1% larger would be violated
    eig, vec = np.linalg.eigh(np.asarray(phi.T @ phi) / n)
    k = int(np.argmin(np.abs(eig - lam)))
    W = W_star + jnp.asarray(np.outer(np.ones(3), vec[:, k]))
    G = theory.square_loss_gradient(W, phi, y)
    ratio = float(jnp.sum(G * G)) / (2 * lam * float(loss(W) - L_star))
    assert abs(ratio - 1.0) < 1e-8


def test_shallow_optimum_cross_entropy():
    n, m, k = 25, 6, 3
    _, phi, _ = problem(seed=10)
    labels = jnp.asarray(np.random.default_rng(11).integers(0, k, n), jnp.int32)
    W, L, info = theory.shallow_optimum_cross_entropy(phi, labels, k, l2=1e-3, tol=1e-10)
    assert W.shape == (k, m) and info["converged"] and info["grad_norm"] <= 1e-10
    targets = jax.nn.one_hot(labels, k, dtype=F64)

    def fun(W):
        return optax.softmax_cross_entropy(phi @ W.T, targets).mean() + 0.5e-3 * jnp.sum(W * W)

    assert float(jnp.linalg.norm(jax.grad(fun)(W))) <= 1e-10  # checked independently of the solver's own report
    assert abs(float(fun(W)) - float(L)) < 1e-14
    assert abs(info["cross_entropy"] - (float(L) - 0.5e-3 * float(jnp.sum(W * W)))) < 1e-13
    for seed in range(3):
        W_rand = normal(200 + seed, (k, m))
        assert float(fun(W_rand)) > float(L)
        assert float(fun(W + 1e-4 * W_rand)) >= float(L)
    # one-hot targets give the same optimum; a capped solver says it did not converge
    W2, _, _ = theory.shallow_optimum_cross_entropy(phi, targets, k, l2=1e-3)
    assert rel(W2, W) < 1e-8
    with pytest.raises(theory.OptimumNotConverged, match="tol"):
        theory.shallow_optimum_cross_entropy(phi, labels, k, l2=1e-3, maxiter=1)
    _, _, info = theory.shallow_optimum_cross_entropy(phi, labels, k, l2=1e-3, maxiter=1, on_failure="ignore")
    assert not info["converged"] and info["iterations"] == 1


# ----------------------------------------------------------------------------- induced preconditioner (section 5)

@jax.jit(static_argnames=("model",))
def _model_grads(params, phi, y, model):
    return jax.grad(lambda p: objective(model, "square")(p, phi, y)[0])(params)


def model_grads(params, phi, y, sigma):
    """dL/dA, dL/dB from the DELM model's own path (direct solve, implicit differentiation at a tight tol)."""
    m_y, m = params["B"].shape
    return _model_grads(params, phi, y, DELM(width=m, out_dim=m_y, gamma=GAMMA, sigma=sigma, tol=1e-13))


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("seed", [0, 1])
def test_induced_preconditioner_equals_forward_mode_velocity(sigma, seed):
    params, phi, y = problem(seed=seed, a_scale=1.5)
    grads = model_grads(params, phi, y, sigma)
    velocity = theory.delm_w_velocity(params, grads, GAMMA, sigma)
    W = theory.end_to_end(params["A"], params["B"], GAMMA, sigma)
    G = theory.square_loss_gradient(W, phi, y)
    P_G = theory.induced_preconditioner(params, G, GAMMA, sigma)
    assert rel(velocity, -P_G) < 1e-9
    # and a central finite difference of W along the gradient direction (error O(h^2))
    h = 1e-5
    w_at = lambda t: theory.end_to_end(params["A"] - t * grads["A"], params["B"] - t * grads["B"], GAMMA, sigma)  # noqa
    assert rel((w_at(h) - w_at(-h)) / (2 * h), -P_G) < 1e-7


def test_wrong_preconditioner_does_not_match():
    """(U^T U)^{-1} in place of (U U^T)^{-1} is measurably wrong, so the test above can fail."""
    params, phi, y = problem(seed=2, a_scale=1.5)
    grads = model_grads(params, phi, y, "column_softmax")
    velocity = theory.delm_w_velocity(params, grads, GAMMA)
    G = theory.square_loss_gradient(theory.end_to_end(params["A"], params["B"], GAMMA), phi, y)
    P_G = theory.induced_preconditioner(params, G, GAMMA)
    U = theory.u_matrix(params["A"], GAMMA)
    wrong = P_G - G @ jnp.linalg.inv(U @ U.T) + G @ jnp.linalg.inv(U.T @ U)
    assert rel(velocity, -P_G) < 1e-9
    assert rel(velocity, -wrong) > 1e-2
    # and without the K K^* term (plain B-only dynamics) it is wrong too
    assert rel(velocity, -G @ jnp.linalg.inv(U @ U.T)) > 1e-2


@pytest.mark.parametrize("sigma", SIGMAS)
def test_preconditioner_matrix_symmetric_positive_definite(sigma):
    params, phi, y = problem(seed=3, a_scale=2.0)
    P = theory.preconditioner_matrix(params, GAMMA, sigma)
    assert P.shape == (18, 18)
    assert float(jnp.linalg.norm(P - P.T) / jnp.linalg.norm(P)) < 1e-13
    assert float(jnp.linalg.eigvalsh(P)[0]) > 0
    G = normal(4, (3, 6))
    assert rel(P @ G.ravel(), theory.induced_preconditioner(params, G, GAMMA, sigma).ravel()) < 1e-13
    # the first term alone, G (U U^T)^{-1}, is a lower bound: P - (U U^T)^{-1} (x) I is positive semi-definite
    U = theory.u_matrix(params["A"], GAMMA, sigma)
    first = jnp.kron(jnp.eye(3, dtype=F64), jnp.linalg.inv(U @ U.T))
    assert float(jnp.linalg.eigvalsh(P - first)[0]) > -1e-12


def test_trust_region_check_on_digits():
    ds = load_dataset("digits", download=False)
    pp = preprocess(ds, features="standardize", add_bias=True)
    phi, y = jnp.asarray(pp.x_train, F64), jnp.asarray(one_hot(pp.y_train, 10), F64)
    m = phi.shape[1]
    params = DELM(width=m, out_dim=10, gamma=GAMMA).init(jax.random.PRNGKey(0), F64)
    lambda_max = float(theory.feature_spectrum(phi)["lambda_max"])
    eta = (1 - GAMMA) ** 2 / lambda_max
    r = theory.trust_region_check(params, phi, y, eta, GAMMA)
    assert r["velocity_rel_error"] < 1e-9
    assert r["M_positive_definite"] and r["kkt_residual"] < 1e-10
    # docs/theory.md section 5 measured P's smallest eigenvalue 0.97 and M's 6.0 (lam = 1) at this setting
    assert abs(r["P_min_eig"] - 0.97) < 0.01 and 5.5 < r["M_min_eig"] < 6.5 and r["P_asymmetry"] < 1e-13
    assert r["delta"] > 0 and -1 < r["cosine_vs_gd"] < 1


def test_trust_region_check_step_size_and_lambda():
    params, phi, y = problem(seed=5, a_scale=0.5)
    eta = (1 - GAMMA) ** 2 / float(theory.feature_spectrum(phi)["lambda_max"])
    r1 = theory.trust_region_check(params, phi, y, eta, GAMMA, lam=1.0)
    assert r1["velocity_rel_error"] < 1e-9 and r1["kkt_residual"] < 1e-10 and r1["M_positive_definite"]
    # the relation needs a small enough step: at 20x this step (eta > 1 / lambda_max) M is no longer a norm
    r_big = theory.trust_region_check(params, phi, y, 20 * eta, GAMMA)
    assert not r_big["M_positive_definite"] and r_big["M_min_eig"] < 0
    assert r_big["kkt_residual"] < 1e-10  # the KKT identity holds by construction either way
    # any lam > 0 scales M (and delta) without changing its definiteness
    r2 = theory.trust_region_check(params, phi, y, eta, GAMMA, lam=2.0)
    rb = theory.trust_region_check(params, phi, y, eta, GAMMA, lam="balanced")
    assert abs(r2["M_min_eig"] - r1["M_min_eig"] / 2) < 1e-9 * r1["M_min_eig"]
    assert abs(r2["delta"] - r1["delta"] / np.sqrt(2)) < 1e-9 * r1["delta"]
    assert rb["lambda"] > 0 and rb["M_positive_definite"] and rb["kkt_residual"] < 1e-10


# ----------------------------------------------------------------------------- rate bound (sections 4 and 9)

def test_gd_rate_bound_holds_on_a_delm_run():
    n, m, m_y, steps = 25, 6, 3, 300
    _, phi, y = problem(seed=12)
    phi = (phi - phi.mean(0)) / phi.std(0)
    model = DELM(width=m, out_dim=m_y, gamma=GAMMA, tol=1e-12)
    params = model.init(jax.random.PRNGKey(13), F64)
    spec = theory.feature_spectrum(phi)
    eta = (1 - GAMMA) ** 2 / float(spec["lambda_max"])
    _, L_star = theory.shallow_optimum_square(phi, y)

    step = make_step(model, "square", optax.sgd(eta))
    p, opt_state = params, optax.sgd(eta).init(params)
    losses, a_history = [], []
    for _ in range(steps):
        a_history.append(p["A"])  # A_t before step t: the U_t of that step's bound
        p, opt_state, metrics = step(p, opt_state, phi, y)
        losses.append(float(metrics["loss"]))
    losses = np.array(losses)
    u_norms = np.asarray(theory.spectral_norm(jax.vmap(lambda a: theory.u_matrix(a, GAMMA))(jnp.stack(a_history))))
    # the main job's path (one lax.scan) gives the same losses
    _, history = full_batch_gd(model, "square", params, phi, y, learning_rate=eta, steps=steps)
    np.testing.assert_allclose(np.asarray(history["loss"]), losses, rtol=1e-12)

    gaps = losses - float(L_star)
    assert gaps[-1] < 1e-2 * gaps[0] and np.all(gaps > 0)
    ratios = gaps[1:] / gaps[:-1]
    bound = np.asarray(theory.gd_rate_bound(eta, spec["lambda_min_plus"], u_norms[:-1]))
    assert bound.shape == (steps - 1,) and np.all((bound > 0) & (bound < 1))
    assert np.max(ratios - bound) <= 0.0
    # the bound along the run
    along = np.asarray(theory.flow_bound(gaps[0], spec["lambda_min_plus"], u_norms, eta))
    assert along.shape == (steps,) and along[0] == gaps[0]
    assert np.all(gaps <= along * (1 + 1e-12))
    # with lambda_max in place of lambda_min^+ the "bound" is violated: the check can fail
    wrong = np.asarray(theory.gd_rate_bound(eta, spec["lambda_max"], u_norms[:-1]))
    assert np.max(ratios - wrong) > 0


def test_gd_rate_bound_broadcasts():
    b = theory.gd_rate_bound(0.1, 0.5, jnp.array([1.0, 2.0], F64))
    np.testing.assert_allclose(np.asarray(b), [1 - 0.1, 1 - 0.1 / 4], rtol=1e-15)
    b2 = theory.gd_rate_bound(jnp.array([[0.1], [0.2]], F64), 0.5, jnp.array([1.0, 2.0], F64))
    assert b2.shape == (2, 2)
    np.testing.assert_allclose(np.asarray(theory.flow_bound(2.0, 0.5, jnp.array([1.0, 1.0, 1.0], F64), 0.1)),
                               [2.0, 1.8, 1.62], rtol=1e-14)


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

def test_array_functions_work_under_jit():
    params, phi, y = problem(seed=6, a_scale=1.0)
    G = normal(1, (3, 6))

    def everything(p, g, x, t):
        return {"W": theory.end_to_end(p["A"], p["B"], GAMMA),
                "PG": theory.induced_preconditioner(p, g, GAMMA),
                "v": theory.delm_w_velocity(p, {"A": p["A"], "B": g}, GAMMA),
                "opt": theory.shallow_optimum_square(x, t),
                "spec": theory.feature_spectrum(x),
                "G": theory.square_loss_gradient(jnp.ones((3, 6), F64), x, t),
                "norm": theory.spectral_norm(theory.u_matrix(p["A"], GAMMA)),
                "bound": theory.flow_bound(1.0, 0.1, jnp.ones(4, F64), 0.1)}

    eager, jitted = everything(params, G, phi, y), jax.jit(everything)(params, G, phi, y)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    # gamma may be traced (sweeps vmap over it)
    Ws = jax.vmap(lambda g: theory.end_to_end(params["A"], params["B"], g))(jnp.array([0.5, 0.8], F64))
    assert rel(Ws[1], theory.end_to_end(params["A"], params["B"], 0.8)) < 1e-14


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
    with pytest.raises(ValueError, match="rtol must be"):
        theory.feature_spectrum(phi, rtol=-1.0)
    with pytest.raises(ValueError, match="gaps must be a 1-D"):
        theory.fit_log_linear(np.ones((3, 3)))
    with pytest.raises(ValueError, match="steps must have the shape"):
        theory.fit_log_linear(np.ones(5), steps=np.arange(4))
    with pytest.raises(ValueError, match="U_norm2_history must be a 1-D"):
        theory.flow_bound(1.0, 0.1, jnp.ones((2, 2), F64), 0.1)
