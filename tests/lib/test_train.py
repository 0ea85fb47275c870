"""Losses and training: steps with solver metrics, full-batch GD, mini-batch Adam, a penalty hook, the square loss's
Gram route, a user's own model, and verdicts that tell divergence from non-convergence."""

import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rel_err

from deq_jax import (
    DELM,
    DeepLinear,
    DivergenceError,
    DivergenceWarning,
    Implicit,
    Linear,
    Model,
    NonConvergenceError,
    NonConvergenceWarning,
    TanhMap,
    Warm,
    check_converged,
    cross_entropy,
    full_batch_gd,
    logistic,
    make_chunk,
    make_step,
    solve,
    square,
    square_gram,
)

pytestmark = pytest.mark.float32  # the whole file also runs with x64 off (float32), as users run JAX

requires_x64 = pytest.mark.skipif(not jax.config.read("jax_enable_x64"), reason="float64 reference needs x64")


def problem(dtype, n=40, m=8, m_y=3):
    phi = jax.random.normal(jax.random.PRNGKey(0), (n, m), dtype)
    labels = jax.random.randint(jax.random.PRNGKey(1), (n,), 0, m_y)
    return phi, labels, jax.nn.one_hot(labels, m_y, dtype=dtype)


@requires_x64
def test_losses_match_their_definitions():
    pred = jnp.array([[1.0, 2.0], [0.5, -1.0]], jnp.float64)
    target = jnp.array([[0.0, 1.0], [1.0, 0.0]], jnp.float64)
    np.testing.assert_allclose(square(pred, target), 0.5 * np.mean(np.sum((pred - target) ** 2, axis=1)))
    log_softmax = pred - jax.scipy.special.logsumexp(pred, axis=1, keepdims=True)
    ce = -np.mean(np.sum(target * log_softmax, axis=1))
    np.testing.assert_allclose(cross_entropy(pred, target), ce, rtol=1e-12)
    np.testing.assert_allclose(cross_entropy(pred, jnp.array([1, 0])), ce, rtol=1e-12)  # integer labels
    logits, y = jnp.array([0.3, -2.0], jnp.float64), jnp.array([1, 0])
    np.testing.assert_allclose(logistic(logits, y), np.mean(np.log1p(np.exp(-np.array([0.3, 2.0])))), rtol=1e-12)
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 2\)"):
        square(pred, target[:, :1])
    with pytest.raises(ValueError, match="logistic loss needs one output"):
        logistic(pred, target)


@requires_x64
def test_step_with_penalty_equals_a_manual_gradient_step():
    """Cross-entropy + (l2/2)|W|_F^2 on the DELM's end-to-end W through `penalty`, without probe rows; the same
    objective by probe rows (the identity appended to the data) is the independent reference."""
    phi, labels, _ = problem(jnp.float64)
    model, l2 = DELM(8, 3, gamma=0.8), 0.1
    params = model.init(jax.random.PRNGKey(2), jnp.float64)
    penalty = lambda p: 0.5 * l2 * jnp.sum(model.end_to_end(p) ** 2)

    def probe_rows(p):
        predictions = model.apply(p, jnp.concatenate([phi, jnp.eye(8)]))[0]
        return cross_entropy(predictions[:40], labels) + 0.5 * l2 * jnp.sum(predictions[40:] ** 2)

    value, grads = jax.jit(jax.value_and_grad(probe_rows))(params)
    for warm_start in (True, False):  # the warm-started step's explicit gradient, and autodiff through the solve
        step = make_step(model, "cross_entropy", learning_rate=0.1, penalty=penalty, warm_start=warm_start)
        state, metrics = step.update(step.init(params, phi), phi, labels)
        np.testing.assert_allclose(metrics["loss"], value, rtol=1e-12)
        for k in params:
            np.testing.assert_allclose(state.params[k], params[k] - 0.1 * grads[k], rtol=1e-12, atol=1e-14)
    # the stateless form step(params, opt_state, phi, y): the same compiled update with nothing carried
    new, _, metrics = step(params, optax.sgd(0.1).init(params), phi, labels)
    assert rel_err(new, state.params) < 1e-13
    # the forward solve's statistics, and the implicit backward passes' (counted by deq_jax.value_and_grad)
    assert set(metrics) == {
        "loss",
        "grad_norm",
        "nonfinite_features",
        "bad_targets",
        "iterations",
        "residual",
        "relative_residual",
        "converged",
        "factorisations",
        "backward_solves",
        "backward_failures",
        "backward_nonfinite",
        "backward_relative_residual",
        "backward_iterations",
        "backward_unconverged_forward",
    }
    assert int(metrics["backward_failures"]) == 0 and int(metrics["backward_nonfinite"]) == 0


