"""Hyperparameter sweeps as compiled, vmapped programs, sharded over every device JAX sees.

A sweep is a grid: datasets x widths x losses x models (DELM x sigmas x gammas, linear, deep linear x depths)
x learning rates x seeds. Every configuration is trained exactly as the main job trains one run:

    params = model.init(jax.random.PRNGKey(seed), dtype)
    params, history = deq_jax.train.full_batch_gd(model, loss, params, phi, y, learning_rate=lr, steps=steps)

**Grouping.** Configurations that share every static property (dataset, width, loss, model kind, sigma, depth:
what fixes array shapes and the traced program) form one group. The remaining hyperparameters (the seed's PRNG
key, the learning rate and gamma) are traced values, so a group is one compiled program over a leading
configuration axis (`vmap`; see Sharding); different groups are different compiled programs.
`group_configurations` does this automatically. The model is built inside the traced function, so gamma may be a
tracer (its range is checked on the concrete grid first); the learning rate enters as `optax.sgd(lr)`, the
optimizer `full_batch_gd` builds itself from a concrete rate.

**Chunking.** A group is run in chunks whose size is chosen from a per-device memory budget
(`SweepConfig.memory_budget_mb`; default: half the device's memory limit where the device reports one, else a
quarter of the host's RAM shared among the local devices). The per-configuration memory is a stated formula
(`estimate_config_bytes`); the shared data is counted once per device (`data_bytes`). If even one configuration
per device does not fit, `SweepMemoryError` is raised before anything is compiled. After compiling a chunk's
program, XLA's own `memory_analysis()` is read; if it exceeds the budget the chunk is shrunk and recompiled, so
the budget holds against the measurement, not only the formula. Both numbers are reported per group.

**Sharding.** The configuration axis is sharded over a one-axis `jax.sharding.Mesh` of `jax.devices()` with
`NamedSharding(mesh, PartitionSpec("config"))`; the data are replicated (`PartitionSpec()`). The program is
`jit(shard_map(local))`: each device runs its own block of configurations, with no communication, by `vmap`
or, on CPU meshes of several devices, by `lax.map` (`device_batching`: jaxlib 0.10's batched LAPACK kernels
deadlock there). Chunks are padded to a multiple of the device count by repeating their last configuration;
padded rows are dropped from the results.

**Several hosts.** Call `jax.distributed.initialize()` before anything else touches JAX (the command
`python -m experiments sweep --distributed` does). `jax.devices()` is then global, so the mesh spans every host;
every process runs the same program on its own shards, the outputs are gathered with
`multihost_utils.process_allgather`, the set of finished chunks is broadcast from process 0, and only process 0
writes files. (Not exercised by the tests, which run on one host with forced CPU devices.)

**Resume.** Each finished chunk is saved atomically (temporary file + `os.replace`) as
`<output_dir>/chunks/chunk-<group>-<hash of its configuration ids>.npz`, stamped with the sweep's fingerprint
(a hash of every setting that changes results). A restarted sweep skips every configuration found in a saved
chunk; a chunk file from a different sweep is an error, not silently mixed in.

**Outputs.** `results.csv` and `results.jsonl`: one row per configuration and logged step (`ROW_COLUMNS`): all
hyperparameters, the training loss, `L*` and the gap `L - L*` (square loss; `L*` is the shallow linear model's
optimum on the same features, docs/theory.md section 1), the gradient norm, the solver's iterations, relative
residual and convergence flag; the final row (`step == steps`) adds train accuracy and test loss/accuracy.
`aggregate.csv`: per setting (all hyperparameters except the seed), mean/std/min/max across seeds
(`AGGREGATE_COLUMNS`).

Example:
    >>> cfg = load_config("configs/sweep_digits.yaml")
    >>> result = run_sweep(cfg, progress=True)
    >>> result.rows[0]["train_loss"], result.files["csv"]
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import pathlib
import platform
import re
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, Literal, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments.common import config as config_lib
from experiments.common import datasets as data_lib
from deq_jax import losses as losses_lib
from deq_jax import models, theory, train
from deq_jax.maps import SIGMAS, features, random_projection

Array = jax.Array
PathLike = Union[str, os.PathLike]

MODEL_KINDS = ("delm", "linear", "deep_linear")
SWEEP_LOSSES = ("square", "cross_entropy")
CONFIG_AXIS = "config"
SAFETY_FACTOR = 2  # the memory formula counts each live buffer once; XLA keeps some longer


class SweepError(ValueError):
    """A sweep that cannot run as specified (empty grid, foreign results in the output directory, ...)."""


class SweepMemoryError(SweepError):
    """Even one configuration per device does not fit the memory budget."""


# ----------------------------------------------------------------------------- configuration

def _fail(name: str, expected: str, got: Any) -> None:
    raise ValueError(f"{name} must be {expected}; got {got!r}")


def _check_list(name: str, values: Any, item_ok: Callable[[Any], bool], expected: str) -> tuple:
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        _fail(name, "a list", values)
    values = tuple(values)
    if not values:
        raise ValueError(f"{name} must list at least one value (an empty axis makes the grid empty); got []")
    for i, v in enumerate(values):
        if not item_ok(v):
            _fail(f"{name}[{i}]", expected, v)
    duplicates = sorted({repr(v) for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"{name} lists a value more than once (the grid would repeat configurations): "
                         f"{', '.join(duplicates)}")
    return values


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A data set and its preprocessing (the arguments of `experiments.common.datasets.load_dataset` and `preprocess`).

    `label` names it in the results (default: `name`); labels must be unique within a sweep.
    """

    name: str
    label: Optional[str] = None
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    features: Literal["standardize", "raw", "pca_whiten"] = "standardize"
    pca_dim: Optional[int] = None
    add_bias: bool = True
    seed: int = 0
    projection_seed: int = 0
    data_dir: Optional[str] = None
    download: bool = True

    def __post_init__(self):
        if self.name not in data_lib.DATASETS:
            _fail("name", f"one of {data_lib.DATASETS}", self.name)
        if self.label is not None and not (isinstance(self.label, str)
                                           and re.fullmatch(r"[A-Za-z0-9_.-]+", self.label)):
            _fail("label", "a non-empty string of letters, digits, '_', '.', '-'", self.label)
        for name in ("n_train", "n_test", "pca_dim"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value > 0):
                _fail(name, "a positive integer or null", value)
        for name in ("seed", "projection_seed"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 0):
                _fail(name, "a non-negative integer", value)

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """The swept axes. `gammas` and `sigmas` apply to the DELM only, `depths` to the deep linear network only,
    so the grid has `|datasets| |widths| |losses| |learning_rates| |seeds| (|sigmas| |gammas| [delm] + 1 [linear]
    + |depths| [deep_linear])` configurations. A width of `null` uses the preprocessed features as they are;
    an integer `m` uses a fixed random projection to `m` features (`deq_jax.maps.random_projection`)."""

    seeds: tuple[int, ...] = (0,)
    learning_rates: tuple[float, ...] = (0.05,)
    gammas: tuple[float, ...] = (0.8,)
    sigmas: tuple[str, ...] = ("column_softmax",)
    models: tuple[str, ...] = ("delm",)
    depths: tuple[int, ...] = (2,)
    losses: tuple[str, ...] = ("square",)
    widths: tuple[Optional[int], ...] = (None,)

    def __post_init__(self):
        checks = {
            "seeds": (lambda v: _is_int(v) and 0 <= v < 2**31, "a non-negative integer below 2**31"),
            "learning_rates": (lambda v: _is_number(v) and v > 0, "a positive finite number"),
            "gammas": (lambda v: _is_number(v) and 0 < v < 1, "a number in the open interval (0, 1)"),
            "sigmas": (lambda v: v in SIGMAS, f"one of {tuple(SIGMAS)}"),
            "models": (lambda v: v in MODEL_KINDS, f"one of {MODEL_KINDS}"),
            "depths": (lambda v: _is_int(v) and v > 0, "a positive integer"),
            "losses": (lambda v: v in SWEEP_LOSSES, f"one of {SWEEP_LOSSES}"),
            "widths": (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer or null"),
        }
        for name, (ok, expected) in checks.items():
            object.__setattr__(self, name, _check_list(name, getattr(self, name), ok, expected))


@dataclasses.dataclass(frozen=True)
class DELMOptions:
    """Fixed (not swept) DELM settings; the fields of `deq_jax.models.DELM`."""

    formulation: Literal["transposed", "per_sample"] = "transposed"
    solver: Literal["direct", "anderson", "fixed_point", "broyden"] = "direct"
    backward: Literal["implicit", "one_step", "unrolled"] = "implicit"
    tol: float = 1e-5
    maxiter: int = 100
    precision: Optional[Literal["highest", "high", "default", "float32", "tensorfloat32", "bfloat16"]] = "highest"
    init_scale: float = 0.1

    def __post_init__(self):
        models.DELM(width=1, out_dim=1, **dataclasses.asdict(self))  # the model's own range checks


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    init_scale: float = 0.1

    def __post_init__(self):
        models.Linear(width=1, out_dim=1, init_scale=self.init_scale)


@dataclasses.dataclass(frozen=True)
class DeepLinearOptions:
    hidden: Optional[int] = None
    init_gain: float = 1.0

    def __post_init__(self):
        models.DeepLinear(width=1, out_dim=1, depth=1, hidden=self.hidden, init_gain=self.init_gain)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A whole sweep. Load it from YAML with `load_config` (unknown keys and wrong types are `ConfigError`s).

    `steps`: full-batch GD steps per run; `log_every`: table rows at steps 0, log_every, 2 log_every, ... plus the
    final step; `memory_budget_mb`: per device (None: see the module docstring); `max_chunk_size`: an optional
    cap on configurations per chunk; `device_batching`: how a device runs its configurations (`device_batching`);
    `save_params`: keep every run's final parameters in the chunk files; `output_dir`: default
    `results/sweeps/<name>`.
    """

    name: str
    datasets: tuple[DatasetSpec, ...]
    grid: GridSpec = dataclasses.field(default_factory=GridSpec)
    steps: int = 200
    log_every: int = 10
    dtype: Literal["float32", "float64"] = "float32"
    delm: DELMOptions = dataclasses.field(default_factory=DELMOptions)
    linear: LinearOptions = dataclasses.field(default_factory=LinearOptions)
    deep_linear: DeepLinearOptions = dataclasses.field(default_factory=DeepLinearOptions)
    memory_budget_mb: Optional[float] = None
    max_chunk_size: Optional[int] = None
    device_batching: Literal["auto", "vmap", "map"] = "auto"
    save_params: bool = False
    output_dir: Optional[str] = None

    def __post_init__(self):
        if not (isinstance(self.name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)):
            _fail("name", "a non-empty string of letters, digits, '_', '.', '-' (it names files)", self.name)
        datasets = _check_list("datasets", self.datasets, lambda v: isinstance(v, DatasetSpec), "a DatasetSpec")
        labels = [d.key for d in datasets]
        if len(set(labels)) != len(labels):
            raise ValueError(f"datasets must have unique labels (set 'label' to tell them apart); got {labels}")
        object.__setattr__(self, "datasets", datasets)
        for name, value in (("grid", self.grid), ("delm", self.delm), ("linear", self.linear),
                            ("deep_linear", self.deep_linear)):
            want = {"grid": GridSpec, "delm": DELMOptions, "linear": LinearOptions,
                    "deep_linear": DeepLinearOptions}[name]
            if not isinstance(value, want):
                _fail(name, f"a {want.__name__}", value)
        for name in ("steps", "log_every"):
            value = getattr(self, name)
            if not (_is_int(value) and value > 0):
                _fail(name, "a positive integer", value)
        if self.dtype not in ("float32", "float64"):
            _fail("dtype", "'float32' or 'float64'", self.dtype)
        if self.device_batching not in ("auto", "vmap", "map"):
            _fail("device_batching", "'auto', 'vmap' or 'map'", self.device_batching)
        if self.memory_budget_mb is not None and not (_is_number(self.memory_budget_mb) and self.memory_budget_mb > 0):
            _fail("memory_budget_mb", "a positive number of MiB or null", self.memory_budget_mb)
        if self.max_chunk_size is not None and not (_is_int(self.max_chunk_size) and self.max_chunk_size > 0):
            _fail("max_chunk_size", "a positive integer or null", self.max_chunk_size)
        if not isinstance(self.save_params, bool):
            _fail("save_params", "true or false", self.save_params)

    @property
    def resolved_output_dir(self) -> pathlib.Path:
        return pathlib.Path(self.output_dir) if self.output_dir else pathlib.Path("results") / "sweeps" / self.name


def load_config(path: PathLike, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read and validate a sweep YAML file; `overrides` like `["steps=50", "grid.seeds=[0,1]"]`."""
    return config_lib.from_dict(SweepConfig, config_lib.load_yaml(path), overrides=overrides)


# Settings that do not change any number in the results (so a resumed sweep may change them).
_RUNTIME_ONLY = ("memory_budget_mb", "max_chunk_size", "output_dir", "device_batching")


def fingerprint(config: SweepConfig) -> str:
    """A hash of every setting that changes results; saved chunks must carry the running sweep's fingerprint."""
    content = {k: v for k, v in config_lib.to_dict(config).items() if k not in _RUNTIME_ONLY}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the grid

class GroupKey(NamedTuple):
    """The static structure shared by one compiled program: what fixes shapes and the traced computation."""

    dataset: str
    width: Optional[int]  # None: the preprocessed features as they are
    loss: str
    model: str
    depth: Optional[int]  # deep_linear only
    sigma: Optional[str]  # delm only

    @property
    def label(self) -> str:
        parts = [self.dataset, "features" if self.width is None else f"m{self.width}", self.loss, self.model]
        if self.depth is not None:
            parts.append(f"depth{self.depth}")
        if self.sigma is not None:
            parts.append(self.sigma)
        return "/".join(parts)

    @property
    def slug(self) -> str:
        return hashlib.sha1(repr(tuple(self)).encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One point of the grid. `config_id` is its index in `expand_grid`'s order (stable for a given config)."""

    config_id: int
    dataset: str
    width: Optional[int]
    loss: str
    model: str
    depth: Optional[int]
    sigma: Optional[str]
    gamma: Optional[float]
    learning_rate: float
    seed: int

    @property
    def group(self) -> GroupKey:
        return GroupKey(self.dataset, self.width, self.loss, self.model, self.depth, self.sigma)


def expand_grid(config: SweepConfig) -> list[Configuration]:
    """Every configuration of the sweep, seeds innermost (so a setting's seeds are adjacent)."""
    g = config.grid
    structures: list[tuple[str, Optional[int], Optional[str], Optional[float]]] = []
    for model in g.models:
        if model == "delm":
            structures += [("delm", None, s, gm) for s in g.sigmas for gm in g.gammas]
        elif model == "linear":
            structures.append(("linear", None, None, None))
        else:
            structures += [("deep_linear", d, None, None) for d in g.depths]
    out: list[Configuration] = []
    for ds, width, loss, (model, depth, sigma, gamma), lr, seed in itertools.product(
            [d.key for d in config.datasets], g.widths, g.losses, structures, g.learning_rates, g.seeds):
        out.append(Configuration(len(out), ds, width, loss, model, depth, sigma,
                                 None if gamma is None else float(gamma), float(lr), int(seed)))
    if not out:
        raise SweepError("the sweep's grid is empty: no configuration to run")
    return out


def group_configurations(configurations: Iterable[Configuration]) -> dict[GroupKey, list[Configuration]]:
    """Configurations grouped by static structure (`GroupKey`), in order of first appearance."""
    groups: dict[GroupKey, list[Configuration]] = {}
    for c in configurations:
        groups.setdefault(c.group, []).append(c)
    return groups


# ----------------------------------------------------------------------------- data

class FeatureData(NamedTuple):
    """Features and labels of one (dataset, width): float arrays in the sweep's dtype, int32 labels."""

    phi_train: np.ndarray  # (n, m)
    labels_train: np.ndarray  # (n,)
    phi_test: np.ndarray  # (n_test, m)
    labels_test: np.ndarray  # (n_test,)
    num_classes: int
    info: dict

    def targets(self, loss: str, split: str = "train") -> np.ndarray:
        """Square loss: one-hot rows in the features' dtype; cross-entropy: the integer labels."""
        labels = self.labels_train if split == "train" else self.labels_test
        if loss == "square":
            return data_lib.one_hot(labels, self.num_classes).astype(self.phi_train.dtype)
        return labels


def load_datasets(config: SweepConfig) -> dict[str, data_lib.Preprocessed]:
    """Every data set of the sweep, loaded and preprocessed (before anything is compiled)."""
    out = {}
    for spec in config.datasets:
        ds = data_lib.load_dataset(spec.name, data_dir=spec.data_dir, download=spec.download)
        out[spec.key] = data_lib.preprocess(ds, n_train=spec.n_train, n_test=spec.n_test, features=spec.features,
                                            pca_dim=spec.pca_dim, add_bias=spec.add_bias, seed=spec.seed)
    return out


def prepare_features(pre: data_lib.Preprocessed, width: Optional[int], dtype: Any,
                     projection_seed: int = 0) -> FeatureData:
    """`phi` for one width: the preprocessed features cast to `dtype`, or their fixed random projection
    `x @ P`, `P = random_projection(PRNGKey(projection_seed), d, width)` (the same P for train and test)."""
    x_train = jnp.asarray(pre.x_train, dtype)
    x_test = jnp.asarray(pre.x_test, dtype)
    info = dict(pre.info)
    if width is not None:
        P = random_projection(jax.random.PRNGKey(projection_seed), x_train.shape[1], width, dtype)
        x_train, x_test = features(x_train, P), features(x_test, P)
        info.update(projection_width=width, projection_seed=projection_seed)
    return FeatureData(np.asarray(x_train), np.asarray(pre.y_train, np.int32), np.asarray(x_test),
                       np.asarray(pre.y_test, np.int32), int(pre.num_classes), info)


def shallow_square_optimum(phi: np.ndarray, targets: np.ndarray) -> float:
    """`L* = min_W (1/n) sum_i 1/2 |W phi_i - y_i|^2`, the shallow (hence also the DELM's) optimum on these
    features: `deq_jax.theory.shallow_optimum_square`, evaluated in float64 (x64 enabled for this call only, so
    that gaps of float32 runs are not limited by the optimum's own rounding)."""
    with jax.enable_x64(True):
        _, L_star = theory.shallow_optimum_square(np.asarray(phi, np.float64), np.asarray(targets, np.float64))
        return float(L_star)


# ----------------------------------------------------------------------------- memory

def _model_dims(config: SweepConfig, key: GroupKey, width: int, out_dim: int) -> list[tuple[int, int]]:
    if key.model == "delm":
        return [(width, width), (out_dim, width)]
    if key.model == "linear":
        return [(out_dim, width)]
    return models.DeepLinear(width, out_dim, depth=key.depth, hidden=config.deep_linear.hidden).shapes()


def estimate_config_bytes(config: SweepConfig, key: GroupKey, *, n_train: int, n_test: int, width: int,
                          out_dim: int) -> int:
    """Working memory of one configuration (bytes), by a stated formula, times `SAFETY_FACTOR`.

    With `P` parameters, `n` train and `n_t` test rows, width `m`, `m_y` outputs and `S` steps, in elements:
    `4 P` (params, gradients, updates, the scan's carry) + `3 n m_y` (predictions, residual, its cotangent)
    + `n_t m_y` (test predictions) + `8 S` (the per-step history) + the model's work space:
    DELM `8 m^2` (sigma(A), U = I - gamma sigma(A), its LU factors, the softmax backward) + `4 s` with the
    solve's state size `s` (`m_y m` transposed, `n m` per sample), plus `(2 h + 4) s` for an iterative solver
    (Anderson history `h` = 5) and `maxiter s` for unrolled differentiation; deep linear `2 n h_k` per layer
    (activations kept for the backward pass). Checked against XLA's `memory_analysis()` after compiling.
    """
    itemsize = np.dtype(config.dtype).itemsize
    P = sum(a * b for a, b in _model_dims(config, key, width, out_dim))
    n, m, m_y, S = n_train, width, out_dim, config.steps
    work = 0
    if key.model == "delm":
        state = m_y * m if config.delm.formulation == "transposed" else n * m
        work = 8 * m * m + 4 * state
        if config.delm.solver != "direct":
            work += (2 * 5 + 4) * state
            if config.delm.backward == "unrolled":
                work += config.delm.maxiter * state
    elif key.model == "deep_linear":
        work = sum(2 * n * rows for rows, _ in _model_dims(config, key, width, out_dim))
    elements = 4 * P + 3 * n * m_y + n_test * m_y + 8 * S + work
    return int(SAFETY_FACTOR * elements * itemsize)


def data_bytes(config: SweepConfig, loss: str, *, n_train: int, n_test: int, width: int,
               out_dim: int) -> int:
    """Bytes of the data every device holds (replicated): features, targets (one-hot for the square loss, int32
    labels for cross-entropy) and int32 labels, of both splits."""
    itemsize = np.dtype(config.dtype).itemsize
    targets = out_dim * itemsize if loss == "square" else 4
    return int((n_train + n_test) * (width * itemsize + targets + 4))


def resolve_budget_bytes(config: SweepConfig, devices: Sequence[Any]) -> tuple[int, str]:
    """The per-device memory budget in bytes and where it came from."""
    if config.memory_budget_mb is not None:
        return int(config.memory_budget_mb * 2**20), "memory_budget_mb"
    try:
        stats = devices[0].memory_stats()
    except Exception:  # not every backend implements memory_stats (CPU raises or returns None)
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(0.5 * stats["bytes_limit"]), "half of the device's bytes_limit"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(0.25 * total / max(1, jax.local_device_count())), "a quarter of host RAM per local device"


def plan_chunk_size(n_configs: int, per_config: int, shared: int, budget: int, n_devices: int, *,
                    max_chunk_size: Optional[int] = None, what: str = "the sweep") -> int:
    """Configurations per chunk: a multiple of `n_devices`, at most what fits `budget` bytes per device after the
    replicated `shared` bytes, and no larger than needed for `n_configs`. Raises `SweepMemoryError` when not
    even one configuration per device fits."""
    per_device = (budget - shared) // per_config if budget > shared else 0
    if per_device < 1:
        raise SweepMemoryError(
            f"{what}: one configuration needs about {_mib(per_config)} (estimate) plus {_mib(shared)} of data per "
            f"device, above the memory budget of {_mib(budget)} per device; raise memory_budget_mb, use fewer "
            f"samples (n_train) or a smaller width")
    per_device = min(per_device, -(-n_configs // n_devices))
    if max_chunk_size is not None:
        per_device = min(per_device, max(1, max_chunk_size // n_devices))
    return int(per_device * n_devices)


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3g} MiB"


def measured_bytes(compiled: Any) -> Optional[int]:
    """Per-device bytes XLA reports for a compiled program (arguments + outputs + temporaries - aliased)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if ma is None:
        return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes + ma.generated_code_size_in_bytes)


# ----------------------------------------------------------------------------- the compiled program

def build_model(config: SweepConfig, key: GroupKey, width: int, out_dim: int, gamma: Any = None) -> models.Model:
    """The model of a group; `gamma` (DELM only) may be a concrete number or a traced value."""
    if key.model == "delm":
        o = config.delm
        return models.DELM(width=width, out_dim=out_dim, gamma=gamma, sigma=key.sigma, formulation=o.formulation,
                           solver=o.solver, backward=o.backward, tol=o.tol, maxiter=o.maxiter,
                           precision=o.precision, init_scale=o.init_scale)
    if key.model == "linear":
        return models.Linear(width=width, out_dim=out_dim, init_scale=config.linear.init_scale)
    return models.DeepLinear(width=width, out_dim=out_dim, depth=key.depth, hidden=config.deep_linear.hidden,
                             init_gain=config.deep_linear.init_gain)


def logged_steps(config: SweepConfig) -> np.ndarray:
    """Steps with a row in the table, besides the final step `steps`: 0, log_every, ... (< steps)."""
    return np.arange(0, config.steps, config.log_every)


def _solver_fields(stats: Any, dtype: Any) -> dict:
    if stats is None:  # explicit models: nothing solved
        return {"iterations": jnp.zeros((), jnp.int32), "relative_residual": jnp.zeros((), dtype),
                "converged": jnp.ones((), bool)}
    return {"iterations": stats.iterations, "relative_residual": stats.relative_residual,
            "converged": stats.converged}


def train_one_fn(config: SweepConfig, key: GroupKey, width: int, out_dim: int) -> Callable:
    """`train_one(rng, learning_rate, gamma, phi, y, labels, phi_test, y_test, labels_test) -> outputs`: one
    configuration of the group through the main job's code path, returning the logged history and final metrics.
    Pure, so `jax.vmap` batches it over (rng, learning_rate, gamma)."""
    dtype = jnp.dtype(config.dtype)
    log_idx = logged_steps(config)
    loss_fn = losses_lib.get_loss(key.loss)

    def train_one(rng, learning_rate, gamma, phi, y, labels, phi_test, y_test, labels_test):
        model = build_model(config, key, width, out_dim, gamma if key.model == "delm" else None)
        params = model.init(rng, dtype)
        # full_batch_gd would build optax.sgd(learning_rate) itself, but checks that the rate is a concrete
        # positive number; here it is traced (vmapped), so the same optimizer is passed in explicitly.
        params, history = train.full_batch_gd(model, key.loss, params, phi, y, learning_rate=1.0,
                                              steps=config.steps, optimizer=optax.sgd(learning_rate))
        (loss, stats), grads = jax.value_and_grad(train.objective(model, key.loss), has_aux=True)(params, phi, y)
        final = _solver_fields(stats, dtype)
        predictions, _ = model.apply(params, phi)
        predictions_test, _ = model.apply(params, phi_test)
        out = {
            "log_loss": history["loss"][log_idx],
            "log_grad_norm": history["grad_norm"][log_idx],
            "log_iterations": history["iterations"][log_idx],
            "log_relative_residual": history["relative_residual"][log_idx],
            "log_converged": history["converged"][log_idx],
            "final_loss": loss,
            "final_grad_norm": optax.tree.norm(grads),
            "final_iterations": final["iterations"],
            "final_relative_residual": final["relative_residual"],
            "final_converged": final["converged"],
            "train_accuracy": jnp.mean(jnp.argmax(predictions, axis=-1) == labels),
            "test_loss": loss_fn(predictions_test, y_test),
            "test_accuracy": jnp.mean(jnp.argmax(predictions_test, axis=-1) == labels_test),
            "nonconverged_steps": jnp.sum(~history["converged"]) + jnp.sum(~final["converged"]),
            "max_relative_residual": jnp.maximum(jnp.max(history["relative_residual"]), final["relative_residual"]),
        }
        if config.save_params:
            out["params"] = params
        return out

    return train_one


def device_batching(config: SweepConfig, devices: Sequence[Any]) -> str:
    """How each device runs its share of a chunk: `"vmap"` (one batched program) or `"map"` (`lax.map`, one
    configuration after another). `"auto"` is `"map"` on CPU meshes of several devices: jaxlib 0.10's batched
    LAPACK kernels (the DELM's LU solve) split their batch over XLA's intra-op thread pool and block on it, which
    deadlocks once as many devices as the pool has threads do so at once (measured: 2 forced host devices on
    2 cores, m = 64); unbatched calls do not split. Elsewhere (one device, GPUs, TPUs) `"auto"` is `"vmap"`."""
    if config.device_batching != "auto":
        return config.device_batching
    return "map" if len(devices) > 1 and devices[0].platform == "cpu" else "vmap"


def make_group_program(config: SweepConfig, key: GroupKey, width: int, out_dim: int, mesh: Mesh,
                       batching: str = "vmap") -> Callable:
    """The group's program: `jit(shard_map(local))`, the configuration axis split over `mesh` (each device gets
    a contiguous block) and the data replicated; `local` runs a device's block with `vmap` or `lax.map`
    (`batching`). Arguments: keys, learning rates, gammas (one row per configuration), then the data."""
    train_one = train_one_fn(config, key, width, out_dim)
    if batching == "vmap":
        local = jax.vmap(train_one, in_axes=(0, 0, 0) + (None,) * 6)
    elif batching == "map":
        def local(keys, learning_rates, gammas, *data):
            return jax.lax.map(lambda c: train_one(*c, *data), (keys, learning_rates, gammas))
    else:
        raise ValueError(f"batching must be 'vmap' or 'map'; got {batching!r}")
    specs = (PartitionSpec(CONFIG_AXIS),) * 3 + (PartitionSpec(),) * 6
    sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(CONFIG_AXIS))
    return jax.jit(sharded, in_shardings=tuple(NamedSharding(mesh, spec) for spec in specs),
                   out_shardings=NamedSharding(mesh, PartitionSpec(CONFIG_AXIS)))


# Compiled programs of recent sweeps (e.g. a resumed sweep in the same process), keyed by everything that shapes
# the program: the settings below, the group, the shapes and the devices. Few entries: executables hold memory.
_PROGRAM_CACHE: dict[tuple, Any] = {}
_PROGRAM_CACHE_SIZE = 16


def _program_signature(config: SweepConfig) -> str:
    fields = ("steps", "log_every", "dtype", "delm", "linear", "deep_linear", "save_params", "device_batching")
    return json.dumps({f: config_lib.to_dict(getattr(config, f)) for f in fields}, sort_keys=True)


def _cache_program(cache_key: tuple, compiled: Any) -> None:
    while len(_PROGRAM_CACHE) >= _PROGRAM_CACHE_SIZE:
        _PROGRAM_CACHE.pop(next(iter(_PROGRAM_CACHE)))
    _PROGRAM_CACHE[cache_key] = compiled


def _global_array(host: np.ndarray, sharding: NamedSharding) -> Array:
    # every process holds the whole host array; each device takes its slice (works on one host or many)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _to_host(tree: Any) -> Any:
    def fetch(x):
        if x.is_fully_addressable:
            return np.asarray(x)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree_util.tree_map(fetch, tree)


# ----------------------------------------------------------------------------- chunk files (resume)

def _atomic_write_bytes(path: pathlib.Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        with __import__("contextlib").suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _chunk_path(output_dir: pathlib.Path, key: GroupKey, ids: Sequence[int]) -> pathlib.Path:
    digest = hashlib.sha1(np.asarray(ids, np.int64).tobytes()).hexdigest()[:12]
    return output_dir / "chunks" / f"chunk-{key.slug}-{digest}.npz"


def _save_chunk(path: pathlib.Path, fp: str, ids: Sequence[int], outputs: dict) -> None:
    arrays = {"config_ids": np.asarray(ids, np.int64), "fingerprint": np.asarray(fp)}
    for name, value in outputs.items():
        if name == "params":
            for i, leaf in enumerate(jax.tree_util.tree_leaves(value)):
                arrays[f"param_{i}"] = leaf
        else:
            arrays[name] = value
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _atomic_write_bytes(path, buffer.getvalue())


def _load_chunks(output_dir: pathlib.Path, fp: str) -> tuple[dict[int, dict], dict[str, int]]:
    """Per-configuration outputs of every saved chunk, and the number of chunk files per group slug.
    A chunk of another sweep is an error."""
    done: dict[int, dict] = {}
    files_per_group: dict[str, int] = {}
    for path in sorted((output_dir / "chunks").glob("chunk-*.npz")):
        with np.load(path) as z:
            got = str(z["fingerprint"])
            if got != fp:
                raise SweepError(
                    f"{path} holds results of a different sweep (fingerprint {got}, this sweep {fp}); use another "
                    f"output_dir or start afresh (--fresh / resume=False)")
            arrays = {k: z[k] for k in z.files if k not in ("config_ids", "fingerprint")}
            for row, cid in enumerate(z["config_ids"].tolist()):
                done[int(cid)] = {k: v[row] for k, v in arrays.items()}
        slug = path.name.split("-")[1]
        files_per_group[slug] = files_per_group.get(slug, 0) + 1
    return done, files_per_group


# ----------------------------------------------------------------------------- results

ROW_COLUMNS = (
    "sweep", "config_id", "group", "dataset", "width", "projected", "model", "depth", "sigma", "gamma", "loss",
    "learning_rate", "seed", "dtype", "formulation", "solver", "steps",
    "step", "final", "train_loss", "L_star", "gap", "grad_norm",
    "solver_iterations", "relative_residual", "converged",
    "train_accuracy", "test_loss", "test_accuracy",
    "nonconverged_steps", "max_relative_residual", "diverged",
)
"""Columns of `results.csv` / `results.jsonl`. `gap = train_loss - L_star` (square loss; empty for cross-entropy,
whose infimum may be unattained on separable data); `train_accuracy`, `test_loss`, `test_accuracy` are filled on
the final row only; `nonconverged_steps` and `max_relative_residual` summarise every solve of the run;
`diverged`: the final loss is not finite."""

SETTING_COLUMNS = ("dataset", "width", "projected", "model", "depth", "sigma", "gamma", "loss", "learning_rate")
AGGREGATE_COLUMNS = SETTING_COLUMNS + (
    "n_seeds", "train_loss_mean", "train_loss_std", "train_loss_min", "train_loss_max", "gap_mean", "gap_std",
    "test_accuracy_mean", "test_accuracy_std", "test_loss_mean", "test_loss_std", "nonconverged_runs",
    "diverged_runs",
)
"""Columns of `aggregate.csv`: one row per setting (every hyperparameter except the seed), statistics of the final
step across seeds (std with ddof = 0)."""


@dataclasses.dataclass
class GroupReport:
    """What happened to one group of configurations."""

    label: str
    key: GroupKey
    width: int
    n_configs: int
    chunk_size: int = 0
    chunks_computed: int = 0
    chunks_skipped: int = 0
    configs_skipped: int = 0
    estimated_bytes_per_config: int = 0
    data_bytes: int = 0
    estimated_bytes_per_device: int = 0  # data + chunk_size / devices configurations, by the formula
    measured_bytes_per_device: Optional[int] = None
    compile_s: float = 0.0
    run_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class ChunkReport:
    """Passed to `run_sweep`'s `on_chunk` callback after a chunk's results are saved."""

    group: str
    config_ids: tuple[int, ...]
    path: Optional[pathlib.Path]
    seconds: float


@dataclasses.dataclass
class SweepResult:
    config: SweepConfig
    output_dir: pathlib.Path
    configurations: list[Configuration]
    rows: list[dict]
    aggregate: list[dict]
    groups: list[GroupReport]
    chunks_computed: int
    chunks_skipped: int
    devices: list[str]
    budget_bytes: int
    budget_source: str
    device_batching: str
    wall_s: float
    files: dict[str, pathlib.Path]
    final_params: Optional[dict[int, Any]] = None
    environment: dict = dataclasses.field(default_factory=dict)


def environment() -> dict:
    """Versions and hardware, recorded with every sweep."""
    import jaxlib
    devices = jax.devices()
    return {
        "python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "numpy": np.__version__, "optax": optax.__version__, "platform": devices[0].platform,
        "device_kind": devices[0].device_kind, "device_count": len(devices),
        "local_device_count": jax.local_device_count(), "process_count": jax.process_count(),
        "cpu": _cpu_model(), "machine": platform.machine(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"), "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _num(x: Any) -> Optional[float]:
    value = float(x)
    return value if math.isfinite(value) else None


def _rows_for(config: SweepConfig, c: Configuration, width: int, out: dict, L_star: Optional[float]) -> list[dict]:
    base = {
        "sweep": config.name, "config_id": c.config_id, "group": c.group.label, "dataset": c.dataset,
        "width": width, "projected": c.width is not None, "model": c.model, "depth": c.depth, "sigma": c.sigma,
        "gamma": c.gamma, "loss": c.loss, "learning_rate": c.learning_rate, "seed": c.seed, "dtype": config.dtype,
        "formulation": config.delm.formulation if c.model == "delm" else None,
        "solver": config.delm.solver if c.model == "delm" else None, "steps": config.steps,
        "L_star": L_star, "nonconverged_steps": int(out["nonconverged_steps"]),
        "max_relative_residual": _num(out["max_relative_residual"]),
        "diverged": not math.isfinite(float(out["final_loss"])),
    }
    empty = {"train_accuracy": None, "test_loss": None, "test_accuracy": None}

    def gap(loss: Optional[float]) -> Optional[float]:
        return None if (L_star is None or loss is None) else loss - L_star

    rows = []
    for j, step in enumerate(logged_steps(config).tolist()):
        loss = _num(out["log_loss"][j])
        rows.append({**base, "step": step, "final": False, "train_loss": loss, "gap": gap(loss),
                     "grad_norm": _num(out["log_grad_norm"][j]), "solver_iterations": int(out["log_iterations"][j]),
                     "relative_residual": _num(out["log_relative_residual"][j]),
                     "converged": bool(out["log_converged"][j]), **empty})
    loss = _num(out["final_loss"])
    if loss is None:  # a diverged run: argmax of NaN predictions is no accuracy
        out = {**out, "train_accuracy": np.nan, "test_accuracy": np.nan}
    rows.append({**base, "step": config.steps, "final": True, "train_loss": loss, "gap": gap(loss),
                 "grad_norm": _num(out["final_grad_norm"]), "solver_iterations": int(out["final_iterations"]),
                 "relative_residual": _num(out["final_relative_residual"]),
                 "converged": bool(out["final_converged"]), "train_accuracy": _num(out["train_accuracy"]),
                 "test_loss": _num(out["test_loss"]), "test_accuracy": _num(out["test_accuracy"])})
    return [{k: row[k] for k in ROW_COLUMNS} for row in rows]


def _stats(values: list[Optional[float]]) -> tuple[Optional[float], ...]:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return None, None, None, None
    return float(v.mean()), float(v.std()), float(v.min()), float(v.max())


def aggregate(rows: Sequence[Mapping]) -> list[dict]:
    """One row per setting (`SETTING_COLUMNS`): final-step statistics across seeds (`AGGREGATE_COLUMNS`).
    Missing values (diverged runs, cross-entropy gaps) are left out of the statistics and counted."""
    settings: dict[tuple, list[Mapping]] = {}
    for row in rows:
        if row["final"]:
            settings.setdefault(tuple(row[k] for k in SETTING_COLUMNS), []).append(row)
    out = []
    for setting, group in settings.items():
        loss = _stats([r["train_loss"] for r in group])
        gap = _stats([r["gap"] for r in group])
        acc = _stats([r["test_accuracy"] for r in group])
        test_loss = _stats([r["test_loss"] for r in group])
        out.append({**dict(zip(SETTING_COLUMNS, setting)), "n_seeds": len(group),
                    "train_loss_mean": loss[0], "train_loss_std": loss[1], "train_loss_min": loss[2],
                    "train_loss_max": loss[3], "gap_mean": gap[0], "gap_std": gap[1],
                    "test_accuracy_mean": acc[0], "test_accuracy_std": acc[1],
                    "test_loss_mean": test_loss[0], "test_loss_std": test_loss[1],
                    "nonconverged_runs": sum(r["nonconverged_steps"] > 0 for r in group),
                    "diverged_runs": sum(bool(r["diverged"]) for r in group)})
    return out


def curves(rows: Sequence[Mapping], metric: str = "gap") -> dict[tuple, dict[str, np.ndarray]]:
    """Per setting: `step`, and the `metric`'s `mean`, `std`, `min`, `max` across seeds at each logged step."""
    per: dict[tuple, dict[int, list[float]]] = {}
    for row in rows:
        value = row[metric]
        steps = per.setdefault(tuple(row[k] for k in SETTING_COLUMNS), {})
        steps.setdefault(row["step"], []).append(np.nan if value is None else value)
    out = {}
    for setting, steps in per.items():
        order = sorted(steps)
        values = [np.asarray(steps[s], np.float64) for s in order]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps (diverged seeds) stay NaN
            out[setting] = {"step": np.asarray(order), "mean": np.array([np.nanmean(v) for v in values]),
                            "std": np.array([np.nanstd(v) for v in values]),
                            "min": np.array([np.nanmin(v) for v in values]),
                            "max": np.array([np.nanmax(v) for v in values])}
    return out


def _csv_text(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[k] is None else row[k] for k in columns])
    return buffer.getvalue()


def write_tables(rows: Sequence[Mapping], output_dir: PathLike) -> dict[str, pathlib.Path]:
    """`results.csv` (missing values empty), `results.jsonl` (missing values null) and `aggregate.csv`,
    each written atomically."""
    output_dir = pathlib.Path(output_dir)
    files = {"csv": output_dir / "results.csv", "jsonl": output_dir / "results.jsonl",
             "aggregate": output_dir / "aggregate.csv"}
    _atomic_write_bytes(files["csv"], _csv_text(rows, ROW_COLUMNS).encode())
    _atomic_write_bytes(files["jsonl"], "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows).encode())
    _atomic_write_bytes(files["aggregate"], _csv_text(aggregate(rows), AGGREGATE_COLUMNS).encode())
    return files


# ----------------------------------------------------------------------------- the driver

def _chunks(ids: Sequence[int], size: int) -> list[list[int]]:
    return [list(ids[i:i + size]) for i in range(0, len(ids), size)]


def _broadcast_done(mask: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return mask
    from jax.experimental import multihost_utils  # process 0's view of the saved chunks is everyone's
    return np.asarray(multihost_utils.broadcast_one_to_all(mask))


def _progress(total: int, initial: int, name: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional dependency ('experiments' extra)
        warnings.warn("progress=True needs tqdm (pip install tqdm); running without a progress bar", stacklevel=3)
        return None
    return tqdm(total=total, initial=initial, unit="chunk", desc=f"sweep {name}", dynamic_ncols=True)


def run_sweep(config: SweepConfig, *, output_dir: Optional[PathLike] = None, resume: bool = True,
              progress: bool = True, on_chunk: Optional[Callable[[ChunkReport], None]] = None,
              devices: Optional[Sequence[Any]] = None, max_recompiles: int = 4) -> SweepResult:
    """Run every configuration of `config`, one compiled vmapped program per group, chunked and sharded.

    Args:
      config: a validated `SweepConfig` (see `load_config`).
      output_dir: where chunk files and tables go (default `config.resolved_output_dir`).
      resume: skip configurations already saved in `output_dir/chunks`; False deletes those chunk files first.
      progress: one tqdm bar for the whole sweep (chunks done, configurations per second); process 0 only.
      on_chunk: called with a `ChunkReport` after each computed chunk has been saved.
      devices: the devices of the mesh (default `jax.devices()`, every device of every process).
      max_recompiles: how often a group's chunk may be shrunk after XLA's memory analysis exceeds the budget.

    Returns:
      `SweepResult` with the rows (`ROW_COLUMNS`), the per-setting aggregate, per-group reports and file paths.
      On processes other than 0 of a multi-host run, rows, aggregate and files are empty (process 0 writes).

    Raises (all before anything is compiled): `ConfigError`/`ValueError` for invalid settings, `SweepError` for
    an empty grid or an output directory holding another sweep's chunks, `SweepMemoryError` when one
    configuration per device does not fit the budget.
    """
    start = time.perf_counter()
    if not isinstance(config, SweepConfig):
        raise TypeError(f"config must be a SweepConfig (see load_config); got {type(config).__name__}")
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise SweepError("dtype 'float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 or "
                         "jax.config.update('jax_enable_x64', True) before running the sweep")
    configurations = expand_grid(config)
    groups = group_configurations(configurations)
    devices = list(jax.devices() if devices is None else devices)
    n_dev = len(devices)
    budget, budget_source = resolve_budget_bytes(config, devices)
    writer = jax.process_index() == 0
    output_dir = pathlib.Path(output_dir) if output_dir is not None else config.resolved_output_dir
    fp = fingerprint(config)
    dtype = jnp.dtype(config.dtype)

    # memory plans for every group from the data's shapes, before any JAX computation
    preprocessed = load_datasets(config)
    specs = {d.key: d for d in config.datasets}
    reports: dict[GroupKey, GroupReport] = {}
    for key, members in groups.items():
        pre = preprocessed[key.dataset]
        shapes = dict(n_train=pre.x_train.shape[0], n_test=pre.x_test.shape[0], out_dim=int(pre.num_classes),
                      width=pre.x_train.shape[1] if key.width is None else key.width)
        est = estimate_config_bytes(config, key, **shapes)
        shared = data_bytes(config, key.loss, **shapes)
        report = GroupReport(key.label, key, shapes["width"], len(members), estimated_bytes_per_config=est,
                             data_bytes=shared)
        report.chunk_size = plan_chunk_size(len(members), est, shared, budget, n_dev,
                                            max_chunk_size=config.max_chunk_size, what=f"group {key.label}")
        report.estimated_bytes_per_device = shared + est * report.chunk_size // n_dev
        reports[key] = report

    # finished chunks (process 0 reads, everyone agrees)
    if writer and not resume:
        for path in (output_dir / "chunks").glob("chunk-*.npz"):
            path.unlink()
    done, files_per_group = _load_chunks(output_dir, fp) if (writer and resume) else ({}, {})
    mask = np.zeros(len(configurations), bool)
    mask[list(done)] = True
    skipped = set(np.flatnonzero(_broadcast_done(mask)).tolist())

    # features (a random projection where a width is given) and L* per (dataset, width)
    feature_data: dict[tuple, FeatureData] = {}
    L_stars: dict[tuple, Optional[float]] = {}
    for key in groups:
        fkey = (key.dataset, key.width)
        if fkey not in feature_data:
            feature_data[fkey] = prepare_features(preprocessed[key.dataset], key.width, dtype,
                                                  specs[key.dataset].projection_seed)
        if (fkey, key.loss) not in L_stars:
            fd = feature_data[fkey]
            L_stars[(fkey, key.loss)] = (shallow_square_optimum(fd.phi_train, fd.targets("square"))
                                         if key.loss == "square" else None)

    todo: dict[GroupKey, list[int]] = {}
    for key, members in groups.items():
        reports[key].configs_skipped = sum(c.config_id in skipped for c in members)
        reports[key].chunks_skipped = files_per_group.get(key.slug, 0)
        todo[key] = [c.config_id for c in members if c.config_id not in skipped]

    def chunks_left() -> int:  # chunks still to compute, at the current chunk sizes
        return sum(len(_chunks(ids[reports[k].chunks_computed * reports[k].chunk_size:], reports[k].chunk_size))
                   for k, ids in todo.items())

    skipped_chunks = sum(r.chunks_skipped for r in reports.values())
    bar = _progress(chunks_left() + skipped_chunks, skipped_chunks, config.name, progress and writer)

    mesh = Mesh(np.asarray(devices), (CONFIG_AXIS,))
    batching = device_batching(config, devices)
    per_config = NamedSharding(mesh, PartitionSpec(CONFIG_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    key_proto = np.asarray(jax.random.PRNGKey(0))  # shape and dtype of a PRNG key under the default impl
    by_id = {c.config_id: c for c in configurations}
    computed = 0
    configs_done = 0
    run_start = time.perf_counter()
    try:
        for key, ids in todo.items():
            if not ids:
                continue
            report = reports[key]
            fd = feature_data[(key.dataset, key.width)]
            host_data = [fd.phi_train, fd.targets(key.loss), fd.labels_train,
                         fd.phi_test, fd.targets(key.loss, "test"), fd.labels_test]
            data_args = [_global_array(a, replicated) for a in host_data]
            program = make_group_program(config, key, report.width, fd.num_classes, mesh, batching)
            for attempt in range(max_recompiles + 1):
                size = report.chunk_size
                abstract = [jax.ShapeDtypeStruct((size,) + key_proto.shape, key_proto.dtype, sharding=per_config),
                            jax.ShapeDtypeStruct((size,), dtype, sharding=per_config),
                            jax.ShapeDtypeStruct((size,), dtype, sharding=per_config)]
                abstract += [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated) for a in data_args]
                cache_key = (_program_signature(config), key, report.width, fd.num_classes,
                             tuple((a.shape, str(a.dtype)) for a in abstract), tuple(d.id for d in devices))
                compiled = _PROGRAM_CACHE.get(cache_key)
                if compiled is None:
                    t0 = time.perf_counter()
                    compiled = program.lower(*abstract).compile()
                    report.compile_s += time.perf_counter() - t0
                    _cache_program(cache_key, compiled)
                measured = report.measured_bytes_per_device = measured_bytes(compiled)
                if measured is None or measured <= budget:
                    break
                per_device = size // n_dev
                if per_device == 1 or attempt == max_recompiles:
                    raise SweepMemoryError(
                        f"group {key.label}: XLA reports {_mib(measured)} per device for {per_device} "
                        f"configuration(s) per device, above the memory budget of {_mib(budget)}; raise "
                        f"memory_budget_mb, use fewer samples or a smaller width")
                # scale the configurations per device by the measured overshoot (data stay replicated)
                shrunk = int(per_device * (budget - report.data_bytes) / max(1, measured - report.data_bytes))
                report.chunk_size = max(1, min(per_device - 1, shrunk)) * n_dev
                report.estimated_bytes_per_device = (report.data_bytes + report.estimated_bytes_per_config
                                                     * report.chunk_size // n_dev)
                if bar is not None:
                    bar.total = bar.n + chunks_left()
                    bar.refresh()
            for chunk in _chunks(ids, report.chunk_size):
                t0 = time.perf_counter()
                padded = chunk + [chunk[-1]] * (report.chunk_size - len(chunk))  # padded rows dropped below
                members = [by_id[i] for i in padded]
                keys = np.stack([np.asarray(jax.random.PRNGKey(c.seed)) for c in members])
                lrs = np.asarray([c.learning_rate for c in members], dtype)
                gammas = np.asarray([0.0 if c.gamma is None else c.gamma for c in members], dtype)  # unused off DELM
                args = [_global_array(keys, per_config), _global_array(lrs, per_config),
                        _global_array(gammas, per_config)] + data_args
                outputs = _to_host(compiled(*args))
                outputs = jax.tree_util.tree_map(lambda a: a[:len(chunk)], outputs)
                seconds = time.perf_counter() - t0
                report.run_s += seconds
                path = None
                if writer:
                    path = _chunk_path(output_dir, key, chunk)
                    _save_chunk(path, fp, chunk, outputs)
                params_leaves = jax.tree_util.tree_leaves(outputs.pop("params", {}))
                for row, cid in enumerate(chunk):
                    entry = {k: v[row] for k, v in outputs.items()}
                    entry.update({f"param_{i}": leaf[row] for i, leaf in enumerate(params_leaves)})
                    done[cid] = entry
                report.chunks_computed += 1
                computed += 1
                configs_done += len(chunk)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(configs_per_s=f"{configs_done / (time.perf_counter() - run_start):.3g}")
                if on_chunk is not None:
                    on_chunk(ChunkReport(key.label, tuple(chunk), path, seconds))
    finally:
        if bar is not None:
            bar.close()

    # tables (every configuration now has outputs: computed here or loaded from its chunk)
    rows: list[dict] = []
    final_params: Optional[dict[int, Any]] = {} if config.save_params else None
    for key, members in (groups.items() if writer else ()):  # other processes lack the resumed chunks
        fd = feature_data[(key.dataset, key.width)]
        L_star = L_stars[((key.dataset, key.width), key.loss)]
        treedef = None
        if config.save_params:
            model = build_model(config, key, reports[key].width, fd.num_classes, 0.5 if key.model == "delm" else None)
            shapes = jax.eval_shape(lambda k: model.init(k, dtype), jax.random.PRNGKey(0))
            treedef = jax.tree_util.tree_structure(shapes)
        for c in members:
            out = done[c.config_id]
            rows.extend(_rows_for(config, c, reports[key].width, out, L_star))
            if treedef is not None:
                leaves = [out[f"param_{i}"] for i in range(treedef.num_leaves)]
                final_params[c.config_id] = jax.tree_util.tree_unflatten(treedef, leaves)
    files = write_tables(rows, output_dir) if writer else {}
    return SweepResult(
        config=config, output_dir=output_dir, configurations=configurations, rows=rows, aggregate=aggregate(rows),
        groups=list(reports.values()), chunks_computed=computed,
        chunks_skipped=sum(r.chunks_skipped for r in reports.values()),
        devices=[str(d) for d in devices], budget_bytes=budget, budget_source=budget_source,
        device_batching=batching,
        wall_s=time.perf_counter() - start, files=files, final_params=final_params, environment=environment())
