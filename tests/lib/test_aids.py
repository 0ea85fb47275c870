"""Training aids (deq_jax.aids): the Jacobian penalty against the exact |J|_F^2 (unbiased, exact where the theory says,
its documented variance, per sample, its gradient in expectation), the regulariser's weight and frequency inside a
jitted step, phantom gradients against the one-step gradient and the closed form of an affine map, the fixed-point
correction against hand-computed values, and each under jit, vmap and grad, with the argument errors.

Statistical checks use fixed keys and bounds of 4-5 standard errors, so they are deterministic and not marginal.
The tests marked `float32` also run with x64 off (tests/conftest.py), at tolerances in units of the dtype's eps."""

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, X64, requires_x64
from jax.test_util import check_grads

import deq_jax
from deq_jax import OneStep, fixed_point_correction, iterates, jacobian_penalty, jacobian_regulariser, phantom, solve

M_DIM = 4
EPS = float(jnp.finfo(DTYPE).eps)


def mlp_map(z, params, x):
    """A nonlinear map on a pytree state `{"a": (m,), "b": (2,)}` whose Jacobian has no special structure."""
    h = jnp.concatenate([z["a"], z["b"]])
    out = jnp.tanh(params["W"] @ h + x)
    return {"a": out[:M_DIM], "b": out[M_DIM:] * params["s"]}


def mlp_problem(dtype=jnp.float64, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    d = M_DIM + 2
    params = {"W": 0.5 * jax.random.normal(k1, (d, d), dtype), "s": jnp.asarray(0.7, dtype)}
    x = jax.random.normal(k2, (d,), dtype)
    z = {"a": jax.random.normal(k3, (M_DIM,), dtype), "b": jnp.asarray([0.3, -0.2], dtype)}
    return params, x, z


def flat_jacobian(f, z, params, x):
    """The dense Jacobian of `f` in `z` on the flattened state."""
    flat, unravel = jax.flatten_util.ravel_pytree(z)
    return jax.jacfwd(lambda v: jax.flatten_util.ravel_pytree(f(unravel(v), params, x))[0])(flat)


def exact_penalty(f, z, params, x):
    J = flat_jacobian(f, z, params, x)
    return jnp.sum(J**2) / J.shape[0]


def documented_variance(f, z, params, x, probe):
    """The per-probe variance stated in `jacobian_penalty`'s docstring, with G = J J^T."""
    J = flat_jacobian(f, z, params, x)
    G = J @ J.T
    D = J.shape[0]
    if probe == "gaussian":
        return 2 * jnp.sum(G**2) / D**2
    return 2 * (jnp.sum(G**2) - jnp.sum(jnp.diag(G) ** 2)) / D**2


# ----------------------------------------------------------------------------- Jacobian penalty


@requires_x64
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_jacobian_penalty_is_unbiased_with_the_documented_variance(probe):
    params, x, z = mlp_problem()
    exact = float(exact_penalty(mlp_map, z, params, x))
    variance = float(documented_variance(mlp_map, z, params, x, probe))
    keys = jax.random.split(jax.random.PRNGKey(1), 20000)
    one = jax.jit(jax.vmap(lambda k: jacobian_penalty(mlp_map, z, params, x, k, probe=probe)))(keys)
    se = (variance / keys.shape[0]) ** 0.5
    assert abs(float(one.mean()) - exact) < 4 * se
    # the docstring's variance, within the sampling error of a variance estimate (fourth moments: ~10% at 20000)
    assert float(one.var()) == pytest.approx(variance, rel=0.1)
    # samples=S averages S probes: the error shrinks as 1/sqrt(S)
    many = jacobian_penalty(mlp_map, z, params, x, jax.random.PRNGKey(2), samples=4096, probe=probe)
    assert abs(float(many) - exact) < 4 * (variance / 4096) ** 0.5


@pytest.mark.float32
def test_rademacher_probes_are_exact_for_a_diagonal_jacobian():
    f = lambda z, p, x: jnp.tanh(p["w"] * z + x)  # elementwise: J J^T diagonal, zero Rademacher variance
    p = {"w": jnp.linspace(0.2, 0.9, 5, dtype=DTYPE)}
    x = jnp.linspace(-1.0, 1.0, 5, dtype=DTYPE)
    z = jnp.linspace(0.5, -0.5, 5, dtype=DTYPE)
    exact = float(exact_penalty(f, z, p, x))
    for seed in range(3):
        estimate = jacobian_penalty(f, z, p, x, jax.random.PRNGKey(seed))
        assert float(estimate) == pytest.approx(exact, rel=20 * EPS)
    assert float(documented_variance(f, z, p, x, "rademacher")) == 0.0


@requires_x64
def test_jacobian_penalty_gradient_is_unbiased_for_params_and_x():
    params, x, z = mlp_problem()
    exact = jax.grad(lambda p, x: exact_penalty(mlp_map, z, p, x), argnums=(0, 1))(params, x)
    keys = jax.random.split(jax.random.PRNGKey(3), 8000)
    grads = jax.jit(
        jax.vmap(
            jax.grad(lambda p, x, k: jacobian_penalty(mlp_map, z, p, x, k, samples=2), argnums=(0, 1)), (None, None, 0)
        )
    )(params, x, keys)
    for g, e in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(exact), strict=True):
        mean, se = g.mean(axis=0), g.std(axis=0) / keys.shape[0] ** 0.5
        assert bool(jnp.all(jnp.abs(mean - e) <= 5 * se + 1e-12)), (mean, e, se)
    # the state is a constant of the penalty, as in the paper
    dz = jax.grad(lambda z: jacobian_penalty(mlp_map, z, params, x, keys[0]))(z)
    assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree_util.tree_leaves(dz))


