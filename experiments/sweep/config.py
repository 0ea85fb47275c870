"""A sweep's configuration: frozen dataclasses validated from YAML (`load_config`), choices taken from the registries.

Every choice a key offers is read from the table that resolves it, so the two cannot drift: data sets and feature
maps from `experiments.common.datasets`; sigmas, solvers, backward modes, formulations, precisions, per-device
batching and losses (those whose targets the sweep builds from class labels) from `experiments.common.registry`;
model kinds from `experiments.common.models.KINDS` (which `register_model` extends).
An unknown key or choice is a `ConfigError` naming the key, with a "did you mean" where one is close.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from experiments.common import config as config_lib
from experiments.common import io, registry
from experiments.common import models as model_lib
from experiments.common.data_config import DataConfig

ConfigError = config_lib.ConfigError

#: how the sweep builds each loss's targets from class labels (a loss of `registry.LOSSES` without an entry here,
#: e.g. the binary logistic loss, needs targets the multi-class data sets do not have)
TARGETS = {"square": "one-hot rows in the features' dtype", "cross_entropy": "integer labels"}

#: the sweep's preprocessing where a data set names none: standardised pixels
DEFAULT_FEATURES = ("standardize", None)
SigmaName = Literal[tuple(registry.SIGMAS)]
LossName = Literal[tuple(name for name in registry.LOSSES if name in TARGETS)]
SolverName = Literal[tuple(registry.SOLVERS)]
BackwardName = Literal[tuple(registry.BACKWARDS)]
FormulationName = Literal[tuple(registry.FORMULATIONS)]
BatchingName = Literal[registry.BATCHINGS]
PrecisionName = Literal[registry.PRECISIONS]
DtypeName = Literal["float32", "float64"]

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _fail(name: str, expected: str, got: Any) -> None:
    raise ValueError(f"{name} must be {expected}; got {got!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _axis(name: str, values: tuple, ok: Callable[[Any], bool], expected: str) -> None:
    """A grid axis: at least one value, each valid, none repeated."""
    if not values:
        raise ValueError(f"{name} must list at least one value (an empty axis makes the grid empty); got []")
    for i, v in enumerate(values):
        if not ok(v):
            _fail(f"{name}[{i}]", expected, v)
    repeated = sorted({repr(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(
            f"{name} lists a value more than once (the grid would repeat configurations): {', '.join(repeated)}"
        )


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """The swept axes. A model kind uses the axes it declares (`experiments.common.models.ModelKind.axes`): the
    DELM takes `sigmas` x `gammas`, the deep linear network `depths`, the linear model none; so the grid has
    |datasets| |widths| |losses| |learning_rates| |seeds| (sum over models of the product of their axes)
    configurations. A width of `null` uses the preprocessed features as they are; an integer `m` a fixed random
    projection to `m` features (`deq_jax.maps.random_projection`)."""

    seeds: tuple[int, ...] = (0,)
    learning_rates: tuple[float, ...] = (0.05,)
    gammas: tuple[float, ...] = (0.8,)
    sigmas: tuple[SigmaName, ...] = ("column_softmax",)
    models: tuple[str, ...] = ("delm",)
    depths: tuple[int, ...] = (2,)
    losses: tuple[LossName, ...] = ("square",)
    widths: tuple[int | None, ...] = (None,)

    def __post_init__(self):
        _axis(
            "seeds",
            self.seeds,
            lambda v: _is_int(v) and 0 <= v <= config_lib.SEED_MAX,
            "an integer in 0 .. 2**32 - 1 (a seed of jax.random.PRNGKey)",
        )
        _axis("learning_rates", self.learning_rates, lambda v: _is_number(v) and v > 0, "a positive finite number")
        _axis("gammas", self.gammas, lambda v: _is_number(v) and 0 < v < 1, "a number in the open interval (0, 1)")
        _axis("sigmas", self.sigmas, lambda v: True, "")
        _axis("models", self.models, lambda v: isinstance(v, str), "a model name")
        for i, name in enumerate(self.models):
            if name not in model_lib.KINDS:
                close = difflib.get_close_matches(name, list(model_lib.KINDS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"models[{i}]: {name!r} is not a valid choice{hint}; valid choices: "
                    + ", ".join(map(repr, model_lib.KINDS))
                )
        _axis("depths", self.depths, lambda v: _is_int(v) and v > 0, "a positive integer")
        _axis("losses", self.losses, lambda v: True, "")
        _axis("widths", self.widths, lambda v: v is None or (_is_int(v) and v > 0), "a positive integer or null")


@dataclasses.dataclass(frozen=True)
class DELMOptions:
    """Fixed (not swept) DELM settings: the fields of `deq_jax.models.DELM`."""

    formulation: FormulationName = "transposed"
    solver: SolverName = "direct"
    backward: BackwardName = "implicit"
    tol: float = 1e-5
    maxiter: int = 100
    precision: PrecisionName | None = "highest"
    init_scale: float = 0.1

    def __post_init__(self):
        config_lib.check_count("maxiter", self.maxiter)
        model_lib.build("delm", 1, 1, **dataclasses.asdict(self))  # the model's own range checks


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    init_scale: float = 0.1

    def __post_init__(self):
        model_lib.build("linear", 1, 1, init_scale=self.init_scale)


@dataclasses.dataclass(frozen=True)
class DeepLinearOptions:
    hidden: int | None = None
    init_gain: float = 1.0

    def __post_init__(self):
        model_lib.build("deep_linear", 1, 1, depth=1, hidden=self.hidden, init_gain=self.init_gain)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A whole sweep (load it from YAML with `load_config`).

    `steps`: full-batch GD steps per run; `log_every`: table rows at steps 0, log_every, 2 log_every, ... and at
    the final step; `memory_budget_mb`: per device (null: `deq_jax.parallel.default_budget_bytes`);
    `max_chunk_size`: an optional cap on configurations per chunk; `device_batching`: how a device runs its
    configurations (`deq_jax.parallel.device_batching`); `save_params`: keep every run's final parameters;
    `output_dir`: default `results/sweeps/<name>`.
    """

    name: str
    datasets: tuple[DataConfig, ...]
    grid: GridSpec = dataclasses.field(default_factory=GridSpec)
    steps: int = 200
    log_every: int = 10
    dtype: DtypeName = "float32"
    delm: DELMOptions = dataclasses.field(default_factory=DELMOptions)
    linear: LinearOptions = dataclasses.field(default_factory=LinearOptions)
    deep_linear: DeepLinearOptions = dataclasses.field(default_factory=DeepLinearOptions)
    memory_budget_mb: float | None = None
    max_chunk_size: int | None = None
    device_batching: BatchingName = "auto"
    save_params: bool = False
    output_dir: str | None = None

    def __post_init__(self):
        if not (isinstance(self.name, str) and _NAME.fullmatch(self.name)):
            _fail("name", "a non-empty string of letters, digits, '_', '.', '-' (it names files)", self.name)
        _axis("datasets", self.datasets, lambda v: isinstance(v, DataConfig), "a data set")
        object.__setattr__(self, "datasets", tuple(d.with_default_features(*DEFAULT_FEATURES) for d in self.datasets))
        labels = [d.key for d in self.datasets]
        if len(set(labels)) != len(labels):
            raise ValueError(f"datasets must have unique labels (set 'label' to tell them apart); got {labels}")
        for name in ("steps", "log_every"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) > 0):
                _fail(name, "a positive integer", getattr(self, name))
        if self.memory_budget_mb is not None and not (_is_number(self.memory_budget_mb) and self.memory_budget_mb > 0):
            _fail("memory_budget_mb", "a positive number of MiB or null", self.memory_budget_mb)
        if self.max_chunk_size is not None and not (_is_int(self.max_chunk_size) and self.max_chunk_size > 0):
            _fail("max_chunk_size", "a positive integer or null", self.max_chunk_size)

    @property
    def resolved_output_dir(self) -> pathlib.Path:
        return pathlib.Path(self.output_dir) if self.output_dir else pathlib.Path("results") / "sweeps" / self.name


