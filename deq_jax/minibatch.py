"""Minibatch training from host arrays: epochs of shuffled minibatches, one compiled step, callbacks, resumable.

    def loss(params, batch):                          # any DEQ: a plain loss of (params, batch) -> (loss, aux)
        x, labels = batch
        sol = deq_jax.solve(f, jnp.zeros(...), params["deq"], x, solver="anderson", batch_axis=0)
        return deq_jax.cross_entropy(sol.value @ params["head"], labels), deq_jax.minibatch.solve_metrics(sol)

    result = deq_jax.fit_minibatches(loss, optax.adam(1e-3), params, (x_train, y_train), batch_size=128, epochs=10,
                                     key=jax.random.PRNGKey(0), callbacks=[deq_jax.minibatch.checkpoint("ck.pkl")])
    result.state                                      # MinibatchState(params, opt_state, epoch, step, key, current)
    result.history                                    # one dict per epoch: the steps' metrics aggregated
    result = deq_jax.fit_minibatches(loss, optax.adam(1e-3), deq_jax.minibatch.load_state("ck.pkl"), ...)

A `Model` (`deq_jax.models`) trains the same way through `model_loss(model, "cross_entropy")`, whose batches are
`(phi, y)`. The DELM's full-batch routes (`full_batch_gd`, `make_chunk`, `fit`) are unchanged; this driver serves
minibatch training, where samples change from step to step (so no solver state is carried between steps: every
step's solves start from the loss's own start, e.g. zero).

**What runs.** Each epoch `e` visits the samples in the order `jax.random.permutation(fold_in(key, e), n)`, cut into
`batch_size` slices. One step is `deq_jax.value_and_grad` of the loss (so the implicit backward's statistics are
measured), an optax update, compiled once with `jax.jit` (params and optimizer state donated: a training loop
replaces them). Every batch has the same shape, so nothing is recompiled across batches: the last partial batch
(`n % batch_size` samples) is either dropped (`last_batch="drop"`, the default: each epoch drops other samples,
since the order changes) or filled up with the first samples of the same epoch's order (`last_batch="pad"`: every
sample is seen at least once per epoch, `batch_size - n % batch_size` of them twice). The data moves to the device
whole once if it fits (`device_data=None`: when its bytes are at most `DEVICE_DATA_BYTES`), and the step gathers
its batch there from the batch's indices; otherwise each batch is sliced on the host and moved on its own.

**Metrics.** Every step's metrics are `loss`, `grad_norm`, the loss's aux (a dict of scalars, e.g.
`solve_metrics(solution)`: forward iterations, non-converged solves) and the backward's `BackwardStats` (`backward_
iterations`, `backward_failures`, ...). Each epoch's record holds, for every metric `k`, its mean over the epoch's
steps (`k`) and its maximum (`k_max`), and for integer or boolean metrics the total (`k_total`: e.g. the number of
steps whose forward solve missed its tolerance), with `epoch`, `step`, `steps` and `wall_s`.

**Resuming.** The state holds everything the rest of the run depends on: the parameters, the optimizer state, the
epochs and steps done, the shuffling key, and the current epoch's per-step metrics so far. Started again from a
returned or checkpointed state with the same loss, data and settings, a run takes the same steps on the same batches
as an uninterrupted one, with the same numbers bit for bit (the same compiled step on the same inputs), and the same
epoch records.

This is a host-side driver (a Python loop over compiled steps, like `deq_jax.fit`): not a function to `jit` or
`vmap`; the step inside it is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deq_jax import _checks
from deq_jax._adjoint import value_and_grad
from deq_jax._solution import Solution
from deq_jax.losses import Loss, get_loss

Array = jax.Array
Metrics = dict
#: `device_data=None` moves the whole data set to the device once when it takes at most this many bytes
DEVICE_DATA_BYTES = 1 << 30
LAST_BATCH = ("drop", "pad")


class MinibatchState(NamedTuple):
    """Everything a minibatch run carries, and all that resuming it needs.

    Attributes:
      params: the parameters (a pytree).
      opt_state: the optax optimizer's state.
      epoch: the epochs completed.
      step: the steps completed, in all (`step - epoch * steps_per_epoch` is the position in the current epoch).
      key: the shuffling key (raw key data, uint32): epoch `e`'s order is `permutation(fold_in(key, e), n)`.
      current: the current epoch's per-step metrics so far, host arrays with a leading axis over its steps (empty
        at an epoch's start), so that a run resumed mid-epoch reports the same epoch record.
    """

    params: Any
    opt_state: Any
    epoch: int
    step: int
    key: Any
    current: dict


class MinibatchEvent(NamedTuple):
    """What a callback sees.

    Attributes:
      state: the state after `state.step` steps. Its device arrays are donated to the next step: to keep them,
        copy them (`jax.device_get(event.state)`, as `checkpoint` does).
      epoch_end: True at the end of an epoch, False at an every-k-steps point inside one.
      record: the epoch's record (at its end) or the aggregate of its steps so far; a callback may add entries
        (e.g. test accuracy), which are kept in the run's history (or its `events`).
    """

    state: MinibatchState
    epoch_end: bool
    record: dict


@dataclasses.dataclass
class MinibatchResult:
    """What `fit_minibatches` returns.

    Attributes:
      state: the state after the last step run (pass it back as `start` to continue).
      history: one record per epoch completed in this call (see the module docstring), with what callbacks added.
      events: the records of the every-k-steps callback points, with what callbacks added.
      stopped: whether a callback stopped the run early.
      steps_per_epoch: the steps of one epoch (`n // batch_size` with "drop", rounded up with "pad").
    """

    state: MinibatchState
    history: list
    events: list
    stopped: bool
    steps_per_epoch: int


@dataclasses.dataclass(frozen=True)
class Every:
    """A callback run every `steps` steps (inside epochs too) instead of at each epoch's end (see `every`)."""

    steps: int
    fn: Callable[[MinibatchEvent], Any]

    def __post_init__(self) -> None:
        _checks.check_positive("steps", self.steps, integer=True)
        if not callable(self.fn):
            raise TypeError(f"every(steps, fn): fn must be a callable of a MinibatchEvent; got {self.fn!r}")

    def __call__(self, event: MinibatchEvent) -> Any:
        """Run the wrapped callback."""
        return self.fn(event)


