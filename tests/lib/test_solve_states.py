"""Every (solver x backward) pair on every kind of state, and the peers' own fixed-point test problems.

States: a 0-d state, a rank-3 array, and a pytree mixing tuples, dicts and NamedTuples with 0-d, rank-3, 1-D and 2-D
leaves (and, with x64, a float32 leaf next to float64 ones). Array states (1-D and 2-D) are the DELM's, covered pair by
pair in test_solve.py. Each pair is checked against the closed form of an affine map with a coupling between all
entries, whose gradients are computed independently from the dense system `(I - J) z = x`.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, X64, requires_x64, tree_rel_err

from deq_jax import Broyden, Implicit, solve

Pair = collections.namedtuple("Pair", "u v")
SOLVERS = ["fixed_point", "anderson", "broyden", "direct"]
BACKWARDS = ["implicit", "one_step", "unrolled"]
LOW = jnp.float32  # the pytree state's low-precision leaf (float32 next to float64 with x64)
# the pytree state's float32 leaf bounds what its solves can reach (relative residual ~1e-7): tol 1e-6 there
TOL = {"scalar": 1e-10, "rank3": 1e-10, "pytree": 1e-6} if X64 else collections.defaultdict(lambda: 1e-6)
GRAD_RTOL = {"scalar": 1e-7, "rank3": 1e-7, "pytree": 1e-4} if X64 else collections.defaultdict(lambda: 1e-4)


def _states():
    z = lambda *shape: jnp.zeros(shape, DTYPE)
    return {
        "scalar": z(),
        "rank3": z(2, 1, 3),
        "pytree": {"a": (z(), z(2, 1, 3)), "b": Pair(u=jnp.zeros(3, LOW), v=z(2, 2))},
    }


def coupled(z, p, x):
    """`f(z) = a z + b mean(z) + x` leaf by leaf (each leaf keeps its dtype): an affine contraction for |a| + |b| < 1
    whose Jacobian couples every entry of every leaf."""
    leaves = jax.tree_util.tree_leaves(z)
    mean = sum(jnp.sum(leaf.astype(DTYPE)) for leaf in leaves) / sum(leaf.size for leaf in leaves)
    return jax.tree_util.tree_map(lambda zl, xl: (p[0] * zl + p[1] * mean + xl).astype(zl.dtype), z, x)


def _inputs(state):
    leaves, treedef = jax.tree_util.tree_flatten(state)
    n = sum(leaf.size for leaf in leaves)
    x = jax.tree_util.tree_unflatten(
        treedef,
        [
            ((1 + jnp.arange(leaf.size, dtype=DTYPE)).reshape(leaf.shape) / n + 0.1 * i).astype(leaf.dtype)
            for i, leaf in enumerate(leaves)
        ],
    )
    w = jax.tree_util.tree_map(lambda leaf: jnp.cos(1.0 + jnp.arange(leaf.size, dtype=DTYPE)).reshape(leaf.shape), x)
    return jnp.asarray([0.3, 0.2], DTYPE), x, w


def _loss(w, z):
    return sum(
        jnp.sum(wl * zl.astype(DTYPE))
        for wl, zl in zip(jax.tree_util.tree_leaves(w), jax.tree_util.tree_leaves(z), strict=True)
    )


def _reference(state, one_step):
    """Gradients of `sum(w * z*)` (or, one-step, of `sum(w * f(stop_gradient(z*)))`) from the dense system."""
    p, x, w = _inputs(state)
    flat, unravel = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(lambda leaf: leaf.astype(DTYPE), state))
    n = flat.size

    def z_star(p, x):
        x_flat = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(lambda leaf: leaf.astype(DTYPE), x))[0]
        J = p[0] * jnp.eye(n, dtype=DTYPE) + p[1] / n
        return unravel(jnp.linalg.solve(jnp.eye(n, dtype=DTYPE) - J, x_flat))

    if one_step:
        return jax.grad(lambda p, x: _loss(w, coupled(jax.lax.stop_gradient(z_star(p, x)), p, x)), (0, 1))(p, x)
    return jax.grad(lambda p, x: _loss(w, z_star(p, x)), (0, 1))(p, x)


@functools.cache
def _grad(kind, solver, backward):
    state = _states()[kind]

    def loss(p, x, w):
        sol = solve(coupled, state, p, x, solver=solver, backward=backward, tol=TOL[kind], maxiter=80)
        return _loss(w, sol.value), sol.stats

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def _check_pair(kind, solver, backward):
    state = _states()[kind]
    p, x, w = _inputs(state)
    (gp, gx), stats = _grad(kind, solver, backward)(p, x, w)
    assert bool(stats.converged) and not bool(stats.diverged)
    ref = _reference(state, isinstance(backward, str) and backward == "one_step")
    assert tree_rel_err(gp, ref[0]) <= GRAD_RTOL[kind]
    assert tree_rel_err(gx, ref[1]) <= GRAD_RTOL[kind]
    # gradients keep the structure and dtypes of what they differentiate
    assert jax.tree_util.tree_structure(gx) == jax.tree_util.tree_structure(x)
    assert [g.dtype for g in jax.tree_util.tree_leaves(gx)] == [leaf.dtype for leaf in jax.tree_util.tree_leaves(x)]


KINDS = ["scalar", "rank3", "pytree"]
# A covering subset: every (solver, backward), (solver, state) and (backward, state) pair once (a Latin square);
# the implicit pairs use the dense LU backward, the one that crashed on 0-d, rank-3 and pytree states.
COVER = [
    (solver, backward, KINDS[(b + i) % 3]) for i, solver in enumerate(SOLVERS) for b, backward in enumerate(BACKWARDS)
]


# also run with x64 off: every solver, backward and state once
FLOAT32 = {
    ("fixed_point", "implicit", "scalar"),
    ("anderson", "unrolled", "scalar"),
    ("broyden", "implicit", "pytree"),
    ("direct", "one_step", "rank3"),
    ("anderson", "one_step", "pytree"),
}


@pytest.mark.parametrize(
    ("solver", "backward", "kind"),
    [pytest.param(*case, marks=[pytest.mark.float32] if case in FLOAT32 else []) for case in COVER],
)
def test_pairs_cover_every_state(solver, backward, kind):
    _check_pair(kind, solver, Implicit("lu") if backward == "implicit" else backward)


@pytest.mark.slow
@pytest.mark.parametrize("backward", [*BACKWARDS, Implicit("lu")])
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_pair_on_every_state(kind, solver, backward):
    _check_pair(kind, solver, backward)


@pytest.mark.parametrize(
    "linear_solver",
    ["gmres", pytest.param("bicgstab", marks=pytest.mark.slow), pytest.param("normal_cg", marks=pytest.mark.slow)],
)
def test_every_linear_solver_on_a_pytree_state(linear_solver):
    state = _states()["pytree"]
    p, x, w = _inputs(state)
    (gp, gx), _stats = _grad("pytree", "anderson", Implicit(linear_solver))(p, x, w)
    ref = _reference(state, False)
    assert tree_rel_err(gp, ref[0]) <= 1e-4 and tree_rel_err(gx, ref[1]) <= 1e-4


# ----------------------------------------------------------------------------- the peers' test problems


@pytest.mark.parametrize("solver", [pytest.param("fixed_point", marks=pytest.mark.float32), "anderson", "broyden"])
def test_unrolled_gradient_from_the_fixed_point_itself(solver):
    """jaxopt's cos problem f(z) = cos(z) + theta, theta = (0, pi/2), started AT z*: nothing needs iterating, yet
    the unrolled gradient must be dz*/dtheta = 1 / (1 + sin z*) = (0.575, 0.5), not the one-step 1.0. (The second
    entry's Jacobian at z* is -1, where plain iteration's derivative oscillates: the averaged tail settles it.)"""
    f = lambda z, theta, x: jnp.cos(z) + theta
    theta = jnp.asarray([0.0, jnp.pi / 2], DTYPE)
    z_star = jnp.asarray([0.7390851332151607, jnp.pi / 2], DTYPE)
    run = lambda backward: jax.jit(
        jax.grad(
            lambda t: jnp.sum(solve(f, z_star, t, 0.0, solver=solver, tol=1e-6, backward=backward, maxiter=40).value)
        )
    )
    truth = 1 / (1 + jnp.sin(z_star))
    np.testing.assert_allclose(run("unrolled")(theta), truth, rtol=1e-5)


def test_jaxopt_problems():
    """jaxopt's FixedPointIteration tests (tests/fixed_point_iteration_test.py) run through solve."""
    # the polynomial/sin pytree problem: fixed point 0, so the rule needs atol
    fs = lambda z, p, x: (jnp.sin(z[0]) * z[0] ** 2, z[1] ** 3)
    z0 = (jnp.asarray([0.6, 0.0, -0.1], DTYPE), jnp.asarray([[0.7], [0.5]], DTYPE))
    sol = solve(fs, z0, 0.0, 0.0, solver="fixed_point", tol=1e-6, atol=1e-12)
    assert bool(sol.stats.converged)
    assert max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(sol.value)) < 1e-6
    # geometric decay with ratios up to 0.999: Anderson instead of jaxopt's 8000 plain iterations
    geometric = lambda z, p, x: jnp.asarray([0.9, 0.99, 0.999], DTYPE) * z
    sol = solve(geometric, jnp.asarray([1.0, 0.4, -0.2], DTYPE), 0.0, 0.0, solver="anderson", tol=1e-5, atol=1e-8)
    assert bool(sol.stats.converged) and float(jnp.linalg.norm(sol.value)) < 1e-5
    # has_aux with a flat landscape: f(x, theta) = (theta * x, x)
    flat = lambda z, theta, x: (theta * z, z)
    sol = solve(
        flat,
        jnp.asarray([1.0, -0.5], DTYPE),
        jnp.asarray([0.05, 0.2], DTYPE),
        0.0,
        solver="broyden",
        has_aux=True,
        tol=1e-6,
        atol=1e-12,
    )
    assert bool(sol.stats.converged)
    np.testing.assert_allclose(sol.aux, sol.value, atol=1e-12)


