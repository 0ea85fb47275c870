"""The main job: reproduce the paper's claims end to end, on real data, with figures and a report.

    python -m experiments reproduce --config configs/digits.yaml            # `make run`; ~1 minute on 2 CPU cores
    python -m experiments reproduce --config configs/fashion_mnist.yaml --set convergence.steps=2000

Experiments (docs/theory.md sections 4-6; each a short composition of deq_jax calls):
  1. global linear convergence of full-batch GD: DELM vs linear vs deep linear nets, square loss and cross-entropy,
     against the shallow optimum L*, with the bound from the run's own |U_t|_2 (experiments/reproduce/convergence.py);
  2. the trust-region Newton relation of the DELM's dynamics in W-space (experiments/reproduce/trust_region.py);
  3. implicit bias at matched training loss where minimisers are many (experiments/reproduce/implicit_bias.py).

Writes `<out>/<run-name>/`: config.yaml, metrics.csv, summary.json, figures/*.png, REPORT.md, checkpoints/.
Every file is written atomically. Checkpoints are written at the end of every run and every few seconds within one,
so an interrupted run (Ctrl-C, kill) resumes from where it was when the same command is run again, and ends with
the same numbers; `--fresh` discards them. Exit status: 0 when every claim passed, 1 when one failed, 2 for a
configuration or data error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import pathlib
import platform
import shlex
import signal
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from experiments.reproduce.config import ConfigError, ReproduceConfig, fingerprint, load_config

DEFAULT_CONFIG = "configs/digits.yaml"
VERSIONED = ("jax", "jaxlib", "optax", "jaxopt", "chex", "numpy", "scipy", "scikit-learn", "matplotlib", "deq_jax")
EXPERIMENTS = ("convergence", "trust_region", "implicit_bias")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments reproduce",
                                description="Reproduce the paper's claims: convergence, trust-region relation, "
                                            "implicit bias.")
    p.add_argument("--config", default=None,
                   help=f"YAML config (default: {DEFAULT_CONFIG} if it exists, else the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set convergence.steps=2000 --set data.n_train=5000 (repeatable)")
    p.add_argument("--out", default="results", help="results root directory (default: results)")
    p.add_argument("--run-name", default=None, help="results subdirectory (default: the config's name)")
    p.add_argument("--data-dir", default=None, help="directory holding the data set's files (overrides data.data_dir)")
    p.add_argument("--cache-dir", default=None,
                   help="download cache (overrides data.cache_dir; default $DEQ_JAX_DATA_DIR or "
                        "~/.cache/deq_jax/datasets)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", dest="fresh", action="store_false",
                       help="continue from the checkpoints of an interrupted run (default)")
    group.add_argument("--fresh", dest="fresh", action="store_true", help="discard checkpoints and start over")
    p.set_defaults(fresh=False)
    return p


def resolve_config(args: argparse.Namespace) -> ReproduceConfig:
    path = args.config
    if path is None and pathlib.Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    cfg = load_config(path, args.overrides)
    data = cfg.data
    if args.data_dir is not None:
        data = dataclasses.replace(data, data_dir=args.data_dir)
    if args.cache_dir is not None:
        data = dataclasses.replace(data, cache_dir=args.cache_dir)
    return dataclasses.replace(cfg, data=data)


def environment() -> tuple[dict, dict]:
    import jax

    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    devices = jax.devices()
    kinds = sorted({str(getattr(d, "device_kind", d.platform)) for d in devices})
    device = {
        "jax_devices": [str(d) for d in devices],
        "description": f"{len(devices)} x {', '.join(kinds)} (jax {jax.__version__}; {os.cpu_count()} CPU cores)",
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    return versions, device


def jsonable(obj: Any) -> Any:
    """Measurements for summary.json: scalars and small lists; per-step arrays are left to metrics.csv."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not (isinstance(v, np.ndarray) and v.ndim > 0)}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.item())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if np.isfinite(x) else str(x)
    return obj


