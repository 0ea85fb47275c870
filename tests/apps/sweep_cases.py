"""Sweep problems shared by the sweep's test files (in-process, the command, several processes).

Every test that runs a sweep uses `TINY` or a config whose programs equal one of TINY's groups, so the process
compiles each program once (`experiments.sweep.run` keeps them) and the suite's time stays in its budget.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile

from experiments.common.config import from_dict
from experiments.sweep.config import SweepConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: XLA compiles these small programs ~3x faster at optimisation level 0; it changes speed, not results
FAST = {"xla_backend_optimization_level": 0}
FAST_FLAG = "--xla_backend_optimization_level=0"

DATA = {"dataset": "digits", "n_train": 60, "n_test": 20, "features": "pca_whiten", "pca_dim": 6}  # m = 7
TINY = {
    # float64 (the suite enables x64): batched, mapped, sharded and standalone programs then agree to rounding
    "name": "tiny",
    # two data sets of equal shapes: their groups share compiled programs
    "datasets": [DATA, {**DATA, "label": "digits_b", "seed": 1}],
    "grid": {"seeds": [0, 1, 2], "learning_rates": [0.02, 0.05], "gammas": [0.5, 0.8], "models": ["delm", "linear"],
             "losses": ["square"]},
    "steps": 10, "log_every": 5, "dtype": "float64", "save_params": True,
}


def tiny(**changes) -> SweepConfig:
    return from_dict(SweepConfig, {**TINY, **changes})


@functools.lru_cache(maxsize=None)
def base_result():
    """TINY run once per test process (in a temporary folder) and shared."""
    from experiments.sweep.run import run_sweep

    out = tempfile.mkdtemp(prefix="sweep_base_")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return run_sweep(tiny(output_dir=out), progress=False, compiler_options=FAST)


def subprocess_env(devices: int | None = None, x64: bool = False) -> dict:
    """The environment for a child `python -m experiments ...`: CPU, one BLAS thread, fast compiles."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    flags = [FAST_FLAG] + ([f"--xla_force_host_platform_device_count={devices}"] if devices else [])
    env.update(OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=" ".join(flags),
               PYTHONUNBUFFERED="1")
    if x64:
        env["JAX_ENABLE_X64"] = "1"
    return env


PYTHON = sys.executable