@pytest.mark.float32
@pytest.mark.parametrize("batch_axis", [0, 1])
def test_jacobian_penalty_per_sample(batch_axis):
    f = deq_jax.TanhMap(contraction=0.9)
    params = f.init(jax.random.PRNGKey(0), M_DIM, 3, dtype=DTYPE)
    h = jax.random.normal(jax.random.PRNGKey(1), (6, 3), DTYPE)
    z = jax.random.normal(jax.random.PRNGKey(3), (6, M_DIM), DTYPE)  # any state: the penalty needs no equilibrium
    g = lambda zz, p, hh: jnp.moveaxis(f(jnp.moveaxis(zz, batch_axis, 0), p, hh), 0, batch_axis)
    zb = jnp.moveaxis(z, 0, batch_axis)
    key = jax.random.PRNGKey(2)
    per_sample = jacobian_penalty(g, zb, params, h, key, samples=3, batch_axis=batch_axis)
    assert per_sample.shape == (6,)
    # the same probes unbatched: the mean of the per-sample estimates is the paper's number (divided by n m)
    whole = jacobian_penalty(g, zb, params, h, key, samples=3)
    assert float(jnp.mean(per_sample)) == pytest.approx(float(whole), rel=50 * EPS)
    # each sample against its own exact |J_i|_F^2 / m (many probes)
    exact = jnp.sum(jax.vmap(jax.jacfwd(f), (0, None, 0))(z, params, h) ** 2, axis=(1, 2)) / M_DIM
    many = jacobian_penalty(g, zb, params, h, key, samples=4000, batch_axis=batch_axis)
    np.testing.assert_allclose(many, exact, rtol=0.05)


def test_jacobian_penalty_under_jit_and_vmap():
    f = lambda z, p, x: jnp.tanh(z @ p.T + x)
    Ws = 0.3 * jax.random.normal(jax.random.PRNGKey(0), (3, M_DIM, M_DIM), DTYPE)
    x = jax.random.normal(jax.random.PRNGKey(1), (M_DIM,), DTYPE)
    z = jnp.full((M_DIM,), 0.1, DTYPE)
    key = jax.random.PRNGKey(2)
    run = lambda W: jacobian_penalty(f, z, W, x, key, samples=2)
    np.testing.assert_allclose(jax.jit(run)(Ws[0]), run(Ws[0]), rtol=50 * EPS)  # jit vs eager
    looped = jax.jit(run)
    np.testing.assert_allclose(jax.jit(jax.vmap(run))(Ws), jnp.stack([looped(W) for W in Ws]), rtol=50 * EPS)
    grad = jax.jit(jax.grad(run))
    grads = jax.jit(jax.vmap(jax.grad(run)))(Ws)
    np.testing.assert_allclose(grads, jnp.stack([grad(W) for W in Ws]), rtol=1e3 * EPS, atol=10 * EPS)
    np.testing.assert_allclose(grad(Ws[1]), jax.grad(run)(Ws[1]), rtol=1e3 * EPS, atol=10 * EPS)


