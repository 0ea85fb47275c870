"""The cost of one cross-entropy + L2 step on all samples against one pass over the data (`phi W^T`, `2 n m m_y`
flops): the library's step (`make_step(..., penalty=...)`) and the fused one (`fused.Penalised`), float64.

    OPENBLAS_NUM_THREADS=1 python -m experiments.reproduce.ce_cost [--n 60000] [--repeats 5]

Prints min and median seconds per step over `--repeats` chunks of 5 steps (one compiled program each, compiled
before timing) and the ratio to the pass, with the load average (`os.getloadavg`) before and after: on a shared
machine only ratios measured in one process mean much.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from deq_jax.models import DELM, Linear
from deq_jax.train import TrainState, make_chunk, make_step
from experiments.common.datasets import load_dataset, one_hot, preprocess
from experiments.reproduce import fused
from experiments.reproduce.runs import l2_penalty

STEPS = 5


def _time(fn, args, repeats: int) -> list[float]:
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="training samples (default: all 60000)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--l2", type=float, default=0.1)
    args = p.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    load0 = os.getloadavg()
    ds = load_dataset("fashion_mnist", download=False)
    pp = preprocess(ds, n_train=args.n, features="pca_whiten", pca_dim=784, add_bias=True)
    phi = jnp.asarray(pp.x_train, jnp.float64)
    Y = jnp.asarray(one_hot(pp.y_train, 10), jnp.float64)
    n, m = phi.shape
    W = jnp.zeros((10, m), jnp.float64)
    one_pass = _time(jax.jit(lambda x, W: x @ W.T), (phi, W), args.repeats)
    rows = [("one pass phi W^T", one_pass)]
    opt = optax.sgd(0.1)
    for label, model in (("linear", Linear(m, 10)), ("DELM direct", DELM(m, 10, gamma=0.8, solver="direct"))):
        params = model.init(jax.random.PRNGKey(0), jnp.float64)
        state = TrainState(params, opt.init(params), None)
        library = make_step(
            model, "cross_entropy", opt, penalty=l2_penalty(model, args.l2), warm_start=False, jit=False
        )
        fast = make_step(
            fused.Penalised(model), fused.penalised_cross_entropy(args.l2), opt, warm_start=False, jit=False
        )
        for how, step, data in (("library", library, phi), ("fused", fast, fused.sample_data(phi))):
            chunk = jax.jit(make_chunk(step, STEPS, jit=False))
            rows.append((f"{label} step, {how}", [t / STEPS for t in _time(chunk, (state, data, Y), args.repeats)]))
    load1 = os.getloadavg()
    base = min(one_pass)
    print(f"n = {n}, m = {m}, m_y = 10, float64, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
    print(
        f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} "
        f"{load1[2]:.2f}"
    )
    for name, ts in rows:
        print(
            f"{name:28s} min {min(ts) * 1e3:8.1f} ms  median {statistics.median(ts) * 1e3:8.1f} ms  "
            f"= {min(ts) / base:5.1f} passes (min/min)"
        )


if __name__ == "__main__":
    main()
