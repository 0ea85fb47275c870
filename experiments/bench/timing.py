"""Running and timing the rows of a suite, all in one process.

Every row is built (compiled), run once (its first step, with the process's resident memory sampled), warmed up
and checked; then the timed steps of all rows are interleaved round by round, so that the load of a shared machine
hits every row alike. A training-run row (`experiments/bench/training.py`) carries its state from step to step:
its untimed steps are `warm_steps` steps of the run, each of its timed steps is the run's next step, and after the
timed steps it records every step's metrics and is checked a second time, at its then state. Ratios between two
rows are taken round by round (`paired_ratio`): both rows of a round ran back to back, under the same load. Each
row records every timed step, their min and their median.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments.bench.checks import verify, verify_again
from experiments.bench.problem import Problem
from experiments.bench.protocol import Case
from experiments.common import interrupts


@dataclasses.dataclass(frozen=True)
class Settings:
    """How rows are timed (the CLI's --repeats, --slow-repeats, --warmup, --settle, --max-temp-gb)."""

    repeats: int = 5
    slow_repeats: int = 3  # timed steps for rows whose first step took over `slow_s`
    warmup: int = 1  # untimed steps after compiling (the first, memory-sampled step counts as one)
    warm_steps: int = 5  # untimed steps of a training-run row (the first counts as one)
    settle_s: float = 0.25  # untimed pause before each step: PyTorch's OpenMP threads spin after a parallel region
    max_temp_gb: float = 4.0  # rows whose XLA temporary memory exceeds this are compiled, not run
    slow_s: float = 1.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Samples the process's resident memory every ~0.5 ms while active; `.delta` = peak minus the start.

    A coarse, implementation-neutral measure of the memory one step touches on the CPU (allocators may keep
    freed memory, so it is taken on the first run after building the row).
    """

    def __init__(self):
        self.delta: int | None = None

    def __enter__(self):
        if not os.path.exists("/proc/self/statm"):
            return self
        self._start = _rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, _rss_bytes())
                time.sleep(0.0005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.delta = self._peak - self._start
        return False


def _row_base(case: Case, tol: float) -> dict:
    return {
        "name": case.name,
        "impl": case.impl,
        "problem": case.problem,
        "formulation": case.formulation,
        "solver": case.solver,
        "backward": case.backward,
        "label": case.label,
        "note": case.note,
        "approximate_gradient": case.approximate_gradient,
        "tol": tol,
        "status": "ok",
        "times_s": [],
    }


def run_cases(
    cases: list[Case],
    p: Problem,
    settings: Settings,
    direct: dict | None,
    device: Any,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Prepare (compile), warm up and check every row, then time them round-robin. A row that fails is recorded
    with its error (status "error") and the others still run; a row over the memory limit is "skipped"."""
    rows, ready = [], []
    for case in cases:
        tol = case.tol if case.tol is not None else p.tol
        row = _row_base(case, tol)
        rows.append(row)
        interrupts.check()
        try:
            prepared = case.prepare()
            row["compile_s"] = prepared.compile_s
            row["temp_bytes"] = prepared.temp_bytes
            if prepared.temp_bytes is not None and prepared.temp_bytes > settings.max_temp_gb * 2**30:
                row["status"] = "skipped"
                row["note"] = (
                    f"XLA temporary memory {prepared.temp_bytes / 2**30:.1f} GiB exceeds --max-temp-gb "
                    f"{settings.max_temp_gb:g}; compiled, not run"
                )
                log(f"  skip  {case.name}: {row['note']}")
                continue
            if prepared.reset:
                prepared.reset()
            time.sleep(settings.settle_s)
            with RssPeak() as rss:
                start = time.perf_counter()
                prepared.run()
                row["first_step_s"] = time.perf_counter() - start
            row["rss_peak_delta_bytes"] = rss.delta
            untimed = max(settings.warm_steps if prepared.after_timing else settings.warmup, 1)
            row["untimed_steps"] = untimed
            last = row["first_step_s"]
            for _ in range(untimed - 1):
                interrupts.check()
                start = time.perf_counter()
                prepared.run()
                last = time.perf_counter() - start
            if prepared.peak_memory is not None:
                row["device_peak_bytes"] = prepared.peak_memory()
            verify(row, prepared.check(), p, tol, direct, device)
        except Exception as err:  # a row that fails is reported as failed, and the others still run (an
            # interrupt is a KeyboardInterrupt, not an Exception: it stops the run)
            row["status"] = "error"
            row["error"] = f"{type(err).__name__}: {err}"
            row["traceback"] = traceback.format_exc(limit=6)
            log(f"  ERROR {case.name}: {row['error']}")
            continue
        slow = last > settings.slow_s  # the last untimed step: a training run's first step is not typical
        row["repeats"] = min(settings.repeats, settings.slow_repeats) if slow else settings.repeats
        ready.append((row, prepared))
        compile_s = "-" if row.get("compile_s") is None else f"{row['compile_s']:.2f} s"
        log(
            f"  ready {case.name}: compile {compile_s}, first step {row['first_step_s']:.3f} s, "
            f"iterations {row['iterations']}, residual {row['relative_residual']:.2e}"
        )
    rounds = max((row["repeats"] for row, _ in ready), default=0)
    for r in range(rounds):
        for row, prepared in ready:
            if len(row["times_s"]) >= row["repeats"]:
                continue
            if prepared.reset:
                prepared.reset()
            interrupts.check()
            time.sleep(settings.settle_s)  # measured: a JAX step right after a PyTorch one took 24 ms instead of 14-17
            start = time.perf_counter()
            prepared.run()
            row["times_s"].append(time.perf_counter() - start)
        log(f"  timing round {r + 1}/{rounds} done")
    for row, prepared in ready:
        row["min_s"] = float(np.min(row["times_s"]))
        row["median_s"] = float(np.median(row["times_s"]))
        if prepared.after_timing is not None:
            _finish_training_run(row, prepared, p, device, log)
    return rows


def _finish_training_run(row: dict, prepared: Any, p: Problem, device: Any, log: Callable[[str], None]) -> None:
    """A training run's per-step record, and its second independent check (at its state after the timed steps)."""
    try:
        record, chk = prepared.after_timing(row["untimed_steps"])
        row.update(record)
        verify_again(row, chk, p, row["tol"], device, "check_after_timing")
    except Exception as err:  # the timings stand; the row is failed, as one whose check cannot run
        row["status"] = "error"
        row["error"] = f"{type(err).__name__} after the timed steps: {err}"
        row["traceback"] = traceback.format_exc(limit=6)
        log(f"  ERROR {row['name']}: {row['error']}")
        return
    if not row["loss_fell"]:
        row["note"] = (
            row.get("note", "") + f"; the loss did not fall over the run ({row['loss_first']:.4g} -> "
            f"{row['loss_last']:.4g})"
        ).lstrip("; ")


def paired_ratio(a: dict, b: dict) -> float:
    """Median over the timing rounds of `a`'s time / `b`'s time in the same round (robust to a machine whose load
    drifts: the rows of one round run back to back)."""
    k = min(len(a["times_s"]), len(b["times_s"]))
    return float(np.median(np.asarray(a["times_s"][:k]) / np.asarray(b["times_s"][:k])))
