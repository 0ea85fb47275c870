"""One configuration's training run as a pure function, and its memory estimate: what `deq_jax.parallel` maps.

Every configuration is trained exactly as the main job trains one run:

    model = build_model(kind, ModelSpec(width, out_dim, config, sigma, depth, gamma))
    params = model.init(jax.random.PRNGKey(seed), dtype)
    params, history = deq_jax.train.full_batch_gd(model, loss, params, phi, y, learning_rate=lr, steps=steps)

with the PRNG key, the learning rate and gamma traced (`deq_jax.parallel` vmaps or maps over them), then evaluated
once more: the final loss, gradient norm and solve statistics, train and test accuracy, test loss.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deq_jax import train
from experiments.common import config as config_lib
from experiments.common import models as model_lib
from experiments.common import registry
from experiments.sweep.config import SweepConfig
from experiments.sweep.grid import GroupKey

SAFETY_FACTOR = 2  # the memory formula counts each live buffer once; XLA keeps some longer


def logged_steps(config: SweepConfig) -> np.ndarray:
    """Steps with a row in the table, besides the final step `steps`: 0, log_every, ... (< steps)."""
    return np.arange(0, config.steps, config.log_every)


def model_spec(config: SweepConfig, key: GroupKey, width: int, out_dim: int, gamma: Any = None) -> model_lib.ModelSpec:
    axes = model_lib.KINDS[key.model].axes
    return model_lib.ModelSpec(
        width=width,
        out_dim=out_dim,
        config=config,
        sigma=key.sigma,
        depth=key.depth,
        gamma=gamma if "gamma" in axes else None,
    )


def _solver_fields(stats: Any, dtype: Any) -> dict:
    if stats is None:  # explicit models: nothing solved
        return {
            "iterations": jnp.zeros((), jnp.int32),
            "relative_residual": jnp.zeros((), dtype),
            "converged": jnp.ones((), bool),
        }
    return {"iterations": stats.iterations, "relative_residual": stats.relative_residual, "converged": stats.converged}


def train_one_fn(config: SweepConfig, key: GroupKey, width: int, out_dim: int) -> Callable:
    """`train_one(c, data) -> outputs` for `deq_jax.parallel.ParallelMap`: `c = {"key", "learning_rate",
    "gamma"}` (one configuration; gamma is ignored by kinds without that axis), `data = (phi, y, labels, phi_test,
    y_test, labels_test)`. Outputs: the logged history (`log_*`), the final metrics, and `params` with
    `save_params`."""
    dtype = jnp.dtype(config.dtype)
    log_idx = logged_steps(config)
    loss_fn = registry.LOSSES[key.loss]

    def train_one(c, data):
        phi, y, labels, phi_test, y_test, labels_test = data
        model = model_lib.build_model(key.model, model_spec(config, key, width, out_dim, c["gamma"]))
        params = model.init(c["key"], dtype)
        # learning_rate is traced here; full_batch_gd builds optax.sgd from it as for a concrete rate
        params, history = train.full_batch_gd(
            model, key.loss, params, phi, y, learning_rate=c["learning_rate"], steps=config.steps
        )
        (loss, solution), grads = jax.value_and_grad(train.objective(model, key.loss), has_aux=True)(params, phi, y)
        final = _solver_fields(None if solution is None else solution.stats, dtype)
        predictions, _ = model.apply(params, phi)
        predictions_test, _ = model.apply(params, phi_test)
        out = {
            "log_loss": history["loss"][log_idx],
            "log_grad_norm": history["grad_norm"][log_idx],
            "log_iterations": history["iterations"][log_idx],
            "log_relative_residual": history["relative_residual"][log_idx],
            "log_converged": history["converged"][log_idx],
            "final_loss": loss,
            "final_grad_norm": optax.tree.norm(grads),
            "final_iterations": final["iterations"],
            "final_relative_residual": final["relative_residual"],
            "final_converged": final["converged"],
            "train_accuracy": jnp.mean(jnp.argmax(predictions, axis=-1) == labels),
            "test_loss": loss_fn(predictions_test, y_test),
            "test_accuracy": jnp.mean(jnp.argmax(predictions_test, axis=-1) == labels_test),
            "nonconverged_steps": jnp.sum(~history["converged"]) + jnp.sum(~final["converged"]),
            "max_relative_residual": jnp.maximum(jnp.max(history["relative_residual"]), final["relative_residual"]),
        }
        if config.save_params:
            out["params"] = params
        return out

    return train_one


def program_key(config: SweepConfig, key: GroupKey, width: int, out_dim: int) -> tuple:
    """Everything `train_one_fn` closes over: groups with equal keys run the same program (the data set's label
    is not part of it; the data's shapes are, in `deq_jax.parallel`'s own cache)."""
    fields = ("steps", "log_every", "dtype", "delm", "linear", "deep_linear", "save_params")
    settings = json.dumps({f: config_lib.to_dict(getattr(config, f)) for f in fields}, sort_keys=True)
    return (settings, key.loss, key.model, model_lib.KINDS[key.model], key.depth, key.sigma, width, out_dim)


def param_shapes(config: SweepConfig, key: GroupKey, width: int, out_dim: int) -> Any:
    """The parameters' pytree of `jax.ShapeDtypeStruct`s (nothing is computed)."""
    model = model_lib.build_model(key.model, model_spec(config, key, width, out_dim, 0.5))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.dtype(config.dtype)))  # key traced too


