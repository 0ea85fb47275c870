"""Full-batch gradient descent in compiled chunks, with a per-step trace, a progress bar and checkpoints.

This is `deq_jax.train.full_batch_gd` cut into chunks: the same `make_step` (value_and_grad + optax SGD) inside a
`lax.scan`, run `chunk` steps per compiled call, so that a progress bar can move, a checkpoint can be written after
every chunk, and a run can stop early. (When the library's own chunked driver lands, `_chunk_program` and `run_gd`
become a thin layer over it.) Besides the step's metrics, each step can record, at the parameters the loss is
evaluated at (index t = before update t), what its `Trace` asks for:
- `U_norm2` (DELM): `|U_t|_2 = |I - gamma sigma(A_t)|_2`, from which the convergence bound is computed;
- `W` (every step) or only at the logged steps (the chunk boundaries, always recorded);
- `checks` (DELM): `dynamics.update_checks`, the W-velocity of the applied update against `-eta P_t(G_t)`.

A `RunSpec` is one compiled program: the model, loss, chunk length, trace, mutation and array shapes. Each
experiment's plan lists its RunSpecs; the same list is precompiled (in a background thread: XLA compiles outside
the GIL, and compiling executes nothing) and then run, so the programs are described once.

Checkpoints are keyed by a fingerprint of exactly what a run's numbers depend on (`run_identity`: the program, the
learning rate, the step budget, the stop rule, digests of the data and of the initial parameters), so changing a
threshold or an unrelated setting never recomputes a run, and changing one that matters never reuses a stale one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax import theory
from deq_jax.losses import Loss, cross_entropy
from deq_jax.models import DELM, Model
from deq_jax.train import make_step

from experiments.common.io import CheckpointStore, NullStore
from experiments.reproduce import dynamics, interrupts, mutations
from experiments.reproduce.checkpoints import run_identity

#: seconds between checkpoints within a run (a run's end is always checkpointed); the numbers do not depend on it
CHECKPOINT_EVERY_S = 5.0
#: XLA options of `ReproduceConfig.fast_compile`: LLVM optimisation off, compilation ~2x faster, execution 2-4x
#: slower (measured on the tiny config's programs), for runs whose time is compilation (the test suite's)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
#: |U|_2 by an SVD up to this width, by power iteration on U^T U above (an estimate from below)
EXACT_NORM_WIDTH = 256
NORM_ITERATIONS = 50


@functools.lru_cache(maxsize=None)
def regularised_cross_entropy(n: int, l2: float) -> Loss:
    """Cross-entropy on the first `n` rows plus `(l2 / 2) |W|_F^2`, read off the predictions on `m` probe rows.

    The library's losses see only predictions. With the identity matrix appended to the features as probe rows,
    the predictions on them are `I @ W.T = W.T`, so `(l2 / 2) * sum(pred[n:] ** 2) = (l2 / 2) |W|_F^2` exactly, for
    every model (the DELM's end-to-end W included): the objective of `theory.shallow_optimum_cross_entropy`.
    Targets of the probe rows are ignored (use zeros). Cached, so equal arguments give the same function (one
    compiled program). (Switches to the library's loss `penalty` hook when it lands.)
    """

    def loss(predictions, targets):
        return cross_entropy(predictions[:n], targets[:n]) + 0.5 * l2 * jnp.sum(predictions[n:] ** 2)

    loss.__name__ = f"cross_entropy_l2_{l2:g}_n{n}"
    return loss


def with_probe_rows(phi: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(phi; I_m)` and `(y; 0)`: the inputs for `regularised_cross_entropy`."""
    m = phi.shape[1]
    return (np.concatenate([phi, np.eye(m, dtype=phi.dtype)]),
            np.concatenate([y, np.zeros((m, y.shape[1]), y.dtype)]))


@dataclasses.dataclass(frozen=True)
class Trace:
    """What each step records besides the step's metrics (see the module docstring)."""

    u_norm: bool = False
    W_every_step: bool = False
    checks: bool = False
    fd_step: Optional[float] = None  # with `checks`: also the finite-difference check, at this relative step


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One compiled chunk program: `phi` is `(rows, model.width)`, targets `(rows, model.out_dim)`. `mutation`
    falsifies the gradient (`mutations`); None for honest runs and for every reference."""

    model: Model
    loss: Union[str, Loss]
    chunk: int
    rows: int
    dtype: Any
    trace: Trace = Trace()
    mutation: Optional[str] = None
    fast_compile: bool = False

    @property
    def program(self) -> Callable:
        return _chunk_program(self.model, self.loss, self.chunk, self.trace, self.mutation)

    @property
    def compiler_options(self) -> Optional[dict]:
        return FAST_COMPILE if self.fast_compile else None

    def identity(self) -> dict:
        loss = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", repr(self.loss))
        return {"model": repr(self.model), "loss": loss, "chunk": self.chunk, "trace": repr(self.trace),
                "mutation": self.mutation, "dtype": str(jnp.dtype(self.dtype)), "fast_compile": self.fast_compile}


def closed_form_W(model: Model, params: Any) -> jax.Array:
    """The end-to-end matrix: for DELMs through the closed form (exact, whatever solver the model trains with)."""
    if isinstance(model, DELM):
        return dynamics.closed_form(model, params)
    return model.end_to_end(params)


def u_norm(model: DELM, params: dict) -> jax.Array:
    U = theory.u_matrix(params["A"], model.gamma, model.sigma)
    if U.shape[0] <= EXACT_NORM_WIDTH:
        return theory.spectral_norm(U)
    v0 = jnp.ones((U.shape[0],), U.dtype) / jnp.sqrt(U.shape[0])

    def body(_, v):
        w = U.T @ (U @ v)
        return w / jnp.linalg.norm(w)

    v = jax.lax.fori_loop(0, NORM_ITERATIONS, body, v0)
    return jnp.linalg.norm(U @ v)


@functools.lru_cache(maxsize=None)
def _chunk_program(model: Model, loss: Union[str, Loss], chunk: int, trace: Trace,
                   mutation: Optional[str]) -> Callable:
    """`run(params, opt_state, phi, y, lr) -> (params, opt_state, history, W_start, W_end)`: `chunk` GD steps,
    jit-compiled once per signature; `W_start`/`W_end` are the end-to-end matrices before and after."""
    trained = mutations.mutate_model(model, mutation)
    # the learning rate given here is a placeholder: `inject_hyperparams` reads it from the state at every update
    step = make_step(trained, loss, mutations.optimizer(0.0, mutation), jit=False)
    is_delm = isinstance(model, DELM)

    def run(params, opt_state, phi, y, lr):
        def body(carry, _):
            params, opt_state = carry
            recorded = {}
            if trace.W_every_step:
                recorded["W"] = closed_form_W(model, params)
            if trace.u_norm and is_delm:
                recorded["U_norm2"] = u_norm(model, params)
            new_params, opt_state, metrics = step(params, opt_state, phi, y)
            if trace.checks and is_delm:
                recorded.update(dynamics.update_checks(model, loss, params, new_params, phi, y, lr, trace.fd_step))
            return (new_params, opt_state), {**metrics, **recorded}

        W_start = closed_form_W(model, params)
        (params, opt_state), history = jax.lax.scan(body, (params, opt_state), None, length=chunk)
        return params, opt_state, history, W_start, closed_form_W(model, params)

    return jax.jit(run)


_COMPILED: dict = {}  # signature -> Future (being compiled in the background) or a compiled program
_COMPILED_LOCK = threading.Lock()
_EXECUTOR: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _signature(program: Callable, args: tuple, options: Optional[dict]) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return (program, treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype), bool(getattr(x, "weak_type", False)))
                                    for x in leaves), repr(options))


def _abstract_args(spec: RunSpec) -> tuple:
    model, dtype = spec.model, spec.dtype
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dtype))
    opt_state = jax.eval_shape(lambda p: mutations.optimizer(jnp.asarray(0.0, dtype), spec.mutation).init(p),
                               params)
    return (params, opt_state, jax.ShapeDtypeStruct((spec.rows, model.width), dtype),
            jax.ShapeDtypeStruct((spec.rows, model.out_dim), dtype), jax.ShapeDtypeStruct((), dtype))


def precompile(specs: Sequence[RunSpec]) -> None:
    """Start compiling these chunk programs, in order, in one background thread (duplicates are skipped)."""
    global _EXECUTOR
    with _COMPILED_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="precompile")
        for spec in specs:
            program, args, options = spec.program, _abstract_args(spec), spec.compiler_options
            sig = _signature(program, args, options)
            if sig not in _COMPILED:
                _COMPILED[sig] = _EXECUTOR.submit(
                    lambda p=program, a=args, o=options: p.lower(*a).compile(compiler_options=o))


def stop_precompiling() -> None:
    """Cancel the compilations not yet started (the one in progress finishes)."""
    global _EXECUTOR
    with _COMPILED_LOCK:
        if _EXECUTOR is not None:
            _EXECUTOR.shutdown(wait=False, cancel_futures=True)
            _EXECUTOR = None
        for sig in [s for s, v in _COMPILED.items() if isinstance(v, concurrent.futures.Future) and v.cancelled()]:
            del _COMPILED[sig]


def _compiled(program: Callable, args: tuple, options: Optional[dict] = None) -> Callable:
    """The compiled `program` for these arguments: precompiled, or compiled here (and kept)."""
    sig = _signature(program, args, options)
    with _COMPILED_LOCK:
        entry = _COMPILED.get(sig)
        if isinstance(entry, concurrent.futures.Future) and entry.cancel():  # not started yet: do it here
            entry = None
    if isinstance(entry, concurrent.futures.Future):
        while not entry.done():  # waiting for the background compilation: a safe point for Ctrl-C
            concurrent.futures.wait([entry], timeout=0.2)
            interrupts.check()
        try:
            entry = entry.result()
        except Exception:  # noqa: BLE001 -- compiling again here raises the error in context, if it is real
            entry = None
    if entry is None:
        entry = program.lower(*args).compile(compiler_options=options)
    with _COMPILED_LOCK:
        _COMPILED[sig] = entry
    return entry


# --------------------------------------------------------------------------------------------- running

@dataclasses.dataclass
class GDResult:
    """A finished run: final params, the kept per-step history (index t = before update t), what `stop` captured,
    the end-to-end matrix at the logged steps (step 0, every chunk boundary, the last step), snapshots of the params
    (if asked), and whether the run came whole from a checkpoint."""

    params: Any
    history: dict
    steps: int
    captured: Optional[dict]
    logged_steps: np.ndarray
    W_logged: np.ndarray
    monitored: dict  # name -> array over the logged steps, from `monitor`
    snapshots: list  # [(step, params)] at step 0 and after every chunk, if requested
    from_checkpoint: bool

    @property
    def stopped_early(self) -> bool:
        return self.captured is not None

    @property
    def W0(self) -> np.ndarray:
        return self.W_logged[0]

    @property
    def W_final(self) -> np.ndarray:
        return self.W_logged[-1]


def _flat(prefix: str, tree: Any) -> dict:
    return {f"{prefix}{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree_util.tree_leaves(tree))}


def _unflat(prefix: str, like: Any, arrays: dict) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[f"{prefix}{i}"]) for i in range(len(leaves))])


def progress_bar(enabled: bool, total: int, desc: str, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True,
                file=sys.stderr, unit="step")


DEFAULT_KEEP = ("loss", "grad_norm", "relative_residual", "converged")


def run_gd(spec: RunSpec, params: Any, phi: Any, y: Any, *, learning_rate: float, steps: int,
           stop: Optional[Callable[[dict, dict, int], Optional[dict]]] = None, stop_id: Any = None,
           keep: Sequence[str] = DEFAULT_KEEP, snapshots: bool = False, store: Optional[CheckpointStore] = None,
           key: str = "", progress: bool = False, desc: str = "", loss_offset: float = 0.0,
           monitor: Optional[Callable[[Any], dict]] = None, monitor_id: Any = None) -> GDResult:
    """Full-batch GD for up to `steps` steps (a multiple of `spec.chunk`), resuming from the store if it can.

    `stop(history, chunk_history, start)` is called after every chunk with the kept history so far (this chunk
    included), the chunk's complete history and the chunk's first step; returning a dict (arrays to keep, possibly
    empty) ends the run. `stop_id` names the stop rule and its parameters (part of the checkpoint's identity).
    `keep` names the per-step metrics kept. `snapshots=True` keeps the params at step 0 and after every chunk.
    `loss_offset` is added to the recorded losses (the square loss's Gram form drops a constant, see
    `common.GramData`), before `stop` sees them. `monitor(params) -> {name: float}` is evaluated at every logged step
    (step 0 and every chunk boundary; `monitor_id` names it in the checkpoint's identity). A checkpoint is written at the end of the run and after any chunk
    that ends `CHECKPOINT_EVERY_S` or more after the last one.
    """
    chunk = spec.chunk
    if steps % chunk:
        raise ValueError(f"steps ({steps}) must be a multiple of chunk ({chunk})")
    store = store if store is not None else NullStore()
    dtype = jnp.dtype(spec.dtype)
    program = spec.program
    phi, y = jnp.asarray(phi, dtype), jnp.asarray(y, dtype)
    lr = jnp.asarray(learning_rate, dtype)
    ident = run_identity(spec, params, phi, y, learning_rate, steps, (stop_id, loss_offset, monitor_id), keep,
                         snapshots)
    store_key = f"{key}@{ident}"
    opt_state = mutations.optimizer(lr, spec.mutation).init(params)
    params0 = params
    history: dict[str, list] = {}
    snaps = [(0, params)] if snapshots else []
    W_logged: list = []
    monitored: dict[str, list] = {}
    done, captured = 0, None

    saved = store.load(store_key)
    if saved is not None:
        arrays, meta = saved
        params = _unflat("p", params0, arrays)
        opt_state = _unflat("o", opt_state, arrays)
        history = {k[2:]: [arrays[k]] for k in arrays if k.startswith("h:")}
        done = meta["done"]
        captured = None if meta["captured"] is None else {k: arrays[f"c:{k}"] for k in meta["captured"]}
        snaps = [(s, _unflat(f"s{s}:", params0, arrays)) for s in meta["snapshots"]]
        W_logged = list(arrays["W_logged"][:-1]) if done else []
        monitored = {k[2:]: list(arrays[k]) for k in arrays if k.startswith("m:")}
    finished_before = saved is not None and (done >= steps or captured is not None)

    def checkpoint(W_end):
        arrays = {**_flat("p", params), **_flat("o", opt_state), "W_logged": np.stack(W_logged + [W_end])}
        arrays.update({f"m:{k}": np.asarray(v, np.float64) for k, v in monitored.items()})
        arrays.update({f"h:{k}": np.concatenate(v) for k, v in history.items()})
        for s, p in snaps:
            arrays.update(_flat(f"s{s}:", p))
        if captured is not None:
            arrays.update({f"c:{k}": v for k, v in captured.items()})
        store.save(store_key, arrays, {"done": done, "captured": None if captured is None else sorted(captured),
                                       "snapshots": [s for s, _ in snaps], "learning_rate": float(learning_rate)})

    t0, resumed_at, first_chunk_s = time.perf_counter(), done, 0.0
    last_save = t0
    compiled = None
    W_end = arrays["W_logged"][-1] if saved is not None and done else None
    def observe(p):
        if monitor is not None:
            for k, v in monitor(p).items():
                monitored.setdefault(k, []).append(float(v))

    if done == 0:
        observe(params)
    with progress_bar(progress, steps, desc, initial=done) as bar:
        while done < steps and captured is None:
            interrupts.check()
            if compiled is None:
                compiled = _compiled(program, (params, opt_state, phi, y, lr), spec.compiler_options)
            params, opt_state, chunk_hist, W_start, W_end = compiled(params, opt_state, phi, y, lr)
            chunk_hist, W_start, W_end = jax.device_get((chunk_hist, W_start, W_end))
            chunk_hist = dict(chunk_hist)
            chunk_hist["loss"] = np.asarray(chunk_hist["loss"], np.float64) + loss_offset
            W_logged.append(np.asarray(W_start))
            if done == resumed_at:  # the first call of a program includes its compilation
                first_chunk_s = time.perf_counter() - t0
            for k in keep:
                if k in chunk_hist:
                    history.setdefault(k, []).append(np.asarray(chunk_hist[k]))
            start, done = done, done + chunk
            observe(params)
            if snapshots:
                snaps.append((done, params))
            if stop is not None:
                so_far = {k: np.concatenate(v) for k, v in history.items()}
                captured = stop(so_far, chunk_hist, start)
            if done >= steps or captured is not None or time.perf_counter() - last_save >= CHECKPOINT_EVERY_S:
                checkpoint(np.asarray(W_end))
                last_save = time.perf_counter()
            bar.update(chunk)
            bar.set_postfix(loss=f"{float(chunk_hist['loss'][-1]):.6g}", refresh=False)
    history_np = {k: np.concatenate(v) for k, v in history.items()}
    if desc:
        how = ("from checkpoint" if done == resumed_at else
               f"{done - resumed_at} in {time.perf_counter() - t0:.1f} s, first chunk {first_chunk_s:.1f} s")
        print(f"  {desc}: {done} steps ({how}), final loss {float(history_np['loss'][-1]):.10g}", file=sys.stderr,
              flush=True)
    logged = np.stack(W_logged + [np.asarray(W_end)])
    return GDResult(params=params, history=history_np, steps=done, captured=captured,
                    logged_steps=np.arange(0, done + 1, chunk), W_logged=logged,
                    monitored={k: np.asarray(v, np.float64) for k, v in monitored.items()}, snapshots=snaps,
                    from_checkpoint=finished_before)
