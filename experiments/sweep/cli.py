"""`python -m experiments sweep --config configs/sweep_digits.yaml`: a hyperparameter grid as compiled, vmapped,
sharded programs, then tables, figures and a summary.

Writes into the output folder (default `results/sweeps/<name>`): `results.csv`, `results.jsonl`, `aggregate.csv`,
`figures/*.png`, `sweep.json` (config, environment, chunking, memory, timing) and `summary.md`. Finished chunks are
kept in `chunks/`: the same command resumes an interrupted sweep, `--fresh` starts over.

Exit status: 0 done; 2 not run, or stopped without replacing any result (a usage, configuration, data or output
error: one line on stderr names the flag, key or file; e.g. a folder another sweep holds, processes that did not meet);
130 interrupted (Ctrl-C or SIGTERM; finished chunks are kept, the process ends at once); 1 a multi-process run
lost a process (each survivor says so in one line and exits at once; finished chunks are kept and the same
commands resume).

Several processes or hosts: start the same command once per process, with `--distributed` and where to meet:

    python -m experiments sweep --config configs/sweep_digits.yaml --distributed \\
        --coordinator HOST0:12355 --num-processes 2 --process-id I        # I = 0 on HOST0, 1 on the other

(on Slurm or Open MPI the three values are detected; on CPUs the processes talk through gloo). The mesh then
spans every process's devices, every process computes its shards, and process 0 alone reads and writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import sys
from collections.abc import Sequence

from experiments.common import cli, interrupts, io, locks
from experiments.sweep import rendezvous

PROG = "sweep"
EXIT_LOST_PROCESS = 1
TRUTHY = ("1", "true", "yes", "on")


EXAMPLES = """examples (each runs as written from the repository root; a test runs them):
  .venv/bin/python -m experiments sweep --config configs/sweep_digits.yaml     # make sweep: 192 runs, ~1.5 minutes
  .venv/bin/python -m experiments sweep --config configs/sweep_smoke.yaml      # 36 runs, ~1 minute
  .venv/bin/python -m experiments sweep --config configs/sweep_digits.yaml --set steps=100 --set grid.seeds=[0,1]
  .venv/bin/python -m experiments sweep --config configs/sweep_smoke.yaml --set 'grid.models=[delm, deep_linear]' \\
      --set grid.losses=[cross_entropy] --output-dir /tmp/sweep_ce --no-figures
  .venv/bin/python -m experiments sweep --config configs/sweep_smoke.yaml --fresh     # discard saved chunks

two processes on this machine (one command per terminal; on several hosts, HOST0's address instead of 127.0.0.1):
  .venv/bin/python -m experiments sweep --config configs/sweep_smoke.yaml --distributed \\
      --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0
  .venv/bin/python -m experiments sweep --config configs/sweep_smoke.yaml --distributed \\
      --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1

exit status: 0 done; 1 a multi-process run lost a process; 2 a usage, configuration, data or output error (one line
on stderr names the flag, config key or file; the previous results are kept); 130 interrupted (finished chunks are
kept: the same command resumes)
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m experiments sweep",
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="sweep YAML (see configs/sweep_*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set steps=50 --set grid.seeds=[0,1] (repeatable)",
    )
    p.add_argument("--output-dir", default=None, help="default: the config's output_dir or results/sweeps/<name>")
    p.add_argument(
        "--data-dir",
        default=None,
        metavar="FOLDER",
        help="folder holding the data sets' files (overrides every datasets[i].data_dir)",
    )
    p.add_argument("--fresh", action="store_true", help="discard saved chunks instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    d = p.add_argument_group("several processes (jax.distributed)")
    d.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (also DEQ_JAX_DISTRIBUTED=1)",
    )
    d.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="process 0's address (default: detected, or $JAX_COORDINATOR_ADDRESS)",
    )
    d.add_argument("--num-processes", type=int, default=None, metavar="N", help="default: detected")
    d.add_argument("--process-id", type=int, default=None, metavar="I", help="0 .. N-1; default: detected")
    d.add_argument(
        "--init-timeout",
        type=int,
        default=300,
        metavar="SECONDS",
        help="give up when the processes have not all joined after this long (default 300)",
    )
    return p


def _initialize_distributed(args: argparse.Namespace, state: dict) -> None:
    """`jax.distributed.initialize` with the flags: before anything else touches JAX (devices become global).

    With --coordinator, --num-processes and --process-id given, the processes first meet in plain Python
    (`experiments.sweep.rendezvous`): a process that never joins or a coordinator that cannot be reached is then one
    line and exit status 2 after --init-timeout, where JAX's client would end the process from C++ (status 134)."""
    for flag, value in (("--num-processes", args.num_processes), ("--init-timeout", args.init_timeout)):
        if value is not None and value < 1:
            raise cli.UserError(f"{flag} must be a positive integer; got {value}")
    if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or args.process_id + 1):
        raise cli.UserError(f"--process-id must be in 0 .. --num-processes - 1; got {args.process_id}")
    if args.coordinator is not None and args.num_processes is not None and args.process_id is not None:
        rendezvous.meet(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
    import jax  # here and below, not at the top: nothing may touch JAX before `jax.distributed.initialize`

    state["joined"] = True  # from here a failure ends the process at once (JAX's teardown would wait or crash)
    try:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=args.init_timeout,
        )
    except (ValueError, TypeError) as err:  # nothing detected and not given
        hint = "pass --coordinator HOST:PORT --num-processes N --process-id I"
        raise cli.UserError(f"--distributed: {err} ({hint})") from err
    except (jax.errors.JaxRuntimeError, RuntimeError) as err:  # e.g. the coordinator never answered
        raise cli.UserError(
            f"--distributed: the processes could not meet at {args.coordinator or 'the coordinator'}"
            f" within {args.init_timeout} s: {' '.join(str(err).split())[:300]}"
        ) from None


