"""Tests of experiments.sweep.engine and `python -m experiments sweep`.

The equality test runs the sweep in a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=4` (the
flag must be set before JAX initialises) and the standalone runs in a second subprocess (one device, the main job's
code path), concurrently; the other tests run in this process on a tiny linear-model grid.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from experiments.sweep import engine as sweep
from experiments.common.config import ConfigError, from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# float32 runs of 30 GD steps: vmapped/sharded and standalone programs differ only in how XLA orders the
# reductions of batched vs unbatched matmuls (each ~1 ulp = 6e-8 relative); GD is stable here, so the
# differences stay within a few tens of ulps. 1e-5 relative is ~80 ulps: rounding, not a different computation
# (a wrong key, gamma or learning rate changes these numbers by more than 1e-3).
RTOL = 1e-5
ATOL = 1e-6

TINY = {
    "name": "tiny",
    "datasets": [{"name": "digits", "n_train": 100, "n_test": 30, "features": "pca_whiten", "pca_dim": 6}],
    "grid": {"seeds": [0, 1, 2, 3, 4], "learning_rates": [0.1, 0.2], "models": ["linear"], "losses": ["square"]},
    "steps": 10,
    "log_every": 5,
}


def tiny(**changes) -> sweep.SweepConfig:
    return from_dict(sweep.SweepConfig, {**TINY, **changes})


# ----------------------------------------------------------------------------- equality with standalone runs

EQUALITY_CONFIGS = [
    {  # 9 configurations (not a multiple of 4): a DELM group of 6 (seeds x gammas) and a linear group of 3
        "name": "eq_main",
        "datasets": [{"name": "digits", "n_train": 120, "n_test": 40, "features": "pca_whiten", "pca_dim": 8}],
        "grid": {"seeds": [0, 1, 2], "learning_rates": [0.02], "gammas": [0.5, 0.8], "models": ["delm", "linear"],
                 "losses": ["square"]},
        "steps": 30, "log_every": 10, "save_params": True,
    },
    {  # 3 configurations of a deep linear network with the cross-entropy loss, vmapped on each device (no
       # LAPACK call, so no risk of jaxlib 0.10's thread-pool deadlock; "auto" would lax.map on 4 CPU devices)
        "name": "eq_deep",
        "datasets": [{"name": "digits", "n_train": 120, "n_test": 40, "features": "pca_whiten", "pca_dim": 8}],
        "grid": {"seeds": [0, 1, 2], "learning_rates": [0.05], "models": ["deep_linear"], "depths": [2],
                 "losses": ["cross_entropy"]},
        "steps": 30, "log_every": 10, "save_params": True, "device_batching": "vmap",
    },
]

SWEEP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from experiments.sweep import engine as sweep
    from experiments.common.config import from_dict

    def summarise(res):
        runs = {}
        for c in res.configurations:
            rows = [r for r in res.rows if r["config_id"] == c.config_id]
            leaves = jax.tree_util.tree_leaves(res.final_params[c.config_id])
            runs[c.config_id] = {"steps": [r["step"] for r in rows], "loss": [r["train_loss"] for r in rows],
                                 "params": [np.asarray(l, np.float64).tolist() for l in leaves]}
        return {"runs": runs, "chunk_sizes": [g.chunk_size for g in res.groups], "batching": res.device_batching,
                "group_sizes": [g.n_configs for g in res.groups]}

    if __name__ == "__main__":
        out = {"devices": len(jax.devices()), "sweeps": []}
        for i, raw in enumerate(json.loads(sys.argv[1])):
            cfg = from_dict(sweep.SweepConfig, raw)
            res = sweep.run_sweep(cfg, output_dir=f"{sys.argv[2]}/{i}", resume=False, progress=False)
            out["sweeps"].append(summarise(res))
        print(json.dumps(out))
""")

