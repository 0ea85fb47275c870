"""One benchmark run, from validated arguments to written results: choose the rows, build the problem, time the
rows, judge the goals, print the tables, write the JSON (and figure, and docs) only once everything is computed.

Nothing is written before the run is complete, and each file is written atomically
(`experiments.common.io`), so an interrupted or failed run leaves no file behind, half-written or otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import re
from typing import Any

from experiments.bench import cases as suites
from experiments.bench import checks, devices, jax_cases, plots, profile, report, timing
from experiments.bench import goals as goal_defs
from experiments.bench import render as renderer
from experiments.bench import torch_cases as bt
from experiments.bench.problem import Problem, make_problem
from experiments.bench.protocol import Case
from experiments.common import interrupts, io, locks
from experiments.common.cli import EXIT_FAILED, EXIT_OK, UserError
from experiments.common.env import environment

NEEDS = {"torch": "torch", "torchdeq": "torchdeq"}  # row implementation -> the package it needs


def _problem(args: argparse.Namespace, *, for_names_only: bool = False) -> Problem:
    """The shared problem; for listing names, a one-sample random stand-in (names depend on the shape only)."""
    return make_problem(
        n=1 if for_names_only else args.n,
        width=args.width,
        classes=args.classes,
        gamma=args.gamma,
        tol=args.tol,
        maxiter=args.maxiter,
        learning_rate=1.0 if for_names_only else args.learning_rate,
        data="random" if for_names_only else args.data,
        data_dir=args.data_dir,
    )


def _torch_status(args: argparse.Namespace, *, cuda: bool) -> dict:
    """Which of torch / torchdeq can run here, with a note if not both; with `cuda`, whether torch sees the GPU
    that --device gpu asks for (this imports torch)."""

    status = bt.availability()
    if cuda and status["torch"] and args.device == "gpu":
        import torch  # optional and slow to import (seconds): only when its rows run on a GPU

        if not torch.cuda.is_available():
            status = dict(
                status,
                torch=False,
                torchdeq=False,
                note="torch sees no CUDA device: torch and torchdeq rows skipped on --device gpu",
            )
    return status


def _choose(args: argparse.Namespace, p: Problem, where: Any, *, cuda: bool = True) -> tuple[list[Case], list, dict]:
    """The suite's rows selected by --rows/--skip that can run here; notes on those left out; torch's status."""
    chosen = suites.select(suites.SUITES[args.suite](p, where), args.rows, args.skip)
    status = _torch_status(args, cuda=cuda) if any(c.impl in NEEDS for c in chosen) else {}
    runnable = [c for c in chosen if c.impl not in NEEDS or status.get(NEEDS[c.impl])]
    notes = [status["note"]] if status.get("note") and len(runnable) < len(chosen) else []
    if not chosen:
        raise UserError(
            f"no rows of suite {args.suite!r} match --rows {args.rows!r} / --skip {args.skip!r} (--list shows them)"
        )
    if not runnable:
        raise UserError(
            f"every row selected ({len(chosen)}, e.g. {chosen[0].name!r}) needs torch/torchdeq: {status['note']}"
        )
    return runnable, notes, status


def _profile_selection(args: argparse.Namespace, p: Problem) -> tuple[list, tuple[str, ...]]:
    keep = lambda name: (
        (args.rows is None or re.search(args.rows, name)) and not (args.skip and re.search(args.skip, name))
    )
    entries = [e for e in profile.entries(p, args.precision) if keep(e.name)]
    backward = tuple(name for name in profile.BACKWARD_SOLVERS if keep(name))
    if not entries and not backward:
        raise UserError(
            f"no entries of suite 'profile' match --rows {args.rows!r} / --skip {args.skip!r} (--list shows them)"
        )
    return entries, backward


def list_rows(args: argparse.Namespace) -> int:
    """Print the names of the suite's rows (those --rows/--skip select), one a line; notes first."""
    p = _problem(args, for_names_only=True)
    if args.suite == "profile":
        entries, backward = _profile_selection(args, p)
        print("\n".join([e.name for e in entries] + [f"{name}" for name in backward]))
        return EXIT_OK
    runnable, notes, _ = _choose(args, p, suites.Where(device=None, precision=args.precision), cuda=False)
    print("\n".join([f"note: {note}" for note in notes] + [c.name for c in runnable]))
    return EXIT_OK


