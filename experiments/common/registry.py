"""The names a config may use, each mapped to the library object it stands for: the applications' one string registry.

The library takes objects (`solver=deq_jax.Anderson()`, `sigma=deq_jax.column_softmax`, `loss=deq_jax.square`);
names belong to the config layer, and every config of `experiments/` takes its choices from the tables here, so
that a name a config accepts is always one the applications can resolve:

    registry.SOLVERS["anderson"] is deq_jax.Anderson       registry.SIGMAS["column_softmax"] is deq_jax.column_softmax
    registry.LOSSES["square"] is deq_jax.square            registry.BACKWARDS["implicit"] is deq_jax.Implicit
    registry.MODELS["delm"] is deq_jax.DELM

Tables of names without objects (`FORMULATIONS`, `LINEAR_SOLVERS`, `PRECISIONS`, `BATCHINGS`) are the values the
library's keyword arguments of those names accept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deq_jax import (
    DELM,
    AbstractSolver,
    DeepLinear,
    Implicit,
    Linear,
    OneStep,
    Unrolled,
    column_softmax,
    cross_entropy,
    logistic,
    row_softmax,
    scaled_tanh,
    square,
)

#: every solver the library has, by its registered name (a new solver file appears here by itself)
DELM_SOLVERS: dict[str, Callable[[], Any]] = AbstractSolver.registered()
#: forward solvers for any map (`deq_jax.solve(solver=...)`): all but "refine", whose kept factors serve training
SOLVERS: dict[str, Callable[[], Any]] = {name: cls for name, cls in DELM_SOLVERS.items() if name != "refine"}
#: backward strategies (`deq_jax.solve(backward=...)`), by name
BACKWARDS: dict[str, Callable[[], Any]] = {"implicit": Implicit, "one_step": OneStep, "unrolled": Unrolled}
#: the implicit backward's linear solvers (`deq_jax.Implicit(linear_solver=...)`)
LINEAR_SOLVERS: tuple[str, ...] = ("forward", "gmres", "bicgstab", "normal_cg", "lu")
#: weight nonlinearities sigma(A) of the DELM, by name
SIGMAS: dict[str, Callable] = {"column_softmax": column_softmax, "row_softmax": row_softmax, "scaled_tanh": scaled_tanh}
#: losses `loss(predictions, targets) -> scalar`, by name
LOSSES: dict[str, Callable] = {"square": square, "cross_entropy": cross_entropy, "logistic": logistic}
#: the DELM's formulations (`deq_jax.DELM(formulation=...)`)
FORMULATIONS: tuple[str, ...] = ("transposed", "per_sample")
#: matmul precisions `deq_jax.solve(precision=...)` documents (jax.default_matmul_precision's names)
PRECISIONS: tuple[str, ...] = ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16")
#: how `deq_jax.parallel` runs one device's configurations
BATCHINGS: tuple[str, ...] = ("auto", "vmap", "map")
#: the library's models, by name (`experiments.common.models.build` constructs them)
MODELS: dict[str, Callable[..., Any]] = {"delm": DELM, "linear": Linear, "deep_linear": DeepLinear}


__all__ = [
    "BACKWARDS",
    "BATCHINGS",
    "DELM_SOLVERS",
    "FORMULATIONS",
    "LINEAR_SOLVERS",
    "LOSSES",
    "MODELS",
    "PRECISIONS",
    "SIGMAS",
    "SOLVERS",
]
