"""Tests of the sweep application (experiments.sweep) in this process: grid, config errors, numbers against
standalone runs, chunking, resume, shared programs, a user's own DEQ, the command's files and the figures.

Device-count agnostic: sweeps shard over whatever `jax.devices()` holds (1, 2 or 4 forced host devices) and every
expectation is computed from that count. Sweeps here run in float64 (the suite enables x64).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import stat
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq_jax import TanhMap, models, solve, train
from experiments.common.config import ConfigError
from experiments.sweep import data as sweep_data
from experiments.sweep import figures, grid, programs, tables
from experiments.common import models as sweep_models
from experiments.sweep.config import fingerprint
from experiments.sweep.run import SweepError, SweepMemoryError, run_sweep
from helpers import compile_events
from sweep_cases import FAST, TINY, base_result, tiny

# float64 runs of 10 GD steps: batched, mapped, sharded and standalone programs differ only in the order of
# reductions (~1e-16 each); 1e-9 relative leaves room for 10 steps of growth and is 1e6 times below what a wrong
# key, gamma or learning rate changes (1e-3 and more)
RTOL = 1e-9


def _standalone(model_for, loss: str, steps: int):
    """The main job's code path, written here without the sweep: `model.init(PRNGKey(seed))` + `full_batch_gd`, one
    configuration per call (gamma an argument, so that one compiled program serves every gamma)."""
    def run(key, gamma, learning_rate, phi, y):
        model = model_for(gamma)
        params = model.init(key, phi.dtype)
        params, history = train.full_batch_gd(model, loss, params, phi, y, learning_rate=learning_rate, steps=steps)
        final, _ = train.objective(model, loss)(params, phi, y)
        return params, history["loss"], final

    compiled = []

    def call(*args):
        if not compiled:  # one compiled program for every configuration (FAST: compile time, not results)
            compiled.append(jax.jit(run).lower(*args).compile(compiler_options=FAST))
        return compiled[0](*args)
    return call


def _check_against_standalone(result, models_for: dict, *, n_expected: int):
    cfg = result.config
    pre = sweep_data.load_datasets(cfg)
    runs = {}
    compared = 0
    for c in result.configurations:
        fd = sweep_data.prepare_features(pre[c.dataset], c.width, jnp.dtype(cfg.dtype))
        key = (c.model, c.loss)
        if key not in runs:
            runs[key] = _standalone(models_for[c.model](fd.phi_train.shape[1], fd.num_classes), c.loss, cfg.steps)
        params, losses, final = runs[key](jax.random.PRNGKey(c.seed), np.float64(c.gamma or 0.5),
                                          np.float64(c.learning_rate), fd.phi_train, fd.targets(c.loss))
        rows = [r for r in result.rows if r["config_id"] == c.config_id]
        assert [r["step"] for r in rows] == list(range(0, cfg.steps, cfg.log_every)) + [cfg.steps]
        want = np.append(np.asarray(losses)[::cfg.log_every], float(final))
        got = np.asarray([r["train_loss"] for r in rows])
        assert np.all(np.isfinite(got)) and got[-1] < got[0], "trained, not diverged"
        np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"config {c.config_id} losses")
        for leaf, ref in zip(jax.tree_util.tree_leaves(result.final_params[c.config_id]),
                             jax.tree_util.tree_leaves(params)):
            np.testing.assert_allclose(leaf, ref, rtol=RTOL, atol=1e-12, err_msg=f"config {c.config_id} params")
        compared += 1
    assert compared == n_expected
    gaps = [r["gap"] for r in result.rows if r["gap"] is not None]
    assert not gaps or min(gaps) > -1e-9  # L* is the optimum: no run trains below it
    finals = [r["train_loss"] for r in result.rows if r["final"]]
    assert len(set(np.round(finals, 9))) == len(finals)  # distinct runs, not one configuration repeated


BUILTIN = {"delm": lambda m, k: lambda gamma: models.DELM(width=m, out_dim=k, gamma=gamma),
           "linear": lambda m, k: lambda gamma: models.Linear(width=m, out_dim=k),
           "deep_linear": lambda m, k: lambda gamma: models.DeepLinear(width=m, out_dim=k, depth=2)}


# ----------------------------------------------------------------------------- numbers

def test_sweep_equals_standalone_runs_and_groups_share_programs():
    result = base_result()
    D = len(jax.devices())
    assert len(result.configurations) == 2 * 2 * 3 * (2 + 1) == 36
    assert result.device_batching == ("map" if D > 1 else "vmap")
    by_label = {g.label: g for g in result.groups}
    assert set(by_label) == {f"{ds}/features/square/{m}" for ds in ("digits", "digits_b")
                             for m in ("delm/column_softmax", "linear")}
    for g in result.groups:
        assert g.chunk_size % D == 0 and g.chunks_computed == 1  # one chunk each, padded to the devices
        assert g.measured_bytes_per_device <= result.budget_bytes
    # equal shapes, equal structure: the second data set's groups ran the first's programs
    assert by_label["digits/features/square/delm/column_softmax"].programs_compiled == 1
    assert by_label["digits_b/features/square/delm/column_softmax"].programs_compiled == 0
    assert by_label["digits_b/features/square/linear"].programs_compiled == 0
    _check_against_standalone(result, BUILTIN, n_expected=36)


def test_chunks_and_resume_give_the_same_numbers_and_reuse_compiled_programs(tmp_path):
    """Deep linear networks with the cross-entropy loss, one configuration per device per chunk: several chunks,
    an interruption after the first, a resume in the same process that compiles nothing."""
    D = len(jax.devices())
    cfg = tiny(datasets=[TINY["datasets"][0]], output_dir=str(tmp_path),
               grid={**TINY["grid"], "models": ["deep_linear"], "losses": ["cross_entropy"]})
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
        resumed = run_sweep(cfg, progress=False, compiler_options=FAST,
                            on_chunk=lambda r: second.append(r.config_ids))
    finally:
        stop()
    assert not events, "a resumed sweep in the same process reuses its compiled program"
    group = resumed.groups[0]
    assert group.chunk_size == D and resumed.chunks_skipped == 1 and group.configs_skipped == len(first[0])
    assert resumed.chunks_computed == len(second) == -(-(n - len(first[0])) // D)
    assert not set(first[0]) & {i for ids in second for i in ids}
    assert group.measured_bytes_per_device <= cfg.memory_budget_mb * 2**20
    _check_against_standalone(resumed, BUILTIN, n_expected=n)
    again = run_sweep(cfg, progress=False, compiler_options=FAST)  # everything saved: nothing recomputed
    assert again.chunks_computed == 0 and again.chunks_skipped == 1 + len(second)
    with pytest.raises(SweepError, match="holds results of a different sweep"):
        run_sweep(dataclasses.replace(cfg, steps=11), progress=False)


@dataclasses.dataclass(frozen=True)
class TanhDEQ:
    """A user's own DEQ, built on the library's public API only: z* = tanh(z* W_c^T + phi U^T + b) with
    |W_c| <= contraction, predictions z* B^T."""

    width: int
    out_dim: int
    contraction: Any = 0.5
    hidden: int = 5

    def init(self, key, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        params = TanhMap(0.5).init(k1, self.hidden, self.width, dtype)
        params["B"] = 0.1 * jax.random.normal(k2, (self.out_dim, self.hidden), dtype)
        return params

    def apply(self, params, phi):
        layer = {k: params[k] for k in ("W", "U", "b")}
        sol = solve(TanhMap(self.contraction), jnp.zeros((phi.shape[0], self.hidden), phi.dtype), layer, phi,
                    solver="fixed_point", backward="one_step", tol=1e-10, maxiter=200)
        return sol.value @ params["B"].T, sol.stats


@pytest.fixture
def tanh_kind():
    sweep_models.register_model("tanh_deq", sweep_models.ModelKind(
        lambda spec: TanhDEQ(spec.width, spec.out_dim, contraction=spec.gamma), axes=("gamma",)))
    yield
    sweep_models.unregister_model("tanh_deq")


def test_a_users_own_deq_goes_through_the_sweep(tmp_path, tanh_kind):
    # lax.map on each device: vmapping the solver's while loop compiles 3x longer, and vmap is tested above
    cfg = tiny(datasets=[TINY["datasets"][0]], output_dir=str(tmp_path), save_params=True, device_batching="map",
               grid={**TINY["grid"], "models": ["tanh_deq"], "seeds": [0, 1], "learning_rates": [0.05]})
    result = run_sweep(cfg, progress=False, compiler_options=FAST)
    assert [g.label for g in result.groups] == ["digits/features/square/tanh_deq"]
    assert result.groups[0].estimated_bytes_per_config > 0  # measured by XLA: there is no formula for it
    final = {r["config_id"]: r for r in result.rows if r["final"]}
    first = {r["config_id"]: r for r in result.rows if r["step"] == 0}
    assert len(final) == 4 and all(r["converged"] and r["solver_iterations"] > 1 for r in final.values())
    # the reported loss is the user's model's own loss at the returned parameters (evaluated here, without the
    # sweep), and training lowered it
    fd = sweep_data.prepare_features(sweep_data.load_datasets(cfg)["digits"], None, jnp.float64)
    loss = jax.jit(lambda params, gamma: train.objective(TanhDEQ(7, 10, contraction=gamma), "square")(
        params, fd.phi_train, fd.targets("square"))[0])
    for c in result.configurations:
        value = float(loss(result.final_params[c.config_id], np.float64(c.gamma)))
        assert final[c.config_id]["train_loss"] == pytest.approx(value, rel=RTOL)
        assert value < first[c.config_id]["train_loss"]
    assert len({round(r["train_loss"], 9) for r in final.values()}) == 4
    with pytest.raises(ConfigError, match=r"'tanh_dq' is not a valid choice \(did you mean 'tanh_deq'\?\)"):
        tiny(grid={**TINY["grid"], "models": ["tanh_dq"]})


# ----------------------------------------------------------------------------- grid, config, refusals

def test_grid_is_grouped_by_static_structure():
    cfg = tiny(datasets=[TINY["datasets"][0], {"dataset": "digits", "label": "raw", "features": "raw"}],
               grid={"seeds": [0, 1], "learning_rates": [0.1, 0.2], "gammas": [0.5, 0.8, 0.9],
                     "sigmas": ["column_softmax", "row_softmax"], "models": ["delm", "linear", "deep_linear"],
                     "depths": [2, 3], "losses": ["square", "cross_entropy"], "widths": [None, 8]})
    configs = grid.expand_grid(cfg)
    # per (dataset, width, loss): lr x seeds x (2 sigmas x 3 gammas + linear + 2 depths)
    assert len(configs) == 2 * 2 * 2 * (2 * 2) * (6 + 1 + 2)
    assert [c.config_id for c in configs] == list(range(len(configs)))
    groups = grid.group_configurations(configs)
    assert len(groups) == 2 * 2 * 2 * 5  # per (dataset, width, loss): 2 sigmas + linear + 2 depths
    for key, members in groups.items():
        assert all(c.group == key for c in members)
        if key.model == "delm":
            assert len(members) == 3 * 2 * 2 and {c.gamma for c in members} == {0.5, 0.8, 0.9}
        else:
            assert len(members) == 2 * 2 and all(c.gamma is None for c in members)
        assert (key.depth is not None) == (key.model == "deep_linear")
        assert (key.sigma is not None) == (key.model == "delm")


@pytest.fixture
def no_compile():
    events, stop = compile_events()
    yield
    stop()
    assert not events, f"{len(events)} XLA compilation(s) although the input is invalid"


@pytest.mark.parametrize("change, match", [
    ({"grid": {**TINY["grid"], "seeds": []}}, r"grid\.seeds must list at least one value"),
    ({"datasets": []}, r"datasets must list at least one value"),
    ({"grid": {**TINY["grid"], "learning_rates": ["fast"]}}, r"grid\.learning_rates\[0\]: expected a number"),
    ({"steps": "10"}, r"steps: expected an integer; got '10'"),
    ({"steps": 0}, r"^steps must be a positive integer; got 0"),  # the key, not the class SweepConfig
    ({"grid": {**TINY["grid"], "gammas": [1.5]}}, r"gammas\[0\] must be a number in the open interval \(0, 1\)"),
    ({"grid": {**TINY["grid"], "models": ["resnet"]}}, r"models\[0\]: 'resnet' is not a valid choice"),
    ({"grid": {**TINY["grid"], "seeds": [1, 1]}}, r"seeds lists a value more than once"),
    ({"grid": {**TINY["grid"], "seed": [1]}}, r"unknown key 'grid.seed' \(did you mean 'seeds'\?\)"),
    ({"grid": {**TINY["grid"], "sigmas": ["colum_softmax"]}},
     r"grid\.sigmas\[0\]: 'colum_softmax' is not a valid choice \(did you mean 'column_softmax'\?\)"),
    ({"delm": {"solver": "anderon"}}, r"delm\.solver: 'anderon' is not a valid choice \(did you mean 'anderson'\?\)"),
    ({"grid": {**TINY["grid"], "losses": ["logistic"]}}, r"grid\.losses\[0\]: 'logistic' is not a valid choice"),
    ({"memory_budget_mb": -1}, r"memory_budget_mb must be a positive number"),
])
def test_bad_config_is_a_clear_error(change, match, no_compile):
    with pytest.raises(ConfigError, match=match):
        tiny(**change)


def test_config_choices_come_from_the_registries():
    import typing

    from experiments.common import registry
    from experiments.sweep import config as sweep_config

    hints = typing.get_type_hints(sweep_config.DELMOptions)
    assert typing.get_args(hints["solver"]) == tuple(registry.SOLVERS)
    assert typing.get_args(hints["backward"]) == tuple(registry.BACKWARDS)
    assert typing.get_args(typing.get_args(typing.get_type_hints(sweep_config.GridSpec)["sigmas"])[0]) == \
        tuple(registry.SIGMAS)


def test_refusals_come_before_compiling_and_writing(tmp_path, no_compile):
    with pytest.raises(SweepMemoryError, match=r"group digits/features/square/delm/column_softmax: one configuration "
                                               r"needs about .* above the memory budget of 0.01 MiB"):
        run_sweep(tiny(memory_budget_mb=0.01, output_dir=str(tmp_path / "out")), progress=False)
    with jax.enable_x64(False), pytest.raises(SweepError, match="dtype 'float64' needs 64-bit JAX"):
        run_sweep(tiny(output_dir=str(tmp_path / "out")), progress=False)
    with pytest.raises(sweep_data.DataError, match=r"datasets\[0\] \(mnist\): .*--data-dir"):
        run_sweep(tiny(datasets=[{"dataset": "mnist", "data_dir": str(tmp_path), "download": False}],
                       output_dir=str(tmp_path / "out")), progress=False)
    assert not (tmp_path / "out").exists()


def test_fingerprint_ignores_where_files_live():
    a = tiny()
    assert fingerprint(a) == fingerprint(dataclasses.replace(a, output_dir="elsewhere", memory_budget_mb=5.0))
    assert fingerprint(a) != fingerprint(dataclasses.replace(a, steps=11))


# ----------------------------------------------------------------------------- the command's files

def test_command_writes_readable_files_with_the_library_numbers(tmp_path, monkeypatch):
    import functools

    import yaml

    from experiments.sweep import cli
    from experiments.sweep import run as sweep_run

    monkeypatch.setattr(sweep_run, "run_sweep", functools.partial(sweep_run.run_sweep, compiler_options=FAST))

    result = base_result()
    # one data set (the base run's first), so one figure: the programs are the base run's all the same
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "datasets": TINY["datasets"][:1],
                                                        "output_dir": str(tmp_path / "out")}))
    want = [r for r in result.rows if r["dataset"] == "digits"]
    old = os.umask(0o022)
    try:
        assert cli.main(["--config", str(tmp_path / "tiny.yaml"), "--no-progress"]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    with open(out / "results.csv") as fh:
        table = list(csv.reader(fh))
    assert tuple(table[0]) == tables.ROW_COLUMNS and len(table) == 1 + len(want)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["train_loss"] for r in rows], [r["train_loss"] for r in want], rtol=RTOL)
    final = [r for r in rows if r["final"]]
    assert all(0 <= r["test_accuracy_pct"] <= 100 for r in final)
    assert max(r["test_accuracy_pct"] for r in final) > 1  # a percentage, not a fraction
    assert all(r["gap"] == pytest.approx(r["train_loss"] - r["L_star"], rel=1e-9) for r in rows)
    with open(out / "aggregate.csv") as fh:
        agg = list(csv.DictReader(fh))
    assert tuple(agg[0]) == tables.AGGREGATE_COLUMNS and len(agg) == 2 * (2 + 1)
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["fingerprint"] == fingerprint(tiny(datasets=TINY["datasets"][:1]))
    assert manifest["n_configurations"] == 18
    assert sum(g["programs_compiled"] for g in manifest["groups"]) == 0  # the library call's programs, reused
    assert "# Sweep `tiny`" in (out / "summary.md").read_text()
    assert (out / "figures" / "digits_m7_square.png").stat().st_size > 1000
    for path in out.rglob("*"):  # the umask's permissions, not mkstemp's 0600
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# ----------------------------------------------------------------------------- figures

def _rows(setting: dict, accuracies: list, losses: list) -> list[dict]:
    rows = []
    for seed, (acc, curve) in enumerate(zip(accuracies, losses)):
        for step, loss in enumerate(curve):
            final = step == len(curve) - 1
            diverged = loss is None
            rows.append({**setting, "seed": seed, "step": step * 10, "final": final, "train_loss": loss,
                         "gap": None if loss is None else loss - 0.1, "diverged": final and diverged,
                         "test_accuracy_pct": acc if final else None, "test_loss": 1.0 if final else None,
                         "nonconverged_steps": 0})
    return rows


def test_figures_mark_divergence_zoom_accuracy_and_stay_readable():
    import matplotlib.pyplot as plt

    base = {"dataset": "digits", "width": 7, "projected": False, "model": "delm", "depth": None,
            "sigma": "column_softmax", "loss": "square"}
    rows = (_rows({**base, "gamma": 0.5, "learning_rate": 0.1}, [93.0, 94.0], [[1.0, 0.5, 0.2]] * 2)
            + _rows({**base, "gamma": 0.8, "learning_rate": 0.1}, [91.0, 92.5], [[1.0, 0.6, 0.3]] * 2)
            + _rows({**base, "gamma": 0.8, "learning_rate": 0.3}, [None, None], [[1.0, 1e20, None]] * 2)
            + _rows({**base, "gamma": 0.9, "learning_rate": 0.3}, [None, None], [[None, None, None]] * 2))
    fig = figures.make_figure(rows)
    try:
        ax_curve, ax_final = fig.axes
        texts = [t for t in fig.findobj(plt.Text) if t.get_text().strip()]
        assert min(t.get_fontsize() for t in texts) >= figures.MIN_FONT_PT
        lo, hi = ax_final.get_xlim()
        assert 85 <= lo < 91 and 94 < hi <= 100  # zoomed to 91..94 %, not 0..100 (nor 0..1)
        assert "%" in ax_final.get_xlabel()
        # every setting is in the accuracy panel; the two diverged ones are marked, none is silently empty
        assert len(ax_final.get_yticklabels()) == 4
        notes = [t.get_text() for t in ax_final.texts]
        assert sorted(notes) == ["diverged: 2/2 seeds"] * 2
        # the curve panel: a line per setting with data, a cross where the diverged one stopped, a note for the
        # one that diverged before any logged step, and a legend of exactly the drawn lines
        drawn = [line for line in ax_curve.get_lines() if line.get_label() and not line.get_label().startswith("_")]
        legend = [t.get_text() for t in ax_curve.get_legend().get_texts()]
        assert legend == [line.get_label() for line in drawn] and len(drawn) == 3
        assert any("diverged: 2/2 seeds" in name for name in legend)
        # the cross is on the diverged setting's own line, so its legend entry shows it
        assert [line.get_label() for line in drawn if line.get_marker() == "x"] == \
            [name for name in legend if "diverged" in name]
        # the diverged curve (1e20) leaves the axis at its top, one decade above the others, where its cross is
        (crossed,) = [line for line in drawn if line.get_marker() == "x"]
        top = ax_curve.get_ylim()[1]
        assert top == pytest.approx(10 * 0.9) and crossed.get_ydata()[-1] == top
        assert "x: diverged" in ax_curve.get_legend().get_title().get_text()
        fig.canvas.draw()  # the legend sits below the curves, not over them
        assert not ax_curve.get_legend().get_window_extent().overlaps(ax_curve.get_window_extent())
        assert any("diverged before the first logged step" in t.get_text() and "gamma=0.9" in t.get_text()
                   for t in ax_curve.texts)
    finally:
        plt.close(fig)


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
