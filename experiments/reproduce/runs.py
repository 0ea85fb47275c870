"""Full-batch gradient descent as the library trains it, in compiled chunks, with a per-step trace, a progress bar
and checkpoints.

A run is the library's training step (`deq_jax.train.make_step`: value_and_grad + optax SGD, the L2 term of
cross-entropy through its `penalty` hook), `chunk` steps per compiled call (`deq_jax.train.make_chunk`), driven by
`deq_jax.loop.fit` with callbacks between chunks: progress bar, checkpoints, stopping rules, monitors, interrupts.
Steps carry no solver state (`warm_start=False`): every solve starts from zero, so the reference runs are the exact
direct solve differentiated by autodiff, the variants go through the implicit backward with the configured linear
solver, and the mutations falsify exactly the gradient they name. The square loss trains on its Gram route
(`GramData`, `O(m_y m^2)` per step) where the plan says so. Each step can also record, at the parameters the loss is
evaluated at (index t = before update t), what its `Trace` asks for:
- `U_norm2` (DELM): `|U_t|_2 = |I - gamma sigma(A_t)|_2`, from which the convergence bound is computed;
- `W` (every step); the end-to-end W is always kept at the chunk boundaries (the logged steps);
- `checks` (DELM): `dynamics.update_checks` on each applied update `theta_t -> theta_{t+1}` (computed after the
  chunk's scan from the recorded parameters, in the same compiled program).

A `RunSpec` is one compiled program. Checkpoints are keyed by a fingerprint of exactly what a run's numbers depend
on (`checkpoints.run_identity`), so changing a threshold never recomputes a run and changing a setting that matters
never reuses a stale one.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax import theory
from deq_jax.loop import ChunkEnd, fit
from deq_jax.models import DELM, Model
from deq_jax.train import GramData, TrainState, make_chunk, make_step
from experiments.common import interrupts
from experiments.common.io import CheckpointStore, NullStore
from experiments.reproduce import compiling, dynamics, fused, mutations
from experiments.reproduce.checkpoints import run_identity

#: seconds between checkpoints within a run (a run's end is always checkpointed); the numbers do not depend on it
CHECKPOINT_EVERY_S = 5.0
#: XLA options of `ReproduceConfig.fast_compile`: LLVM optimisation off, compilation ~2x faster, execution 2-4x
#: slower (measured on the tiny config's programs), for runs whose time is compilation (the test suite's)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
#: |U|_2 by an SVD up to this width, by power iteration on U^T U above (an estimate from below)
EXACT_NORM_WIDTH = 256
NORM_ITERATIONS = 50


@dataclasses.dataclass(frozen=True)
class Trace:
    """What each step records besides the step's metrics (see the module docstring)."""

    u_norm: bool = False
    W_every_step: bool = False
    checks: str | None = None  # "all" or "velocity" (`dynamics.update_checks(velocity_only=True)`)
    fd_step: float | None = None  # with `checks`: also the finite-difference check, at this relative step


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One compiled chunk program. Data: `GramData` of width `model.width` (`gram=True`, square loss only) or
    samples, `phi` `(rows, model.width)` and targets `(rows, model.out_dim)`. `l2`: the penalty
    `(l2/2) |W|_F^2` on the end-to-end matrix (make_step's `penalty`). `fused`: penalised cross-entropy with one
    solve and two passes over the data per step (`fused.Penalised`; the same loss and gradient). `mutation`
    falsifies the gradient (`mutations`); None for honest runs and for every reference."""

    model: Model
    loss: str
    chunk: int
    rows: int | None
    dtype: Any
    trace: Trace = Trace()
    mutation: str | None = None
    fast_compile: bool = False
    l2: float | None = None
    gram: bool = False
    fused: bool = False

    def __post_init__(self):
        if self.gram and (self.loss != "square" or self.l2 is not None):
            raise ValueError("the Gram route serves the unpenalised square loss only")
        if self.fused and not (self.loss == "cross_entropy" and self.l2 is not None and fused.fusable(self.model)):
            raise ValueError("the fused step serves penalised cross-entropy of a transposed DELM or a linear model")
        if not self.gram and not self.rows:
            raise ValueError("a run on samples needs rows > 0")

    @property
    def program(self) -> Callable:
        return _chunk_program(self.model, self.loss, self.chunk, self.trace, self.mutation, self.l2, self.fused)

    @property
    def compiler_options(self) -> dict | None:
        return FAST_COMPILE if self.fast_compile else None

    def identity(self) -> dict:
        return {
            "model": repr(self.model),
            "loss": self.loss,
            "l2": self.l2,
            "gram": self.gram,
            "fused": self.fused,
            "chunk": self.chunk,
            "trace": repr(self.trace),
            "mutation": self.mutation,
            "dtype": str(jnp.dtype(self.dtype)),
            "fast_compile": self.fast_compile,
        }

    def abstract_args(self) -> tuple:
        """`(state, data, targets)` as shapes, for compiling ahead of time."""
        model, dtype = self.model, self.dtype
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dtype))
        opt_state = jax.eval_shape(
            lambda p: mutations.optimizer(jnp.asarray(0.0, dtype), self.mutation).init(p), params
        )
        state = TrainState(params, opt_state, None)
        m, k = model.width, model.out_dim
        S = jax.ShapeDtypeStruct
        if self.gram:
            return state, GramData(S((m, m), dtype), S((m, k), dtype), S((), dtype)), None
        if self.fused:
            return state, fused.SampleData(S((self.rows, m), dtype), S((m, self.rows), dtype)), S((self.rows, k), dtype)
        return (state, jax.ShapeDtypeStruct((self.rows, m), dtype), jax.ShapeDtypeStruct((self.rows, k), dtype))


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


def l2_penalty(model: Model, l2: float) -> Callable:
    """`params -> (l2/2) |W|_F^2` on the model's own end-to-end matrix (differentiated as the model is)."""
    return lambda params: 0.5 * l2 * jnp.sum(model.end_to_end(params) ** 2)


@functools.cache
def _chunk_program(
    model: Model, loss: str, chunk: int, trace: Trace, mutation: str | None, l2: float | None, fuse: bool = False
) -> Callable:
    """`run(state, data, targets) -> (state, metrics)`: `chunk` GD steps (`make_chunk`), then the update checks
    over the recorded parameters; metrics also carry `W_start`/`W_end`, the end-to-end matrices before and after
    (leading axis 1). Jit-compiled once per signature."""
    trained = mutations.mutate_model(model, mutation)
    if fuse:  # one solve and two passes over the data per step (experiments/reproduce/fused.py)
        assert l2 is not None
        step = make_step(
            fused.Penalised(trained),
            fused.penalised_cross_entropy(l2),
            mutations.optimizer(0.0, mutation),
            warm_start=False,
            jit=False,
        )
    else:
        step = make_step(
            trained,
            loss,
            mutations.optimizer(0.0, mutation),
            warm_start=False,
            jit=False,
            penalty=None if l2 is None else l2_penalty(trained, l2),
        )
    is_delm = isinstance(model, DELM)

    def record(params):
        out = {}
        if trace.W_every_step:
            out["W"] = closed_form_W(model, params)
        if trace.u_norm and is_delm:
            out["U_norm2"] = u_norm(model, params)
        if trace.checks and is_delm:
            out["params"] = params
        return out

    steps = make_chunk(step, chunk, record=record, jit=False)

    def run(state, data, targets):
        W_start = closed_form_W(model, state.params)
        new_state, history = steps(state, data, targets)
        if "params" in history:
            before = history.pop("params")
            after = jax.tree_util.tree_map(
                lambda s, last: jnp.concatenate([s[1:], last[None]]), before, new_state.params
            )
            lr = mutations.learning_rate_of(state.opt_state)
            history.update(
                jax.lax.map(
                    lambda pair: dynamics.update_checks(
                        model,
                        loss,
                        pair[0],
                        pair[1],
                        data,
                        targets,
                        lr,
                        trace.fd_step,
                        l2,
                        velocity_only=trace.checks == "velocity",
                    ),
                    (before, after),
                )
            )
        W_end = closed_form_W(model, new_state.params)
        return new_state, {**history, "W_start": W_start[None], "W_end": W_end[None]}

    return jax.jit(run)


def precompile(specs: Sequence[RunSpec]) -> None:
    compiling.precompile([(s.program, s.abstract_args(), s.compiler_options) for s in specs])


stop_precompiling = compiling.stop_precompiling


# --------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class GDResult:
    """A finished run: final params, the kept per-step history (index t = before update t), what `stop` captured,
    the end-to-end matrix at the logged steps (step 0, every chunk boundary), snapshots of the params (if asked),
    and whether the run came whole from a checkpoint."""

    params: Any
    history: dict
    steps: int
    captured: dict | None
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
    from tqdm.auto import tqdm  # optional dependency ('experiments' extra): needed only where a bar is drawn

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,
        unit="step",
    )


