"""Warm-started training steps: exact gradients along a trajectory, fewer iterations, and no start that can make a
solve look converged when it is not."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    GAMMA,
    closed_form_end_to_end,
    closed_form_equilibrium,
    closed_form_loss,
    delm_problem,
    rel_err,
    u_matrix,
)

from deq_jax import DELM, Implicit, TrainState, Warm, make_step
from deq_jax._solver._lu import factor
from deq_jax._solver.refine import RefineState

pytestmark = pytest.mark.float32  # the whole file also runs with x64 off (float32), as users run JAX

LR = 0.002  # consecutive equilibria close (the regime warm starts are for); stable steps here are <~ 0.02
# float64 where x64 is on (solves to 1e-12, gradients to 1e-10: cond(U) ~ 10 times the tolerance); float32 otherwise
# (solves to 1e-5; the float32 closed form itself carries ~1e-6 cond(U) rounding)
X64 = jax.config.read("jax_enable_x64")
DTYPE, TOL, GRAD_RTOL = (jnp.float64, 1e-12, 1e-10) if X64 else (jnp.float32, 1e-5, 2e-3)


@functools.cache
def step_of(formulation, solver, tol=TOL, maxiter=400):
    """One compiled warm step per configuration, shared by the tests below. The backward equation is solved by the
    forward solver (`Implicit("forward")`), started from the carried adjoint and capped by the same maxiter."""
    model = DELM(
        7,
        3,
        gamma=GAMMA,
        formulation=formulation,
        solver=solver,
        tol=tol,
        maxiter=maxiter,
        backward=Implicit("forward"),
    )
    return model, make_step(model, "square", learning_rate=LR)


@jax.jit
def reference(params, phi, y):
    """Loss and gradient through the closed form `W = B U^{-1}` (one dense solve, plain autodiff)."""
    return jax.value_and_grad(lambda p: closed_form_loss(p["A"], p["B"], phi, y))(params)


@pytest.mark.parametrize(
    ("formulation", "solver"), [("transposed", "refine"), ("transposed", "anderson"), ("per_sample", "fixed_point")]
)
def test_warm_gradients_are_exact_along_a_trajectory(formulation, solver):
    A, B, phi, y = delm_problem(DTYPE)
    _model, step = step_of(formulation, solver)
    state, seen, history = step.init({"A": A, "B": B}, phi), [], []
    for _ in range(4):
        seen.append(state.params)
        state, metrics = step.update(state, phi, y)
        history.append(jax.device_get(metrics))
    seen.append(state.params)
    history = {k: np.stack([h[k] for h in history]) for k in history[0]}
    for t in range(4):
        loss, grads = reference(seen[t], phi, y)
        np.testing.assert_allclose(history["loss"][t], loss, rtol=GRAD_RTOL)
        step_grads = jax.tree_util.tree_map(lambda a, b: (a - b) / LR, seen[t], seen[t + 1])
        assert rel_err(step_grads, grads) < GRAD_RTOL, (t, formulation, solver)
    assert np.all(history["converged"]) and not np.any(history["backward_failures"])
    its = history["iterations"] + history["backward_iterations"]
    if solver != "refine":  # the first step starts from zero; the later ones from the previous step's solutions
        assert np.all(its[1:] < its[0]), its
    # carried on: the last equilibrium (W end-to-end, z per sample)
    W = closed_form_end_to_end(seen[3]["A"], seen[3]["B"])
    expected = W if formulation == "transposed" else closed_form_equilibrium(seen[3]["A"], phi)
    assert rel_err(state.warm.state, expected) < GRAD_RTOL


def test_no_start_makes_a_solve_look_converged():
    """Starts chosen to fool a rule that depends on the start: huge, NaN, exactly right, and useless LU factors."""
    A, B, phi, y = delm_problem(DTYPE)
    params = {"A": A, "B": B}
    opt_state = optax.sgd(LR).init(params)
    W = closed_form_end_to_end(A, B)
    huge, nan = 1e6 * jnp.ones_like(B), jnp.full_like(B, jnp.nan)
    # iterative, capped at 2 iterations: cannot converge from a bad start, and must say so
    _, capped = step_of("transposed", "anderson", maxiter=2)
    _, metrics = capped.update(TrainState(params, opt_state, Warm(huge, huge)), phi, y)
    assert not bool(metrics["converged"]) and int(metrics["backward_failures"]) == 1
    assert float(metrics["relative_residual"]) > 1e-3 and float(metrics["backward_relative_residual"]) > 1e-3
    _, metrics = capped.update(TrainState(params, opt_state, Warm(nan, nan)), phi, y)
    assert not bool(metrics["converged"]) and not float(metrics["relative_residual"]) <= TOL
    assert int(metrics["backward_nonfinite"]) == 1  # NaN forward: the backward is counted as divergence upstream
    # started at the exact equilibrium: converged (the same rule, judged on the value; jaxopt iterates once)
    _, metrics = capped.update(TrainState(params, opt_state, Warm(W, jnp.zeros_like(B))), phi, y)
    assert bool(metrics["converged"]) and int(metrics["iterations"]) <= 1
    # refine with the factors of the identity (a preconditioner that contracts by gamma only) and a huge start: the
    # refinement stalls at max_sweeps, the current U is factorised, and the step is exact
    _, refine = step_of("transposed", "refine")
    bad = Warm(huge, huge, RefineState(factor(jnp.eye(7, dtype=A.dtype)), jnp.asarray(False)))
    state, metrics = refine.update(TrainState(params, opt_state, bad), phi, y)
    assert bool(metrics["converged"]) and int(metrics["backward_failures"]) == 0
    assert int(metrics["factorisations"]) == 1
    step_grads = jax.tree_util.tree_map(lambda a, b: (a - b) / LR, params, state.params)
    assert rel_err(step_grads, reference(params, phi, y)[1]) < GRAD_RTOL
    # the factors carried on are those of this step's U
    fresh = factor(u_matrix(A)).lu
    assert rel_err(state.warm.solver_state.factors.lu, fresh) < (1e-12 if X64 else 1e-5)


def test_rebatch_keeps_what_does_not_depend_on_the_samples():
    A, B, phi, _ = delm_problem(jnp.float32)
    params = {"A": A, "B": B}
    other = phi[:5] + 1.0

    @jax.jit
    def carried(params, phi, other):
        out = {}
        for formulation in ("transposed", "per_sample"):
            model = DELM(7, 3, gamma=GAMMA, solver="refine", formulation=formulation)
            warm = model.warm_start(params, phi)
            warm = warm._replace(state=warm.state + 1.0, adjoint=warm.adjoint - 1.0)
            out[formulation] = (warm, model.warm_start(params, other, previous=warm))
        return out

    out = carried(params, phi, other)
    before, after = out["transposed"]
    for kept, was in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before), strict=True):
        np.testing.assert_array_equal(kept, was)  # W, dL/dB and the LU factors carry over to other samples
    before, after = out["per_sample"]
    assert after.state.shape == other.shape and not np.any(after.state) and not np.any(after.adjoint)  # from zero
    np.testing.assert_array_equal(after.solver_state.factors.lu, before.solver_state.factors.lu)
    assert DELM(7, 3, backward="unrolled").warm_start(params, phi) is None  # differentiated through its loop
