"""Models as init/apply pairs over pytrees: the DELM, the linear model and deep linear networks, and the `Model`
protocol that a user's own model (e.g. a tanh DEQ built on `deq_jax.solve`) follows to use the training helpers.

All models act on features `phi` of shape `(n, m)` (samples as rows; `deq_jax.maps.features` computes them) and
return predictions `(n, m_y)` plus the equilibrium solve's `Solution` (`None` for the explicit models). Each
built-in model exposes its end-to-end matrix `W` of shape `(m_y, m)` with `predictions = phi @ W.T`.

The model objects are frozen dataclasses (hashable), so they can be closed over or passed as static arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from deq_jax import _checks
from deq_jax._adjoint import Backward, Implicit, Unrolled, as_backward, precision_scope
from deq_jax._solution import Solution
from deq_jax._solve import as_solver, solve
from deq_jax._solver._base import AbstractSolver
from deq_jax._solver.fixed_point import FixedPoint
from deq_jax._solver.refine import Refine
from deq_jax._solver.relaxed import Relaxed
from deq_jax.maps import DELMMap, DELMTransposedMap, Sigma, get_sigma

Array = jax.Array
Params = dict

FORMULATIONS = ("transposed", "per_sample")
#: `solver="auto"` is "direct" below this width and "refine" from it on: a warm-started transposed step with kept
#: LU factors was measured faster than refactorising every step from m = 256 on (equal at 128, slower at 64: there
#: the factorisation costs less than the refinement's loops)
REFINE_FROM_WIDTH = 256


class Warm(NamedTuple):
    """What a model carries from one training step to the next (each field None where nothing is carried).

    `state`: the last equilibrium, the next forward solve's start (`Solution.value`); `adjoint`: the last backward
    solution, the next backward solve's start (`solve(..., adjoint_start=...)`); `solver_state`: what the solver
    left (`Solution.state`, e.g. `Refine`'s LU factors)."""

    state: Any = None
    adjoint: Any = None
    solver_state: Any = None


@runtime_checkable
class Model(Protocol):
    """What the training helpers (`make_step`, `full_batch_gd`, `fit`) need of a model: all four methods.

    - `init(key, dtype) -> params`: a pytree of float arrays;
    - `apply(params, phi, warm=None) -> (predictions, solution)`: predictions `(n, m_y)` for features `phi`
      `(n, m)` and the equilibrium solve's `Solution` (None for a model without one), its solves started from
      `warm` (a `Warm`, or None: cold starts). Differentiable in `params`.
    - `warm_start(params, phi=None, previous=None) -> Warm | None`: what the first step on `phi` carries (None:
      nothing, e.g. an explicit model, or a solve differentiated through its loop); `phi=None` is the end-to-end
      route; `previous` is the state after steps on other samples (keep what does not depend on them).
    - `end_to_end_solution(params, warm=None) -> (W, solution)`: for models linear in the features
      (`predictions = phi @ W.T`), the end-to-end matrix: the square loss's Gram route uses it. Models that are not
      linear in the features raise `ValueError`.
    A step carries `Warm(solution.value, u, solution.state)` with `u` the backward solution (see `deq_jax.solve`).
    """

    def init(self, key: Array, dtype: Any = jnp.float32) -> Any:
        """Parameters: a pytree of float arrays."""
        ...

    def apply(self, params: Any, phi: Array, warm: Warm | None = None) -> tuple[Array, Solution | None]:
        """Predictions `(n, m_y)` for features `phi` `(n, m)`, and the solve's `Solution` (or None)."""
        ...

    def warm_start(self, params: Any, phi: Array | None = None, previous: Warm | None = None) -> Warm | None:
        """What the first step on `phi` carries (None: nothing)."""
        ...

    def end_to_end_solution(self, params: Any, warm: Warm | None = None) -> tuple[Array, Solution | None]:
        """The end-to-end matrix `W` with `predictions = phi @ W.T`, and its `Solution` (or None)."""
        ...


def _check_phi(phi: Any, width: int) -> None:
    _checks.check_float_array("phi", phi)
    _checks.check_ndim("phi", phi, (2,))
    _checks.check_shape("phi", phi, (None, width), f"phi's last axis must equal the model width m={width}")


@dataclasses.dataclass(frozen=True)
class DELM:
    """Deep equilibrium linear model `f(x) = B z*`, `z* = gamma sigma(A) z* + phi(x)` (docs/theory.md section 1).

    Params: `{"A": (m, m), "B": (m_y, m)}`. `formulation`:
    - `"transposed"` (default): solve the end-to-end equilibrium `W = B + gamma W sigma(A)` (m_y right-hand sides),
      then predict `phi @ W.T`; cost O(m^3 + m m_y n) per step.
    - `"per_sample"`: solve `z_i = gamma sigma(A) z_i + phi_i` for all n samples (the generic DEQ form), predict
      `z @ B.T`; cost O(m^2 n) per iteration. Every sample is judged by the rule (`batch_axis=0`).
    Both go through any `solver` and `backward` of `deq_jax.solve` and give the same loss and gradients. The
    default "auto" becomes `Direct` below `REFINE_FROM_WIDTH` = 256 and `Refine` from there on (measured crossover);
    `Refine` without carried state factorises, as `Direct` does.

    In training (`make_step` with `warm_start=True`) each step starts its forward and backward solves from the
    previous step's solutions and keeps `Refine`'s factors: `warm_start` says what is carried. The implicit
    backward's linear solver defaults to `"forward"` (the forward solver on the backward equation) except for
    plain fixed-point iteration end to end (see `resolved_backward`); an explicit `Implicit(linear_solver=...)` is
    used as given.
    """

    width: int
    out_dim: int
    gamma: float = 0.8
    sigma: str | Sigma = "column_softmax"
    formulation: str = "transposed"
    solver: str | AbstractSolver = "auto"
    backward: str | Backward = "implicit"
    tol: float = 1e-5
    maxiter: int = 100
    precision: str | None = "highest"
    init_scale: float = 0.1

    def __post_init__(self) -> None:
        _checks.check_positive("width", self.width, integer=True)
        _checks.check_positive("out_dim", self.out_dim, integer=True)
        _checks.check_open_unit("gamma", self.gamma)
        get_sigma(self.sigma)
        _checks.check_choice("formulation", self.formulation, FORMULATIONS)
        if self.solver == "auto":  # resolved once, so that model.solver says what runs
            object.__setattr__(self, "solver", "refine" if self.width >= REFINE_FROM_WIDTH else "direct")
        as_solver(self.solver)
        as_backward(self.backward)
        _checks.check_positive("tol", self.tol)
        _checks.check_positive("maxiter", self.maxiter, integer=True)
        _checks.check_positive("init_scale", self.init_scale)

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        """`A, B ~ init_scale * N(0, 1)` (the setting of docs/theory.md section 9)."""
        ka, kb = jax.random.split(key)
        return {
            "A": self.init_scale * jax.random.normal(ka, (self.width, self.width), dtype),
            "B": self.init_scale * jax.random.normal(kb, (self.out_dim, self.width), dtype),
        }

    def check_params(self, params: Params) -> None:
        """Raise `ValueError` naming the problem unless `params` is `{"A": (m, m), "B": (m_y, m)}` of floats."""
        if not isinstance(params, dict) or set(params) != {"A", "B"}:
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"params must be a dict with keys ['A', 'B']; got {got}")
        _checks.check_float_array("params", params)
        solver = as_solver(self.solver)
        if solver.uses_matrix:  # its solves (and Refine's warm start) factorise U
            _checks.check_factorisable(
                f"DELM(solver={solver.name!r})", params, "Use an iterative solver, e.g. solver='anderson'", "params"
            )
        m, m_y = self.width, self.out_dim
        _checks.check_shape("params['A']", params["A"], (m, m), f"A is m x m with m = width = {m}")
        _checks.check_shape("params['B']", params["B"], (m_y, m), f"B is m_y x m with m_y = out_dim = {m_y}, m = {m}")

    def _solve(
        self, f: Any, z0: Array, params: Params, x: Array, warm: Warm | None, batch_axis: int | None = None
    ) -> Solution:
        warm = warm or Warm()
        start = z0 if warm.state is None else warm.state
        return solve(
            f,
            start,
            {"A": params["A"]},
            x,
            solver=self.solver,
            backward=self.resolved_backward(),
            tol=self.tol,
            maxiter=self.maxiter,
            precision=self.precision,
            batch_axis=batch_axis,
            solver_state=warm.solver_state,
            adjoint_start=warm.adjoint,
        )

    def resolved_backward(self) -> Backward:
        """The backward strategy the solves use: `Implicit(linear_solver=None)` becomes `"forward"` (the forward
        solver on the backward equation `u = v + J^T u`, affine like the forward one, started from the carried
        adjoint in training), except for plain (or relaxed) fixed-point iteration end to end, which keeps the
        iterative solvers' Krylov default (BiCGSTAB; GMRES when this was measured).

        Measured (`make bench`, m = 784, batch 1024, cold steps against the inline jaxopt step): per sample,
        Anderson with `"forward"` 0.17-0.32x the inline step against 1.8x with a batched GMRES; end to end, Anderson
        0.58x with `"forward"` against 0.9-1.2x with GMRES, but plain iteration 1.38x with `"forward"` (it needs as
        many steps on the backward as on the forward) against 0.98x with GMRES."""
        backward = as_backward(self.backward)
        if not (isinstance(backward, Implicit) and backward.linear_solver is None):
            return backward
        plain = isinstance(as_solver(self.solver), (FixedPoint, Relaxed))
        if plain and self.formulation == "transposed":
            return backward
        return dataclasses.replace(backward, linear_solver="forward")

    def end_to_end_solution(self, params: Params, warm: Warm | None = None) -> tuple[Array, Solution]:
        """The end-to-end matrix `W = B (I - gamma sigma(A))^{-1}` as the equilibrium `W = B + gamma W sigma(A)`,
        and its `Solution`."""
        self.check_params(params)
        f = DELMTransposedMap(self.gamma, self.sigma)
        sol = self._solve(f, jnp.zeros_like(params["B"]), params, params["B"], warm)
        return sol.value, sol

    def end_to_end(self, params: Params) -> Array:
        """`W` `(m_y, m)` with `predictions = phi @ W.T` (a cold solve)."""
        return self.end_to_end_solution(params)[0]

    def apply(self, params: Params, phi: Array, warm: Warm | None = None) -> tuple[Array, Solution]:
        """Predictions `(n, m_y)` and the solve's `Solution`, its solves started from `warm`."""
        self.check_params(params)
        _check_phi(phi, self.width)
        if self.formulation == "transposed":
            W, sol = self.end_to_end_solution(params, warm)
            return phi @ W.T, sol
        f = DELMMap(self.gamma, self.sigma)
        sol = self._solve(f, jnp.zeros_like(phi), params, phi, warm, batch_axis=0)
        return sol.value @ params["B"].T, sol

    def warm_start(self, params: Params, phi: Array | None = None, previous: Warm | None = None) -> Warm | None:
        """The state carried into the first step on `phi` (None: the end-to-end route, e.g. `GramData`).

        Carried: W and its adjoint `dL/dB` (end-to-end; kept from `previous` when the samples change) or z and u per
        sample (zero when they change), and the solver's state (`Refine`'s factors, kept). None for
        `backward="unrolled"` (differentiated through its loop; nothing to carry)."""
        self.check_params(params)
        if isinstance(as_backward(self.backward), Unrolled):
            return None
        end_to_end = phi is None or self.formulation == "transposed"
        if phi is not None:
            _check_phi(phi, self.width)
        if previous is not None and end_to_end:
            return previous
        zeros = jnp.zeros(params["B"].shape if end_to_end else phi.shape, params["B"].dtype)  # type: ignore[union-attr]
        if previous is not None:
            return Warm(zeros, zeros, previous.solver_state)
        solver = as_solver(self.solver)
        if not isinstance(solver, Refine):
            return Warm(zeros, zeros)
        # the factors of the equation z K = c: K = U end-to-end (W U = B), K = U^T per sample (z U^T = phi)
        U = jnp.eye(self.width, dtype=params["A"].dtype) - self.gamma * get_sigma(self.sigma)(
            jax.lax.stop_gradient(params["A"])
        )
        with precision_scope(self.precision):
            return Warm(zeros, zeros, solver.initial_state(U if end_to_end else U.T))