# ----------------------------------------------------------------------------- the regulariser: weight and frequency


@pytest.mark.float32
def test_regulariser_applies_its_weight_on_every_kth_step_only():
    evaluations = []
    count = lambda *_: evaluations.append(1)

    def f(z, p, x):
        jax.debug.callback(count)  # runs when the branch that calls f runs
        return jnp.tanh(z @ p.T + x)

    W = 0.3 * jax.random.normal(jax.random.PRNGKey(0), (M_DIM, M_DIM), DTYPE)
    x = jnp.linspace(-1, 1, M_DIM, dtype=DTYPE)
    z = jnp.full((M_DIM,), 0.2, DTYPE)
    key = jax.random.PRNGKey(1)
    regulariser = jacobian_regulariser(0.25, every=3, samples=2)
    loss = jax.jit(jax.value_and_grad(lambda W, step: regulariser(step, f, z, W, x, key)))
    penalty = 0.25 * jacobian_penalty(f, z, W, x, key, samples=2)
    for step in range(7):
        before = len(evaluations)
        value, grad = loss(W, step)
        jax.block_until_ready((value, grad))
        if step % 3 == 0:
            assert float(value) == pytest.approx(float(penalty), rel=50 * EPS)
            assert float(jnp.abs(grad).sum()) > 0
            assert len(evaluations) > before
        else:
            assert float(value) == 0.0 and bool(jnp.all(grad == 0))
            assert len(evaluations) == before, f"step {step}: the map ran on a step without the penalty"
    always = jacobian_regulariser(2.0, batch_axis=0)
    zb = jnp.stack([z, -z])
    xb = jnp.stack([x, x])
    expected = 2.0 * jnp.mean(jacobian_penalty(f, zb, W, xb, key, batch_axis=0))
    assert float(always(5, f, zb, W, xb, key)) == pytest.approx(float(expected), rel=50 * EPS)
    before = len(evaluations)
    assert float(jacobian_regulariser(0.0, every=2)(0, f, z, W, x, key)) == 0.0  # a zero weight: never evaluated
    assert len(evaluations) == before


# ----------------------------------------------------------------------------- phantom gradients


def affine_map(z, p, x):
    """`f(z) = M z + c` (rows: `z @ M.T + c`), with `|M|_2 = 0.6`."""
    return z @ p["M"].T + p["c"] + 0 * x


def affine_problem(dtype=jnp.float64):
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    M = jax.random.normal(k1, (M_DIM, M_DIM), dtype)
    M = 0.6 * M / jnp.linalg.norm(M, 2)
    c = jax.random.normal(k2, (M_DIM,), dtype)
    return {"M": M, "c": c}


@pytest.mark.float32
def test_phantom_one_step_is_the_one_step_gradient():
    f = deq_jax.TanhMap(contraction=0.9)
    params = f.init(jax.random.PRNGKey(0), M_DIM, 3, dtype=DTYPE)
    h = jax.random.normal(jax.random.PRNGKey(1), (5, 3), DTYPE)
    y = jax.random.normal(jax.random.PRNGKey(2), (5, M_DIM), DTYPE)
    z0 = jnp.zeros((5, M_DIM), DTYPE)

    def one_step(p, h):
        sol = solve(f, z0, p, h, solver="fixed_point", backward=OneStep(), tol=1e-6, batch_axis=0)
        return jnp.sum((sol.value - y) ** 2)

    def with_phantom(p, h):
        z_star = solve(f, z0, p, h, solver="fixed_point", tol=1e-6, batch_axis=0).value  # OneStep returns f(z*)
        return jnp.sum((phantom(f, z_star, p, h) - y) ** 2)

    expected = jax.jit(jax.grad(one_step, argnums=(0, 1)))(params, h)
    _, got, backward = jax.jit(deq_jax.value_and_grad(with_phantom, argnums=(0, 1)))(params, h)
    chex.assert_trees_all_close(got, expected, rtol=100 * EPS, atol=100 * EPS)
    assert int(backward.solves) == 0  # z* is stopped: the solve's implicit backward never runs


