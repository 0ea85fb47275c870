"""The solve entry point: forward equilibria, every gradient path against the closed form, transformations,
non-convergence reporting, precision handling and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from deq_jax import (Anderson, Broyden, Direct, DELMMap, DELMTransposedMap, FixedPoint, Implicit, OneStep, TanhMap,
                     Unrolled, solve)
from deq_jax.maps import column_softmax

GAMMA = 0.8
ITERATIVE = ["fixed_point", "anderson", "broyden"]
# float32: a relative residual of 1e-6 is reachable above float32 rounding (eps 1.2e-7); the gradient error it leaves
# is at most cond(U) * tol <= (1 + gamma) / (1 - gamma) * 1e-6 = 9e-6, well inside the required 1e-4.
TOL = {jnp.float32: 1e-6, jnp.float64: 1e-12}
GRAD_RTOL = {jnp.float32: 1e-4, jnp.float64: 1e-9}


def problem(dtype, m=7, n=11, m_y=3, seed=0, scale=1.0):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    A = scale * jax.random.normal(k1, (m, m), dtype)
    B = jax.random.normal(k2, (m_y, m), dtype)
    phi = jax.random.normal(k3, (n, m), dtype)
    y = jax.random.normal(k4, (n, m_y), dtype)
    return A, B, phi, y


def closed_form_loss(A, B, phi, y, gamma=GAMMA):
    """Independent reference: the closed form W = B (I - gamma sigma(A))^{-1}, differentiated by plain autodiff."""
    U = jnp.eye(A.shape[0], dtype=A.dtype) - gamma * column_softmax(A)
    W = jnp.linalg.solve(U.T, B.T).T
    return 0.5 * jnp.mean(jnp.sum((phi @ W.T - y) ** 2, axis=1))


def solved_loss(formulation, solver, backward, tol, maxiter=400, gamma=GAMMA, precision="highest"):
    def loss(A, B, phi, y):
        if formulation == "transposed":
            sol = solve(DELMTransposedMap(gamma), jnp.zeros_like(B), {"A": A}, B, solver=solver, backward=backward,
                        tol=tol, maxiter=maxiter, precision=precision)
            pred = phi @ sol.value.T
        else:
            sol = solve(DELMMap(gamma), jnp.zeros_like(phi), {"A": A}, phi, solver=solver, backward=backward,
                        tol=tol, maxiter=maxiter, precision=precision)
            pred = sol.value @ B.T
        return 0.5 * jnp.mean(jnp.sum((pred - y) ** 2, axis=1)), sol.stats

    return loss


def rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("solver", ITERATIVE + ["direct"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_forward_matches_closed_form_to_tolerance(solver, dtype):
    A, _, phi, _ = problem(dtype)
    tol = TOL[dtype]
    sol = solve(DELMMap(GAMMA), jnp.zeros_like(phi), {"A": A}, phi, solver=solver, tol=tol, maxiter=500)
    U = jnp.eye(A.shape[0], dtype=dtype) - GAMMA * column_softmax(A)
    z_star = jnp.linalg.solve(U, phi.T).T
    assert bool(sol.stats.converged)
    assert float(sol.stats.relative_residual) <= tol
    # z - z* = -U^{-1} (f(z) - z): the error is bounded by |U^{-1}|_2 times the residual (plus rounding)
    bound = float(jnp.linalg.norm(jnp.linalg.inv(U), 2)) * tol * float(jnp.linalg.norm(phi))
    assert float(jnp.linalg.norm(sol.value - z_star)) <= bound + 50 * jnp.finfo(dtype).eps * float(jnp.linalg.norm(z_star))
    assert sol.value.dtype == dtype


def test_iteration_counts_are_plausible():
    A, _, phi, _ = problem(jnp.float64)
    f, z0, p = DELMMap(0.9), jnp.zeros_like(phi), {"A": A}
    its = {s: int(solve(f, z0, p, phi, solver=s, tol=1e-8, maxiter=1000).stats.iterations) for s in ITERATIVE}
    # plain iteration needs about log(tol)/log(gamma) = 175 steps; the accelerated solvers far fewer
    assert 100 <= its["fixed_point"] <= 200
    assert its["anderson"] < its["fixed_point"] / 3
    assert its["broyden"] < its["fixed_point"] / 3


def test_broyden_sign_matters():
    """The inverse-Jacobian start -I is right for g(z) = f(z) - z; jaxopt's +I is measurably worse."""
    A, _, phi, _ = problem(jnp.float64)
    f, z0, p = DELMMap(0.9), jnp.zeros_like(phi), {"A": A}
    good = solve(f, z0, p, phi, solver=Broyden(), tol=1e-8, maxiter=300).stats
    bad = solve(f, z0, p, phi, solver=Broyden(inverse_jacobian_init=1.0), tol=1e-8, maxiter=300).stats
    assert bool(good.converged)
    assert (not bool(bad.converged)) or int(bad.iterations) > 2 * int(good.iterations)


