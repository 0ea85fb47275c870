"""python -m experiments bench: benchmarks of one DEQ training step.

Suites (all rows of a suite run in one process, their timed repeats interleaved round by round, so that the load
of a shared machine hits every row alike; rows: experiments/bench/cases.py, goals: experiments/bench/goals.py):

  step     (`make bench`) one DELM training step at m = 784, batch 1024, float32: deq_jax next to the same step
           written inline with plain JAX + jaxopt, for each solver and formulation; the bare LU factorisation;
           warm-started training runs (consecutive steps of TrainStep.update, --warm-steps untimed first) next to
           the same runs started from zero at every step; the implicit vs unrolled backward's XLA temporary memory
           at 100 fixed-point iterations
  peer     every deq_jax solver x backward mode, the inline baseline, torchdeq and plain PyTorch (the optional
           `peer` extra: pip install -e '.[peer]'; without it those rows are left out with a note)
  gpu      the peer rows at full batch n = 60000 on a GPU (--device cpu --n 256 --width 64: same code on a CPU)
  profile  where the time of the transposed DELM step goes, component by component (experiments/bench/profile.py)
  sweep    64 seeds as one vmapped program vs a Python loop (experiments/bench/sweep_bench.py; its own options)
  fashion  the Fashion-MNIST DEQ example's training step: deq_jax (each implicit backward), plain jaxopt and
           torchdeq side by side (experiments/bench/fashion_step.py; its own options)

Every row records min and median step time, compile time, iterations, the implementation's own convergence
verdict and an independent one (the float64 relative residual |f(z) - z| / |f(z)| of the returned equilibrium
<= tol), gradient errors against float64 references and memory; a training run also every step's iterations.
The table and goals are printed; the JSON (with the environment record) is written atomically to --out, or with
--publish to docs/results/bench-NAME.json, with the figure, and docs/benchmarks.md's generated blocks are
re-rendered from it.

Exit status: 0 done, every row ran and every correctness goal held (speed and memory goals are reported, met or
not); 1 done, but a row failed or a correctness goal did not hold; 2 not run, or nothing replaced: a flag, device
or file error (a malformed result JSON for --render, a missing or corrupt --data-dir, an --out that another run
writes (its `NAME.json.lock`) or that cannot be written; one line on stderr); 130 interrupted (Ctrl-C or SIGTERM;
the run stops at its next step): nothing is written.
"""
# This module holds the arguments and the dispatch only; a run is experiments/bench/run.py.

from __future__ import annotations

import os

# LAPACK (OpenBLAS) threads fight XLA's own threads on a small CPU: one thread, unless the caller chose otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# On a GPU, JAX would grab 75% of the memory up front and leave none to the PyTorch rows of the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import math
import pathlib
import re
import sys
import time

from experiments.bench import fashion_step, run, sweep_bench
from experiments.common import cli as common_cli
from experiments.common import interrupts
from experiments.common.cli import UserError
from experiments.common.config import COUNT_MAX

