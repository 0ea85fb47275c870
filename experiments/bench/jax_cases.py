"""The JAX rows of the benchmarks: deq_jax through its public API, and the same computations written inline with
plain JAX + jaxopt (the baseline a user would write by hand).

Each builder returns a `Case`; its `prepare()` compiles the whole training step (`value_and_grad` + an optax SGD
update) with `jax.jit(step).lower(...).compile()`, timing trace + compile, and reads the compiled program's XLA
temporary memory (`memory_analysis().temp_size_in_bytes`).

The deq_jax rows use the library's own code path: `deq_jax.models.DELM` (or `deq_jax.solve` with
`deq_jax.maps.TanhMap`) inside `deq_jax.train.make_step`, whose metrics carry the solve's statistics.
The inline rows compute `sigma(A)` once, hand it to a jaxopt solver (`implicit_diff=True`, backward GMRES at the
same relative tolerance as the forward) or to `jnp.linalg.solve`, and return jaxopt's own iteration count. jaxopt
stops on an absolute tolerance: it gets `tol * |z*|` (`checks.equilibrium_norm`, the float64 equilibrium's norm),
so that it stops by deq_jax's rule `|f(z) - z| <= tol |f(z)|` (a user would not know `|z*|`; the benchmark gives
it so that both do the same work).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import optax

from deq_jax import DELMMap, Implicit, TanhMap, make_step, solve, square
from experiments.bench.checks import equilibrium_norm
from experiments.bench.problem import Problem
from experiments.bench.protocol import Case, Check, Prepared
from experiments.common import models as model_lib

with warnings.catch_warnings():
    # jaxopt 0.8.5 is its final release and warns on import; the baseline uses it knowingly
    warnings.filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)
    import jaxopt
    from jaxopt import linear_solve


def precision_context(precision: str | None):
    """`jax.default_matmul_precision(precision)`, or nothing for None (JAX's own default)."""
    return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


def _square(predictions, y):
    r = predictions - y
    return 0.5 * jnp.mean(jnp.sum(r * r, axis=-1))


def _to_numpy(tree: dict) -> dict:
    return {k: np.asarray(v) for k, v in tree.items()}


def _prepare(
    step: Callable,
    params: dict,
    data: tuple,
    check_fn: Callable,
    info: Callable[[Any], tuple],
    device: Any,
    precision: str | None,
    learning_rate: float,
) -> Prepared:
    """Compile `step(params, opt_state, phi, y)` for `device`. The (untimed) check runs the jitted
    `check_fn(params, phi, y) -> (grads, aux, equilibrium)` (one program: gradients and the returned equilibrium
    in one compile); `info(aux) -> (iterations, converged)`."""
    optimizer = optax.sgd(learning_rate)
    params = jax.device_put({k: jnp.asarray(v) for k, v in params.items()}, device)
    opt_state = jax.device_put(optimizer.init(params), device)
    phi, y = jax.device_put(tuple(jnp.asarray(a) for a in data), device)
    args = (params, opt_state, phi, y)
    with precision_context(precision):
        start = time.perf_counter()
        compiled = jax.jit(functools.partial(step, optimizer=optimizer)).lower(*args).compile()
        compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = None if memory is None else int(memory.temp_size_in_bytes)

    def run():
        return jax.block_until_ready(compiled(*args))

    def check() -> Check:
        with precision_context(precision):
            grads, aux, state = check_fn(params, phi, y)
        iterations, converged = info(aux)
        return Check(iterations=iterations, converged=converged, state=np.asarray(state), grads=_to_numpy(grads))

    return Prepared(run=run, check=check, compile_s=compile_s, temp_bytes=temp)


@functools.lru_cache(maxsize=64)
def _delm_check(model, gamma: float) -> Callable:
    """The jitted check of a `DELM` model's step: `(params, phi, y) -> (grads, stats, equilibrium)`.

    Cached per model (a frozen dataclass), so the float32 direct reference (`direct_gradients`) and the row with
    the same model share one compiled program."""

    def check(params, phi, y):
        grads, stats = jax.grad(_square_objective(model), has_aux=True)(params, phi, y)
        if model.formulation == "transposed":
            return grads, stats, model.end_to_end(params)
        state = solve(
            DELMMap(gamma),
            jnp.zeros_like(phi),
            {"A": params["A"]},
            phi,
            solver=model.solver,
            backward=model.backward,
            tol=model.tol,
            maxiter=model.maxiter,
            precision=model.precision,
        ).value
        return grads, stats, state

    return jax.jit(check)


def _library_step(model):
    def step(params, opt_state, phi, y, *, optimizer):
        return make_step(model, "square", optimizer, jit=False)(params, opt_state, phi, y)

    return step


def _stats_info(stats) -> tuple:
    return int(stats.iterations), bool(stats.converged)


def _square_objective(model) -> Callable:
    """`(params, phi, y) -> (square loss, the solve's statistics)`: the loss a library step differentiates."""

    def objective(params, phi, y):
        predictions, solution = model.apply(params, phi)
        return square(predictions, y), solution.stats

    return objective


# ----------------------------------------------------------------------------- deq_jax rows


def _delm_model(
    p: Problem, formulation: str, solver: str, backward: Any, tol: float, maxiter: int, precision: str | None
):
    return model_lib.build(
        "delm",
        p.m,
        p.m_y,
        gamma=p.gamma,
        formulation=formulation,
        solver=solver,
        backward=backward,
        tol=tol,
        maxiter=maxiter,
        precision=precision,
    )


def deq_jax_delm(
    p: Problem,
    formulation: str,
    solver: str,
    backward: str,
    *,
    device: Any,
    precision: str | None,
    tol: float | None = None,
    maxiter: int | None = None,
    linear_solver: str | None = None,
    backward_tol: float | None = None,
    unconverged_forward: str = "raise",
    label: str = "",
    note: str = "",
) -> Case:
    """The DELM step through `deq_jax.models.DELM` + `deq_jax.train.make_step`.

    `linear_solver` / `backward_tol` choose the implicit backward's linear solver and its tolerance (default: the
    model's choice at the forward tolerance); `unconverged_forward="ignore"` lets a row that stops its forward solve
    early by design (the memory rows) take the implicit gradient there.
    """

    backward_arg: Any = backward
    if backward == "implicit" and (linear_solver or backward_tol or unconverged_forward != "raise"):
        backward_arg = Implicit(linear_solver=linear_solver, tol=backward_tol, unconverged_forward=unconverged_forward)
    tol = p.tol if tol is None else tol
    maxiter = p.maxiter if maxiter is None else maxiter

    def prepare() -> Prepared:
        model = _delm_model(p, formulation, solver, backward_arg, tol, maxiter, precision)
        return _prepare(
            _library_step(model),
            p.delm,
            (p.phi, p.y),
            _delm_check(model, p.gamma),
            _stats_info,
            device,
            precision,
            p.learning_rate,
        )

    name_backward = f"implicit[{linear_solver}]" if linear_solver else backward
    return Case("deq_jax", "delm", formulation, solver, name_backward, prepare, label=label, note=note, tol=tol)


@dataclasses.dataclass(frozen=True)
class _TanhModel:
    """`predictions = z* B^T` with `z* = TanhMap(z*, {W, U, b}, phi)`: a model in deq_jax's init/apply shape."""

    contraction: float
    width: int
    solver: str
    backward: Any
    tol: float
    maxiter: int
    precision: str | None

    def apply(self, params, phi, warm=None):
        sol = self.solve(params, phi)
        return sol.value @ params["B"].T, sol

    def warm_start(self, params, phi=None, previous=None):
        return None  # the peers' steps start from zero: so does this row

    def end_to_end_solution(self, params, warm=None):
        raise ValueError("a tanh DEQ is not linear in its features")

    def solve(self, params, phi):
        inner = {k: params[k] for k in ("W", "U", "b")}
        return solve(
            TanhMap(self.contraction),
            jnp.zeros((phi.shape[0], self.width), phi.dtype),
            inner,
            phi,
            solver=self.solver,
            backward=self.backward,
            tol=self.tol,
            maxiter=self.maxiter,
            precision=self.precision,
        )

    def solution(self, params, phi):
        return self.solve(params, phi).value


def deq_jax_tanh(
    p: Problem, solver: str, backward: str, *, device: Any, precision: str | None, linear_solver: str | None = None
) -> Case:
    """The tanh DEQ step through `deq_jax.solve` + `deq_jax.train.make_step` (`linear_solver`: the implicit
    backward's, default the library's GMRES)."""

    backward_arg: Any = Implicit(linear_solver=linear_solver) if linear_solver else backward

    def prepare() -> Prepared:
        model = _TanhModel(p.contraction, p.m, solver, backward_arg, p.tol, p.maxiter, precision)

        def check(params, phi, y):
            grads, stats = jax.grad(_square_objective(model), has_aux=True)(params, phi, y)
            return grads, stats, model.solution(params, phi)

        return _prepare(
            _library_step(model), p.tanh, (p.phi, p.y), jax.jit(check), _stats_info, device, precision, p.learning_rate
        )

    return Case(
        "deq_jax", "tanh", "per_sample", solver, f"implicit[{linear_solver}]" if linear_solver else backward, prepare
    )


# ----------------------------------------------------------------------------- the inline baseline


def _jaxopt_solver(solver: str, f: Callable, tol_abs, maxiter: int, tol: float):
    """A jaxopt solver with its own implicit differentiation and a GMRES backward at relative tolerance `tol`."""
    backward = functools.partial(linear_solve.solve_gmres, tol=tol, atol=0.0)
    common = dict(tol=tol_abs, maxiter=maxiter, implicit_diff=True, implicit_diff_solve=backward)
    if solver == "anderson":
        return jaxopt.AndersonAcceleration(fixed_point_fun=f, **common)
    if solver == "fixed_point":
        return jaxopt.FixedPointIteration(fixed_point_fun=f, **common)
    if solver == "broyden":  # on g(z) = f(z) - z, inverse Jacobian started at -I (the DEQ sign)
        return jaxopt.Broyden(fun=lambda z, *args: f(z, *args) - z, gamma=-1.0, **common)
    raise ValueError(f"inline baseline: unknown solver {solver!r}")


def _inline_step(loss: Callable):
    def step(params, opt_state, phi, y, *, optimizer):
        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, phi, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value, aux["iterations"], aux["converged"]

    return step


def _inline_check(loss: Callable) -> Callable:
    """The jitted check of an inline step: gradients, and the equilibrium its loss returns in `aux`."""

    def check(params, phi, y):
        grads, aux = jax.grad(loss, has_aux=True)(params, phi, y)
        return grads, aux, aux["state"]

    return jax.jit(check)


def _inline_info(aux) -> tuple:
    iterations = int(aux["iterations"])
    return iterations, (None if aux["converged"] is None else bool(aux["converged"]))


def inline_delm(p: Problem, formulation: str, solver: str, *, device: Any, precision: str | None) -> Case:
    """The DELM step written by hand: `jnp.linalg.solve` for direct, a jaxopt solver otherwise."""
    gamma, tol, maxiter, m = p.gamma, p.tol, p.maxiter, p.m

    def loss(params, phi, y):
        S = jax.nn.softmax(params["A"], axis=0)
        B = params["B"]
        if solver == "direct":
            U = jnp.eye(m, dtype=S.dtype) - gamma * S
            state = (
                jnp.linalg.solve(U.T, B.T).T  # W U = B
                if formulation == "transposed"
                else jnp.linalg.solve(U, phi.T).T  # U z_i = phi_i for every sample
            )
            aux = {"iterations": jnp.zeros((), jnp.int32), "converged": None}
        else:
            if formulation == "transposed":
                f, z0, args = (lambda W, S, B: B + gamma * W @ S), jnp.zeros_like(B), (S, B)
            else:
                f, z0, args = (lambda z, S, x: gamma * z @ S.T + x), jnp.zeros_like(phi), (S, phi)
            tol_abs = tol * equilibrium_norm(p, "delm", formulation)  # deq_jax's rule at the solution
            state, st = _jaxopt_solver(solver, f, tol_abs, maxiter, tol).run(z0, *args)
            aux = {"iterations": st.iter_num, "converged": st.error <= tol_abs}
        predictions = phi @ state.T if formulation == "transposed" else state @ B.T
        return _square(predictions, y), dict(aux, state=state)

    def prepare() -> Prepared:
        return _prepare(
            _inline_step(loss),
            p.delm,
            (p.phi, p.y),
            _inline_check(loss),
            _inline_info,
            device,
            precision,
            p.learning_rate,
        )

    return Case("inline", "delm", formulation, solver, "autodiff" if solver == "direct" else "implicit", prepare)


def inline_tanh(p: Problem, solver: str, *, device: Any, precision: str | None) -> Case:
    """The tanh DEQ step written by hand with a jaxopt solver (injection `U x + b` computed once)."""
    c, tol, maxiter = p.contraction, p.tol, p.maxiter

    def loss(params, phi, y):
        W = params["W"]
        Wc = W * jnp.minimum(1.0, c / jnp.sqrt(jnp.sum(W * W)))
        injection = phi @ params["U"].T + params["b"]
        f = lambda z, Wc, injection: jnp.tanh(z @ Wc.T + injection)
        tol_abs = tol * equilibrium_norm(p, "tanh", "per_sample")  # deq_jax's rule at the solution
        state, st = _jaxopt_solver(solver, f, tol_abs, maxiter, tol).run(
            jnp.zeros((phi.shape[0], p.m), phi.dtype), Wc, injection
        )
        aux = {"iterations": st.iter_num, "converged": st.error <= tol_abs, "state": state}
        return _square(state @ params["B"].T, y), aux

    def prepare() -> Prepared:
        return _prepare(
            _inline_step(loss),
            p.tanh,
            (p.phi, p.y),
            _inline_check(loss),
            _inline_info,
            device,
            precision,
            p.learning_rate,
        )

    return Case("inline", "tanh", "per_sample", solver, "implicit", prepare)


# ----------------------------------------------------------------------------- yardsticks


def lu_factor(p: Problem, *, device: Any, precision: str | None) -> Case:
    """The bare m x m LU factorisation of the transposed step, `jax.scipy.linalg.lu_factor(U^T)` (getrf and its
    pivots), with `U = I - gamma sigma(A)` computed outside the timed call: the yardstick a transposed training step
    is measured against (a direct step costs one such factorisation plus O(m m_y n) products).

    Its untimed check solves `W U = B` with the factors (`lu_solve`), so the independent residual check judges the
    factorisation's accuracy like any other row's equilibrium; it computes no gradient.
    """

    def prepare() -> Prepared:
        e = np.exp(p.delm["A"] - p.delm["A"].max(axis=0))  # the column softmax, in float32 like the steps'
        U = np.eye(p.m, dtype=np.float32) - np.float32(p.gamma) * e / e.sum(axis=0)
        U_T = jax.device_put(jnp.asarray(U.T), device)
        B_T = jax.device_put(jnp.asarray(p.delm["B"].T), device)
        with precision_context(precision):
            start = time.perf_counter()
            compiled = jax.jit(jsl.lu_factor).lower(U_T).compile()
            compile_s = time.perf_counter() - start
            solve = jax.jit(lambda lu, piv, b: jsl.lu_solve((lu, piv), b))
        memory = compiled.memory_analysis()

        def check() -> Check:
            with precision_context(precision):
                W = solve(*compiled(U_T), B_T).T  # U^T W^T = B^T
            return Check(iterations=0, converged=None, state=np.asarray(W), grads={})

        return Prepared(
            run=lambda: jax.block_until_ready(compiled(U_T)),
            check=check,
            compile_s=compile_s,
            temp_bytes=None if memory is None else int(memory.temp_size_in_bytes),
        )

    return Case(
        "inline",
        "delm",
        "transposed",
        "lu_factor",
        "",
        prepare,
        note="the bare m x m LU factorisation (jax.scipy.linalg.lu_factor), no gradient: the yardstick",
    )


def direct_gradients(p: Problem, *, device: Any, precision: str | None) -> dict:
    """deq_jax's float32 direct (closed-form) DELM gradients: the reference of the tables' "vs direct" column.

    The same model, hence the same compiled check, as the `deq_jax delm transposed direct implicit` row."""
    model = _delm_model(p, "transposed", "direct", "implicit", p.tol, p.maxiter, precision)
    params = jax.device_put({k: jnp.asarray(v) for k, v in p.delm.items()}, device)
    phi, y = jax.device_put((jnp.asarray(p.phi), jnp.asarray(p.y)), device)
    with precision_context(precision):
        grads, _, _ = _delm_check(model, p.gamma)(params, phi, y)
    return _to_numpy(grads)
