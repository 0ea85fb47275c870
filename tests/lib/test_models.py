"""Models: the DELM in both formulations, the linear model, deep linear networks; the Model protocol and the
registries; shapes and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq_jax import DELM, DeepLinear, Linear, Model, Refine
from deq_jax.maps import get_sigma
from deq_jax.models import REFINE_FROM_WIDTH

pytestmark = pytest.mark.float32  # the whole file also runs with x64 off (float32), as users run JAX

requires_x64 = pytest.mark.skipif(not jax.config.read("jax_enable_x64"), reason="float64 reference needs x64")


def data(dtype, n=13, m=6, m_y=4):
    phi = jax.random.normal(jax.random.PRNGKey(0), (n, m), dtype)
    return phi


# the solvers themselves are tested in test_solve.py (and through the model in test_models_under_vmap_over_seeds)
@requires_x64
def test_delm_formulations_and_closed_form():
    phi = data(jnp.float64)
    sigmas = ["column_softmax", "row_softmax", "scaled_tanh"]
    models = {
        (s, f): DELM(6, 4, gamma=0.7, sigma=s, formulation=f, tol=1e-12)
        for s in sigmas
        for f in ["transposed", "per_sample"]
    }
    params = DELM(6, 4).init(jax.random.PRNGKey(1), jnp.float64)
    # one compiled program for all six models: compiling dominates this test
    outs = jax.jit(lambda p: {k: (m.apply(p, phi), m.end_to_end(p)) for k, m in models.items()})(params)
    for (sigma, _), ((pred, sol), W_model) in outs.items():
        U = jnp.eye(6) - 0.7 * get_sigma(sigma)(params["A"])
        W = params["B"] @ jnp.linalg.inv(U)
        assert pred.shape == (13, 4) and bool(sol.stats.converged)
        np.testing.assert_allclose(pred, phi @ W.T, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(W_model, W, rtol=1e-9, atol=1e-12)


def test_delm_float32_end_to_end():
    model = DELM(6, 4)
    params = model.init(jax.random.PRNGKey(0))
    assert params["A"].dtype == jnp.float32 and params["A"].shape == (6, 6) and params["B"].shape == (4, 6)
    pred, sol = jax.jit(model.apply)(params, data(jnp.float32))
    assert pred.dtype == jnp.float32 and bool(sol.stats.converged)
    # float32 data with x64 on (or off): the unrolled loop's carry keeps float32 (jaxopt's statistics came back float64)
    unrolled = DELM(6, 4, solver="fixed_point", backward="unrolled", maxiter=30)
    grads = jax.grad(lambda p: jnp.sum(unrolled.apply(p, data(jnp.float32))[0]))(params)
    assert grads["A"].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(grads["A"])))


def np_layers(phi, layers):
    """The deep linear network sample by sample and layer by layer in NumPy float64: h_{k+1} = W_k h_k."""
    out = []
    for x in np.asarray(phi, np.float64):
        h = x
        for W in layers:
            h = np.asarray(W, np.float64) @ h
        out.append(h)
    return np.array(out)


def central_difference(fn, params, h=1e-6):
    """d fn / d params by central differences in float64, entry by entry (a pytree of arrays)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    grads = []
    for i, leaf in enumerate(leaves):
        g = np.zeros(leaf.shape)
        for idx in np.ndindex(leaf.shape):
            shifted = []
            for sign in (1.0, -1.0):
                moved = [np.asarray(x, np.float64).copy() for x in leaves]
                moved[i][idx] += sign * h
                shifted.append(fn(jax.tree_util.tree_unflatten(tree, [jnp.asarray(x) for x in moved])))
            g[idx] = (shifted[0] - shifted[1]) / (2 * h)
        grads.append(g)
    return jax.tree_util.tree_unflatten(tree, grads)


@requires_x64
def test_linear_and_deep_linear():
    """Predictions against a layer-by-layer product per sample (not the end-to-end matrix apply is built on), and
    gradients of a loss through apply against float64 central differences."""
    phi = data(jnp.float64)
    lin, deeps = Linear(6, 4), [DeepLinear(6, 4, depth=1), DeepLinear(6, 4, depth=3, hidden=2)]
    p_lin = lin.init(jax.random.PRNGKey(0), jnp.float64)
    p_deep = [deep.init(jax.random.PRNGKey(k), jnp.float64) for k, deep in enumerate(deeps)]
    assert [len(p["layers"]) for p in p_deep] == [1, 3]
    assert [W.shape for W in p_deep[1]["layers"]] == [(2, 6), (2, 2), (4, 2)]
    T = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (13, 4), jnp.float64))

    pred, stats = lin.apply(p_lin, phi)
    assert stats is None
    np.testing.assert_allclose(pred, np_layers(phi, [p_lin["W"]]), rtol=1e-13)
    for model, p in zip(deeps, p_deep, strict=True):

        def loss(p, model=model):
            return jnp.sum(jnp.asarray(T) * model.apply(p, phi)[0] ** 2)

        np.testing.assert_allclose(model.apply(p, phi)[0], np_layers(phi, p["layers"]), rtol=1e-12)
        np.testing.assert_allclose(model.end_to_end(p), np_layers(np.eye(6), p["layers"]).T, rtol=1e-12)
        grads = jax.jit(jax.grad(loss))(p)
        fd = central_difference(lambda q: float(loss(q)), p)
        for g, g_fd in zip(grads["layers"], fd["layers"], strict=True):
            np.testing.assert_allclose(g, g_fd, rtol=1e-6, atol=1e-8)


