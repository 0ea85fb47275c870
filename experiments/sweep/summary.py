"""A sweep's record: `sweep.json` (config, fingerprint, environment, chunking, memory, timing) and `summary.md`."""

from __future__ import annotations

import math
import pathlib
from typing import Any

from experiments.common import config as config_lib
from experiments.common import io
from experiments.sweep import tables
from experiments.sweep.config import fingerprint
from experiments.sweep.figures import setting_label


def write_manifest(result: Any) -> pathlib.Path:
    """`sweep.json`: the config, its fingerprint, the environment, the budget and each group's report."""
    groups = []
    for g in result.groups:
        entry = {k: v for k, v in vars(g).items() if k != "key"}
        entry["key"] = g.key._asdict()
        groups.append(entry)
    manifest = {
        "name": result.config.name,
        "fingerprint": fingerprint(result.config),
        "config": config_lib.to_dict(result.config),
        "environment": result.environment,
        "devices": result.devices,
        "budget_bytes_per_device": result.budget_bytes,
        "budget_source": result.budget_source,
        "device_batching": result.device_batching,
        "n_configurations": len(result.configurations),
        "chunks_computed": result.chunks_computed,
        "chunks_skipped": result.chunks_skipped,
        "wall_s": result.wall_s,
        "groups": groups,
    }
    path = result.output_dir / "sweep.json"
    io.write_json(path, manifest)
    return path


def _pm(mean: Any, std: Any, digits: str = ".4g") -> str:
    return "-" if mean is None else f"{mean:{digits}} +- {std:.2g}"


def _mib(nbytes: Any) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.3g} MiB"


def ranked_panels(aggregate: list[dict], top: int) -> list[tuple[tuple, str, list[dict]]]:
    """Per (data set, width, loss): the ranking key (the gap to L* for the square loss, else the training loss)
    and the `top` settings by it (diverged settings last)."""
    panels: dict[tuple, list[dict]] = {}
    for a in aggregate:
        panels.setdefault((a["dataset"], a["width"], a["loss"]), []).append(a)
    out = []
    for panel, settings in panels.items():
        key = "gap_mean" if panel[2] == "square" else "train_loss_mean"
        out.append((panel, key, sorted(settings, key=lambda a: math.inf if a[key] is None else a[key])[:top]))
    return out


def console_lines(result: Any) -> list[str]:
    """What the command prints at the end: the best setting of each panel and the failures, in a few lines."""
    lines = []
    for (dataset, width, loss), key, (best, *_) in ranked_panels(result.aggregate, 1):
        measure = "gap to L*" if key == "gap_mean" else "train loss"
        accuracy = best["test_accuracy_pct_mean"]
        lines.append(
            f"  best on {dataset}, m={width}, {loss} loss (by {measure}): {setting_label(best)}: "
            f"{measure} {_pm(best[key], best[key.replace('_mean', '_std')])}, test accuracy "
            + ("-" if accuracy is None else f"{accuracy:.2f}%")
        )
    diverged = sum(a["diverged_runs"] for a in result.aggregate)
    nonconv = sum(a["nonconverged_runs"] for a in result.aggregate)
    if diverged or nonconv:
        lines.append(
            f"  failures: {diverged} run(s) diverged, {nonconv} had non-converged solves (see summary.md, "
            f"section Failures)"
        )
    return lines


