"""The main job's outputs: figures (matplotlib, Agg), per-step metrics (CSV), summary.json and REPORT.md.

All files are written atomically (`experiments.common.io`).
"""

from __future__ import annotations

import csv
import io
import math
import pathlib
from typing import Any, Optional

import numpy as np

from experiments.common.io import save_figure

THRESHOLD_NOTES = """\
- **Normalised gap <= 1e-6** (experiment 1): float64 resolves `L - L*` down to ~1e-15 of `L_0 - L*`, so 1e-6 is
  far above rounding and far below any visible plateau; `L*` comes from an independent solver (SVD least squares,
  Newton-CG), and the linear model reaching it too checks `L*` itself.
- **R^2 >= 0.99 over an explicit band of gaps** (`fit_lo < gap < fit_hi`): the band starts after the initial
  transient, which decays faster than the asymptotic rate, and stops above rounding level.
- **Bound excess <= 1e-6**: the observed per-step ratio `gap_{t+1}/gap_t` may exceed the bound only by rounding.
  The gradient-flow bound of theory.md section 4 gives, per step, `1 - 2 x_t` with `x_t = eta lambda / |U_t|_2^2`
  (first order in eta); one gradient *step* contracts the shallow model's slowest direction, preconditioned by
  `1/|U_t|_2^2`, by exactly `(1 - x_t)^2 = 1 - 2 x_t + x_t^2`, and that discrete form is the bound checked (the
  first-order form is exceeded by less than the `x_t^2` term at the small width, where the bound is nearly tight:
  reported in the claim's detail). Ratios are compared only while the gap is above `bound_floor` (1e-7 of
  `gap_0`): a float64 loss is accurate to ~1e-15 absolute, so a ratio of two gaps above that floor is accurate to
  ~1e-7, and the tolerance 1e-6 sits between that noise and the bound's smallest margin (~1e-4, at the small width).
- **Velocity / finite-difference / KKT discrepancies <= 1e-6** (experiment 2): forward mode and the closed form
  agree to ~1e-12 in float64; a central difference at relative step 1e-5 has truncation error ~1e-10.
- **Path difference >= 1e-3** of `|W_0 - W*|`: a float64 rounding error is ~1e-15 of it, so any distance above
  1e-3 is a difference between the dynamics, not noise.
- **Null-space change <= 1e-10** (experiment 3): linear GD's updates lie in phi's row space exactly; what is left is
  float64 rounding accumulated over the run.
"""


# --------------------------------------------------------------------------------------------- formatting

def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "nan"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits + 1}g}"


def mean_std(s: Optional[dict], digits: int = 3, percent: bool = False) -> str:
    if not s:
        return ""
    k = 100.0 if percent else 1.0
    return f"{fmt(s['mean'] * k, digits)} ± {fmt(s['std'] * k, digits)}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; `|` inside a cell (a norm) is escaped."""
    def cells(row):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    return "\n".join([cells(header), "|" + "|".join("---" for _ in header) + "|", *map(cells, rows)])


def claims_table(claims: list[dict]) -> str:
    rows = [[c["experiment"], c["name"], fmt(c["measured"]), f"{c['comparison']} {fmt(c['threshold'])}",
             "PASS" if c["passed"] else "**FAIL**"] for c in claims]
    return table(["experiment", "claim", "measured", "threshold", "result"], rows)


