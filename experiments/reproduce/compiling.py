"""Compiling the main job's training programs: ahead of time in one background thread, kept by signature.

Each experiment's plan lists its programs (`runs.RunSpec`); `precompile` starts compiling them in order in one
background thread (XLA compiles outside the GIL; compiling executes nothing) while the main thread computes features
and optima, and `compiled` hands a run its program (waiting, at a safe point for Ctrl-C, if it is still compiling).

Every program is compiled with XLA:CPU's YNNPACK library fusions off (`SAFE_OPTIONS`, where this jaxlib knows the
option). With jaxlib 0.10.2 an executable compiled while another thread compiles could keep a corrupt YNNPACK runtime
and return NaN on every call (docs/theory.md section 13: seen as the cross-entropy optimum's intermittent W = 0); this
job compiles in two threads by design, so none of its programs uses those fusions. XLA's own CPU emitters do the same
arithmetic. They also compile at LLVM optimisation level 1 (`DEFAULT_OPTIONS`, measured: less compile time, the
same execution time).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from experiments.common import interrupts

#: XLA options that keep compilation in two threads safe (see the module docstring)
SAFE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
#: LLVM optimisation level 1 instead of XLA's default: ~20% less compile time for the job's training programs, the
#: same execution time to within noise (measured on the digits config's DELM programs: 4.4 -> 3.4 s, 10.0 -> 8.1 s;
#: per chunk 10.9 -> 10.0 ms, 43.6 -> 40.7 ms); compilation is most of `make run`
DEFAULT_OPTIONS = {"xla_backend_optimization_level": 1}
_supported: bool | None = None
_probe_lock = threading.Lock()

#: background compile threads: one, in the plan's order, so that the program needed next is the one compiling
#: (two were slower on the shared 2-core machine: the first run waited for a program that shared its core)
WORKERS = 1
_COMPILED: dict = {}  # signature -> Future (being compiled in the background) or a compiled program
_COMPILED_LOCK = threading.Lock()
_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
_MEASURE: concurrent.futures.ThreadPoolExecutor | None = None


def options(extra: dict | None = None) -> dict:
    """`SAFE_OPTIONS` and `DEFAULT_OPTIONS` where this jaxlib and backend accept them (probed once with a tiny
    compile), then `extra` (which may override them)."""
    global _supported
    with _probe_lock:
        if _supported is None:
            try:
                jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options={**SAFE_OPTIONS, **DEFAULT_OPTIONS})
                _supported = True
            except Exception:  # another XLA version or backend without the options
                _supported = False
    return {**({**SAFE_OPTIONS, **DEFAULT_OPTIONS} if _supported else {}), **(extra or {})}


def signature(program: Callable, args: tuple, opts: dict | None) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return (
        program,
        treedef,
        tuple((tuple(x.shape), jnp.dtype(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves),
        repr(opts),
    )


def precompile(jobs: Sequence[tuple[Callable, tuple, dict | None]]) -> None:
    """Start compiling `(program, abstract_args, extra_options)` jobs, in order, in one background thread
    (duplicates are skipped)."""
    global _EXECUTOR
    with _COMPILED_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="precompile")
        for program, args, extra in jobs:
            opts = options(extra)
            sig = signature(program, args, opts)
            if sig not in _COMPILED:
                _COMPILED[sig] = _EXECUTOR.submit(
                    lambda p=program, a=args, o=opts: p.lower(*a).compile(compiler_options=o)
                )


class Job:
    """A `background` computation: `fn` and its future."""

    def __init__(self, fn: Callable[[], Any], future: concurrent.futures.Future):
        self.fn, self.future = fn, future


def background(fn: Callable[[], Any]) -> Job:
    """Run `fn()` in the measurement thread (one, in submission order): an experiment's measurements that need no
    training run (optima, spectra, step sizes: mostly the compilation of the library's programs) are computed there
    while the main thread trains. `wait` collects the result."""
    global _MEASURE
    with _COMPILED_LOCK:
        if _MEASURE is None:
            _MEASURE = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="measure")
        return Job(fn, _MEASURE.submit(fn))


def wait(job: Job) -> Any:
    """The result of a `background` job (its exception re-raised here): computed here if it has not started,
    else waited for at a safe point for Ctrl-C."""
    if job.future.cancel():
        return job.fn()
    while not job.future.done():
        concurrent.futures.wait([job.future], timeout=0.2)
        interrupts.check()
    return job.future.result()


def stop_precompiling() -> None:
    """Cancel the compilations and measurements not yet started (the ones in progress finish)."""
    global _EXECUTOR, _MEASURE
    with _COMPILED_LOCK:
        if _EXECUTOR is not None:
            _EXECUTOR.shutdown(wait=False, cancel_futures=True)
            _EXECUTOR = None
        if _MEASURE is not None:
            _MEASURE.shutdown(wait=False, cancel_futures=True)
            _MEASURE = None
        for sig in [s for s, v in _COMPILED.items() if isinstance(v, concurrent.futures.Future) and v.cancelled()]:
            del _COMPILED[sig]


def compiled(program: Callable, args: tuple, extra: dict | None = None) -> Callable:
    """The compiled `program` for these (concrete or abstract) arguments: precompiled, or compiled here (and kept)."""
    opts = options(extra)
    sig = signature(program, args, opts)
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
        except Exception:  # compiling again here raises the error in context, if it is real
            entry = None
    if entry is None:
        entry = program.lower(*args).compile(compiler_options=opts)
    with _COMPILED_LOCK:
        _COMPILED[sig] = entry
    return entry


def jit(fn: Callable, **jit_kwargs: Any) -> Callable:
    """`jax.jit(fn)` with the safe options, for the job's small programs that are compiled in the main thread while
    the background thread compiles (monitors, measurements)."""
    holder: dict = {}

    def call(*args, **kwargs):
        if "jitted" not in holder:
            holder["jitted"] = jax.jit(fn, compiler_options=options(), **jit_kwargs)
        return holder["jitted"](*args, **kwargs)

    return call
