"""The main job: reproduce the paper's claims end to end, on real data, with figures and a report.

Experiments (docs/theory.md sections 4-6; each a short composition of deq_jax calls, each with a plan that lists its
compiled programs once, for precompilation and for the run, and a typed result that the report consumes):
  1. global linear convergence of full-batch GD: the exact DELM, the DELM through an iterative solver with the
     implicit backward (transposed and per-sample), linear and deep linear nets, square loss and cross-entropy,
     against the shallow optimum L* and the bound from the run's own |U_t|_2 (experiments/reproduce/convergence.py);
  2. the trust-region Newton relation of the DELM's dynamics in W-space (experiments/reproduce/trust_region.py);
  3. implicit bias at matched training loss where minimisers are many (experiments/reproduce/implicit_bias.py).

Writes `<out>/<run-name>/`: config.yaml, metrics.csv, summary.json, figures/*.png, REPORT.md, checkpoints/.
Every file is written atomically, and nothing is written before the configuration and the data have been read; the
run holds the folder's lock (`run.lock`: one run per folder), and its result files replace the previous run's
together, once all of them are written (a failed write: exit status 2, the previous files kept).
Checkpoints are written at the end of every run and every few seconds within one, keyed by what the run's numbers
depend on: an interrupted run (Ctrl-C, kill) resumes where it was when the same command is run again, and ends with
the same numbers; a changed threshold re-judges without recomputing; `--fresh` discards them.

Exit status: 0 when every claim passed (with `--mutation`: when every gradient-sensitive claim failed, i.e. the
wrong gradient was caught; with `--mutation-table`: both, for the honest run and every mutation), 1 otherwise,
2 for a usage, configuration, data or output error (one line on stderr), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from experiments.common import cli as common_cli
from experiments.common import datasets as dq_data
from experiments.common import env, interrupts, io, locks
from experiments.common.cli import UserError
from experiments.common.config import dump_yaml, to_dict
from experiments.common.io import CheckpointStore, NullStore, fingerprint, write_json, write_text
from experiments.reproduce import convergence, implicit_bias, mutation_table, mutations, report, trust_region
from experiments.reproduce import runs as gd_runs
from experiments.reproduce.checkpoints import FallbackStore
from experiments.reproduce.common import Context, load_dataset, make_features
from experiments.reproduce.config import MUTATIONS, ReproduceConfig, load_config

DEFAULT_CONFIG = "configs/digits.yaml"
EXPERIMENTS = ("convergence", "trust_region", "implicit_bias")
PROG = "python -m experiments reproduce"

#: the examples `--help` shows; a test runs every one of them (with --dry-run)
EXAMPLES = (
    ("", "configs/digits.yaml, as `make run`: 1-4 minutes on 2 CPU cores"),
    ("--set convergence.steps=1000 --set implicit_bias.seeds=[0,1] --run-name digits_short", "override keys"),
    ("--config configs/tiny.yaml --fresh", "every experiment at tiny sizes, from scratch: under a minute"),
    ("--mutation one_step", "train the DELMs with the one-step gradient: the gradient-sensitive claims must fail"),
    ("--mutation-table", "the honest run and every mutation: which claims fail under which (MUTATIONS.md)"),
    (
        "--config configs/fashion_mnist_full.yaml",
        (
            "all 60000 Fashion-MNIST training images (offline from the "
            "Debian package dataset-fashion-mnist): 5-10 minutes on 2 CPU cores"
        ),
    ),
)


#: what each exit status means (shown by --help; the tests check each one)
EXIT_STATUSES = (
    (0, "every claim passed (--mutation: every gradient-sensitive claim failed, the wrong gradient was caught)"),
    (1, "a claim failed (--mutation: a gradient-sensitive claim passed with the wrong gradient)"),
    (
        2,
        (
            "usage, configuration, data or output error (one line on stderr; the previous results are kept): e.g. "
            "a folder another run holds, a file that cannot be written, a corrupt checkpoint"
        ),
    ),
    (130, "interrupted (Ctrl-C, SIGTERM): checkpoints kept, the same command resumes"),
)


def build_parser() -> argparse.ArgumentParser:
    epilog = (
        "examples:\n"
        + "\n".join(f"  {PROG} {args}".rstrip() + f"\n      {what}" for args, what in EXAMPLES)
        + "\n\nexit status:\n"
        + "\n".join(f"  {code:<4} {what}" for code, what in EXIT_STATUSES)
    )
    p = common_cli.ArgumentParser(
        prog=PROG,
        description="Reproduce the paper's claims: convergence, trust-region relation, implicit bias.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        default=None,
        help=f"YAML config (default: {DEFAULT_CONFIG} if it exists, else the built-in defaults)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set convergence.steps=1000 (repeatable)",
    )
    p.add_argument("--out", default="results", help="results root directory (default: results)")
    p.add_argument(
        "--run-name",
        default=None,
        help="results subdirectory (default: the config's name, plus _<mutation> with --mutation)",
    )
    p.add_argument("--data-dir", default=None, help="directory holding the data set's files (overrides data.data_dir)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="download cache (overrides data.cache_dir; default $DEQ_JAX_DATA_DIR or ~/.cache/deq_jax/datasets)",
    )
    mut = p.add_mutually_exclusive_group()
    mut.add_argument(
        "--mutation",
        choices=MUTATIONS,
        default=None,
        help="train the DELMs under test with a deliberately wrong gradient (the mutation test)",
    )
    mut.add_argument(
        "--mutation-table",
        action="store_true",
        help="run the honest job and every mutation, and write which claims fail under which",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="read the config and the data, print the plan, and stop (writes nothing)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        dest="fresh",
        action="store_false",
        help="continue from the checkpoints of an interrupted run (default)",
    )
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
    return dataclasses.replace(cfg, data=data, mutation=args.mutation or cfg.mutation)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = common_cli.parse_args(build_parser(), argv)
    except common_cli.UserError as err:  # a usage error: one line, reported by the same runner as every other error
        # partial binds the error now: the name `err` is unbound once the except block ends
        return common_cli.run("reproduce", functools.partial(_raise, err))
    if isinstance(args, int):
        return args
    where: dict[str, Any] = {}

    def hint() -> str:
        out = where.get("out")
        return (
            (
                f"checkpoints are in {out / 'checkpoints'}; run the same command again to resume (or add --fresh "
                f"to start over)"
            )
            if out
            else "nothing was written"
        )

    return common_cli.run("reproduce", lambda: _main(args, argv, where), interrupted=hint)


def _raise(err: Exception) -> int:
    raise err


def _main(args: argparse.Namespace, argv: list[str], where: dict) -> int:
    with interrupts.safe_points():
        code = _main_trapped(args, argv, where)
        interrupts.check()  # a signal during the last writes still means: interrupted
        return code


def _main_trapped(args: argparse.Namespace, argv: list[str], where: dict) -> int:
    cfg = resolve_config(args)
    if not args.mutation_table:
        return _run_one(cfg, args, argv, args.run_name or _default_name(cfg), where)["exit_code"]
    summaries = {}
    where["honest"] = args.run_name or cfg.name
    for mutation in (None, *MUTATIONS):
        cfg_m = dataclasses.replace(cfg, mutation=mutation)
        name = _default_name(cfg_m) if args.run_name is None else (args.run_name + (f"_{mutation}" if mutation else ""))
        summaries[mutation] = _run_one(cfg_m, args, argv, name, where)
    if args.dry_run:
        return common_cli.EXIT_OK
    return mutation_table.write(pathlib.Path(args.out) / f"{cfg.name}_mutations", summaries)


def _default_name(cfg: ReproduceConfig) -> str:
    return cfg.name + (f"_{cfg.mutation}" if cfg.mutation else "")


def _one_line(cfg: ReproduceConfig, err: Exception) -> UserError:
    """A data error as one line: the data package's (multi-line) message, with what was missing and where it was
    looked for, in the terms of this command (--data-dir, --cache-dir, data.download)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, dq_data.DatasetNotFoundError) and cfg.data.dataset != "files":
        missing = ", ".join(getattr(err, "missing", ()) or ())
        searched = ", ".join(str(p) for p in getattr(err, "searched", ()) or ())
        what = lines[0].rstrip(".") if lines else f"data set {cfg.data.dataset!r} not found"
        return UserError(
            f"{what}"
            + (f"; missing {missing}" if missing else "")
            + (f"; looked in {searched}" if searched else "")
            + "; put the files into a directory and pass --data-dir DIR (config key data.data_dir), or "
            "into the download cache (--cache-dir DIR or $DEQ_JAX_DATA_DIR)"
            + ("" if cfg.data.download else ", or allow downloading (data.download: true)")
        )
    return UserError(" ".join(lines))


