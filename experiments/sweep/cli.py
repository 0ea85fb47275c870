"""`python -m experiments sweep --config configs/sweep_digits.yaml`: a hyperparameter grid as compiled, vmapped,
sharded programs (`experiments.sweep.engine`), then figures and a markdown summary.

Writes into the output directory (default `results/sweeps/<name>`): `results.csv`, `results.jsonl`,
`aggregate.csv` (from the library), `figures/*.png` (mean and spread across seeds per setting), `summary.md` and
`sweep.json` (the validated config, the environment, per-group chunking, memory and timing). Finished chunks are
kept in `chunks/`; running the same command again resumes, `--fresh` starts over.

Several hosts: start the same command on every host with `--distributed` (or `DEQ_JAX_DISTRIBUTED=1`), which
calls `jax.distributed.initialize()` first (coordinator from the cluster environment or
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); the mesh then spans every host's devices and
only process 0 writes files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
from typing import Any, Optional, Sequence

TRUTHY = ("1", "true", "yes", "on")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="sweep YAML (see configs/sweep_*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set steps=50 --set grid.seeds=[0,1] (repeatable)")
    p.add_argument("--output-dir", default=None, help="default: the config's output_dir or results/sweeps/<name>")
    p.add_argument("--fresh", action="store_true", help="delete saved chunks instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (several hosts); also DEQ_JAX_DISTRIBUTED=1")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a sweep from a YAML config; 0 on success, 2 on invalid input (message on stderr)."""
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help, or a usage error (argparse has printed it)
        return int(exit_.code or 0)
    import jax

    if args.distributed or os.environ.get("DEQ_JAX_DISTRIBUTED", "").lower() in TRUTHY:
        jax.distributed.initialize()  # must precede any other JAX call: devices become global

    from experiments.sweep import engine as sweep
    from experiments.common.config import ConfigError

    try:
        config = sweep.load_config(args.config, args.overrides)
        result = sweep.run_sweep(config, output_dir=args.output_dir, resume=not args.fresh,
                                 progress=not args.no_progress)
    except (ConfigError, sweep.SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if jax.process_index() != 0:
        return 0
    files = dict(result.files)
    if not args.no_figures:
        files.update(write_figures(result.rows, result.output_dir / "figures"))
    files["manifest"] = write_manifest(result)
    files["summary"] = write_summary(result, files)
    print(f"sweep {config.name}: {len(result.configurations)} configurations in {len(result.groups)} groups, "
          f"{result.chunks_computed} chunks computed, {result.chunks_skipped} resumed, {result.wall_s:.1f} s")
    for name, path in files.items():
        print(f"  {name}: {path}")
    return 0


# ----------------------------------------------------------------------------- files

def _atomic_write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def write_manifest(result: Any) -> pathlib.Path:
    """`sweep.json`: the config, its fingerprint, the environment, the budget and each group's report."""
    from experiments.common import config as config_lib
    from experiments.sweep import engine as sweep

    groups = []
    for g in result.groups:
        entry = {k: v for k, v in vars(g).items() if k != "key"}
        entry["key"] = g.key._asdict()
        groups.append(entry)
    manifest = {
        "name": result.config.name, "fingerprint": sweep.fingerprint(result.config),
        "config": config_lib.to_dict(result.config), "environment": result.environment,
        "devices": result.devices, "budget_bytes_per_device": result.budget_bytes,
        "budget_source": result.budget_source, "device_batching": result.device_batching,
        "n_configurations": len(result.configurations),
        "chunks_computed": result.chunks_computed, "chunks_skipped": result.chunks_skipped,
        "wall_s": result.wall_s, "groups": groups,
    }
    return _atomic_write(result.output_dir / "sweep.json", json.dumps(manifest, indent=2) + "\n")


def _setting_label(setting: dict) -> str:
    parts = [setting["model"]]
    if setting["depth"] is not None:
        parts.append(f"H={setting['depth']}")
    if setting["sigma"] is not None:
        parts.append(setting["sigma"])
    if setting["gamma"] is not None:
        parts.append(f"gamma={setting['gamma']:g}")
    parts.append(f"lr={setting['learning_rate']:g}")
    return " ".join(parts)


def write_figures(rows: Sequence[dict], directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """Per (dataset, width, loss): the training curves (gap to L* for the square loss, else the loss; mean across
    seeds, band = min..max) and the final test accuracy (mean +- std across seeds), one line/bar per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from experiments.sweep import engine as sweep

    directory.mkdir(parents=True, exist_ok=True)
    panels: dict[tuple, list[dict]] = {}
    for row in rows:
        panels.setdefault((row["dataset"], row["width"], row["projected"], row["loss"]), []).append(row)
    files = {}
    for (dataset, width, projected, loss), panel_rows in panels.items():
        stem = f"{dataset}_m{width}{'p' if projected else ''}_{loss}"
        metric = "gap" if loss == "square" else "train_loss"
        fig, (ax_curve, ax_final) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
        curves = sweep.curves(panel_rows, metric)
        finals = sweep.aggregate(panel_rows)
        colors = plt.cm.tab20(np.linspace(0, 1, 20))
        for i, (setting, c) in enumerate(curves.items()):
            label = _setting_label(dict(zip(sweep.SETTING_COLUMNS, setting)))
            positive = lambda a: [v if v > 0 else math.nan for v in a]  # log axis: gaps at/below 0 are rounding
            (line,) = ax_curve.plot(c["step"], positive(c["mean"]), label=label, lw=1.3, color=colors[i % 20],
                                    linestyle=("-", "--", ":")[(i // 20) % 3])
            ax_curve.fill_between(c["step"], positive(c["min"]), positive(c["max"]), color=line.get_color(),
                                  alpha=0.15, lw=0)
        ax_curve.set_yscale("log")
        ax_curve.set_xlabel("full-batch GD step")
        ax_curve.set_ylabel("L - L* (train)" if metric == "gap" else "train loss")
        ax_curve.set_title(f"{dataset}, m={width}{' (projected)' if projected else ''}, {loss} loss: "
                           f"mean over seeds, band min..max", fontsize=9)
        if len(curves) <= 16:
            ax_curve.legend(fontsize=6, loc="best")
        labels = [_setting_label(a) for a in finals]
        means = [a["test_accuracy_mean"] if a["test_accuracy_mean"] is not None else math.nan for a in finals]
        stds = [a["test_accuracy_std"] if a["test_accuracy_std"] is not None else 0.0 for a in finals]
        ax_final.barh(range(len(finals)), means, xerr=stds, color="tab:blue", alpha=0.7)
        ax_final.set_yticks(range(len(finals)), labels, fontsize=6 if len(finals) <= 30 else 4)
        ax_final.set_xlabel("final test accuracy (mean +- std over seeds)")
        ax_final.invert_yaxis()
        fig.tight_layout()
        path = directory / f"{stem}.png"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120)
        os.replace(tmp, path)
        plt.close(fig)
        files[f"figure {stem}"] = path
    return files


def _pm(mean: Any, std: Any) -> str:
    return "-" if mean is None else f"{mean:.4g} +- {std:.2g}"


def write_summary(result: Any, files: dict[str, pathlib.Path]) -> pathlib.Path:
    """`summary.md`: what ran where, per-group chunking and memory, the best settings, failures, the files."""
    from experiments.sweep import engine as sweep

    cfg, env = result.config, result.environment
    n_cfg = len(result.configurations)
    run_s = sum(g.run_s for g in result.groups)
    compile_s = sum(g.compile_s for g in result.groups)
    computed = sum(g.n_configs - g.configs_skipped for g in result.groups)
    lines = [
        f"# Sweep `{cfg.name}`", "",
        f"- {n_cfg} configurations in {len(result.groups)} compiled groups; {cfg.steps} full-batch GD steps each, "
        f"{cfg.dtype}, rows every {cfg.log_every} steps and at the end.",
        f"- Devices: {env['device_count']} x {env['device_kind']} ({env['platform']}), {env['process_count']} "
        f"process(es); CPU {env['cpu']}; jax {env['jax']}, jaxlib {env['jaxlib']}, Python {env['python']}; "
        f"OPENBLAS_NUM_THREADS={env['OPENBLAS_NUM_THREADS']}.",
        f"- Memory budget {result.budget_bytes / 2**20:.4g} MiB per device ({result.budget_source}); each device "
        f"runs its configurations by `{result.device_batching}`.",
        f"- Chunks computed {result.chunks_computed}, resumed from disk {result.chunks_skipped}; compile "
        f"{compile_s:.1f} s, run {run_s:.2f} s"
        + (f" ({computed / run_s:.3g} configurations/s excluding compilation)" if run_s > 0 and computed else "")
        + f", wall {result.wall_s:.1f} s.", "",
        "## Groups (one compiled program each)", "",
        "Memory per device for one chunk: the formula's estimate (`experiments.sweep.engine.estimate_config_bytes`, with its "
        "safety factor) and XLA's `memory_analysis()` of the compiled program.", "",
        "| group | configs | chunk size | chunks run / resumed | estimate per device | measured per device "
        "| compile s | run s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in result.groups:
        measured = "-" if g.measured_bytes_per_device is None else f"{g.measured_bytes_per_device / 2**20:.3g} MiB"
        lines.append(f"| `{g.label}` (m={g.width}) | {g.n_configs} | {g.chunk_size} | {g.chunks_computed} / "
                     f"{g.chunks_skipped} | {g.estimated_bytes_per_device / 2**20:.3g} MiB | {measured} | "
                     f"{g.compile_s:.1f} | {g.run_s:.2f} |")
    lines += ["", "## Best settings (final step, mean +- std across seeds)", ""]
    panels: dict[tuple, list[dict]] = {}
    for a in result.aggregate:
        panels.setdefault((a["dataset"], a["width"], a["loss"]), []).append(a)
    for (dataset, width, loss), settings in panels.items():
        key = "gap_mean" if loss == "square" else "train_loss_mean"
        ranked = sorted(settings, key=lambda a: math.inf if a[key] is None else a[key])[:5]
        lines += [f"**{dataset}, m = {width}, {loss} loss** (ranked by {key.replace('_mean', '')}"
                  + (", L* = shallow optimum" if loss == "square" else "") + ")", "",
                  "| setting | seeds | train loss | gap to L* | test accuracy |", "|---|---|---|---|---|"]
        for a in ranked:
            lines.append(f"| {_setting_label(a)} | {a['n_seeds']} | {_pm(a['train_loss_mean'], a['train_loss_std'])} "
                         f"| {_pm(a['gap_mean'], a['gap_std'])} "
                         f"| {_pm(a['test_accuracy_mean'], a['test_accuracy_std'])} |")
        lines.append("")
    nonconv = [a for a in result.aggregate if a["nonconverged_runs"]]
    diverged = [a for a in result.aggregate if a["diverged_runs"]]
    lines += ["## Failures", ""]
    if not nonconv and not diverged:
        lines.append("Every equilibrium solve reached its tolerance and every final loss is finite.")
    for a in nonconv:
        lines.append(f"- {a['nonconverged_runs']} of {a['n_seeds']} runs had non-converged solves: {_setting_label(a)} "
                     f"({a['dataset']}, m={a['width']}, {a['loss']})")
    for a in diverged:
        lines.append(f"- {a['diverged_runs']} of {a['n_seeds']} runs diverged (non-finite loss): {_setting_label(a)} "
                     f"({a['dataset']}, m={a['width']}, {a['loss']})")
    lines += ["", "Gaps are float32 losses minus a float64 L*; values below about 1e-7 L* are rounding, not "
              "progress." if cfg.dtype == "float32" else "", "", "## Files", ""]
    lines += [f"- {name}: `{path}`" for name, path in files.items()]
    lines.append(f"- columns of results.csv: {', '.join(sweep.ROW_COLUMNS)}")
    return _atomic_write(result.output_dir / "summary.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