@dataclasses.dataclass
class Outputs:
    """Where a run's files go."""

    json: pathlib.Path
    png: pathlib.Path | None
    doc: pathlib.Path | None  # re-rendered after the JSON is written (with --publish)
    figure_name: str | None  # the PNG's name as docs/benchmarks.md links it


def _outputs(args: argparse.Namespace) -> Outputs:
    if args.publish is None:
        return Outputs(pathlib.Path(args.out), pathlib.Path(args.plot) if args.plot else None, None, None)
    docs = pathlib.Path(args.docs_dir)
    figure = None if args.suite == "profile" else f"benchmarks_{args.publish}.png"
    return Outputs(
        docs / "results" / f"bench-{args.publish}.json",
        docs / figure if figure else None,
        docs / "benchmarks.md",
        figure,
    )


def _write(payload: dict, outputs: Outputs, docs_dir: pathlib.Path) -> None:
    """Write the JSON, the figure and the docs; the figure is rendered before anything is written."""

    png = plots.png(payload) if outputs.png is not None else None
    interrupts.check()  # the last moment an interrupt can stop the run: after it, every file is written
    with io.staged():  # both or neither (a full disk: exit 2, the previous files kept)
        io.write_json(outputs.json, payload)
        if png is not None:
            io.write_bytes(outputs.png, png)
    print(f"\nwrote {outputs.json}")
    if png is not None:
        print(f"wrote {outputs.png}")
    if outputs.doc is not None:
        if outputs.doc.is_file():
            changed, count = renderer.render_file(outputs.doc, docs_dir / "results")
            print(f"{'rendered' if changed else 'unchanged'} {outputs.doc} ({count} generated blocks)")
        else:
            print(f"note: no {outputs.doc} to render")


def _locked(outputs: Outputs, args: argparse.Namespace) -> contextlib.ExitStack:
    """The output files' locks (`NAME.lock` beside each), taken before anything is measured: one run per output
    file, and the check that its folder can be written. A path that is a folder is a `UserError`."""
    stack = contextlib.ExitStack()
    flags = ("--publish", "--publish") if args.publish is not None else ("--out", "--plot")
    with stack:
        for path, flag in zip((outputs.json, outputs.png), flags, strict=True):
            if path is None:
                continue
            if path.is_dir():
                raise UserError(f"{flag} {path} is a folder; name the file to write")
            stack.enter_context(
                locks.folder_lock(path.parent, flag=flag, name=f"{path.name}.lock", target=path, log=print)
            )
        return stack.pop_all()


def render(args: argparse.Namespace) -> int:
    docs = pathlib.Path(args.docs_dir)
    changed, count = renderer.render_file(docs / "benchmarks.md", docs / "results")
    print(
        f"{'rendered' if changed else 'up to date:'} {docs / 'benchmarks.md'} ({count} generated blocks from "
        f"{docs / 'results'})"
    )
    return EXIT_OK


def _header(args: argparse.Namespace, p: Problem, device: Any, environment: dict, what: str) -> None:
    machine = environment["machine"]
    print(
        f"bench --suite {args.suite}: {what}, n={p.n}, m={p.m}, m_y={p.m_y}, gamma={p.gamma}, tol={p.tol:g}, "
        f"maxiter={p.maxiter}, float32, precision={args.precision}, device {device}"
    )
    print(f"data: {p.data}")
    print(
        f"machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, load {machine['load_average_1_5_15']}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}",
        flush=True,
    )


def _measure_profile(args: argparse.Namespace, p: Problem, device: Any, selection: Any, size: dict) -> dict:
    """The profile suite's payload fields: timed components and steps, facts, backward solves, goals."""

    entries, backward = selection
    repeats = max(args.repeats, 5)
    result = profile.run_profile(p, entries, device=device, precision=args.precision, repeats=repeats)
    solves = profile.backward_solvers(p, backward, device=device, precision=args.precision)
    verdicts = goal_defs.judge(
        goal_defs.for_suite("profile"), result["rows"], size=size, tol=p.tol, facts=result["facts"]
    )
    return dict(
        settings={"repeats": repeats, "device": args.device, "rows": args.rows, "skip": args.skip},
        goals=verdicts,
        rows=result["rows"],
        facts=result["facts"],
        backward_solvers=solves,
    )