def every(steps: int, fn: Callable[[MinibatchEvent], Any]) -> Every:
    """A callback of `fn` every `steps` steps (counted over the whole run) instead of at each epoch's end.

    Args:
      steps: the period in steps.
      fn: a callable of a `MinibatchEvent`; returning True stops the run there.

    Returns:
      The callback, for `fit_minibatches(..., callbacks=[...])`.
    """
    return Every(steps, fn)


# ----------------------------------------------------------------------------- losses and metrics


def solve_metrics(sol: Solution, prefix: str = "forward_") -> Metrics:
    """A solve's statistics as step metrics: `forward_iterations`, `forward_relative_residual` and
    `forward_not_converged` (1 where the solve missed its rule; with `batch_axis` one sample missing it suffices).

    Args:
      sol: a `Solution` (under `jit`: its fields are tracers, as the step needs).
      prefix: the names' prefix.

    Returns:
      A dict of scalars.
    """
    stats = sol.stats
    return {
        prefix + "iterations": stats.iterations,
        prefix + "relative_residual": stats.relative_residual,
        prefix + "not_converged": jnp.logical_not(stats.converged).astype(jnp.int32),
    }


def model_loss(model: Any, loss: str | Loss, penalty: Callable[[Any], Any] | None = None) -> Callable:
    """`loss(params, batch) -> (L, metrics)` for a `Model` on batches `(phi, y)`: `loss(model.apply(params, phi),
    y) + penalty(params)` with cold solves, and `solve_metrics` of the model's solve (zeros for explicit models).

    Args:
      model: any `deq_jax.Model`.
      loss: a loss `loss(predictions, targets)` or its name (`"square"`, `"cross_entropy"`, `"logistic"`).
      penalty: `penalty(params) -> scalar` added to the loss, or None.

    Returns:
      The loss for `fit_minibatches`.
    """
    loss_fn = get_loss(loss)
    if penalty is not None and not callable(penalty):
        raise TypeError(f"penalty must be a callable penalty(params) -> scalar; got {penalty!r}")

    def fn(params: Any, batch: Any) -> tuple[Array, Metrics]:
        phi, y = batch
        predictions, sol = model.apply(params, phi)
        value = loss_fn(predictions, y) + (0.0 if penalty is None else penalty(params))
        if sol is None:
            zero = jnp.zeros((), jnp.int32)
            return value, {
                "forward_iterations": zero,
                "forward_relative_residual": jnp.zeros((), value.dtype),
                "forward_not_converged": zero,
            }
        return value, solve_metrics(sol)

    return fn