def load_config(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read and validate a sweep YAML file; `overrides` like `["steps=50", "grid.seeds=[0,1]"]`."""
    return config_lib.from_dict(SweepConfig, config_lib.load_yaml(path), overrides=overrides)


#: settings that change no number in the results, so a resumed sweep may change them
RUNTIME_ONLY = ("memory_budget_mb", "max_chunk_size", "output_dir", "device_batching")


def fingerprint(config: SweepConfig) -> str:
    """A hash of every setting that changes results (`experiments.common.io.fingerprint`); a sweep resumes only
    from chunks saved under the same fingerprint. A data set's `data_dir` and `download` say where the files come
    from, not what they hold (checksums do), so they are left out too (and so is `cache_dir`)."""
    content = {k: v for k, v in config_lib.to_dict(config).items() if k not in RUNTIME_ONLY}
    content["datasets"] = [
        {k: v for k, v in d.items() if k not in ("data_dir", "cache_dir", "download")} for d in content["datasets"]
    ]
    for entry, d in zip(content["datasets"], config.datasets, strict=True):
        if d.files is not None:  # the user's own files: what they hold, not only their names
            entry["file_digests"] = d.files.digests()
    return io.fingerprint(content)


__all__ = [
    "ConfigError",
    "DELMOptions",
    "DataConfig",
    "DeepLinearOptions",
    "GridSpec",
    "LinearOptions",
    "RUNTIME_ONLY",
    "SweepConfig",
    "TARGETS",
    "fingerprint",
    "load_config",
]