def _load(cfg: ReproduceConfig, progress: bool):
    try:
        dataset = load_dataset(cfg.data, progress=progress)
        feats = make_features(dataset, cfg.data)
    except dq_data.DatasetError as err:  # before anything is written: a data error leaves no folder behind
        raise _one_line(cfg, err) from None
    return dataset, feats


MODULES = {"convergence": convergence, "trust_region": trust_region, "implicit_bias": implicit_bias}


def _module(name: str) -> Any:
    return MODULES[name]


def plan_experiments(cfg: ReproduceConfig, ctx: Any) -> dict:
    """The plan of every enabled experiment: its runs and their compiled programs (computes features, trains
    nothing, writes nothing; a configuration the data cannot serve is a ConfigError here)."""
    return {name: _module(name).plan(cfg, ctx) for name in EXPERIMENTS if getattr(cfg, name).enabled}


def run_experiments(
    cfg: ReproduceConfig, ctx: Any, plans: dict, *, log: Any, precompile: Callable[[Any], bool] = lambda spec: True
) -> dict:
    """Precompile the plans' programs that `precompile(spec)` selects in a background thread and run the
    experiments in order (all numerics run here; a program not precompiled is compiled when a run needs it).
    Returns the typed results by experiment name."""
    gd_runs.precompile([spec for name, p in plans.items() for spec in _module(name).programs(p) if precompile(spec)])
    for name, p in plans.items():  # measurements that need no training run, in a background thread
        _module(name).prepare(cfg, ctx, p)
    results: dict[str, Any] = {}
    try:
        for name, p in plans.items():
            interrupts.check()
            t0 = time.perf_counter()
            results[name] = _module(name).run(cfg, ctx, p)
            claims = results[name].claims
            log(
                f"reproduce: [{name}] {sum(c.passed for c in claims)}/{len(claims)} claims passed "
                f"({time.perf_counter() - t0:.1f} s)"
            )
    finally:
        gd_runs.stop_precompiling()
    return results