def _check_aux(aux: Any) -> Metrics:
    if aux is None:
        return {}
    if not isinstance(aux, dict) or any(jnp.ndim(v) != 0 for v in aux.values()):
        got = {k: jnp.shape(v) for k, v in aux.items()} if isinstance(aux, dict) else type(aux).__name__
        raise TypeError(
            f"loss(params, batch) must return (loss, aux) with aux None or a dict of scalar metrics (e.g. "
            f"deq_jax.minibatch.solve_metrics(solution)); got aux {got}"
        )
    return aux


def make_minibatch_step(loss: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """`step(params, opt_state, batch) -> (params, opt_state, metrics)`: one optax step on `loss(params, batch) ->
    (L, aux)`, differentiated with `deq_jax.value_and_grad` (so the metrics carry the backward's statistics). Pure:
    `fit_minibatches` compiles it with donation.

    Args:
      loss: `loss(params, batch) -> (scalar loss, aux)`, aux None or a dict of scalar metrics.
      optimizer: an optax transformation.

    Returns:
      The step function.
    """
    if not callable(loss):
        raise TypeError(f"loss must be a callable loss(params, batch) -> (loss, aux); got {loss!r}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax GradientTransformation; got {optimizer!r}")

    def step(params: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, Metrics]:
        (value, aux), grads, backward = value_and_grad(loss, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), **_check_aux(aux), **backward.metrics()}
        return params, opt_state, metrics

    return step


# ----------------------------------------------------------------------------- batches


def _check_data(data: Any) -> int:
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("data must be a pytree (e.g. a tuple) of arrays with one row per sample; got no arrays")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else -1 for leaf in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            f"data's arrays must share their leading (sample) axis; got shapes {[np.shape(x) for x in leaves]}"
        )
    return int(sizes.pop())


def steps_per_epoch(n: int, batch_size: int, last_batch: str = "drop") -> int:
    """The steps of one epoch over `n` samples: `n // batch_size` ("drop") or `ceil(n / batch_size)` ("pad").

    Args:
      n: the samples.
      batch_size: the samples per step.
      last_batch: "drop" or "pad" (see the module docstring).

    Returns:
      The steps per epoch; `ValueError` if "drop" leaves none (`batch_size > n`).
    """
    _checks.check_positive("batch_size", batch_size, integer=True)
    _checks.check_choice("last_batch", last_batch, LAST_BATCH)
    count = n // batch_size if last_batch == "drop" else math.ceil(n / batch_size)
    if count == 0:
        raise ValueError(
            f"batch_size ({batch_size}) exceeds the {n} samples: no full batch to take with last_batch='drop' "
            f"(pass a smaller batch_size or last_batch='pad')"
        )
    return count


@jax.jit
def _permutation(key: Array, epoch: Array, order: Array) -> Array:
    return jax.random.permutation(jax.random.fold_in(key, epoch), order)


def epoch_order(key: Any, epoch: int, n: int, batch_size: int, last_batch: str = "drop") -> np.ndarray:
    """The sample indices of epoch `epoch`, `(steps_per_epoch, batch_size)`: row `k` is step `k`'s batch.

    Args:
      key: the run's shuffling key.
      epoch: the epoch (0-based).
      n: the samples.
      batch_size: the samples per step.
      last_batch: "drop" or "pad".

    Returns:
      An int32 array.
    """
    count = steps_per_epoch(n, batch_size, last_batch)
    order = np.asarray(_permutation(jnp.asarray(key), jnp.asarray(epoch, jnp.uint32), jnp.arange(n, dtype=jnp.int32)))
    if count * batch_size > n:  # "pad": fill the last batch with the epoch's first samples
        order = np.concatenate([order, order[: count * batch_size - n]])
    return order[: count * batch_size].reshape(count, batch_size).astype(np.int32)


