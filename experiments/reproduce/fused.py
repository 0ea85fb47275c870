"""Cross-entropy + `(l2/2) |W|_F^2` on all samples at full width, in two passes over the data per step.

The library's step (`deq_jax.train.make_step(model, "cross_entropy", penalty=...)`) evaluates the penalty on a second
end-to-end matrix: for the exact DELM a second `m x m` LU solve (and its backward) per step, as costly as a pass over
60,000 samples at m = 785. Here the model is wrapped (`Penalised`) so that one solve serves both terms: its
"predictions" are the pair `(phi W^T, W)` and the loss (`penalised_cross_entropy`) is `CE(phi W^T, Y) + (l2/2)|W|^2`.
`predict` is `phi W^T` with its backward written out as the one product `G^T phi` (`(m_y, m)`, the layout that XLA's
CPU dot runs fastest), so a step is one forward pass (`phi W^T`), one backward pass (`G^T phi`) and `O(n m_y)`
elementwise work: `4 n m m_y` flops, the minimum for an exact full-batch gradient. The numbers are those of the
library's step (same loss, same gradient, float64); only the order of the work differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from deq_jax.models import DELM, Model, Warm


@jax.custom_vjp
def predict(phi: jax.Array, W: jax.Array) -> jax.Array:
    """`phi @ W.T` `(n, m_y)`, differentiated (in W only) by one product `G^T phi`; phi gets no cotangent."""
    return phi @ W.T


def _predict_fwd(phi, W):
    return phi @ W.T, phi


def _predict_bwd(phi, g):
    return jnp.zeros_like(phi), g.T @ phi


predict.defvjp(_predict_fwd, _predict_bwd)


def fusable(model: Model) -> bool:
    """Whether `model` computes predictions as `phi W^T` of one end-to-end matrix (a transposed DELM, linear)."""
    return not isinstance(model, DELM) or model.formulation == "transposed"


@dataclasses.dataclass(frozen=True)
class Penalised:
    """`model` whose predictions are `(phi W^T, W)` from one end-to-end solve (see the module docstring); every
    other method is the model's own. Only for `fusable` models."""

    model: Any

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def apply(self, params: Any, phi: jax.Array, warm: Warm | None = None) -> tuple[tuple, Any]:
        W, sol = self.model.end_to_end_solution(params, warm)
        return (predict(phi, W), W), sol


def penalised_cross_entropy(l2: float) -> Callable:
    """`((Z, W), Y) -> mean softmax CE(Z, Y) + (l2/2)|W|_F^2` for one-hot (or probability) targets `Y`."""

    def loss(predictions: tuple, targets: jax.Array) -> jax.Array:
        Z, W = predictions
        return jnp.mean(optax.softmax_cross_entropy(Z, targets)) + 0.5 * l2 * jnp.sum(W * W)

    return loss


__all__ = ["Penalised", "fusable", "penalised_cross_entropy", "predict"]
