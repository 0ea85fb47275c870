"""A sweep's tables: one row per configuration and logged step, per-setting statistics across seeds, curves.

Accuracies are percentages (columns `*_accuracy_pct`), as in the figures and the summary. Missing values (a
diverged run's accuracy, a cross-entropy run's gap) are None: empty in CSV, null in JSON Lines.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments.common import io
from experiments.sweep.config import SweepConfig
from experiments.sweep.grid import Configuration
from experiments.sweep.programs import logged_steps

ROW_COLUMNS = (
    "sweep",
    "config_id",
    "group",
    "dataset",
    "width",
    "projected",
    "model",
    "depth",
    "sigma",
    "gamma",
    "loss",
    "learning_rate",
    "seed",
    "dtype",
    "formulation",
    "solver",
    "steps",
    "step",
    "final",
    "train_loss",
    "L_star",
    "gap",
    "grad_norm",
    "solver_iterations",
    "relative_residual",
    "converged",
    "train_accuracy_pct",
    "test_loss",
    "test_accuracy_pct",
    "nonconverged_steps",
    "max_relative_residual",
    "diverged",
)
"""Columns of `results.csv` / `results.jsonl`. `gap = train_loss - L_star` (square loss; empty for cross-entropy,
whose infimum may be unattained on separable data); `train_accuracy_pct`, `test_loss`, `test_accuracy_pct` are
filled on the final row only; `nonconverged_steps` and `max_relative_residual` summarise every solve of the run;
`diverged`: the final loss is not finite."""

SETTING_COLUMNS = ("dataset", "width", "projected", "model", "depth", "sigma", "gamma", "loss", "learning_rate")
AGGREGATE_COLUMNS = (
    *SETTING_COLUMNS,
    "n_seeds",
    "train_loss_mean",
    "train_loss_std",
    "train_loss_min",
    "train_loss_max",
    "gap_mean",
    "gap_std",
    "test_accuracy_pct_mean",
    "test_accuracy_pct_std",
    "test_loss_mean",
    "test_loss_std",
    "nonconverged_runs",
    "diverged_runs",
)
"""Columns of `aggregate.csv`: one row per setting (every hyperparameter except the seed), statistics of the final
step across seeds (std with ddof = 0) over the runs that did not diverge; `diverged_runs` counts the others."""


def _num(x: Any) -> float | None:
    value = float(x)
    return value if math.isfinite(value) else None


def rows_for(
    config: SweepConfig, c: Configuration, width: int, out: Mapping[str, Any], L_star: float | None
) -> list[dict]:
    """The table rows of one configuration from its outputs (`experiments.sweep.programs.train_one_fn`)."""
    delm = c.model == "delm"
    base = {
        "sweep": config.name,
        "config_id": c.config_id,
        "group": c.group.label,
        "dataset": c.dataset,
        "width": width,
        "projected": c.width is not None,
        "model": c.model,
        "depth": c.depth,
        "sigma": c.sigma,
        "gamma": c.gamma,
        "loss": c.loss,
        "learning_rate": c.learning_rate,
        "seed": c.seed,
        "dtype": config.dtype,
        "formulation": config.delm.formulation if delm else None,
        "solver": config.delm.solver if delm else None,
        "steps": config.steps,
        "L_star": L_star,
        "nonconverged_steps": int(out["nonconverged_steps"]),
        "max_relative_residual": _num(out["max_relative_residual"]),
        "diverged": not math.isfinite(float(out["final_loss"])),
    }
    empty = {"train_accuracy_pct": None, "test_loss": None, "test_accuracy_pct": None}

    def gap(loss: float | None) -> float | None:
        return None if (L_star is None or loss is None) else loss - L_star

    rows = []
    for j, step in enumerate(logged_steps(config).tolist()):
        loss = _num(out["log_loss"][j])
        rows.append(
            {
                **base,
                "step": step,
                "final": False,
                "train_loss": loss,
                "gap": gap(loss),
                "grad_norm": _num(out["log_grad_norm"][j]),
                "solver_iterations": int(out["log_iterations"][j]),
                "relative_residual": _num(out["log_relative_residual"][j]),
                "converged": bool(out["log_converged"][j]),
                **empty,
            }
        )
    loss = _num(out["final_loss"])
    accuracy = {"train_accuracy_pct": None, "test_accuracy_pct": None}
    if loss is not None:  # a diverged run's argmax of NaN predictions is no accuracy
        accuracy = {
            "train_accuracy_pct": _num(100 * out["train_accuracy"]),
            "test_accuracy_pct": _num(100 * out["test_accuracy"]),
        }
    rows.append(
        {
            **base,
            "step": config.steps,
            "final": True,
            "train_loss": loss,
            "gap": gap(loss),
            "grad_norm": _num(out["final_grad_norm"]),
            "solver_iterations": int(out["final_iterations"]),
            "relative_residual": _num(out["final_relative_residual"]),
            "converged": bool(out["final_converged"]),
            "test_loss": _num(out["test_loss"]),
            **accuracy,
        }
    )
    return [{k: row[k] for k in ROW_COLUMNS} for row in rows]


def _stats(values: list[float | None]) -> tuple[float | None, ...]:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return None, None, None, None
    return float(v.mean()), float(v.std()), float(v.min()), float(v.max())


def setting(row: Mapping) -> tuple:
    return tuple(row[k] for k in SETTING_COLUMNS)


def aggregate(rows: Sequence[Mapping]) -> list[dict]:
    """One row per setting (`SETTING_COLUMNS`): final-step statistics across seeds (`AGGREGATE_COLUMNS`)."""
    settings: dict[tuple, list[Mapping]] = {}
    for row in rows:
        if row["final"]:
            settings.setdefault(setting(row), []).append(row)
    out = []
    for key, group in settings.items():
        loss = _stats([r["train_loss"] for r in group])
        gap = _stats([r["gap"] for r in group])
        acc = _stats([r["test_accuracy_pct"] for r in group])
        test_loss = _stats([r["test_loss"] for r in group])
        out.append(
            {
                **dict(zip(SETTING_COLUMNS, key, strict=True)),
                "n_seeds": len(group),
                "train_loss_mean": loss[0],
                "train_loss_std": loss[1],
                "train_loss_min": loss[2],
                "train_loss_max": loss[3],
                "gap_mean": gap[0],
                "gap_std": gap[1],
                "test_accuracy_pct_mean": acc[0],
                "test_accuracy_pct_std": acc[1],
                "test_loss_mean": test_loss[0],
                "test_loss_std": test_loss[1],
                "nonconverged_runs": sum(r["nonconverged_steps"] > 0 for r in group),
                "diverged_runs": sum(bool(r["diverged"]) for r in group),
            }
        )
    return out


def curves(rows: Sequence[Mapping], metric: str = "gap") -> dict[tuple, dict[str, np.ndarray]]:
    """Per setting: `step`, and the `metric`'s `mean`, `std`, `min`, `max` across seeds at each logged step
    (NaN where every seed's value is missing, e.g. after divergence)."""
    per: dict[tuple, dict[int, list[float]]] = {}
    for row in rows:
        value = row[metric]
        per.setdefault(setting(row), {}).setdefault(row["step"], []).append(np.nan if value is None else value)
    out = {}
    for key, steps in per.items():
        order = sorted(steps)
        values = [np.asarray(steps[s], np.float64) for s in order]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps (diverged seeds) stay NaN
            out[key] = {
                "step": np.asarray(order),
                "mean": np.array([np.nanmean(v) for v in values]),
                "std": np.array([np.nanstd(v) for v in values]),
                "min": np.array([np.nanmin(v) for v in values]),
                "max": np.array([np.nanmax(v) for v in values]),
            }
    return out


def csv_text(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[k] is None else row[k] for k in columns])
    return buffer.getvalue()


def write_tables(rows: Sequence[Mapping], output_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """`results.csv`, `results.jsonl` and `aggregate.csv`, each written atomically."""
    files = {
        "csv": output_dir / "results.csv",
        "jsonl": output_dir / "results.jsonl",
        "aggregate": output_dir / "aggregate.csv",
    }
    io.write_text(files["csv"], csv_text(rows, ROW_COLUMNS))
    io.write_text(files["jsonl"], "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    io.write_text(files["aggregate"], csv_text(aggregate(rows), AGGREGATE_COLUMNS))
    return files


__all__ = [
    "AGGREGATE_COLUMNS",
    "ROW_COLUMNS",
    "SETTING_COLUMNS",
    "aggregate",
    "csv_text",
    "curves",
    "rows_for",
    "setting",
    "write_tables",
]
