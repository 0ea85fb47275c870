"""`python -m experiments bench --suite profile`: where the time of the transposed DELM step goes.

The transposed (end-to-end) step costs one LU factorisation of the m x m matrix `U = I - gamma sigma(A)` plus
O(m m_y n) products. This suite times, in one process with interleaved repeats:

- each component of the step alone (softmax, the LU factorisation, LAPACK's pivots-to-permutation loop, the
  triangular solves, the `phi W^T` and `R^T phi` products, the backward's outer product and softmax transpose, the
  optax update, deq_jax's residual check `W sigma(A)`), and a dense 784^3 matmul for the machine's matmul rate;
- four whole steps: deq_jax (`DELM` + `make_step`, stateless), the inline `jnp.linalg.solve` + autodiff baseline, a
  hand-written step with the closed-form gradients of docs/theory.md (one `lu_factor`, explicit `lu_solve`s), which
  is the floor for these kernels, and deq_jax's warm-started "refine" step (`TrainStep.update` from the state of a
  few training steps, so that each call does what a training run's step does: one refinement sweep each way with
  kept LU factors), next to one refinement sweep alone;

and it reads the compiled deq_jax step: how many LU factorisations (`getrf` custom calls; the backward must reuse
the forward's factors), triangular solves and while loops it contains, and how many `lu` primitives its jaxpr has.

It also times the per-sample implicit backward's linear solve alone, `(I - J^T) u = v` with `J^T u = gamma u S`
on the `(n, m)` state and `v` the loss's cotangent, with each Krylov solver at relative tolerance `tol`, counting
its matrix-vector products (a host callback per product; the count is exact, the time includes the callbacks).

Every entry (component, step, backward solve) has a name, so `--list`, `--rows` and `--skip` work here as in the
other suites; the facts of the compiled deq_jax step are read when that step is selected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.scipy.sparse.linalg as jssl
import numpy as np
import optax

from deq_jax import theory
from deq_jax._solver._lu import factor, right_solve  # the kernels the refine step runs, profiled alone
from deq_jax.train import make_step
from experiments.bench.checks import delm_reference, relative_errors
from experiments.bench.jax_cases import linear_solve as jaxopt_linear_solve  # as deq_jax._jaxopt uses it
from experiments.bench.problem import Problem
from experiments.common import interrupts
from experiments.common import models as model_lib


def _count_primitive(jaxpr, name: str) -> int:
    """Occurrences of primitive `name` in a jaxpr, nested jaxprs (pjit, custom_vjp, while, cond, ...) included."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            count += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    count += _count_primitive(inner if hasattr(inner, "eqns") else inner.jaxpr, name)
                elif hasattr(sub, "eqns"):
                    count += _count_primitive(sub, name)
    return count


def hlo_facts(compiled_text: str, jaxpr) -> dict:
    """LU factorisations, triangular solves, while loops and dots in a compiled step."""
    targets = re.findall(r'custom_call_target="([^"]+)"', compiled_text)
    return {
        "getrf_calls": sum("getrf" in t for t in targets),
        "triangular_solves": sum("trsm" in t for t in targets) + compiled_text.count(" triangular-solve("),
        "while_loops": len(re.findall(r"\swhile\(", compiled_text)),
        "dots": len(re.findall(r"= \S+ dot\(", compiled_text)),
        "custom_call_targets": sorted(set(targets)),
        "jaxpr_lu_primitives": _count_primitive(jaxpr.jaxpr, "lu"),
        "jaxpr_custom_linear_solve": _count_primitive(jaxpr.jaxpr, "custom_linear_solve"),
    }


@dataclasses.dataclass(frozen=True)
class Entry:
    """One timed thing: `make(arrays) -> (function, arguments, nominal flops)`; kind "component" or "step"."""

    name: str
    kind: str
    make: Callable[[Any], tuple[Callable, tuple, float]]


