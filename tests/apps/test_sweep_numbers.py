"""The sweep's numbers against standalone runs (the main job's code path): groups sharing programs, chunking and
resuming, a user's own DEQ, and the fixed random projection of a width.

Device-count agnostic: sweeps shard over whatever `jax.devices()` holds (1, 2 or 4 forced host devices) and every
expectation is computed from that count. Sweeps here run in float64 (the suite enables x64)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compile_events
from sweep_cases import BUILTIN, FAST, RTOL, TINY, TanhDEQ, base_result, check_against_standalone, tiny

from deq_jax import train
from experiments.common.config import ConfigError
from experiments.sweep import data as sweep_data
from experiments.sweep import grid, programs
from experiments.sweep.run import SweepError, run_sweep


def test_sweep_equals_standalone_runs_and_groups_share_programs():
    result = base_result()
    D = len(jax.devices())
    assert len(result.configurations) == 2 * 2 * 3 * (2 + 1) == 36
    assert result.device_batching == ("map" if D > 1 else "vmap")
    by_label = {g.label: g for g in result.groups}
    assert set(by_label) == {
        f"{ds}/features/square/{m}" for ds in ("digits", "digits_b") for m in ("delm/column_softmax", "linear")
    }
    for g in result.groups:
        assert g.chunk_size % D == 0 and g.chunks_computed == 1  # one chunk each, padded to the devices
        assert g.measured_bytes_per_device <= result.budget_bytes
    # equal shapes, equal structure: the second data set's groups ran the first's programs
    assert by_label["digits/features/square/delm/column_softmax"].programs_compiled == 1
    assert by_label["digits_b/features/square/delm/column_softmax"].programs_compiled == 0
    assert by_label["digits_b/features/square/linear"].programs_compiled == 0
    check_against_standalone(result, BUILTIN, n_expected=36)


def test_chunks_and_resume_give_the_same_numbers_and_reuse_compiled_programs(tmp_path):
    """Deep linear networks with the cross-entropy loss, one configuration per device per chunk: several chunks,
    an interruption after the first, a resume in the same process that compiles nothing."""
    D = len(jax.devices())
    cfg = tiny(
        datasets=[TINY["datasets"][0]],
        output_dir=str(tmp_path),
        grid={**TINY["grid"], "models": ["deep_linear"], "losses": ["cross_entropy"]},
    )
    n = 6
    (key,) = grid.group_configurations(grid.expand_grid(cfg))
    est = programs.estimate_config_bytes(cfg, key, n_train=60, n_test=20, width=7, out_dim=10)
    data = (60 + 20) * (7 * 8 + 4 + 4)  # features (float64), targets and labels (int32) of both splits
    cfg = dataclasses.replace(cfg, memory_budget_mb=(data + 1.5 * est) / 2**20)  # one configuration per device
    first = []

    class Stop(Exception):
        pass

    def stop_after_one(report):
        first.append(report.config_ids)
        raise Stop

    with pytest.raises(Stop):
        run_sweep(cfg, progress=False, compiler_options=FAST, on_chunk=stop_after_one)
    assert len(list((tmp_path / "chunks").glob("chunk-*.npz"))) == 1 and len(first[0]) == min(D, n)
    assert not list((tmp_path / "chunks").glob(".*"))  # atomic writes leave no partial files
    events, stop = compile_events()
    try:
        second = []
        resumed = run_sweep(cfg, progress=False, compiler_options=FAST, on_chunk=lambda r: second.append(r.config_ids))
    finally:
        stop()
    assert not events, "a resumed sweep in the same process reuses its compiled program"
    group = resumed.groups[0]
    assert group.chunk_size == D and resumed.chunks_skipped == 1 and group.configs_skipped == len(first[0])
    assert resumed.chunks_computed == len(second) == -(-(n - len(first[0])) // D)
    assert not set(first[0]) & {i for ids in second for i in ids}
    assert group.measured_bytes_per_device <= cfg.memory_budget_mb * 2**20
    check_against_standalone(resumed, BUILTIN, n_expected=n)
    again = run_sweep(cfg, progress=False, compiler_options=FAST)  # everything saved: nothing recomputed
    assert again.chunks_computed == 0 and again.chunks_skipped == 1 + len(second)
    with pytest.raises(SweepError, match="holds results of a different sweep"):
        run_sweep(dataclasses.replace(cfg, steps=11), progress=False)


def test_a_users_own_deq_goes_through_the_sweep(tmp_path, tanh_kind):
    # lax.map on each device: vmapping the solver's while loop compiles 3x longer, and vmap is tested above
    cfg = tiny(
        datasets=[TINY["datasets"][0]],
        output_dir=str(tmp_path),
        save_params=True,
        device_batching="map",
        grid={**TINY["grid"], "models": ["tanh_deq"], "seeds": [0, 1], "learning_rates": [0.05]},
    )
    result = run_sweep(cfg, progress=False, compiler_options=FAST)
    assert [g.label for g in result.groups] == ["digits/features/square/tanh_deq"]
    assert result.groups[0].estimated_bytes_per_config > 0  # measured by XLA: there is no formula for it
    final = {r["config_id"]: r for r in result.rows if r["final"]}
    first = {r["config_id"]: r for r in result.rows if r["step"] == 0}
    assert len(final) == 4 and all(r["converged"] and r["solver_iterations"] > 1 for r in final.values())
    # the reported loss is the user's model's own loss at the returned parameters (evaluated here, without the
    # sweep), and training lowered it
    fd = sweep_data.prepare_features(sweep_data.load_datasets(cfg)["digits"], None, jnp.float64)
    loss = jax.jit(
        lambda params, gamma: train.objective(TanhDEQ(7, 10, contraction=gamma), "square")(
            params, fd.phi_train, fd.targets("square")
        )[0]
    )
    for c in result.configurations:
        value = float(loss(result.final_params[c.config_id], np.float64(c.gamma)))
        assert final[c.config_id]["train_loss"] == pytest.approx(value, rel=RTOL)
        assert value < first[c.config_id]["train_loss"]
    assert len({round(r["train_loss"], 9) for r in final.values()}) == 4
    with pytest.raises(ConfigError, match=r"'tanh_dq' is not a valid choice \(did you mean 'tanh_deq'\?\)"):
        tiny(grid={**TINY["grid"], "models": ["tanh_dq"]})


def test_width_is_a_fixed_random_projection_shared_by_train_and_test():
    from deq_jax.maps import random_projection
    from experiments.common import datasets as data

    pre = data.preprocess(data.load_dataset("digits"), n_train=50, n_test=20, features="raw", add_bias=False)
    fd = sweep_data.prepare_features(pre, 8, jnp.float32, projection_seed=3)
    P = np.asarray(random_projection(jax.random.PRNGKey(3), 64, 8, jnp.float32))
    assert fd.phi_train.shape == (50, 8) and fd.phi_test.shape == (20, 8) and fd.phi_train.dtype == np.float32
    np.testing.assert_allclose(fd.phi_train, pre.x_train.astype(np.float32) @ P, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fd.phi_test, pre.x_test.astype(np.float32) @ P, rtol=1e-5, atol=1e-6)
    assert fd.targets("cross_entropy").dtype == np.int32
