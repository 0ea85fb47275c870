"""Models as init/apply pairs over pytrees: the DELM, the linear model and deep linear networks, and the `Model`
protocol that a user's own model (e.g. a tanh DEQ built on `deq_jax.solve`) follows to use the training helpers.

All models act on features `phi` of shape `(n, m)` (samples as rows; `deq_jax.maps.features` computes them) and
return predictions `(n, m_y)` plus solver statistics (`None` for the explicit models). Each built-in model exposes
its end-to-end matrix `W` of shape `(m_y, m)` with `predictions = phi @ W.T`.

The model objects are frozen dataclasses (hashable), so they can be closed over or passed as static arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol, Union, runtime_checkable

import jax
import jax.numpy as jnp

from deq_jax import _checks
from deq_jax.maps import DELMMap, DELMTransposedMap, Sigma, get_sigma
from deq_jax import warm as warm_lib
from deq_jax.refine import Refine
from deq_jax.solve import SOLVERS, Backward, Solution, SolveStats, Solver, as_backward, as_solver, solve
from deq_jax.warm import DELMWarm, StepStats

Array = jax.Array
Params = dict

FORMULATIONS = ("transposed", "per_sample")
#: the DELM's solvers: those of `deq_jax.solve`, and "refine" (LU factors kept across training steps)
DELM_SOLVERS: dict[str, Callable[[], Any]] = {**SOLVERS, "refine": Refine}
#: `solver="auto"` is "direct" below this width and "refine" from it on: a warm-started transposed step with kept
#: LU factors was measured faster than refactorising every step from m = 256 on (equal at 128, slower at 64: there
#: the factorisation costs less than the refinement's loops)
REFINE_FROM_WIDTH = 256


@runtime_checkable
class Model(Protocol):
    """What the training helpers (`make_step`, `full_batch_gd`, `minibatch_train`) need of a model.

    Required:
    - `init(key, dtype) -> params`: a pytree of float arrays;
    - `apply(params, phi) -> (predictions, stats)`: predictions `(n, m_y)` for features `phi` `(n, m)`, and the
      equilibrium solve's `SolveStats` (None for a model without one). Differentiable in `params`.
    Optional, each enabling a route:
    - `end_to_end(params) -> W` with `predictions = phi @ W.T`: the square loss's Gram route (`GramData`);
    - `warm_start(params, phi, previous=None) -> warm` and
      `warm_value_and_grad(params, phi, objective, warm) -> (value, grads, warm, StepStats)`, with
      `objective(params, predictions) -> scalar`: solves started from the last step's solution (see `deq_jax.warm`;
      `implicit_value_and_grad` builds the second for any map);
    - `end_to_end_value_and_grad(params, objective, warm)`, `objective(params, W)`: the same on the Gram route.
    """

    def init(self, key: Array, dtype: Any = jnp.float32) -> Any: ...

    def apply(self, params: Any, phi: Array) -> tuple[Array, Optional[SolveStats]]: ...


def _is_refine(solver: Any) -> bool:
    return isinstance(solver, Refine) or (isinstance(solver, str) and solver == "refine")


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
      `z @ B.T`; cost O(m^2 n) per iteration.
    Both go through any `solver` and `backward` of `deq_jax.solve` and give the same loss and gradients.
    `solver="refine"` (or `Refine(...)`) keeps the LU factors of an earlier `U` across training steps and refines
    to tolerance (`deq_jax.refine`); without carried state (`apply`) it is the direct solve. The default "auto"
    becomes "direct" below `REFINE_FROM_WIDTH` = 256 and "refine" from there on (measured crossover).

    In training (`make_step` with `warm_start=True`) each step starts its solves from the previous step's solution
    and computes the gradient explicitly (`deq_jax.warm`): `warm_start`, `warm_value_and_grad`,
    `end_to_end_value_and_grad`. There `Implicit(tol, maxiter)` set the adjoint solve's tolerance and iteration cap;
    the adjoint is solved by the forward solver (`Implicit.linear_solver` applies to `apply`'s backward).
    """

    width: int
    out_dim: int
    gamma: float = 0.8
    sigma: Union[str, Sigma] = "column_softmax"
    formulation: str = "transposed"
    solver: Union[str, Solver] = "auto"
    backward: Union[str, Backward] = "implicit"
    tol: float = 1e-5
    maxiter: int = 100
    precision: Optional[str] = "highest"
    init_scale: float = 0.1

    def __post_init__(self):
        _checks.check_positive("width", self.width, integer=True)
        _checks.check_positive("out_dim", self.out_dim, integer=True)
        _checks.check_open_unit("gamma", self.gamma)
        get_sigma(self.sigma)
        _checks.check_choice("formulation", self.formulation, FORMULATIONS)
        if isinstance(self.solver, str):
            _checks.check_choice("solver", self.solver, (*DELM_SOLVERS, "auto"))
            if self.solver == "auto":  # resolved once, so that model.solver says what runs
                object.__setattr__(self, "solver", "refine" if self.width >= REFINE_FROM_WIDTH else "direct")
        if not _is_refine(self.solver):
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
        if not isinstance(params, dict) or set(params) != {"A", "B"}:
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"params must be a dict with keys ['A', 'B']; got {got}")
        _checks.check_float_array("params", params)
        m, m_y = self.width, self.out_dim
        _checks.check_shape("params['A']", params["A"], (m, m), f"A is m x m with m = width = {m}")
        _checks.check_shape("params['B']", params["B"], (m_y, m), f"B is m_y x m with m_y = out_dim = {m_y}, m = {m}")

    def _solve(self, f, z0, params, x, batch_axis=None) -> Solution:
        solver = "direct" if _is_refine(self.solver) else self.solver  # no carried factors: factorise now
        return solve(f, z0, params, x, solver=solver, backward=self.backward, tol=self.tol,
                     maxiter=self.maxiter, precision=self.precision, batch_axis=batch_axis)

    def end_to_end_solution(self, params: Params) -> Solution:
        """The end-to-end matrix `W = B (I - gamma sigma(A))^{-1}` as the equilibrium `W = B + gamma W sigma(A)`."""
        self.check_params(params)
        f = DELMTransposedMap(self.gamma, self.sigma)
        return self._solve(f, jnp.zeros_like(params["B"]), {"A": params["A"]}, params["B"])

    def end_to_end(self, params: Params) -> Array:
        return self.end_to_end_solution(params).value

    def apply(self, params: Params, phi: Array) -> tuple[Array, SolveStats]:
        """Predictions `(n, m_y)` and the solve's statistics."""
        self.check_params(params)
        _check_phi(phi, self.width)
        if self.formulation == "transposed":
            sol = self.end_to_end_solution(params)
            return phi @ sol.value.T, sol.stats
        f = DELMMap(self.gamma, self.sigma)
        # per sample: each sample's residual is judged, so one sample far from its equilibrium is seen
        sol = self._solve(f, jnp.zeros_like(phi), {"A": params["A"]}, phi, batch_axis=0)
        return sol.value @ params["B"].T, sol.stats

    # ------------------------------------------------------------------------- warm-started training (deq_jax.warm)

    def warm_start(self, params: Params, phi: Optional[Array] = None, previous: Optional[DELMWarm] = None
                   ) -> Optional[DELMWarm]:
        """The solver state carried into the first step on `phi` (None: the end-to-end route, e.g. `GramData`).

        Carried: W and dL/dB (end-to-end; kept from `previous` when the samples change) or z and u per sample
        (reset when they change); the LU factors for "refine". None for `backward="unrolled"`."""
        self.check_params(params)
        if phi is not None:
            _check_phi(phi, self.width)
        return warm_lib.delm_warm_start(self, params, phi, previous)

    def warm_value_and_grad(self, params: Params, phi: Array, objective: Callable, warm: DELMWarm
                            ) -> tuple[Array, Params, DELMWarm, StepStats]:
        """`objective(params, predictions)`'s value and gradient, solves started from `warm`; the new `warm`."""
        self.check_params(params)
        _check_phi(phi, self.width)
        if self.formulation == "transposed":
            return self.end_to_end_value_and_grad(params, lambda p, W: objective(p, phi @ W.T), warm)
        return warm_lib.delm_value_and_grad(self, params, lambda p, z: objective(p, z @ p["B"].T), warm,
                                            end_to_end=False, phi=phi)

    def end_to_end_value_and_grad(self, params: Params, objective: Callable, warm: DELMWarm
                                  ) -> tuple[Array, Params, DELMWarm, StepStats]:
        """`objective(params, W)`'s value and gradient at `W = B U^{-1}`, solves started from `warm`."""
        self.check_params(params)
        return warm_lib.delm_value_and_grad(self, params, objective, warm, end_to_end=True)


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
        return {"W": self.init_scale * jax.random.normal(key, (self.out_dim, self.width), dtype)}

    def check_params(self, params: Params) -> None:
        if not isinstance(params, dict) or set(params) != {"W"}:
            raise ValueError(f"params must be a dict with key 'W'; got {params!r:.80}")
        _checks.check_float_array("params", params)
        _checks.check_shape("params['W']", params["W"], (self.out_dim, self.width))

    def end_to_end(self, params: Params) -> Array:
        return params["W"]

    def apply(self, params: Params, phi: Array) -> tuple[Array, None]:
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
    hidden: Optional[int] = None
    init_gain: float = 1.0

    def __post_init__(self):
        _checks.check_positive("width", self.width, integer=True)
        _checks.check_positive("out_dim", self.out_dim, integer=True)
        _checks.check_positive("depth", self.depth, integer=True)
        if self.hidden is not None:
            _checks.check_positive("hidden", self.hidden, integer=True)
        _checks.check_positive("init_gain", self.init_gain)

    def shapes(self) -> list[tuple[int, int]]:
        h = self.hidden or self.width
        dims = [self.width] + [h] * (self.depth - 1) + [self.out_dim]
        return [(dims[k + 1], dims[k]) for k in range(self.depth)]

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        keys = jax.random.split(key, self.depth)
        return {
            "layers": [
                self.init_gain * jax.random.normal(k, s, dtype) / jnp.sqrt(jnp.asarray(s[1], dtype))
                for k, s in zip(keys, self.shapes())
            ]
        }

    def check_params(self, params: Params) -> None:
        if not isinstance(params, dict) or set(params) != {"layers"} or len(params["layers"]) != self.depth:
            raise ValueError(f"params must be a dict {{'layers': [W_1, ..., W_{self.depth}]}} with depth={self.depth}")
        _checks.check_float_array("params", params)
        for k, (W, s) in enumerate(zip(params["layers"], self.shapes())):
            _checks.check_shape(f"params['layers'][{k}]", W, s)

    def end_to_end(self, params: Params) -> Array:
        W = params["layers"][0]
        for layer in params["layers"][1:]:
            W = layer @ W
        return W

    def apply(self, params: Params, phi: Array) -> tuple[Array, None]:
        """`phi @ (W_H ... W_1).T`: the product first (O(H m^2 h)), not layer by layer over samples (O(n H m h))."""
        self.check_params(params)
        _check_phi(phi, self.width)
        return phi @ self.end_to_end(params).T, None


#: the built-in models by name, e.g. for an application's config (`MODELS[name](width=..., out_dim=..., ...)`)
MODELS: dict[str, Callable[..., Model]] = {"delm": DELM, "linear": Linear, "deep_linear": DeepLinear}
