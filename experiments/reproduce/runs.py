"""Full-batch gradient descent in compiled chunks, with a per-step trace, a progress bar and checkpoints.

This is `deq_jax.train.full_batch_gd` cut into chunks: the same `make_step` (value_and_grad + optax SGD) inside a
`lax.scan`, run `chunk` steps per compiled call, so that a progress bar can move, a checkpoint can be written after
every chunk, and a run can stop early. Each step also records, at the parameters the loss is evaluated at:
- `W`: the end-to-end matrix `model.end_to_end(params)`;
- `U_norm2` (DELM only): `|U|_2 = |I - gamma sigma(A)|_2`, which the convergence bound of docs/theory.md section 4
  is computed from.
The learning rate lives in the optimizer state (`optax.inject_hyperparams`), so one compiled program serves every
learning rate of a model, loss, chunk length and array shape. `tests/test_reproduce.py` checks that the losses
equal `full_batch_gd`'s.

Compilation dominates short runs on a CPU, so `precompile` compiles the programs a job will need in a background
thread (XLA compiles outside the GIL; compiling executes nothing, so no numerics run concurrently) while the main
thread computes; `run_gd` takes the compiled program from there, or compiles it itself.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deq_jax import theory
from deq_jax.losses import Loss, cross_entropy
from deq_jax.models import DELM, Model
from deq_jax.train import make_step

from experiments.common.io import CheckpointStore, NullStore

#: seconds between checkpoints within a run (a run's end is always checkpointed); the numbers do not depend on it
CHECKPOINT_EVERY_S = 5.0
DEFAULT_KEEP = ("loss", "grad_norm", "relative_residual", "converged", "U_norm2")


@functools.lru_cache(maxsize=None)
def regularised_cross_entropy(n: int, l2: float) -> Loss:
    """Cross-entropy on the first `n` rows plus `(l2 / 2) |W|_F^2`, read off the predictions on `m` probe rows.

    The library's losses see only predictions. With the identity matrix appended to the features as probe rows,
    the predictions on them are `I @ W.T = W.T`, so `(l2 / 2) * sum(pred[n:] ** 2) = (l2 / 2) |W|_F^2` exactly, for
    every model (the DELM's end-to-end W included): the objective of `theory.shallow_optimum_cross_entropy`.
    Targets of the probe rows are ignored (use zeros). Cached, so equal arguments give the same function (one
    compiled program).
    """

    def loss(predictions, targets):
        return cross_entropy(predictions[:n], targets[:n]) + 0.5 * l2 * jnp.sum(predictions[n:] ** 2)

    loss.__name__ = f"cross_entropy_l2_{l2:g}"
    return loss


def with_probe_rows(phi: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(phi; I_m)` and `(y; 0)`: the inputs for `regularised_cross_entropy`."""
    m = phi.shape[1]
    return (np.concatenate([phi, np.eye(m, dtype=phi.dtype)]),
            np.concatenate([y, np.zeros((m, y.shape[1]), y.dtype)]))


def _trace(model: Model, u_norm: bool) -> Callable[[Any], dict]:
    if isinstance(model, DELM) and u_norm:
        def trace(params):
            U = theory.u_matrix(params["A"], model.gamma, model.sigma)
            return {"W": model.end_to_end(params), "U_norm2": theory.spectral_norm(U)}
    else:
        def trace(params):
            return {"W": model.end_to_end(params)}
    return trace


def sgd(learning_rate: Any) -> optax.GradientTransformation:
    """Plain SGD (as `full_batch_gd`'s default) with the learning rate held in the state."""
    return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)


@functools.lru_cache(maxsize=None)
def chunk_program(model: Model, loss: Union[str, Loss], chunk: int, u_norm: bool = True) -> Callable:
    """`run(params, opt_state, phi, y) -> (params, opt_state, history, W)`: `chunk` GD steps, jit-compiled once;
    `W` is the end-to-end matrix of the returned params.

    `u_norm=False` skips the DELM's `|U|_2` (an SVD per step) where it is not needed."""
    # the learning rate given here is a placeholder: `inject_hyperparams` reads it from the state at every update
    step = make_step(model, loss, sgd(0.0), jit=False)
    trace = _trace(model, u_norm)

    def run(params, opt_state, phi, y):
        def body(carry, _):
            params, opt_state = carry
            recorded = trace(params)
            params, opt_state, metrics = step(params, opt_state, phi, y)
            return (params, opt_state), {**metrics, **recorded}

        (params, opt_state), history = jax.lax.scan(body, (params, opt_state), None, length=chunk)
        return params, opt_state, history, trace(params)["W"]

    return jax.jit(run)


