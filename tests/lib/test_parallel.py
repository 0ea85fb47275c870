"""Tests of deq_jax.parallel: one function over many configurations, chunked, sharded, compiled once per shape.

Device-count agnostic: every expectation is computed from `len(jax.devices())`, so the file passes under 1, 2 and
4 forced host devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`). The configurations run in float64
(the suite enables x64), so batched and unbatched programs agree to rounding (1e-12 relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compile_events

from deq_jax import parallel

FAST = {"xla_backend_optimization_level": 0}  # compile time, not results: these tests compile small programs
N = 7  # configurations: a multiple of neither 2 nor 4 devices
RTOL = 1e-12  # float64 rounding of the same arithmetic in a batched vs a single program (~1e-16 per operation)


def gd(config, shared):
    """One configuration: 5 gradient steps on a least-squares fit from a seeded start, a pytree in and out, and a
    loop whose carry starts from constants (as in jax.scipy's GMRES, which implicit differentiation runs)."""
    X, y = shared
    w = jax.random.normal(config["key"], (X.shape[1],), X.dtype)
    for _ in range(5):
        w = w - config["lr"] * X.T @ (X @ w - y) / X.shape[0]
    total, _ = jax.lax.while_loop(
        lambda c: c[1] < 3, lambda c: (c[0] + config["lr"], c[1] + 1), (jnp.zeros((), X.dtype), 0)
    )
    return {"loss": jnp.mean((X @ w - y) ** 2), "w": w, "step": total}


def _problem(n=N, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(11, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=11)
    per_config = {
        "key": np.stack([np.asarray(jax.random.PRNGKey(s)) for s in range(n)]),
        "lr": np.linspace(0.05, 0.4, n),
    }
    return per_config, (X, y)


def _loop(per_config, shared):
    one = jax.jit(gd)
    outs = [one({"key": per_config["key"][i], "lr": per_config["lr"][i]}, shared) for i in range(len(per_config["lr"]))]
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *outs)


@pytest.fixture(scope="module")
def engine():
    return parallel.ParallelMap(gd, compiler_options=FAST)


@pytest.fixture(scope="module")
def reference():
    per_config, shared = _problem()
    return per_config, shared, _loop(per_config, shared)


def test_chunked_sharded_run_equals_a_loop_and_shares_one_program(engine, reference):
    per_config, shared, want = reference
    D = len(jax.devices())
    assert engine.n_devices == D and engine.batching == parallel.device_batching(jax.devices())
    est = 10_000  # bytes per configuration, stated by the caller (above what XLA measures for this fn)
    S = sum(a.nbytes for a in shared)
    events, stop = compile_events()
    try:
        chunks = list(engine.chunks(per_config, shared, budget_bytes=S + 2 * est, bytes_per_config=est))
        plan = engine.last_plan
        # two configurations per device fit the budget: chunks of 2 D, the last one padded
        assert plan.per_device == 2 and plan.chunk_size == 2 * D and plan.estimate_source == "caller"
        assert [(c.start, c.stop) for c in chunks] == [(i, min(N, i + 2 * D)) for i in range(0, N, 2 * D)]
        assert plan.n_chunks == len(chunks) and plan.estimated_bytes_per_device == S + 2 * est
        assert plan.measured_bytes_per_device is not None and plan.measured_bytes_per_device <= plan.budget_bytes
        assert len(events) == 1  # every chunk ran the one compiled program
        got = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *[c.outputs for c in chunks])
        # a later call with other values and fewer configurations, planned with the same N (a resumed sweep)
        rest = jax.tree_util.tree_map(lambda a: a[3:] * 1, per_config)
        again = engine(rest, shared, plan=plan)
        assert len(events) == 1 and engine.compiles >= 1
    finally:
        stop()
    for name in ("loss", "w", "step"):
        assert got[name].shape == want[name].shape  # padded rows dropped
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(again[name], want[name][3:], rtol=RTOL, err_msg=name)
    assert len(set(np.round(got["loss"], 12))) == N  # distinct configurations, not one row repeated


def test_vmap_and_map_per_device_agree(engine, reference):
    per_config, shared, want = reference
    other = {"vmap": "map", "map": "vmap"}[engine.batching]  # the engine's own way is checked above
    got = parallel.parallel_map(
        gd, per_config, shared, batching=other, compiler_options=FAST, bytes_per_config=1000, budget_bytes=2**24
    )
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=RTOL, err_msg=other)
    np.testing.assert_allclose(got["w"], want["w"], rtol=RTOL, err_msg=other)


