"""Run a sweep: every group of the grid through `deq_jax.parallel`, chunk by chunk, saved as it finishes.

- **Programs.** A group is one `ParallelMap` over `experiments.sweep.programs.train_one_fn`; engines are kept per
  program (`programs.program_key`: the settings, the model structure and the shapes, not the data set's label)
  for the life of the process, so groups of equal structure, every chunk of a group, and a sweep resumed in the
  same process all reuse one compiled program. A group is planned with its full size, so a resumed group keeps
  its chunk size, hence its program.
- **Memory.** Each group's chunk size comes from the per-device budget (`memory_budget_mb`, default
  `deq_jax.parallel.default_budget_bytes`) and the formula `programs.estimate_config_bytes`, checked against XLA's
  `memory_analysis()` (`deq_jax.parallel`). A budget too small for one configuration per device is refused for
  every group before anything is compiled.
- **Resume.** Each finished chunk is saved atomically in `<output_dir>/chunks/` (`experiments.common.io
  .CheckpointStore`, tied to the sweep's `fingerprint`); a restarted sweep skips every configuration found there.
  Chunks of another sweep are an error, not silently mixed in. A run stopped before its first chunk leaves no
  folder behind.
- **Several processes** (`jax.distributed.initialize()` first): the mesh spans every process's devices, process 0
  reads the saved chunks and every process follows its list (`deq_jax.parallel.agree`), every process computes its
  shards and receives all outputs, and only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import shutil
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax import parallel
from experiments.common import env, interrupts, io
from experiments.common.cli import UserError
from experiments.sweep import data as sweep_data
from experiments.sweep import programs, tables
from experiments.sweep.config import SweepConfig, fingerprint
from experiments.sweep.grid import Configuration, GroupKey, expand_grid, group_configurations


class SweepError(UserError):
    """A sweep that cannot run as configured (another sweep's chunks in the output folder, float64 without x64)."""


class SweepMemoryError(SweepError):
    """Even one configuration per device does not fit the memory budget."""


_MEMORY_ADVICE = (
    "raise memory_budget_mb (--set memory_budget_mb=MIB), use fewer samples (datasets[i].n_train) or "
    "a smaller width (grid.widths, datasets[i].pca_dim)"
)


@dataclasses.dataclass
class GroupReport:
    """What happened to one group of configurations (chunking, memory, timing)."""

    label: str
    key: GroupKey
    width: int
    n_configs: int
    chunk_size: int = 0
    chunks_computed: int = 0
    chunks_skipped: int = 0
    configs_skipped: int = 0
    estimated_bytes_per_config: int | None = None
    data_bytes: int = 0
    estimated_bytes_per_device: int | None = None
    measured_bytes_per_device: int | None = None
    programs_compiled: int = 0
    compile_s: float = 0.0
    run_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class ChunkReport:
    """Passed to `run_sweep`'s `on_chunk` after a chunk is computed (and, on process 0, saved)."""

    group: str
    config_ids: tuple[int, ...]
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
    final_params: dict[int, Any] | None = None
    environment: dict = dataclasses.field(default_factory=dict)


# engines (hence compiled programs) by program; few entries, since executables hold memory
_ENGINES: OrderedDict[tuple, parallel.ParallelMap] = OrderedDict()
_ENGINES_KEPT = 16


def _engine(
    config: SweepConfig, key: GroupKey, width: int, out_dim: int, devices: Sequence[Any], compiler_options: dict | None
) -> parallel.ParallelMap:
    options = tuple(sorted((compiler_options or {}).items()))
    cache_key = (programs.program_key(config, key, width, out_dim), tuple(devices), config.device_batching, options)
    engine = _ENGINES.get(cache_key)
    if engine is None:
        fn = programs.train_one_fn(config, key, width, out_dim)
        engine = parallel.ParallelMap(
            fn, devices=devices, batching=config.device_batching, compiler_options=compiler_options
        )
        _ENGINES[cache_key] = engine
        while len(_ENGINES) > _ENGINES_KEPT:
            _ENGINES.popitem(last=False)
    _ENGINES.move_to_end(cache_key)
    return engine


def _chunk_key(key: GroupKey, ids: Sequence[int]) -> str:
    return f"chunk-{key.slug}-{hashlib.sha1(np.asarray(ids, np.int64).tobytes()).hexdigest()[:12]}"


def _flatten(outputs: dict) -> dict[str, np.ndarray]:
    flat = {k: v for k, v in outputs.items() if k != "params"}
    for i, leaf in enumerate(jax.tree_util.tree_leaves(outputs.get("params", {}))):
        flat[f"param_{i}"] = leaf
    return flat


class _Chunks:
    """The chunk store of one output folder, created at the first save (so a run that saves nothing leaves no
    folder) and removed again if this run created it and saved nothing."""

    def __init__(self, output_dir: pathlib.Path, fp: str):
        self.output_dir = output_dir
        self.store = io.CheckpointStore(output_dir / "chunks", elsewhere="another --output-dir")
        self.fp = fp
        self.opened = False
        self.created: list[pathlib.Path] = []

    def discard(self) -> None:
        if self.store.root.exists():
            shutil.rmtree(self.store.root)

    def load(self) -> tuple[dict[int, dict], dict[str, int]]:
        """Per-configuration outputs of every saved chunk, and the number of chunk files per group slug."""
        root = self.store.root
        if not root.exists():
            return {}, {}
        stamp = root / "fingerprint.txt"
        found = stamp.read_text().strip() if stamp.exists() else None
        if found != self.fp:
            if found is None and not any(root.iterdir()):
                return {}, {}
            raise SweepError(
                f"{root} holds results of a different sweep (fingerprint {found or 'missing'}, this sweep "
                f"{self.fp}); pass another --output-dir, or --fresh to discard them"
            )
        self.store.open(self.fp, fresh=False)
        self.opened = True
        done: dict[int, dict] = {}
        per_group: dict[str, int] = {}
        for path in sorted(root.glob("chunk-*.npz")):
            try:
                arrays, meta = self.store.load(path.stem)
                ids = arrays.pop("config_ids")
            except Exception as err:  # a file this version cannot read is not silently skipped
                raise SweepError(
                    f"{path} cannot be read as a sweep chunk ({type(err).__name__}: {err}); "
                    f"pass --fresh to discard the saved chunks"
                ) from None
            for row, cid in enumerate(ids.tolist()):
                done[int(cid)] = {k: v[row] for k, v in arrays.items()}
            per_group[meta.get("group_slug", "")] = per_group.get(meta.get("group_slug", ""), 0) + 1
        return done, per_group

    def save(self, key: GroupKey, ids: Sequence[int], outputs: dict) -> None:
        if not self.opened:
            for folder in (self.output_dir, self.store.root):
                if not folder.exists():
                    self.created.append(folder)
            self.store.open(self.fp, fresh=False)
            self.opened = True
        self.store.save(
            _chunk_key(key, ids),
            {"config_ids": np.asarray(ids, np.int64), **_flatten(outputs)},
            {"group": key.label, "group_slug": key.slug},
        )

    def tidy(self) -> None:
        """Remove the folders this run created if it saved no chunk in them."""
        root = self.store.root
        if root in self.created and not any(root.glob("*.npz")):
            shutil.rmtree(root, ignore_errors=True)
        if self.output_dir in self.created and self.output_dir.exists() and not any(self.output_dir.iterdir()):
            self.output_dir.rmdir()


def _progress(total: int, initial: int, name: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm  # optional: only where a bar is drawn
    except ImportError:  # tqdm is in the 'experiments' extra
        warnings.warn("progress=True needs tqdm (pip install tqdm); running without a progress bar", stacklevel=3)
        return None
    return tqdm(total=total, initial=initial, unit="chunk", desc=f"sweep {name}", dynamic_ncols=True)


def run_sweep(
    config: SweepConfig,
    *,
    output_dir: Any | None = None,
    resume: bool = True,
    progress: bool = True,
    on_chunk: Callable[[ChunkReport], None] | None = None,
    devices: Sequence[Any] | None = None,
    max_recompiles: int = 4,
    compiler_options: dict | None = None,
    log: Callable[[str], None] | None = None,
    write_tables: bool = True,
) -> SweepResult:
    """Run every configuration of `config`, one compiled program per group structure, chunked and sharded.

    Args:
      config: a validated `SweepConfig` (`experiments.sweep.config.load_config`).
      output_dir: where chunks and tables go (default `config.resolved_output_dir`).
      resume: skip configurations saved in `output_dir/chunks`; False discards those chunks first.
      progress: one progress bar (chunks) on process 0.
      on_chunk: called on every process with a `ChunkReport` after each computed chunk (saved on process 0).
      devices: the mesh's devices (default `jax.devices()`, every device of every process).
      max_recompiles: how often a group's chunk may shrink after XLA's memory analysis exceeds the budget.
      compiler_options: XLA options for the groups' programs (`deq_jax.parallel.ParallelMap`); they change speed,
        not results.
      log: called on process 0 with one line when the data are ready and the computing starts.
      write_tables: write the tables (`experiments.sweep.tables.write_tables`) into `output_dir` on process 0; the
        command writes them itself, together with the figures and the summary (`experiments.common.io.staged`).

    Returns a `SweepResult`; on processes other than 0 its rows, aggregate and files are empty.
    Raises `UserError`s (`SweepError`, `SweepMemoryError`, `ConfigError`, `experiments.sweep.data.DataError`)
    before anything is compiled or written, except a memory overshoot measured by XLA after compiling.
    """
    start = time.perf_counter()
    if not isinstance(config, SweepConfig):
        raise TypeError(f"config must be a SweepConfig (see load_config); got {type(config).__name__}")
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise SweepError(
            "dtype 'float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 (or "
            "jax.config.update('jax_enable_x64', True)) before running the sweep"
        )
    configurations = expand_grid(config)
    groups = group_configurations(configurations)
    devices = list(jax.devices() if devices is None else devices)
    n_dev = len(devices)
    if config.memory_budget_mb is not None:
        budget, budget_source = int(config.memory_budget_mb * 2**20), "memory_budget_mb"
    else:
        budget, budget_source = parallel.default_budget_bytes(devices)
    writer = jax.process_index() == 0
    output_dir = pathlib.Path(output_dir) if output_dir is not None else config.resolved_output_dir
    dtype = jnp.dtype(config.dtype)

    # data; every group's memory plan by the formula, from the shapes alone (nothing compiled yet)
    preprocessed = sweep_data.load_datasets(config)
    reports: dict[GroupKey, GroupReport] = {}
    for key, members in groups.items():
        pre = preprocessed[key.dataset]
        n_train, n_test = pre.x_train.shape[0], pre.x_test.shape[0]
        width, out_dim = key.width or pre.x_train.shape[1], int(pre.num_classes)
        report = GroupReport(key.label, key, width, len(members))
        report.estimated_bytes_per_config = programs.estimate_config_bytes(
            config, key, n_train=n_train, n_test=n_test, width=width, out_dim=out_dim
        )
        itemsize, label = dtype.itemsize, 4  # int32 labels
        targets = out_dim * itemsize if key.loss == "square" else label
        report.data_bytes = (n_train + n_test) * (width * itemsize + targets + label)  # = the arrays of `_data`
        report.chunk_size = len(members)  # until planned: a guess for the progress bar
        if report.estimated_bytes_per_config is not None:
            try:
                report.chunk_size = parallel.plan_chunk_size(
                    len(members),
                    report.estimated_bytes_per_config,
                    report.data_bytes,
                    budget,
                    n_dev,
                    max_chunk_size=config.max_chunk_size,
                    what=f"group {key.label}",
                )
            except parallel.MemoryBudgetError as err:
                raise SweepMemoryError(f"{err}; {_MEMORY_ADVICE}") from None
        reports[key] = report

    # features (a random projection where a width is given) and L* per (data set, width)
    projection_seeds = {d.key: d.projection_seed for d in config.datasets}
    features: dict[tuple, sweep_data.FeatureData] = {}
    L_stars: dict[tuple, float | None] = {}
    for key in groups:
        fkey = (key.dataset, key.width)
        if fkey not in features:
            features[fkey] = sweep_data.prepare_features(
                preprocessed[key.dataset], key.width, dtype, projection_seeds[key.dataset]
            )
        if (fkey, key.loss) not in L_stars:
            fd = features[fkey]
            L_stars[(fkey, key.loss)] = (
                sweep_data.shallow_square_optimum(fd.phi_train, fd.targets("square")) if key.loss == "square" else None
            )

    # saved chunks (process 0 reads them, every process follows)
    chunks = _Chunks(output_dir, fingerprint(config))
    if writer and not resume:
        chunks.discard()
    done, per_group = chunks.load() if writer else ({}, {})
    mask = np.zeros(len(configurations), bool)
    mask[list(done)] = True
    skipped = set(np.flatnonzero(parallel.agree(mask)).tolist())
    todo = {}
    for key, members in groups.items():
        reports[key].configs_skipped = sum(c.config_id in skipped for c in members)
        reports[key].chunks_skipped = per_group.get(key.slug, 0)
        todo[key] = [c for c in members if c.config_id not in skipped]
    skipped_chunks = sum(r.chunks_skipped for r in reports.values())

    batching = parallel.device_batching(devices, config.device_batching)
    if log is not None and writer:
        left = sum(len(m) for m in todo.values())
        log(
            f"sweep {config.name}: {len(configurations)} configurations in {len(groups)} groups, {left} to compute "
            f"on {n_dev} device(s) ({batching} per device) -> {output_dir}"
        )
    bar = None
    computed = 0
    try:
        expected = sum(-(-len(m) // reports[k].chunk_size) for k, m in todo.items())
        bar = _progress(skipped_chunks + expected, skipped_chunks, config.name, progress and writer)
        for key, members in todo.items():
            if not members:
                continue
            interrupts.check()
            report = reports[key]
            fd = features[(key.dataset, key.width)]
            engine = _engine(config, key, report.width, fd.num_classes, devices, compiler_options)
            per_config = {
                "key": np.stack([np.asarray(jax.random.PRNGKey(c.seed)) for c in members]),
                "learning_rate": np.asarray([c.learning_rate for c in members], dtype),
                "gamma": np.asarray([0.0 if c.gamma is None else c.gamma for c in members], dtype),
            }
            shared = _data(fd, key.loss)
            assert sum(a.nbytes for a in shared) == report.data_bytes, "the data's size by shapes is exact"
            compiles = engine.compiles
            try:
                plan = engine.plan(
                    report.n_configs,
                    per_config,
                    shared,
                    budget_bytes=budget,
                    bytes_per_config=report.estimated_bytes_per_config,
                    max_chunk_size=config.max_chunk_size,
                    max_recompiles=max_recompiles,
                    what=f"group {key.label}",
                )
            except parallel.MemoryBudgetError as err:
                raise SweepMemoryError(f"{err}; {_MEMORY_ADVICE}") from None
            guess = report.chunk_size
            report.programs_compiled = engine.compiles - compiles
            report.compile_s = plan.compile_s
            report.chunk_size = plan.chunk_size
            report.estimated_bytes_per_device = plan.estimated_bytes_per_device
            report.measured_bytes_per_device = plan.measured_bytes_per_device
            if report.estimated_bytes_per_config is None:
                report.estimated_bytes_per_config = plan.bytes_per_config
            if bar is not None:  # the plan may differ from the formula's guess (XLA's measurement)
                bar.total += -(-len(members) // plan.chunk_size) - -(-len(members) // guess)
                bar.refresh()
            for chunk in engine.chunks(per_config, shared, plan=plan):
                ids = [c.config_id for c in members[chunk.start : chunk.stop]]
                if writer:
                    chunks.save(key, ids, chunk.outputs)
                flat = _flatten(chunk.outputs)
                for row, cid in enumerate(ids):
                    done[cid] = {k: v[row] for k, v in flat.items()}
                report.run_s += chunk.seconds
                report.chunks_computed += 1
                computed += 1
                if bar is not None:
                    bar.update(1)
                if on_chunk is not None:
                    on_chunk(ChunkReport(key.label, tuple(ids), chunk.seconds))
                interrupts.check()  # a Ctrl-C that jax's garbage-collection callback swallowed stops here
    except BaseException:
        if bar is not None:  # an interrupted bar is erased: the command's one line says what happened
            bar.leave = False
        raise
    finally:
        if bar is not None:
            bar.close()
        if writer:
            chunks.tidy()

    rows: list[dict] = []
    final_params: dict[int, Any] | None = {} if config.save_params else None
    for key, members in groups.items() if writer else ():  # other processes lack the resumed chunks
        fd = features[(key.dataset, key.width)]
        L_star = L_stars[((key.dataset, key.width), key.loss)]
        treedef = None
        if config.save_params:
            treedef = jax.tree_util.tree_structure(
                programs.param_shapes(config, key, reports[key].width, fd.num_classes)
            )
        for c in members:
            out = done[c.config_id]
            rows.extend(tables.rows_for(config, c, reports[key].width, out, L_star))
            if treedef is not None:
                leaves = [out[f"param_{i}"] for i in range(treedef.num_leaves)]
                final_params[c.config_id] = jax.tree_util.tree_unflatten(treedef, leaves)
    files = tables.write_tables(rows, output_dir) if writer and write_tables else {}
    return SweepResult(
        config=config,
        output_dir=output_dir,
        configurations=configurations,
        rows=rows,
        aggregate=tables.aggregate(rows),
        groups=list(reports.values()),
        chunks_computed=computed,
        chunks_skipped=skipped_chunks,
        devices=[str(d) for d in devices],
        budget_bytes=budget,
        budget_source=budget_source,
        device_batching=batching,
        wall_s=time.perf_counter() - start,
        files=files,
        final_params=final_params,
        environment=env.environment(),
    )


def _data(fd: sweep_data.FeatureData, loss: str) -> tuple[np.ndarray, ...]:
    """The arrays every configuration of a group reads (replicated on every device)."""
    return (fd.phi_train, fd.targets(loss), fd.labels_train, fd.phi_test, fd.targets(loss, "test"), fd.labels_test)


__all__ = ["ChunkReport", "GroupReport", "SweepError", "SweepMemoryError", "SweepResult", "run_sweep"]