class ProgramSpec(NamedTuple):
    """A chunk program to compile ahead: `phi` will be `(rows, model.width)`, targets `(rows, model.out_dim)`."""

    model: Model
    loss: Union[str, Loss]
    chunk: int
    u_norm: bool
    rows: int
    dtype: Any


_COMPILED: dict = {}  # signature -> Future (being compiled in the background) or a compiled program
_COMPILED_LOCK = threading.Lock()
_EXECUTOR: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _signature(program: Callable, args: tuple) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return (program, treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype), bool(getattr(x, "weak_type", False)))
                                    for x in leaves))


def _abstract_args(spec: ProgramSpec) -> tuple:
    model, dtype = spec.model, spec.dtype
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dtype))
    opt_state = jax.eval_shape(lambda p: sgd(jnp.asarray(0.0, dtype)).init(p), params)
    return (params, opt_state, jax.ShapeDtypeStruct((spec.rows, model.width), dtype),
            jax.ShapeDtypeStruct((spec.rows, model.out_dim), dtype))


def precompile(specs: Sequence[ProgramSpec]) -> None:
    """Start compiling these chunk programs, in order, in one background thread (duplicates are skipped)."""
    global _EXECUTOR
    with _COMPILED_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="precompile")
        for spec in specs:
            program = chunk_program(spec.model, spec.loss, spec.chunk, spec.u_norm)
            args = _abstract_args(spec)
            sig = _signature(program, args)
            if sig not in _COMPILED:
                _COMPILED[sig] = _EXECUTOR.submit(lambda p=program, a=args: p.lower(*a).compile())


def stop_precompiling() -> None:
    """Cancel the compilations not yet started (the one in progress finishes)."""
    global _EXECUTOR
    with _COMPILED_LOCK:
        if _EXECUTOR is not None:
            _EXECUTOR.shutdown(wait=False, cancel_futures=True)
            _EXECUTOR = None
        for sig in [s for s, v in _COMPILED.items() if isinstance(v, concurrent.futures.Future) and v.cancelled()]:
            del _COMPILED[sig]


def _compiled(program: Callable, args: tuple) -> Callable:
    """The compiled `program` for these arguments: precompiled, or compiled here (and kept)."""
    sig = _signature(program, args)
    with _COMPILED_LOCK:
        entry = _COMPILED.get(sig)
        if isinstance(entry, concurrent.futures.Future) and entry.cancel():  # not started yet: do it here
            entry = None
    if isinstance(entry, concurrent.futures.Future):
        try:
            entry = entry.result()
        except Exception:  # noqa: BLE001 -- compiling again here raises the error in context, if it is real
            entry = None
    if entry is None:
        entry = program.lower(*args).compile()
    with _COMPILED_LOCK:
        _COMPILED[sig] = entry
    return entry


@dataclasses.dataclass
class GDResult:
    """A finished run: final params, the kept per-step history (index t = before update t), what `stop` captured,
    the end-to-end matrices at the start and at the end."""

    params: Any
    history: dict
    steps: int
    captured: Optional[dict]
    snapshots: list  # [(step, params)] at step 0 and after every chunk, if requested
    W0: np.ndarray
    W_final: np.ndarray

    @property
    def stopped_early(self) -> bool:
        return self.captured is not None


def _flat(prefix: str, tree: Any) -> dict:
    return {f"{prefix}{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree_util.tree_leaves(tree))}


def _unflat(prefix: str, like: Any, arrays: dict) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[f"{prefix}{i}"]) for i in range(len(leaves))])


def progress_bar(enabled: bool, total: int, desc: str, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True,
                file=sys.stderr, unit="step")