def write_summary(result: Any, files: dict[str, pathlib.Path]) -> pathlib.Path:
    """`summary.md`: what ran where, per-group chunking and memory, the best settings, failures, the files."""
    cfg, env = result.config, result.environment
    devices = env["devices"]
    run_s = sum(g.run_s for g in result.groups)
    compile_s = sum(g.compile_s for g in result.groups)
    computed = sum(g.n_configs - g.configs_skipped for g in result.groups)
    lines = [
        f"# Sweep `{cfg.name}`",
        "",
        (
            f"- {len(result.configurations)} configurations in {len(result.groups)} groups; {cfg.steps} full-batch GD "
            f"steps each, {cfg.dtype}, rows every {cfg.log_every} steps and at the end."
        ),
        (
            f"- Devices: {devices['description']}, {devices['process_count']} process(es); CPU "
            f"{env['machine']['cpu_model']}; OPENBLAS_NUM_THREADS={env['variables']['OPENBLAS_NUM_THREADS']}."
        ),
        (
            f"- Memory budget {result.budget_bytes / 2**20:.4g} MiB per device ({result.budget_source}); each device "
            f"runs its configurations by `{result.device_batching}`."
        ),
        f"- Chunks computed {result.chunks_computed}, resumed from disk {result.chunks_skipped}; compile "
        f"{compile_s:.1f} s, run {run_s:.2f} s"
        + (f" ({computed / run_s:.3g} configurations/s excluding compilation)" if run_s > 0 and computed else "")
        + f", wall {result.wall_s:.1f} s.",
        "",
        "## Groups",
        "",
        (
            "Memory per device for one chunk: the formula's estimate "
            "(`experiments.sweep.programs.estimate_config_bytes`, with its safety factor) and XLA's "
            "`memory_analysis()` of the compiled program. Groups of equal structure share compiled programs: a group "
            "that reused another's compiled none."
        ),
        "",
        (
            "| group | configs | chunk size | chunks run / resumed | estimate per device | measured per device "
            "| programs compiled | compile s | run s |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in result.groups:
        lines.append(
            f"| `{g.label}` (m={g.width}) | {g.n_configs} | {g.chunk_size or '-'} | {g.chunks_computed} / "
            f"{g.chunks_skipped} | {_mib(g.estimated_bytes_per_device)} | "
            f"{_mib(g.measured_bytes_per_device)} | {g.programs_compiled} | {g.compile_s:.1f} | "
            f"{g.run_s:.2f} |"
        )
    lines += ["", "## Best settings (final step, mean +- std across seeds)", ""]
    for (dataset, width, loss), key, ranked in ranked_panels(result.aggregate, 5):
        lines += [
            f"**{dataset}, m = {width}, {loss} loss** (ranked by {key.replace('_mean', '')}"
            + (", L* = shallow optimum" if loss == "square" else "")
            + ")",
            "",
            "| setting | seeds | train loss | gap to L* | test accuracy (%) |",
            "|---|---|---|---|---|",
        ]
        for a in ranked:
            lines.append(
                f"| {setting_label(a)} | {a['n_seeds']} | {_pm(a['train_loss_mean'], a['train_loss_std'])} "
                f"| {_pm(a['gap_mean'], a['gap_std'])} "
                f"| {_pm(a['test_accuracy_pct_mean'], a['test_accuracy_pct_std'], '.2f')} |"
            )
        lines.append("")
    nonconv = [a for a in result.aggregate if a["nonconverged_runs"]]
    diverged = [a for a in result.aggregate if a["diverged_runs"]]
    lines += ["## Failures", ""]
    if not nonconv and not diverged:
        lines.append("Every equilibrium solve reached its tolerance and every final loss is finite.")
    for a in nonconv:
        lines.append(
            f"- {a['nonconverged_runs']} of {a['n_seeds']} runs had non-converged solves: "
            f"{setting_label(a)} ({a['dataset']}, m={a['width']}, {a['loss']})"
        )
    for a in diverged:
        lines.append(
            f"- {a['diverged_runs']} of {a['n_seeds']} runs diverged (non-finite loss): {setting_label(a)} "
            f"({a['dataset']}, m={a['width']}, {a['loss']})"
        )
    if cfg.dtype == "float32":
        lines += [
            "",
            ("Gaps are float32 losses minus a float64 L*; values below about 1e-7 L* are rounding, not progress."),
        ]
    lines += ["", "## Files", ""]
    lines += [f"- {name}: `{path}`" for name, path in files.items()]
    lines.append(f"- columns of results.csv: {', '.join(tables.ROW_COLUMNS)}")
    path = result.output_dir / "summary.md"
    io.write_text(path, "\n".join(lines) + "\n")
    return path


__all__ = ["console_lines", "ranked_panels", "write_manifest", "write_summary"]
