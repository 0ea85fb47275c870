"""The host-side training loop: compiled chunks of steps, and callbacks between them.

    step = make_step(model, "square", learning_rate=0.1)
    run = make_chunk(step, 100)                                    # 100 steps per compiled call
    result = fit(run, step.init(params, phi), phi, y, steps=1000, chunk=100,
                 callbacks=[lambda event: print(event.done, event.metrics["loss"][-1])])

A callback sees a `ChunkEnd` after every chunk (the steps done, the state, the chunk's metrics on the host) and
returns True to stop there; progress bars, checkpoints and stopping rules are callbacks. `start` resumes a run
whose first `start` steps were done before (e.g. restored from a checkpoint). `run` may be any callable with the
signature of `make_chunk`'s result, e.g. an ahead-of-time compiled one (`jax.jit(...).lower(...).compile()`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from deq_jax import _checks

Metrics = dict


class ChunkEnd(NamedTuple):
    """What a callback sees after a chunk: steps `[start, done)` were just run, out of `total`.

    Attributes:
      start: the first step of the chunk.
      done: the steps done after it.
      total: the steps the run asked for.
      state: the training state after the chunk.
      metrics: the chunk's per-step metrics, NumPy arrays with a leading axis of length `done - start`.
    """

    start: int
    done: int
    total: int
    state: Any
    metrics: Metrics


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      state: the state after the last chunk run.
      history: the kept metrics of every step run, NumPy arrays with a leading axis over steps.
      steps: the steps done (counting the `start` steps done before).
      stopped: whether a callback stopped the run early.
    """

    state: Any
    history: Metrics
    steps: int
    stopped: bool


def stop_on_divergence(event: ChunkEnd) -> bool:
    """A callback: stop once the loss is NaN/inf (the rest of the run would compute NaN).

    Args:
      event: the chunk that just ended; its metrics must hold `"loss"`.

    Returns:
      True (stop) when any step of the chunk had a non-finite loss.
    """
    return not bool(np.all(np.isfinite(event.metrics["loss"])))


def fit(
    run: Callable,
    state: Any,
    phi: Any,
    y: Any,
    *,
    steps: int,
    chunk: int,
    start: int = 0,
    callbacks: Sequence[Callable[[ChunkEnd], bool | None]] = (),
    keep: Sequence[str] | None = None,
) -> FitResult:
    """Run `run(state, phi, y) -> (state, metrics)` (`chunk` steps per call) until `steps` steps are done.

    Args:
      run: `run(state, phi, y) -> (state, metrics)`, `chunk` steps per call (`make_chunk`'s result, or any callable
        with its signature, e.g. an ahead-of-time compiled one).
      state: the state to start from.
      phi: the features, passed to every call of `run`.
      y: the targets, passed to every call of `run`.
      steps: the steps of the whole run, a multiple of `chunk`.
      chunk: the steps per call of `run`.
      start: the steps done before (a resumed run), a multiple of `chunk`.
      callbacks: functions of a `ChunkEnd`, each called after every chunk; any that returns True ends the run
        after that chunk.
      keep: the names of the metrics kept in the returned history (None: all).

    Returns:
      A `FitResult`.
    """
    _checks.check_positive("steps", steps, integer=True)
    _checks.check_positive("chunk", chunk, integer=True)
    if steps % chunk or start % chunk or not 0 <= start <= steps:
        raise ValueError(
            f"steps ({steps}) and start ({start}) must be multiples of chunk ({chunk}), 0 <= start <= steps"
        )
    kept: dict[str, list] = {}
    done, stopped = start, False
    while done < steps and not stopped:
        state, metrics = run(state, phi, y)
        metrics = jax.device_get(metrics)
        for name, values in metrics.items():
            if keep is None or name in keep:
                kept.setdefault(name, []).append(np.asarray(values))
        event = ChunkEnd(done, done + chunk, steps, state, metrics)
        done += chunk
        answers = [bool(callback(event)) for callback in callbacks]  # all of them, not any()'s short circuit
        stopped = any(answers)
    history = {name: np.concatenate(parts) for name, parts in kept.items()}
    return FitResult(state=state, history=history, steps=done, stopped=stopped)
