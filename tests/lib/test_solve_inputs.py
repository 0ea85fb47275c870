"""The solve entry point's inputs: the cast rule, has_aux, argument errors, low-precision dtypes, solver instances
and the import boundary.

Runs in float64 by default and in float32 with `DEQ_JAX_TEST_X64=0` (`helpers.DTYPE`); tolerances are per dtype."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, GAMMA, X64, delm_problem

from deq_jax import (
    Anderson,
    Broyden,
    DELMMap,
    FixedPoint,
    Implicit,
    OneStep,
    Unrolled,
    solve,
)

TOL = 1e-12 if X64 else 1e-6
GRAD_RTOL = 1e-9 if X64 else 1e-4


# ----------------------------------------------------------------------------- inputs: cast rule, has_aux, errors


@pytest.mark.float32
def test_python_scalars_integers_and_has_aux():
    """An integer start is cast to the default float dtype; an integer x is data passed to the map (no gradient);
    with has_aux the map's aux at the equilibrium is returned, and is differentiable through it."""
    f = lambda z, p, x: 0.5 * jnp.cos(z) + p * x  # x an integer: the map promotes as JAX does
    value, g = jax.jit(jax.value_and_grad(lambda p: solve(f, 0, p, 3, tol=TOL).value))(0.25)
    assert value.dtype == jnp.result_type(float)
    np.testing.assert_allclose(value, f(value, 0.25, 3), rtol=10 * TOL)
    np.testing.assert_allclose(g, 3 / (1 + 0.5 * np.sin(float(value))), rtol=10 * GRAD_RTOL)  # x / (1 - f'(z*))

    def fa(z, p, x):
        return 0.5 * jnp.cos(z) + p, {"square": z**2, "p": p}

    def aux_loss(p):
        sol = solve(fa, 0.0, p, 0.0, has_aux=True, tol=TOL)
        return sol.aux["square"], sol

    (square, sol), g = jax.jit(jax.value_and_grad(aux_loss, has_aux=True))(jnp.asarray(0.25, DTYPE))
    np.testing.assert_allclose(square, sol.value**2, rtol=10 * TOL)
    assert sol.aux["p"].dtype == DTYPE and bool(sol.stats.converged)
    # d(z*^2)/dp = 2 z* dz*/dp = 2 z* / (1 + 0.5 sin z*)
    np.testing.assert_allclose(g, 2 * sol.value / (1 + 0.5 * np.sin(float(sol.value))), rtol=10 * GRAD_RTOL)


