"""Property-based tests (hypothesis): claims that must hold on every draw, each checked against a reference written
independently of the library (float64 NumPy, a dense `jnp.linalg.solve`, hand-written formulas).

(a) `solve`'s convergence rule `|f(z) - z| <= tol |f(z)| + atol` holds on the value it returns whenever it says
    `converged`, from any start, for every solver; and it says `converged` whenever the rule clearly holds;
(b) with `batch_axis=0` every sample satisfies the rule on its own, however different the samples' scales;
(c) implicit gradients equal those of the closed form `W = B (I - gamma sigma(A))^{-1}`;
(d) the losses equal their hand-written definitions at `n != m_y`;
(e) the bounds of `deq_jax.theory` hold and are reached within a stated factor (two-sided).

Compilation dominates: every jitted program takes the drawn numbers (gamma, tol, the sigma's index) as traced
arguments, and shapes come from a small fixed set, so the whole file compiles about twenty programs.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, X64, closed_form_end_to_end
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deq_jax import column_softmax, cross_entropy, logistic, row_softmax, scaled_tanh, solve, square, theory

pytestmark = pytest.mark.float32  # every property also holds with x64 off, at the tolerances stated per check

EPS = float(jnp.finfo(DTYPE).eps)
# derandomized: the same draws on every run (a failure reproduces; no example database is written)
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
SOLVERS = ("direct", "fixed_point", "anderson", "broyden")
SIGMAS = (column_softmax, row_softmax, scaled_tanh)


# ----------------------------------------------------------------------------- independent references (NumPy)


def np_sigma(k: int, A: np.ndarray) -> np.ndarray:
    """The three built-in sigmas written out in float64: column softmax, row softmax, tanh(A) / m."""
    if k == 2:
        return np.tanh(A) / A.shape[0]
    axis = 0 if k == 0 else 1
    E = np.exp(A - A.max(axis=axis, keepdims=True))
    return E / E.sum(axis=axis, keepdims=True)


def np_map(z, A, gamma, k, x):
    """The DELM layer `f(z) = gamma z sigma(A)^T + x` in float64, samples as rows."""
    return gamma * np.asarray(z, np.float64) @ np_sigma(k, np.asarray(A, np.float64)).T + np.asarray(x, np.float64)


# ----------------------------------------------------------------------------- the map under test


class GammaMap:
    """The DELM layer with gamma and the sigma's index as traced parameters (one compile serves every draw):
    `f(z, {"A", "gamma", "k"}, x) = gamma z sigma_k(A)^T + x`; affine, so the direct solver solves it exactly."""

    def _m(self, p):
        return p["gamma"] * jax.lax.switch(p["k"], SIGMAS, p["A"])

    def __call__(self, z, p, x):
        return z @ self._m(p).T + x

    def affine(self, p, x):
        return self._m(p), x


F = GammaMap()


@functools.cache
def forward(solver: str, batch_axis):
    def run(z0, A, gamma, k, x, tol, atol):
        return solve(
            F,
            z0,
            {"A": A, "gamma": gamma, "k": k},
            x,
            solver=solver,
            tol=tol,
            atol=atol,
            maxiter=600,
            batch_axis=batch_axis,
        )

    return jax.jit(run)


def draw_problem(data, shape, m):
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    rng = np.random.default_rng(seed)
    scale = data.draw(st.sampled_from([0.1, 1.0, 5.0]), label="A scale")
    A = scale * rng.standard_normal((m, m))
    x = rng.standard_normal(shape)
    return rng, A, x


def start(kind, rng, shape, A, gamma, k, x):
    """zero, far (1e3 x), random, or warm: the exact equilibrium (float64 NumPy) plus a 1e-3 relative perturbation."""
    if kind == "zero":
        return np.zeros(shape)
    if kind == "far":
        return 1e3 * rng.standard_normal(shape)
    if kind == "random":
        return rng.standard_normal(shape)
    M = gamma * np_sigma(k, A)
    z_star = np.linalg.solve(np.eye(len(A)) - M, np.atleast_2d(x).T).T.reshape(shape)
    return z_star * (1 + 1e-3 * rng.standard_normal(shape))


TOLS = (1e-3, 1e-5, 1e-8) if X64 else (1e-3, 1e-5)
STARTS = ("zero", "far", "random", "warm")


def rounding(z, fz, m):
    """How far a float64 recomputation of `|f(z) - z|` may sit from the solver's own, in its dtype."""
    return 8 * EPS * np.sqrt(m) * (np.linalg.norm(fz) + np.linalg.norm(z))


