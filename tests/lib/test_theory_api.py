"""deq_jax.theory: the array functions under jit (gamma traced too), argument errors, and the PrecisionWarning
where float64 is missing. Runs with x64 on (float64) and off (float32)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from theory_helpers import (  # noqa: F401 (autouse fixtures)
    F64,
    GAMMA,
    SLOW,
    X64,
    _precision_warnings_expected,
    _slow_only_when_selected,
    normal,
    problem,
    rel,
    tol,
)

from deq_jax import theory

# ----------------------------------------------------------------------------- transformations and errors


def check_under_jit(functions):
    params, phi, y = problem(seed=6, a_scale=1.0)
    G = normal(1, (3, 6))

    def everything(p, g, x, t):
        return {name: fn(p, g, x, t) for name, fn in functions.items()}

    eager, jitted = everything(params, G, phi, y), jax.jit(everything)(params, G, phi, y)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol(1e-12, 1e-4), atol=tol(1e-14, 1e-5))


def test_array_functions_work_under_jit():
    check_under_jit(
        {
            "W": lambda p, g, x, t: theory.end_to_end(p["A"], p["B"], GAMMA),
            "PG": lambda p, g, x, t: theory.induced_preconditioner(p, g, GAMMA),
            "grad": lambda p, g, x, t: theory.parameter_gradient(p, g, GAMMA),
            "opt": lambda p, g, x, t: theory.shallow_optimum_square(x, t),
            "spec": lambda p, g, x, t: theory.feature_spectrum(x),
            "G": lambda p, g, x, t: theory.square_loss_gradient(g, x, t),
            "norms": lambda p, g, x, t: theory.u_norms(p["A"], GAMMA),
            "bound": lambda p, g, x, t: theory.flow_bound(1.0, 0.1, jnp.ones(4, F64), 0.1),
        }
    )
    # gamma may be traced (sweeps vmap over it)
    params, _, _ = problem(seed=6)
    Ws = jax.vmap(lambda g: theory.end_to_end(params["A"], params["B"], g))(jnp.array([0.5, 0.8], F64))
    assert rel(Ws[1], theory.end_to_end(params["A"], params["B"], 0.8)) < tol(1e-14, 1e-6)


@SLOW
def test_derivative_functions_work_under_jit():
    check_under_jit(
        {
            "v": lambda p, g, x, t: theory.delm_w_velocity(p, {"A": p["A"], "B": g}, GAMMA),
            "next": lambda p, g, x, t: theory.predict_w_step(p, g, 0.01, GAMMA),
            "check": lambda p, g, x, t: theory.w_step_check(
                p, theory.end_to_end(p["A"], p["B"], GAMMA) + 0.01 * g, g, 0.01, GAMMA
            ),
            "grad_ce": lambda p, g, x, t: theory.cross_entropy_gradient(g, x, jax.nn.softmax(t), 0.1),
        }
    )


def test_bad_input_errors():
    params, phi, y = problem(seed=0)
    with pytest.raises(ValueError, match="y must have one row per row of phi"):
        theory.shallow_optimum_square(phi, y[:7])
    with pytest.raises(ValueError, match="rank 2"):
        theory.shallow_optimum_square(phi[0], y)
    with pytest.raises(TypeError, match="phi must be a floating-point array"):
        theory.feature_spectrum(jnp.ones((3, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"W must have shape \(3, 6\)"):
        theory.square_loss_gradient(jnp.ones((6, 3), F64), phi, y)
    with pytest.raises(ValueError, match="A must be square"):
        theory.end_to_end(jnp.ones((3, 6), F64), jnp.ones((3, 6), F64), GAMMA)
    with pytest.raises(ValueError, match=r"B must have shape \(\*, 6\)"):
        theory.end_to_end(params["A"], jnp.ones((3, 5), F64), GAMMA)
    with pytest.raises(ValueError, match="gamma must be a number in the open interval"):
        theory.u_matrix(params["A"], 1.0)
    with pytest.raises(ValueError, match="unknown sigma"):
        theory.u_matrix(params["A"], GAMMA, "softmax")
    with pytest.raises(ValueError, match="A must be square matrices"):
        theory.u_norms(jnp.ones((2, 3, 4), F64), GAMMA)
    with pytest.raises(ValueError, match="m must be a positive integer"):
        theory.u_inverse_norm_bound(0, GAMMA)
    with pytest.raises(ValueError, match="keys 'A' and 'B'"):
        theory.induced_preconditioner({"A": params["A"]}, params["B"], GAMMA)
    with pytest.raises(ValueError, match=r"G must have shape \(3, 6\)"):
        theory.induced_preconditioner(params, jnp.ones((6, 3), F64), GAMMA)
    with pytest.raises(ValueError, match=r"phi must have shape \(\*, 6\)"):
        theory.trust_region_check(params, jnp.ones((25, 5), F64), y, 0.1, GAMMA)
    with pytest.raises(ValueError, match="lam must be a positive number"):
        theory.trust_region_check(params, phi, y, 0.1, GAMMA, lam=0.0)
    with pytest.raises(ValueError, match="learning_rate must be a positive number"):
        theory.trust_region_check(params, phi, y, -0.1, GAMMA)
    with pytest.raises(ValueError, match="labels must lie in"):
        theory.shallow_optimum_cross_entropy(phi, jnp.arange(25) % 5, 4)
    with pytest.raises(ValueError, match=r"labels must have shape \(25\)"):
        theory.shallow_optimum_cross_entropy(phi, jnp.zeros((9,), jnp.int32), 4)
    with pytest.raises(ValueError, match=r"labels must have shape \(25, 4\).*one-hot rows, one per row of phi"):
        theory.shallow_optimum_cross_entropy(phi, jnp.zeros((25, 3), F64), 4)
    with pytest.raises(ValueError, match=r"^maxiter must be a positive integer"):
        theory.shallow_optimum_cross_entropy(phi, jnp.zeros((25,), jnp.int32), 4, maxiter=0)
    with pytest.raises(ValueError, match=r"^cg_maxiter must be a positive integer"):
        theory.shallow_optimum_cross_entropy(phi, jnp.zeros((25,), jnp.int32), 4, cg_maxiter=0)
    with pytest.raises(ValueError, match=r"^gamma must be a number in the open interval"):
        theory.induced_preconditioner(params, params["B"], 1.0)
    with pytest.raises(ValueError, match="l2 must be a positive number"):
        theory.shallow_optimum_cross_entropy(phi, jnp.zeros((25,), jnp.int32), 4, l2=0.0)
    with pytest.raises(ValueError, match=r"targets must have shape \(25, \*\)"):
        theory.cross_entropy_gradient(jnp.ones((3, 6), F64), phi, jnp.ones((7, 3), F64))
    with pytest.raises(ValueError, match="rtol must be"):
        theory.feature_spectrum(phi, rtol=-1.0)
    with pytest.raises(ValueError, match="rtol must be"):
        theory.min_norm_solution(phi, y, rtol=1.0)
    with pytest.raises(ValueError, match="gaps must be a 1-D"):
        theory.fit_log_linear(np.ones((3, 3)))
    with pytest.raises(ValueError, match="steps must have the shape"):
        theory.fit_log_linear(np.ones(5), steps=np.arange(4))
    with pytest.raises(ValueError, match="U_norm2_history must be a 1-D"):
        theory.flow_bound(1.0, 0.1, jnp.ones((2, 2), F64), 0.1)
    with pytest.raises(ValueError, match="contains NaN"):
        theory.feature_spectrum(jnp.full((3, 2), jnp.nan, F64))


def test_precision_warning_says_when_float64_is_missing():
    """With x64 off the optima and spectra say they are float32 (a PrecisionWarning naming the fix); with it on,
    they are float64 whatever the input dtype."""
    _, phi, y = problem(seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        W, _ = theory.shallow_optimum_square(phi.astype(jnp.float32), y.astype(jnp.float32))
    flagged = [w for w in caught if issubclass(w.category, theory.PrecisionWarning)]
    if X64:
        assert W.dtype == jnp.float64 and not flagged
    else:
        assert W.dtype == jnp.float32 and flagged and "jax_enable_x64" in str(flagged[0].message)


def test_programs_called_inside_a_trace_on_constants_only():
    """A theory program called inside another trace with concrete arguments only (no tracer to tell it is nested):
    JAX refuses compiler options there, and the program falls back to its plain jit with the same result."""
    rng = np.random.default_rng(61)
    A, B = rng.standard_normal((5, 5)), rng.standard_normal((2, 5))  # a shape no other test compiles: no cache hit
    A, B = A.astype(F64), B.astype(F64)  # NumPy constants of the outer trace: concrete, not tracers
    spectral = jax.jit(lambda s: s * theory.spectral_norm(B))(1.0)
    inside = jax.jit(lambda s: s * theory.end_to_end(A, B, GAMMA))(1.0)
    U = np.eye(5) - GAMMA * np.exp(A) / np.exp(A).sum(axis=0)
    assert rel(inside, np.linalg.solve(U.T, B.T).T) < tol(1e-13, 1e-5)
    assert abs(float(spectral) - np.linalg.norm(B, 2)) < tol(1e-13, 1e-5) * np.linalg.norm(B, 2)


def test_precision_warning_points_at_the_caller_and_argument_names():
    """The PrecisionWarning names the caller's line (not theory's internals); argument errors name the argument."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with jax.enable_x64(False):  # x64 off for this block only, in either mode of the suite
            theory.feature_gram(jnp.ones((4, 3), jnp.float32))
    flagged = [w for w in caught if issubclass(w.category, theory.PrecisionWarning)]
    # the caller's file (a mutation tool's wrappers add frames, so only "not the helper's own file" is asserted)
    assert flagged and not any(w.filename.endswith("_common.py") for w in flagged)
    params, _, _ = problem(seed=0)
    G = jnp.ones((3, 6), F64)
    with pytest.raises(ValueError, match=r"^params must be a dict with keys 'A' and 'B' .*got \['A'\]"):
        theory.induced_preconditioner({"A": params["A"]}, G, GAMMA)
    with pytest.raises(ValueError, match=r"^grads must be a dict with keys 'A' and 'B' .*got tuple"):
        theory.delm_w_velocity(params, (G, G), GAMMA)
    with pytest.raises(TypeError, match=r"^B must be a floating-point array"):
        theory.end_to_end(params["A"], jnp.ones((3, 6), jnp.int32), GAMMA)
    with pytest.raises(TypeError, match=r"^A must be a floating-point array"):
        theory.u_norms(jnp.ones((2, 6, 6), jnp.int32), GAMMA)
