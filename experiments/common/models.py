"""The applications' one model factory: a config's model name and options -> the library's model.

`build(name, width, out_dim, **options)` is `registry.MODELS[name](width=width, out_dim=out_dim, **options)`: every
application constructs a library model from a name through it (the main job's model lists, the sweep's kinds, the
benchmarks' DELMs).

A sweep's grid names model kinds (`KINDS`): each builds a model from one configuration's values. Any object with
the library's model interface (`deq_jax.Model`: init, apply, warm_start, end_to_end_solution) goes through the sweep:

    params = model.init(key, dtype)                      # a pytree of float arrays
    predictions, solution = model.apply(params, phi)     # (n, m_y); solution: None, or the solve's `Solution`
                                                         # (.stats.iterations, .stats.relative_residual, ...)

A kind declares which of the grid's model axes it takes (`ModelKind.axes`, a subset of `MODEL_AXES`): `sigma`
and `depth` are static (one compiled program per value), `gamma` is traced (vmapped with the seed and the
learning rate), so `build` must accept a traced `gamma` (the library's models and maps check its range only where
it is concrete; the sweep checks it on the grid). `build` runs inside the traced program, once per program.

    @dataclasses.dataclass(frozen=True)
    class MyDEQ: ...                                      # the four methods of deq_jax.Model

    register_model("my_deq", ModelKind(lambda spec: MyDEQ(spec.width, spec.out_dim, spec.gamma), axes=("gamma",)))
    # then `grid: {models: [my_deq, linear], gammas: [0.5, 0.9]}` in a sweep config
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

from experiments.common import registry


def build(name: str, width: int, out_dim: int, **options: Any) -> Any:
    """The library's model `name` (a key of `registry.MODELS`) of input width `width` and `out_dim` outputs, with
    the model's own `options` (e.g. `gamma`, `sigma`, `solver` for "delm"; `depth`, `hidden` for "deep_linear")."""
    if name not in registry.MODELS:
        raise ValueError(f"model must be one of {', '.join(map(repr, registry.MODELS))}; got {name!r}")
    return registry.MODELS[name](width=width, out_dim=out_dim, **options)


#: the grid's model axes: static ones make separate compiled programs, traced ones are vmapped
MODEL_AXES = {"sigma": "static", "depth": "static", "gamma": "traced"}


class ModelSpec(NamedTuple):
    """What a kind's `build` receives: the data's shapes, this configuration's axis values (None for axes the kind
    does not take; `gamma` is a traced scalar inside the sweep's program) and the whole sweep config (for fixed
    options such as `config.delm.solver`)."""

    width: int
    out_dim: int
    config: Any
    sigma: str | None = None
    depth: int | None = None
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


def _delm(spec: ModelSpec) -> Any:
    return build(
        "delm", spec.width, spec.out_dim, gamma=spec.gamma, sigma=spec.sigma, **dataclasses.asdict(spec.config.delm)
    )


def _linear(spec: ModelSpec) -> Any:
    return build("linear", spec.width, spec.out_dim, init_scale=spec.config.linear.init_scale)


def _deep_linear(spec: ModelSpec) -> Any:
    o = spec.config.deep_linear
    return build("deep_linear", spec.width, spec.out_dim, depth=spec.depth, hidden=o.hidden, init_gain=o.init_gain)


#: a sweep grid's model kinds by name; `register_model` adds one
KINDS: dict[str, ModelKind] = {
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
    if name in KINDS and not replace:
        raise ValueError(f"a model kind named {name!r} is already registered (pass replace=True to replace it)")
    KINDS[name] = kind


def unregister_model(name: str) -> None:
    """Remove a kind added by `register_model` (the built-in kinds stay)."""
    if name in ("delm", "linear", "deep_linear"):
        raise ValueError(f"{name!r} is a built-in model kind and cannot be removed")
    KINDS.pop(name, None)


def build_model(name: str, spec: ModelSpec) -> Any:
    """The model of kind `name` for `spec`, checked to have the methods of `deq_jax.Model`."""
    model = KINDS[name].build(spec)
    methods = ("init", "apply", "warm_start", "end_to_end_solution")
    missing = [m for m in methods if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(
            f"model kind {name!r} built {type(model).__name__}, which lacks {', '.join(missing)}: a "
            f"sweep model needs the methods of deq_jax.Model ({', '.join(methods)})"
        )
    return model


__all__ = [
    "KINDS",
    "MODEL_AXES",
    "ModelKind",
    "ModelSpec",
    "build",
    "build_model",
    "register_model",
    "unregister_model",
]