# ----------------------------------------------------------------------------- (a) the rule on the value returned


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_converged_means_the_rule_holds_from_any_start(data):
    solver = data.draw(st.sampled_from(SOLVERS), label="solver")
    shape = data.draw(st.sampled_from([(5,), (4, 3)]), label="state shape")
    m = shape[-1]
    rng, A, x = draw_problem(data, shape, m)
    gamma = data.draw(st.floats(0.05, 0.9), label="gamma")
    k = data.draw(st.integers(0, 2), label="sigma")
    tol = data.draw(st.sampled_from(TOLS), label="tol")
    atol = data.draw(st.sampled_from([0.0, 1e-3]), label="atol")
    kind = data.draw(st.sampled_from(STARTS), label="start")
    z0 = start(kind, rng, shape, A, gamma, k, x)

    sol = forward(solver, None)(
        jnp.asarray(z0, DTYPE), jnp.asarray(A, DTYPE), gamma, k, jnp.asarray(x, DTYPE), tol, atol
    )
    z = np.asarray(sol.value, np.float64)
    fz = np_map(z, A, gamma, k, x)
    res, threshold = np.linalg.norm(fz - z), tol * np.linalg.norm(fz) + atol
    slack = rounding(z, fz, m)
    # gamma <= 0.9 and maxiter 600 leave every solver room to converge from every start (fixed point: ~330 steps
    # from the far start at tol 1e-8): a solver that stops early or never stops fails here
    assert bool(sol.stats.converged), (solver, kind, sol.stats)
    assert not bool(sol.stats.diverged)
    assert res <= threshold + slack, (solver, kind, res, threshold)
    # the statistics describe the value returned
    assert abs(float(sol.stats.residual) - res) <= slack + 1e-3 * res
    assert abs(float(sol.stats.relative_residual) - res / np.linalg.norm(fz)) <= (slack + 1e-3 * res) / np.linalg.norm(
        fz
    )


@functools.cache
def capped(solver: str):
    return jax.jit(
        lambda z0, A, g, k, x: solve(F, z0, {"A": A, "gamma": g, "k": k}, x, solver=solver, tol=1e-4, maxiter=3)
    )


@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_not_converged_is_reported_when_the_rule_fails(data):
    """maxiter too small for the requested tol: `converged` must then be False whenever the rule clearly fails on the
    returned value (and True whenever it clearly holds): the flag is the rule, measured, not the solver's hope."""
    solver = data.draw(st.sampled_from(SOLVERS[1:]), label="solver")
    rng, A, x = draw_problem(data, (5,), 5)
    gamma = data.draw(st.floats(0.85, 0.95), label="gamma")
    k = data.draw(st.integers(0, 2), label="sigma")
    z0 = start("far", rng, (5,), A, gamma, k, x)
    sol = capped(solver)(jnp.asarray(z0, DTYPE), jnp.asarray(A, DTYPE), gamma, k, jnp.asarray(x, DTYPE))
    z = np.asarray(sol.value, np.float64)
    fz = np_map(z, A, gamma, k, x)
    res, threshold = np.linalg.norm(fz - z), 1e-4 * np.linalg.norm(fz)
    if res > 2 * threshold:
        assert not bool(sol.stats.converged)
    if res < 0.5 * threshold:
        assert bool(sol.stats.converged)
    assert int(sol.stats.iterations) <= 3


