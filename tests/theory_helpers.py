"""Shared by the tests of deq_jax.theory (test_theory*.py): the problem shapes, tolerances for float64 and float32
runs, and the autouse fixtures (import them into a test module to use them there).

One shape for most tests (n = 25, m = 6, m_y = 3), so the jit-compiled cores compile once for all files."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq_jax import theory

X64 = bool(jax.config.jax_enable_x64)
F64 = jnp.float64 if X64 else jnp.float32  # the suite runs with x64 on (float64) and off (float32)
GAMMA = 0.8


def tol(f64, f32):
    """A tolerance for float64 runs and one for float32 runs (x64 off)."""
    return f64 if X64 else f32


@pytest.fixture(autouse=True)
def _precision_warnings_expected():
    """With x64 off, theory's optima and spectra say they compute in float32 (PrecisionWarning): expected here."""
    with warnings.catch_warnings():
        if not X64:
            warnings.simplefilter("ignore", theory.PrecisionWarning)
        yield


@pytest.fixture(autouse=True)
def _slow_only_when_selected(request):
    """Tests marked `slow` add coverage, not new kinds of checks; they run with `pytest -m slow` (make test-slow)."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("slow: run with pytest -m slow")


SLOW = pytest.mark.slow
SIGMA_CASES = ["column_softmax"] + [pytest.param(s, marks=SLOW) for s in ("row_softmax", "scaled_tanh")]


# one shape for most tests, so the jit-compiled cores compile once
def normal(seed, shape):
    # NumPy draws: no per-shape compilation, which dominates small tests' time
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), F64)


def problem(seed=0, n=25, m=6, m_y=3, a_scale=1.0):
    rng = np.random.default_rng(seed)
    params = {
        "A": jnp.asarray(a_scale * rng.standard_normal((m, m)), F64),
        "B": jnp.asarray(rng.standard_normal((m_y, m)), F64),
    }
    return params, jnp.asarray(rng.standard_normal((n, m)), F64), jnp.asarray(rng.standard_normal((n, m_y)), F64)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def rank_deficient_phi(n=12, m=20, rank=None, seed=3):
    """n < m (or a given rank through a product of thin factors): a non-trivial null space."""
    r = min(n, m) if rank is None else rank
    return normal(seed, (n, r)) @ normal(seed + 1, (r, m))