def test_models_under_vmap_over_seeds():
    phi = data(jnp.float32)
    model = DELM(6, 4)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = jax.vmap(model.init)(keys)
    apply = jax.jit(lambda p: model.apply(p, phi))
    preds, sol = jax.vmap(apply)(params)
    assert preds.shape == (3, 13, 4) and sol.stats.converged.shape == (3,)
    for i in range(3):
        np.testing.assert_allclose(preds[i], apply(model.init(keys[i]))[0], rtol=1e-5, atol=1e-6)


def test_model_argument_errors():
    with pytest.raises(ValueError, match=r"^maxiter must be a positive integer; got 0"):
        DELM(3, 2, maxiter=0)
    with pytest.raises(ValueError, match=r"^init_scale must be a positive number; got 0"):
        Linear(3, 2, init_scale=0)
    phi = data(jnp.float32)
    model = DELM(6, 4)
    params = model.init(jax.random.PRNGKey(0), jnp.float32)
    with pytest.raises(ValueError, match=r"params\['A'\] must have shape \(6, 6\).*got shape \(5, 5\)"):
        model.apply({"A": jnp.zeros((5, 5)), "B": params["B"]}, phi)
    with pytest.raises(ValueError, match=r"params\['B'\] must have shape \(4, 6\).*got shape \(4, 5\)"):
        model.apply({"A": params["A"], "B": jnp.zeros((4, 5))}, phi)
    with pytest.raises(ValueError, match=r"phi must have shape \(\*, 6\).*got shape \(13, 5\)"):
        model.apply(params, phi[:, :5])
    with pytest.raises(ValueError, match=r"phi must have rank 2; got array of shape \(6,\)"):
        model.apply(params, phi[0])
    with pytest.raises(ValueError, match="params must be a dict with keys"):
        model.apply({"A": params["A"]}, phi)
    with pytest.raises(TypeError, match=r"phi must be a floating-point array.*int"):
        model.apply(params, jnp.ones((3, 6), jnp.int32))
    with pytest.raises(ValueError, match="phi contains NaN"):
        model.apply(params, phi.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="width must be a positive integer; got 0"):
        DELM(0, 4)
    with pytest.raises(ValueError, match="out_dim must be a positive integer; got -1"):
        DELM(3, -1)
    with pytest.raises(ValueError, match=r"gamma must be a number in the open interval \(0, 1\); got 1.2"):
        DELM(3, 2, gamma=1.2)
    with pytest.raises(ValueError, match="unknown formulation 'columns'"):
        DELM(3, 2, formulation="columns")
    with pytest.raises(ValueError, match=r"unknown solver 'lbfgs'; valid choices are .*'direct', .*'refine'"):
        DELM(3, 2, solver="lbfgs")
    with pytest.raises(ValueError, match="tol must be a positive number; got 0"):
        DELM(3, 2, tol=0)
    with pytest.raises(ValueError, match="depth must be a positive integer; got 0"):
        DeepLinear(3, 2, depth=0)
    with pytest.raises(ValueError, match=r"params\['W'\] must have shape \(4, 6\)"):
        Linear(6, 4).apply({"W": jnp.zeros((6, 4))}, phi)


def test_model_protocol():
    """An object with the four methods of the protocol is a Model (a user's own DEQ included); one without the
    capabilities the training step uses is not."""

    class Mine:
        def init(self, key, dtype=jnp.float32):
            return {"W": jnp.zeros((2, 3), dtype)}

        def apply(self, params, phi, warm=None):
            return phi @ params["W"].T, None

        def warm_start(self, params, phi=None, previous=None):
            return None

        def end_to_end_solution(self, params, warm=None):
            return params["W"], None

    class InitApplyOnly:
        init, apply = Mine.init, Mine.apply

    for model in (DELM(3, 2), Linear(3, 2), DeepLinear(3, 2), Mine()):
        assert isinstance(model, Model)
    assert not isinstance(object(), Model) and not isinstance(InitApplyOnly(), Model)
    assert DELM(3, 2, solver=Refine(max_sweeps=3)).solver == Refine(max_sweeps=3)
    # "auto" (the default) says what it chose: direct below the measured crossover, refine from it on
    assert DELM(REFINE_FROM_WIDTH - 1, 2).solver == "direct" and DELM(REFINE_FROM_WIDTH, 2).solver == "refine"


@requires_x64
def test_refine_without_carried_state_is_the_direct_solve():
    phi = data(jnp.float64)
    direct, refine = DELM(6, 4, solver="direct"), DELM(6, 4, solver="refine")
    params = direct.init(jax.random.PRNGKey(1), jnp.float64)
    np.testing.assert_array_equal(refine.apply(params, phi)[0], direct.apply(params, phi)[0])
