"""make_step on the square loss's Gram route reports the implicit backward as the samples route does.

A step on `GramData` differentiates the end-to-end equilibrium W (the DELM's transposed solve). Its implicit
backward's statistics belong in the step's metrics, as on the samples route: a failed backward solve is then data
(`backward_failures`), seen in the history, instead of an error raised from inside the compiled step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deq_jax import Implicit, models, train


def _step(backward):
    rng = np.random.default_rng(0)
    phi = jnp.asarray(rng.normal(size=(11, 7)) / 3, jnp.float32)
    y = jnp.asarray(np.eye(3)[rng.integers(0, 3, 11)], jnp.float32)
    model = models.DELM(7, 3, solver="anderson", tol=1e-5, backward=backward)
    params = model.init(jax.random.PRNGKey(0), jnp.float32)
    step = train.make_step(model, "square", learning_rate=0.05, warm_start=False)
    opt_state = optax.sgd(0.05).init(params)
    _, _, on_samples = step(params, opt_state, phi, y)
    _, _, on_gram = step(params, opt_state, train.square_gram(phi, y), None)
    return on_samples, on_gram


def test_gram_route_metrics_carry_the_implicit_backward():
    on_samples, on_gram = _step(Implicit("gmres", tol=1e-5))
    backward = {k for k in on_samples if k.startswith("backward_")}
    assert backward and backward <= set(on_gram)
    assert int(on_gram["backward_solves"]) == 1 and int(on_gram["backward_failures"]) == 0


def test_gram_route_records_a_failed_backward_as_data():
    _, on_gram = _step(Implicit("bicgstab", tol=1e-5, maxiter=1))  # one iteration cannot reach 1e-5
    assert int(on_gram["backward_failures"]) == 1 and float(on_gram["backward_relative_residual"]) > 1e-4