@requires_x64
def test_phantom_jacobian_is_the_closed_form_and_converges_to_the_implicit_gradient():
    p = affine_problem()
    eye = jnp.eye(M_DIM)
    implicit = jnp.linalg.inv(eye - p["M"])  # dz*/dc
    z_star = p["c"] @ implicit.T
    errors = []
    for damping in (1.0, 0.5):
        B = (1 - damping) * eye + damping * p["M"]
        for k in (1, 2, 5, 40):
            jac = jax.jacrev(
                lambda c, k=k, damping=damping: phantom(
                    affine_map, z_star, {"M": p["M"], "c": c}, 0.0, steps=k, damping=damping
                )
            )(p["c"])
            closed = implicit @ (eye - jnp.linalg.matrix_power(B, k))
            np.testing.assert_allclose(jac, closed, rtol=1e-12, atol=1e-13)
            errors.append((damping, k, float(jnp.linalg.norm(jac - implicit))))
    for damping in (1.0, 0.5):
        e = [err for d, _, err in errors if d == damping]
        assert e == sorted(e, reverse=True) and e[-1] < 1e-7 * e[0]

    # the gradient w.r.t. M too: against autodiff through the closed form z* = (I - M)^{-1} c
    v = jnp.arange(1.0, M_DIM + 1)
    exact = jax.grad(lambda M: v @ jnp.linalg.solve(eye - M, p["c"]))(p["M"])
    grad = lambda k: jax.grad(
        lambda M: v @ phantom(affine_map, z_star, {"M": M, "c": p["c"]}, 0.0, steps=k, damping=0.5)
    )(p["M"])
    gap = [float(jnp.linalg.norm(grad(k) - exact) / jnp.linalg.norm(exact)) for k in (1, 5, 20, 80)]
    assert gap == sorted(gap, reverse=True) and gap[-1] < 1e-10, gap


@pytest.mark.float32
def test_phantom_value_is_the_equilibrium_to_solve_accuracy():
    f = deq_jax.TanhMap(contraction=0.9)
    params = f.init(jax.random.PRNGKey(0), M_DIM, 3, dtype=DTYPE)
    h = jax.random.normal(jax.random.PRNGKey(1), (5, 3), DTYPE)
    trajectory = iterates(f, jnp.zeros((5, M_DIM), DTYPE), params, h, steps=12)
    for z_star in (trajectory[2], trajectory[-1]):  # a loose and a tight equilibrium
        residual = float(jnp.linalg.norm(f(z_star, params, h) - z_star))
        for steps, damping in ((1, 1.0), (4, 0.5), (10, 1.0)):
            z = phantom(f, z_star, params, h, steps=steps, damping=damping)
            # a non-expansive map: each damped step moves by at most damping * residual
            assert float(jnp.linalg.norm(z - z_star)) <= steps * damping * residual * (1 + 1e-3) + 10 * EPS


def test_phantom_under_jit_vmap_and_grad():
    f = lambda z, p, x: {"u": jnp.tanh(p * z["u"] + x), "v": 0.5 * z["v"] + x[:2]}
    ps = jnp.linspace(0.1, 0.6, 3, dtype=DTYPE)
    x = jnp.linspace(-1, 1, M_DIM, dtype=DTYPE)
    z = {"u": jnp.zeros(M_DIM, DTYPE), "v": jnp.ones(2, DTYPE)}
    run = lambda p: phantom(f, z, p, x, steps=3, damping=0.7)
    eager = [run(p) for p in ps]
    chex.assert_trees_all_close(
        jax.jit(jax.vmap(run))(ps), jax.tree_util.tree_map(lambda *a: jnp.stack(a), *eager), rtol=10 * EPS
    )
    chex.assert_trees_all_close(jax.jit(run)(ps[0]), eager[0], rtol=10 * EPS)
    # a traced damping (a sweep over it) against the loop
    dampings = jnp.asarray([0.3, 1.0], DTYPE)
    swept = jax.jit(jax.vmap(lambda d: phantom(f, z, ps[0], x, steps=3, damping=d)))(dampings)
    for i, d in enumerate((0.3, 1.0)):
        chex.assert_trees_all_close(
            jax.tree_util.tree_map(lambda a, i=i: a[i], swept),
            phantom(f, z, ps[0], x, steps=3, damping=d),
            rtol=10 * EPS,
        )
    scalar = lambda p, x: jnp.sum(phantom(f, z, p, x, steps=3, damping=0.7)["u"] ** 2)
    check_grads(scalar, (ps[1], x), order=1, modes=["rev"], rtol=1e-2 if not X64 else 1e-6)


