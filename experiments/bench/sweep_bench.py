"""Benchmark: a sweep of 64 seeds as one vmapped program vs a Python loop of 64 runs, and sharded over devices.

Workload (the issue's): a digits-sized DELM, m = 64 (raw 8x8 pixels / 16), n = 1797 (all of scikit-learn's
digits), 10 classes, square loss, gamma = 0.8, 200 full-batch GD steps, direct solve, float32.

Three ways to run the 64 seeds, timed in the same process (ratios of one process run; the machine is shared):
  loop   64 x [model.init(PRNGKey(seed)) + jit(full_batch_gd)(...)], one compile, results blocked on at the end;
  vmap   jit(vmap(the same function)) over the 64 keys: one program;
  sweep  experiments.sweep.engine's group program (also computes the final metrics: one more forward/backward pass and
         two evaluations per run), its configuration axis sharded over every device of the process; each device
         runs its block by vmap, or by lax.map on a CPU mesh of several devices (experiments.sweep.engine.device_batching:
         jaxlib 0.10's batched LAPACK kernels deadlock there).
For 2 and 4 devices the process is started with XLA_FLAGS=--xla_force_host_platform_device_count=N (CPU devices);
1 device uses JAX's default platform (a GPU where there is one).
Compile times are measured separately (AOT lower + compile); run times are min and median over --repeats.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python experiments/bench/sweep_bench.py            # prints a table
    # -> results/bench/sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
SEEDS, STEPS, GAMMA, LEARNING_RATE = 64, 200, 0.8, 0.01


def _summary(times: list[float]) -> dict:
    return {"min_s": min(times), "median_s": statistics.median(times), "all_s": times}


def worker(repeats: int) -> dict:
    """Time loop / vmap / sweep in this process; returns a JSON-able dict."""
    import jax
    import jax.numpy as jnp
    import jaxlib
    import numpy as np
    from jax.sharding import Mesh

    from deq_jax import models, train
    from experiments.common import datasets as data
    from experiments.sweep import engine as sweep
    from experiments.common.config import from_dict

    dtype = jnp.float32
    ds = data.load_dataset("digits")
    x = np.concatenate([ds.x_train, ds.x_test]).astype(np.float32)  # pixels / 16 in [0, 1]
    labels = np.concatenate([ds.y_train, ds.y_test]).astype(np.int32)
    y = data.one_hot(labels, ds.num_classes).astype(np.float32)
    n, m = x.shape
    phi, Y = jnp.asarray(x), jnp.asarray(y)
    model = models.DELM(width=m, out_dim=ds.num_classes, gamma=GAMMA, solver="direct")
    keys = np.stack([np.asarray(jax.random.PRNGKey(s)) for s in range(SEEDS)])

    # loop: the main job's code path, once per seed
    run = jax.jit(lambda params, phi, y: train.full_batch_gd(model, "square", params, phi, y,
                                                            learning_rate=LEARNING_RATE, steps=STEPS))
    t0 = time.perf_counter()
    run_c = run.lower(model.init(jax.random.PRNGKey(0), dtype), phi, Y).compile()
    compile_loop = time.perf_counter() - t0

    def loop():
        outs = [run_c(model.init(jax.random.PRNGKey(s), dtype), phi, Y) for s in range(SEEDS)]
        return jax.block_until_ready(outs)

    # vmap: the same function over the seeds' keys
    def one(key, phi, y):
        return train.full_batch_gd(model, "square", model.init(key, dtype), phi, y, learning_rate=LEARNING_RATE,
                                   steps=STEPS)

    t0 = time.perf_counter()
    vmap_c = jax.jit(jax.vmap(one, in_axes=(0, None, None))).lower(keys, phi, Y).compile()
    compile_vmap = time.perf_counter() - t0

    def vmapped():
        return jax.block_until_ready(vmap_c(keys, phi, Y))

    # sweep: experiments.sweep.engine's program for this group, sharded over every device
    devices = jax.devices()
    cfg = from_dict(sweep.SweepConfig, {"name": "bench", "datasets": [{"name": "digits", "features": "raw"}],
                                        "steps": STEPS, "log_every": 1})
    key = sweep.GroupKey("digits", None, "square", "delm", None, "column_softmax")
    mesh = Mesh(np.asarray(devices), (sweep.CONFIG_AXIS,))
    per_config = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sweep.CONFIG_AXIS))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    chunk = -(-SEEDS // len(devices)) * len(devices)
    pad = lambda a: np.concatenate([a, np.repeat(a[-1:], chunk - SEEDS, axis=0)])
    per_config_host = [pad(keys), np.full(chunk, LEARNING_RATE, np.float32), np.full(chunk, GAMMA, np.float32)]
    data_host = [x, y, labels, x[:1], y[:1], labels[:1]]  # a one-row test set: the benchmark is about training
    args = ([sweep._global_array(a, per_config) for a in per_config_host]
            + [sweep._global_array(a, replicated) for a in data_host])
    t0 = time.perf_counter()
    batching = sweep.device_batching(cfg, devices)  # lax.map per device on a CPU mesh of several devices
    sweep_c = sweep.make_group_program(cfg, key, m, ds.num_classes, mesh, batching).lower(*args).compile()
    compile_sweep = time.perf_counter() - t0

    def swept():
        return jax.block_until_ready(sweep_c(*args))

    times = {"loop": [], "vmap": [], "sweep": []}
    results = {}
    for _ in range(repeats):  # interleaved, so that load changes hit every variant
        for name, fn in (("loop", loop), ("vmap", vmapped), ("sweep", swept)):
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)

    loop_final = np.asarray([float(h["loss"][-1]) for _, h in results["loop"]])
    vmap_final = np.asarray(results["vmap"][1]["loss"][:, -1])
    sweep_final = np.asarray(results["sweep"]["log_loss"][:SEEDS, -1])  # before the last update, as history
    agree = {"vmap_vs_loop_max_rel": float(np.max(np.abs(vmap_final - loop_final) / np.abs(loop_final))),
             "sweep_vs_loop_max_rel": float(np.max(np.abs(sweep_final - loop_final) / np.abs(loop_final)))}
    out = {
        "devices": len(devices), "device_kind": devices[0].device_kind, "platform": devices[0].platform,
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
        "n": n, "m": m, "seeds": SEEDS, "steps": STEPS, "chunk": chunk, "repeats": repeats, "batching": batching,
        "compile_s": {"loop": compile_loop, "vmap": compile_vmap, "sweep": compile_sweep},
        "run": {k: _summary(v) for k, v in times.items()},
        "final_loss_mean": float(loop_final.mean()), "agreement": agree,
    }
    out["speedup_vs_loop"] = {k: {"min": out["run"]["loop"]["min_s"] / out["run"][k]["min_s"],
                                  "median": out["run"]["loop"]["median_s"] / out["run"][k]["median_s"]}
                              for k in ("vmap", "sweep")}
    return out


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return [l.strip() for l in out.stdout.splitlines() if l.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4],
                   help="device counts; >1 means forced host (CPU) devices")
    p.add_argument("--output", default=str(ROOT / "results" / "bench" / "sweep.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be a positive integer; got {args.repeats}")
    if args.worker:
        print(json.dumps(worker(args.repeats)))
        return 0

    env_base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env_base.setdefault("OPENBLAS_NUM_THREADS", "1")
    env_base["PYTHONPATH"] = str(ROOT) + os.pathsep + env_base.get("PYTHONPATH", "")
    machine = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "gpus": _gpu_names(),
               "OPENBLAS_NUM_THREADS": env_base["OPENBLAS_NUM_THREADS"], "loadavg_before": os.getloadavg(),
               "command": "OPENBLAS_NUM_THREADS=1 .venv/bin/python experiments/bench/sweep_bench.py "
                          + " ".join(argv if argv is not None else sys.argv[1:])}
    runs = []
    for count in args.devices:
        env = dict(env_base)
        if count > 1:
            env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")
        print(f"running with {count} device(s) ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", "--repeats", str(args.repeats)], env=env,
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    machine["loadavg_after"] = os.getloadavg()

    header = (f"{'devices':>7} {'variant':>10} {'min s':>8} {'median s':>9} {'x loop (min)':>13} "
              f"{'x loop (median)':>16} {'compile s':>10}")
    lines = [f"64-seed DELM sweep, n={runs[0]['n']}, m={runs[0]['m']}, {STEPS} GD steps, direct solve, float32; "
             f"{machine['cpu']} ({machine['cpu_count']} cores), GPUs: {', '.join(machine['gpus']) or 'none'}, "
             f"jax {runs[0]['jax']}, OPENBLAS_NUM_THREADS={machine['OPENBLAS_NUM_THREADS']}, "
             f"load average {machine['loadavg_before'][0]:.1f} -> {machine['loadavg_after'][0]:.1f}", header]
    for r in runs:
        where = f"{r['devices']} {r['platform']}"
        for variant in ("loop", "vmap", "sweep"):
            label = f"sweep/{r['batching']}" if variant == "sweep" else variant
            run = r["run"][variant]
            speed = r["speedup_vs_loop"].get(variant, {"min": 1.0, "median": 1.0})
            lines.append(f"{where:>7} {label:>10} {run['min_s']:8.3f} {run['median_s']:9.3f} "
                         f"{speed['min']:13.2f} {speed['median']:16.2f} {r['compile_s'][variant]:10.2f}")
    print("\n".join(lines))
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump({"machine": machine, "runs": runs, "table": lines}, fh, indent=2)
    os.replace(tmp, output)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