def _take(data: Any, indices: np.ndarray) -> Any:
    return jax.tree.map(lambda a: np.asarray(a)[indices], data)


def _nbytes(data: Any) -> int:
    return sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree.leaves(data))


def _raw_key(key: Any) -> Array:
    key = jnp.asarray(key) if not isinstance(key, int) else jax.random.PRNGKey(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.dtype != jnp.uint32:
        raise TypeError(
            f"key must be a PRNG key (jax.random.PRNGKey(seed) or jax.random.key(seed)) or an int; got {key}"
        )
    return key


# ----------------------------------------------------------------------------- aggregation


def aggregate(metrics: dict) -> dict:
    """An epoch's record from its per-step metrics (arrays with a leading axis over steps): `k` the mean, `k_max`
    the maximum, and for integer or boolean metrics `k_total` the sum; `steps` the count.

    Args:
      metrics: name -> per-step values.

    Returns:
      A dict of Python numbers.
    """
    record: dict = {}
    for name, raw in metrics.items():
        values = np.asarray(raw)
        if values.size == 0:
            continue
        counts = values.dtype == bool or np.issubdtype(values.dtype, np.integer)
        as_float = values.astype(np.float64)
        record[name] = float(np.mean(as_float))
        record[f"{name}_max"] = float(np.max(as_float))
        if counts:
            record[f"{name}_total"] = int(np.sum(values.astype(np.int64)))
    record["steps"] = int(next((np.size(v) for v in metrics.values()), 0))
    return record


def _append(current: dict, fetched: list[dict]) -> dict:
    if not fetched:
        return current
    out = {}
    for name in fetched[0]:
        new = np.stack([np.asarray(m[name]) for m in fetched])
        out[name] = np.concatenate([current[name], new]) if name in current else new
    return out


# ----------------------------------------------------------------------------- the run


def _compiled_step(loss: Callable, optimizer: Any, whole: bool, donate: bool) -> Callable:
    """The jitted step, kept per (loss, optimizer) object: a run resumed in the same process reuses its
    compilation (objects that cannot be hashed get a new one)."""
    try:
        hash((loss, optimizer))
    except TypeError:
        return _jitted_step.__wrapped__(loss, optimizer, whole, donate)
    return _jitted_step(loss, optimizer, whole, donate)


@functools.lru_cache(maxsize=16)
def _jitted_step(loss: Callable, optimizer: Any, whole: bool, donate: bool) -> Callable:
    step = make_minibatch_step(loss, optimizer)
    donated = (0, 1) if donate else ()
    if not whole:
        return jax.jit(step, donate_argnums=donated)

    def gathered(params: Any, opt_state: Any, data: Any, indices: Array) -> Any:
        return step(params, opt_state, jax.tree.map(lambda a: a[indices], data))

    return jax.jit(gathered, donate_argnums=donated)


def initial_state(params: Any, optimizer: optax.GradientTransformation, key: Any) -> MinibatchState:
    """The state of a new run: `optimizer.init(params)`, no epochs or steps done.

    Args:
      params: the initial parameters.
      optimizer: the optax transformation.
      key: a PRNG key (or an int seed) for the epochs' shuffling.

    Returns:
      A `MinibatchState`.
    """
    return MinibatchState(params, optimizer.init(params), 0, 0, _raw_key(key), {})


def fit_minibatches(
    loss: Callable,
    optimizer: optax.GradientTransformation,
    start: Any,
    data: Any,
    *,
    batch_size: int,
    epochs: int,
    key: Any = None,
    last_batch: str = "drop",
    callbacks: Sequence[Callable[[MinibatchEvent], Any]] = (),
    device_data: bool | None = None,
    donate: bool = True,
) -> MinibatchResult:
    """Train with `optimizer` on `loss` over shuffled minibatches of `data` until `epochs` epochs are done.

    Args:
      loss: `loss(params, batch) -> (scalar loss, aux)`, `batch` shaped like `data` with `batch_size` rows, aux
        None or a dict of scalar metrics; for a `Model`, `model_loss(model, "cross_entropy")`.
      optimizer: an optax transformation.
      start: the initial parameters (then `key` is required), or a `MinibatchState` to resume from (returned by an
        earlier call, or `load_state`).
      data: a pytree (e.g. a tuple `(x, y)`) of host (NumPy) arrays sharing their leading sample axis.
      batch_size: samples per step.
      epochs: the epochs of the whole run (a resumed run stops at the same total).
      key: a PRNG key or int seed for the shuffling (new runs only).
      last_batch: "drop" (default) or "pad": what happens to the last `n % batch_size` samples (module docstring).
      callbacks: callables of a `MinibatchEvent`, run at each epoch's end, or every k steps when wrapped by
        `every(k, fn)`; any that returns True stops the run there (the state returned is resumable).
      device_data: True: move the whole data set to the device once; False: one batch at a time; None: whole if it
        takes at most `DEVICE_DATA_BYTES`.
      donate: donate the params and optimizer state to the compiled step (a copy of `start` is taken first, so the
        caller's arrays stay valid).

    Returns:
      A `MinibatchResult`.
    """
    _checks.check_positive("epochs", epochs, integer=True)
    n = _check_data(data)
    count = steps_per_epoch(n, batch_size, last_batch)
    for callback in callbacks:
        if not callable(callback):
            raise TypeError(f"callbacks must be callables of a MinibatchEvent; got {callback!r}")
    if isinstance(start, MinibatchState):
        if key is not None:
            raise ValueError("key: a resumed run keeps its state's shuffling key; pass key=None with a MinibatchState")
        state = start._replace(key=_raw_key(start.key), current=dict(start.current))
        position = state.step - state.epoch * count
        if not 0 <= position < count or state.epoch > epochs:
            raise ValueError(
                f"start: a state at epoch {state.epoch}, step {state.step} does not fit {count} steps per epoch "
                f"(n = {n}, batch_size = {batch_size}, last_batch = {last_batch!r}) and epochs = {epochs}: resume "
                f"with the settings of the run that wrote it"
            )
    else:
        if key is None:
            raise ValueError("key: a new run needs a PRNG key (or an int seed) for the shuffling; got None")
        state = initial_state(start, optimizer, key)
    # a copy on the device: the compiled step donates its inputs, and the caller keeps its own arrays
    state = state._replace(
        params=jax.tree.map(lambda a: jnp.array(a, copy=True), state.params),
        opt_state=jax.tree.map(lambda a: jnp.array(a, copy=True), state.opt_state),
    )
    whole = _nbytes(data) <= DEVICE_DATA_BYTES if device_data is None else bool(device_data)
    compiled = _compiled_step(loss, optimizer, whole, donate)
    if whole:
        on_device = jax.device_put(data)
        run_step = lambda params, opt_state, indices: compiled(params, opt_state, on_device, indices)
    else:
        run_step = lambda params, opt_state, indices: compiled(params, opt_state, jax.device_put(_take(data, indices)))

    periodic = [c for c in callbacks if isinstance(c, Every)]
    at_epoch_end = [c for c in callbacks if not isinstance(c, Every)]
    history: list = []
    events: list = []
    stopped = False
    params, opt_state = state.params, state.opt_state
    epoch_started = time.perf_counter()
    while state.epoch < epochs and not stopped:
        order = epoch_order(state.key, state.epoch, n, batch_size, last_batch)
        pending: list[dict] = []
        for k in range(state.step - state.epoch * count, count):
            params, opt_state, metrics = run_step(params, opt_state, order[k])
            pending.append(metrics)
            state = state._replace(params=params, opt_state=opt_state, step=state.step + 1)
            periodic_due = [c for c in periodic if state.step % c.steps == 0]
            if periodic_due and k + 1 < count:  # at an epoch's end, the epoch's event below serves them
                state = state._replace(current=_append(state.current, jax.device_get(pending)))
                pending = []
                record = dict(aggregate(state.current), epoch=state.epoch, step=state.step)
                event = MinibatchEvent(state, False, record)
                answers = [bool(c(event)) for c in periodic_due]  # all of them, not any()'s short circuit
                events.append(record)
                if any(answers):
                    stopped = True
                    break
        if stopped:
            break
        current = _append(state.current, jax.device_get(pending))
        state = state._replace(epoch=state.epoch + 1, current={})
        record = dict(aggregate(current), epoch=state.epoch, step=state.step)
        record["wall_s"] = time.perf_counter() - epoch_started
        event = MinibatchEvent(state, True, record)
        due = at_epoch_end + [c for c in periodic if state.step % c.steps == 0]
        answers = [bool(c(event)) for c in due]
        history.append(record)
        stopped = any(answers)
        epoch_started = time.perf_counter()
    return MinibatchResult(state, history, events, stopped, count)


# ----------------------------------------------------------------------------- evaluation and checkpoints


def evaluate(fn: Callable, params: Any, data: Any, *, batch_size: int) -> dict:
    """The means over all samples of `fn(params, batch) -> {name: per-sample values (batch,)}`, in batches.

    The last partial batch is padded and the padding masked out, so the means are over exactly the `n` samples
    and `fn` compiles once (jit it yourself and pass the jitted function to reuse the compilation across calls).

    Args:
      fn: `fn(params, batch) -> dict` of arrays of shape `(batch,)` (e.g. `{"accuracy": argmax(logits) == y}`).
      params: the parameters.
      data: a pytree of host arrays sharing their leading sample axis.
      batch_size: samples per call of `fn`.

    Returns:
      name -> the mean over the samples (a Python float).
    """
    n = _check_data(data)
    _checks.check_positive("batch_size", batch_size, integer=True)
    sums: dict = {}
    for start in range(0, n, batch_size):
        indices = np.arange(start, start + batch_size) % n
        valid = min(batch_size, n - start)
        out = fn(params, _take(data, indices))
        for name, values in out.items():
            if jnp.shape(values) != (batch_size,):
                raise ValueError(
                    f"fn must return per-sample values of shape ({batch_size},); got {name!r} of shape "
                    f"{jnp.shape(values)}"
                )
            part = np.asarray(values, np.float64)[:valid].sum()
            sums[name] = sums.get(name, 0.0) + part
    return {name: float(total / n) for name, total in sums.items()}


def evaluation(fn: Callable, data: Any, *, batch_size: int, prefix: str = "test_") -> Callable:
    """A callback that adds `evaluate(fn, state.params, data)` to the event's record, names prefixed.

    Args:
      fn: `fn(params, batch) -> dict` of per-sample values; compiled once here.
      data: a pytree of host arrays (e.g. the test set).
      batch_size: samples per call of `fn`.
      prefix: prepended to every name (default "test_").

    Returns:
      The callback (wrap it in `every(k, ...)` to run it every k steps).
    """
    compiled = jax.jit(fn)

    def callback(event: MinibatchEvent) -> None:
        values = evaluate(compiled, event.state.params, data, batch_size=batch_size)
        event.record.update({prefix + name: value for name, value in values.items()})

    return callback


def save_state(path: str | os.PathLike, state: MinibatchState) -> None:
    """Write `state` (copied to the host) to `path` atomically: a complete file or the previous one, never half.

    Args:
      path: the file to write (a pickle: load only files you wrote, with `load_state`).
      state: the state to keep.
    """
    path = os.fspath(path)
    host = jax.device_get(state)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pkl")
    try:
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(tuple(host), fh, protocol=pickle.HIGHEST_PROTOCOL)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_state(path: str | os.PathLike) -> MinibatchState:
    """The `MinibatchState` written by `save_state` (host arrays): pass it to `fit_minibatches` as `start`.

    Args:
      path: the file `save_state` wrote (a pickle: only load files you trust).

    Returns:
      The state.
    """
    with open(path, "rb") as fh:
        fields = pickle.load(fh)  # our own format; the docstring says: trusted files only
    return MinibatchState(*fields)


def checkpoint(path: str | os.PathLike) -> Callable[[MinibatchEvent], None]:
    """A callback that saves the state to `path` (atomically) at each event: every epoch, or every k steps when
    wrapped by `every(k, ...)`.

    Args:
      path: the checkpoint file.

    Returns:
      The callback.
    """

    def callback(event: MinibatchEvent) -> None:
        save_state(path, event.state)

    return callback