def estimate_config_bytes(
    config: SweepConfig, key: GroupKey, *, n_train: int, n_test: int, width: int, out_dim: int
) -> int | None:
    """Working memory of one configuration (bytes), by a stated formula, times `SAFETY_FACTOR`; None for a
    registered kind (`deq_jax.parallel` then measures it with XLA).

    With `P` parameters, `n` train and `n_t` test rows, width `m`, `m_y` outputs and `S` steps, in elements:
    `4 P` (params, gradients, updates, the scan's carry) + `3 n m_y` (predictions, residual, its cotangent)
    + `n_t m_y` (test predictions) + `8 S` (the per-step history) + the model's work space:
    DELM `8 m^2` (sigma(A), U = I - gamma sigma(A), its LU factors, the softmax backward) + `4 s` with the
    solve's state size `s` (`m_y m` transposed, `n m` per sample), plus `(2 h + 4) s` for an iterative solver
    (Anderson history `h` = 5) and `maxiter s` for unrolled differentiation; deep linear `2 n h_k` per layer
    (activations kept for the backward pass). Checked against XLA's `memory_analysis()` after compiling.
    """
    if key.model not in ("delm", "linear", "deep_linear"):
        return None
    itemsize = np.dtype(config.dtype).itemsize
    P = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(param_shapes(config, key, width, out_dim)))
    n, m, m_y, S = n_train, width, out_dim, config.steps
    work = 0
    if key.model == "delm":
        state = m_y * m if config.delm.formulation == "transposed" else n * m
        work = 8 * m * m + 4 * state
        if config.delm.solver != "direct":
            work += (2 * 5 + 4) * state
            if config.delm.backward == "unrolled":
                work += config.delm.maxiter * state
    elif key.model == "deep_linear":
        shapes = model_lib.build(
            "deep_linear", width, out_dim, depth=key.depth, hidden=config.deep_linear.hidden
        ).shapes()
        work = sum(2 * n * rows for rows, _ in shapes)
    elements = 4 * P + 3 * n * m_y + n_test * m_y + 8 * S + work
    return int(SAFETY_FACTOR * elements * itemsize)


__all__ = [
    "SAFETY_FACTOR",
    "estimate_config_bytes",
    "logged_steps",
    "model_spec",
    "param_shapes",
    "program_key",
    "train_one_fn",
]
