"""Benchmark: a sweep of 64 seeds as one program (vmapped, or sharded over devices) vs a Python loop of 64 runs.

    python -m experiments bench --suite sweep [--repeats 5] [--devices 1 2 4] [--out results/bench/sweep.json]
    python -m experiments.bench.sweep_bench ...        # the same, without the bench command

Workload: a digits-sized DELM, m = 64 (raw 8x8 pixels / 16), n = 1797 (all of scikit-learn's digits), 10 classes,
square loss, gamma = 0.8, 200 full-batch GD steps, direct solve, float32.

Three ways to run the 64 seeds, timed in the same process (ratios within one process run; the machine is shared):
  loop   64 x [model.init(PRNGKey(seed)) + jit(full_batch_gd)(...)], one compile, results blocked on at the end;
  vmap   jit(vmap(the same function)) over the 64 keys: one program;
  sweep  the sweep's per-configuration program (`experiments.sweep.programs.train_one_fn`: it also computes the final
         metrics, one more forward/backward pass and two evaluations per run) through `deq_jax.parallel.ParallelMap`,
         its configuration axis sharded over every device of the process, each device running its block by vmap,
         or by lax.map on a CPU mesh of several devices (`deq_jax.parallel.device_batching`); results fetched to
         the host, as a sweep does.
For 2 and 4 devices a worker process is started with XLA_FLAGS=--xla_force_host_platform_device_count=N (CPU
devices); 1 device uses JAX's default platform (a GPU where there is one). Compile times are measured separately
(AOT lower + compile); run times are min and median over --repeats. Exit status 0, or 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax import parallel, train
from experiments.common import cli, io, locks, models
from experiments.common import datasets as data
from experiments.common import env as env_lib
from experiments.common.config import from_dict
from experiments.sweep import programs
from experiments.sweep.config import SweepConfig
from experiments.sweep.grid import GroupKey

ROOT = pathlib.Path(__file__).resolve().parents[2]
SEEDS, STEPS, GAMMA, LEARNING_RATE = 64, 200, 0.8, 0.01


def _summary(times: list[float]) -> dict:
    return {"min_s": min(times), "median_s": statistics.median(times), "all_s": times}


def worker(repeats: int) -> dict:
    """Time loop / vmap / sweep in this process; returns a JSON-able dict."""

    dtype = jnp.float32
    ds = data.load_dataset("digits")
    x = np.concatenate([ds.x_train, ds.x_test]).astype(np.float32)  # pixels / 16 in [0, 1]
    labels = np.concatenate([ds.y_train, ds.y_test]).astype(np.int32)
    y = data.one_hot(labels, ds.num_classes).astype(np.float32)
    n, m = x.shape
    phi, Y = jnp.asarray(x), jnp.asarray(y)
    model = models.build("delm", m, ds.num_classes, gamma=GAMMA, solver="direct")
    keys = np.stack([np.asarray(jax.random.PRNGKey(s)) for s in range(SEEDS)])

    # loop: the main job's code path, once per seed
    run = jax.jit(
        lambda params, phi, y: train.full_batch_gd(
            model, "square", params, phi, y, learning_rate=LEARNING_RATE, steps=STEPS
        )
    )
    t0 = time.perf_counter()
    run_c = run.lower(model.init(jax.random.PRNGKey(0), dtype), phi, Y).compile()
    compile_loop = time.perf_counter() - t0

    def loop():
        outs = [run_c(model.init(jax.random.PRNGKey(s), dtype), phi, Y) for s in range(SEEDS)]
        return jax.block_until_ready(outs)

    # vmap: the same function over the seeds' keys
    def one(key, phi, y):
        return train.full_batch_gd(
            model, "square", model.init(key, dtype), phi, y, learning_rate=LEARNING_RATE, steps=STEPS
        )

    t0 = time.perf_counter()
    vmap_c = jax.jit(jax.vmap(one, in_axes=(0, None, None))).lower(keys, phi, Y).compile()
    compile_vmap = time.perf_counter() - t0

    def vmapped():
        return jax.block_until_ready(vmap_c(keys, phi, Y))

    # sweep: the sweep's group program through the parallel engine, sharded over every device
    cfg = from_dict(
        SweepConfig,
        {"name": "bench", "datasets": [{"dataset": "digits", "features": "raw"}], "steps": STEPS, "log_every": 1},
    )
    key = GroupKey("digits", None, "square", "delm", None, "column_softmax")
    engine = parallel.ParallelMap(programs.train_one_fn(cfg, key, m, ds.num_classes))
    per_config = {
        "key": keys,
        "learning_rate": np.full(SEEDS, LEARNING_RATE, np.float32),
        "gamma": np.full(SEEDS, GAMMA, np.float32),
    }
    shared = (x, y, labels, x[:1], y[:1], labels[:1])  # a one-row test set: the benchmark is about training
    t0 = time.perf_counter()
    plan = engine.plan(SEEDS, per_config, shared, budget_bytes=2**40)  # one chunk: all 64 seeds at once
    compile_sweep = time.perf_counter() - t0

    def swept():
        return engine(per_config, shared, plan=plan)

    times = {"loop": [], "vmap": [], "sweep": []}
    results = {}
    for _ in range(repeats):  # interleaved, so that load changes hit every variant
        for name, fn in (("loop", loop), ("vmap", vmapped), ("sweep", swept)):
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)

    loop_final = np.asarray([float(h["loss"][-1]) for _, h in results["loop"]])
    vmap_final = np.asarray(results["vmap"][1]["loss"][:, -1])
    sweep_final = np.asarray(results["sweep"]["log_loss"][:, -1])  # before the last update, as the history
    agree = {
        "vmap_vs_loop_max_rel": float(np.max(np.abs(vmap_final - loop_final) / np.abs(loop_final))),
        "sweep_vs_loop_max_rel": float(np.max(np.abs(sweep_final - loop_final) / np.abs(loop_final))),
    }
    devices = jax.devices()
    out = {
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "n": n,
        "m": m,
        "seeds": SEEDS,
        "steps": STEPS,
        "chunk": plan.chunk_size,
        "repeats": repeats,
        "batching": engine.batching,
        "compile_s": {"loop": compile_loop, "vmap": compile_vmap, "sweep": compile_sweep},
        "run": {k: _summary(v) for k, v in times.items()},
        "final_loss_mean": float(loop_final.mean()),
        "agreement": agree,
    }
    out["speedup_vs_loop"] = {
        k: {
            "min": out["run"]["loop"]["min_s"] / out["run"][k]["min_s"],
            "median": out["run"]["loop"]["median_s"] / out["run"][k]["median_s"],
        }
        for k in ("vmap", "sweep")
    }
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.sweep_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (default 5)")
    p.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=[1, 2, 4],
        help="device counts (default 1 2 4); above 1 means forced host (CPU) devices",
    )
    p.add_argument(
        "--out",
        "--output",
        dest="out",
        default=str(ROOT / "results" / "bench" / "sweep.json"),
        help="JSON output path (default results/bench/sweep.json)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m experiments bench --suite sweep`: print the table, write the JSON; the exit status of
    `experiments.common.cli` (0 done, 2 usage error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = cli.parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    return cli.run("bench", lambda: _main(args, argv), interrupted="nothing was written")


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    if args.repeats < 1:
        raise cli.UserError(f"--repeats must be a positive integer; got {args.repeats}")
    if any(d < 1 for d in args.devices):
        raise cli.UserError(f"--devices must be positive integers; got {args.devices}")
    if args.worker:
        print(json.dumps(worker(args.repeats)))
        return 0
    out = pathlib.Path(args.out)
    if out.is_dir():
        raise cli.UserError(f"--out {out} is a folder; name the file to write")
    # one run per output file; taking the lock also checks that its folder can be written, before the workers run
    with locks.folder_lock(out.parent, flag="--out", name=f"{out.name}.lock", target=out, log=print):
        return _measure_and_write(args, argv)


def _measure_and_write(args: argparse.Namespace, argv: list[str]) -> int:
    env_base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env_base.setdefault("OPENBLAS_NUM_THREADS", "1")
    env_base["PYTHONPATH"] = str(ROOT) + os.pathsep + env_base.get("PYTHONPATH", "")
    command = "python -m experiments bench --suite sweep " + " ".join(argv)
    runs = []
    for count in args.devices:
        env = dict(env_base)
        if count > 1:
            env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")
        print(f"running with {count} device(s) ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.bench.sweep_bench", "--worker", "--repeats", str(args.repeats)],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,  # a failure is reported with the worker's stderr, below
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the {count}-device worker failed:\n{proc.stderr[-4000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    environment = env_lib.environment()
    header = (
        f"{'devices':>7} {'variant':>10} {'min s':>8} {'median s':>9} {'x loop (min)':>13} "
        f"{'x loop (median)':>16} {'compile s':>10}"
    )
    lines = [
        (
            f"64-seed DELM sweep, n={runs[0]['n']}, m={runs[0]['m']}, {STEPS} GD steps, direct solve, float32; "
            f"{environment['devices']['description']}, "
            f"OPENBLAS_NUM_THREADS={env_base['OPENBLAS_NUM_THREADS']}"
        ),
        header,
    ]
    for r in runs:
        where = f"{r['devices']} {r['platform']}"
        for variant in ("loop", "vmap", "sweep"):
            label = f"sweep/{r['batching']}" if variant == "sweep" else variant
            run = r["run"][variant]
            speed = r["speedup_vs_loop"].get(variant, {"min": 1.0, "median": 1.0})
            lines.append(
                f"{where:>7} {label:>10} {run['min_s']:8.3f} {run['median_s']:9.3f} "
                f"{speed['min']:13.2f} {speed['median']:16.2f} {r['compile_s'][variant]:10.2f}"
            )
    print("\n".join(lines))
    io.write_json(args.out, {"command": command, "environment": environment, "runs": runs, "table": lines})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