@pytest.mark.parametrize(
    "model",
    [
        DELM(8, 3, gamma=0.8),
        DELM(8, 3, solver="refine", formulation="per_sample"),
        Linear(8, 3),
        DeepLinear(8, 3, depth=3),
    ],
)
def test_full_batch_gd_decreases_the_loss(model):
    phi, _, y = problem(jnp.float32)
    params = model.init(jax.random.PRNGKey(3))
    _final, history = jax.jit(lambda p: full_batch_gd(model, "square", p, phi, y, learning_rate=0.05, steps=60))(params)
    loss = np.asarray(history["loss"])
    assert loss.shape == (60,)
    assert loss[-1] < 0.9 * loss[0]
    assert np.all(np.diff(loss) <= 1e-6 * loss[0])  # small-step GD on a smooth loss is monotone (f32 rounding)
    assert bool(jnp.all(history["converged"]))
    assert check_converged(history) == 0


def test_full_batch_gd_vmapped_over_seeds_equals_loop():
    """Warm-started refinement under vmap (its conditionals become selects) gives the numbers of one seed at a time."""
    phi, labels, _ = problem(jnp.float32)
    model = DELM(8, 3, solver="refine")
    run = lambda key: full_batch_gd(model, "cross_entropy", model.init(key), phi, labels, learning_rate=0.5, steps=20)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    _, histories = jax.jit(jax.vmap(run))(keys)
    for i in range(3):
        _, h = jax.jit(run)(keys[i])
        np.testing.assert_allclose(histories["loss"][i], h["loss"], rtol=2e-6)


def test_minibatch_adam():
    """Epochs of shuffled mini-batches written with the step's three functions: W, dL/dB and the LU factors carry
    from batch to batch (`rebatch`), the optimizer state from step to step."""
    phi, labels, _ = problem(jnp.float32, n=64)
    model = DELM(8, 3, solver="refine")
    step = make_step(model, "cross_entropy", optax.adam(3e-2))
    state = step.init(model.init(jax.random.PRNGKey(0)), phi[:16])
    losses = np.zeros((15, 4))
    history = {"converged": [], "backward_failures": []}
    for epoch in range(15):
        order = np.asarray(jax.random.permutation(jax.random.PRNGKey(epoch), 64)).reshape(4, 16)
        for b, idx in enumerate(order):
            state, metrics = step.update(step.rebatch(state, phi[idx]), phi[idx], labels[idx])
            losses[epoch, b] = float(metrics["loss"])
            history["converged"].append(bool(metrics["converged"]))
            history["backward_failures"].append(int(metrics["backward_failures"]))
    assert losses[-1].mean() < 0.9 * losses[0].mean()
    assert check_converged({"loss": losses, **{k: np.array(v) for k, v in history.items()}}) == 0
    assert state.warm.solver_state is not None  # the factors were carried, not recomputed every step


