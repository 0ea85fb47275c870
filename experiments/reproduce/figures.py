"""The main job's figures (matplotlib, Agg), drawn from the experiments' typed results; written atomically.

Conventions: every drawn series has a legend entry and nothing else has one; legends sit outside the data (below
each panel) so that no entry hides under a line; iterative (approximate to a tolerance) methods say so in their
label; accuracy is in percent.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from experiments.common.io import save_figure

FONT = {
    "font.size": 11,
    "axes.titlesize": 11,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
}


#: a fixed title position: matplotlib's automatic one measures every tick label of every axis (half the drawing time)
TITLE_Y = 1.01


def _plt():
    import matplotlib  # here, not at start-up: ~0.5 s that a run without figures (--dry-run, errors) never needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(FONT)
    return plt


def _log_y(ax) -> None:
    """A log y axis labelled in plain text ("1e-06", "0.02"): matplotlib's default mathtext labels ("10^{-6}") are
    parsed by pyparsing at every draw, most of the figures' drawing time. Minor ticks are labelled where the axis
    spans few decades (as by default)."""
    from matplotlib import ticker  # with the figures only (see `_plt`)

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.LogFormatter())
    ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))


def _positive(x: Any) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, x, np.nan)


def _legend_below(ax, ncol: int = 1) -> None:
    handles, _labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.16), ncol=ncol, frameon=False)


def convergence(groups: list, loss: str, path: pathlib.Path) -> None:
    plt = _plt()
    groups = [g for g in groups if g.loss == loss]
    fig, axes = plt.subplots(
        2,
        len(groups),
        figsize=(6.8 * len(groups), 11.5),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 2], "hspace": 0.75},
    )
    for j, g in enumerate(groups):
        ax, bx = axes[0, j], axes[1, j]
        markers = iter([("o", 8), ("x", 6), ("s", 4), ("^", 4)])
        for i, r in enumerate(g.runs):
            color = f"C{i}"
            steps = np.arange(len(r.normalised_gap))
            if r.role == "variant":  # iterative: markers at the logged steps over the exact line (distinct shapes)
                ls = r.logged_steps[r.logged_steps < len(r.normalised_gap)]
                marker, size = next(markers)
                ax.plot(
                    ls,
                    _positive(r.normalised_gap[ls]),
                    marker,
                    color=color,
                    ms=size,
                    mfc="none",
                    mew=1.4,
                    label=f"{r.label} (iterative, tol-limited; at logged steps)",
                )
                continue
            ax.plot(
                steps,
                _positive(r.normalised_gap),
                color=color,
                lw=1.8 if r.is_delm else 1.2,
                zorder=4 if r.is_delm else 2,  # the DELM on top where a baseline's line coincides with it
                label=f"{r.label} (exact solve)" if r.role == "reference" else r.label,
            )
            if r.role == "reference" and r.bound is not None:
                ax.plot(
                    steps,
                    _positive(r.bound.cumulative_bound),
                    color=color,
                    ls="--",
                    lw=1.0,
                    label="DELM bound from its own |U_t|_2",
                )
                if r.fit is not None:
                    i0, i1 = r.fit["window"]
                    t = np.arange(i0, i1)
                    ax.plot(
                        t,
                        np.exp(r.fit["intercept"] + r.fit["slope"] * t),
                        color="k",
                        ls=":",
                        lw=1.4,
                        label=f"DELM fit: rate {r.fit['rate']:.4f}/step, R² = {r.fit['r2']:.4f}",
                    )
                b = r.bound
                t = np.flatnonzero(b.checked)
                bx.plot(
                    t,
                    _positive(1 - b.bound_ratio[t]),
                    color="k",
                    ls="--",
                    lw=1.4,
                    zorder=2,
                    label="bound 1 - (1 - eta lambda / |U_t|_2^2)^2",
                )
                bx.plot(
                    t,
                    _positive(1 - b.flow_ratio[t]),
                    color="0.45",
                    ls="-.",
                    lw=1.4,
                    zorder=3,
                    label="first-order (flow) form 2 eta lambda / |U_t|_2^2",
                )
                bx.plot(
                    t, _positive(1 - b.ratio[t]), color=color, lw=1.2, zorder=4, label="observed 1 - gap(t+1) / gap(t)"
                )
        ax.set_title(g.title, y=TITLE_Y)
        _log_y(ax)
        _log_y(bx)
        ax.set_xlabel("gradient step t")
        ax.set_ylabel("(L_t - L*) / (L_0 - L*)")
        ax.grid(True, which="major", alpha=0.3)
        _legend_below(ax)
        bx.set_xlabel("gradient step t")
        bx.set_ylabel("per-step decrease of the gap")
        bx.set_title("DELM: observed per-step contraction vs the bound (larger = faster)", y=TITLE_Y)
        bx.grid(True, which="major", alpha=0.3)
        _legend_below(bx)
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def trust_region(result: Any, path: pathlib.Path) -> None:
    plt = _plt()
    scales = result.scales
    fig, axes = plt.subplots(
        2, len(scales), figsize=(5.6 * len(scales), 10.5), squeeze=False, gridspec_kw={"hspace": 0.75, "wspace": 0.3}
    )
    for j, s in enumerate(scales):
        ax, bx = axes[0, j], axes[1, j]
        ax.plot(s.xy_gd[:, 0], s.xy_gd[:, 1], color="C1", lw=1.6, ls="--", label="shallow GD")
        ax.plot(s.xy_delm[:, 0], s.xy_delm[:, 1], color="C0", lw=2.4, label="DELM (W = B U^-1)")
        ax.plot(
            s.xy_predicted[:, 0],
            s.xy_predicted[:, 1],
            color="C3",
            lw=1.0,
            ls=":",
            label="integrated from dW = -eta P_t(G_t) (on the DELM path where they agree)",
        )
        for c in s.checks:
            ax.plot(*s.xy_delm[c.step], "o", color="C0", ms=4)
        ax.plot(0, 0, "*", color="k", ms=12, label="W* (shallow optimum)")
        ax.plot(*s.xy_delm[0], "s", color="k", ms=6, label="W_0 (shared start)")
        ax.set_title(f"A ~ {s.a_scale:g} N(0,1): paths in W-space", y=TITLE_Y)
        ax.set_xlabel("along W_0 - W*")
        ax.set_ylabel("largest deviation of the DELM path")
        ax.grid(True, alpha=0.3)
        if j == 0:  # every panel draws the same series: one legend per row
            _legend_below(ax, ncol=2)
        steps = np.arange(len(s.distance_to_gd_path))
        bx.plot(steps, _positive(s.distance_to_gd_path), color="C0", label="DELM's distance to the GD path")
        bx.plot(steps, _positive(s.distance_in_time), color="C2", ls="--", label="|W_t(DELM) - W_t(GD)|")
        bx.plot(steps, _positive(s.path_error), color="C3", ls=":", label="|W_t(DELM) - W_t(integrated -eta P G)|")
        _log_y(bx)
        bx.set_xlabel("gradient step t")
        bx.set_ylabel("distance / |W_0 - W*|")
        bx.set_title(f"max distance to the GD path {s.max_distance_to_gd_path:.3g}", y=TITLE_Y)
        bx.grid(True, alpha=0.3)
        if j == 0:
            _legend_below(bx)
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def implicit_bias(result: Any, path: pathlib.Path) -> None:
    plt = _plt()
    runs = result.runs
    labels = list(dict.fromkeys(r.model for r in runs))
    refs = result.references
    panels = [
        ("test accuracy (%)", lambda r: 100 * r.test["accuracy"], [100 * x.test["accuracy"] for x in refs]),
        ("test square loss", lambda r: r.test["square_loss"], [x.test["square_loss"] for x in refs]),
        ("|W - W_mn| / |W_mn|", lambda r: r.distance_to_min_norm, None),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.4))
    rng = np.random.default_rng(0)  # jitter of the per-seed dots only
    for ax, (name, get, ref) in zip(axes, panels, strict=True):
        lo = np.inf
        for i, label in enumerate(labels):
            vals = np.array([get(r) for r in runs if r.model == label])
            lo = min(lo, vals.min())
            ax.bar(
                i, vals.mean(), yerr=vals.std(ddof=1) if vals.size > 1 else 0.0, color=f"C{i}", alpha=0.55, capsize=5
            )
            ax.plot(i + rng.uniform(-0.15, 0.15, vals.size), vals, "o", color="k", ms=3)
        if ref is not None:
            ax.axhline(np.mean(ref), color="k", ls="--", lw=1, label="min-norm solution (mean)")
            _legend_below(ax)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right", rotation_mode="anchor")
        ax.set_title(name, y=TITLE_Y)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(
        f"Implicit bias at matched training loss {result.target_loss:g}: n = {result.n_train} < m = "
        f"{result.width}, {len(result.seeds)} seeds (bars: mean ± std; dots: seeds)"
    )
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)