# ----------------------------------------------------------------------------- gradients vs the closed form

@pytest.mark.parametrize("solver, linear_solver", [("anderson", ls) for ls in ["gmres", "bicgstab", "normal_cg", "lu"]]
                         + [("fixed_point", "bicgstab"), ("broyden", "lu")])
def test_implicit_gradients_float64(solver, linear_solver):
    A, B, phi, y = problem(jnp.float64)
    ref = jax.grad(closed_form_loss, argnums=(0, 1))(A, B, phi, y)
    backward = Implicit(linear_solver=linear_solver)
    loss = solved_loss("per_sample", solver, backward, TOL[jnp.float64])
    grads, stats = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(A, B, phi, y)
    assert bool(stats.converged)
    for g, r in zip(grads, ref):
        assert rel_err(g, r) <= GRAD_RTOL[jnp.float64]


@pytest.mark.parametrize("formulation", ["transposed", "per_sample"])
@pytest.mark.parametrize("solver", ITERATIVE + ["direct"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_implicit_gradients_both_formulations(formulation, solver, dtype):
    A, B, phi, y = problem(dtype)
    ref = jax.grad(closed_form_loss, argnums=(0, 1))(A, B, phi, y)
    loss = solved_loss(formulation, solver, "implicit", TOL[dtype])
    grads, stats = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(A, B, phi, y)
    assert bool(stats.converged)
    for g, r in zip(grads, ref):
        assert g.dtype == dtype
        assert rel_err(g, r) <= GRAD_RTOL[dtype]


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden", "direct"])
def test_formulations_agree_to_rounding(solver):
    """The transposed and per-sample formulations give the same loss and gradients, for every backward mode."""
    A, B, phi, y = problem(jnp.float64)
    for backward in ["implicit", "one_step", "unrolled"]:
        if backward == "one_step":
            continue  # one-step gradients are formulation-dependent approximations by design (tested below)
        out = {}
        for formulation in ["transposed", "per_sample"]:
            loss = solved_loss(formulation, solver, backward, 1e-13, maxiter=600)
            (value, _), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(A, B, phi, y)
            out[formulation] = (value, grads)
        assert abs(float(out["transposed"][0] - out["per_sample"][0])) <= 1e-12 * float(out["per_sample"][0])
        for g, r in zip(out["transposed"][1], out["per_sample"][1]):
            assert rel_err(g, r) <= 1e-9


def test_unrolled_matches_implicit_when_converged():
    A, B, phi, y = problem(jnp.float64)
    ref = jax.grad(closed_form_loss, argnums=(0, 1))(A, B, phi, y)
    for solver in ITERATIVE:
        loss = solved_loss("per_sample", solver, "unrolled", 1e-13, maxiter=300)
        grads, stats = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(A, B, phi, y)
        assert bool(stats.converged)
        for g, r in zip(grads, ref):
            assert rel_err(g, r) <= 1e-9


def test_one_step_gradient_is_the_jacobian_free_approximation():
    """One-step gradient = gradient through one application of f at the frozen equilibrium: for the per-sample DELM,
    dL/dB is exact (B acts after the solve) and dL/dA is gamma * sigma-chain of (z*^T-weighted) error, without U^{-T}."""
    A, B, phi, y = problem(jnp.float64)
    loss = solved_loss("per_sample", "direct", "one_step", 1e-12)
    (gA, gB), _ = jax.grad(loss, argnums=(0, 1), has_aux=True)(A, B, phi, y)
    ref_A, ref_B = jax.grad(closed_form_loss, argnums=(0, 1))(A, B, phi, y)
    assert rel_err(gB, ref_B) <= 1e-10
    # explicit Jacobian-free formula: dL/dsigma = gamma * E^T z* / n with E = dL/dz = (pred - y) B
    U = jnp.eye(A.shape[0]) - GAMMA * column_softmax(A)
    z = jnp.linalg.solve(U, phi.T).T
    E = (z @ B.T - y) @ B / phi.shape[0]
    _, vjp = jax.vjp(column_softmax, A)
    (jfb_A,) = vjp(GAMMA * E.T @ z)
    assert rel_err(gA, jfb_A) <= 1e-10
    assert rel_err(gA, ref_A) > 1e-3  # and it is an approximation, not the exact gradient
    assert float(jnp.vdot(gA, ref_A)) > 0  # still a descent direction here
    for solver in ITERATIVE:
        (gA_it, _), _ = jax.grad(solved_loss("per_sample", solver, "one_step", 1e-12), argnums=(0, 1),
                                 has_aux=True)(A, B, phi, y)
        assert rel_err(gA_it, jfb_A) <= 1e-9


def test_finite_differences_float64():
    A, B, phi, y = problem(jnp.float64, m=5, n=6, m_y=2)
    check_grads(lambda A, B: closed_form_loss(A, B, phi, y), (A, B), order=2, modes=("rev",), eps=1e-5)
    direct = lambda A, B: solved_loss("transposed", "direct", "implicit", 1e-12)(A, B, phi, y)[0]
    check_grads(direct, (A, B), order=1, modes=("fwd", "rev"), eps=1e-5)
    anderson = lambda A, B: solved_loss("per_sample", "anderson", Implicit("gmres", tol=1e-13), 1e-13)(A, B, phi, y)[0]
    check_grads(anderson, (A, B), order=1, modes=("rev",), eps=1e-5)


def test_gradient_with_respect_to_the_input():
    """Implicit gradients also flow into x (phi) and into pytree parameters of nonlinear maps."""
    A, B, phi, y = problem(jnp.float64)
    ref = jax.grad(closed_form_loss, argnums=2)(A, B, phi, y)
    g = jax.grad(lambda p: solved_loss("per_sample", "anderson", "implicit", 1e-13)(A, B, p, y)[0])(phi)
    assert rel_err(g, ref) <= 1e-9


@pytest.mark.parametrize("solver", ITERATIVE)
def test_nonlinear_map_implicit_matches_unrolled(solver):
    f = TanhMap(0.9)
    key = jax.random.PRNGKey(3)
    params = f.init(key, width=6, in_dim=4, dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(4), (5, 4), jnp.float64)
    target = jax.random.normal(jax.random.PRNGKey(5), (5, 6), jnp.float64)

    def loss(params, x, backward):
        sol = solve(f, jnp.zeros((5, 6), jnp.float64), params, x, solver=solver, backward=backward, tol=1e-13,
                    maxiter=400)
        return jnp.sum((sol.value - target) ** 2), sol.stats

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    g_imp, s_imp = grad(params, x, "implicit")
    g_unr, s_unr = grad(params, x, "unrolled")
    assert bool(s_imp.converged) and bool(s_unr.converged)
    for a, b in zip(jax.tree_util.tree_leaves(g_imp), jax.tree_util.tree_leaves(g_unr)):
        assert rel_err(a, b) <= 1e-9


def test_forward_mode_support():
    """Implicit is a custom_vjp (reverse mode only); direct, one-step and unrolled also support jvp."""
    A, B, phi, y = problem(jnp.float64)
    for solver, backward in [("direct", "implicit"), ("anderson", "one_step"), ("fixed_point", "unrolled")]:
        f = lambda A: solved_loss("per_sample", solver, backward, 1e-12)(A, B, phi, y)[0]
        _, tangent = jax.jvp(f, (A,), (jnp.ones_like(A),))
        assert np.isfinite(float(tangent))
    f = lambda A: solved_loss("per_sample", "anderson", "implicit", 1e-12)(A, B, phi, y)[0]
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f, (A,), (jnp.ones_like(A),))


# ----------------------------------------------------------------------------- transformations

@pytest.mark.parametrize("solver", ["anderson", "direct"])
def test_jit_equals_eager(solver):
    A, B, phi, y = problem(jnp.float64)
    loss = solved_loss("per_sample", solver, "implicit", 1e-12)
    vg = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (v1, s1), g1 = vg(A, B, phi, y)
    (v2, s2), g2 = jax.jit(vg)(A, B, phi, y)
    np.testing.assert_allclose(v1, v2, rtol=1e-13)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    assert int(s1.iterations) == int(s2.iterations)


def test_vmap_over_inputs_equals_loop():
    A, _, phi, _ = problem(jnp.float64)
    f = DELMMap(GAMMA)
    one = jax.jit(lambda x: solve(f, jnp.zeros_like(x), {"A": A}, x, solver="anderson", tol=1e-12))
    batched = jax.vmap(one)(phi)  # one solve per sample, each with its own statistics
    assert batched.stats.iterations.shape == (phi.shape[0],)
    for i in range(phi.shape[0]):
        single = one(phi[i])
        np.testing.assert_allclose(batched.value[i], single.value, rtol=1e-11, atol=1e-13)
        assert bool(batched.stats.converged[i])


def test_vmap_over_parameter_sets_equals_loop():
    As = jnp.stack([problem(jnp.float64, seed=s)[0] for s in range(4)])
    _, B, phi, y = problem(jnp.float64)
    loss = jax.jit(lambda A: solved_loss("transposed", "broyden", "implicit", 1e-12)(A, B, phi, y))
    grad = jax.jit(jax.grad(lambda A: loss(A)[0]))
    values, stats = jax.vmap(loss)(As)
    grads = jax.vmap(grad)(As)  # vmap of grad
    for i in range(4):
        v, _ = loss(As[i])
        np.testing.assert_allclose(values[i], v, rtol=1e-12)
        np.testing.assert_allclose(grads[i], grad(As[i]), rtol=1e-9, atol=1e-14)
        ref = jax.grad(closed_form_loss)(As[i], B, phi, y)
        assert rel_err(grads[i], ref) <= 1e-9
    assert bool(jnp.all(stats.converged))


def test_grad_of_vmap():
    A, B, phi, y = problem(jnp.float64)
    f = DELMMap(GAMMA)

    def batch_loss(A):
        one = lambda x, t: 0.5 * jnp.sum((solve(f, jnp.zeros_like(x), {"A": A}, x, solver="fixed_point",
                                                tol=1e-13, maxiter=500).value @ B.T - t) ** 2)
        return jnp.mean(jax.vmap(one)(phi, y))

    g = jax.grad(batch_loss)(A)
    assert rel_err(g, jax.grad(closed_form_loss)(A, B, phi, y)) <= 1e-9


def test_pytree_state():
    """States may be pytrees: two coupled blocks solved jointly."""
    def f(z, params, x):
        return {"u": 0.5 * jnp.tanh(z["v"]) + x, "v": 0.5 * jnp.tanh(params["w"] * z["u"])}

    x = jnp.linspace(0.2, 1.0, 4)
    z0 = {"u": jnp.zeros(4), "v": jnp.zeros(4)}
    params = {"w": jnp.asarray(0.7)}
    for solver in ITERATIVE:
        sol = jax.jit(lambda p: solve(f, z0, p, x, solver=solver, tol=1e-12, maxiter=300))(params)
        assert bool(sol.stats.converged)
        res = jax.tree_util.tree_map(jnp.subtract, f(sol.value, params, x), sol.value)
        assert max(float(jnp.max(jnp.abs(r))) for r in jax.tree_util.tree_leaves(res)) < 1e-11
    g_imp = jax.jit(jax.grad(lambda p: jnp.sum(solve(f, z0, p, x, tol=1e-13, maxiter=300).value["v"])))(params)
    g_unr = jax.jit(jax.grad(lambda p: jnp.sum(solve(f, z0, p, x, backward="unrolled", tol=1e-13, maxiter=300)
                                               .value["v"])))(params)
    assert abs(float(g_imp["w"])) > 1e-3
    np.testing.assert_allclose(g_imp["w"], g_unr["w"], rtol=1e-9)


def test_direct_dense_fallback_for_maps_without_affine():
    A, _, phi, _ = problem(jnp.float64, n=3)
    plain = lambda z, params, x: GAMMA * z @ column_softmax(params["A"]).T + x  # affine, but says nothing
    sol = solve(plain, jnp.zeros_like(phi), {"A": A}, phi, solver="direct", tol=1e-12)
    ref = solve(DELMMap(GAMMA), jnp.zeros_like(phi), {"A": A}, phi, solver="direct", tol=1e-12)
    np.testing.assert_allclose(sol.value, ref.value, rtol=1e-12)
    with pytest.raises(ValueError, match="max_dense"):
        solve(plain, jnp.zeros_like(phi), {"A": A}, phi, solver=Direct(max_dense=4))


# ----------------------------------------------------------------------------- failure is data

@pytest.mark.parametrize("solver", ITERATIVE)
def test_too_few_iterations_reports_not_converged(solver):
    A, _, phi, _ = problem(jnp.float64)
    sol = solve(DELMMap(0.95), jnp.zeros_like(phi), {"A": A}, phi, solver=solver, tol=1e-12, maxiter=3)
    assert not bool(sol.stats.converged)
    assert int(sol.stats.iterations) == 3
    assert float(sol.stats.relative_residual) > 1e-12
    # the reported residual is the true one at the returned value
    r = DELMMap(0.95)(sol.value, {"A": A}, phi) - sol.value
    np.testing.assert_allclose(sol.stats.residual, jnp.linalg.norm(r), rtol=1e-12)


def test_nan_input_under_jit_is_not_converged():
    A, _, phi, _ = problem(jnp.float64)
    run = jax.jit(lambda phi: solve(DELMMap(GAMMA), jnp.zeros_like(phi), {"A": A}, phi, solver="anderson").stats)
    stats = run(phi.at[0, 0].set(jnp.nan))  # values are not checked inside jit; the flag still tells
    assert not bool(stats.converged)


# ----------------------------------------------------------------------------- precision

def _dot_precisions(jaxpr):
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params["precision"])
            for v in eqn.params.values():
                for item in (v if isinstance(v, (tuple, list)) else (v,)):
                    inner = getattr(item, "jaxpr", None)
                    if inner is not None:
                        walk(inner if hasattr(inner, "eqns") else inner.jaxpr)

    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("solver", ITERATIVE)