# ----------------------------------------------------------------------------- fixed-point correction


def scalar_affine(z, p, x):
    return p["a"] * z + p["c"] + 0 * x


@pytest.mark.float32
def test_fixed_point_correction_against_a_hand_computed_example():
    # f(z) = a z + c, a = 1/2, c = 1, z0 = 0: z1 = 1, z2 = 3/2, z3 = 7/4; zhat_i = f(z_i) = 3/2, 7/4, 15/8;
    # gamma = 1/2: weights 1/4, 1/2, 1; loss (z - 0)^2.
    p = {"a": jnp.asarray(0.5, DTYPE), "c": jnp.asarray(1.0, DTYPE)}
    trajectory = iterates(scalar_affine, jnp.asarray(0.0, DTYPE), p, 0.0, steps=3)
    np.testing.assert_array_equal(trajectory, [1.0, 1.5, 1.75])
    loss = lambda p: fixed_point_correction(lambda z: z**2, scalar_affine, trajectory, p, 0.0, gamma=0.5)
    value, grad = jax.jit(jax.value_and_grad(loss))(p)
    # L = 1/4 (9/4) + 1/2 (49/16) + 225/64 = 359/64
    assert float(value) == 359 / 64
    # dL/dc = sum w_i 2 zhat_i = 3/4 + 7/4 + 15/4 = 25/4; dL/da = sum w_i 2 zhat_i z_i = 3/4 + 21/8 + 105/16 = 159/16
    assert float(grad["c"]) == 25 / 4 and float(grad["a"]) == 159 / 16

    # every=2 selects z3 and z1 (weights 1, gamma^2); damping 1/2, two phantom steps:
    # zhat = z + (1/2)(f(z) - z) twice: from z1 = 1: 5/4, 45/32... computed exactly below from the definition
    def by_hand(a, c):
        step = lambda z: 0.5 * z + 0.5 * (a * z + c)
        zhat1, zhat3 = step(step(1.0)), step(step(1.75))
        return 0.25 * zhat1**2 + zhat3**2

    loss2 = lambda p: fixed_point_correction(
        lambda z: z**2, scalar_affine, trajectory, p, 0.0, every=2, gamma=0.5, phantom_steps=2, damping=0.5
    )
    value2, grad2 = jax.value_and_grad(loss2)(p)
    hand_value, hand_grad = jax.value_and_grad(by_hand, argnums=(0, 1))(0.5, 1.0)
    hand_value = float(hand_value)
    assert float(value2) == pytest.approx(hand_value, rel=4 * EPS)
    assert float(grad2["a"]) == pytest.approx(float(hand_grad[0]), rel=4 * EPS)
    assert float(grad2["c"]) == pytest.approx(float(hand_grad[1]), rel=4 * EPS)
    # the same selection by indices (0-based positions, negatives from the end)
    by_indices = fixed_point_correction(
        lambda z: z**2, scalar_affine, trajectory, p, 0.0, indices=(0, -1), gamma=0.5, phantom_steps=2, damping=0.5
    )
    assert float(by_indices) == float(value2)


def test_fixed_point_correction_under_jit_and_vmap_on_a_pytree_state():
    f = lambda z, p, x: {"u": jnp.tanh(p * z["u"] + x), "v": 0.5 * z["v"] + p}
    x = jnp.linspace(-1, 1, M_DIM, dtype=DTYPE)
    z0 = {"u": jnp.zeros(M_DIM, DTYPE), "v": jnp.zeros(2, DTYPE)}
    ps = jnp.linspace(0.2, 0.7, 3, dtype=DTYPE)
    loss_fn = lambda z: jnp.sum(z["u"] ** 2) + jnp.sum(z["v"])

    def run(p):
        trajectory = iterates(f, z0, p, x, steps=6, damping=0.8)
        return fixed_point_correction(loss_fn, f, trajectory, p, x, every=2, phantom_steps=2, damping=0.8)

    looped, grad = jax.jit(run), jax.jit(jax.grad(run))
    np.testing.assert_allclose(jax.jit(jax.vmap(run))(ps), jnp.stack([looped(p) for p in ps]), rtol=20 * EPS)
    np.testing.assert_allclose(looped(ps[1]), run(ps[1]), rtol=20 * EPS)  # jit vs eager

    # the definition, term by term: iterates 6, 4, 2 with weights 1, 0.8^2, 0.8^4
    def by_definition(p):
        trajectory = iterates(f, z0, p, x, steps=6, damping=0.8)
        total = 0.0
        for i, w in ((5, 1.0), (3, 0.8**2), (1, 0.8**4)):
            z_i = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], trajectory)
            total = total + w * loss_fn(phantom(f, z_i, p, x, steps=2, damping=0.8))
        return total

    np.testing.assert_allclose(looped(ps[1]), by_definition(ps[1]), rtol=20 * EPS)
    np.testing.assert_allclose(grad(ps[1]), jax.jit(jax.grad(by_definition))(ps[1]), rtol=100 * EPS)