def test_argument_errors():
    A, _, phi, _ = delm_problem(DTYPE)
    f, z0, p = DELMMap(GAMMA), jnp.zeros_like(phi), {"A": A}
    cases = [
        (ValueError, "unknown solver 'newton'.*'anderson'", lambda: solve(f, z0, p, phi, solver="newton")),
        (ValueError, "unknown backward 'adjoint'.*'implicit'", lambda: solve(f, z0, p, phi, backward="adjoint")),
        (ValueError, "unknown linear_solver 'qr'.*'gmres'", lambda: Implicit(linear_solver="qr")),
        (
            ValueError,
            (
                r"'cg' is refused for implicit differentiation: the backward system \(I - J\^T\) u = v is not "
                r"symmetric, so conjugate gradients converges to a wrong gradient without any warning \(0\.8% error"
            ),
            lambda: Implicit(linear_solver="cg"),
        ),
        (ValueError, r"Implicit\.max_dense must be a positive integer; got 1\.5", lambda: Implicit(max_dense=1.5)),
        (ValueError, "tol must be a positive number; got 0", lambda: solve(f, z0, p, phi, tol=0)),
        (ValueError, "atol must be a number >= 0; got -1", lambda: solve(f, z0, p, phi, atol=-1)),
        (ValueError, "maxiter must be a positive integer; got 2.5", lambda: solve(f, z0, p, phi, maxiter=2.5)),
        (
            ValueError,
            r"x contains NaN or infinite values \(array of shape \(11, 7\)",
            lambda: solve(f, z0, p, phi.at[2, 3].set(jnp.inf)),
        ),
        (ValueError, r"params\['A'\] contains NaN", lambda: solve(f, z0, {"A": A.at[0, 0].set(jnp.nan)}, phi)),
        (ValueError, r"z0 contains NaN", lambda: solve(f, z0.at[0, 0].set(jnp.nan), p, phi)),
        (
            TypeError,
            "z0 must be a real number or a floating-point array.*boolean",
            lambda: solve(f, jnp.zeros((11, 7), bool), p, phi),
        ),
        (TypeError, r"z0\[1\] must be a real number.*complex", lambda: solve(f, (z0, 1j), p, phi)),
        (
            TypeError,
            r"params\['name'\] must be an array or a number.*str",
            lambda: solve(f, z0, {"A": A, "name": "x"}, phi),
        ),
        (ValueError, "must return a state of z0's structure.*shape \\(7,\\)", lambda: solve(f, z0[0], p, phi)),
        (ValueError, "needs has_aux=True", lambda: solve(lambda z, p, x: (z, 1.0), z0, p, phi)),
        (ValueError, "has_aux=True, f must return a pair", lambda: solve(f, z0, p, phi, has_aux=True)),
        (ValueError, "batch_axis=2 is not an axis of z0", lambda: solve(f, z0, p, phi, batch_axis=2)),
        (
            ValueError,
            "linear_solver='lu'.*Jacobian.*max_dense=10",
            lambda: solve(f, z0, p, phi, backward=Implicit("lu", max_dense=10)),
        ),
        (ValueError, r"gamma must be a number in the open interval \(0, 1\); got 1.0", lambda: DELMMap(1.0)),
        (ValueError, "unknown sigma 'relu'", lambda: DELMMap(0.5, sigma="relu")),
        (ValueError, "history_size must be an integer >= 2; got 1", lambda: Anderson(history_size=1)),
        (ValueError, "precision 'tf32'", lambda: solve(f, z0, p, phi, precision="tf32")),
        (TypeError, "solver must be a name", lambda: solve(f, z0, p, phi, solver=3)),
        (ValueError, "unknown Implicit.on_failure 1", lambda: Implicit(on_failure=1)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_anderson_keeps_low_precision_dtypes(dtype):
    """jaxopt's own mixing step fails on bfloat16 (and on float32 under x64); deq_jax's keeps the state's dtype."""
    A, _, phi, _ = delm_problem(jnp.float32)
    sol = jax.jit(
        lambda A, phi: solve(
            DELMMap(GAMMA), jnp.zeros_like(phi), {"A": A}, phi, solver="anderson", tol=5e-2, maxiter=50
        )
    )(A.astype(dtype), phi.astype(dtype))
    assert sol.value.dtype == dtype
    assert bool(sol.stats.converged)
    assert float(sol.stats.relative_residual) <= 5e-2


def test_solver_instances_and_options():
    A, _, phi, _ = delm_problem(DTYPE)
    f, z0, p = DELMMap(GAMMA), jnp.zeros_like(phi), {"A": A}
    for solver, backward in [
        (FixedPoint(), Implicit("bicgstab", tol=1e-5, maxiter=200)),
        (Anderson(history_size=3, beta=0.9), OneStep()),
        (Broyden(history_size=10), Unrolled()),
    ]:
        run = functools.partial(solve, f, z0, solver=solver, backward=backward, tol=1e-5, maxiter=300)
        sol = jax.jit(lambda p, run=run: run(p, phi))(p)
        assert bool(sol.stats.converged)


def test_import_deq_jax_imports_neither_yaml_scipy_nor_sklearn():
    """jaxopt imports scipy at import time: deq_jax imports it only inside the first solve."""
    code = (
        "import sys, deq_jax; bad = [m for m in ('yaml', 'scipy', 'sklearn', 'jaxopt') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