# The main job's code path, written out here independently of experiments.sweep.engine's program (only the data loading
# helpers are shared): model.init(PRNGKey(seed), float32) + full_batch_gd, one configuration at a time. The same
# process (one device) also runs the first sweep vmapped, for the single-device path.
STANDALONE_SCRIPT = SWEEP_SCRIPT.split("if __name__")[0] + textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from deq_jax import models, train
    from experiments.sweep import engine as sweep
    from experiments.common.config import from_dict
    out = {"devices": len(jax.devices()), "sweeps": []}
    programs = {}
    for raw in json.loads(sys.argv[1]):
        cfg = from_dict(sweep.SweepConfig, raw)
        pre = sweep.load_datasets(cfg)
        runs = {}
        for c in sweep.expand_grid(cfg):
            fd = sweep.prepare_features(pre[c.dataset], c.width, jnp.float32)
            phi, y = jnp.asarray(fd.phi_train), jnp.asarray(fd.targets(c.loss))
            m, k = phi.shape[1], fd.num_classes
            if c.model == "delm":
                model = models.DELM(width=m, out_dim=k, gamma=c.gamma, sigma=c.sigma)
            elif c.model == "linear":
                model = models.Linear(width=m, out_dim=k)
            else:
                model = models.DeepLinear(width=m, out_dim=k, depth=c.depth)
            params = model.init(jax.random.PRNGKey(c.seed), jnp.float32)
            key = (model, c.loss, c.learning_rate)
            if key not in programs:
                programs[key] = jax.jit(lambda p, phi, y, model=model, loss=c.loss, lr=c.learning_rate:
                                        train.full_batch_gd(model, loss, p, phi, y, learning_rate=lr, steps=cfg.steps))
            params, history = programs[key](params, phi, y)
            final = float(train.objective(model, c.loss)(params, phi, y)[0])
            logged = np.asarray(history["loss"])[::cfg.log_every].tolist()
            leaves = jax.tree_util.tree_leaves(params)
            runs[c.config_id] = {"loss": logged + [final], "params": [np.asarray(l, np.float64).tolist() for l in leaves]}
        out["sweeps"].append({"runs": runs})
    cfg = from_dict(sweep.SweepConfig, json.loads(sys.argv[1])[0])
    out["one_device"] = summarise(sweep.run_sweep(cfg, output_dir=sys.argv[2], resume=False, progress=False))
    print(json.dumps(out))
