"""The solve entry point on the DELM: the convergence rule from any start, every gradient path against the closed
form, transformations (jit/eager via chex variants, vmap, grad of vmap), precision handling, the cast rule, has_aux,
argument errors and the import boundary.

Runs in float64 by default and in float32 with `DEQ_JAX_TEST_X64=0` (`helpers.DTYPE`); tolerances are per dtype."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    DTYPE,
    GAMMA,
    X64,
    closed_form_equilibrium,
    closed_form_loss,
    delm_problem,
    rel_err,
    requires_x64,
    u_matrix,
)
from jax.test_util import check_grads

from deq_jax import (
    Broyden,
    DELMMap,
    DELMTransposedMap,
    Direct,
    Implicit,
    TanhMap,
    solve,
)
from deq_jax.maps import column_softmax

ITERATIVE = ["fixed_point", "anderson", "broyden"]
# float32: a relative residual of 1e-6 is reachable above float32 rounding (eps 1.2e-7); the gradient error it leaves
# is at most cond(U) * tol <= (1 + gamma) / (1 - gamma) * 1e-6 = 9e-6, inside the 1e-4 asked of gradients
TOL = 1e-12 if X64 else 1e-6
GRAD_RTOL = 1e-9 if X64 else 1e-4
EPS = float(jnp.finfo(DTYPE).eps)


@functools.cache
def solved_loss(formulation, solver, backward, tol=TOL, maxiter=400, gamma=GAMMA, precision="highest"):
    """The DELM square loss through `solve` (one function object per configuration, so that every test that jits
    the same configuration shares one compiled program)."""

    def loss(A, B, phi, y):
        if formulation == "transposed":
            sol = solve(
                DELMTransposedMap(gamma),
                jnp.zeros_like(B),
                {"A": A},
                B,
                solver=solver,
                backward=backward,
                tol=tol,
                maxiter=maxiter,
                precision=precision,
            )
            pred = phi @ sol.value.T
        else:
            sol = solve(
                DELMMap(gamma),
                jnp.zeros_like(phi),
                {"A": A},
                phi,
                solver=solver,
                backward=backward,
                tol=tol,
                maxiter=maxiter,
                precision=precision,
                batch_axis=0,
            )
            pred = sol.value @ B.T
        return 0.5 * jnp.mean(jnp.sum((pred - y) ** 2, axis=1)), sol.stats

    return loss


@functools.cache
def value_and_grads(*config):
    """`(loss, stats), (dA, dB, dphi)` of `solved_loss(*config)`, one function object per configuration."""
    return jax.value_and_grad(solved_loss(*config), argnums=(0, 1, 2), has_aux=True)


_STARTS = jax.jit(
    lambda A, phi, z0, solver: solve(
        DELMMap(GAMMA), z0, {"A": A}, phi, solver=solver, tol=1e-5, maxiter=400, batch_axis=0
    ),
    static_argnums=3,
)


# ----------------------------------------------------------------------------- the convergence rule


@pytest.mark.parametrize("solver", [*ITERATIVE, "direct"])
def test_converged_means_close_to_the_equilibrium_from_any_start(solver):
    """Far (1e8), zero and warm starts are judged by one rule on the returned value: converged implies
    |z - z*| <= |U^{-1}|_2 |f(z) - z| <= |U^{-1}|_2 tol |f(z)| (per sample), whatever the start."""
    A, _, phi, _ = delm_problem(DTYPE)
    z_star = closed_form_equilibrium(A, phi)
    U_inv = float(jnp.linalg.norm(jnp.linalg.inv(u_matrix(A)), 2))
    far, zero = 1e8 * jnp.ones_like(phi), jnp.zeros_like(phi)
    for name, z0 in [("far", far), ("zero", zero), ("warm", z_star)]:
        sol = _STARTS(A, phi, z0, solver)
        assert bool(sol.stats.converged), name
        assert not bool(sol.stats.diverged), name
        assert float(sol.stats.relative_residual) <= 1e-5, name
        err = jnp.linalg.norm(sol.value - z_star, axis=1) / jnp.linalg.norm(z_star, axis=1)
        # |f(z)| / |z*| <= 1 + 1e-5 (1 + |U^{-1}|): the bound in relative terms, plus float rounding
        assert float(jnp.max(err)) <= U_inv * 1e-5 * 1.01 + 100 * EPS, name
        if name == "warm":  # a start at z* stops at once: Broyden checks its start (0 steps), the others after f(z0)
            assert int(sol.stats.iterations) <= (0 if solver in ("broyden", "direct") else 1)
    assert int(_STARTS(A, phi, far, "fixed_point").stats.iterations) > 50  # the far start really iterated


def test_stale_warm_start_cannot_look_converged():
    """The previous step's equilibrium as a start (params changed since): too few steps say not converged."""
    A, _, phi, _ = delm_problem(DTYPE)
    stale = closed_form_equilibrium(1.3 * A, phi)  # the equilibrium of other weights
    sol = solve(DELMMap(GAMMA), stale, {"A": A}, phi, solver="fixed_point", tol=1e-5, maxiter=1)
    assert not bool(sol.stats.converged)
    r = DELMMap(GAMMA)(sol.value, {"A": A}, phi) - sol.value  # the reported residual is the true one
    np.testing.assert_allclose(sol.stats.residual, jnp.linalg.norm(r), rtol=1e-5)
    assert float(sol.stats.relative_residual) > 1e-5


