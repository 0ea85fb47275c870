"""Sweep problems shared by the sweep's test files (in-process, the command, several processes), and the
standalone runs (the main job's code path) that the sweep's numbers are checked against.

Every test that runs a sweep uses `TINY` or a config whose programs equal one of TINY's groups, so the process
compiles each program once (`experiments.sweep.run` keeps them) and the suite's time stays in its budget.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import shutil
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from helpers import ROOT

from deq_jax import TanhMap, models, solve, train
from experiments.common.config import from_dict
from experiments.sweep import data as sweep_data
from experiments.sweep.config import SweepConfig
from experiments.sweep.run import run_sweep

#: XLA compiles these small programs ~3x faster at optimisation level 0; it changes speed, not results
FAST = {"xla_backend_optimization_level": 0}
FAST_FLAG = "--xla_backend_optimization_level=0"

DATA = {"dataset": "digits", "n_train": 60, "n_test": 20, "features": "pca_whiten", "pca_dim": 6}  # m = 7
TINY = {
    # float64 (the suite enables x64): batched, mapped, sharded and standalone programs then agree to rounding
    "name": "tiny",
    # two data sets of equal shapes: their groups share compiled programs
    "datasets": [DATA, {**DATA, "label": "digits_b", "seed": 1}],
    "grid": {
        "seeds": [0, 1, 2],
        "learning_rates": [0.02, 0.05],
        "gammas": [0.5, 0.8],
        "models": ["delm", "linear"],
        "losses": ["square"],
    },
    "steps": 10,
    "log_every": 5,
    "dtype": "float64",
    "save_params": True,
}


def tiny(**changes) -> SweepConfig:
    return from_dict(SweepConfig, {**TINY, **changes})


@functools.cache
def base_result():
    """TINY run once per test process (in a temporary folder) and shared."""

    out = tempfile.mkdtemp(prefix="sweep_base_")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return run_sweep(tiny(output_dir=out), progress=False, compiler_options=FAST)


def subprocess_env(devices: int | None = None, x64: bool = False) -> dict:
    """The environment for a child `python -m experiments ...`: CPU, one BLAS thread, fast compiles."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    flags = [FAST_FLAG] + ([f"--xla_force_host_platform_device_count={devices}"] if devices else [])
    env.update(
        OPENBLAS_NUM_THREADS="1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
        XLA_FLAGS=" ".join(flags),
        PYTHONUNBUFFERED="1",
    )
    if x64:
        env["JAX_ENABLE_X64"] = "1"
    return env


PYTHON = sys.executable


# float64 runs of 10 GD steps: batched, mapped, sharded and standalone programs differ only in the order of
# reductions (~1e-16 each); 1e-9 relative leaves room for 10 steps of growth and is 1e6 times below what a wrong
# key, gamma or learning rate changes (1e-3 and more)
RTOL = 1e-9


def standalone_run(model_for, loss: str, steps: int):
    """The main job's code path, written here without the sweep: `model.init(PRNGKey(seed))` + `full_batch_gd`, one
    configuration per call (gamma an argument, so that one compiled program serves every gamma)."""

    def run(key, gamma, learning_rate, phi, y):
        model = model_for(gamma)
        params = model.init(key, phi.dtype)
        params, history = train.full_batch_gd(model, loss, params, phi, y, learning_rate=learning_rate, steps=steps)
        final, _ = train.objective(model, loss)(params, phi, y)
        return params, history["loss"], final

    compiled = []

    def call(*args):
        if not compiled:  # one compiled program for every configuration (FAST: compile time, not results)
            compiled.append(jax.jit(run).lower(*args).compile(compiler_options=FAST))
        return compiled[0](*args)

    return call


