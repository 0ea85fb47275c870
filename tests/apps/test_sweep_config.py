"""The sweep's configuration: the grid grouped by static structure, clear errors that come before compiling and
writing, choices from the registry, and the fingerprint that decides what a resumed sweep may reuse."""

from __future__ import annotations

import dataclasses

import jax
import pytest
from sweep_cases import TINY, tiny

from experiments.common.config import ConfigError
from experiments.sweep import data as sweep_data
from experiments.sweep import grid
from experiments.sweep.config import fingerprint
from experiments.sweep.run import SweepError, SweepMemoryError, run_sweep


def test_grid_is_grouped_by_static_structure():
    cfg = tiny(
        datasets=[TINY["datasets"][0], {"dataset": "digits", "label": "raw", "features": "raw"}],
        grid={
            "seeds": [0, 1],
            "learning_rates": [0.1, 0.2],
            "gammas": [0.5, 0.8, 0.9],
            "sigmas": ["column_softmax", "row_softmax"],
            "models": ["delm", "linear", "deep_linear"],
            "depths": [2, 3],
            "losses": ["square", "cross_entropy"],
            "widths": [None, 8],
        },
    )
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


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"grid": {**TINY["grid"], "seeds": []}}, r"grid\.seeds must list at least one value"),
        ({"datasets": []}, r"datasets must list at least one value"),
        ({"grid": {**TINY["grid"], "learning_rates": ["fast"]}}, r"grid\.learning_rates\[0\]: expected a number"),
        ({"steps": "10"}, r"steps: expected an integer; got '10'"),
        ({"steps": 0}, r"^steps must be a positive integer; got 0"),  # the key, not the class SweepConfig
        ({"grid": {**TINY["grid"], "gammas": [1.5]}}, r"gammas\[0\] must be a number in the open interval \(0, 1\)"),
        ({"grid": {**TINY["grid"], "models": ["resnet"]}}, r"models\[0\]: 'resnet' is not a valid choice"),
        ({"grid": {**TINY["grid"], "seeds": [1, 1]}}, r"seeds lists a value more than once"),
        ({"grid": {**TINY["grid"], "seed": [1]}}, r"unknown key 'grid.seed' \(did you mean 'seeds'\?\)"),
        (
            {"grid": {**TINY["grid"], "sigmas": ["colum_softmax"]}},
            r"grid\.sigmas\[0\]: 'colum_softmax' is not a valid choice \(did you mean 'column_softmax'\?\)",
        ),
        (
            {"delm": {"solver": "anderon"}},
            r"delm\.solver: 'anderon' is not a valid choice \(did you mean 'anderson'\?\)",
        ),
        ({"grid": {**TINY["grid"], "losses": ["logistic"]}}, r"grid\.losses\[0\]: 'logistic' is not a valid choice"),
        ({"memory_budget_mb": -1}, r"memory_budget_mb must be a positive number"),
    ],
)
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
    assert typing.get_args(typing.get_args(typing.get_type_hints(sweep_config.GridSpec)["sigmas"])[0]) == tuple(
        registry.SIGMAS
    )


def test_refusals_come_before_compiling_and_writing(tmp_path, no_compile):
    with pytest.raises(
        SweepMemoryError,
        match=r"group digits/features/square/delm/column_softmax: one configuration "
        r"needs about .* above the memory budget of 0.01 MiB",
    ):
        run_sweep(tiny(memory_budget_mb=0.01, output_dir=str(tmp_path / "out")), progress=False)
    with jax.enable_x64(False), pytest.raises(SweepError, match="dtype 'float64' needs 64-bit JAX"):
        run_sweep(tiny(output_dir=str(tmp_path / "out")), progress=False)
    with pytest.raises(sweep_data.DataError, match=r"datasets\[0\] \(mnist\): .*--data-dir"):
        run_sweep(
            tiny(
                datasets=[{"dataset": "mnist", "data_dir": str(tmp_path), "download": False}],
                output_dir=str(tmp_path / "out"),
            ),
            progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_fingerprint_ignores_where_files_live():
    a = tiny()
    assert fingerprint(a) == fingerprint(dataclasses.replace(a, output_dir="elsewhere", memory_budget_mb=5.0))
    assert fingerprint(a) != fingerprint(dataclasses.replace(a, steps=11))
