"""The fused cross-entropy step (experiments/reproduce/fused.py): the library's step, with one solve and two passes
over the data; the same loss, gradient and update to rounding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deq_jax import Implicit
from deq_jax.models import DELM, Linear
from deq_jax.train import make_step
from experiments.reproduce import fused
from experiments.reproduce.runs import RunSpec, l2_penalty


def _data(n=40, m=7, k=4, seed=0):
    rng = np.random.default_rng(seed)
    phi = jnp.asarray(rng.normal(size=(n, m)))
    return phi, jnp.asarray(np.eye(k)[rng.integers(0, k, n)])


@pytest.mark.parametrize(
    "model",
    [
        Linear(7, 4),
        DELM(7, 4, gamma=0.8, solver="direct"),
        DELM(7, 4, gamma=0.8, solver="anderson", tol=1e-12, backward=Implicit("gmres", tol=1e-12, maxiter=None)),
    ],
    ids=["linear", "delm_direct", "delm_anderson_implicit"],
)
def test_fused_step_equals_the_library_step(model):
    phi, Y = _data()
    l2 = 0.3
    params = model.init(jax.random.PRNGKey(1), jnp.float64)
    opt = optax.sgd(0.5)
    plain = make_step(model, "cross_entropy", opt, penalty=l2_penalty(model, l2), warm_start=False)
    fast = make_step(fused.Penalised(model), fused.penalised_cross_entropy(l2), opt, warm_start=False)
    p1, _, m1 = plain(params, opt.init(params), phi, Y)
    p2, _, m2 = fast(params, opt.init(params), fused.sample_data(phi), Y)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-13)
    assert float(m2["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-10)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-14)


def test_predict_backward_is_one_product():
    phi, _ = _data()
    W = jnp.asarray(np.random.default_rng(2).normal(size=(4, 7)))
    data = fused.sample_data(phi)
    g = jax.grad(lambda W: jnp.sum(jnp.sin(fused.predict(data.phi, data.phiT, W))))(W)
    ref = jax.grad(lambda W: jnp.sum(jnp.sin(phi @ W.T)))(W)
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-12)


def test_fused_only_where_it_applies():
    per_sample = dataclasses.replace(DELM(7, 4), formulation="per_sample")
    assert not fused.fusable(per_sample) and fused.fusable(DELM(7, 4)) and fused.fusable(Linear(7, 4))
    with pytest.raises(ValueError, match="fused step serves"):
        RunSpec(per_sample, loss="cross_entropy", chunk=5, rows=40, dtype=jnp.float64, l2=0.1, fused=True)
    with pytest.raises(ValueError, match="fused step serves"):
        RunSpec(Linear(7, 4), loss="square", chunk=5, rows=40, dtype=jnp.float64, fused=True)