@requires_x64
def test_iteration_counts_and_broyden_sign():
    A, _, phi, _ = delm_problem(jnp.float64)
    f, z0, p = DELMMap(0.9), jnp.zeros_like(phi), {"A": A}
    its = {s: int(solve(f, z0, p, phi, solver=s, tol=1e-8, maxiter=1000).stats.iterations) for s in ITERATIVE}
    # plain iteration needs about log(tol)/log(gamma) = 175 steps; the accelerated solvers far fewer
    assert 100 <= its["fixed_point"] <= 200
    assert its["anderson"] < its["fixed_point"] / 3
    assert its["broyden"] < its["fixed_point"] / 3
    # the inverse-Jacobian start -I is right for g(z) = f(z) - z; jaxopt's +I is measurably worse
    bad = solve(f, z0, p, phi, solver=Broyden(inverse_jacobian_init=1.0), tol=1e-8, maxiter=300).stats
    assert (not bool(bad.converged)) or int(bad.iterations) > 2 * its["broyden"]


# ----------------------------------------------------------------------------- gradients vs the closed form

# every solver and every linear solver once, both formulations (a backward only sees z*, so pairing them is enough)
GRADIENT_CASES = [
    ("per_sample", "anderson", Implicit()),
    ("per_sample", "fixed_point", Implicit("bicgstab")),
    ("per_sample", "broyden", Implicit("lu")),
    ("transposed", "anderson", Implicit("normal_cg")),
    ("per_sample", "direct", Implicit()),
    ("transposed", "direct", Implicit()),
]


@pytest.mark.float32
@pytest.mark.parametrize(("formulation", "solver", "backward"), GRADIENT_CASES)
def test_implicit_gradients_match_the_closed_form(formulation, solver, backward):
    """dL/dA, dL/dB and dL/dphi through the implicit backward against autodiff of W = B U^{-1}."""
    A, B, phi, y = delm_problem(DTYPE)
    ref = jax.grad(closed_form_loss, argnums=(0, 1, 2))(A, B, phi, y)
    (value, stats), grads = jax.jit(value_and_grads(formulation, solver, backward))(A, B, phi, y)
    assert bool(stats.converged)
    np.testing.assert_allclose(value, closed_form_loss(A, B, phi, y), rtol=GRAD_RTOL)
    for g, r in zip(grads, ref, strict=True):
        assert g.dtype == DTYPE
        assert rel_err(g, r) <= GRAD_RTOL


def test_unrolled_and_one_step_gradients():
    """Unrolled (300 differentiated steps) is exact to the closed form; one-step is the Jacobian-free formula:
    dL/dB exact (B acts after the solve), dL/dA = sigma-chain of gamma E^T z* without U^{-T}."""
    A, B, phi, y = delm_problem(DTYPE)
    ref_A, ref_B = jax.grad(closed_form_loss, argnums=(0, 1))(A, B, phi, y)
    (gA, gB), stats = jax.jit(
        jax.grad(solved_loss("per_sample", "fixed_point", "unrolled", maxiter=300), argnums=(0, 1), has_aux=True)
    )(A, B, phi, y)
    assert bool(stats.converged)
    assert rel_err(gA, ref_A) <= GRAD_RTOL and rel_err(gB, ref_B) <= GRAD_RTOL
    z = closed_form_equilibrium(A, phi)
    E = (z @ B.T - y) @ B / phi.shape[0]
    _, vjp = jax.vjp(column_softmax, A)
    (jfb_A,) = vjp(GAMMA * E.T @ z)
    for solver in ["direct", "fixed_point"]:
        (gA, gB), _ = jax.jit(jax.grad(solved_loss("per_sample", solver, "one_step"), argnums=(0, 1), has_aux=True))(
            A, B, phi, y
        )
        assert rel_err(gB, ref_B) <= GRAD_RTOL
        assert rel_err(gA, jfb_A) <= GRAD_RTOL
        assert rel_err(gA, ref_A) > 1e-3  # an approximation, not the exact gradient
        assert float(jnp.vdot(gA, ref_A)) > 0  # still a descent direction here


