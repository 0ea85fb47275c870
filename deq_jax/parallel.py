"""One function over many configurations: vmapped, chunked to a memory budget, sharded over devices.

A configuration is one row of `per_config`, a pytree of arrays whose leaves share a leading axis of length N
(seeds' PRNG keys, learning rates, gammas, ...); `shared` is a pytree of arrays that every configuration reads
(the data). With `fn(config, shared) -> outputs` computing one configuration,

    ParallelMap(fn)(per_config, shared)[i] == fn(per_config[i], shared)        for i = 0, ..., N - 1

(leafwise, stacked on a leading axis, returned as NumPy arrays). How, each rule stated and each number reported
in the `ChunkPlan`:

- **Chunks.** The N configurations run in chunks of C, each chunk one call of one compiled program. C is a
  multiple of the device count D and every chunk is padded to C by repeating its last configuration (the padded
  rows are computed and dropped), so all chunks of a call, and later calls with the same shapes (a resumed sweep),
  share one compiled program.
- **Memory budget.** With a budget of B bytes per device, S bytes of `shared` (every device holds all of it) and
  E bytes of working memory per configuration, C = D min(floor((B - S) / E), ceil(N / D), floor(max_chunk / D)).
  E is the caller's estimate (`bytes_per_config`); without one, the first program tried holds every configuration
  (ceil(N / D) per device, or max_chunk) and its measurement gives E. The chosen program's `memory_analysis()` is
  then read; while it exceeds B, C shrinks in proportion to the overshoot and the program is recompiled (at most
  `max_recompiles` times), so the budget holds against XLA's measurement, not only the estimate.
  `MemoryBudgetError` when not even one configuration per device fits. Default B: half the device's memory limit
  where it reports one (GPU, TPU), else a quarter of the host's RAM shared among the process's devices.
- **Sharding.** The configuration axis is split over a one-axis `jax.sharding.Mesh` of the devices
  (`PartitionSpec(axis_name)`), `shared` is replicated (`PartitionSpec()`), and `jit(shard_map(local))` runs
  each device's block with no communication. `local` is `vmap(fn)` or `lax.map(fn)`, one configuration after
  another (`device_batching`: `lax.map` on CPU processes with several devices, where jaxlib 0.10's batched
  LAPACK kernels deadlock).
- **Several processes** (after `jax.distributed.initialize()`): the default devices are every process's, so the
  mesh spans all hosts. Every process must make the same calls with the same `per_config` and `shared` (each
  device takes its slice of them), and every process receives all outputs (`process_allgather`, a collective:
  a process that died makes the others fail with an error instead of waiting). Every process uses process 0's
  chunk size (hosts may differ in memory). `agree` gives every process process 0's value of a host array (e.g.
  which configurations are already done).

The engine is a host-side driver (it chooses sizes, compiles and moves data), so it is not itself traced; `fn` is,
under `vmap` or `lax.map`, `shard_map` and `jit`: it must be a pure JAX function of its arguments. PRNG keys enter
as raw `uint32` key data (`jax.random.PRNGKey(seed)` or `jax.random.key_data(key)`).

Example:
    >>> def fn(config, shared):                      # one configuration: a few GD steps on a least-squares fit
    ...     X, y = shared
    ...     w = jax.random.normal(config["key"], (X.shape[1],))
    ...     for _ in range(10):
    ...         w = w - config["lr"] * X.T @ (X @ w - y) / X.shape[0]
    ...     return {"loss": jnp.mean((X @ w - y) ** 2), "w": w}
    >>> per_config = {"key": np.stack([np.asarray(jax.random.PRNGKey(s)) for s in range(100)]),
    ...               "lr": np.linspace(0.01, 0.5, 100, dtype=np.float32)}
    >>> engine = ParallelMap(fn)                     # every device JAX sees
    >>> out = engine(per_config, (X, y), budget_bytes=2**26)
    >>> out["loss"].shape, engine.last_plan.chunk_size
    ((100,), 100)
"""

from __future__ import annotations

import dataclasses
import operator
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCHINGS = ("auto", "vmap", "map")


class MemoryBudgetError(ValueError):
    """Not even one configuration per device fits the memory budget (by the estimate or by XLA's measurement)."""


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3g} MiB"