def check_against_standalone(result, models_for: dict, *, n_expected: int):
    cfg = result.config
    pre = sweep_data.load_datasets(cfg)
    runs = {}
    compared = 0
    for c in result.configurations:
        fd = sweep_data.prepare_features(pre[c.dataset], c.width, jnp.dtype(cfg.dtype))
        key = (c.model, c.loss)
        if key not in runs:
            runs[key] = standalone_run(models_for[c.model](fd.phi_train.shape[1], fd.num_classes), c.loss, cfg.steps)
        params, losses, final = runs[key](
            jax.random.PRNGKey(c.seed),
            np.float64(c.gamma or 0.5),
            np.float64(c.learning_rate),
            fd.phi_train,
            fd.targets(c.loss),
        )
        rows = [r for r in result.rows if r["config_id"] == c.config_id]
        assert [r["step"] for r in rows] == [*range(0, cfg.steps, cfg.log_every), cfg.steps]
        want = np.append(np.asarray(losses)[:: cfg.log_every], float(final))
        got = np.asarray([r["train_loss"] for r in rows])
        assert np.all(np.isfinite(got)) and got[-1] < got[0], "trained, not diverged"
        np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"config {c.config_id} losses")
        for leaf, ref in zip(
            jax.tree_util.tree_leaves(result.final_params[c.config_id]), jax.tree_util.tree_leaves(params), strict=True
        ):
            np.testing.assert_allclose(leaf, ref, rtol=RTOL, atol=1e-12, err_msg=f"config {c.config_id} params")
        compared += 1
    assert compared == n_expected
    gaps = [r["gap"] for r in result.rows if r["gap"] is not None]
    assert not gaps or min(gaps) > -1e-9  # L* is the optimum: no run trains below it
    finals = [r["train_loss"] for r in result.rows if r["final"]]
    assert len(set(np.round(finals, 9))) == len(finals)  # distinct runs, not one configuration repeated


BUILTIN = {
    "delm": lambda m, k: lambda gamma: models.DELM(width=m, out_dim=k, gamma=gamma),
    "linear": lambda m, k: lambda gamma: models.Linear(width=m, out_dim=k),
    "deep_linear": lambda m, k: lambda gamma: models.DeepLinear(width=m, out_dim=k, depth=2),
}


@dataclasses.dataclass(frozen=True)
class TanhDEQ:
    """A user's own DEQ, built on the library's public API only: z* = tanh(z* W_c^T + phi U^T + b) with
    |W_c| <= contraction, predictions z* B^T."""

    width: int
    out_dim: int
    contraction: Any = 0.5
    hidden: int = 5

    def init(self, key, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        params = TanhMap(0.5).init(k1, self.hidden, self.width, dtype)
        params["B"] = 0.1 * jax.random.normal(k2, (self.out_dim, self.hidden), dtype)
        return params

    def apply(self, params, phi, warm=None):
        layer = {k: params[k] for k in ("W", "U", "b")}
        sol = solve(
            TanhMap(self.contraction),
            jnp.zeros((phi.shape[0], self.hidden), phi.dtype),
            layer,
            phi,
            solver="fixed_point",
            backward="one_step",
            tol=1e-10,
            maxiter=200,
        )
        return sol.value @ params["B"].T, sol

    def warm_start(self, params, phi=None, previous=None):
        return None  # every solve starts from zero

    def end_to_end_solution(self, params, warm=None):
        raise ValueError("a tanh DEQ is not linear in its features")


def figure_rows(setting: dict, accuracies: list, losses: list) -> list[dict]:
    rows = []
    for seed, (acc, curve) in enumerate(zip(accuracies, losses, strict=True)):
        for step, loss in enumerate(curve):
            final = step == len(curve) - 1
            diverged = loss is None
            rows.append(
                {
                    **setting,
                    "seed": seed,
                    "step": step * 10,
                    "final": final,
                    "train_loss": loss,
                    "gap": None if loss is None else loss - 0.1,
                    "diverged": final and diverged,
                    "test_accuracy_pct": acc if final else None,
                    "test_loss": 1.0 if final else None,
                    "nonconverged_steps": 0,
                }
            )
    return rows