@dataclasses.dataclass(frozen=True)
class Linear:
    """The shallow linear model `f(x) = W phi(x)`; params `{"W": (m_y, m)}`."""

    width: int
    out_dim: int
    init_scale: float = 0.1

    def __post_init__(self):
        _checks.check_positive("width", self.width, integer=True)
        _checks.check_positive("out_dim", self.out_dim, integer=True)
        _checks.check_positive("init_scale", self.init_scale)

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        """`{"W": init_scale * N(0, 1)}` of shape `(m_y, m)`."""
        return {"W": self.init_scale * jax.random.normal(key, (self.out_dim, self.width), dtype)}

    def check_params(self, params: Params) -> None:
        """Raise `ValueError` naming the problem unless `params` is `{"W": (m_y, m)}` of floats."""
        if not isinstance(params, dict) or set(params) != {"W"}:
            raise ValueError(f"params must be a dict with key 'W'; got {params!r:.80}")
        _checks.check_float_array("params", params)
        _checks.check_shape("params['W']", params["W"], (self.out_dim, self.width))

    def end_to_end(self, params: Params) -> Array:
        """`W` itself."""
        return params["W"]

    def end_to_end_solution(self, params: Params, warm: Warm | None = None) -> tuple[Array, None]:
        """`(W, None)`: nothing is solved."""
        return self.end_to_end(params), None

    def warm_start(self, params: Params, phi: Array | None = None, previous: Warm | None = None) -> None:
        """None: an explicit model carries nothing between steps."""
        return None

    def apply(self, params: Params, phi: Array, warm: Warm | None = None) -> tuple[Array, None]:
        """Predictions `phi @ W.T` and no solution."""
        self.check_params(params)
        _check_phi(phi, self.width)
        return phi @ params["W"].T, None