@requires_x64
def test_finite_differences_float64():
    A, B, phi, y = delm_problem(jnp.float64, m=3, n=4, m_y=2)
    implicit = lambda A, B: solved_loss("per_sample", "fixed_point", Implicit("gmres", tol=1e-13), 1e-13)(A, B, phi, y)[
        0
    ]
    check_grads(jax.jit(implicit), (A, B), order=1, modes=("rev",), eps=1e-5)


def test_nonlinear_map_implicit_matches_unrolled():
    f = TanhMap(0.9)
    params = f.init(jax.random.PRNGKey(3), width=6, in_dim=4, dtype=DTYPE)
    x = jax.random.normal(jax.random.PRNGKey(4), (5, 4), DTYPE)
    target = jax.random.normal(jax.random.PRNGKey(5), (5, 6), DTYPE)

    def loss(params, x, backward):
        sol = solve(
            f, jnp.zeros((5, 6), DTYPE), params, x, solver="fixed_point", backward=backward, tol=TOL, maxiter=300
        )
        return jnp.sum((sol.value - target) ** 2), sol.stats

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    g_imp, s_imp = grad(params, x, Implicit("lu"))
    g_unr, s_unr = grad(params, x, "unrolled")
    assert bool(s_imp.converged) and bool(s_unr.converged)
    for a, b in zip(jax.tree_util.tree_leaves(g_imp), jax.tree_util.tree_leaves(g_unr), strict=True):
        assert rel_err(a, b) <= 10 * GRAD_RTOL


def test_forward_mode_support():
    """Every backward strategy supports forward mode: Implicit by its own rule (a JVP that solves (I - J) t = b; see
    tests/lib/test_forward_mode.py), one-step and unrolled by plain autodiff."""
    A, B, phi, y = delm_problem(DTYPE)
    for solver, backward in [("direct", "unrolled"), ("fixed_point", "one_step"), ("fixed_point", "unrolled")]:
        f = lambda A, s=solver, b=backward: solved_loss("per_sample", s, b, maxiter=50)(A, B, phi, y)[0]
        _, tangent = jax.jvp(f, (A,), (jnp.ones_like(A),))
        assert np.isfinite(float(tangent))
    direction = jax.random.normal(jax.random.PRNGKey(3), A.shape, A.dtype)  # not ones: softmax ignores column shifts
    ref = jnp.vdot(jax.grad(closed_form_loss)(A, B, phi, y), direction)
    for solver in ("anderson", "direct"):
        f = lambda A, s=solver: solved_loss("per_sample", s, "implicit")(A, B, phi, y)[0]
        _, tangent = jax.jvp(f, (A,), (direction,))
        assert rel_err(tangent, ref) <= GRAD_RTOL


# ----------------------------------------------------------------------------- transformations


class JitEqualsEagerTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_value_grad_and_stats(self):
        """The same numbers with and without jit (fixed-point forward, LU backward: cheap to run op by op)."""
        A, B, phi, y = delm_problem(DTYPE)
        (value, stats), grads = self.variant(value_and_grads("transposed", "fixed_point", Implicit("lu")))(A, B, phi, y)
        (ref_value, _), ref = jax.jit(value_and_grads("transposed", "direct", Implicit()))(A, B, phi, y)
        chex.assert_trees_all_close(value, ref_value, rtol=GRAD_RTOL)
        for g, r in zip(grads, ref, strict=True):
            chex.assert_shape(g, r.shape)
            assert rel_err(g, r) <= GRAD_RTOL
        chex.assert_shape(stats.iterations, ())
        assert bool(stats.converged) and 0 < int(stats.iterations) < 400


def test_vmap_over_inputs_equals_loop():
    A, _, phi, _ = delm_problem(DTYPE)
    one = jax.jit(
        lambda x: solve(DELMMap(GAMMA), jnp.zeros_like(x), {"A": A}, x, solver="fixed_point", tol=TOL, maxiter=400)
    )
    batched = jax.vmap(one)(phi)  # one solve per sample, each with its own statistics
    chex.assert_shape(batched.stats.iterations, (phi.shape[0],))
    for i in range(0, phi.shape[0], 4):
        single = one(phi[i])
        np.testing.assert_allclose(batched.value[i], single.value, rtol=100 * EPS, atol=100 * EPS)
        assert int(batched.stats.iterations[i]) == int(single.stats.iterations)
    assert bool(jnp.all(batched.stats.converged))