def _arrays(p: Problem, device: Any) -> SimpleNamespace:
    """The problem's arrays on `device` and the intermediate values the components start from."""
    put = lambda a: jax.device_put(jnp.asarray(a), device)
    a = SimpleNamespace(A=put(p.delm["A"]), B=put(p.delm["B"]), phi=put(p.phi), y=put(p.y))

    @jax.jit  # one program for all of them (eager calls would compile one small program per operation)
    def derived(A, B, phi, y):
        S = jax.nn.softmax(A, axis=0)
        U = jnp.eye(p.m, dtype=S.dtype) - p.gamma * S
        _, pivots, _ = jax.lax.linalg.lu(U.T)
        W = theory.end_to_end(A, B, p.gamma)
        R = phi @ W.T - y
        return S, U, pivots, W, R, R.T @ phi / p.n

    a.S, a.U, a.pivots, a.W, a.R, a.G = derived(a.A, a.B, a.phi, a.y)
    a.params = {"A": a.A, "B": a.B}
    a.optimizer = optax.sgd(p.learning_rate)
    a.opt_state = a.optimizer.init(a.params)
    return a


def _factors(U):
    return jax.jit(factor)(U)


def _closed_form(p: Problem):
    """Loss and gradients of docs/theory.md section 3 with one LU of U (no autodiff)."""
    gamma, m = p.gamma, p.m

    def closed_form(params, phi, y):
        A, B = params["A"], params["B"]
        S = jax.nn.softmax(A, axis=0)
        lu = jsl.lu_factor(jnp.eye(m, dtype=S.dtype) - gamma * S)
        W = jsl.lu_solve(lu, B.T, trans=1).T  # U^T W^T = B^T
        R = phi @ W.T - y
        G = R.T @ phi / phi.shape[0]  # dL/dW
        dB = jsl.lu_solve(lu, G.T, trans=0).T  # G U^{-T}
        dS = gamma * W.T @ dB
        dA = S * (dS - jnp.sum(S * dS, axis=0, keepdims=True))
        return 0.5 * jnp.mean(jnp.sum(R * R, axis=-1)), {"A": dA, "B": dB}

    return closed_form