@requires_x64
def test_gram_route_gives_the_same_trajectory():
    """Square loss from C = Phi^T Phi / n and D = Phi^T Y / n (warm-started refinement) against the features
    themselves (autodiff through a direct solve): two code paths, one trajectory."""
    phi, _, y = problem(jnp.float64)
    model = DELM(8, 3, gamma=0.8, solver="refine", tol=1e-13)
    params = model.init(jax.random.PRNGKey(4), jnp.float64)
    run = lambda gram, warm: full_batch_gd(
        model, "square", params, phi, y, learning_rate=0.05, steps=25, gram=gram, warm_start=warm
    )
    final_g, hist_g = jax.jit(lambda: run(True, True))()
    final_p, hist_p = jax.jit(lambda: run(False, False))()
    # float64; the Gram form's loss is a difference of O(1) terms: 1e-12 relative is rounding
    np.testing.assert_allclose(hist_g["loss"], hist_p["loss"], rtol=1e-12)
    assert rel_err(final_g, final_p) < 1e-12
    gram = square_gram(phi, y)
    assert gram.C.shape == (8, 8) and gram.D.shape == (8, 3)
    with pytest.raises(ValueError, match=r"GramData .* serves the square loss only; got loss 'cross_entropy'"):
        full_batch_gd(model, "cross_entropy", params, phi, y, learning_rate=0.1, steps=2, gram=True)


class TanhDEQ:
    """A user's own DEQ: `z* = tanh(W_c z* + U phi + b)`, predictions `z* B^T`, written on the public API only:
    its solves start from the carried `Warm` (forward and backward)."""

    def __init__(self, width, out_dim, solver="fixed_point"):
        self.width, self.out_dim, self.solver, self.map = width, out_dim, solver, TanhMap(0.8)
        self.backward = Implicit(linear_solver="lu")  # the state is 40 x 6: a dense backward is cheap

    def init(self, key, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        return {
            "f": self.map.init(k1, self.width, self.width, dtype),
            "B": jax.random.normal(k2, (self.out_dim, self.width), dtype) / self.width,
        }

    def apply(self, params, phi, warm=None):
        warm = warm or Warm(jnp.zeros_like(phi))
        sol = solve(
            self.map,
            warm.state,
            params["f"],
            phi,
            solver=self.solver,
            backward=self.backward,
            tol=1e-12,
            maxiter=300,
            adjoint_start=warm.adjoint,
        )
        return sol.value @ params["B"].T, sol

    def warm_start(self, params, phi=None, previous=None):
        return Warm(jnp.zeros_like(phi), jnp.zeros_like(phi))

    def end_to_end_solution(self, params, warm=None):
        raise ValueError("a tanh DEQ is not linear in its features: it has no end-to-end matrix")


@requires_x64
def test_a_users_own_model_trains_through_the_library():
    """Through make_step and make_chunk (what full_batch_gd runs), warm-started through `solve`'s starts."""
    phi, _, y = problem(jnp.float64, n=12, m=4)
    model = TanhDEQ(4, 3)
    assert isinstance(model, Model)
    params = model.init(jax.random.PRNGKey(5), jnp.float64)
    step = make_step(model, "square", learning_rate=0.1)
    _, history = make_chunk(step, 8, record=lambda p: {"params": p})(step.init(params, phi), phi, y)
    assert np.all(history["converged"]) and not np.any(history["backward_failures"])
    assert history["loss"][-1] < history["loss"][0]
    assert history["iterations"][1:].mean() < history["iterations"][0]  # warm starts, at a tight tol 1e-12
    # the first step's gradient against central finite differences of the loss (forward solves only)
    loss = jax.jit(lambda p: square(model.apply(p, phi)[0], y))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    h = 1e-6  # float64 central differences: truncation ~h^2, rounding ~1e-16/h, both below 1e-8 relative
    fd = np.array(
        [(loss(unravel(flat.at[i].add(h))) - loss(unravel(flat.at[i].add(-h)))) / (2 * h) for i in range(flat.size)]
    )
    after = jax.tree_util.tree_map(lambda a: a[1], history["params"])
    grads = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(jnp.subtract, params, after))[0] / 0.1
    np.testing.assert_allclose(grads, fd, rtol=1e-6, atol=1e-9)


