"""The implicit-bias experiment with error bars: many seeds, several `(data set, n, m)` settings with `n < m`.

    OPENBLAS_NUM_THREADS=1 python -m experiments.reproduce.bias_study --config configs/implicit_bias_study.yaml

Each setting is the main job's experiment 3 (`experiments.reproduce.implicit_bias`, unchanged: its runs, its
matched-loss stop, its claims) on the reproduce config it names, with `implicit_bias.n_train`, `pca_dim` and `seeds`
replaced. Per setting and model: the mean over seeds of the test accuracy (whole test split), the test square loss
and the distance from the minimum-norm interpolant, each with its 95% t-interval; and the paired comparison of the
DELM with the linear model, seed by seed (the same training samples): paired t-test and Wilcoxon signed-rank
p-values, and whether the difference is significant at the 5% level, in words. Nothing is tuned to the outcome: the
numbers are reported as measured.

Writes `<out>/<name>/study.json`, `study.md` (the table and the sentences) and the figure (`figure`, default
`<out>/<name>/implicit_bias_ci.png`): per setting, each model's mean with its 95% interval and the seeds as dots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from experiments.common.config import from_dict, load_yaml
from experiments.common.io import NullStore, save_figure, write_text
from experiments.reproduce import implicit_bias
from experiments.reproduce.common import Context, load_dataset, make_features
from experiments.reproduce.config import load_config
from experiments.reproduce.report import mean_ci, table


@dataclasses.dataclass(frozen=True)
class StudySetting:
    """One setting: the reproduce config whose data and implicit-bias section it uses, and what it changes there."""

    config: str
    n_train: int
    pca_dim: int
    label: str | None = None

    def __post_init__(self):
        if self.n_train < 2 or self.pca_dim < 1:
            raise ValueError(f"n_train must be >= 2 and pca_dim >= 1; got {self.n_train!r}, {self.pca_dim!r}")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    name: str = "implicit_bias_study"
    seeds: tuple[int, ...] = tuple(range(10))
    settings: tuple[StudySetting, ...] = ()
    figure: str | None = None

    def __post_init__(self):
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must list at least two distinct seeds; got {list(self.seeds)}")
        if not self.settings:
            raise ValueError("settings must list at least one setting")


METRICS = (
    ("test_accuracy", "test accuracy (%)", True),
    ("test_loss", "test square loss", False),
    ("distance_to_min_norm", "|W - W_mn|/|W_mn|", False),
)


def run_setting(s: StudySetting, seeds: Sequence[int], log) -> dict:
    cfg = load_config(
        s.config,
        [
            f"implicit_bias.n_train={s.n_train}",
            f"implicit_bias.pca_dim={s.pca_dim}",
            f"implicit_bias.seeds={list(seeds)}",
            "implicit_bias.enabled=true",
            "convergence.enabled=false",
            "trust_region.enabled=false",
        ],
    )
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data)
    feats = make_features(ds, cfg.data)
    ctx = Context(dataset=ds, features=feats, store=NullStore(), progress=False, log=log, data_config=cfg.data)
    p = implicit_bias.plan(cfg, ctx)
    implicit_bias.prepare(cfg, ctx, p)
    result = implicit_bias.run(cfg, ctx, p)
    label = s.label or f"{cfg.data.key}, n={result.n_train}, m={result.width}"
    per_seed = {
        model: {
            "test_accuracy": [r.test["accuracy"] for r in result.runs if r.model == model],
            "test_loss": [r.test["square_loss"] for r in result.runs if r.model == model],
            "distance_to_min_norm": [r.distance_to_min_norm for r in result.runs if r.model == model],
        }
        for model in dict.fromkeys(r.model for r in result.runs)
    }
    per_seed["min-norm solution"] = {
        "test_accuracy": [r.test["accuracy"] for r in result.references],
        "test_loss": [r.test["square_loss"] for r in result.references],
        "distance_to_min_norm": [0.0 for _ in result.references],
    }
    return {
        "label": label,
        "dataset": cfg.data.key,
        "n_train": result.n_train,
        "width": result.width,
        "n_test": int(feats.phi_test.shape[0]),
        "seeds": list(seeds),
        "table": result.table,
        "per_seed": per_seed,
        "claims": [c.as_dict() for c in result.claims],
        "seconds": time.perf_counter() - t0,
        "load_average": list(os.getloadavg()),
    }


def markdown(settings: list[dict]) -> str:
    parts = []
    for s in settings:
        rows = [
            [r["model"], *(mean_ci(r[key], 3, percent=pct) for key, _, pct in METRICS)]
            for r in s["table"]
            if r["model"] != "DELM - linear (paired by seed)"
        ]
        paired = next(r for r in s["table"] if r["model"] == "DELM - linear (paired by seed)")
        rows.append(
            [
                "DELM - linear (paired)",
                *(f"{mean_ci(paired[key], 3, percent=pct)}, p = {paired[key]['p_t']:.2g}" for key, _, pct in METRICS),
            ]
        )
        failed = [c["name"] for c in s["claims"] if not c["passed"]]
        parts += [
            f"**{s['label']}** ({len(s['seeds'])} seeds, test on all {s['n_test']} test samples; "
            f"{s['seconds']:.0f} s at load average {s['load_average'][0]:.1f}; experiment 3's claims: "
            + ("all passed" if not failed else "FAILED: " + "; ".join(failed))
            + ")",
            "",
            table(["model", *(name for _, name, _ in METRICS)], rows),
            "",
            *(
                "- " + implicit_bias.paired_words(name.split(" (")[0], paired[key], percent=pct)
                for key, name, pct in METRICS
            ),
            "",
        ]
    return "\n".join(parts)


def figure(settings: list[dict], path: pathlib.Path) -> None:
    from experiments.reproduce.figures import _plt

    plt = _plt()
    fig, axes = plt.subplots(len(METRICS), len(settings), figsize=(4.2 * len(settings), 3.4 * len(METRICS)))
    axes = np.atleast_2d(axes).reshape(len(METRICS), len(settings))
    rng = np.random.default_rng(0)  # jitter of the dots only
    for j, s in enumerate(settings):
        models = list(s["per_seed"])
        for i, (key, name, pct) in enumerate(METRICS):
            ax = axes[i, j]
            k = 100.0 if pct else 1.0
            for x, model in enumerate(models):
                vals = k * np.asarray(s["per_seed"][model][key])
                row = next((r for r in s["table"] if r["model"].startswith(model)), None)
                st = row[key] if row is not None else None
                if st is not None and math.isfinite(st["ci_lo"]):
                    mean, lo, hi = k * st["mean"], k * st["ci_lo"], k * st["ci_hi"]
                    ax.errorbar(x, mean, yerr=[[mean - lo], [hi - mean]], fmt="s", color=f"C{x}", capsize=5, ms=6)
                ax.plot(x + rng.uniform(-0.2, 0.2, vals.size), vals, "o", color="k", ms=2.5, alpha=0.6)
            ax.set_xticks(range(len(models)))
            ax.set_xticklabels(models, rotation=25, ha="right", rotation_mode="anchor", fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
            if i == 0:
                ax.set_title(s["label"], fontsize=10)
            if j == 0:
                ax.set_ylabel(name)
    fig.suptitle("Implicit bias at matched training loss: mean and 95% t-interval over seeds (dots: seeds)")
    fig.tight_layout()
    save_figure(fig, path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.reproduce.bias_study", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", default="results")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    cfg = from_dict(StudyConfig, load_yaml(args.config), overrides=args.overrides)
    out = pathlib.Path(args.out) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    settings = []
    for s in cfg.settings:
        log(f"bias_study: {s.config} n={s.n_train} pca_dim={s.pca_dim}, {len(cfg.seeds)} seeds")
        settings.append(run_setting(s, cfg.seeds, log))
    write_text(out / "study.json", json.dumps({"settings": settings}, indent=1, default=float) + "\n")
    write_text(out / "study.md", markdown(settings) + "\n")
    figure(settings, pathlib.Path(cfg.figure) if cfg.figure else out / "implicit_bias_ci.png")
    print(markdown(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