def _run_one(cfg: ReproduceConfig, args: argparse.Namespace, argv: list[str], run_name: str, where: dict) -> dict:
    t_start = time.perf_counter()
    # float64 for the claims: gaps of 1e-6 relative and discrepancies at rounding level need it
    jax.config.update("jax_enable_x64", True)

    log = lambda msg: print(msg, flush=True)  # stdout: stderr carries only errors and interrupts
    progress = not args.no_progress
    dataset, feats = _load(cfg, progress)  # before anything is written: a data error leaves no folder behind
    log(
        f"reproduce: {feats.info['dataset']}: {feats.phi_train.shape[0]} train / {feats.phi_test.shape[0]} test "
        f"samples, width m = {feats.phi_train.shape[1]}"
    )
    ctx = Context(dataset=dataset, features=feats, store=NullStore(), progress=progress, log=log, data_config=cfg.data)
    plans = plan_experiments(cfg, ctx)
    if args.dry_run:
        for name, p in plans.items():
            specs = _module(name).programs(p)
            shapes = sorted({f"{type(s.model).__name__} {s.rows}x{s.model.width}" for s in specs})
            log(f"reproduce: [{name}] {len(specs)} compiled programs ({', '.join(shapes)})")
        log("reproduce: dry run: nothing trained, nothing written")
        return {"exit_code": common_cli.EXIT_OK}

    out = pathlib.Path(args.out) / run_name
    where["out"] = out
    # one run per folder; taking the lock also checks, before any compute, that the folder can be written
    with locks.folder_lock(out, flag="--out/--run-name", log=log):
        store = CheckpointStore(out / "checkpoints")
        fp = fingerprint({"checkpoint_format": CHECKPOINT_FORMAT})
        honest = pathlib.Path(args.out) / where.get("honest", cfg.name) / "checkpoints"
        if (
            cfg.mutation
            and (honest / "fingerprint.txt").is_file()
            and (honest / "fingerprint.txt").read_text().strip() == fp
        ):  # reuse the honest run's unmutated runs
            store = FallbackStore(out / "checkpoints", CheckpointStore(honest))
        found = store.open(fp, fresh=args.fresh)  # another configuration's checkpoints: a CheckpointMismatch (exit 2)
        config_yaml = dump_yaml(cfg)
        log(
            f"reproduce: {run_name} -> {out}"
            + (f" (found {report.plural(found, 'checkpoint file')})" if found else "")
            + (f"; MUTATION: {mutations.DESCRIPTIONS[cfg.mutation]}" if cfg.mutation else "")
        )

        ctx.store = store
        if found:  # resuming: most runs come from checkpoints, so compile only what a run needs, when it needs it
            wanted = lambda spec: False
        elif isinstance(store, FallbackStore):  # a mutation run: the unmutated runs come from the honest run's store
            wanted = lambda spec: spec.mutation is not None
        else:
            wanted = lambda spec: True
        results = run_experiments(cfg, ctx, plans, log=log, precompile=wanted)
        interrupts.check()  # not a half-finished report: interrupted is interrupted
        t_out = time.perf_counter()

        claims = [c.as_dict() for result in results.values() for c in result.claims]
        sensitive = [c for c in claims if c["gradient_sensitive"]]
        # the previous run's files stay whole until all of this run's are written (a full disk: exit 2)
        with io.staged():
            figures = report.make_figures(results, out / "figures")
            write_text(out / "config.yaml", config_yaml)
            write_text(out / "metrics.csv", report.metrics_csv(results))
            info = {k: v for k, v in feats.info.items() if k != "kept_column_indices"}
            all_passed = all(c["passed"] for c in claims)
            caught = bool(sensitive) and not any(c["passed"] for c in sensitive)
            summary = {
                "run_name": run_name,
                "command": f"{PROG} " + " ".join(shlex.quote(a) for a in argv),
                "mutation": cfg.mutation,
                "mutation_description": mutations.DESCRIPTIONS.get(cfg.mutation) if cfg.mutation else None,
                "all_passed": all_passed,
                "claims_passed": sum(c["passed"] for c in claims),
                "claims_total": len(claims),
                "sensitive_total": len(sensitive),
                "sensitive_failed": sum(not c["passed"] for c in sensitive),
                "claims": claims,
                "dataset": report.jsonable(info),
                "config": report.jsonable(to_dict(cfg)),
                "experiments": {name: report.jsonable(result) for name, result in results.items()},
                "environment": env.environment(),
                "runs_total": ctx.runs_total,
                "runs_loaded": ctx.runs_loaded,
                "wall_time_s": time.perf_counter() - t_start,
            }
            write_text(out / "REPORT.md", report.report_markdown(summary, results, figures, config_yaml))
            summary["wall_time_s"] = time.perf_counter() - t_start
            write_json(out / "summary.json", summary)
        log(f"reproduce: figures, metrics.csv, summary.json, REPORT.md written ({time.perf_counter() - t_out:.1f} s)")

    print(f"\nClaims ({summary['claims_passed']}/{len(claims)} passed) -- {out / 'REPORT.md'}")
    print(report.claims_text(claims))
    if cfg.mutation:
        print(
            f"\nMUTATION {cfg.mutation}: {summary['sensitive_failed']} of {len(sensitive)} gradient-sensitive "
            f"claims failed"
            + (
                " (the wrong gradient was caught)"
                if caught
                else " -- some gradient-sensitive claims PASSED with a wrong gradient"
            )
        )
    print(
        f"\nwall time {summary['wall_time_s']:.1f} s; {ctx.runs_loaded} of "
        f"{report.plural(ctx.runs_total, 'training run')} loaded from checkpoints; results in {out}/"
    )
    summary["exit_code"] = common_cli.EXIT_OK if (caught if cfg.mutation else all_passed) else common_cli.EXIT_FAILED
    return summary


#: bump when the checkpoints' contents change, so that old checkpoints are refused rather than misread
CHECKPOINT_FORMAT = 4


if __name__ == "__main__":
    sys.exit(main())