# ----------------------------------------------------------------------------- argument errors


def _args():
    f = lambda z, p, x: jnp.tanh(p * z + x)
    z = jnp.zeros(3, DTYPE)
    return f, z, jnp.asarray(0.5, DTYPE), jnp.ones(3, DTYPE)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda f, z, p, x: phantom(f, z, p, x, steps=0), ValueError, r"steps must be a positive integer; got 0"),
        (lambda f, z, p, x: phantom(f, z, p, x, steps=2.0), ValueError, r"steps must be a positive integer; got 2.0"),
        (lambda f, z, p, x: phantom(f, z, p, x, damping=0.0), ValueError, r"damping must be a number in \(0, 1\]"),
        (lambda f, z, p, x: phantom(f, z, p, x, damping=1.5), ValueError, r"damping .* got 1.5"),
        (lambda f, z, p, x: phantom(z, z, p, x), TypeError, r"f must be a callable"),
        (lambda f, z, p, x: phantom(f, jnp.zeros(3, jnp.int32), p, x), TypeError, r"z_star must be a floating"),
        (lambda f, z, p, x: jacobian_penalty(f, z, p, x, jax.random.PRNGKey(0), samples=0), ValueError, r"samples"),
        (
            lambda f, z, p, x: jacobian_penalty(f, z, p, x, jax.random.PRNGKey(0), probe="normal"),
            ValueError,
            r"unknown probe 'normal'; valid choices are 'rademacher', 'gaussian'",
        ),
        (
            lambda f, z, p, x: jacobian_penalty(f, z, p, x, jax.random.PRNGKey(0), batch_axis=1),
            ValueError,
            r"batch_axis=1 is not an axis of z",
        ),
        (lambda f, z, p, x: jacobian_regulariser(-0.1), ValueError, r"weight must be a number in \[0, inf\); got -0.1"),
        (lambda f, z, p, x: jacobian_regulariser(0.1, every=0), ValueError, r"every must be a positive integer; got 0"),
        (lambda f, z, p, x: iterates(f, z, p, x, steps=-1), ValueError, r"steps must be a positive integer; got -1"),
        (
            lambda f, z, p, x: fixed_point_correction(jnp.sum, f, z[None], p, x, gamma=1.2),
            ValueError,
            r"gamma must be a number in \[0, 1\]; got 1.2",
        ),
        (lambda f, z, p, x: fixed_point_correction(jnp.sum, f, z[None], p, x, every=0), ValueError, r"every must"),
        (
            lambda f, z, p, x: fixed_point_correction(jnp.sum, f, z[None], p, x, phantom_steps=0),
            ValueError,
            r"phantom_steps must be a positive integer",
        ),
        (
            lambda f, z, p, x: fixed_point_correction(jnp.sum, f, z[None], p, x, indices=(1,)),
            ValueError,
            r"indices must be distinct integer positions in \[-1, 1\)",
        ),
        (
            lambda f, z, p, x: fixed_point_correction(jnp.sum, f, z[None], p, x, every=2, indices=(0,)),
            ValueError,
            r"either every or indices",
        ),
        (
            lambda f, z, p, x: fixed_point_correction(
                jnp.sum, f, {"a": z[None], "b": z[None, None].repeat(2, 0)}, p, x
            ),
            ValueError,
            r"trajectory must have a leading axis of one length",
        ),
        (
            lambda f, z, p, x: fixed_point_correction(lambda z: z, f, z[None], p, x),
            ValueError,
            r"loss_fn must return a scalar",
        ),
    ],
)
def test_argument_errors_name_the_argument_and_the_value(call, error, match):
    with pytest.raises(error, match=match):
        call(*_args())