def _on_sigterm(signum, frame):  # kill: leave like Ctrl-C, through the same message (checkpoints are atomic)
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error (already printed by argparse)
        return int(exit_.code or 0)
    try:
        cfg = resolve_config(args)
    except ConfigError as err:
        print(f"reproduce: configuration error: {err}", file=sys.stderr)
        return 2

    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return _run(cfg, args, argv)
    except KeyboardInterrupt:
        out = pathlib.Path(args.out) / (args.run_name or cfg.name)
        print(f"\nreproduce: interrupted. Checkpoints are in {out / 'checkpoints'}; run the same command again to "
              f"resume (or add --fresh to start over).", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_experiments(cfg: ReproduceConfig, ctx: Any, *, log: Any) -> dict:
    """Run the enabled experiments one after another and return their outcomes by name.

    Their training programs compile in a background thread meanwhile (`gd_runs.precompile`); all numerics run
    here, in order."""
    from experiments.reproduce import convergence, implicit_bias, runs as gd_runs, trust_region

    modules = {"convergence": convergence, "trust_region": trust_region, "implicit_bias": implicit_bias}
    names = [name for name in EXPERIMENTS if getattr(cfg, name).enabled]
    gd_runs.precompile([spec for name in names for spec in modules[name].programs(cfg, ctx)])
    outcomes: dict[str, dict] = {}
    try:
        for name in names:
            t0 = time.perf_counter()
            outcomes[name] = modules[name].run(cfg, ctx)
            n_pass = sum(c.passed for c in outcomes[name]["claims"])
            log(f"reproduce: [{name}] {n_pass}/{len(outcomes[name]['claims'])} claims passed "
                f"({time.perf_counter() - t0:.1f} s)")
    finally:
        gd_runs.stop_precompiling()
    return outcomes


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _run(cfg: ReproduceConfig, args: argparse.Namespace, argv: list[str]) -> int:
    t_start = time.perf_counter()
    import jax

    # float64 for the claims: gaps of 1e-6 relative and discrepancies at rounding level need it
    jax.config.update("jax_enable_x64", True)

    from experiments.common import datasets as dq_data
    from experiments.common.config import dump_yaml
    from experiments.reproduce import report as reproduce_report
    from experiments.reproduce.common import Context, load_dataset, make_features
    from experiments.common.io import CheckpointMismatch, CheckpointStore, write_json, write_text

    progress = not args.no_progress
    run_name = args.run_name or cfg.name
    out = pathlib.Path(args.out) / run_name
    store = CheckpointStore(out / "checkpoints")
    try:
        reused = store.open(fingerprint(cfg), fresh=args.fresh)
    except CheckpointMismatch as err:
        print(f"reproduce: {err}", file=sys.stderr)
        return 2
    for stale in ("summary.json", "REPORT.md", "metrics.csv"):  # a previous run's, until this one replaces them
        (out / stale).unlink(missing_ok=True)
    config_yaml = dump_yaml(cfg)
    write_text(out / "config.yaml", config_yaml)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"reproduce: {run_name} -> {out}" + (f" (resuming: {reused} checkpoints)" if reused else ""))

    try:
        dataset = load_dataset(cfg.data, progress=progress)
        feats = make_features(dataset, cfg.data)
    except (dq_data.DatasetNotFoundError, dq_data.ChecksumError, dq_data.DatasetFormatError) as err:
        print(f"reproduce: data set {cfg.data.dataset!r} unavailable ({type(err).__name__}):\n{err}", file=sys.stderr)
        return 2
    except ValueError as err:  # e.g. pca_dim above the data's rank, n_train above the split's size
        print(f"reproduce: configuration error in 'data': {err}", file=sys.stderr)
        return 2
    log(f"reproduce: {feats.info['dataset']}: {feats.phi_train.shape[0]} train / {feats.phi_test.shape[0]} test "
        f"samples, width m = {feats.phi_train.shape[1]}")

    ctx = Context(dataset=dataset, features=feats, store=store, progress=progress)
    try:
        outcomes = run_experiments(cfg, ctx, log=log)
    except ConfigError as err:
        print(f"reproduce: configuration error: {err}", file=sys.stderr)
        return 2
    t_out = time.perf_counter()

    claims = [c.as_dict() for o in outcomes.values() for c in o["claims"]]
    figures = reproduce_report.make_figures(outcomes, out / "figures")
    write_text(out / "metrics.csv", reproduce_report.metrics_csv(outcomes))
    versions, device = environment()
    info = {k: v for k, v in feats.info.items() if k != "kept_column_indices"}
    summary = {
        "run_name": run_name,
        "command": "python -m experiments reproduce " + " ".join(shlex.quote(a) for a in argv),
        "all_passed": all(c["passed"] for c in claims),
        "claims_passed": sum(c["passed"] for c in claims),
        "claims_total": len(claims),
        "claims": claims,
        "dataset": jsonable(info),
        "seed": cfg.seed,
        "config_fingerprint": fingerprint(cfg),
        "config": jsonable(dataclasses.asdict(cfg)),
        "experiments": {name: jsonable({k: v for k, v in o.items() if k != "claims"}) for name, o in outcomes.items()},
        "versions": versions,
        "device": device,
        "checkpoints_reused": reused,
        "wall_time_s": time.perf_counter() - t_start,
    }
    write_text(out / "REPORT.md", reproduce_report.report_markdown(summary, outcomes, figures, config_yaml))
    summary["wall_time_s"] = time.perf_counter() - t_start
    write_json(out / "summary.json", summary)
    log(f"reproduce: figures, metrics.csv, summary.json, REPORT.md written ({time.perf_counter() - t_out:.1f} s)")

    passed = summary["claims_passed"]
    print(f"\nClaims ({passed}/{len(claims)} passed) -- {out / 'REPORT.md'}")
    print(reproduce_report.claims_text(claims))
    print(f"\nwall time {summary['wall_time_s']:.1f} s; results in {out}/")
    return 0 if summary["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