PROG = "python -m experiments bench"
ROOT = pathlib.Path(__file__).resolve().parents[2]
SUITES = ("step", "peer", "gpu", "profile", "sweep", "fashion")
EXAMPLES = """examples:
  .venv/bin/python -m experiments bench --suite step --list
  .venv/bin/python -m experiments bench --suite profile --list
  .venv/bin/python -m experiments bench --suite step --publish                      # make bench
  .venv/bin/python -m experiments bench --suite step --rows 'refine|lu_factor' --warm-steps 10 --out /tmp/refine.json
  .venv/bin/python -m experiments bench --suite peer --out /tmp/peer.json --plot /tmp/peer.png \\
      --rows '^(deq_jax|torchdeq) delm transposed anderson (implicit|one_step)'
  .venv/bin/python -m experiments bench --suite gpu --device cpu --n 256 --width 64 --rows 'transposed direct'
  .venv/bin/python -m experiments bench --suite profile --rows '^deq_jax step' --out /tmp/profile.json
  .venv/bin/python -m experiments bench --render                                    # docs tables from docs/results
"""
INTERRUPTED = "nothing was written; the same command starts over"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (a `UserError`, exit status 2) instead of usage + message."""

    def error(self, message: str):
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--suite", choices=SUITES, default="step", help="which benchmark (default: step)")
    add("--list", action="store_true", help="print the row names of the suite and exit")
    add("--rows", default=None, help="only rows whose name matches this regular expression")
    add("--skip", default=None, help="leave out rows whose name matches this regular expression")
    add("--out", default=None, help="JSON output path (default results/bench/<suite>.json)")
    add("--plot", default=None, help="also write a PNG bar chart of the step times here (step, peer, gpu)")
    add(
        "--publish",
        nargs="?",
        const="",
        default=None,
        metavar="NAME",
        help="write docs/results/bench-NAME.json (NAME defaults to the suite) and docs/benchmarks_NAME.png, and "
        "re-render docs/benchmarks.md's blocks from the committed JSONs (instead of --out/--plot)",
    )
    add(
        "--render",
        action="store_true",
        help="run nothing: re-render docs/benchmarks.md's generated blocks from docs/results/bench-*.json",
    )
    add(
        "--docs-dir",
        default=str(ROOT / "docs"),
        help="the folder of benchmarks.md and results/ (for --publish and --render; default: the repository's docs/)",
    )
    add(
        "--device",
        choices=("cpu", "gpu"),
        default=None,
        help="where to run (default: gpu for --suite gpu, else cpu); gpu errors if there is none",
    )
    add("--n", type=int, default=None, help="batch size (default 1024; 60000 for --suite gpu)")
    add("--width", type=int, default=784, help="model width m (default 784)")
    add("--classes", type=int, default=10, help="number of classes m_y (default 10)")
    add("--gamma", type=float, default=0.9, help="DELM gamma (default 0.9)")
    add("--tol", type=float, default=1e-5, help="relative tolerance of every solve (default 1e-5)")
    add(
        "--maxiter",
        type=int,
        default=200,
        help="iteration cap of every solve (default 200: fixed-point iteration needs ~110 at gamma 0.9, tol 1e-5)",
    )
    add(
        "--learning-rate",
        type=float,
        default=None,
        help="SGD step size (default: 1 / the largest eigenvalue of the square loss's Gauss-Newton matrix at the "
        "initial parameters, half the step at which gradient descent becomes unstable)",
    )
    add(
        "--data",
        choices=("auto", "fashion_mnist", "random"),
        default="auto",
        help="auto: Fashion-MNIST if on disk, else random (default auto)",
    )
    add(
        "--data-dir",
        default=None,
        help="a folder holding Fashion-MNIST's four IDX files (.gz or uncompressed), searched before the cache and "
        "/usr/share/datasets/fashion-mnist",
    )
    add(
        "--precision",
        choices=("highest", "default"),
        default="highest",
        help="matmul precision of every row (GPUs: 'default' is TF32) (default highest)",
    )
    add("--repeats", type=int, default=5, help="timed steps per row (default 5; at least 5 for the profile)")
    add("--slow-repeats", type=int, default=3, help="timed steps for rows whose first step took over 1 s (default 3)")
    add("--warmup", type=int, default=1, help="untimed steps per row after compiling (default 1)")
    add(
        "--warm-steps",
        type=int,
        default=5,
        help="untimed steps of each training-run row (warm / zero start) before its timed steps, the first from "
        "zero (default 5)",
    )
    add(
        "--settle",
        type=float,
        default=0.25,
        help="seconds to pause (untimed) before each timed step, so that the previous row's idle threads (PyTorch's "
        "OpenMP threads spin after each parallel region) have stopped (default 0.25)",
    )
    add(
        "--note",
        action="append",
        default=[],
        metavar="TEXT",
        help="a remark recorded with the result and shown in the docs (repeatable), e.g. how busy the machine was",
    )
    add(
        "--max-temp-gb",
        type=float,
        default=None,
        help="do not run rows whose XLA temporary memory exceeds this many GiB (default: 4 on a CPU, half the "
        "GPU's memory on a GPU)",
    )
    return parser


def validate(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the suite-dependent defaults and check every value; `UserError` names the flag."""
    args.device = args.device or ("gpu" if args.suite == "gpu" else "cpu")
    args.n = args.n if args.n is not None else (60000 if args.suite == "gpu" else 1024)
    for name in ("n", "width", "classes", "maxiter", "repeats", "slow_repeats", "warm_steps", "warmup"):
        low = 0 if name == "warmup" else 1
        if not low <= getattr(args, name) <= COUNT_MAX:
            what = "an integer >= 0" if low == 0 else "a positive integer"
            raise UserError(f"--{name.replace('_', '-')} must be {what} (at most 2**31 - 1); got {getattr(args, name)}")
    for name in ("gamma", "tol", "learning_rate", "settle", "max_temp_gb"):  # argparse's float() takes inf and nan
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number; got {value}")
    if not args.settle >= 0:
        raise UserError(f"--settle must be >= 0; got {args.settle}")
    if not 0.0 < args.gamma < 1.0:
        raise UserError(f"--gamma must be in the open interval (0, 1); got {args.gamma}")
    for name in ("tol", "learning_rate", "max_temp_gb"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive number; got {getattr(args, name)}")
    for name in ("rows", "skip"):
        if getattr(args, name) is not None:
            try:
                re.compile(getattr(args, name))
            except re.error as err:
                raise UserError(f"--{name} must be a regular expression; got {getattr(args, name)!r} ({err})") from err
    if args.data_dir is not None and args.data == "random":
        raise UserError("--data-dir names where Fashion-MNIST is; --data random reads no files (drop one of them)")
    if args.render and (args.list or args.publish is not None):
        raise UserError("--render runs no benchmark; use it without --list and --publish")
    if args.publish is not None:
        args.publish = args.publish or args.suite
        if not re.fullmatch(r"[A-Za-z0-9_-]+", args.publish):
            raise UserError(f"--publish NAME must be letters, digits, '-' or '_'; got {args.publish!r}")
        if args.out is not None or args.plot is not None:
            raise UserError("--publish chooses the output paths; use it without --out and --plot")
    if args.plot is not None and args.suite == "profile":
        raise UserError("--plot: the profile suite has no figure (its tables are printed and written to the JSON)")
    args.out = args.out or os.path.join("results", "bench", f"{args.suite}.json")
    for name in ("out", "plot"):  # checked before anything runs (the folders' locks check that they can be written)
        if getattr(args, name) is not None and os.path.isdir(getattr(args, name)):
            raise UserError(f"--{name} {getattr(args, name)} is a folder; name the file to write")
    return args


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The validated arguments (`UserError` for a bad one; `SystemExit(0)` after --help)."""
    return validate(build_parser().parse_args(argv))


def _suite_of(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--suite" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--suite="):
            return arg.split("=", 1)[1]
    return None


def _without_suite(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--suite":
            skip = True
        elif not arg.startswith("--suite="):
            out.append(arg)
    return out


def _body(argv: list[str]) -> int:
    if _suite_of(argv) == "fashion":  # its own options, as the sweep's
        try:
            return int(fashion_step.main(_without_suite(argv)) or 0)
        except SystemExit as exit_:
            return int(exit_.code or 0)
    if _suite_of(argv) == "sweep":
        # the sweep benchmark has its own options (experiments/bench/sweep_bench.py): everything else goes to it

        try:
            return int(sweep_bench.main(_without_suite(argv)) or 0)
        except SystemExit as exit_:  # its own argparse: --help (0) or a usage error (2)
            return int(exit_.code or 0)
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)

    try:
        if args.render:
            return run.render(args)
        if args.list:
            return run.list_rows(args)
        with interrupts.safe_points():  # an interrupt stops the run at its next step, before anything is written
            return run.run(args, argv, started=time.time())
    except BrokenPipeError:  # the reader left (`bench --list | head`): stop quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return common_cli.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run a benchmark suite (see the module docstring); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return common_cli.run(PROG, lambda: _body(argv), interrupted=INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
