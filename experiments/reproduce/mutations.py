"""Deliberately wrong gradients, for the mutation test of the claims.

A claims table that would pass with a wrong gradient is decoration. `python -m experiments reproduce --mutation NAME`
trains the DELMs under test (experiment 1's iterative variants, experiment 2's and 3's DELMs; never the exact
reference of experiment 1, which is the yardstick) with one of these, and every claim marked gradient-sensitive
must then fail:

- `one_step`: the one-step (Jacobian-free) backward: `W = f(stop_gradient(W*))`, differentiated through one
  application of the map. A descent direction, so training still converges, to the same L*.
- `perturbed`: the true gradient plus a random direction of relative size `PERTURBATION` (1%), fresh every step.
- `wrong_sigma`: the backward differentiates through another weight nonlinearity (`WRONG_SIGMA`, e.g. the row
  softmax for the column softmax) while the forward pass (the loss, the equilibrium) stays right.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from deq_jax.models import DELM
from experiments.common import models as model_lib

#: relative size of the `perturbed` mutation's random direction: |noise| = PERTURBATION |gradient|
PERTURBATION = 1e-2
#: the weight nonlinearity the `wrong_sigma` mutation differentiates through, for each true one
WRONG_SIGMA = {"column_softmax": "row_softmax", "row_softmax": "column_softmax", "scaled_tanh": "column_softmax"}
DESCRIPTIONS = {
    "one_step": "the one-step (Jacobian-free) backward instead of the implicit one",
    "perturbed": f"the gradient plus a fresh random direction of {PERTURBATION:.0%} of its norm at every step",
    "wrong_sigma": "the backward differentiates through the wrong weight nonlinearity (forward unchanged)",
}


@dataclasses.dataclass(frozen=True)
class WrongSigmaDELM(DELM):
    """A DELM whose forward values are right and whose gradients come from `backward_sigma` instead of `sigma`:
    every output `x` is `x_wrong + stop_gradient(x - x_wrong)` (the value of `x`, the derivative of `x_wrong`).

    Both routes a training step can take are falsified: `apply` (predictions from samples) and
    `end_to_end_solution` (the end-to-end W, which `make_step` differentiates on the square loss's Gram route and
    in an L2 penalty on W)."""

    backward_sigma: str = "row_softmax"

    def _wrong(self) -> DELM:
        return model_lib.build(
            "delm",
            self.width,
            self.out_dim,
            gamma=self.gamma,
            sigma=self.backward_sigma,
            formulation="transposed",
            solver="direct",
            init_scale=self.init_scale,
        )

    def apply(self, params, phi, warm=None):
        predictions, solution = super().apply(params, phi, warm)
        wrong_predictions, _ = self._wrong().apply(params, phi)
        return wrong_predictions + jax.lax.stop_gradient(predictions - wrong_predictions), solution

    def end_to_end_solution(self, params, warm=None):
        W, solution = super().end_to_end_solution(params, warm)
        wrong = self._wrong().end_to_end(params)
        return wrong + jax.lax.stop_gradient(W - wrong), solution


def mutate_model(model: Any, mutation: str | None) -> Any:
    """The model whose gradient the mutation falsifies (DELMs only; other models and `None` pass through)."""
    if mutation is None or not isinstance(model, DELM):
        return model
    if mutation == "one_step":
        return dataclasses.replace(model, backward="one_step")
    if mutation == "wrong_sigma":
        sigma = model.sigma if isinstance(model.sigma, str) else "column_softmax"
        return WrongSigmaDELM(
            **{f.name: getattr(model, f.name) for f in dataclasses.fields(DELM)}, backward_sigma=WRONG_SIGMA[sigma]
        )
    return model  # "perturbed" acts on the gradient (see `optimizer`)


def relative_noise(relative: float, seed: int = 0) -> optax.GradientTransformation:
    """Add `relative |g| u / |u|` to the gradient `g`, `u ~ N(0, I)` drawn afresh at every step (deterministic)."""

    def init(params):
        del params
        return jnp.zeros((), jnp.int32)

    def update(updates, count, params=None):
        del params
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), count), len(leaves))
        noise = [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves, strict=True)]
        norm = lambda xs: jnp.sqrt(sum(jnp.sum(x * x) for x in xs))
        scale = relative * norm(leaves) / norm(noise)
        noisy = [leaf + scale * z for leaf, z in zip(leaves, noise, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, noisy), count + 1

    return optax.GradientTransformation(init, update)


def learning_rate_of(opt_state: Any) -> jax.Array:
    """The learning rate held in the state of `optimizer(...)` (plain or behind the `perturbed` noise)."""
    sgd_state = opt_state[-1] if isinstance(opt_state, tuple) and not hasattr(opt_state, "hyperparams") else opt_state
    return sgd_state.hyperparams["learning_rate"]


def optimizer(learning_rate: Any, mutation: str | None = None) -> optax.GradientTransformation:
    """Plain SGD with the learning rate held in the state (one compiled program serves every learning rate), behind
    the `perturbed` mutation's noise when asked."""
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)
    if mutation == "perturbed":
        return optax.chain(relative_noise(PERTURBATION), sgd)
    return sgd