@requires_x64
def test_jaxopt_affine_contractive_mapping_finite_differences():
    """jaxopt's big affine contraction (n = 200 there, 30 here), gradients checked by finite differences."""
    from jax.test_util import check_grads

    n = 30
    key, subkey = jax.random.split(jax.random.PRNGKey(0))
    M = jax.random.uniform(subkey, (n, n), jnp.float64, -1.0, 1.0)
    M = M + M.T
    M = M / (2 * jnp.max(jnp.abs(jnp.linalg.eigvalsh(M))) + 1e-4)  # spectral radius < 0.5
    b = jax.random.uniform(key, (n,), jnp.float64)
    f = lambda z, M, b: M @ z + b
    run = jax.jit(lambda M, b: solve(f, jnp.zeros(n), M, b, tol=1e-12).value)
    np.testing.assert_allclose(run(M, b), jnp.linalg.solve(jnp.eye(n) - M, b), rtol=1e-10)
    check_grads(run, (M, b), order=1, modes=("rev",), eps=1e-4)


def test_optimistix_problems():
    """optimistix's fixed-point problems (tests/helpers.py): exponential and cosine on a pytree with a rank-3 leaf,
    the implicit-midpoint Robertson step (equilibrium 0), a nonlinear heat-equation step; checked as optimistix does,
    |f(z) - z| within 1e-4 (atol and rtol), with and without aux, each by another solver."""
    ones = ({"a": 0.5 * jnp.ones((3, 2, 4), DTYPE)}, 0.5 * jnp.ones(4, DTYPE))
    tm = jax.tree_util.tree_map

    def robertson(y, k1=0.04, k2=3e7, k3=1e4):
        y, unflatten = jax.flatten_util.ravel_pytree(y)
        return unflatten(
            jnp.stack([-k1 * y[0] + k3 * y[1] * y[2], k1 * y[0] - k2 * y[1] ** 2 - k3 * y[1] * y[2], k2 * y[1] ** 2])
        )

    grid = jnp.linspace(-1, 1, 100, dtype=DTYPE)
    y0, f0 = grid**2, (1 - grid**2) * grid**2
    problems = [
        ("exponential", lambda z, c, x: tm(lambda v: jnp.exp(-c * v), z), ones, "fixed_point"),
        ("cosine", lambda z, c, x: tm(lambda v: jnp.cos(c * v), z), ones, "anderson"),
        (
            "robertson",
            lambda z, c, x: tm(lambda v: 1e-8 * v, robertson(z)),
            (jnp.ones(2, DTYPE), {"b": jnp.ones((), DTYPE)}),
            "fixed_point",
        ),
        ("heat", lambda z, c, x: c * (y0 + 0.5 * ((1 - z) * z + f0)), jnp.ones(100, DTYPE), Broyden(history_size=20)),
    ]
    for i, (name, f, z0, solver) in enumerate(problems):
        has_aux = i % 2 == 1
        fn = (lambda z, c, x, f=f: (f(z, c, x), {"smoke": jnp.ones(2)})) if has_aux else f
        sol = solve(
            fn, z0, jnp.asarray(1.0, DTYPE), 0.0, solver=solver, tol=1e-6, atol=1e-6, maxiter=1000, has_aux=has_aux
        )
        assert bool(sol.stats.converged), name
        fz = f(sol.value, 1.0, 0.0)
        for a, b in zip(jax.tree_util.tree_leaves(sol.value), jax.tree_util.tree_leaves(fz), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)