def device_batching(devices: Sequence[Any], batching: str = "auto") -> str:
    """How each device runs its block of configurations: `"vmap"` (one batched program) or `"map"` (`lax.map`,
    one configuration after another). `"auto"` is `"map"` where this process drives several CPU devices: jaxlib
    0.10's batched LAPACK kernels (e.g. an LU solve under `vmap`) split their batch over XLA's intra-op thread
    pool and block on it, which deadlocks once as many devices as the pool has threads do so at once (measured:
    2 forced host devices on 2 cores, m = 64); unbatched calls do not split. Elsewhere `"auto"` is `"vmap"`.

    Args:
      devices: the devices of the mesh.
      batching: `"auto"`, `"vmap"` or `"map"`.

    Returns:
      `"vmap"` or `"map"`.
    """
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {', '.join(map(repr, BATCHINGS))}; got {batching!r}")
    if batching != "auto":
        return batching
    local = [d for d in devices if d.process_index == jax.process_index()]
    return "map" if len(local) > 1 and local[0].platform == "cpu" else "vmap"


def default_budget_bytes(devices: Sequence[Any]) -> tuple[int, str]:
    """The default per-device memory budget in bytes, and where it came from.

    Args:
      devices: the devices of the mesh (the first one's `memory_stats()` is read).

    Returns:
      `(budget_bytes, source)`: half the device's `bytes_limit` where it reports one, else a quarter of the host's
      RAM per local device; `source` says which, in words.
    """
    try:
        stats = devices[0].memory_stats()
    except Exception:  # not every backend implements memory_stats (CPU raises or returns None)
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(0.5 * stats["bytes_limit"]), "half of the device's bytes_limit"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = sum(d.process_index == jax.process_index() for d in devices) or 1
    return int(0.25 * total / local), "a quarter of the host's RAM per local device"


def measured_bytes(compiled: Any) -> int | None:
    """Per-device bytes XLA reports for a compiled program: arguments + outputs + temporaries + generated code,
    less what outputs alias from arguments.

    Args:
      compiled: a compiled program (`jax.jit(...).lower(...).compile()`).

    Returns:
      The bytes, or None where the backend does not report them.
    """
    try:
        ma = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if ma is None:
        return None
    return int(
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        + ma.temp_size_in_bytes
        - ma.alias_size_in_bytes
        + ma.generated_code_size_in_bytes
    )