def run_gd(model: Model, loss: Union[str, Loss], params: Any, phi: Any, y: Any, *, learning_rate: float, steps: int,
           chunk: int, stop: Optional[Callable[[dict, dict, int], Optional[dict]]] = None,
           keep: Sequence[str] = DEFAULT_KEEP, snapshots: bool = False, store: Optional[CheckpointStore] = None,
           key: str = "", progress: bool = False, desc: str = "", u_norm: bool = True) -> GDResult:
    """Full-batch GD for up to `steps` steps (a multiple of `chunk`), resuming from `store[key]` if it is there.

    `stop(history, chunk_history, start)` is called after every chunk with the kept history so far (this chunk
    included), the chunk's complete history (with `W`) and the chunk's first step; returning a dict (arrays to keep,
    possibly empty) ends the run. `keep` names the per-step metrics kept (`W` is large: keep it only when needed).
    `snapshots=True` keeps the params at step 0 and after every chunk. A checkpoint is written at the end of the run
    and after any chunk that ends `CHECKPOINT_EVERY_S` or more after the last one.
    `u_norm=False`: no `U_norm2` trace (saves an SVD per DELM step).
    """
    if steps % chunk:
        raise ValueError(f"steps ({steps}) must be a multiple of chunk ({chunk})")
    store = store if store is not None else NullStore()
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    program = chunk_program(model, loss, chunk, u_norm)
    phi, y = jnp.asarray(phi), jnp.asarray(y)
    opt_state = sgd(jnp.asarray(learning_rate, dtype)).init(params)
    params0 = params
    history: dict[str, list] = {}
    snaps = [(0, params)] if snapshots else []
    done, captured, W0, W_final = 0, None, None, None

    saved = store.load(key)
    if saved is not None:
        arrays, meta = saved
        params = _unflat("p", params0, arrays)
        opt_state = _unflat("o", opt_state, arrays)
        history = {k[2:]: [arrays[k]] for k in arrays if k.startswith("h:")}
        done = meta["done"]
        captured = None if meta["captured"] is None else {k: arrays[f"c:{k}"] for k in meta["captured"]}
        snaps = [(s, _unflat(f"s{s}:", params0, arrays)) for s in meta["snapshots"]]
        W0, W_final = arrays["W0"], arrays["W_final"]

    def checkpoint():
        arrays = {**_flat("p", params), **_flat("o", opt_state), "W0": W0, "W_final": W_final}
        arrays.update({f"h:{k}": np.concatenate(v) for k, v in history.items()})
        for s, p in snaps:
            arrays.update(_flat(f"s{s}:", p))
        if captured is not None:
            arrays.update({f"c:{k}": v for k, v in captured.items()})
        store.save(key, arrays, {"done": done, "captured": None if captured is None else sorted(captured),
                                 "snapshots": [s for s, _ in snaps], "learning_rate": float(learning_rate)})

    t0, resumed_at, first_chunk_s = time.perf_counter(), done, 0.0
    last_save = t0
    compiled = None
    with progress_bar(progress, steps, desc, initial=done) as bar:
        while done < steps and captured is None:
            if compiled is None:
                compiled = _compiled(program, (params, opt_state, phi, y))
            params, opt_state, chunk_hist, W_final = compiled(params, opt_state, phi, y)
            chunk_hist, W_final = jax.device_get((chunk_hist, W_final))
            if done == 0:
                W0 = np.asarray(chunk_hist["W"][0])
            if done == resumed_at:  # the first call of a program includes its compilation
                first_chunk_s = time.perf_counter() - t0
            for k in keep:
                if k in chunk_hist:
                    history.setdefault(k, []).append(np.asarray(chunk_hist[k]))
            start, done = done, done + chunk
            if snapshots:
                snaps.append((done, params))
            if stop is not None:
                so_far = {k: np.concatenate(v) for k, v in history.items()}
                captured = stop(so_far, chunk_hist, start)
            if done >= steps or captured is not None or time.perf_counter() - last_save >= CHECKPOINT_EVERY_S:
                checkpoint()
                last_save = time.perf_counter()
            bar.update(chunk)
            bar.set_postfix(loss=f"{float(chunk_hist['loss'][-1]):.6g}",
                            residual=f"{float(np.max(chunk_hist['relative_residual'])):.1e}", refresh=False)
    history_np = {k: np.concatenate(v) for k, v in history.items()}
    if desc:
        how = ("from checkpoint" if done == resumed_at else
               f"{done - resumed_at} in {time.perf_counter() - t0:.1f} s, first chunk {first_chunk_s:.1f} s")
        print(f"  {desc}: {done} steps ({how}), final loss {float(history_np['loss'][-1]):.10g}", file=sys.stderr,
              flush=True)
    return GDResult(params=params, history=history_np, steps=done, captured=captured, snapshots=snaps,
                    W0=np.asarray(W0), W_final=np.asarray(W_final))
