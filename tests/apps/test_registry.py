"""The config layer's names (`experiments.common.registry`) and its one model factory (`experiments.common.models`):
every name resolves to an object the library accepts, and the names each config offers are the documented ones."""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import pytest

import deq_jax
from deq_jax import parallel
from experiments.common import models, registry
from experiments.reproduce import config as reproduce_config
from experiments.sweep import config as sweep_config


def test_names_resolve_to_the_library_objects():
    assert registry.SOLVERS["anderson"] is deq_jax.Anderson and registry.DELM_SOLVERS["refine"] is deq_jax.Refine
    assert registry.SIGMAS["column_softmax"] is deq_jax.column_softmax
    assert registry.LOSSES["square"] is deq_jax.square and registry.BACKWARDS["implicit"] is deq_jax.Implicit
    assert registry.MODELS["delm"] is deq_jax.DELM


@pytest.mark.parametrize("solver", sorted(registry.DELM_SOLVERS))
@pytest.mark.parametrize("backward", sorted(registry.BACKWARDS))
def test_every_solver_and_backward_object_builds_a_delm(solver, backward):
    model = models.build("delm", 3, 2, solver=registry.DELM_SOLVERS[solver](), backward=registry.BACKWARDS[backward]())
    assert isinstance(model, deq_jax.DELM)


@pytest.mark.parametrize("formulation", registry.FORMULATIONS)
@pytest.mark.parametrize("sigma", sorted(registry.SIGMAS))
def test_every_sigma_and_formulation_name_builds_a_delm(sigma, formulation):
    model = models.build("delm", 3, 2, sigma=sigma, formulation=formulation)
    predictions, _ = model.apply(model.init(jax.random.PRNGKey(0), jnp.float32), jnp.ones((4, 3), jnp.float32))
    assert predictions.shape == (4, 2)


def test_linear_solver_precision_and_batching_names_are_accepted():
    for name in registry.LINEAR_SOLVERS:
        models.build("delm", 3, 2, backward=deq_jax.Implicit(linear_solver=name))
    for name in registry.PRECISIONS:
        models.build("delm", 3, 2, precision=name)
    for name in registry.BATCHINGS:
        parallel.ParallelMap(lambda c, data: c, batching=name)


def test_losses_take_predictions_and_targets():
    y = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    assert float(registry.LOSSES["square"](y, y)) == 0.0
    uniform = registry.LOSSES["cross_entropy"](jnp.zeros((2, 2)), jnp.asarray([0, 1]))
    assert float(uniform) == pytest.approx(0.6931, 1e-3)


def test_the_factory_builds_every_model_and_names_the_choices_on_a_typo():
    assert isinstance(models.build("linear", 3, 2), deq_jax.Linear)
    assert isinstance(models.build("deep_linear", 3, 2, depth=2), deq_jax.DeepLinear)
    with pytest.raises(ValueError, match=r"model must be one of 'delm', 'linear', 'deep_linear'; got 'delmm'"):
        models.build("delmm", 3, 2)


def test_the_solver_names_each_config_accepts():
    delm = typing.get_type_hints(sweep_config.DELMOptions)
    # every solver the library registers (a new solver file appears in the configs by itself), but "refine"
    assert typing.get_args(delm["solver"]) == ("anderson", "broyden", "direct", "fixed_point", "relaxed")
    variant = typing.get_type_hints(reproduce_config.VariantConfig)
    assert typing.get_args(variant["solver"]) == ("anderson", "fixed_point", "broyden")
    assert set(typing.get_args(variant["solver"])) <= set(registry.SOLVERS)
    assert set(typing.get_args(variant["linear_solver"])) <= set(registry.LINEAR_SOLVERS)


def test_the_applications_import_no_string_registry_of_the_library():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2] / "experiments"
    names = (
        r"\b(SOLVERS|BACKWARDS|LOSSES|SIGMAS|DELM_SOLVERS|FORMULATIONS|LINEAR_SOLVERS|MODELS|BATCHINGS|get_loss|"
        r"get_sigma)\b"
    )
    offenders = [
        f"{path.relative_to(root)}:{i}"
        for path in sorted(root.rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*(from deq_jax\S* import|import deq_jax)", line) and re.search(names, line)
    ]
    assert not offenders, offenders