# ----------------------------------------------------------------------------- (b) every sample on its own


@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_batch_axis_every_sample_satisfies_the_rule(data):
    """Samples whose scales differ by up to 1e7: a rule on the whole state's norm would let the small ones stop far
    from their equilibria; per sample, each must be within `tol` of its own."""
    solver = data.draw(st.sampled_from(SOLVERS), label="solver")
    n, m = 4, 3
    rng, A, x = draw_problem(data, (n, m), m)
    scales = data.draw(st.lists(st.sampled_from([1e-4, 1e-2, 1.0, 1e3]), min_size=n, max_size=n), label="scales")
    x = x * np.asarray(scales)[:, None]
    gamma = data.draw(st.floats(0.05, 0.9), label="gamma")
    k = data.draw(st.integers(0, 2), label="sigma")
    tol = data.draw(st.sampled_from(TOLS), label="tol")
    kind = data.draw(st.sampled_from(STARTS), label="start")
    z0 = start(kind, rng, (n, m), A, gamma, k, x)
    if kind == "far":
        z0 = z0 * np.asarray(scales)[:, None]  # far relative to each sample's own scale

    sol = forward(solver, 0)(jnp.asarray(z0, DTYPE), jnp.asarray(A, DTYPE), gamma, k, jnp.asarray(x, DTYPE), tol, 0.0)
    assert bool(sol.stats.converged), (solver, kind, sol.stats)
    z = np.asarray(sol.value, np.float64)
    fz = np_map(z, A, gamma, k, x)
    res = np.linalg.norm(fz - z, axis=1)
    scale = np.linalg.norm(fz, axis=1)
    slack = np.array([rounding(z[i], fz[i], m) for i in range(n)])
    assert np.all(res <= tol * scale + slack), (res / scale, tol)
    # the statistics report the worst sample
    assert abs(float(sol.stats.relative_residual) - np.max(res / scale)) <= np.max((slack + 1e-3 * res) / scale)
    assert abs(float(sol.stats.residual) - np.max(res)) <= np.max(slack + 1e-3 * res)


# ----------------------------------------------------------------------------- (c) implicit gradients


@functools.cache
def through_solve(solver: str, batch_axis):
    """Value and gradient of `sum(T * (z* B^T))` through `solve` (implicit backward) w.r.t. A, B, gamma, phi."""
    tol = 1e-11 if X64 else 1e-6

    def objective(A, B, gamma, phi, k, T):
        sol = solve(
            F,
            jnp.zeros_like(phi),
            {"A": A, "gamma": gamma, "k": k},
            phi,
            solver=solver,
            backward="implicit",
            tol=tol,
            maxiter=2000,
            batch_axis=batch_axis,
        )
        return jnp.sum(T * (sol.value @ B.T)), sol.stats.converged

    return jax.jit(jax.value_and_grad(objective, (0, 1, 2, 3), has_aux=True))


@jax.jit
@functools.partial(jax.value_and_grad, argnums=(0, 1, 2, 3))
def through_closed_form(A, B, gamma, phi, k, T):
    """The same through `z* = phi U^{-T}` by one dense solve (plain autodiff)."""
    W = closed_form_end_to_end(A, B, gamma, lambda a: jax.lax.switch(k, SIGMAS, a))
    return jnp.sum(T * (phi @ W.T))


