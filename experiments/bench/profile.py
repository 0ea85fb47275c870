"""`python -m experiments bench --suite profile`: where the time of the transposed DELM step goes.

The transposed (end-to-end) step costs one LU factorisation of the m x m matrix `U = I - gamma sigma(A)` plus
O(m m_y n) products. This suite times, in one process with interleaved repeats:

- each component of the step alone (softmax, the LU factorisation, LAPACK's pivots-to-permutation loop, the
  triangular solves, the `phi W^T` and `R^T phi` products, the backward's outer product and softmax transpose, the
  optax update, deq_jax's residual check `W sigma(A)`), and a dense 784^3 matmul for the machine's matmul rate;
- three whole steps: deq_jax (`DELM` + `make_step`), the inline `jnp.linalg.solve` + autodiff baseline, and a
  hand-written step with the closed-form gradients of docs/theory.md (one `lu_factor`, explicit `lu_solve`s), which
  is the floor for these kernels;

and it reads the compiled deq_jax step: how many LU factorisations (`getrf` custom calls; the backward must reuse
the forward's factors), triangular solves and while loops it contains, and how many `lu` primitives its jaxpr has.

It also times the per-sample implicit backward's linear solve alone, `(I - J^T) u = v` with `J^T u = gamma u S`
on the `(n, m)` state and `v` the loss's cotangent, with each Krylov solver at relative tolerance `tol`, counting
its matrix-vector products (a host callback per product; the count is exact, the time includes the callbacks).
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import optax

from experiments.bench.common import Problem, relative_errors, delm_reference


def _count_primitive(jaxpr, name: str) -> int:
    """Occurrences of primitive `name` in a jaxpr, nested jaxprs (pjit, custom_vjp, while, cond, ...) included."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            count += 1
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (list, tuple)) else [value]):
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


def _steps(p: Problem, precision) -> dict[str, Callable]:
    """The three whole steps, as `step(params, opt_state, phi, y)`."""
    from deq_jax.models import DELM
    from deq_jax.train import make_step

    optimizer = optax.sgd(p.learning_rate)
    gamma, m = p.gamma, p.m

    def inline_loss(params, phi, y):
        S = jax.nn.softmax(params["A"], axis=0)
        W = jnp.linalg.solve((jnp.eye(m, dtype=S.dtype) - gamma * S).T, params["B"].T).T
        r = phi @ W.T - y
        return 0.5 * jnp.mean(jnp.sum(r * r, axis=-1))

    def closed_form(params, phi, y):
        """Loss and gradients of docs/theory.md section 3 with one LU of U (no autodiff)."""
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

    def with_update(value_and_grad):
        def step(params, opt_state, phi, y):
            value, grads = value_and_grad(params, phi, y)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        return step

    model = DELM(p.m, p.m_y, gamma=p.gamma, formulation="transposed", solver="direct", precision=precision)
    return {
        "deq_jax step (DELM + make_step)": make_step(model, "square", optimizer, jit=False),
        "inline step (jnp.linalg.solve + autodiff)": with_update(jax.value_and_grad(inline_loss)),
        "hand-written step (closed-form gradients, one lu_factor)": with_update(closed_form),
    }, closed_form