def test_vmap_over_parameter_sets_and_grad_of_vmap():
    As = jnp.stack([delm_problem(DTYPE, seed=s)[0] for s in range(3)])
    _, B, phi, y = delm_problem(DTYPE)
    loss = solved_loss("transposed", "fixed_point", Implicit("bicgstab"))
    grads, stats = jax.jit(jax.vmap(jax.grad(loss, has_aux=True), in_axes=(0, None, None, None)))(As, B, phi, y)
    for i in range(3):
        assert rel_err(grads[i], jax.grad(closed_form_loss)(As[i], B, phi, y)) <= GRAD_RTOL
    assert bool(jnp.all(stats.converged))

    def batch_loss(A):  # per-sample solves vmapped inside the differentiated function
        one = lambda x, t: (
            0.5
            * jnp.sum(
                (
                    solve(
                        DELMMap(GAMMA), jnp.zeros_like(x), {"A": A}, x, tol=TOL, solver="fixed_point", maxiter=400
                    ).value
                    @ B.T
                    - t
                )
                ** 2
            )
        )
        return jnp.mean(jax.vmap(one)(phi, y))

    g = jax.jit(jax.grad(batch_loss))(As[0])
    assert rel_err(g, jax.grad(closed_form_loss)(As[0], B, phi, y)) <= GRAD_RTOL


def test_map_closing_over_a_differentiated_array():
    """A map that closes over a traced value (here B through x's scale) still gets the implicit gradient for it."""
    A, B, phi, y = delm_problem(DTYPE)

    def loss(A, scale):
        f = lambda z, p, x: GAMMA * z @ column_softmax(p["A"]).T + scale * x  # `scale` is closed over
        z = solve(f, jnp.zeros_like(phi), {"A": A}, phi, solver="fixed_point", tol=TOL, maxiter=400).value
        return 0.5 * jnp.mean(jnp.sum((z @ B.T - y) ** 2, axis=1))

    ref = jax.grad(lambda A, s: closed_form_loss(A, B, s * phi, y), argnums=(0, 1))(A, 1.5)
    g = jax.jit(jax.grad(loss, argnums=(0, 1)))(A, 1.5)
    assert rel_err(g[0], ref[0]) <= GRAD_RTOL and rel_err(g[1], ref[1]) <= GRAD_RTOL


def test_direct_dense_fallback_for_maps_without_affine():
    A, _, phi, _ = delm_problem(DTYPE, n=3)
    plain = lambda z, params, x: GAMMA * z @ column_softmax(params["A"]).T + x  # affine, but says nothing
    sol = solve(plain, jnp.zeros_like(phi), {"A": A}, phi, solver="direct")
    ref = solve(DELMMap(GAMMA), jnp.zeros_like(phi), {"A": A}, phi, solver="direct")
    np.testing.assert_allclose(sol.value, ref.value, rtol=100 * EPS, atol=100 * EPS)
    with pytest.raises(ValueError, match="max_dense"):
        solve(plain, jnp.zeros_like(phi), {"A": A}, phi, solver=Direct(max_dense=4))
    # a map that is not affine: Direct's answer is no equilibrium, and the statistics say so
    bent = lambda z, params, x: jnp.tanh(plain(z, params, x))
    assert not bool(solve(bent, jnp.zeros_like(phi), {"A": A}, phi, solver="direct").stats.converged)


# ----------------------------------------------------------------------------- precision


def _dot_precisions(jaxpr):
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params["precision"])
            for v in eqn.params.values():
                for item in v if isinstance(v, (tuple, list)) else (v,):
                    inner = getattr(item, "jaxpr", None)
                    if inner is not None:
                        walk(inner if hasattr(inner, "eqns") else inner.jaxpr)

    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("solver", ["anderson", "broyden"])  # fixed-point iteration's only matmuls are the map's
def test_matmuls_inside_solves_run_at_highest_precision(solver):
    """On GPUs the default float32 matmul is TF32, with which Anderson stalled silently; every matmul of the solve,
    forward and backward (including the solver's own mixing), is traced at HIGHEST unless precision=None."""
    A, B, phi, y = delm_problem(jnp.float32)
    highest = jax.lax.Precision.HIGHEST
    is_highest = lambda p: p == highest or (isinstance(p, tuple) and p[0] == highest)

    def lowered(precision):
        loss = solved_loss("per_sample", solver, "implicit", 1e-5, precision=precision)
        with jax.default_matmul_precision("bfloat16"):  # the surrounding program asks for low precision...
            found = _dot_precisions(jax.make_jaxpr(jax.grad(lambda A: loss(A, B, phi, y)[0]))(A))
        assert found
        return [p for p in found if p is not None and not is_highest(p)]

    # ...and only the loss's own product outside the solve (z @ B.T and its two transposes) keeps it
    assert len(lowered("highest")) <= 3
    # with precision=None the map's matmuls follow the surrounding setting (jax's GMRES keeps its own HIGHEST dots)
    assert len(lowered(None)) > len(lowered("highest")) + 3