def test_matmuls_inside_solves_run_at_highest_precision(solver):
    """On GPUs the default float32 matmul is TF32, with which Anderson stalled silently; every matmul of the solve,
    forward and backward (including the solver's own mixing), is traced at HIGHEST unless precision=None."""
    A, B, phi, y = problem(jnp.float32)
    loss = solved_loss("per_sample", solver, "implicit", 1e-5)
    grad = jax.grad(lambda A: loss(A, B, phi, y)[0])
    with jax.default_matmul_precision("bfloat16"):  # the surrounding program asks for low precision...
        precisions = _dot_precisions(jax.make_jaxpr(grad)(A))
    assert precisions
    inside = [p for p in precisions if p is not None]
    highest = jax.lax.Precision.HIGHEST
    assert any(p == highest or (isinstance(p, tuple) and p[0] == highest) for p in inside)
    # ...and only the loss's own product outside the solve (z @ B.T and its two transposes) keeps it
    lowered = [p for p in inside if not (p == highest or (isinstance(p, tuple) and p[0] == highest))]
    assert len(lowered) <= 3
    loss_none = solved_loss("per_sample", solver, "implicit", 1e-5, precision=None)
    with jax.default_matmul_precision("bfloat16"):
        none_precisions = _dot_precisions(jax.make_jaxpr(jax.grad(lambda A: loss_none(A, B, phi, y)[0]))(A))
    # with precision=None the map's matmuls follow the surrounding setting (jax's GMRES keeps its own HIGHEST dots)
    lowered_none = [p for p in none_precisions if p is not None
                    and not (p == highest or (isinstance(p, tuple) and p[0] == highest))]
    assert len(lowered_none) > len(lowered) + 3