def _measure_rows(args: argparse.Namespace, p: Problem, device: Any, selection: list[Case], size: dict) -> dict:
    """A step/peer/gpu suite's payload fields: every selected row built, checked and timed; goals."""

    settings = timing.Settings(
        repeats=args.repeats,
        slow_repeats=args.slow_repeats,
        warmup=args.warmup,
        warm_steps=args.warm_steps,
        settle_s=args.settle,
        max_temp_gb=args.max_temp_gb or devices.default_max_temp_gb(device),
    )
    where = suites.Where(device=device, precision=args.precision, torch_device=args.device)
    names = {c.name for c in selection}
    cases = [c for c in suites.SUITES[args.suite](p, where) if c.name in names]
    direct = None
    if any(c.problem == "delm" for c in cases):
        checks.delm_reference(p)
        direct = jax_cases.direct_gradients(p, device=device, precision=args.precision)
    rows = timing.run_cases(cases, p, settings, direct, device)
    verdicts = goal_defs.judge(goal_defs.for_suite(args.suite), rows, size=size, tol=p.tol, gamma=p.gamma)
    return dict(
        settings=dict(dataclasses.asdict(settings), device=args.device, rows=args.rows, skip=args.skip),
        goals=verdicts,
        rows=rows,
    )


def _load_note(payload: dict) -> list[str]:
    """A note when the machine was busier than its cores at the start or the end of the run."""
    cores = payload["environment"]["machine"].get("cpu_cores") or 1
    before = payload["environment"]["machine"].get("load_average_1_5_15")
    after = payload["device"].get("load_average_after")
    if not before or not after or max(before[0], after[0]) <= cores:
        return []
    return [
        (
            f"the machine was shared and loaded: 1-minute load average {before[0]:.1f} at the start and "
            f"{after[0]:.1f} at the end, on {cores} cores; times (compile times most) are inflated, the paired ratios "
            f"between rows of this run less so"
        )
    ]


def run(args: argparse.Namespace, argv: list[str], *, started: float) -> int:
    """Run the suite; print its tables and goals; write its files. Returns the exit status."""

    outputs = _outputs(args)
    device = devices.resolve(args.device)
    names_only = _problem(args, for_names_only=True)
    if args.suite == "profile":
        selection: Any = _profile_selection(args, names_only)
        notes, torch_status, what = [], {}, f"{len(selection[0])} entries and {len(selection[1])} backward solves"
    else:
        selection, notes, torch_status = _choose(args, names_only, suites.Where(None, args.precision))
        what = f"{len(selection)} rows"
    torch_info: dict = {}
    if torch_status.get("torch"):
        bt.set_precision(args.precision)
        torch_info = bt.torch_device_info(args.device)
    p = _problem(args)
    env = environment(extra_packages=("torch", "torchdeq", "threadpoolctl"))
    _header(args, p, device, env, what)
    for note in notes:
        print(f"note: {note}")
    with _locked(outputs, args):
        return _measure_and_write(args, argv, started, outputs, p, device, env, selection, notes, torch_info)


def _measure_and_write(
    args: argparse.Namespace,
    argv: list[str],
    started: float,
    outputs: Outputs,
    p: Problem,
    device: Any,
    env: dict,
    selection: Any,
    notes: list,
    torch_info: dict,
) -> int:
    """`run`'s measuring and writing, under the output files' locks."""
    size = {"m": p.m, "n": p.n, "m_y": p.m_y, "device": device.platform}
    measure = _measure_profile if args.suite == "profile" else _measure_rows
    payload = report.payload(
        suite=args.suite,
        argv=argv,
        started=started,
        environment=env,
        device=devices.record(device, torch_info),
        problem=dict(p.describe(), precision=args.precision),
        notes=notes,
        **measure(args, p, device, selection, size),
    )
    if outputs.figure_name:
        payload["figure"] = outputs.figure_name
    payload["notes"] = payload["notes"] + args.note + _load_note(payload)
    print()
    print(report.tables(payload))
    if payload.get("facts"):
        print()
        print(report.facts_text(payload["facts"]))
    print()
    print(report.goals_text(payload["goals"]))
    _write(payload, outputs, pathlib.Path(args.docs_dir))
    errors = [r["name"] for r in payload["rows"] if r.get("status") == "error"]
    failed = goal_defs.failed_correctness(payload["goals"])
    if errors or failed:
        print(
            f"\nnot all checks passed: {len(errors)} row(s) failed with an error"
            + (f"; not met: {'; '.join(failed)}" if failed else "")
        )
        return EXIT_FAILED
    return EXIT_OK
