"""What a benchmark run reports: its Markdown tables, its goal lines, and the JSON record they come from.

The same functions print a run's results and render docs/benchmarks.md from the committed JSON
(`experiments/bench/render.py`), so the docs show exactly what the command printed.
"""

from __future__ import annotations

import datetime
import json
import shlex
import time
from typing import Any

import numpy as np

from experiments.bench.training import WARM, ZERO_START
from experiments.common.env import load_average


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f}" if x < 10 else f"{x * 1e3:.0f}"


def fmt_bytes(x: int | None) -> str:
    if x is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x} B"


def fmt_e(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _converged_cell(row: dict) -> str:
    """The independent verdict; the implementation's own where it disagrees; torchdeq's backward solve's."""
    cell = "yes" if row.get("converged") else "no"
    own = row.get("converged_own")
    if own is not None and bool(own) != row.get("converged"):
        cell += f" (own: {'yes' if own else 'no'})"
    if row.get("backward_converged") is False:
        cell += " (bwd: no)"
    missed = row.get("steps_not_converged_own")
    if missed:  # a training run: steps whose solves the library itself reported as short of their tolerance
        cell += f" (own: no at {len(missed)} of {row['steps']} steps)"
    return cell


def _iterations_cell(row: dict) -> str:
    """Forward iterations (and backward ones where known); for a training run, the means over its timed steps."""
    if row.get("iterations_mean") is not None:
        cell = f"{row['iterations_mean']:.1f}"
        if row.get("backward_iterations_mean") is not None:
            cell += f" (+{row['backward_iterations_mean']:.1f} bwd)"
        return cell + " mean"
    cell = str(row["iterations"])
    if row.get("backward_iterations") is not None:
        cell += f" (+{row['backward_iterations']} bwd)"
    return cell


def _grad_cell(row: dict) -> str:
    errors = list(row["grad_error"].values())
    if not errors:
        return "- (no gradient)"
    cell = ", ".join(fmt_e(e) for e in errors[:1] + errors[-1:]) if len(errors) > 1 else fmt_e(errors[0])
    return cell + (" (approximate gradient)" if row.get("approximate_gradient") else "")


def table(rows: list[dict]) -> str:
    """A Markdown table of a suite's rows (what the command prints and docs/benchmarks.md shows)."""
    header = [
        "row",
        "min ms",
        "median ms",
        "compile",
        "iters",
        "converged",
        "rel. residual",
        "grad err (1st, 2nd)",
        "vs direct",
        "XLA temp",
        "RSS peak +",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        name = row["name"]
        if row["status"] != "ok":
            reason = row.get("error") or row.get("note")
            lines.append(f"| {name} | {row['status']}: {reason} |" + " |" * (len(header) - 2))
            continue
        vs = row.get("grad_error_vs_direct_f32")
        cells = [
            name,
            fmt_ms(row["min_s"]),
            fmt_ms(row["median_s"]),
            fmt_s(row.get("compile_s")),
            _iterations_cell(row),
            _converged_cell(row),
            fmt_e(row["relative_residual"]),
            _grad_cell(row),
            fmt_e(max(vs.values())) if vs else "-",
            fmt_bytes(row.get("temp_bytes")),
            fmt_bytes(row.get("device_peak_bytes") or row.get("rss_peak_delta_bytes")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired(a: dict | None, b: dict | None) -> str:
    """`a`'s time over `b`'s, the median over the timing rounds (both ran back to back in each round)."""
    if a is None or b is None or not a.get("times_s") or not b.get("times_s"):
        return "-"
    k = min(len(a["times_s"]), len(b["times_s"]))
    return f"{float(np.median(np.asarray(a['times_s'][:k]) / np.asarray(b['times_s'][:k]))):.2f}"


def training_table(rows: list[dict]) -> str:
    """The training-run rows side by side: iterations per step with and without warm starts, LU refactorisations,
    time against the same step from zero and against the bare LU factorisation, the two independent checks."""

    runs = [r for r in rows if r.get("label") in (WARM, ZERO_START)]
    if not runs:
        return ""
    ok = lambda r: r.get("status") == "ok"
    lu = next((r for r in rows if r.get("solver") == "lu_factor" and ok(r)), None)
    mean = lambda r, key: "-" if r.get(key) is None else f"{r[key]:.1f}"
    twin = lambda r: next(
        (
            z
            for z in runs
            if z["label"] == ZERO_START and ok(z) and (z["formulation"], z["solver"]) == (r["formulation"], r["solver"])
        ),
        None,
    )
    header = [
        "training run (consecutive steps of TrainStep.update)",
        "steps (timed)",
        ("iterations per timed step: forward + backward"),
        "LU refactorisations (timed)",
        "min ms",
        "median ms",
        "compile",
        "zero start / warm, paired",
        "/ bare LU, paired",
        "independent checks: residual before, after",
        "grad err before, after (max)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in runs:
        if not ok(r):
            reason = r.get("error") or r.get("note")
            lines.append(f"| {r['name']} | {r['status']}: {reason} |" + " |" * (len(header) - 2))
            continue
        refactor = (
            "-" if r.get("refactorisations") is None else f"{r['refactorisations']} ({r['refactorisations_timed']})"
        )
        after = r.get("check_after_timing", {})
        error = lambda e: fmt_e(max(e.values())) if e else "-"
        checks = f"{fmt_e(r['relative_residual'])}, {fmt_e(after.get('relative_residual'))}" + (
            "" if r.get("converged") else " (NOT converged)"
        )
        speedup = _paired(twin(r), r) if r["label"] == WARM else "-"
        cells = [
            r["name"],
            f"{r['steps']} ({len(r['times_s'])})",
            f"{mean(r, 'iterations_mean')} + {mean(r, 'backward_iterations_mean')}",
            refactor,
            fmt_ms(r["min_s"]),
            fmt_ms(r["median_s"]),
            fmt_s(r.get("compile_s")),
            speedup,
            _paired(r, lu) if r["formulation"] == "transposed" else "-",
            checks,
            f"{error(r['grad_error'])}, {error(after.get('grad_error'))}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals_text(verdicts: list[dict]) -> str:
    """One line per goal: `- [met|NOT met|not applicable at this size|not measured] goal: value`."""
    return "\n".join(f"- [{v['status']}] {v['goal']}: {v['value']}" for v in verdicts)


def profile_table(rows: list[dict]) -> str:
    lines = ["| component / step | min ms | median ms | GFLOP/s at min |", "|---|---|---|---|"]
    for row in rows:
        rate = "-" if row.get("gflops_at_min") is None else f"{row['gflops_at_min']:.1f}"
        lines.append(f"| {row['name']} | {row['min_s'] * 1e3:.2f} | {row['median_s'] * 1e3:.2f} | {rate} |")
    return "\n".join(lines)


def backward_table(rows: list[dict]) -> str:
    lines = [
        "| per-sample backward linear solve | min ms | matrix-vector products | relative residual |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['min_s'] * 1e3:.0f} | {r['products']} | {r['relative_residual']:.1e} |")
    return "\n".join(lines)


def facts_text(facts: dict) -> str:
    """The profile's facts about the compiled steps (LU factorisations, solves, loops), as JSON."""
    return json.dumps(jsonable(facts), indent=1)


def tables(payload: dict) -> str:
    """Every table of a payload (one for the step suites; components and backward solves for the profile)."""
    if payload["suite"] != "profile":
        training = training_table(payload["rows"])
        return table(payload["rows"]) + (f"\n\n{training}" if training else "")
    parts = [profile_table(payload["rows"])] if payload["rows"] else []
    if payload.get("backward_solvers"):
        parts.append(backward_table(payload["backward_solvers"]))
    return "\n\n".join(parts)


def command(argv: list[str]) -> str:
    """The command line of a run, as a user types it from the repository root."""
    return shlex.join([".venv/bin/python", "-m", "experiments", "bench", *argv])


def jsonable(obj: Any) -> Any:
    """`obj` with numpy scalars and arrays turned into Python numbers and lists."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def payload(
    *,
    suite: str,
    argv: list[str],
    started: float,
    environment: dict,
    device: dict,
    problem: dict,
    settings: dict,
    notes: list[str],
    goals: list[dict],
    rows: list[dict],
    **extra: Any,
) -> dict:
    """The JSON record of one run: what ran, where, on what, and every row's measurements."""

    device = dict(device, load_average_after=load_average())
    return jsonable(
        {
            "suite": suite,
            "command": command(argv),
            "argv": list(argv),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "wall_s": time.time() - started,
            "environment": environment,
            "device": device,
            "problem": problem,
            "settings": settings,
            "notes": notes,
            "goals": goals,
            "rows": rows,
            **extra,
        }
    )