def _step(p: Problem, precision, which: str) -> Callable:
    """One whole step `step(params, opt_state, phi, y)`: deq_jax, the inline baseline, or the hand-written one."""

    optimizer = optax.sgd(p.learning_rate)
    if which == "deq_jax":
        model = model_lib.build(
            "delm", p.m, p.m_y, gamma=p.gamma, formulation="transposed", solver="direct", precision=precision
        )
        return make_step(model, "square", optimizer, jit=False)
    if which == "refine":
        model = model_lib.build(
            "delm", p.m, p.m_y, gamma=p.gamma, formulation="transposed", solver="refine", precision=precision
        )
        return make_step(model, "square", optimizer, jit=False).update

    def inline_loss(params, phi, y):
        S = jax.nn.softmax(params["A"], axis=0)
        W = jnp.linalg.solve((jnp.eye(p.m, dtype=S.dtype) - p.gamma * S).T, params["B"].T).T
        r = phi @ W.T - y
        return 0.5 * jnp.mean(jnp.sum(r * r, axis=-1))

    value_and_grad = jax.value_and_grad(inline_loss) if which == "inline" else _closed_form(p)

    def step(params, opt_state, phi, y):
        value, grads = value_and_grad(params, phi, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


STEPS = {
    "deq_jax": "deq_jax step (DELM + make_step)",
    "inline": "inline step (jnp.linalg.solve + autodiff)",
    "hand": "hand-written step (closed-form gradients, one lu_factor)",
    "refine": "deq_jax refine step, warm (TrainStep.update after 5 training steps)",
}
WARM_STEPS = 5  # training steps before the refine step is timed: past the first, large moves of the run


def _warm_state(p: Problem, precision, a: SimpleNamespace):
    """The refine step's training state after `WARM_STEPS` steps from the problem's initial parameters."""

    model = model_lib.build(
        "delm", p.m, p.m_y, gamma=p.gamma, formulation="transposed", solver="refine", precision=precision
    )
    step = make_step(model, "square", optax.sgd(p.learning_rate))
    state = step.init(a.params, a.phi)
    for _ in range(WARM_STEPS):
        state, _ = step.update(state, a.phi, a.y)
    return state


def _sweep(p: Problem):
    """One refinement sweep of the forward solve, `W + (B - W U) U_old^{-1}`, with kept factors."""

    def sweep(factors, W, S, B):
        R = B - (W - p.gamma * W @ S)
        return W + right_solve(factors, R, False)

    return sweep


def entries(p: Problem, precision) -> list[Entry]:
    """Every component and whole step of the profile, in table order (nothing is computed until `make` runs)."""
    m, n, m_y, gamma = p.m, p.n, p.m_y, p.gamma
    sgd = optax.sgd(p.learning_rate)
    steps = [
        Entry(
            name,
            "step",
            functools.partial(
                lambda which, a: (_step(p, precision, which), (a.params, a.opt_state, a.phi, a.y), 0.0), which
            ),
        )
        for which, name in STEPS.items()
        if which != "refine"
    ]
    steps.append(
        Entry(
            STEPS["refine"],
            "step",
            lambda a: (_step(p, precision, "refine"), (_warm_state(p, precision, a), a.phi, a.y), 0.0),
        )
    )
    return [
        Entry("softmax sigma(A) (column)", "component", lambda a: (lambda A: jax.nn.softmax(A, axis=0), (a.A,), 0.0)),
        Entry(
            "LU factorisation of U (lax.linalg.lu: getrf + permutation)",
            "component",
            lambda a: (jax.lax.linalg.lu, (a.U.T,), 2 / 3 * m**3),
        ),
        Entry(
            "  of which pivots -> permutation loop",
            "component",
            lambda a: (lambda piv: jax.lax.linalg.lu_pivots_to_permutation(piv, m), (a.pivots,), 0.0),
        ),
        Entry(
            "jnp.linalg.solve(U^T, B^T): LU + 2 triangular solves (forward)",
            "component",
            lambda a: (lambda U, B: jnp.linalg.solve(U.T, B.T), (a.U, a.B), 2 / 3 * m**3 + 2 * m * m * m_y),
        ),
        Entry(
            "predictions phi W^T (n x m x m_y)",
            "component",
            lambda a: (lambda phi, W: phi @ W.T, (a.phi, a.W), 2 * n * m * m_y),
        ),
        Entry(
            "G = R^T phi / n (m_y x n x m)",
            "component",
            lambda a: (lambda R, phi: R.T @ phi / n, (a.R, a.phi), 2 * n * m * m_y),
        ),
        Entry(
            "dL/dsigma = gamma W^T dB (outer, m x m_y x m)",
            "component",
            lambda a: (lambda W, G: gamma * W.T @ G, (a.W, a.G), 2 * m * m * m_y),
        ),
        Entry(
            "softmax transpose S * (dS - 1 1^T (S * dS))",
            "component",
            lambda a: (lambda S, dS: S * (dS - jnp.sum(S * dS, axis=0, keepdims=True)), (a.S, a.S), 0.0),
        ),
        Entry("optax SGD update", "component", lambda a: (sgd.update, (a.params, a.opt_state, a.params), 0.0)),
        Entry(
            "deq_jax residual check W sigma(A) (m_y x m x m)",
            "component",
            lambda a: (lambda W, S, B: B + gamma * W @ S, (a.W, a.S, a.B), 2 * m * m * m_y),
        ),
        Entry(
            "one refinement sweep W + (B - W U) U_old^{-1} (2 triangular solves + m_y x m x m)",
            "component",
            lambda a: (_sweep(p), (_factors(a.U), a.W, a.S, a.B), 2 * m * m * m_y * 2),
        ),
        Entry(
            f"dense matmul {m}^3 (the machine's matmul rate)",
            "component",
            lambda a: (lambda S: S @ S, (a.S,), 2.0 * m**3),
        ),
        *steps,
    ]


def run_profile(p: Problem, chosen: list[Entry], *, device: Any, precision, repeats: int) -> dict:
    """Time the chosen components and whole steps round-robin; read the compiled deq_jax step; check the
    hand-written step's gradients against the float64 closed form."""
    if not chosen:
        return {"rows": [], "facts": {}}
    a = _arrays(p, device)
    compiled: dict[str, Any] = {}
    facts: dict = {}
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        for entry in chosen:
            fn, args, flops = entry.make(a)
            c = jax.jit(fn).lower(*args).compile()
            compiled[entry.name] = (c, args, flops, entry.kind)
            if entry.name == STEPS["deq_jax"]:
                facts["deq_jax_step"] = hlo_facts(c.as_text(), jax.make_jaxpr(fn)(*args))
            elif entry.name == STEPS["inline"]:
                facts["inline_step"] = hlo_facts(c.as_text(), jax.make_jaxpr(fn)(*args))
            elif entry.name == STEPS["hand"]:
                _, hand = jax.jit(_closed_form(p))(a.params, a.phi, a.y)
                facts["hand_written_grad_error_vs_f64"] = relative_errors(
                    {k: np.asarray(v) for k, v in hand.items()}, delm_reference(p)["grads"]
                )
    for c, args, _, _ in compiled.values():
        jax.block_until_ready(c(*args))
    times: dict[str, list] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, (c, args, _, _) in compiled.items():
            interrupts.check()
            start = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, (_, _, flops, kind) in compiled.items():
        t = np.asarray(times[name])
        rows.append(
            {
                "name": name,
                "kind": kind,
                "times_s": t.tolist(),
                "min_s": float(t.min()),
                "median_s": float(np.median(t)),
                "gflops_at_min": (flops / t.min() / 1e9) if flops else None,
            }
        )
    return {"rows": rows, "facts": facts}


BACKWARD_SOLVERS = (
    "gmres, batched (jax default; deq_jax's default backward)",
    "gmres, incremental",
    "bicgstab",
    "normal_cg (jaxopt; counts the A products, each CG step also applies A^T)",
)


def _solution_of(solve: Callable) -> Callable:
    """`solve`'s solution alone (the solvers return `(x, info)`), as the program to compile."""
    return lambda b, S: solve(b, S)[0]


def backward_solvers(
    p: Problem, names: tuple[str, ...] = BACKWARD_SOLVERS, *, device: Any, precision, repeats: int = 2
) -> list[dict]:
    """Time and count the matrix-vector products of each linear solver on the per-sample backward system."""

    if not names:
        return []
    put = lambda a: jax.device_put(jnp.asarray(a), device)

    @jax.jit  # one program (eager calls would compile one small program per operation)
    def system(A, B, phi, y):
        S = jax.nn.softmax(A, axis=0)
        Z = jnp.linalg.solve(jnp.eye(p.m, dtype=S.dtype) - p.gamma * S, phi.T).T
        return S, (Z @ B.T - y) @ B / p.n  # sigma(A), and dL/dz of the square loss

    S, v = system(put(p.delm["A"]), put(p.delm["B"]), put(p.phi), put(p.y))
    relative_residual = jax.jit(lambda u, S, v: jnp.linalg.norm(u - p.gamma * u @ S - v) / jnp.linalg.norm(v))
    count = {"products": 0}

    def bump(_):
        count["products"] += 1

    def matvec_of(S):  # S is an argument of the compiled program, not a constant: XLA would constant-fold
        def matvec(u):  # products with it (measured: 78 s of compile for the normal-CG program)
            jax.debug.callback(bump, u[0, 0])
            return u - p.gamma * u @ S

        return matvec

    tol = p.tol
    solvers = dict(
        zip(
            BACKWARD_SOLVERS,
            (
                lambda b, S: jssl.gmres(matvec_of(S), b, tol=tol, atol=0.0, solve_method="batched"),
                lambda b, S: jssl.gmres(matvec_of(S), b, tol=tol, atol=0.0, solve_method="incremental"),
                lambda b, S: jssl.bicgstab(matvec_of(S), b, tol=tol, atol=0.0),
                lambda b, S: (jaxopt_linear_solve.solve_normal_cg(matvec_of(S), b, tol=tol, atol=0.0), None),
            ),
            strict=True,
        )
    )
    out = []
    for name in names:
        interrupts.check()
        solve = solvers[name]
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            run = jax.jit(_solution_of(solve)).lower(v, S).compile()
        jax.block_until_ready(run(v, S))
        times = []
        for _ in range(repeats):
            count["products"] = 0
            start = time.perf_counter()
            u = jax.block_until_ready(run(v, S))
            times.append(time.perf_counter() - start)
        residual = float(relative_residual(u, S, v))
        out.append({"name": name, "min_s": min(times), "products": count["products"], "relative_residual": residual})
    return out
