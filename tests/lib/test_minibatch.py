"""deq_jax.fit_minibatches: epochs of shuffled minibatches of host arrays through one compiled step; metrics per
epoch, callbacks, checkpoints, and a resumed run equal to an uninterrupted one bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deq_jax
from deq_jax import minibatch

pytestmark = pytest.mark.float32

N, D, WIDTH, CLASSES, BATCH = 50, 6, 8, 3, 16


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)
    return x, labels


DEQ = deq_jax.TanhMap(0.9)


def init():
    kd, kh = jax.random.split(jax.random.PRNGKey(0))
    return {
        "deq": DEQ.init(kd, WIDTH, D, jnp.float32),
        "head": 0.1 * jax.random.normal(kh, (WIDTH, CLASSES), jnp.float32),
    }


TRACES = []


def loss(params, batch):
    TRACES.append(1)  # counts the traces: one per compiled step
    x, labels = batch
    sol = deq_jax.solve(
        DEQ,
        jnp.zeros((x.shape[0], WIDTH), x.dtype),
        params["deq"],
        x,
        solver="anderson",
        tol=1e-4,
        batch_axis=0,
        backward=deq_jax.Implicit("bicgstab"),
    )
    return deq_jax.cross_entropy(sol.value @ params["head"], labels), minibatch.solve_metrics(sol)


OPTIMIZER = optax.adam(2e-2)  # one object: the compiled step is kept per (loss, optimizer)


def fit(start, epochs, **kwargs):
    kwargs.setdefault("key", None if isinstance(start, deq_jax.MinibatchState) else 7)
    return deq_jax.fit_minibatches(loss, OPTIMIZER, start, data(), batch_size=BATCH, epochs=epochs, **kwargs)


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


def test_epochs_train_compile_once_and_aggregate_the_metrics():
    TRACES.clear()
    result = fit(init(), 4, last_batch="pad", device_data=False)
    assert len(TRACES) <= 1  # every batch has one shape: no recompilation, the padded last batch included
    fit(result.state, 5, last_batch="pad", device_data=False)
    assert len(TRACES) <= 1  # continued in the same process: the same compiled step
    assert result.steps_per_epoch == 4  # ceil(50 / 16)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert result.state.epoch == 4 and result.state.step == 16 and result.state.current == {}
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < 0.8 * first["loss"]
    for record in result.history:
        assert record["steps"] == 4
        assert record["forward_iterations"] > 1 and record["forward_iterations_max"] >= record["forward_iterations"]
        assert record["forward_not_converged_total"] == 0
        assert record["backward_failures_total"] == 0 and record["backward_solves_total"] == 4
        assert np.isfinite(record["grad_norm"]) and record["wall_s"] > 0


def test_drop_leaves_out_the_partial_batch_and_pad_fills_it_from_the_epoch_order():
    key = jnp.asarray(jax.random.PRNGKey(3))
    dropped = minibatch.epoch_order(key, 0, N, BATCH, "drop")
    padded = minibatch.epoch_order(key, 0, N, BATCH, "pad")
    assert dropped.shape == (3, BATCH) and padded.shape == (4, BATCH)
    np.testing.assert_array_equal(padded[:3], dropped)
    assert set(padded.ravel()) == set(range(N))  # every sample once, 14 of them twice
    np.testing.assert_array_equal(padded[3, 2:], padded.ravel()[: 4 * BATCH - N])
    assert not np.array_equal(minibatch.epoch_order(key, 1, N, BATCH), dropped)  # a new order every epoch
    with pytest.raises(ValueError, match=r"batch_size \(64\) exceeds the 50 samples"):
        minibatch.steps_per_epoch(N, 64)


@pytest.mark.parametrize("device_data", [True, False])
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, device_data):
    whole = fit(init(), 3, device_data=device_data)
    # stopped mid-epoch by a callback (step 5 of 3 per epoch: epoch 1, position 2), checkpointed there
    path = tmp_path / "state.pkl"
    stop_at_5 = lambda event: event.state.step == 5
    part = fit(
        init(),
        3,
        device_data=device_data,
        callbacks=[minibatch.every(1, minibatch.checkpoint(path)), minibatch.every(1, stop_at_5)],
    )
    assert part.stopped and part.state.step == 5 and part.state.epoch == 1
    assert len(part.state.current["loss"]) == 2  # the epoch's first two steps' metrics travel with the state
    resumed = fit(minibatch.load_state(path), 3, device_data=device_data)
    assert resumed.state.step == whole.state.step == 9
    assert leaves_equal(resumed.state.params, whole.state.params)
    assert leaves_equal(resumed.state.opt_state, whole.state.opt_state)
    timeless = lambda history: [{k: v for k, v in r.items() if k != "wall_s"} for r in history]
    assert timeless(part.history + resumed.history) == timeless(whole.history)
    # and from a returned state, resumed at an epoch's end
    one = fit(init(), 1, device_data=device_data)
    rest = fit(one.state, 3, device_data=device_data)
    assert leaves_equal(rest.state.params, whole.state.params)
    assert leaves_equal(one.state.params, one.state.params)  # the caller's state survived the donation


def test_callbacks_evaluate_every_k_steps_and_per_epoch():
    x, labels = data()

    def accuracy(params, batch):
        xb, yb = batch
        z = deq_jax.solve(DEQ, jnp.zeros((xb.shape[0], WIDTH)), params["deq"], xb, tol=1e-4, batch_axis=0).value
        return {"accuracy": jnp.argmax(z @ params["head"], axis=1) == yb}

    seen = []
    result = fit(
        init(),
        2,
        callbacks=[
            minibatch.evaluation(accuracy, (x[:20], labels[:20]), batch_size=8),
            minibatch.every(2, lambda event: seen.append((event.epoch_end, event.state.step))),
        ],
    )
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in result.history)
    assert seen == [(False, 2), (False, 4), (True, 6)]  # 3 steps per epoch: step 6 is the second epoch's end
    assert [e["step"] for e in result.events] == [2, 4]
    # evaluate pads and masks its last batch: the mean over exactly 20 samples, whatever the batch size
    params = result.state.params
    a = minibatch.evaluate(jax.jit(accuracy), params, (x[:20], labels[:20]), batch_size=8)
    b = minibatch.evaluate(jax.jit(accuracy), params, (x[:20], labels[:20]), batch_size=20)
    assert a == b


def test_a_model_trains_through_model_loss():
    x, labels = data()
    model = deq_jax.DELM(width=D, out_dim=CLASSES, gamma=0.8, formulation="per_sample", solver="anderson")
    result = deq_jax.fit_minibatches(
        minibatch.model_loss(model, "cross_entropy"),
        optax.adam(5e-2),
        model.init(jax.random.PRNGKey(1)),
        (x, labels),
        batch_size=BATCH,
        epochs=3,
        key=jax.random.key(0),
    )
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[0]["forward_iterations"] > 1 and result.history[0]["forward_not_converged_total"] == 0


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="key: a new run needs a PRNG key"):
        deq_jax.fit_minibatches(loss, optax.sgd(0.1), init(), data(), batch_size=BATCH, epochs=1)
    with pytest.raises(ValueError, match="share their leading"):
        deq_jax.fit_minibatches(
            loss, optax.sgd(0.1), init(), (np.zeros((5, 2)), np.zeros(4)), batch_size=2, epochs=1, key=0
        )
    with pytest.raises(TypeError, match="aux None or a dict of scalar metrics"):
        deq_jax.fit_minibatches(
            lambda p, b: (jnp.sum(p["head"]), {"v": jnp.zeros(3)}),
            optax.sgd(0.1),
            init(),
            data(),
            batch_size=BATCH,
            epochs=1,
            key=0,
        )
    state = minibatch.initial_state(init(), optax.sgd(0.1), 0)._replace(epoch=1, step=2)
    with pytest.raises(ValueError, match="start: a state at epoch 1, step 2 does not fit 3 steps per epoch"):
        deq_jax.fit_minibatches(loss, optax.sgd(0.1), state, data(), batch_size=BATCH, epochs=2)
    with pytest.raises(ValueError, match="last_batch"):
        fit(init(), 1, last_batch="keep")