class _LostProcess(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run a sweep from a YAML config; the exit status as in the module docstring."""
    state = {"output_dir": None, "prog": PROG, "joined": False}

    def body() -> int:
        args = cli.parse_args(build_parser(), argv)  # a usage error is a UserError: one line, exit status 2
        if isinstance(args, int):  # --help
            return args
        if args.distributed or os.environ.get("DEQ_JAX_DISTRIBUTED", "").lower() in TRUTHY:
            _initialize_distributed(args, state)
        import jax  # after `_initialize_distributed` (see there)

        if jax.process_count() > 1:
            state["prog"] = f"{PROG} [process {jax.process_index()}]"
        from experiments.sweep import run as sweep_run  # these import JAX: after `_initialize_distributed`
        from experiments.sweep.config import load_config

        config = load_config(args.config, args.overrides)
        if args.data_dir is not None:
            config = dataclasses.replace(
                config, datasets=tuple(dataclasses.replace(d, data_dir=args.data_dir) for d in config.datasets)
            )
        output_dir = pathlib.Path(args.output_dir or config.resolved_output_dir)
        state["output_dir"] = output_dir
        writer = jax.process_index() == 0
        with contextlib.ExitStack() as held:
            if writer:  # one sweep per folder; taking the lock also checks that the folder can be written
                flag = "--output-dir" if args.output_dir else "--output-dir (config key output_dir)"
                held.enter_context(locks.folder_lock(output_dir, flag=flag, log=lambda line: print(line, flush=True)))
            try:
                result = sweep_run.run_sweep(
                    config,
                    output_dir=output_dir,
                    resume=not args.fresh,
                    progress=not args.no_progress,
                    log=lambda line: print(line, flush=True),
                    write_tables=False,
                )
            except jax.errors.JaxRuntimeError as err:
                if jax.process_count() == 1:
                    raise
                raise _LostProcess(" ".join(str(err).split())[:300]) from None
            except cli.UserError as err:
                if jax.process_count() == 1:
                    raise
                raise type(err)(f"[process {jax.process_index()}] {err}") from None
            interrupts.check()
            if not writer:
                return 0
            _write_records(result, figures=not args.no_figures)
        interrupts.check()  # interrupted while writing: say so (every file is whole; the same command redoes them)
        return 0

    def interrupted() -> str:
        chunks = pathlib.Path(state["output_dir"] or "") / "chunks"
        saved = len(list(chunks.glob("chunk-*.npz"))) if state["output_dir"] and chunks.is_dir() else 0
        if not saved:
            return "no chunk had finished, nothing was written; run the same command again to start"
        return (
            f"{saved} finished chunk(s) are kept in {chunks}; run the same command again to resume (--fresh "
            f"starts over)"
        )

    try:
        code = cli.run(PROG, body, interrupted=interrupted)
    except _LostProcess as err:
        print(
            f"{state['prog']}: error: the multi-process run lost a process (it died, was killed or cannot be "
            f"reached): {err}. Finished chunks are kept; start the same commands again to resume.",
            file=sys.stderr,
            flush=True,
        )
        code = EXIT_LOST_PROCESS
    # Leave at once (everything kept is already on disk, written atomically): after an interrupt, because JAX's
    # teardown can crash once a Ctrl-C has landed inside tracing or compiling (measured: a segmentation fault at
    # exit in 1 of 4 interrupts); after a lost process, because jax's shutdown barrier would wait for the dead one.
    if code == cli.EXIT_INTERRUPTED or (state["joined"] and code != 0):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _write_records(result, *, figures: bool) -> None:
    from experiments.sweep import figures as sweep_figures  # these import JAX: after `_initialize_distributed`
    from experiments.sweep import summary, tables

    with io.staged():  # all of them or none (a full disk: exit 2, the previous files kept; the chunks are kept)
        result.files = tables.write_tables(result.rows, result.output_dir)
        files = dict(result.files)
        if figures:
            files.update(sweep_figures.write_figures(result.rows, result.output_dir / "figures"))
        files["manifest"] = summary.write_manifest(result)
        files["summary"] = summary.write_summary(result, files)
    print(
        f"sweep {result.config.name}: {len(result.configurations)} configurations in {len(result.groups)} "
        f"groups, {result.chunks_computed} chunks computed, {result.chunks_skipped} resumed, "
        f"{result.wall_s:.1f} s"
    )
    print("\n".join(summary.console_lines(result)))
    for name, path in files.items():
        print(f"  {name}: {path}")


if __name__ == "__main__":
    sys.exit(main())
