"""A sweep's figures, one per (data set, width, loss): training curves and final test accuracy per setting.

Drawn for a reader: every setting of the grid appears in both panels (a diverged one as a red cross and the word
"diverged", never as a missing line or an empty bar); the curves' axis spans the settings that did not diverge (a
diverged curve is cut where it leaves it, its cross at the edge); accuracies are percentages on an axis zoomed to
the data (dots with error bars, not bars that would need a zero baseline); the legend lists only drawn lines and
sits below the curves, not over them; no text below 9 pt.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments.common import io
from experiments.sweep import tables

MIN_FONT_PT = 9
DIVERGED_COLOR = "tab:red"
_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 11,
}


def setting_label(setting: Mapping) -> str:
    parts = [setting["model"]]
    if setting.get("depth") is not None:
        parts.append(f"H={setting['depth']}")
    if setting.get("sigma") is not None:
        parts.append(setting["sigma"])
    if setting.get("gamma") is not None:
        parts.append(f"gamma={setting['gamma']:g}")
    parts.append(f"lr={setting['learning_rate']:g}")
    return " ".join(parts)


def _accuracy_limits(lows: Sequence[float], highs: Sequence[float]) -> tuple[float, float]:
    """An accuracy axis (percent) around the data: the spread plus 10% margin each side (at least 1 point),
    within [0, 100]."""
    lo, hi = min(lows), max(highs)
    margin = max(1.0, 0.1 * (hi - lo))
    return max(0.0, lo - margin), min(100.0, hi + margin)


def make_figure(rows: Sequence[Mapping]) -> Any:
    """The figure of one panel's rows (one data set, width and loss); returns the matplotlib Figure."""
    import matplotlib  # here, not at start-up: ~0.5 s that a sweep with --no-figures never needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = rows[0]
    metric = "gap" if first["loss"] == "square" else "train_loss"
    curves = tables.curves(rows, metric)
    finals = tables.aggregate(rows)
    n = len(finals)
    with plt.rc_context(_STYLE):
        legend_rows = -(-n // 2)  # the legend below the curves, two columns
        fig, (ax_curve, ax_final) = plt.subplots(
            1, 2, figsize=(14, max(5.0, 1.5 + 0.34 * n, 4.2 + 0.24 * legend_rows)), gridspec_kw={"width_ratios": [3, 2]}
        )
        colors = plt.cm.tab10(np.arange(10)) if n <= 10 else plt.cm.tab20(np.linspace(0, 1, 20))
        # a log axis: gaps at or below 0 are rounding (float32 against a float64 L*), not progress
        ax_curve.set_yscale("log")
        series = []
        for i, (setting, c) in enumerate(curves.items()):
            agg = next(a for a in finals if tables.setting(a) == setting)
            positive = lambda x: np.where(x > 0, x, np.nan)
            series.append((i, agg, c["step"], positive(c["mean"]), positive(c["min"]), positive(c["max"])))
        # the axis spans the settings that did not diverge (one decade of headroom): a diverged curve, which may
        # climb to 1e20, leaves it at the top edge, its cross drawn there, instead of squeezing the others flat
        healthy = [
            np.nanmax(hi) for _, agg, _, mean, _, hi in series if not agg["diverged_runs"] and np.isfinite(hi).any()
        ]
        top = 10 * max(healthy) if healthy else np.inf
        cut = False
        for i, agg, steps, mean, low, high in series:
            label = setting_label(agg)
            if agg["diverged_runs"]:
                label += f" (diverged: {agg['diverged_runs']}/{agg['n_seeds']} seeds)"
            finite = np.flatnonzero(np.isfinite(mean))
            if not finite.size:
                continue  # diverged before the first logged step: named in a note below
            color = colors[i % len(colors)]
            style = ("-", "--", ":")[(i // len(colors)) % 3]
            marks = {}
            x, y, y_low, y_high = steps, mean, low, high  # what is drawn
            if agg["diverged_runs"]:
                # the line ends in a red cross: where its last seed still had a finite loss, or where it left the
                # axis; the cross is part of the line, so the legend entry shows it too
                above = np.flatnonzero(mean > top)
                if above.size:
                    k = int(above[0])
                    x, y = steps[: k + 1], np.append(mean[:k], top)
                    y_low, y_high = low[: k + 1], np.minimum(high[: k + 1], top)
                    cut = True
                    end = k
                else:
                    end = int(finite[-1])
                marks = dict(marker="x", markevery=[end], ms=9, mew=2, mec=DIVERGED_COLOR, clip_on=False)
            ax_curve.plot(x, y, label=label, lw=1.4, color=color, linestyle=style, **marks)
            ax_curve.fill_between(x, y_low, y_high, color=color, alpha=0.15, lw=0)
        if cut:
            ax_curve.set_ylim(top=top)
        diverged_at_once = [
            a
            for a in finals
            if a["diverged_runs"] == a["n_seeds"]
            and not np.isfinite(
                np.where(curves[tables.setting(a)]["mean"] > 0, curves[tables.setting(a)]["mean"], np.nan)
            ).any()
        ]
        ax_curve.set_xlabel("full-batch GD step")
        ax_curve.set_ylabel("L - L* (train)" if metric == "gap" else "train loss")
        ax_curve.set_title(
            f"{first['dataset']}, m={first['width']}{' (projected)' if first['projected'] else ''}, "
            f"{first['loss']} loss: mean over seeds, band min..max"
        )
        if any(not line.get_label().startswith("_") for line in ax_curve.get_lines()):
            title = (
                "x: diverged (its last finite loss" + (", or where it leaves the axis" if cut else "") + ")"
                if any(a["diverged_runs"] for a in finals)
                else None
            )
            ax_curve.legend(
                loc="upper center",
                bbox_to_anchor=(0.5, -0.13),
                ncol=2,
                frameon=False,
                title=title,
                title_fontsize=MIN_FONT_PT,
            )
        if diverged_at_once:
            names = "; ".join(setting_label(a) for a in diverged_at_once)
            ax_curve.text(
                0.01,
                0.01,
                f"diverged before the first logged step: {names}",
                transform=ax_curve.transAxes,
                color=DIVERGED_COLOR,
                fontsize=MIN_FONT_PT,
                va="bottom",
                wrap=True,
            )

        labels = [setting_label(a) for a in finals]
        means = [a["test_accuracy_pct_mean"] for a in finals]
        stds = [a["test_accuracy_pct_std"] or 0.0 for a in finals]
        drawn = [i for i, m in enumerate(means) if m is not None]
        if drawn:
            lo, hi = _accuracy_limits([means[i] - stds[i] for i in drawn], [means[i] + stds[i] for i in drawn])
        else:
            lo, hi = 0.0, 100.0
        ax_final.set_xlim(lo, hi)
        for i, a in enumerate(finals):
            if means[i] is not None:
                ax_final.errorbar(means[i], i, xerr=stds[i], fmt="o", color="tab:blue", ms=5, capsize=3)
            if a["diverged_runs"]:
                x = lo + 0.02 * (hi - lo) if means[i] is None else means[i]
                ax_final.plot(x, i, "x", color=DIVERGED_COLOR, ms=9, mew=2)
                ax_final.annotate(
                    f"diverged: {a['diverged_runs']}/{a['n_seeds']} seeds",
                    (x, i),
                    xytext=(8, 0),
                    textcoords="offset points",
                    va="center",
                    color=DIVERGED_COLOR,
                    fontsize=MIN_FONT_PT,
                )
        ax_final.set_yticks(range(n), labels)
        ax_final.set_ylim(n - 0.5, -0.5)
        ax_final.set_xlabel("final test accuracy (%), mean +- std over seeds")
        ax_final.grid(axis="x", alpha=0.3)
        fig.tight_layout()
    return fig


def write_figures(rows: Sequence[Mapping], directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """One PNG per (data set, width, loss), written atomically; returns their paths by name."""
    import matplotlib.pyplot as plt  # with the figures only (see `make_figure`)

    panels: dict[tuple, list[Mapping]] = {}
    for row in rows:
        panels.setdefault((row["dataset"], row["width"], row["projected"], row["loss"]), []).append(row)
    files = {}
    for (dataset, width, projected, loss), panel_rows in panels.items():
        stem = f"{dataset}_m{width}{'p' if projected else ''}_{loss}"
        fig = make_figure(panel_rows)
        path = directory / f"{stem}.png"
        io.save_figure(fig, path, dpi=120, bbox_inches="tight")  # the legend below the axes included
        plt.close(fig)
        files[f"figure {stem}"] = path
    return files


__all__ = ["MIN_FONT_PT", "make_figure", "setting_label", "write_figures"]