""")


def _start(script: str, args: list[str], devices: int | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env.update(OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_sharded_sweep_equals_standalone_runs(tmp_path):
    configs = json.dumps(EQUALITY_CONFIGS)
    sharded = _start(SWEEP_SCRIPT, [configs, str(tmp_path)], devices=4)
    alone = _start(STANDALONE_SCRIPT, [configs, str(tmp_path / "one")], devices=None)  # concurrently: two cores
    got, want = _finish(sharded), _finish(alone)
    assert got["devices"] == 4 and want["devices"] == 1
    main, deep = got["sweeps"]
    assert len(main["runs"]) == 9 and len(deep["runs"]) == 3  # neither a multiple of the 4 devices
    assert main["group_sizes"] == [6, 3] and deep["group_sizes"] == [3]
    assert all(size % 4 == 0 for s in got["sweeps"] for size in s["chunk_sizes"])  # padded to the devices
    # both ways a device runs its block: lax.map (auto on a CPU mesh) and vmap; and vmap on one device
    assert (main["batching"], deep["batching"], want["one_device"]["batching"]) == ("map", "vmap", "vmap")
    compared = 0
    for g, w in [*zip(got["sweeps"], want["sweeps"]), (want["one_device"], want["sweeps"][0])]:
        assert g["runs"].keys() == w["runs"].keys()
        for cid, run in g["runs"].items():
            ref = w["runs"][cid]
            assert run["steps"] == [0, 10, 20, 30]
            loss, ref_loss = np.asarray(run["loss"]), np.asarray(ref["loss"])
            assert np.all(np.isfinite(loss)) and loss[-1] < loss[0]  # trained, not diverged
            np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, atol=0, err_msg=f"config {cid} losses")
            assert len(run["params"]) == len(ref["params"])
            for leaf, ref_leaf in zip(run["params"], ref["params"]):
                np.testing.assert_allclose(leaf, ref_leaf, rtol=RTOL, atol=ATOL, err_msg=f"config {cid} params")
            compared += 1
    assert compared == 9 + 3 + 9
    # the seeds differ: equal numbers are not an artefact of every row being the same run
    assert main["runs"]["0"]["loss"][-1] != main["runs"]["1"]["loss"][-1]


# ----------------------------------------------------------------------------- grid, grouping, chunk planning

def test_grid_is_grouped_by_static_structure():
    cfg = from_dict(sweep.SweepConfig, {
        "name": "g", "datasets": [{"name": "digits"}, {"name": "digits", "label": "digits_raw", "features": "raw"}],
        "grid": {"seeds": [0, 1], "learning_rates": [0.1, 0.2], "gammas": [0.5, 0.8, 0.9],
                 "sigmas": ["column_softmax", "row_softmax"], "models": ["delm", "linear", "deep_linear"],
                 "depths": [2, 3], "losses": ["square", "cross_entropy"], "widths": [None, 8]},
    })
    configs = sweep.expand_grid(cfg)
    # per (dataset, width, loss): lr x seeds x (2 sigmas x 3 gammas + linear + 2 depths)
    assert len(configs) == 2 * 2 * 2 * (2 * 2) * (6 + 1 + 2)
    assert [c.config_id for c in configs] == list(range(len(configs)))
    groups = sweep.group_configurations(configs)
    # static structures per (dataset, width, loss): 2 DELM sigmas + linear + 2 depths; gammas/lr/seeds vmapped
    assert len(groups) == 2 * 2 * 2 * 5
    for key, members in groups.items():
        assert all(c.group == key for c in members)
        if key.model == "delm":
            assert len(members) == 3 * 2 * 2 and {c.gamma for c in members} == {0.5, 0.8, 0.9}
        else:
            assert len(members) == 2 * 2 and all(c.gamma is None for c in members)
        assert (key.depth is not None) == (key.model == "deep_linear")
        assert (key.sigma is not None) == (key.model == "delm")
    assert len({k.width for k in groups}) == 2 and len({k.dataset for k in groups}) == 2


def test_chunk_size_follows_the_budget_and_the_devices():
    # 10 configurations of 100 bytes, 50 bytes of data per device
    assert sweep.plan_chunk_size(10, 100, 50, 10_000, 1) == 10  # everything fits: one chunk
    assert sweep.plan_chunk_size(10, 100, 50, 360, 1) == 3
    assert sweep.plan_chunk_size(10, 100, 50, 360, 4) == 12  # 3 per device: a multiple of 4
    assert sweep.plan_chunk_size(5, 100, 50, 10_000, 4) == 8  # 5 rounded up to the devices, padded
    assert sweep.plan_chunk_size(10, 100, 50, 10_000, 1, max_chunk_size=4) == 4
    with pytest.raises(sweep.SweepMemoryError, match="above the memory budget"):
        sweep.plan_chunk_size(10, 100, 50, 149, 1)


# ----------------------------------------------------------------------------- bad input, before compiling

@pytest.fixture
def no_compile():
    """Fails the test if XLA compiles anything while it runs (bad input must be refused before that)."""
    import jax.monitoring

    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield
    jax.monitoring.unregister_event_duration_listener(listen)
    assert not compiles, f"{len(compiles)} XLA compilation(s) although the input is invalid"


@pytest.mark.parametrize("change, match", [
    ({"grid": {**TINY["grid"], "seeds": []}}, r"grid: seeds must list at least one value"),
    ({"grid": {**TINY["grid"], "models": []}}, r"grid: models must list at least one value"),
    ({"datasets": []}, r"datasets must list at least one value"),
    ({"grid": {**TINY["grid"], "learning_rates": ["fast"]}}, r"grid\.learning_rates\[0\]: expected a number"),
    ({"grid": {**TINY["grid"], "seeds": [0.5]}}, r"grid\.seeds\[0\]: expected an integer"),
    ({"steps": "10"}, r"steps: expected an integer; got '10'"),
    ({"grid": {**TINY["grid"], "gammas": [1.5]}}, r"gammas\[0\] must be a number in the open interval \(0, 1\)"),
    ({"grid": {**TINY["grid"], "models": ["resnet"]}}, r"models\[0\] must be one of"),
    ({"grid": {**TINY["grid"], "seeds": [1, 1]}}, r"seeds lists a value more than once"),
    ({"grid": {**TINY["grid"], "seed": [1]}}, r"unknown key 'grid.seed' \(did you mean 'seeds'\?\)"),
    ({"memory_budget_mb": -1}, r"memory_budget_mb must be a positive number"),
])
def test_bad_config_is_a_clear_error(change, match, no_compile):
    with pytest.raises(ConfigError, match=match):
        tiny(**change)


def test_budget_too_small_for_one_configuration_errors_before_compiling(tmp_path, no_compile):
    cfg = tiny(memory_budget_mb=0.01, output_dir=str(tmp_path))
    with pytest.raises(sweep.SweepMemoryError, match=r"group digits/features/square/linear: one configuration "
                                                      r"needs about .* above the memory budget of 0.01 MiB"):
        sweep.run_sweep(cfg, progress=False)
    assert not (tmp_path / "chunks").exists()


def test_float64_without_x64_is_refused(no_compile):
    import jax
    with jax.enable_x64(False), pytest.raises(sweep.SweepError, match="dtype 'float64' needs 64-bit JAX"):
        sweep.run_sweep(tiny(dtype="float64"), progress=False)


# ----------------------------------------------------------------------------- chunking and resume

def _numbers(result: sweep.SweepResult) -> np.ndarray:
    return np.asarray([[r["config_id"], r["step"], r["train_loss"]] for r in result.rows], np.float64)


@pytest.fixture(scope="module")
def one_chunk(tmp_path_factory):
    """The tiny grid in one chunk (the default budget)."""
    out = tmp_path_factory.mktemp("one_chunk")
    return sweep.run_sweep(tiny(output_dir=str(out)), progress=False)


def test_small_budget_forces_several_chunks_with_the_same_numbers(one_chunk, tmp_path):
    assert one_chunk.groups[0].chunks_computed == 1 and one_chunk.groups[0].chunk_size == 10
    est = one_chunk.groups[0].estimated_bytes_per_config
    budget = one_chunk.groups[0].data_bytes + 3 * est  # three configurations per chunk
    chunked = sweep.run_sweep(tiny(output_dir=str(tmp_path), memory_budget_mb=budget / 2**20), progress=False)
    group = chunked.groups[0]
    assert group.chunk_size <= 3 and group.chunks_computed == -(-10 // group.chunk_size) >= 4
    assert group.measured_bytes_per_device is not None and group.measured_bytes_per_device <= budget
    assert len(list((tmp_path / "chunks").glob("chunk-*.npz"))) == group.chunks_computed
    np.testing.assert_allclose(_numbers(chunked), _numbers(one_chunk), rtol=RTOL, atol=0)


def test_interrupted_sweep_resumes_without_recomputing_finished_chunks(one_chunk, tmp_path):
    est = one_chunk.groups[0].estimated_bytes_per_config
    cfg = tiny(output_dir=str(tmp_path), memory_budget_mb=(one_chunk.groups[0].data_bytes + 3 * est) / 2**20)

    class Interrupt(Exception):
        pass

    first: list[tuple[int, ...]] = []

    def stop_after_two(report):
        first.append(report.config_ids)
        if len(first) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        sweep.run_sweep(cfg, progress=False, on_chunk=stop_after_two)
    assert len(list((tmp_path / "chunks").glob("chunk-*.npz"))) == 2
    assert not list((tmp_path / "chunks").glob("*.tmp"))  # atomic writes leave no partial files

    second: list[tuple[int, ...]] = []
    resumed = sweep.run_sweep(cfg, progress=False, on_chunk=lambda r: second.append(r.config_ids))
    done_before = {i for ids in first for i in ids}
    recomputed = {i for ids in second for i in ids}
    assert resumed.chunks_skipped == 2 and resumed.chunks_computed == len(second) >= 2
    assert not done_before & recomputed and done_before | recomputed == set(range(10))
    assert resumed.groups[0].configs_skipped == len(done_before)
    np.testing.assert_allclose(_numbers(resumed), _numbers(one_chunk), rtol=RTOL, atol=0)

    again = sweep.run_sweep(cfg, progress=False)  # everything saved: nothing recomputed
    assert again.chunks_computed == 0 and again.chunks_skipped == len(first) + len(second)

    with pytest.raises(sweep.SweepError, match="holds results of a different sweep"):
        sweep.run_sweep(tiny(output_dir=str(tmp_path), steps=11), progress=False)


# ----------------------------------------------------------------------------- the command and its files

def test_command_writes_the_documented_files(tmp_path, one_chunk):
    import yaml

    from experiments.sweep import cli as command

    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "out")}))
    assert command.main(["--config", str(config_path), "--no-progress"]) == 0
    out = tmp_path / "out"
    n_rows = 10 * (len(range(0, TINY["steps"], TINY["log_every"])) + 1)

    with open(out / "results.csv") as fh:
        table = list(csv.reader(fh))
    assert tuple(table[0]) == sweep.ROW_COLUMNS and len(table) == 1 + n_rows
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == n_rows and all(tuple(r) == sweep.ROW_COLUMNS for r in rows)
    final = [r for r in rows if r["final"]]
    assert len(final) == 10 and all(r["step"] == TINY["steps"] for r in final)
    for r in rows:
        assert r["gap"] == pytest.approx(r["train_loss"] - r["L_star"], rel=1e-9)
        assert (r["test_accuracy"] is not None) == r["final"]
        assert r["model"] == "linear" and r["converged"] is True and r["diverged"] is False
    assert min(r["gap"] for r in final) > -1e-6  # L* is the optimum: nothing trains below it
    # the same numbers as the library call (the command is a thin layer)
    np.testing.assert_allclose([r["train_loss"] for r in rows], [r["train_loss"] for r in one_chunk.rows],
                               rtol=RTOL)

    with open(out / "aggregate.csv") as fh:
        agg = list(csv.DictReader(fh))
    assert tuple(agg[0]) == sweep.AGGREGATE_COLUMNS and len(agg) == 2  # two learning rates
    assert all(a["n_seeds"] == "5" for a in agg)
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["fingerprint"] == sweep.fingerprint(tiny()) and manifest["n_configurations"] == 10
    summary = (out / "summary.md").read_text()
    assert "# Sweep `tiny`" in summary and "digits/features/square/linear" in summary
    assert (out / "figures" / "digits_m7_square.png").stat().st_size > 1000


def test_width_is_a_fixed_random_projection_shared_by_train_and_test():
    import jax
    import jax.numpy as jnp

    from experiments.common import datasets as data
    from deq_jax.maps import random_projection

    pre = data.preprocess(data.load_dataset("digits"), n_train=50, n_test=20, features="raw", add_bias=False)
    fd = sweep.prepare_features(pre, 8, jnp.float32, projection_seed=3)
    P = np.asarray(random_projection(jax.random.PRNGKey(3), 64, 8, jnp.float32))
    assert fd.phi_train.shape == (50, 8) and fd.phi_test.shape == (20, 8) and fd.phi_train.dtype == np.float32
    np.testing.assert_allclose(fd.phi_train, pre.x_train.astype(np.float32) @ P, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fd.phi_test, pre.x_test.astype(np.float32) @ P, rtol=1e-5, atol=1e-6)
    assert sweep.prepare_features(pre, None, jnp.float32).phi_train.shape == (50, 64)
    # L*: the least-squares optimum, so no W does better (here: W = 0 and a random W)
    y = fd.targets("square")
    L_star = sweep.shallow_square_optimum(fd.phi_train, y)
    rng = np.random.default_rng(0)
    for W in (np.zeros((10, 8)), rng.normal(size=(10, 8))):
        assert L_star <= 0.5 * np.mean(np.sum((fd.phi_train @ W.T - y) ** 2, axis=1))
    assert fd.targets("cross_entropy").dtype == np.int32
