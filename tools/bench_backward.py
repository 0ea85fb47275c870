"""Which linear solver should the implicit backward use by default? Times one training step of a per-sample tanh
DEQ (Fashion-MNIST-sized inputs: 784 -> 128 embedding, `z = tanh(W z + x)` with `|W|_2 = 0.9`, Anderson, batch 128,
float32) under each `Implicit(linear_solver=...)`, in interleaved rounds, and prints the paired median ratio to GMRES.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python tools/bench_backward.py [--rounds 15] [--out backward.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import deq_jax as dq

SOLVERS = ("gmres", "bicgstab", "normal_cg", "forward")


def step(linear_solver: str, X: jax.Array, Y: jax.Array):
    f = lambda z, p, x: jnp.tanh(z @ p["W"].T + x)

    def loss(p):
        x = X @ p["E"]
        sol = dq.solve(
            f, jnp.zeros_like(x), p, x, tol=1e-4, maxiter=50, batch_axis=0, backward=dq.Implicit(linear_solver)
        )
        logits = sol.value @ p["H"]
        return jnp.mean(jax.nn.logsumexp(logits, 1) - jnp.take_along_axis(logits, Y[:, None], 1)[:, 0])

    return jax.jit(dq.value_and_grad(loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    n, d, m = 128, 128, 784
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    X, Y = jax.random.normal(k[0], (n, m)), jax.random.randint(k[1], (n,), 0, 10)
    params = {
        "E": jax.random.normal(k[2], (m, d)) / np.sqrt(m),
        "W": 0.9 * jax.random.orthogonal(k[3], d),
        "H": jax.random.normal(k[1], (d, 10)) / np.sqrt(d),
    }
    fns = {s: step(s, X, Y) for s in SOLVERS}
    stats = {}
    for s, fn in fns.items():
        _, _, backward = jax.block_until_ready(fn(params))
        stats[s] = {k: float(v) for k, v in backward._asdict().items()}
    times: dict[str, list[float]] = {s: [] for s in SOLVERS}
    for _ in range(args.rounds):
        for s, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(params))
            times[s].append(time.perf_counter() - t)
    rows = []
    print(f"load {os.getloadavg()[0]:.1f}, jax {jax.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'linear_solver':14s} {'median ms':>10s} {'min ms':>8s} {'paired/gmres':>13s} {'failures':>9s}")
    for s in SOLVERS:
        ratio = float(np.median(np.array(times[s]) / np.array(times["gmres"])))
        row = dict(linear_solver=s, median_ms=1e3 * float(np.median(times[s])), min_ms=1e3 * min(times[s]))
        row.update(paired_ratio_to_gmres=ratio, backward=stats[s])
        rows.append(row)
        print(f"{s:14s} {row['median_ms']:10.2f} {row['min_ms']:8.2f} {ratio:13.2f} {stats[s]['failures']:9.0f}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"load": os.getloadavg()[0], "jax": jax.__version__, "rows": rows}, fh, indent=2)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