def test_non_convergence_is_surfaced_by_training():
    phi, _, y = problem(jnp.float32)
    model = DELM(8, 3, gamma=0.95, solver="fixed_point", formulation="per_sample", tol=1e-6, maxiter=5)
    params = model.init(jax.random.PRNGKey(0))
    _, history = full_batch_gd(model, "square", params, phi, y, learning_rate=0.01, steps=4)
    assert not np.any(history["converged"]) and np.all(history["iterations"] == 5)
    assert np.all(history["relative_residual"] > 1e-6)
    with pytest.warns(
        NonConvergenceWarning,
        match="4 of 4 steps had an equilibrium solve that did not reach its "
        "tolerance .*raise maxiter, loosen tol or use another solver "
        "than 'fixed_point'",
    ):
        assert check_converged(history, model=model) == 4
    with pytest.raises(NonConvergenceError, match="did not reach"):
        check_converged(history, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_converged(history, on_failure="ignore") == 4


def test_divergence_is_reported_as_divergence_with_the_step_size():
    phi, _, y = problem(jnp.float32)
    model = Linear(8, 3)
    _, history = full_batch_gd(model, "square", model.init(jax.random.PRNGKey(0)), phi, y, learning_rate=50.0, steps=30)
    with pytest.warns(
        DivergenceWarning,
        match=r"training diverged: the loss became (NaN|infinite) at step \d+ .*"
        r"lower learning_rate=50",
    ):
        check_converged(history, learning_rate=50.0)
    # a growing but finite loss is divergence too; solver failures after it are blamed on it, not on the solver
    grown = {
        "loss": np.array([1.0, 3.0, 9.0]),
        "converged": np.array([True, False, False]),
        "relative_residual": np.array([0.0, 1.0, 1.0]),
    }
    with pytest.raises(
        DivergenceError,
        match=r"the loss grew from 1 to 9.*2 of 3 steps had an equilibrium solve "
        "above its tolerance, which follows from the divergence",
    ):
        check_converged(grown, on_failure="raise")
    # a direct solve has no maxiter: its advice says what can be wrong with it
    stalled = {
        "loss": np.array([1.0, 0.5]),
        "converged": np.array([True, False]),
        "relative_residual": np.array([0.0, 1e-3]),
    }
    with pytest.warns(NonConvergenceWarning, match="the direct solve .*no maxiter.* use float64 or loosen tol") as rec:
        check_converged(stalled, model=DELM(8, 3))
    assert "raise maxiter" not in str(rec[0].message)


def test_training_argument_errors():
    phi, _, y = problem(jnp.float32)
    model = Linear(8, 3)
    params = model.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="learning_rate must be a positive number; got 0"):
        full_batch_gd(model, "square", params, phi, y, learning_rate=0, steps=3)
    with pytest.raises(ValueError, match=r"learning_rate must be a positive number; got -0\.1"):
        full_batch_gd(model, "square", params, phi, y, learning_rate=jnp.asarray(-0.1), steps=3)
    # a step size computed with jax.numpy (a concrete 0-d array) is a number like any other
    _, history = full_batch_gd(model, "square", params, phi, y, learning_rate=0.5 * jnp.ones((), jnp.float32), steps=3)
    assert history["loss"].shape == (3,)
    with pytest.raises(ValueError, match=r"pass either optimizer=\.\.\. or learning_rate=\.\.\. .*not both"):
        full_batch_gd(model, "square", params, phi, y, learning_rate=0.1, optimizer=optax.sgd(0.1), steps=3)
    with pytest.raises(ValueError, match=r"pass optimizer=\.\.\. .* or learning_rate=\.\.\."):
        make_step(model, "square")
    with pytest.raises(TypeError, match=r"penalty must be a callable penalty\(params\) -> scalar; got 0\.1"):
        make_step(model, "square", learning_rate=0.1, penalty=0.1)
    with pytest.raises(ValueError, match="steps must be a positive integer; got 0"):
        full_batch_gd(model, "square", params, phi, y, learning_rate=0.1, steps=0)
    with pytest.raises(ValueError, match=r"y must have one row per row of phi \(40\); got shape \(39, 3\)"):
        full_batch_gd(model, "square", params, phi, y[:39], learning_rate=0.1, steps=3)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        full_batch_gd(model, "hinge", params, phi, y, learning_rate=0.1, steps=3)
    with pytest.raises(ValueError, match="unknown on_failure 'ignore-all'"):
        check_converged({"converged": jnp.ones(2, bool)}, on_failure="ignore-all")