@settings(max_examples=16, **SETTINGS)
@given(data=st.data())
def test_implicit_gradients_equal_the_closed_form(data):
    solver = data.draw(st.sampled_from(SOLVERS), label="solver")
    # one shape per batch mode (compiles): n > m > m_y unbatched, n < m < m_y per sample
    (n, m, m_y), batch_axis = data.draw(st.sampled_from([((5, 3, 2), None), ((2, 4, 6), 0)]), label="shape, batch")
    rng, A, phi = draw_problem(data, (n, m), m)
    gamma = data.draw(st.floats(0.05, 0.95), label="gamma")
    k = data.draw(st.integers(0, 2), label="sigma")
    B, T = rng.standard_normal((m_y, m)), rng.standard_normal((n, m_y))
    args = [jnp.asarray(a, DTYPE) for a in (A, B)] + [
        jnp.asarray(gamma, DTYPE),
        jnp.asarray(phi, DTYPE),
        k,
        jnp.asarray(T, DTYPE),
    ]
    (value, converged), grads = through_solve(solver, batch_axis)(*args)
    value_ref, grads_ref = through_closed_form(*args)
    assert bool(converged)
    # condition number of U is at most (1 + gamma) / (1 - gamma) <= 39 (1-norm): 1e-11 x 39 x a margin
    bound = 1e-7 if X64 else 5e-3
    assert abs(float(value) - float(value_ref)) <= bound * max(1.0, abs(float(value_ref)))
    for name, g, g_ref in zip(("A", "B", "gamma", "phi"), grads, grads_ref, strict=True):
        got, want = np.asarray(g, np.float64), np.asarray(g_ref, np.float64)
        assert np.linalg.norm(got - want) <= bound * max(np.linalg.norm(want), 1e-3), (name, solver, k)


# ----------------------------------------------------------------------------- (d) losses by hand


def np_logsumexp(z):
    top = z.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True)))[..., 0]


LOSS_SHAPES = [(5, 3), (2, 7), (1, 4)]  # n != m_y: a mean over the wrong axis changes the value
JIT_LOSSES = tuple(jax.jit(loss) for loss in (square, cross_entropy, logistic))  # one compile per shape, not per op


@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_losses_equal_their_definitions(data):
    n, m_y = data.draw(st.sampled_from(LOSS_SHAPES), label="(n, m_y)")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    scale = data.draw(st.sampled_from([0.1, 3.0, 30.0]), label="logit scale")
    z = scale * rng.standard_normal((n, m_y))
    y = rng.standard_normal((n, m_y))
    labels = rng.integers(0, m_y, n)
    soft = rng.uniform(0.0, 1.0, (n, m_y))
    soft /= soft.sum(axis=1, keepdims=True)
    one_hot = np.eye(m_y)[labels]
    bits = rng.integers(0, 2, n)
    Z, rtol = jnp.asarray(z, DTYPE), 4 * EPS * max(1.0, scale)
    square, cross_entropy, logistic = JIT_LOSSES

    def close(got, want):
        assert abs(float(got) - want) <= rtol * max(1.0, abs(want)) * 10, (float(got), want)

    # square: the mean over samples of 1/2 |row|^2 (not the mean over all entries)
    close(square(Z, jnp.asarray(y, DTYPE)), np.mean(0.5 * np.sum((z - y) ** 2, axis=1)))
    # cross-entropy: the mean over samples of -sum_k t_k log softmax(z)_k, for labels, one-hot and soft rows
    log_p = z - np_logsumexp(z)[:, None]
    ce_labels = -np.mean(log_p[np.arange(n), labels])
    close(cross_entropy(Z, jnp.asarray(labels, jnp.int32)), ce_labels)
    close(cross_entropy(Z, jnp.asarray(one_hot, DTYPE)), ce_labels)
    close(cross_entropy(Z, jnp.asarray(soft, DTYPE)), -np.mean(np.sum(soft * log_p, axis=1)))
    # logistic: the mean of log(1 + e^z) - t z over samples, logits (n,) or (n, 1)
    want = np.mean(np.logaddexp(0.0, z[:, 0]) - bits * z[:, 0])
    close(logistic(Z[:, 0], jnp.asarray(bits, DTYPE)), want)
    close(logistic(Z[:, :1], jnp.asarray(bits[:, None], jnp.int32)), want)


# ----------------------------------------------------------------------------- (e) the theory's bounds, two-sided


