"""Losses against values worked out by hand, at n != m_y so that a mean over the wrong axis (classes instead of
samples, or all entries) changes the number; the registry and argument errors."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE

from deq_jax import cross_entropy, logistic, square
from deq_jax.losses import LOSSES, get_loss

pytestmark = pytest.mark.float32

RTOL = 1e-12 if jnp.float64 == DTYPE else 1e-6

# n = 3 samples, m_y = 2 classes; logits chosen so that every per-sample term is a closed-form number
LOGITS = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]], DTYPE)
LABELS = jnp.array([0, 0, 0], jnp.int32)
# per sample -log softmax(z)_label: log 2, log(4/3), log 4; the mean over the 3 samples:
CE_BY_HAND = (math.log(2.0) + math.log(4.0 / 3.0) + math.log(4.0)) / 3


def test_cross_entropy_is_the_mean_over_samples():
    assert float(cross_entropy(LOGITS, LABELS)) == pytest.approx(CE_BY_HAND, rel=RTOL)
    one_hot = jnp.array([[1.0, 0.0]] * 3, DTYPE)
    assert float(cross_entropy(LOGITS, one_hot)) == pytest.approx(CE_BY_HAND, rel=RTOL)
    # averaging over the n m_y = 6 entries instead of the 3 samples would give CE_BY_HAND / 2
    assert abs(float(cross_entropy(LOGITS, LABELS)) - CE_BY_HAND / 2) > 0.3
    # probability rows: sample 0 with targets (1/2, 1/2) costs log 2 whatever its split
    soft = jnp.array([[0.5, 0.5], [1.0, 0.0], [1.0, 0.0]], DTYPE)
    assert float(cross_entropy(LOGITS, soft)) == pytest.approx(CE_BY_HAND, rel=RTOL)
    soft2 = jnp.array([[1.0, 0.0], [0.25, 0.75], [1.0, 0.0]], DTYPE)  # sample 1: -(1/4) log(3/4) - (3/4) log(1/4)
    want = (math.log(2.0) - 0.25 * math.log(0.75) - 0.75 * math.log(0.25) + math.log(4.0)) / 3
    assert float(cross_entropy(LOGITS, soft2)) == pytest.approx(want, rel=RTOL)
    # labels of the other class: log 2, log 4, log(4/3)
    assert float(cross_entropy(LOGITS, jnp.array([1, 1, 1], jnp.int32))) == pytest.approx(
        (math.log(2.0) + math.log(4.0) + math.log(4.0 / 3.0)) / 3, rel=RTOL
    )


def test_square_is_half_the_squared_row_norm_averaged_over_samples():
    predictions = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], DTYPE)  # n = 2, m_y = 3
    targets = jnp.zeros((2, 3), DTYPE)
    # (1/2)(1 + 4 + 9) = 7 for sample 0, 0 for sample 1: mean 3.5 (a mean over the 6 entries would be 7/6)
    assert float(square(predictions, targets)) == pytest.approx(3.5, rel=RTOL)
    assert float(square(predictions, predictions + 1.0)) == pytest.approx(1.5, rel=RTOL)


def test_logistic_is_the_mean_binary_cross_entropy():
    logits = jnp.array([0.0, math.log(3.0), -math.log(3.0), 2.0], DTYPE)
    targets = jnp.array([1, 1, 0, 0], jnp.int32)
    # log 2, log(4/3), log(4/3), log(1 + e^2)
    want = (math.log(2.0) + 2 * math.log(4.0 / 3.0) + math.log(1 + math.exp(2.0))) / 4
    assert float(logistic(logits, targets)) == pytest.approx(want, rel=RTOL)
    assert float(logistic(logits[:, None], targets[:, None].astype(DTYPE))) == pytest.approx(want, rel=RTOL)


def test_registry_and_errors():
    assert {"square": square, "cross_entropy": cross_entropy, "logistic": logistic} == LOSSES
    assert get_loss("cross_entropy") is cross_entropy and get_loss(square) is square
    mine = lambda p, t: jnp.sum(p)
    assert get_loss(mine) is mine
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        get_loss("hinge")
    with pytest.raises(ValueError, match=r"targets must have shape \(3, 2\)"):
        square(LOGITS, jnp.zeros((2, 3), DTYPE))
    with pytest.raises(ValueError, match=r"targets must have shape \(3\)"):
        cross_entropy(LOGITS, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"targets must have shape \(3, 2\)"):
        cross_entropy(LOGITS, jnp.zeros((3, 3), DTYPE))
    with pytest.raises(ValueError, match=r"logistic loss needs one output.*\(3, 2\)"):
        logistic(LOGITS, jnp.zeros((3, 2), DTYPE))
    with pytest.raises(ValueError, match=r"targets must have shape \(4\)"):
        logistic(jnp.zeros((4,), DTYPE), jnp.zeros((3,), DTYPE))
    np.testing.assert_array_equal(np.asarray(square(LOGITS, LOGITS)), 0.0)