def run_profile(p: Problem, *, device: Any, precision, repeats: int, log=print) -> dict:
    """Time the components and the whole steps; read the compiled deq_jax step."""
    put = lambda a: jax.device_put(jnp.asarray(a), device)
    A, B, phi, y = put(p.delm["A"]), put(p.delm["B"]), put(p.phi), put(p.y)
    gamma, m = p.gamma, p.m
    S = jax.nn.softmax(A, axis=0)
    U = jnp.eye(m, dtype=S.dtype) - gamma * S
    _, pivots, _ = jax.lax.linalg.lu(U.T)
    W = jnp.linalg.solve(U.T, B.T).T
    R = phi @ W.T - y
    G = R.T @ phi / p.n
    params = {"A": A, "B": B}
    optimizer = optax.sgd(p.learning_rate)
    opt_state = optimizer.init(params)
    components: list[tuple[str, Callable, tuple, float]] = [
        # (name, function, arguments, flops)
        ("softmax sigma(A) (column)", lambda A: jax.nn.softmax(A, axis=0), (A,), 0.0),
        ("LU factorisation of U (lax.linalg.lu: getrf + permutation)", jax.lax.linalg.lu, (U.T,), 2 / 3 * m**3),
        ("  of which pivots -> permutation loop", lambda piv: jax.lax.linalg.lu_pivots_to_permutation(piv, m),
         (pivots,), 0.0),
        ("jnp.linalg.solve(U^T, B^T): LU + 2 triangular solves (forward)",
         lambda U, B: jnp.linalg.solve(U.T, B.T), (U, B), 2 / 3 * m**3 + 2 * m * m * p.m_y),
        ("predictions phi W^T (n x m x m_y)", lambda phi, W: phi @ W.T, (phi, W), 2 * p.n * m * p.m_y),
        ("G = R^T phi / n (m_y x n x m)", lambda R, phi: R.T @ phi / p.n, (R, phi), 2 * p.n * m * p.m_y),
        ("dL/dsigma = gamma W^T dB (outer, m x m_y x m)", lambda W, G: gamma * W.T @ G, (W, G),
         2 * m * m * p.m_y),
        ("softmax transpose S * (dS - 1 1^T (S * dS))",
         lambda S, dS: S * (dS - jnp.sum(S * dS, axis=0, keepdims=True)), (S, S), 0.0),
        ("optax SGD update", lambda g, s, prm: optimizer.update(g, s, prm), (params, opt_state, params), 0.0),
        ("deq_jax residual check W sigma(A) (m_y x m x m)", lambda W, S: B + gamma * W @ S, (W, S),
         2 * m * m * p.m_y),
        (f"dense matmul {m}^3 (the machine's matmul rate)", lambda S: S @ S, (S,), 2.0 * m**3),
    ]
    steps, closed_form = _steps(p, precision)
    compiled: dict[str, Any] = {}
    facts: dict = {}
    for name, fn, args, flops in components:
        compiled[name] = (jax.jit(fn).lower(*args).compile(), args, flops)
    for name, step in steps.items():
        args = (params, opt_state, phi, y)
        lowered = jax.jit(step).lower(*args)
        c = lowered.compile()
        compiled[name] = (c, args, 0.0)
        if name.startswith("deq_jax"):
            facts["deq_jax_step"] = hlo_facts(c.as_text(), jax.make_jaxpr(step)(*args))
        if name.startswith("inline"):
            facts["inline_step"] = hlo_facts(c.as_text(), jax.make_jaxpr(step)(*args))
    ref = delm_reference(p)["grads"]
    _, hand = jax.jit(closed_form)(params, phi, y)
    facts["hand_written_grad_error_vs_f64"] = relative_errors({k: np.asarray(v) for k, v in hand.items()}, ref)
    for c, args, _ in compiled.values():
        jax.block_until_ready(c(*args))
    times: dict[str, list] = {name: [] for name in compiled}
    for r in range(repeats):
        for name, (c, args, _) in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, (_, _, flops) in compiled.items():
        t = np.asarray(times[name])
        rows.append({"name": name, "min_s": float(t.min()), "median_s": float(np.median(t)),
                     "gflops_at_min": (flops / t.min() / 1e9) if flops else None,
                     "kind": "step" if "step" in name else "component"})
    return {"rows": rows, "facts": facts}


def backward_solvers(p: Problem, *, device: Any, precision, repeats: int = 2) -> list[dict]:
    """Time and count the matrix-vector products of each linear solver on the per-sample backward system."""
    import functools

    import jax.scipy.sparse.linalg as jssl

    from deq_jax.solve import _linear_solve  # jaxopt.linear_solve, as the library imports it

    put = lambda a: jax.device_put(jnp.asarray(a), device)
    A, B, phi, y = put(p.delm["A"]), put(p.delm["B"]), put(p.phi), put(p.y)
    S = jax.nn.softmax(A, axis=0)
    Z = jnp.linalg.solve(jnp.eye(p.m, dtype=S.dtype) - p.gamma * S, phi.T).T
    v = (Z @ B.T - y) @ B / p.n  # dL/dz of the square loss
    count = {"products": 0}

    def bump(_):
        count["products"] += 1

    def matvec(u):
        jax.debug.callback(bump, u[0, 0])
        return u - p.gamma * u @ S

    tol = p.tol
    solvers = {
        "gmres, batched (jax default; deq_jax's default backward)": functools.partial(
            jssl.gmres, matvec, tol=tol, atol=0.0, solve_method="batched"),
        "gmres, incremental": functools.partial(jssl.gmres, matvec, tol=tol, atol=0.0, solve_method="incremental"),
        "bicgstab": functools.partial(jssl.bicgstab, matvec, tol=tol, atol=0.0),
        "normal_cg (jaxopt; counts the A products, each CG step also applies A^T)": lambda b: (
            _linear_solve.solve_normal_cg(matvec, b, tol=tol, atol=0.0), None),
    }
    out = []
    for name, solve in solvers.items():
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            run = jax.jit(lambda b: solve(b)[0]).lower(v).compile()
        jax.block_until_ready(run(v))
        times = []
        for _ in range(repeats):
            count["products"] = 0
            start = time.perf_counter()
            u = jax.block_until_ready(run(v))
            times.append(time.perf_counter() - start)
        residual = float(jnp.linalg.norm(u - p.gamma * u @ S - v) / jnp.linalg.norm(v))
        out.append({"name": name, "min_s": min(times), "products": count["products"], "relative_residual": residual})
    return out


def backward_table(rows: list[dict]) -> str:
    lines = ["| per-sample backward linear solve | min ms | matrix-vector products | relative residual |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['min_s'] * 1e3:.0f} | {r['products']} | {r['relative_residual']:.1e} |")
    return "\n".join(lines)


def profile_table(result: dict) -> str:
    lines = ["| component / step | min ms | median ms | GFLOP/s at min |", "|---|---|---|---|"]
    for row in result["rows"]:
        rate = "-" if row["gflops_at_min"] is None else f"{row['gflops_at_min']:.1f}"
        lines.append(f"| {row['name']} | {row['min_s'] * 1e3:.2f} | {row['median_s'] * 1e3:.2f} | {rate} |")
    return "\n".join(lines)