def claims_text(claims: list[dict]) -> str:
    """The claims as plain text for the terminal."""
    lines = []
    for c in claims:
        mark = "PASS" if c["passed"] else "FAIL"
        lines.append(f"  {mark}  {c['experiment']:<13} {c['name']}\n"
                     f"        measured {fmt(c['measured'], 4)} {c['comparison']} {fmt(c['threshold'])}"
                     + (f"   ({c['detail']})" if c.get("detail") else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- metrics CSV

METRIC_COLUMNS = ["experiment", "run", "loss_fn", "model", "width", "seed", "a_scale", "step", "loss",
                  "normalised_gap", "grad_norm", "solver_relative_residual", "U_norm2", "bound_ratio"]


def _rows(common: dict, **series: Optional[np.ndarray]) -> list[dict]:
    length = len(series["loss"])
    cols = {k: np.asarray(v) for k, v in series.items() if v is not None}
    return [{**common, "step": t, **{k: repr(float(v[t])) for k, v in cols.items()}} for t in range(length)]


def metrics_csv(outcomes: dict) -> str:
    rows: list[dict] = []
    for r in outcomes.get("convergence", {}).get("runs", []):
        rows += _rows({"experiment": "convergence", "run": r["key"], "loss_fn": r["loss"], "model": r["model"],
                       "width": r["width"]},
                      loss=r["loss_history"], normalised_gap=r["normalised_gap"], grad_norm=r["grad_norm"],
                      solver_relative_residual=r["relative_residual"], U_norm2=r.get("U_norm2"),
                      bound_ratio=r["bound"]["bound_ratio"] if "bound" in r else None)
    for s in outcomes.get("trust_region", {}).get("scales", []):
        rows += _rows({"experiment": "trust_region", "run": s["key"] + "/DELM", "loss_fn": "square", "model": "DELM",
                       "a_scale": s["a_scale"]},
                      loss=s["loss_delm"], normalised_gap=s["normalised_gap"],
                      solver_relative_residual=s["relative_residual"], U_norm2=s["U_norm2"])
        rows += _rows({"experiment": "trust_region", "run": s["key"] + "/GD", "loss_fn": "square", "model": "linear",
                       "a_scale": s["a_scale"]}, loss=s["loss_gd"])
    for r in outcomes.get("implicit_bias", {}).get("runs", []):
        rows += _rows({"experiment": "implicit_bias", "run": f"implicit_bias/seed{r['seed']}/{r['model']}",
                       "loss_fn": "square", "model": r["model"], "seed": r["seed"]}, loss=r["loss_history"])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- figures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _positive(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, x, np.nan)


def figure_convergence(outcome: dict, loss: str, path: pathlib.Path, title: str) -> None:
    plt = _plt()
    runs = [r for r in outcome["runs"] if r["loss"] == loss]
    widths = list(dict.fromkeys(r["width"] for r in runs))
    fig, axes = plt.subplots(2, len(widths), figsize=(6.2 * len(widths), 8.2), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    for j, width in enumerate(widths):
        ax, bx = axes[0, j], axes[1, j]
        group = [r for r in runs if r["width"] == width]
        for i, r in enumerate(group):
            color = f"C{i}"
            steps = np.arange(len(r["normalised_gap"]))
            ax.semilogy(steps, _positive(r["normalised_gap"]), color=color, lw=1.6 if r["is_delm"] else 1.1,
                        label=r["model"])
            if r["is_delm"]:
                ax.semilogy(steps, _positive(r["bound"]["cumulative_bound"]), color=color, ls="--", lw=1.0,
                            label="DELM bound from its own |U_t|_2")
                fit = r["fit"]
                if fit is not None:
                    i0, i1 = fit["window"]
                    t = np.arange(i0, i1)
                    ax.semilogy(t, np.exp(fit["intercept"] + fit["slope"] * t), color="k", ls=":", lw=1.4,
                                label=f"DELM fit: rate {fit['rate']:.4f}/step, R²={fit['r2']:.4f}")
                b = r["bound"]
                t = np.flatnonzero(b["checked"])
                bx.semilogy(t, _positive(1 - b["ratio"][t]), color=color, lw=1.2,
                            label="observed 1 - gap(t+1)/gap(t)")
                bx.semilogy(t, _positive(1 - b["bound_ratio"][t]), color="k", ls="--", lw=1.0,
                            label="bound 1 - (1 - eta lambda / |U_t|_2^2)^2")
                bx.semilogy(t, _positive(1 - b["flow_ratio"][t]), color="0.5", ls=":", lw=1.0,
                            label="first-order (flow) form 2 eta lambda / |U_t|_2^2")
        proj = " (random projection)" if group[0]["projection"] else ""
        ax.set_title(f"{title}, width m = {width}{proj}")
        ax.set_xlabel("gradient step t")
        ax.set_ylabel("(L_t - L*) / (L_0 - L*)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
        bx.set_xlabel("gradient step t")
        bx.set_ylabel("per-step decrease of the gap")
        bx.set_title("DELM: observed per-step contraction vs the bound (larger = faster)", fontsize=10)
        bx.grid(True, which="major", alpha=0.3)
        bx.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def figure_trust_region(outcome: dict, path: pathlib.Path) -> None:
    plt = _plt()
    scales = outcome["scales"]
    fig, axes = plt.subplots(2, len(scales), figsize=(5.0 * len(scales), 8.4), squeeze=False)
    for j, s in enumerate(scales):
        ax, bx = axes[0, j], axes[1, j]
        ax.plot(s["xy_gd"][:, 0], s["xy_gd"][:, 1], color="C1", lw=1.6, ls="--", label="shallow GD")
        ax.plot(s["xy_delm"][:, 0], s["xy_delm"][:, 1], color="C0", lw=1.6, label="DELM (W = B U^-1)")
        for c in s["checks"]:
            ax.plot(*s["xy_delm"][c["step"]], "o", color="C0", ms=4)
        ax.plot(0, 0, "*", color="k", ms=12, label="W* (shallow optimum)")
        ax.plot(*s["xy_delm"][0], "s", color="k", ms=6, label="W_0 (shared start)")
        ax.set_title(f"A ~ {s['a_scale']:g} N(0,1): paths in W-space", fontsize=10)
        ax.set_xlabel("along W_0 - W*")
        ax.set_ylabel("largest deviation of the DELM path")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        steps = np.arange(len(s["distance_to_gd_path"]))
        bx.semilogy(steps, _positive(s["distance_to_gd_path"]), color="C0", label="distance to the GD path")
        bx.semilogy(steps, _positive(s["distance_in_time"]), color="C2", ls="--", label="|W_t(DELM) - W_t(GD)|")
        bx.set_xlabel("gradient step t")
        bx.set_ylabel("/ |W_0 - W*|")
        bx.set_title(f"max distance to the GD path {s['path_difference']:.3g}", fontsize=10)
        bx.grid(True, alpha=0.3)
        bx.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def figure_implicit_bias(outcome: dict, path: pathlib.Path) -> None:
    plt = _plt()
    runs = outcome["runs"]
    labels = list(dict.fromkeys(r["model"] for r in runs))
    refs = outcome["references"]
    panels = [("test accuracy", lambda r: r["test"]["accuracy"], [x["test"]["accuracy"] for x in refs]),
              ("test square loss", lambda r: r["test"]["square_loss"], [x["test"]["square_loss"] for x in refs]),
              ("|W - W_mn| / |W_mn|", lambda r: r["distance_to_min_norm"], None)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    rng = np.random.default_rng(0)  # jitter of the per-seed dots only
    for ax, (name, get, ref) in zip(axes, panels):
        for i, label in enumerate(labels):
            vals = np.array([get(r) for r in runs if r["model"] == label])
            ax.bar(i, vals.mean(), yerr=vals.std(ddof=1) if vals.size > 1 else 0.0, color=f"C{i}", alpha=0.55,
                   capsize=5)
            ax.plot(i + rng.uniform(-0.15, 0.15, vals.size), vals, "o", color="k", ms=3)
        if ref is not None:
            ax.axhline(np.mean(ref), color="k", ls="--", lw=1, label="min-norm solution (mean)")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=15)
        ax.set_title(name)
        ax.grid(True, axis="y", alpha=0.3)
    s = outcome["settings"]
    fig.suptitle(f"Implicit bias at matched training loss {s['target_loss']:g}: n = {s['n_train']} < m = "
                 f"{s['width']}, {len(s['seeds'])} seeds (bars: mean ± std; dots: seeds)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def make_figures(outcomes: dict, fig_dir: pathlib.Path) -> dict[str, list[str]]:
    """Write every figure; returns the relative paths per experiment."""
    from experiments.reproduce.convergence import LOSS_TITLES

    out: dict[str, list[str]] = {}
    if "convergence" in outcomes:
        for loss in dict.fromkeys(r["loss"] for r in outcomes["convergence"]["runs"]):
            name = f"convergence_{loss}.png"
            figure_convergence(outcomes["convergence"], loss, fig_dir / name, LOSS_TITLES[loss])
            out.setdefault("convergence", []).append(f"figures/{name}")
    if "trust_region" in outcomes:
        figure_trust_region(outcomes["trust_region"], fig_dir / "trust_region_paths.png")
        out["trust_region"] = ["figures/trust_region_paths.png"]
    if "implicit_bias" in outcomes:
        figure_implicit_bias(outcomes["implicit_bias"], fig_dir / "implicit_bias.png")
        out["implicit_bias"] = ["figures/implicit_bias.png"]
    return out


# --------------------------------------------------------------------------------------------- REPORT.md

def report_markdown(summary: dict, outcomes: dict, figures: dict, config_yaml: str) -> str:
    claims = summary["claims"]
    passed = sum(c["passed"] for c in claims)
    ds = summary["dataset"]
    parts = [
        f"# Reproduction report: `{summary['run_name']}`",
        "",
        f"Kawaguchi (ICLR 2021), *On the Theory of Implicit Deep Learning: Global Convergence with Implicit Layers*: "
        f"the deep equilibrium linear model (DELM) against the linear model and deep linear networks.",
        "",
        f"**{passed} of {len(claims)} claims passed.** Command: `{summary['command']}` "
        f"(wall time {summary['wall_time_s']:.1f} s on {summary['device']['description']}).",
        "",
        "## Claims",
        "",
        claims_table(claims),
        "",
        "## Data and settings",
        "",
        table(["setting", "value"], [
            ["dataset", f"{ds['dataset']} ({ds['n_train']} train / {ds['n_test']} test samples used, of "
                        f"{ds['n_train_available']} / {ds['n_test_available']})"],
            ["features", f"{ds['features']}" + (f" to {ds['pca_dim']} dims" if "pca_dim" in ds else "")
             + (" + bias" if ds.get("add_bias") else "") + f" → width m = {ds['output_dim']}"],
            ["preprocessing", f"train statistics only; subset seed {ds['seed']}; images scaled to [0, 1] first"],
            ["DELM", f"gamma = {summary['config']['model']['gamma']}, sigma = {summary['config']['model']['sigma']}, "
                     f"exact equilibrium solve (LU), A, B ~ {summary['config']['model']['init_scale']} N(0, 1)"],
            ["baselines", f"linear W ~ {summary['config']['model']['init_scale']} N(0, 1); deep linear nets of depths "
                          f"{', '.join(map(str, summary['config']['model']['depths']))}"],
            ["precision / seed", f"{summary['config']['dtype']} / {summary['seed']}"],
        ]),
        "",
    ]
    if "convergence" in outcomes:
        parts += _section_convergence(outcomes["convergence"], figures.get("convergence", []), summary)
    if "trust_region" in outcomes:
        parts += _section_trust_region(outcomes["trust_region"], figures.get("trust_region", []))
    if "implicit_bias" in outcomes:
        parts += _section_implicit_bias(outcomes["implicit_bias"], figures.get("implicit_bias", []))
    v = summary["versions"]
    parts += [
        "## How the thresholds were chosen",
        "",
        THRESHOLD_NOTES,
        "## Environment",
        "",
        table(["", ""], [["device", summary["device"]["description"]],
                         ["platform", summary["device"]["platform"]],
                         ["versions", ", ".join(f"{k} {val}" for k, val in v.items())],
                         ["wall time", f"{summary['wall_time_s']:.1f} s (this invocation; "
                                       f"{summary['checkpoints_reused']} checkpoints reused)"]]),
        "",
        "Files: `config.yaml` (the resolved configuration), `metrics.csv` (every step of every run), "
        "`summary.json` (claims and measurements), `figures/`, `checkpoints/` (for resuming).",
        "",
        "<details><summary>Resolved configuration</summary>",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(parts)


def _figs(paths: list[str], caption: str) -> list[str]:
    return [f"![{caption}]({p})" for p in paths] + [""]


def _section_convergence(o: dict, figs: list[str], summary: dict) -> list[str]:
    from experiments.reproduce.convergence import LOSS_TITLES

    rows = []
    for r in o["runs"]:
        fit = r["fit"]
        rows.append([LOSS_TITLES[r["loss"]], f"{r['width']}{' (proj.)' if r['projection'] else ''}", r["model"],
                     fmt(r["learning_rate"]), r["steps"], fmt(r["final_normalised_gap"]),
                     fmt(r["distance_to_optimum"]),
                     "" if fit is None else f"{fit['rate']:.5f}", "" if fit is None else f"{fit['r2']:.5f}",
                     f"{100 * r['test']['accuracy']:.1f}%"])
    s_rows = [[LOSS_TITLES[s["loss"]], s["width"], fmt(s["L_star"], 6), fmt(s["lambda_max"]),
               fmt(s["lambda_min_plus"]), s["rank"], fmt(s["pl_constant"]), fmt(s["learning_rate"])]
              for s in o["settings"]]
    cfg = summary["config"]["convergence"]
    return [
        "## 1. Global linear convergence (theory.md section 4)",
        "",
        "Full-batch gradient descent from a seeded init; `L*` is the shallow model's optimum, computed "
        "independently (`deq_jax.theory`). Cross-entropy carries an L2 penalty "
        f"`({cfg['cross_entropy_l2']:g}/2)|W|_F^2` on the end-to-end matrix, so the shallow problem has a unique "
        "minimiser even on separable data (documented choice); its PL constant in the bound is then the L2 "
        "strength. Dashed: the bound `(L_0 - L*) prod_s (1 - eta lambda / |U_s|_2^2)^2` from the DELM's own "
        f"`|U_t|_2` (the per-step form of the gradient-flow bound, see the thresholds below); dotted: the "
        f"log-linear fit over gaps in ({cfg['fit_lo']:g}, {cfg['fit_hi']:g}). Runs stop once the normalised gap "
        f"stays below {cfg['stop_gap']:g} for a whole chunk.",
        "",
        *_figs(figs, "normalised gap vs step"),
        table(["loss", "width", "L*", "lambda_max", "lambda_min^+", "rank", "PL constant", "learning rate"], s_rows),
        "",
        table(["loss", "width", "model", "eta", "steps", "final (L-L*)/(L_0-L*)", "|W_T - W*|/|W*|",
               "fitted rate", "R²", "test acc."], rows),
        "",
    ]


def _section_trust_region(o: dict, figs: list[str]) -> list[str]:
    rows = []
    for s in o["scales"]:
        ch = s["checks"]
        rows.append([f"{s['a_scale']:g}", len(ch), ", ".join(str(c["step"]) for c in ch),
                     fmt(max(c["velocity_rel_error"] for c in ch)), fmt(max(c["fd_rel_error"] for c in ch)),
                     fmt(min(c["P_min_eig"] for c in ch)), fmt(max(c["P_max_eig"] for c in ch)),
                     fmt(min(c["M_min_eig"] for c in ch)), fmt(max(c["kkt_residual"] for c in ch)),
                     f"{min(c['cosine_vs_gd'] for c in ch):.6f}", fmt(s["path_difference"]),
                     fmt(s["max_distance_in_time"])])
    st = o["settings"]
    return [
        "## 2. Trust-region Newton relation (theory.md section 5)",
        "",
        f"The DELM (A ~ s N(0,1) for each scale s, B ~ {st['b_scale']:g} N(0,1), same draws) and plain gradient "
        f"descent on the shallow model from the same `W_0 = B_0 U_0^-1`, both with eta = {fmt(st['learning_rate'])} "
        f"on the square loss. Every {st['check_every']} steps of the DELM run (while the gap is above rounding level) "
        f"`deq_jax.theory.trust_region_check` compares the velocity of `W = B U^-1` with `-P(G)` and builds the "
        f"trust-region norm `M = ((eta P)^-1 - H) / lambda`; a central finite difference through the library's DELM "
        f"checks the velocity independently. Top: both paths projected on the plane through `W*` spanned by "
        f"`W_0 - W*` and the DELM path's largest deviation from that line.",
        "",
        *_figs(figs, "DELM and GD paths in W-space"),
        table(["A scale", "checks", "at steps", "velocity err.", "FD err.", "min eig P", "max eig P", "min eig M",
               "KKT residual", "min cos(P(G), G)", "max dist. to GD path", "max |W_t - W_t^GD|"], rows),
        "",
    ]


def _section_implicit_bias(o: dict, figs: list[str]) -> list[str]:
    rows = []
    for r in o["table"]:
        rows.append([r["model"], r["reached"] if r["reached"] is not None else "",
                     "" if r["steps"] is None else f"{r['steps']['mean']:.0f} ± {r['steps']['std']:.0f}",
                     mean_std(r["test_accuracy"], 3, percent=True),
                     mean_std(r["test_loss"]), mean_std(r["distance_to_min_norm"]), mean_std(r["null_space_norm"])])
    s = o["settings"]
    return [
        "## 3. Implicit bias (theory.md section 6)",
        "",
        f"Per seed, n = {s['n_train']} training samples (a seeded draw from the training features) with width "
        f"m = {s['width']}: the square loss has an affine set of interpolating minimisers (L* = 0). Every model "
        f"trains by full-batch GD from its seeded init and is evaluated at the first step whose training loss is "
        f"<= {s['target_loss']:g} (matched training loss). Test metrics use the whole test split; distances are "
        f"relative to the minimum-norm interpolant `W_mn`; the null-space norm `|W (I - P_row)| / |W_mn|` is the "
        f"part of W the training data do not determine. Seeds: {', '.join(map(str, s['seeds']))} (mean ± sample "
        f"std). This is a measurement, not a test of a hypothesis.",
        "",
        *_figs(figs, "implicit bias"),
        table(["model", "reached target", "steps", "test accuracy (%)", "test square loss", "|W - W_mn|/|W_mn|",
               "null-space norm"], rows),
        "",
    ]