@dataclasses.dataclass(frozen=True)
class DeepLinear:
    """Deep linear network `f(x) = W_H ... W_1 phi(x)` of depth H >= 1; params `{"layers": [W_1, ..., W_H]}`.

    Hidden layers have width `hidden` (default: the input width m). Init: `W_k ~ N(0, init_gain^2 / fan_in)`,
    which keeps the product's scale near `init_gain^H` and away from the saddle at zero.
    """

    width: int
    out_dim: int
    depth: int = 3
    hidden: int | None = None
    init_gain: float = 1.0

    def __post_init__(self):
        _checks.check_positive("width", self.width, integer=True)
        _checks.check_positive("out_dim", self.out_dim, integer=True)
        _checks.check_positive("depth", self.depth, integer=True)
        if self.hidden is not None:
            _checks.check_positive("hidden", self.hidden, integer=True)
        _checks.check_positive("init_gain", self.init_gain)

    def shapes(self) -> list[tuple[int, int]]:
        """The layers' shapes `(out, in)`, from `W_1` `(h, m)` to `W_H` `(m_y, h)`."""
        h = self.hidden or self.width
        dims = [self.width] + [h] * (self.depth - 1) + [self.out_dim]
        return [(dims[k + 1], dims[k]) for k in range(self.depth)]

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        """`{"layers": [W_1, ..., W_H]}` with `W_k ~ N(0, init_gain^2 / fan_in)`."""
        keys = jax.random.split(key, self.depth)
        return {
            "layers": [
                self.init_gain * jax.random.normal(k, s, dtype) / jnp.sqrt(jnp.asarray(s[1], dtype))
                for k, s in zip(keys, self.shapes(), strict=False)
            ]
        }

    def check_params(self, params: Params) -> None:
        """Raise `ValueError` naming the problem unless `params` holds `depth` layers of `shapes()`."""
        if not isinstance(params, dict) or set(params) != {"layers"} or len(params["layers"]) != self.depth:
            raise ValueError(f"params must be a dict {{'layers': [W_1, ..., W_{self.depth}]}} with depth={self.depth}")
        _checks.check_float_array("params", params)
        for k, (W, s) in enumerate(zip(params["layers"], self.shapes(), strict=False)):
            _checks.check_shape(f"params['layers'][{k}]", W, s)

    def end_to_end(self, params: Params) -> Array:
        """The product `W_H ... W_1` `(m_y, m)`."""
        W = params["layers"][0]
        for layer in params["layers"][1:]:
            W = layer @ W
        return W

    def end_to_end_solution(self, params: Params, warm: Warm | None = None) -> tuple[Array, None]:
        """`(W_H ... W_1, None)`: nothing is solved."""
        return self.end_to_end(params), None

    def warm_start(self, params: Params, phi: Array | None = None, previous: Warm | None = None) -> None:
        """None: an explicit model carries nothing between steps."""
        return None

    def apply(self, params: Params, phi: Array, warm: Warm | None = None) -> tuple[Array, None]:
        """`phi @ (W_H ... W_1).T`: the product first (O(H m^2 h)), not layer by layer over samples (O(n H m h))."""
        self.check_params(params)
        _check_phi(phi, self.width)
        return phi @ self.end_to_end(params).T, None
