"""Composing deq_jax into your own JAX program.

A learned feature extractor (a two-layer MLP in plain JAX) feeds two equilibrium layers:

    h   = MLP(x)                                   learned features
    z*  = tanh(W_c z* + U h + b)                   a nonlinear DEQ layer (deq_jax.TanhMap + deq_jax.solve)
    out = B (I - gamma sigma(A))^{-1} z*           a DELM head (deq_jax.DELM)

trained end to end with optax (Adam) on cross-entropy, gradients through both equilibria by implicit
differentiation, and vmapped over random seeds: one compiled program trains every seed at once. Only the public
API of deq_jax is used; everything else is the user's own JAX.

    python examples/compose.py            # 4 seeds, 300 steps, ~1 minute on 2 CPU cores
    python examples/compose.py --small    # a quick check (the test suite runs this)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import deq_jax


def make_data(key, n: int, d: int, classes: int):
    """Gaussian blobs pushed through a fixed random tanh warp: not linearly separable in x."""
    k_centres, k_labels, k_noise, k_warp = jax.random.split(key, 4)
    centres = 2.0 * jax.random.normal(k_centres, (classes, d))
    labels = jax.random.randint(k_labels, (n,), 0, classes)
    x = centres[labels] + jax.random.normal(k_noise, (n, d))
    x = jnp.tanh(x @ jax.random.normal(k_warp, (d, d)) / jnp.sqrt(d))
    return x, labels


class Composed:
    """MLP -> tanh DEQ -> DELM head, as an init/apply pair (the shape of deq_jax's `Model` protocol)."""

    def __init__(self, in_dim: int, hidden: int, width: int, classes: int):
        self.in_dim, self.hidden = in_dim, hidden
        self.deq = deq_jax.TanhMap(contraction=0.9)  # |W_c| <= 0.9: a contraction, a unique z*
        self.head = deq_jax.DELM(width=width, out_dim=classes, gamma=0.8)

    def init(self, key, dtype=jnp.float32):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        return {
            "mlp": {
                "W": jax.random.normal(k1, (self.in_dim, self.hidden), dtype) / jnp.sqrt(self.in_dim),
                "b": jnp.zeros((self.hidden,), dtype),
                "W2": jax.random.normal(k2, (self.hidden, self.hidden), dtype) / jnp.sqrt(self.hidden),
            },
            "deq": self.deq.init(k3, self.head.width, self.hidden, dtype),
            "head": self.head.init(k4, dtype),
        }

    def apply(self, params, x):
        mlp = params["mlp"]
        h = jnp.tanh(jnp.tanh(x @ mlp["W"] + mlp["b"]) @ mlp["W2"])
        z0 = jnp.zeros((x.shape[0], self.head.width), x.dtype)
        layer = deq_jax.solve(self.deq, z0, params["deq"], h, solver="anderson", tol=1e-5, maxiter=50)
        logits, head = self.head.apply(params["head"], layer.value)
        return logits, (layer.stats, head.stats)


def train(model: Composed, key, x, labels, *, steps: int, learning_rate: float):
    """Adam on cross-entropy for `steps` steps, one `lax.scan`: pure, so `jax.vmap` runs it for many seeds."""
    optimizer = optax.adam(learning_rate)

    def loss_fn(params):
        logits, stats = model.apply(params, x)
        return deq_jax.cross_entropy(logits, labels), (logits, stats)

    def step(carry, _):
        params, opt_state = carry
        (loss, (logits, (deq_stats, head_stats))), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == labels),
            "converged": jnp.logical_and(deq_stats.converged, head_stats.converged),
            "iterations": deq_stats.iterations,
        }
        return (optax.apply_updates(params, updates), opt_state), metrics

    params = model.init(key)
    (params, _), history = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params, history


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run: 2 seeds, 20 steps, 64 samples")
    args = parser.parse_args(argv)
    seeds, steps, n = (2, 20, 64) if args.small else (4, 300, 512)
    model = Composed(in_dim=8, hidden=16, width=12, classes=3)
    x, labels = make_data(jax.random.PRNGKey(0), n, 8, 3)
    run = jax.jit(jax.vmap(lambda key: train(model, key, x, labels, steps=steps, learning_rate=1e-2)))
    _, history = run(jax.random.split(jax.random.PRNGKey(1), seeds))
    for s in range(seeds):
        print(
            f"seed {s}: loss {float(history['loss'][s, 0]):.3f} -> {float(history['loss'][s, -1]):.3f}, "
            f"train accuracy {100 * float(history['accuracy'][s, -1]):.1f}% (at the last step), tanh-DEQ "
            f"iterations per step {float(history['iterations'][s].mean()):.1f}, every solve converged: "
            f"{bool(history['converged'][s].all())}"
        )
    return history


if __name__ == "__main__":
    main()