DEFAULT_KEEP = ("loss", "grad_norm", "relative_residual", "converged")


def as_data(spec: RunSpec, phi: Any, y: Any) -> tuple[Any, Any]:
    """The run's data as arrays of its dtype: `GramData` (then no targets), `fused.SampleData` (the samples and their
    transposed copy) and targets, or samples and targets."""
    dtype = jnp.dtype(spec.dtype)
    if spec.gram:
        if not isinstance(phi, GramData):
            raise TypeError("a Gram-route run takes GramData (deq_jax.train.square_gram)")
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), phi), None
    if spec.fused:
        return fused.sample_data(phi, dtype), jnp.asarray(y, dtype)
    return jnp.asarray(phi, dtype), jnp.asarray(y, dtype)


def run_gd(
    spec: RunSpec,
    params: Any,
    phi: Any,
    y: Any,
    *,
    learning_rate: float,
    steps: int,
    stop: Callable[[dict, dict, int], dict | None] | None = None,
    stop_id: Any = None,
    keep: Sequence[str] = DEFAULT_KEEP,
    snapshots: bool = False,
    store: CheckpointStore | None = None,
    key: str = "",
    progress: bool = False,
    desc: str = "",
    monitor: Callable[[Any], dict] | None = None,
    monitor_id: Any = None,
) -> GDResult:
    """Full-batch GD for up to `steps` steps (a multiple of `spec.chunk`), resuming from the store if it can.

    `phi` is `GramData` for a Gram-route spec (`y` is then ignored), else the samples with targets `y`.
    `stop(history, chunk_history, start)` is called after every chunk with the kept history so far (this chunk
    included), the chunk's complete history and the chunk's first step; returning a dict (arrays to keep, possibly
    empty) ends the run. `stop_id` names the stop rule and its parameters (part of the checkpoint's identity).
    `keep` names the per-step metrics kept. `snapshots=True` keeps the params at step 0 and after every chunk.
    `monitor(params) -> {name: float}` is evaluated at every logged step (step 0 and every chunk boundary;
    `monitor_id` names it in the checkpoint's identity). A checkpoint is written at the end of the run and after any
    chunk that ends `CHECKPOINT_EVERY_S` or more after the last one.
    """
    chunk = spec.chunk
    if steps % chunk:
        raise ValueError(f"steps ({steps}) must be a multiple of chunk ({chunk})")
    store = store if store is not None else NullStore()
    data, targets = as_data(spec, phi, y)
    lr = jnp.asarray(learning_rate, jnp.dtype(spec.dtype))
    ident = run_identity(spec, params, data, targets, learning_rate, steps, (stop_id, monitor_id), keep, snapshots)
    store_key = f"{key}@{ident}"
    state = TrainState(params, mutations.optimizer(lr, spec.mutation).init(params), None)
    params0 = params
    r = _Run(history={}, snaps=[(0, params)] if snapshots else [], W_logged=[], monitored={}, done=0, captured=None)

    saved = store.load(store_key)
    if saved is not None:
        arrays, meta = saved
        state = TrainState(_unflat("p", params0, arrays), _unflat("o", state.opt_state, arrays), None)
        r = _Run(
            history={k[2:]: [arrays[k]] for k in arrays if k.startswith("h:")},
            snaps=[(s, _unflat(f"s{s}:", params0, arrays)) for s in meta["snapshots"]],
            W_logged=list(arrays["W_logged"]),
            monitored={k[2:]: list(arrays[k]) for k in arrays if k.startswith("m:")},
            done=meta["done"],
            captured=None if meta["captured"] is None else {k: arrays[f"c:{k}"] for k in meta["captured"]},
        )
    finished_before = saved is not None and (r.done >= steps or r.captured is not None)
    resumed_at, t0 = r.done, time.perf_counter()

    def observe(params):
        if monitor is not None:
            for name, value in monitor(params).items():
                r.monitored.setdefault(name, []).append(float(value))

    def checkpoint(state):
        arrays = {**_flat("p", state.params), **_flat("o", state.opt_state), "W_logged": np.stack(r.W_logged)}
        arrays.update({f"m:{k}": np.asarray(v, np.float64) for k, v in r.monitored.items()})
        arrays.update({f"h:{k}": np.concatenate(v) for k, v in r.history.items()})
        for s, p in r.snaps:
            arrays.update(_flat(f"s{s}:", p))
        if r.captured is not None:
            arrays.update({f"c:{k}": v for k, v in r.captured.items()})
        store.save(
            store_key,
            arrays,
            {
                "done": r.done,
                "captured": None if r.captured is None else sorted(r.captured),
                "snapshots": [s for s, _ in r.snaps],
                "learning_rate": float(learning_rate),
            },
        )

    compiled: dict = {}

    def run_chunk(state, data, targets):  # the compiled chunk program, compiled (or fetched) at its first call
        interrupts.check()
        if "program" not in compiled:
            compiled["program"] = compiling.compiled(spec.program, (state, data, targets), spec.compiler_options)
        out = compiled["program"](state, data, targets)
        if "first" not in compiled:
            compiled["first"] = time.perf_counter() - t0
        return out

    def after_chunk(event: ChunkEnd) -> bool:
        metrics = dict(event.metrics)
        if not r.W_logged:
            r.W_logged.append(np.asarray(metrics["W_start"][0]))
        r.W_logged.append(np.asarray(metrics["W_end"][0]))
        for k in keep:
            if k in metrics:
                r.history.setdefault(k, []).append(np.asarray(metrics[k]))
        r.done = event.done
        observe(event.state.params)
        if snapshots:
            r.snaps.append((event.done, event.state.params))
        if stop is not None:
            r.captured = stop({k: np.concatenate(v) for k, v in r.history.items()}, metrics, event.start)
        if event.done >= steps or r.captured is not None or time.perf_counter() - r.last_save >= CHECKPOINT_EVERY_S:
            checkpoint(event.state)
            r.last_save = time.perf_counter()
        bar.update(chunk)
        bar.set_postfix(loss=f"{float(metrics['loss'][-1]):.6g}", refresh=False)
        return r.captured is not None

    r.last_save = t0
    if not finished_before:
        if r.done == 0:
            observe(params)
        with progress_bar(progress, steps, desc, initial=r.done) as bar:
            out = fit(
                run_chunk,
                state,
                data,
                targets,
                steps=steps,
                chunk=chunk,
                start=r.done,
                callbacks=[after_chunk],
                keep=(),
            )
        state = out.state
    history = {k: np.concatenate(v) for k, v in r.history.items()}
    if desc:
        how = (
            "from checkpoint"
            if r.done == resumed_at
            else f"{r.done - resumed_at} in "
            f"{time.perf_counter() - t0:.1f} s, first chunk {compiled.get('first', 0):.1f} s"
        )
        print(
            f"  {desc}: {r.done} steps ({how}), final loss {float(history['loss'][-1]):.10g}",
            file=sys.stderr,
            flush=True,
        )
    return GDResult(
        params=state.params,
        history=history,
        steps=r.done,
        captured=r.captured,
        logged_steps=np.arange(0, r.done + 1, chunk),
        W_logged=np.stack(r.W_logged),
        monitored={k: np.asarray(v, np.float64) for k, v in r.monitored.items()},
        snapshots=r.snaps,
        from_checkpoint=finished_before,
    )


@dataclasses.dataclass
class _Run:
    """What a run has accumulated so far (restored from a checkpoint, or empty)."""

    history: dict
    snaps: list
    W_logged: list
    monitored: dict
    done: int
    captured: dict | None
    last_save: float = 0.0
