"""Warm-started equilibrium gradients: a training step that starts each solve from the previous step's solution.

In training the equilibrium moves little from one step to the next, so the previous step's solution is a far better
start than zero. A step here computes its gradient explicitly (the implicit function theorem, docs/theory.md
sections 3 and 8) instead of through `jax.grad`, so that the backward solution can be carried too:

    forward   z* = f(z*)                   from the carried z (or W)
    loss      L(theta, z*), g = dL/dz*     by autodiff of the cheap part (readout, loss, penalty)
    backward  u = g + J^T u                from the carried u (J = df/dz at z*)
    gradient  dL/dtheta = dL/dtheta|_z + u^T df/dtheta

For the DELM (`W = B + gamma W sigma(A)`, or `z = gamma z sigma(A)^T + phi` per sample) sigma(A) is computed once
per step and reused by both solves and the gradient; the solver is `direct` (one LU, shared by both solves),
`refine` (LU factors kept across steps, see `deq_jax.refine`) or an iterative solver of `deq_jax.solve` started
from the carried state. Every solve is judged by the start-independent rule `|f(z) - z| <= tol |f(z)| + atol`, so a
warm start can make a solve faster, never make it look converged when it is not.

`implicit_value_and_grad` is the same step for any map `f(z, params, x)` (e.g. a user's tanh DEQ).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from deq_jax import refine as refine_lib
from deq_jax.maps import get_sigma
from deq_jax.refine import Factors, Refine
from deq_jax.solve import Direct, Implicit, OneStep, SolveStats, Unrolled, as_backward, as_solver, solve

Array = jax.Array


class StepStats(NamedTuple):
    """What the solves of one warm-started gradient did: the forward solve, the backward (adjoint) solve (None for
    a Jacobian-free backward), and whether LU factors were recomputed this step (None where there are none)."""

    forward: SolveStats
    backward: Optional[SolveStats] = None
    refactored: Optional[Array] = None


class DELMWarm(NamedTuple):
    """What a DELM carries between steps. Fields a solver does not use are None.

    state: the last equilibrium, W `(m_y, m)` (end-to-end) or z `(n, m)` (per sample); adjoint: the last backward
    solution, `dL/dB = G U^{-T}` `(m_y, m)` or u `(n, m)`; factors: LU of an earlier U (`refine`)."""

    state: Optional[Array] = None
    adjoint: Optional[Array] = None
    factors: Optional[Factors] = None


class _Affine(NamedTuple):
    """`f(X, {"S": S}, c) = c + gamma X K` with `K = S` (`transpose=False`) or `S^T`: all four DELM solves.

    W U = B and the per-sample adjoint u U = g are `K = S`; z U^T = phi and V U^T = G are `K = S^T`."""

    gamma: Any
    transpose: bool

    def __call__(self, X, params, c):
        S = params["S"]
        return c + self.gamma * (X @ S.T if self.transpose else X @ S)

    def affine(self, params, c):  # f(X) = X M^T + c (solve's Direct convention)
        S = params["S"]
        return self.gamma * (S if self.transpose else S.T), c


def _norm(x: Array) -> Array:
    return jnp.sqrt(jnp.sum(x * x))


def _stats(iterations, residual, scale, tol, atol) -> SolveStats:
    relative = residual / jnp.maximum(scale, jnp.finfo(residual.dtype).tiny)
    fields = dict(iterations=jnp.asarray(iterations, jnp.int32), residual=residual, relative_residual=relative,
                  converged=refine_lib.converged(residual, scale, tol, atol))
    if "diverged" in SolveStats._fields:  # solve's divergence flag: here, a value that is no longer finite
        fields["diverged"] = ~jnp.isfinite(residual)
    return SolveStats(**fields)


def _rejudge(stats: SolveStats, z: Any, tol: float, atol: float) -> SolveStats:
    """`stats` of a `solve` result, judged again by `|f(z) - z| <= tol |f(z)| + atol` with `|f(z)| <= |z| + |f(z) - z|`
    (never stricter than the rule, at most a factor `1 + 2 tol` looser), whatever rule the solver stopped by: a good
    start cannot pass for convergence. The relative residual is reported against `|z|`."""
    znorm = jnp.sqrt(sum(jnp.sum(leaf * leaf) for leaf in jax.tree_util.tree_leaves(z)))
    judged = _stats(stats.iterations, stats.residual, znorm, tol, atol)
    return stats._replace(relative_residual=judged.relative_residual,
                          converged=stats.converged & refine_lib.converged(stats.residual, znorm + stats.residual,
                                                                            tol, atol))


def _judged(sol: Any, tol: float, atol: float, batch_axis: Optional[int]) -> SolveStats:
    """A solve's statistics; per sample (`batch_axis`) solve's own worst-sample judgement, else `_rejudge`."""
    return sol.stats if batch_axis is not None else _rejudge(sol.stats, sol.value, tol, atol)


def _precision(precision: Optional[str]):
    return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


# ----------------------------------------------------------------------------- the DELM

def delm_warm_start(model: Any, params: Any, phi: Optional[Array], previous: Optional[DELMWarm] = None
                    ) -> Optional[DELMWarm]:
    """The state a DELM carries into its first step on `phi` (`phi=None`: the end-to-end route).

    `previous` (the state after steps on other samples, e.g. the last mini-batch) contributes what does not depend on
    the samples: W and dL/dB and the LU factors; a per-sample z or u starts from zero. None for `backward="unrolled"`
    (differentiated through its loop; nothing to carry)."""
    backward = as_backward(model.backward)
    if isinstance(backward, Unrolled):
        return None
    solver = model.solver
    if solver == "direct" or isinstance(solver, Direct):
        return DELMWarm()
    A, B = params["A"], params["B"]
    end_to_end = phi is None or model.formulation == "transposed"
    shape = B.shape if end_to_end else phi.shape
    keep = previous is not None and end_to_end
    zeros = jnp.zeros(shape, B.dtype)
    state = previous.state if keep else zeros
    adjoint = None if isinstance(backward, OneStep) else (previous.adjoint if keep else zeros)
    if not _is_refine(solver):
        return DELMWarm(state=state, adjoint=adjoint)
    if previous is not None and previous.factors is not None:
        return DELMWarm(state, adjoint, previous.factors)
    U = jnp.eye(A.shape[0], dtype=A.dtype) - model.gamma * get_sigma(model.sigma)(jax.lax.stop_gradient(A))
    with _precision(model.precision):
        return DELMWarm(state, adjoint, refine_lib.factor(U))


def _is_refine(solver: Any) -> bool:
    return solver == "refine" or isinstance(solver, Refine)


def delm_value_and_grad(model: Any, params: Any, objective: Callable, warm: DELMWarm, *, end_to_end: bool,
                        phi: Optional[Array] = None):
    """`(value, grads, warm, StepStats)` of `objective` at the DELM's equilibrium, solves started from `warm`.

    `objective(params, W)` on the end-to-end route (`end_to_end=True`), `objective(params, z)` per sample (z the
    equilibrium for the rows of `phi`). Gradients are exact to the solves' tolerance (docs/theory.md section 8).
    """
    with _precision(model.precision):
        return _delm_value_and_grad(model, params, objective, warm, end_to_end, phi)


def _is_lu(solver: Any) -> bool:
    return solver == "direct" or isinstance(solver, Direct) or _is_refine(solver)


def _delm_value_and_grad(model, params, objective, warm, end_to_end, phi):
    gamma, tol, atol = model.gamma, model.tol, 0.0
    backward = as_backward(model.backward)
    implicit = isinstance(backward, Implicit)
    btol = backward.tol if implicit and backward.tol is not None else tol
    bmaxiter = backward.maxiter if implicit and backward.maxiter is not None else model.maxiter
    A, B = params["A"], params["B"]
    S, sigma_vjp = jax.vjp(get_sigma(model.sigma), A)  # sigma(A) once per step, for both solves and the gradient
    S = jax.lax.stop_gradient(S)
    # the forward solve is X M = rhs with M = U end-to-end (W U = B) and M = U^T per sample (z U^T = phi);
    # the adjoint solve uses the other one (V U^T = G, u U = dL/dz)
    rhs = jax.lax.stop_gradient(B if end_to_end else phi)
    fwd_t = not end_to_end
    batch_axis = None if end_to_end else 0  # per sample: every sample must meet the tolerance, the worst is reported
    lu = _LUSolves(model, S, warm) if _is_lu(model.solver) else None

    if lu is not None:
        X, forward_stats = lu.solve(rhs, warm.state, fwd_t, tol)
    else:
        sol = solve(_Affine(gamma, fwd_t), warm.state, {"S": S}, rhs, solver=model.solver, tol=tol,
                    maxiter=model.maxiter, precision=model.precision, batch_axis=batch_axis)
        X, forward_stats = jax.lax.stop_gradient(sol.value), _judged(sol, tol, atol, batch_axis)

    value, (g_params, g_state) = jax.value_and_grad(objective, argnums=(0, 1))(params, X)
    g_state = jax.lax.stop_gradient(g_state)

    backward_stats = None
    if isinstance(backward, OneStep):  # Jacobian-free: the adjoint is dL/dz itself
        adjoint = g_state
    elif lu is not None:
        adjoint, backward_stats = lu.solve(g_state, warm.adjoint, not fwd_t, btol)
    else:
        sol = solve(_Affine(gamma, not fwd_t), warm.adjoint, {"S": S}, g_state, solver=model.solver, tol=btol,
                    maxiter=bmaxiter, precision=model.precision, batch_axis=batch_axis)
        adjoint, backward_stats = jax.lax.stop_gradient(sol.value), _judged(sol, btol, atol, batch_axis)

    # dL/dsigma = gamma W^T V (end-to-end) or gamma u^T z (per sample); dL/dB = V on the end-to-end route
    g_S = gamma * (X.T @ adjoint if end_to_end else adjoint.T @ X)
    (g_A,) = sigma_vjp(g_S.astype(S.dtype))
    grads = dict(g_params)
    grads["A"] = g_params["A"] + g_A
    if end_to_end:
        grads["B"] = g_params["B"] + adjoint
    refactored = None
    if lu is not None and lu.opts is not None:
        warm, refactored = lu.next_factors(warm)
    if warm.state is not None:
        warm = warm._replace(state=X)
    if warm.adjoint is not None:
        warm = warm._replace(adjoint=adjoint)
    return value, grads, warm, StepStats(forward_stats, backward_stats, refactored)


class _LUSolves:
    """The step's linear solves by LU: "direct" factorises U now (one sweep from zero, the residual measured);
    "refine" refines from the carried start with the carried factors. The factors are only read on the common
    path; an LU is computed only when a refinement stalls (and then used to finish that solve) and, at the end of
    a step whose solves needed more than `refactor_after` sweeps, for the next step: no select or pass-through of
    `m x m` arrays on the way, which XLA would copy."""

    def __init__(self, model, S, warm):
        self.model, self.S = model, S
        self.gamma = model.gamma
        if _is_refine(model.solver):
            self.opts = model.solver if isinstance(model.solver, Refine) else Refine()
            self.factors = warm.factors
        else:
            self.opts, self.factors = None, self.fresh()
        self.redone, self.sweeps = [], []

    def fresh(self) -> Factors:
        return refine_lib.factor(jnp.eye(self.S.shape[0], dtype=self.S.dtype) - self.gamma * self.S)

    def solve(self, R, start, t, tol):
        S, gamma = self.S, self.gamma
        times_M = lambda X: X - gamma * (X @ S.T if t else X @ S)
        if self.opts is None:  # direct: one LU solve, its residual measured
            X = refine_lib.right_solve(self.factors, R, t)
            r = R - times_M(X)
            residual, scale = jnp.sqrt(jnp.sum(r * r)), jnp.sqrt(jnp.sum((X + r) ** 2))
            return X, _stats(0, residual, scale, tol, 0.0)
        run = lambda F, x0: refine_lib.refine(times_M, R, x0, F, transpose=t, tol=tol, atol=0.0,
                                              max_sweeps=self.opts.max_sweeps)
        out = run(self.factors, start)
        ok = refine_lib.converged(out.residual, out.scale, tol, 0.0)

        def again(carry):  # stalled: factorise the current U and finish from where it stopped (or from zero)
            out, _ = carry
            more = run(self.fresh(), jnp.where(jnp.isfinite(out.residual), out.value, 0.0))
            return more._replace(sweeps=out.sweeps + more.sweeps), jnp.ones((), bool)

        out, redone = _when(~ok, again, (out, jnp.zeros((), bool)))
        self.redone.append(redone)
        self.sweeps.append(out.sweeps)
        return out.value, _stats(out.sweeps, out.residual, out.scale, tol, 0.0)

    def next_factors(self, warm):
        """Factorise the current U for the next step if a solve stalled or needed more than `refactor_after` sweeps."""
        slow = functools.reduce(jnp.maximum, self.sweeps) > self.opts.refactor_after
        refactor = functools.reduce(jnp.logical_or, self.redone, slow)
        return warm._replace(factors=_when(refactor, lambda _: self.fresh(), self.factors)), refactor


def _when(pred: Array, fn: Callable, operand: Any) -> Any:
    """`fn(operand)` if `pred` else `operand`, as a loop of at most one trip. Under `vmap` a `lax.cond` with a batched
    predicate becomes a select that runs `fn` (here an LU) for every member at every step; a loop runs it only when
    some member needs it."""
    def body(carry):
        _, x = carry
        return jnp.zeros_like(pred), fn(x)

    return jax.lax.while_loop(lambda carry: carry[0], body, (pred, operand))[1]


# ----------------------------------------------------------------------------- any map

class ImplicitStart(NamedTuple):
    """The carried starts of `implicit_value_and_grad`: the last equilibrium z and the last adjoint u."""

    z: Any
    u: Any


def implicit_value_and_grad(f: Callable, objective: Callable, params: Any, x: Any, start: ImplicitStart, *,
                            solver: Any = "anderson", tol: float = 1e-5, maxiter: int = 100,
                            backward_tol: Optional[float] = None, precision: Optional[str] = "highest"):
    """`(value, grads, start, StepStats)` for `objective(params, z*)` with `z* = f(z*, params, x)`, warm-started.

    The forward solve starts from `start.z`, the adjoint `u = dL/dz* + J^T u` (J = df/dz at z*) from `start.u`,
    both with `solver` through `deq_jax.solve`; `grads` are with respect to `params` (`x` is data). Returns the new
    starts for the next step. For a user's own DEQ model, e.g. `f = TanhMap(0.9)`.
    """
    as_solver(solver)
    btol = tol if backward_tol is None else backward_tol
    params_const, x = jax.lax.stop_gradient((params, x))
    sol = solve(f, start.z, params_const, x, solver=solver, tol=tol, maxiter=maxiter, precision=precision)
    z = jax.lax.stop_gradient(sol.value)
    forward_stats = _rejudge(sol.stats, z, tol, 0.0)
    value, (g_params, g_z) = jax.value_and_grad(objective, argnums=(0, 1))(params, z)
    g_z = jax.lax.stop_gradient(g_z)

    def adjoint_map(u, lin, g):  # u -> g + J^T u, J linearised at (z*, params) and passed in explicitly
        z_, p_, x_ = lin
        _, vjp = jax.vjp(lambda z: f(z, p_, x_), z_)
        return jax.tree_util.tree_map(jnp.add, g, vjp(u)[0])

    with _precision(precision):
        adj = solve(adjoint_map, start.u, (z, params_const, x), g_z, solver=solver, tol=btol, maxiter=maxiter,
                    precision=precision)
        u = jax.lax.stop_gradient(adj.value)
        _, vjp_params = jax.vjp(lambda p: f(z, p, x), params)
        (g_through,) = vjp_params(u)
    grads = jax.tree_util.tree_map(jnp.add, g_params, g_through)
    return value, grads, ImplicitStart(z, u), StepStats(forward_stats, _rejudge(adj.stats, u, btol, 0.0))
