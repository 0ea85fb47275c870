"""The host-side loop: compiled chunks, callbacks between them, early stop, resume: the numbers of one scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq_jax import ChunkEnd, Linear, fit, full_batch_gd, make_chunk, make_step
from deq_jax.loop import stop_on_divergence

pytestmark = pytest.mark.float32  # the whole file also runs with x64 off (float32), as users run JAX


def problem():
    phi = jax.random.normal(jax.random.PRNGKey(0), (20, 5), jnp.float32)
    y = jax.random.normal(jax.random.PRNGKey(1), (20, 2), jnp.float32)
    return phi, y


def test_chunks_with_callbacks_stop_and_resume_give_the_numbers_of_one_scan():
    phi, y = problem()
    model = Linear(5, 2)
    params = model.init(jax.random.PRNGKey(2))
    _, reference = jax.jit(lambda p: full_batch_gd(model, "square", p, phi, y, learning_rate=0.1, steps=12))(params)
    step = make_step(model, "square", learning_rate=0.1)
    run = make_chunk(step, 4, record=lambda p: {"W": model.end_to_end(p)})
    seen = []

    def progress(event: ChunkEnd):
        seen.append((event.start, event.done, event.total, event.metrics["loss"].shape))

    stop_at_8 = lambda event: event.done >= 8
    first = fit(run, step.init(params, phi), phi, y, steps=12, chunk=4, callbacks=[progress, stop_at_8])
    assert first.stopped and first.steps == 8 and seen == [(0, 4, 12, (4,)), (4, 8, 12, (4,))]
    assert first.history["W"].shape == (8, 2, 5)
    rest = fit(run, first.state, phi, y, steps=12, chunk=4, start=8, keep=("loss",))
    assert not rest.stopped and rest.steps == 12 and set(rest.history) == {"loss"}
    losses = np.concatenate([first.history["loss"], rest.history["loss"]])
    np.testing.assert_allclose(losses, reference["loss"], rtol=1e-6)  # same steps, chunked or not (float32)
    with pytest.raises(ValueError, match=r"steps \(10\) and start \(0\) must be multiples of chunk \(4\)"):
        fit(run, first.state, phi, y, steps=10, chunk=4)


def test_stop_on_divergence():
    phi, y = problem()
    model = Linear(5, 2)
    step = make_step(model, "square", learning_rate=100.0)
    run = make_chunk(step, 4)
    result = fit(
        run,
        step.init(model.init(jax.random.PRNGKey(2)), phi),
        phi,
        y,
        steps=400,
        chunk=4,
        callbacks=[stop_on_divergence],
    )
    assert result.stopped and result.steps < 400 and not np.isfinite(result.history["loss"][-1])