def plan_chunk_size(
    n: int,
    bytes_per_config: int,
    shared_bytes: int,
    budget_bytes: int,
    n_devices: int,
    *,
    max_chunk_size: int | None = None,
    what: str = "the computation",
) -> int:
    """`C = D min(floor((B - S) / E), ceil(N / D), max(1, floor(max_chunk_size / D)))` (the module docstring's
    rule).

    Args:
      n: the number of configurations N.
      bytes_per_config: the working memory E of one configuration, in bytes.
      shared_bytes: the bytes S of the shared data, held by every device.
      budget_bytes: the memory budget B per device, in bytes.
      n_devices: the number of devices D.
      max_chunk_size: a cap on the chunk size (None: none).
      what: the computation, as the error names it.

    Returns:
      The chunk size C, a multiple of D. Raises `MemoryBudgetError` when `(B - S) / E < 1`.
    """
    for name, value in (("n", n), ("bytes_per_config", bytes_per_config), ("n_devices", n_devices)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    per_device = (budget_bytes - shared_bytes) // bytes_per_config if budget_bytes > shared_bytes else 0
    if per_device < 1:
        raise MemoryBudgetError(
            f"{what}: one configuration needs about {_mib(bytes_per_config)} plus {_mib(shared_bytes)} of shared "
            f"data per device, above the memory budget of {_mib(budget_bytes)} per device"
        )
    per_device = min(per_device, -(-n // n_devices))
    if max_chunk_size is not None:
        per_device = min(per_device, max(1, max_chunk_size // n_devices))
    return int(per_device * n_devices)


def _leaves_bytes(tree: Any) -> int:
    return int(
        sum(np.prod(np.shape(x), dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
    )


def _leading(per_config: Any) -> int:
    leaves = jax.tree_util.tree_leaves(per_config)
    if not leaves:
        raise ValueError("per_config must hold at least one array (with a leading configuration axis); got none")
    lengths = {int(np.shape(x)[0]) for x in leaves if np.ndim(x)}
    if len(lengths) != 1 or any(np.ndim(x) == 0 for x in leaves):
        shapes = [tuple(np.shape(x)) for x in leaves]
        raise ValueError(f"per_config's arrays must share a leading configuration axis; got shapes {shapes}")
    n = lengths.pop()
    if n < 1:
        raise ValueError("per_config must hold at least one configuration; got a leading axis of length 0")
    return n


def _host(tree: Any) -> Any:
    def convert(x):
        try:
            return np.asarray(x)
        except TypeError as err:  # typed PRNG keys and other extended dtypes have no NumPy form
            raise TypeError(
                f"per_config and shared must hold plain arrays (PRNG keys as raw uint32 key data, "
                f"e.g. jax.random.PRNGKey(seed)); got {type(x).__name__} of dtype "
                f"{getattr(x, 'dtype', '?')}: {err}"
            ) from None

    return jax.tree_util.tree_map(convert, tree)


def _global(tree: Any, sharding: NamedSharding) -> Any:
    # every process holds the whole host array and each device takes its slice: one host or many
    return jax.tree_util.tree_map(
        lambda host: jax.make_array_from_callback(host.shape, sharding, lambda index: host[index]), tree
    )


def _gather(tree: Any) -> Any:
    def fetch(x):
        if x.is_fully_addressable:
            return np.asarray(x)
        from jax.experimental import multihost_utils  # a collective: every process calls it

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(fetch, tree)


def agree(value: Any) -> Any:
    """Process 0's value of a pytree of host arrays, on every process (a collective: every process calls it).

    Args:
      value: a pytree of host arrays, shaped alike on every process.

    Returns:
      Process 0's `value` (NumPy arrays); with one process, `value` itself.
    """
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(np.asarray, multihost_utils.broadcast_one_to_all(value))


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """How N configurations are run: `chunk_size` per call (`per_device` on each of `n_devices`), and why.

    `bytes_per_config` is the estimate E used (`estimate_source` says whose); `estimated_bytes_per_device` is
    `shared_bytes + per_device * E`; `measured_bytes_per_device` is XLA's `memory_analysis()` of the chosen
    program (None where the backend does not report it); `recompiles` counts the shrinks it caused.

    Attributes:
      n: the number of configurations N.
      chunk_size: the configurations per call C.
      per_device: the configurations per device per call, `C / D`.
      n_devices: the devices D.
      batching: `"vmap"` or `"map"` (`device_batching`).
      budget_bytes: the memory budget B per device.
      budget_source: where B came from.
      shared_bytes: the bytes S of the shared data.
      bytes_per_config: the estimate E (None where there was none to make).
      estimate_source: whose estimate E is.
      estimated_bytes_per_device: `S + per_device * E` (None without E).
      measured_bytes_per_device: XLA's measurement of the chosen program (None where not reported).
      recompiles: the recompilations XLA's measurement caused.
      compile_s: the seconds spent planning and compiling.
    """

    n: int
    chunk_size: int
    per_device: int
    n_devices: int
    batching: str
    budget_bytes: int
    budget_source: str
    shared_bytes: int
    bytes_per_config: int | None
    estimate_source: str
    estimated_bytes_per_device: int | None
    measured_bytes_per_device: int | None
    recompiles: int
    compile_s: float

    @property
    def n_chunks(self) -> int:
        """The calls the N configurations take, `ceil(N / C)`."""
        return -(-self.n // self.chunk_size)


class Chunk(NamedTuple):
    """One chunk's results, as `ParallelMap.chunks` yields them.

    Attributes:
      start: the first configuration of the chunk.
      stop: one past its last configuration.
      outputs: their outputs, NumPy arrays with a leading axis of length `stop - start`.
      seconds: the seconds the chunk took (transfer, run and gather; compilation excluded).
    """

    start: int
    stop: int
    outputs: Any
    seconds: float


class ParallelMap:
    """`fn(config, shared)` over the leading axis of `per_config`, chunked, sharded and compiled once per shape.

    Args:
      fn: one configuration's computation, a pure JAX function `fn(config, shared) -> pytree of arrays`.
      devices: the mesh's devices (default `jax.devices()`: every device of every process).
      batching: `"auto"`, `"vmap"` or `"map"` (`device_batching`).
      axis_name: the mesh axis of the configurations.
      compiler_options: XLA options for every compilation (`jax.stages.Lowered.compile`), e.g.
        `{"xla_backend_optimization_level": 0}`, which cut compile time about 3x for small programs on CPU
        (measured: a vmapped 10-step DELM training run, 7.9 -> 2.7 CPU seconds) at the cost of slower code.

    Compiled programs are kept per chunk size and argument shapes (`compiles` counts real compilations), so one
    `ParallelMap` reused across calls (chunks of a sweep group, a resumed sweep) compiles each shape once.
    """

    def __init__(
        self,
        fn: Callable[[Any, Any], Any],
        *,
        devices: Sequence[Any] | None = None,
        batching: str = "auto",
        axis_name: str = "config",
        compiler_options: dict[str, Any] | None = None,
    ):
        if not callable(fn):
            raise TypeError(f"fn must be a callable fn(config, shared); got {fn!r}")
        self.fn = fn
        self.devices = tuple(jax.devices() if devices is None else devices)
        if not self.devices:
            raise ValueError("devices must name at least one device; got none")
        self.batching = device_batching(self.devices, batching)
        self.mesh = Mesh(np.asarray(self.devices), (axis_name,))
        self._split = NamedSharding(self.mesh, PartitionSpec(axis_name))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self.compiler_options = dict(compiler_options or {})
        self._compiled: dict[tuple, Any] = {}
        self.compiles = 0
        self.last_plan: ChunkPlan | None = None

        def local(per_config, shared):
            if self.batching == "vmap":
                return jax.vmap(fn, in_axes=(0, None))(per_config, shared)
            return jax.lax.map(lambda config: fn(config, shared), per_config)

        # check_vma=False: the blocks never communicate, and the varying-axis check refuses loops whose carry
        # starts from constants, such as the GMRES of jax.scipy that implicit differentiation runs
        program = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(PartitionSpec(axis_name), PartitionSpec()),
            out_specs=PartitionSpec(axis_name),
            check_vma=False,
        )
        self._program = jax.jit(program, in_shardings=(self._split, self._replicated), out_shardings=self._split)

    @property
    def n_devices(self) -> int:
        """The number of devices of the mesh."""
        return len(self.devices)

    def compiled(self, chunk_size: int, per_config: Any, shared: Any) -> Any:
        """The compiled program for chunks of `chunk_size` configurations shaped like `per_config`'s rows (any
        leading length) and `shared`: from the cache, or compiled now.

        Args:
          chunk_size: the configurations per call, a multiple of the device count.
          per_config: a pytree of arrays with a leading configuration axis (its length does not matter).
          shared: the pytree of arrays every configuration reads.

        Returns:
          The compiled program, `(per_config block, shared) -> outputs`.
        """
        if chunk_size % self.n_devices:
            raise ValueError(f"chunk_size must be a multiple of the {self.n_devices} devices; got {chunk_size}")
        per_leaves, per_tree = jax.tree_util.tree_flatten(per_config)
        shared_leaves, shared_tree = jax.tree_util.tree_flatten(shared)
        key = (
            chunk_size,
            per_tree,
            tuple((tuple(np.shape(x)[1:]), str(x.dtype)) for x in per_leaves),
            shared_tree,
            tuple((tuple(np.shape(x)), str(x.dtype)) for x in shared_leaves),
        )
        hit = self._compiled.get(key)
        if hit is None:
            abstract_per = jax.tree_util.tree_unflatten(
                per_tree,
                [
                    jax.ShapeDtypeStruct((chunk_size, *np.shape(x)[1:]), x.dtype, sharding=self._split)
                    for x in per_leaves
                ],
            )
            abstract_shared = jax.tree_util.tree_unflatten(
                shared_tree,
                [jax.ShapeDtypeStruct(tuple(np.shape(x)), x.dtype, sharding=self._replicated) for x in shared_leaves],
            )
            hit = self._program.lower(abstract_per, abstract_shared).compile(
                compiler_options=self.compiler_options or None
            )
            self._compiled[key] = hit
            self.compiles += 1
        return hit

    def plan(
        self,
        n: int,
        per_config: Any,
        shared: Any = (),
        *,
        budget_bytes: int | None = None,
        bytes_per_config: int | None = None,
        max_chunk_size: int | None = None,
        max_recompiles: int = 4,
        what: str = "the computation",
    ) -> ChunkPlan:
        """Choose the chunk size for `n` configurations shaped like `per_config`'s rows (the module docstring's
        rule) and compile its program. `n` may exceed `per_config`'s length: a resumed run plans with the whole
        set so that its chunks keep the size, hence the program, of the first run.

        Args:
          n: the number of configurations N.
          per_config: a pytree of arrays with a leading configuration axis.
          shared: the pytree of arrays every configuration reads.
          budget_bytes: the memory budget B per device (default: `default_budget_bytes`).
          bytes_per_config: the caller's estimate E of one configuration's working memory (default: measured).
          max_chunk_size: a cap on the chunk size (None: none).
          max_recompiles: the most recompilations to fit XLA's measurement into the budget.
          what: the computation, as errors name it.

        Returns:
          The `ChunkPlan` (also kept as `last_plan`). Raises `MemoryBudgetError` when one configuration per device
          does not fit.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer; got {n!r}")
        if max_chunk_size is not None and (
            isinstance(max_chunk_size, bool) or not isinstance(max_chunk_size, (int, np.integer)) or max_chunk_size < 1
        ):
            raise ValueError(f"max_chunk_size must be a positive integer or None; got {max_chunk_size!r}")
        if budget_bytes is None:
            budget, source = default_budget_bytes(self.devices)
        elif (
            isinstance(budget_bytes, bool)
            or not isinstance(budget_bytes, (int, float, np.number))
            or not budget_bytes > 0
        ):
            raise ValueError(f"budget_bytes must be a positive number of bytes or None; got {budget_bytes!r}")
        else:
            budget, source = int(budget_bytes), "budget_bytes"
        _leading(per_config)
        per_config, shared = _host(per_config), _host(shared)
        D = self.n_devices
        S = _leaves_bytes(shared)
        t0 = time.perf_counter()
        most = -(-n // D) if max_chunk_size is None else min(-(-n // D), max(1, max_chunk_size // D))
        if bytes_per_config is None:  # try everything at once; XLA's measurement of that program sizes the rest
            per_device = most
            estimate_source = "XLA's memory analysis of the first program tried"
        else:
            per_device = (
                plan_chunk_size(n, int(bytes_per_config), S, budget, D, max_chunk_size=max_chunk_size, what=what) // D
            )
            estimate_source = "caller"
        recompiles = 0
        while True:
            measured = measured_bytes(self.compiled(per_device * D, per_config, shared))
            if bytes_per_config is None and measured is not None:
                bytes_per_config = max(1, (measured - S) // per_device)
            if measured is None or measured <= budget:
                break
            if per_device == 1 or recompiles == max_recompiles:
                raise MemoryBudgetError(
                    f"{what}: XLA reports {_mib(measured)} per device for {per_device} configuration(s) per device, "
                    f"above the memory budget of {_mib(budget)} per device"
                )
            shrunk = int(per_device * (budget - S) / max(1, measured - S))  # shared data stay replicated
            per_device = max(1, min(per_device - 1, shrunk))
            recompiles += 1
        if bytes_per_config is None:
            estimate_source = "none (the backend reports no memory analysis: unchecked)"
        if jax.process_count() > 1:  # hosts may differ in RAM or code size: every process follows process 0
            agreed = int(agree(np.asarray(per_device, np.int64)))
            if agreed != per_device:
                per_device = agreed
                measured = measured_bytes(self.compiled(per_device * D, per_config, shared))
        plan = ChunkPlan(
            n=int(n),
            chunk_size=per_device * D,
            per_device=per_device,
            n_devices=D,
            batching=self.batching,
            budget_bytes=budget,
            budget_source=source,
            shared_bytes=S,
            bytes_per_config=None if bytes_per_config is None else int(bytes_per_config),
            estimate_source=estimate_source,
            estimated_bytes_per_device=None if bytes_per_config is None else S + per_device * int(bytes_per_config),
            measured_bytes_per_device=measured,
            recompiles=recompiles,
            compile_s=time.perf_counter() - t0,
        )
        self.last_plan = plan
        return plan

    def chunks(
        self, per_config: Any, shared: Any = (), *, plan: ChunkPlan | None = None, **plan_options: Any
    ) -> Iterator[Chunk]:
        """Run the configurations chunk by chunk, yielding each `Chunk` as soon as it is done (so a caller can
        save it).

        Args:
          per_config: a pytree of arrays with a leading configuration axis.
          shared: the pytree of arrays every configuration reads.
          plan: a `ChunkPlan` made before (e.g. for a resumed run); without it, `plan(len(per_config), ...)` with
            `plan_options` chooses the chunk size.
          **plan_options: the keyword arguments of `plan`.

        Yields:
          A `Chunk` per call, in order.
        """
        n = _leading(per_config)
        per_config, shared = _host(per_config), _host(shared)
        if plan is None:
            plan = self.plan(n, per_config, shared, **plan_options)
        elif plan_options:
            raise TypeError(f"pass either plan or planning options, not both; got {sorted(plan_options)}")
        if plan.n_devices != self.n_devices:
            raise ValueError(f"plan was made for {plan.n_devices} devices; this engine has {self.n_devices}")
        compiled = self.compiled(plan.chunk_size, per_config, shared)
        shared_on_devices = _global(shared, self._replicated)
        for start in range(0, n, plan.chunk_size):
            t0 = time.perf_counter()
            stop = min(n, start + plan.chunk_size)
            rows = np.minimum(np.arange(start, start + plan.chunk_size), stop - 1)  # pad: repeat the last row
            block = jax.tree_util.tree_map(operator.itemgetter(rows), per_config)
            outputs = _gather(compiled(_global(block, self._split), shared_on_devices))
            outputs = jax.tree_util.tree_map(operator.itemgetter(slice(0, stop - start)), outputs)
            yield Chunk(start, stop, outputs, time.perf_counter() - t0)

    def __call__(self, per_config: Any, shared: Any = (), **options: Any) -> Any:
        """Every configuration's outputs, stacked on a leading axis (NumPy arrays, on every process).

        Args:
          per_config: a pytree of arrays with a leading configuration axis N.
          shared: the pytree of arrays every configuration reads.
          **options: the keyword arguments of `chunks` (`plan`, or those of `plan`).

        Returns:
          The pytree of `fn`'s outputs, each leaf with a leading axis of length N.
        """
        parts = [chunk.outputs for chunk in self.chunks(per_config, shared, **options)]
        return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts)


def parallel_map(
    fn: Callable[[Any, Any], Any],
    per_config: Any,
    shared: Any = (),
    *,
    devices: Sequence[Any] | None = None,
    batching: str = "auto",
    compiler_options: dict[str, Any] | None = None,
    **plan_options: Any,
) -> Any:
    """`ParallelMap(fn, devices=..., batching=..., compiler_options=...)(per_config, shared, **plan_options)`: a
    one-off call (keep a `ParallelMap` to reuse its compiled programs).

    Args:
      fn: one configuration's computation, `fn(config, shared) -> pytree of arrays`.
      per_config: a pytree of arrays with a leading configuration axis N.
      shared: the pytree of arrays every configuration reads.
      devices: the mesh's devices (default: every device).
      batching: `"auto"`, `"vmap"` or `"map"`.
      compiler_options: XLA options for the compilation.
      **plan_options: the keyword arguments of `ParallelMap.plan`.

    Returns:
      The pytree of `fn`'s outputs, each leaf with a leading axis of length N.
    """
    engine = ParallelMap(fn, devices=devices, batching=batching, compiler_options=compiler_options)
    return engine(per_config, shared, **plan_options)


__all__ = [
    "BATCHINGS",
    "Chunk",
    "ChunkPlan",
    "MemoryBudgetError",
    "ParallelMap",
    "agree",
    "default_budget_bytes",
    "device_batching",
    "measured_bytes",
    "parallel_map",
    "plan_chunk_size",
]
