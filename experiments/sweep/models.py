"""The sweep's model factory: a registry of model kinds, each building a model from one configuration's values.

Any object with the library's model interface goes through the sweep:

    params = model.init(key, dtype)                      # a pytree of float arrays
    predictions, stats = model.apply(params, phi)        # (n, m_y); stats: None, or the solve's statistics
                                                         # (.iterations, .relative_residual, .converged)

A kind declares which of the grid's model axes it takes (`ModelKind.axes`, a subset of `MODEL_AXES`): `sigma`
and `depth` are static (one compiled program per value), `gamma` is traced (vmapped with the seed and the
learning rate), so `build` must accept a traced `gamma` (the library's models and maps check its range only where
it is concrete; the sweep checks it on the grid). `build` runs inside the traced program, once per program.

    @dataclasses.dataclass(frozen=True)
    class MyDEQ: ...                                      # init(key, dtype), apply(params, phi)

    register_model("my_deq", ModelKind(lambda spec: MyDEQ(spec.width, spec.out_dim, spec.gamma), axes=("gamma",)))
    # then `grid: {models: [my_deq, linear], gammas: [0.5, 0.9]}` in a sweep config
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from deq_jax import models as deq_models

if TYPE_CHECKING:  # the config imports this module for its model names
    from experiments.sweep.config import SweepConfig

#: the grid's model axes: static ones make separate compiled programs, traced ones are vmapped
MODEL_AXES = {"sigma": "static", "depth": "static", "gamma": "traced"}


class ModelSpec(NamedTuple):
    """What a kind's `build` receives: the data's shapes, this configuration's axis values (None for axes the kind
    does not take; `gamma` is a traced scalar inside the sweep's program) and the whole sweep config (for fixed
    options such as `config.delm.solver`)."""

    width: int
    out_dim: int
    config: "SweepConfig"
    sigma: Optional[str] = None
    depth: Optional[int] = None
    gamma: Any = None


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """`build(spec) -> model` and the grid axes (`MODEL_AXES`) the kind takes."""

    build: Callable[[ModelSpec], Any]
    axes: tuple[str, ...] = ()

    def __post_init__(self):
        if not callable(self.build):
            raise TypeError(f"ModelKind.build must be a callable build(spec) -> model; got {self.build!r}")
        unknown = [a for a in self.axes if a not in MODEL_AXES]
        if unknown or len(set(self.axes)) != len(self.axes):
            raise ValueError(f"ModelKind.axes must be distinct names among {tuple(MODEL_AXES)}; got {self.axes!r}")


def _delm(spec: ModelSpec) -> deq_models.DELM:
    o = spec.config.delm
    return deq_models.DELM(width=spec.width, out_dim=spec.out_dim, gamma=spec.gamma, sigma=spec.sigma,
                           formulation=o.formulation, solver=o.solver, backward=o.backward, tol=o.tol,
                           maxiter=o.maxiter, precision=o.precision, init_scale=o.init_scale)


def _linear(spec: ModelSpec) -> deq_models.Linear:
    return deq_models.Linear(width=spec.width, out_dim=spec.out_dim, init_scale=spec.config.linear.init_scale)


def _deep_linear(spec: ModelSpec) -> deq_models.DeepLinear:
    o = spec.config.deep_linear
    return deq_models.DeepLinear(width=spec.width, out_dim=spec.out_dim, depth=spec.depth, hidden=o.hidden,
                                 init_gain=o.init_gain)


#: model kinds by name; `register_model` adds one
MODELS: dict[str, ModelKind] = {
    "delm": ModelKind(_delm, axes=("sigma", "gamma")),
    "linear": ModelKind(_linear),
    "deep_linear": ModelKind(_deep_linear, axes=("depth",)),
}


def register_model(name: str, kind: ModelKind, *, replace: bool = False) -> None:
    """Make `name` a valid entry of a sweep config's `grid.models`."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier-like string; got {name!r}")
    if not isinstance(kind, ModelKind):
        raise TypeError(f"kind must be a ModelKind(build, axes); got {type(kind).__name__}")
    if name in MODELS and not replace:
        raise ValueError(f"a model kind named {name!r} is already registered (pass replace=True to replace it)")
    MODELS[name] = kind


def unregister_model(name: str) -> None:
    """Remove a kind added by `register_model` (the built-in kinds stay)."""
    if name in ("delm", "linear", "deep_linear"):
        raise ValueError(f"{name!r} is a built-in model kind and cannot be removed")
    MODELS.pop(name, None)


def build_model(name: str, spec: ModelSpec) -> Any:
    """The model of kind `name` for `spec`, checked to have `init` and `apply`."""
    model = MODELS[name].build(spec)
    missing = [m for m in ("init", "apply") if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(f"model kind {name!r} built {type(model).__name__}, which lacks {', '.join(missing)}: a "
                        f"sweep model needs init(key, dtype) -> params and apply(params, phi) -> (predictions, stats)")
    return model


__all__ = ["MODELS", "MODEL_AXES", "ModelKind", "ModelSpec", "build_model", "register_model", "unregister_model"]