@functools.cache
def np_sup_u_inverse(m: int, gamma: float) -> float:
    """|U^{-1}|_2 in the concentrated limit sigma(A) = e_1 1^T: U^{-1} = I + gamma / (1 - gamma) e_1 1^T."""
    return float(np.linalg.norm(np.eye(m) + gamma / (1 - gamma) * np.outer(np.eye(m)[0], np.ones(m)), 2))


@settings(max_examples=40, **SETTINGS)
@given(
    m=st.sampled_from([2, 5, 9]),
    gamma=st.floats(0.02, 0.95),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    row_stochastic=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_u_inverse_norm_bound_holds_and_is_nearly_attained(m, gamma, scale, row_stochastic, seed):
    """1 / (1 - gamma) <= |U^{-1}|_2 <= bound for any A (the lower side: 1^T U = (1 - gamma) 1^T for column-
    stochastic sigma(A), U 1 = (1 - gamma) 1 for row-stochastic), and the bound is within a factor 1.35 of
    |U^{-1}|_2 at the concentrated A for m <= 9 (largest ratio over gamma: 1.07 at m = 2, 1.20 at 5, 1.32 at 9),
    so a bound 1.5 times too large fails."""
    bound = theory.u_inverse_norm_bound(m, gamma)
    assert bound == pytest.approx(np.sqrt(1 + (m - 1) * gamma) / (1 - gamma), rel=1e-14)
    sigma = "row_softmax" if row_stochastic else "column_softmax"
    A = scale * np.random.default_rng(seed).standard_normal((m, m))
    measured = float(theory.u_inverse_norm(jnp.asarray(A, DTYPE), gamma, sigma))
    U = np.eye(m) - gamma * np_sigma(1 if row_stochastic else 0, A)
    exact = np.linalg.norm(np.linalg.inv(U), 2)
    assert abs(measured - exact) <= 1e3 * EPS * exact
    assert 1 / (1 - gamma) * (1 - 1e3 * EPS) <= exact <= bound * (1 + 1e3 * EPS)
    # attained: every column of sigma(A) on row 0 (A[0] = 60); measured by the library, checked by NumPy above
    concentrated = jnp.zeros((m, m), DTYPE).at[0].set(60.0)
    peak = float(theory.u_inverse_norm(concentrated, gamma))
    assert abs(peak - np_sup_u_inverse(m, gamma)) <= 1e-6 * peak + 1e3 * EPS * peak
    assert bound <= 1.35 * peak


def np_jacobian_P(A, B, gamma):
    """`P = J J^T`, J the Jacobian of `(A, B) -> W = B U^{-1}` on row-major vec, by autodiff of the dense solve."""

    def w(a, b):
        return closed_form_end_to_end(a, b, gamma).ravel()

    JA, JB = jax.jacfwd(w, argnums=(0, 1))(jnp.asarray(A, DTYPE), jnp.asarray(B, DTYPE))
    J = np.concatenate(
        [np.asarray(JA, np.float64).reshape(B.size, -1), np.asarray(JB, np.float64).reshape(B.size, -1)], axis=1
    )
    return J @ J.T


@settings(max_examples=20, **SETTINGS)
@given(
    gamma=st.floats(0.1, 0.9),
    a_scale=st.sampled_from([0.1, 1.0, 3.0]),
    b_scale=st.sampled_from([0.1, 1.0, 5.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_step_size_bounds_hold_and_are_tight_up_to_their_stated_slack(gamma, a_scale, b_scale, seed):
    """preconditioner_norm_bound: `lambda_max(P) <= bound <= (1 + gamma^2 c^2 |W|^2) lambda_max(P)` (the lower
    side because `P >= (U U^T)^{-1} (x) I`, whose top eigenvalue is |U^{-1}|_2^2);
    learning_rate_limit: `1 / (kappa(C) (1 + gamma^2 c^2 |W|^2)) <= limit lambda_max(P H) <= 1`, with P from the
    Jacobian of the closed form, H = I (x) C and C = phi^T phi / n (kappa(C) its condition number)."""
    m, m_y, n = 4, 2, 9
    rng = np.random.default_rng(seed)
    A, B = a_scale * rng.standard_normal((m, m)), b_scale * rng.standard_normal((m_y, m))
    phi = rng.standard_normal((n, m))
    U = np.eye(m) - gamma * np_sigma(0, A)
    W = np.linalg.solve(U.T, B.T).T
    u_inv, w_norm = np.linalg.norm(np.linalg.inv(U), 2), np.linalg.norm(W, 2)
    slack = 1 + (gamma * 0.5 * w_norm) ** 2
    P = np_jacobian_P(A, B, gamma)
    p_max = np.linalg.eigvalsh(P)[-1]
    pnb = float(theory.preconditioner_norm_bound(u_inv, w_norm, gamma))
    assert pnb == pytest.approx(u_inv**2 * slack, rel=1e2 * EPS)
    assert p_max <= pnb * (1 + 1e4 * EPS) and pnb <= slack * p_max * (1 + 1e4 * EPS)
    C = phi.T @ phi / n
    c_eig = np.linalg.eigvalsh(C)
    limit = float(theory.learning_rate_limit(c_eig[-1], u_inv, w_norm, gamma))
    assert limit == pytest.approx(1 / (c_eig[-1] * u_inv**2 * slack), rel=1e2 * EPS)
    P_half = _psd_sqrt(P)
    ph_max = np.linalg.eigvalsh(P_half @ np.kron(np.eye(m_y), C) @ P_half)[-1]
    assert limit * ph_max <= 1 + 1e4 * EPS
    assert limit * ph_max >= c_eig[0] / (c_eig[-1] * slack) * (1 - 1e4 * EPS)


def _psd_sqrt(P):
    eig, vec = np.linalg.eigh(P)
    return (vec * np.sqrt(np.maximum(eig, 0.0))) @ vec.T


@settings(max_examples=25, **SETTINGS)
@given(eta=st.floats(1e-4, 1.0), lam=st.floats(1e-3, 10.0), u=st.floats(0.2, 5.0))
def test_gd_rate_bound_is_the_per_step_contraction_of_gradient_flow(eta, lam, u):
    """gd_rate_bound(eta, lambda, |U|) = 1 - 2 eta lambda / |U|^2: by hand, and as the per-step factor of the flow
    bound (flow_bound multiplies exactly these factors, with bound[0] = gap0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = float(theory.gd_rate_bound(eta, lam, u))
    assert got == pytest.approx(1 - 2 * eta * lam / u**2, rel=1e2 * EPS, abs=1e2 * EPS)
    us = np.array([u, 2 * u, u / 2])
    along = np.asarray(theory.flow_bound(3.0, lam, jnp.asarray(us, DTYPE), eta), np.float64)
    factors = np.maximum(1 - 2 * eta * lam / us**2, 0.0)
    want = 3.0 * np.concatenate([[1.0], np.cumprod(factors[:-1])])
    np.testing.assert_allclose(along, want, rtol=1e3 * EPS, atol=1e3 * EPS)


def np_delm_gd_step(A, B, phi, y, gamma, eta):
    """One full-batch GD step on the DELM's square loss with the gradients of docs/theory.md section 3 (NumPy):
    `(loss before, A', B', |U|_2)`."""
    S = np_sigma(0, A)
    U = np.eye(len(A)) - gamma * S
    W = np.linalg.solve(U.T, B.T).T
    R = phi @ W.T - y
    GUt = np.linalg.solve(U, (R.T @ phi / len(phi)).T).T  # dL/dB = G U^{-T}
    D = gamma * W.T @ GUt  # dL/dsigma(A), then the column-softmax vjp
    return (
        0.5 * np.mean(np.sum(R * R, axis=1)),
        A - eta * S * (D - np.sum(S * D, axis=0)),
        B - eta * GUt,
        np.linalg.norm(U, 2),
    )


@settings(max_examples=20, **SETTINGS)
@given(
    gamma=st.floats(0.1, 0.9),
    a_scale=st.sampled_from([0.1, 1.0]),
    fraction=st.floats(0.1, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_gd_rate_bound_holds_to_second_order_on_a_gd_step(gamma, a_scale, fraction, seed):
    """At `eta <= learning_rate_limit`, one exact GD step shrinks the gap `L - L*` by at least the bound's factor up
    to its second-order term: `gap_1 / gap_0 <= b + (1 - b)^2 / 4` with `b = gd_rate_bound(eta, lambda_min^+,
    |U_0|_2)` (the discrete bound itself is exceeded by exactly that term in the tight case, see the next test)."""
    m, m_y, n = 4, 2, 9
    rng = np.random.default_rng(seed)
    A, B = a_scale * rng.standard_normal((m, m)), rng.standard_normal((m_y, m))
    phi, y = rng.standard_normal((n, m)), rng.standard_normal((n, m_y))
    c_eig = np.linalg.eigvalsh(phi.T @ phi / n)
    W_star = np.linalg.lstsq(phi, y, rcond=None)[0].T
    L_star = 0.5 * np.mean(np.sum((phi @ W_star.T - y) ** 2, axis=1))
    U = np.eye(m) - gamma * np_sigma(0, A)
    W = np.linalg.solve(U.T, B.T).T
    eta = fraction * float(
        theory.learning_rate_limit(c_eig[-1], np.linalg.norm(np.linalg.inv(U), 2), np.linalg.norm(W, 2), gamma)
    )
    L0, A1, B1, u0 = np_delm_gd_step(A, B, phi, y, gamma, eta)
    L1 = np_delm_gd_step(A1, B1, phi, y, gamma, eta)[0]
    b = float(theory.gd_rate_bound(eta, c_eig[0], u0))
    assert 0 < b < 1
    assert (L1 - L_star) / (L0 - L_star) <= b + (1 - b) ** 2 / 4 + 1e3 * EPS


def test_gd_rate_bound_is_reached_and_exceeded_at_second_order():
    """The tight case: `y = 0` (L* = 0), W small and along q, the top left singular vector of U, and C with
    eigenvector q of eigenvalue lambda_min^+. Then W' = W (1 - eta lambda / |U|^2) + O(|W|^3), so the gap ratio is
    `(1 - eta lambda / |U|^2)^2 = b + (1 - b)^2 / 4`: the bound's decrease is reached, and the bound as a per-step
    claim (`gap_1 / gap_0 <= b`) is exceeded by its second-order term."""
    gamma, m, n, lam = 0.8, 4, 40, 0.05
    rng = np.random.default_rng(0)
    A = 0.5 * rng.standard_normal((m, m))
    U = np.eye(m) - gamma * np_sigma(0, A)
    q = np.linalg.svd(U)[0][:, 0]
    C = lam * np.outer(q, q) + (np.eye(m) - np.outer(q, q))
    phi = np.linalg.qr(rng.standard_normal((n, m)))[0] * np.sqrt(n) @ np.linalg.cholesky(C).T
    y = np.zeros((n, 1))
    B = 1e-3 * q[None, :] @ U  # W = B U^{-1} = 1e-3 q^T
    eta = 0.01
    L0, A1, B1, u0 = np_delm_gd_step(A, B, phi, y, gamma, eta)
    L1 = np_delm_gd_step(A1, B1, phi, y, gamma, eta)[0]
    b = float(theory.gd_rate_bound(eta, lam, u0))
    ratio = L1 / L0
    assert ratio == pytest.approx(b + (1 - b) ** 2 / 4, rel=1e-8 if X64 else 1e-5)
    assert ratio > b
