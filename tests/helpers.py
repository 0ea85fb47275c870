"""Problems shared by the tests: small DELM data, the closed-form reference, relative errors.

Kept small on purpose (m = 7, n = 11): the suite's time goes into compiling, so every test that can share a shape
shares one of these, and XLA's compilation cache serves it again.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from deq_jax.maps import column_softmax

GAMMA = 0.8
#: the repository's root folder (configs/, docs/, the working directory of the tests' child processes)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def delm_problem(dtype=jnp.float64, m=7, n=11, m_y=3, seed=0, scale=1.0):
    """`(A, B, phi, y)`: DELM weights `A ~ scale N(0, 1)`, `B`, features `phi (n, m)` and targets `y (n, m_y)`."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    A = scale * jax.random.normal(k1, (m, m), dtype)
    B = jax.random.normal(k2, (m_y, m), dtype)
    phi = jax.random.normal(k3, (n, m), dtype)
    y = jax.random.normal(k4, (n, m_y), dtype)
    return A, B, phi, y


def u_matrix(A, gamma=GAMMA, sigma=column_softmax):
    return jnp.eye(A.shape[0], dtype=A.dtype) - gamma * sigma(A)


def closed_form_end_to_end(A, B, gamma=GAMMA, sigma=column_softmax):
    """The independent reference `W = B (I - gamma sigma(A))^{-1}`, by one dense solve (plain autodiff through it)."""
    return jnp.linalg.solve(u_matrix(A, gamma, sigma).T, B.T).T


def closed_form_loss(A, B, phi, y, gamma=GAMMA, sigma=column_softmax):
    """The square loss `(1/n) sum_i 1/2 |W phi_i - y_i|^2` through the closed form."""
    W = closed_form_end_to_end(A, B, gamma, sigma)
    return 0.5 * jnp.mean(jnp.sum((phi @ W.T - y) ** 2, axis=1))


def closed_form_equilibrium(A, phi, gamma=GAMMA, sigma=column_softmax):
    """`z*_i = U^{-1} phi_i` for every row of `phi`."""
    return jnp.linalg.solve(u_matrix(A, gamma, sigma), phi.T).T


def rel_err(a, b) -> float:
    """`|a - b| / |b|` over whole pytrees."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(la, lb, strict=True))
    den = sum(float(jnp.sum(y**2)) for y in lb)
    return (num / den) ** 0.5


# ----------------------------------------------------------------------------- x64 on or off (tests/conftest.py)

import pytest  # noqa: E402

X64 = bool(jax.config.jax_enable_x64)
# the dtype a test runs in when it works in both modes: float64 with x64 (the default), float32 without
DTYPE = jnp.float64 if X64 else jnp.float32
requires_x64 = pytest.mark.skipif(not X64, reason="needs float64 (DEQ_JAX_TEST_X64=0 runs with x64 disabled)")


def tree_rel_err(a, b) -> float:
    """`rel_err` for pytrees of mixed dtypes (computed in NumPy float64)."""
    import numpy as np

    la = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(a)]
    lb = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(b)]
    num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(la, lb, strict=True))
    den = sum(float(np.sum(y**2)) for y in lb)
    return (num / den) ** 0.5


def compile_events():
    """`(durations, stop)`: XLA backend compilations recorded from now until `stop()` (one duration per compile)."""
    import jax.monitoring

    events = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    return events, lambda: jax.monitoring.unregister_event_duration_listener(listen)