def test_budget_holds_against_xla_not_only_the_estimate(engine, reference):
    per_config, shared, _ = reference
    D = len(jax.devices())
    S = sum(a.nbytes for a in shared)
    measured_one = parallel.measured_bytes(engine.compiled(D, per_config, shared))
    assert measured_one is not None and measured_one > S
    # an estimate far too low: the plan would put every configuration in one chunk; XLA's measurement shrinks it
    budget = measured_one + 1
    plan = engine.plan(N, per_config, shared, budget_bytes=budget, bytes_per_config=1)
    assert plan.recompiles >= 1 and plan.measured_bytes_per_device <= budget
    assert plan.chunk_size < -(-N // D) * D
    # below one configuration per device by XLA's count: refused with the numbers
    with pytest.raises(parallel.MemoryBudgetError, match=r"XLA reports .* per device for 1 configuration"):
        engine.plan(N, per_config, shared, budget_bytes=measured_one - 1, bytes_per_config=1, what="fit")
    # without an estimate the first program holds everything, and XLA's measurement of it is the estimate
    plan = engine.plan(N, per_config, shared, budget_bytes=2**24)
    full = parallel.measured_bytes(engine.compiled(-(-N // D) * D, per_config, shared))
    assert plan.estimate_source.startswith("XLA") and plan.chunk_size == -(-N // D) * D
    assert plan.bytes_per_config == (full - S) // -(-N // D) and plan.recompiles == 0


def test_chunk_size_rule():
    assert parallel.plan_chunk_size(10, 100, 50, 10_000, 1) == 10  # everything fits: one chunk
    assert parallel.plan_chunk_size(10, 100, 50, 360, 1) == 3  # floor((360 - 50) / 100)
    assert parallel.plan_chunk_size(10, 100, 50, 360, 4) == 12  # 3 per device on 4 devices
    assert parallel.plan_chunk_size(5, 100, 50, 10_000, 4) == 8  # 5 rounded up to the devices, padded
    assert parallel.plan_chunk_size(10, 100, 50, 10_000, 1, max_chunk_size=4) == 4
    assert parallel.plan_chunk_size(10, 100, 50, 10_000, 4, max_chunk_size=2) == 4  # at least one per device
    with pytest.raises(parallel.MemoryBudgetError, match="above the memory budget"):
        parallel.plan_chunk_size(10, 100, 50, 149, 1)


def _typed_keys():
    keys = jax.random.split(jax.random.key(0), 3)  # made before the check: creating keys compiles
    return lambda: parallel.parallel_map(gd, {"key": keys, "lr": np.zeros(3)})


@pytest.mark.parametrize(
    ("setup", "error", "match"),
    [
        (lambda: lambda: parallel.ParallelMap("gd"), TypeError, "fn must be a callable"),
        (lambda: lambda: parallel.ParallelMap(gd, batching="pmap"), ValueError, "batching must be one of"),
        (lambda: lambda: parallel.ParallelMap(gd, devices=[]), ValueError, "devices must name at least one device"),
        (
            lambda: lambda: parallel.parallel_map(gd, {"key": np.zeros((3, 2), np.uint32), "lr": np.zeros(4)}),
            ValueError,
            r"share a leading configuration axis; got shapes \[\(3, 2\), \(4,\)\]",
        ),
        (lambda: lambda: parallel.parallel_map(gd, {}), ValueError, "at least one array"),
        (
            lambda: lambda: parallel.parallel_map(gd, {"key": np.zeros((0, 2), np.uint32), "lr": np.zeros(0)}),
            ValueError,
            "at least one configuration",
        ),
        (_typed_keys, TypeError, "raw uint32 key data"),
        (lambda: lambda: parallel.parallel_map(gd, *_problem(), budget_bytes=-1), ValueError, "budget_bytes must be"),
        (
            lambda: lambda: parallel.parallel_map(gd, *_problem(), max_chunk_size=0),
            ValueError,
            "max_chunk_size must be",
        ),
    ],
)
def test_bad_input_is_refused_before_compiling(setup, error, match):
    call = setup()
    events, stop = compile_events()
    try:
        with pytest.raises(error, match=match):
            call()
    finally:
        stop()
    assert not events


def test_agree_on_one_process_is_the_identity():
    assert jax.process_count() == 1
    mask = np.array([True, False, True])
    np.testing.assert_array_equal(parallel.agree(mask), mask)
