"""Losses and training: jit steps with solver metrics, full-batch GD, mini-batch Adam, non-convergence surfaced."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deq_jax import (DELM, DeepLinear, Linear, NonConvergenceError, NonConvergenceWarning, check_converged,
                     cross_entropy, full_batch_gd, logistic, make_step, minibatch_train, square)


def problem(dtype, n=40, m=8, m_y=3):
    phi = jax.random.normal(jax.random.PRNGKey(0), (n, m), dtype)
    labels = jax.random.randint(jax.random.PRNGKey(1), (n,), 0, m_y)
    return phi, labels, jax.nn.one_hot(labels, m_y, dtype=dtype)


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


def test_step_equals_a_manual_gradient_step():
    phi, _, y = problem(jnp.float64)
    model = DELM(8, 3, gamma=0.8)
    params = model.init(jax.random.PRNGKey(2), jnp.float64)
    step = make_step(model, "square", optax.sgd(0.1))
    new, _, metrics = step(params, optax.sgd(0.1).init(params), phi, y)
    grads = jax.grad(lambda p: square(model.apply(p, phi)[0], y))(params)
    for k in params:
        np.testing.assert_allclose(new[k], params[k] - 0.1 * grads[k], rtol=1e-12)
    assert set(metrics) == {"loss", "grad_norm", "iterations", "residual", "relative_residual", "converged"}
    assert bool(metrics["converged"])


@pytest.mark.parametrize("model", [DELM(8, 3, gamma=0.8), DELM(8, 3, solver="anderson", formulation="per_sample"),
                                   Linear(8, 3), DeepLinear(8, 3, depth=3)])
def test_full_batch_gd_decreases_the_loss(model):
    phi, _, y = problem(jnp.float64)
    params = model.init(jax.random.PRNGKey(3), jnp.float64)
    final, history = jax.jit(lambda p: full_batch_gd(model, "square", p, phi, y, learning_rate=0.05, steps=150))(params)
    loss = np.asarray(history["loss"])
    assert loss.shape == (150,)
    assert loss[-1] < 0.8 * loss[0]
    assert np.all(np.diff(loss) <= 1e-12)  # small-step GD on a smooth loss is monotone
    assert bool(jnp.all(history["converged"]))
    assert check_converged(history) == 0


def test_full_batch_gd_vmapped_over_seeds_equals_loop():
    phi, labels, _ = problem(jnp.float32)
    model = DELM(8, 3)
    run = lambda key: full_batch_gd(model, "cross_entropy", model.init(key), phi, labels, learning_rate=0.5, steps=20)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    _, histories = jax.jit(jax.vmap(run))(keys)
    for i in range(3):
        _, h = jax.jit(run)(keys[i])
        np.testing.assert_allclose(histories["loss"][i], h["loss"], rtol=2e-6)


def test_minibatch_adam():
    phi, labels, _ = problem(jnp.float32, n=64)
    model = DELM(8, 3, solver="anderson")
    params = model.init(jax.random.PRNGKey(0))
    _, history = minibatch_train(model, "cross_entropy", params, phi, labels, key=jax.random.PRNGKey(1),
                                 optimizer=optax.adam(3e-2), batch_size=16, epochs=15)
    assert history["loss"].shape == (15, 4)
    assert float(jnp.mean(history["loss"][-1])) < 0.9 * float(jnp.mean(history["loss"][0]))
    with pytest.raises(ValueError, match="batch_size must be at most the number of samples \\(64\\); got 65"):
        minibatch_train(model, "cross_entropy", params, phi, labels, key=jax.random.PRNGKey(1),
                        optimizer=optax.adam(1e-2), batch_size=65, epochs=1)


def test_non_convergence_is_surfaced_by_training():
    phi, _, y = problem(jnp.float64)
    model = DELM(8, 3, gamma=0.95, solver="fixed_point", formulation="per_sample", tol=1e-10, maxiter=5)
    params = model.init(jax.random.PRNGKey(0), jnp.float64)
    _, _, metrics = make_step(model, "square", optax.sgd(0.01))(params, optax.sgd(0.01).init(params), phi, y)
    assert not bool(metrics["converged"])
    assert int(metrics["iterations"]) == 5
    assert float(metrics["relative_residual"]) > 1e-10
    _, history = full_batch_gd(model, "square", params, phi, y, learning_rate=0.01, steps=4)
    with pytest.warns(NonConvergenceWarning, match="4 of 4 equilibrium solves did not reach their tolerance"):
        assert check_converged(history) == 4
    with pytest.raises(NonConvergenceError, match="did not reach"):
        check_converged(history, policy="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_converged(history, policy="ignore") == 4


def test_training_argument_errors():
    phi, _, y = problem(jnp.float64)
    model = Linear(8, 3)
    params = model.init(jax.random.PRNGKey(0), jnp.float64)
    with pytest.raises(ValueError, match="learning_rate must be a positive number; got 0"):
        full_batch_gd(model, "square", params, phi, y, learning_rate=0, steps=3)
    with pytest.raises(ValueError, match="steps must be a positive integer; got 0"):
        full_batch_gd(model, "square", params, phi, y, learning_rate=0.1, steps=0)
    with pytest.raises(ValueError, match=r"y must have one row per row of phi \(40\); got shape \(39, 3\)"):
        full_batch_gd(model, "square", params, phi, y[:39], learning_rate=0.1, steps=3)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        full_batch_gd(model, "hinge", params, phi, y, learning_rate=0.1, steps=3)
    with pytest.raises(ValueError, match="unknown policy 'ignore-all'"):
        check_converged({"converged": jnp.ones(2, bool)}, policy="ignore-all")