# ----------------------------------------------------------------------------- argument errors

def test_argument_errors():
    A, _, phi, _ = problem(jnp.float64)
    f, z0, p = DELMMap(GAMMA), jnp.zeros_like(phi), {"A": A}
    with pytest.raises(ValueError, match="unknown solver 'newton'.*'anderson'"):
        solve(f, z0, p, phi, solver="newton")
    with pytest.raises(ValueError, match="unknown backward 'adjoint'.*'implicit'"):
        solve(f, z0, p, phi, backward="adjoint")
    with pytest.raises(ValueError, match="unknown linear_solver 'qr'.*'gmres'"):
        Implicit(linear_solver="qr")
    with pytest.raises(ValueError, match="'cg' is refused.*not symmetric"):
        Implicit(linear_solver="cg")
    with pytest.raises(ValueError, match="tol must be a positive number; got 0"):
        solve(f, z0, p, phi, tol=0)
    with pytest.raises(ValueError, match="tol must be a positive number; got -1e-05"):
        solve(f, z0, p, phi, tol=-1e-5)
    with pytest.raises(ValueError, match="maxiter must be a positive integer; got 0"):
        solve(f, z0, p, phi, maxiter=0)
    with pytest.raises(ValueError, match="maxiter must be a positive integer; got 2.5"):
        solve(f, z0, p, phi, maxiter=2.5)
    with pytest.raises(ValueError, match=r"x contains NaN or infinite values \(array of shape \(11, 7\)"):
        solve(f, z0, p, phi.at[2, 3].set(jnp.inf))
    with pytest.raises(ValueError, match=r"params\['A'\] contains NaN"):
        solve(f, z0, {"A": A.at[0, 0].set(jnp.nan)}, phi)
    with pytest.raises(TypeError, match="x must be a floating-point array.*got dtype int"):
        solve(f, z0, p, jnp.ones((11, 7), jnp.int32))
    with pytest.raises(TypeError, match="z0 must be a floating-point array.*int"):
        solve(f, jnp.zeros((11, 7), jnp.int32), p, phi)
    with pytest.raises(ValueError, match=r"gamma must be a number in the open interval \(0, 1\); got 1.0"):
        DELMMap(1.0)
    with pytest.raises(ValueError, match=r"gamma must be a number in the open interval \(0, 1\); got -0.5"):
        DELMTransposedMap(-0.5)
    with pytest.raises(ValueError, match="unknown sigma 'relu'"):
        DELMMap(0.5, sigma="relu")
    with pytest.raises(ValueError, match="history_size must be an integer >= 2; got 1"):
        Anderson(history_size=1)
    with pytest.raises(ValueError, match="precision 'tf32'"):
        solve(f, z0, p, phi, precision="tf32")
    with pytest.raises(TypeError, match="solver must be a name"):
        solve(f, z0, p, phi, solver=3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_anderson_keeps_low_precision_dtypes(dtype):
    """jaxopt's own mixing step fails on bfloat16 (and on float32 under x64); deq_jax's keeps the state's dtype."""
    A, _, phi, _ = problem(jnp.float32)
    sol = solve(DELMMap(GAMMA), jnp.zeros_like(phi, dtype), {"A": A.astype(dtype)}, phi.astype(dtype),
                solver="anderson", tol=5e-2, maxiter=50)
    assert sol.value.dtype == dtype
    assert bool(sol.stats.converged)
    assert float(sol.stats.relative_residual) <= 5e-2


def test_solver_instances_and_options():
    A, _, phi, _ = problem(jnp.float64)
    f, z0, p = DELMMap(GAMMA), jnp.zeros_like(phi), {"A": A}
    for solver, backward in [(FixedPoint(), Implicit("bicgstab", tol=1e-12, maxiter=200)),
                             (Anderson(history_size=3, beta=0.9), OneStep()), (Broyden(history_size=10), Unrolled())]:
        sol = jax.jit(lambda p: solve(f, z0, p, phi, solver=solver, backward=backward, tol=1e-10, maxiter=300))(p)
        assert bool(sol.stats.converged)
