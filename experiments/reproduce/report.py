"""The main job's outputs from the experiments' typed results: per-step metrics (CSV), REPORT.md, the terminal's
claims table, and the JSON form of the results. Figures are in `figures.py`. Files are written by the caller,
atomically (`experiments.common.io`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import pathlib
from typing import Any

import numpy as np

from experiments.reproduce import figures as figs


def threshold_notes(cfg: dict) -> str:
    """Why each threshold is what it is, with the thresholds this run judged by (the config's, as the claims table
    prints them: a changed threshold never leaves the notes saying another number)."""
    c, tr, ib = cfg["convergence"], cfg["trust_region"], cfg["implicit_bias"]
    t, tt, bt = c["thresholds"], tr["thresholds"], ib["thresholds"]
    return f"""\
Thresholds judge finished numbers: changing one never recomputes a run (checkpoints are keyed by what the numbers
depend on), only the verdicts. Sections are those of docs/theory.md.
- **Reaches L*, |normalised gap| <= {fmt(t["normalised_gap"])}, either sign** (experiment 1, section 4): float64
  resolves `L - L*` down to ~1e-15 of `L_0 - L*`, far below this threshold, which is itself far below any visible
  plateau. Two-sided: a gap below `-{fmt(t["normalised_gap"])}` means `L*` is overestimated (the model went below
  the "optimum") and fails as well. `L*` comes from an independent solver (deq_jax.theory: least squares from `C`;
  Newton-CG), checked by its own gradient (`<= {fmt(t["optimum_gradient"])}` of the gradient at 0, recomputed from
  the samples) and by the linear model reaching it too.
- **R^2 >= {fmt(t["r2"])} over an explicit band of gaps** (`{fmt(c["fit_lo"])} < gap < {fmt(c["fit_hi"])}`): the
  band starts after the initial transient, which decays faster than the asymptotic rate, and stops above rounding
  level.
- **Bound excess <= {fmt(t["bound_excess"])}** (section 4): the observed per-step ratio `gap_{{t+1}}/gap_t` may
  exceed `(1 - eta lambda/|U_t|_2^2)^2` only by rounding. (The gradient-flow bound gives `1 - 2 x_t`,
  `x_t = eta lambda / |U_t|_2^2`, first order in eta; one gradient step contracts the slowest direction by exactly
  `(1 - x_t)^2`.) Ratios are compared only while the gap is above `bound_floor` ({fmt(c["bound_floor"])} of
  `gap_0`): a float64 loss is accurate to ~1e-15 absolute, so a ratio of two gaps above that floor is accurate to
  ~1e-15 / floor, below the threshold and far below the bound's margin.
- **Rate within a factor {fmt(t["rate_factor"])} of the bound**: the other side of the bound. The fitted log-rate
  over the mean log of the per-step bound in the same window is >= 1 when the bound holds; at most
  {fmt(t["rate_factor"])} says the bound predicts the rate, not merely limits it (a wrong PL constant, e.g.
  lambda_max for lambda_min^+, fails it).
- **Stability: eta lambda_max(P_t H) < 2** (section 12): to first order the DELM's W moves by `-eta P_t(G_t)`,
  preconditioned gradient descent on the convex shallow problem, which contracts in every direction iff this holds.
  The step-size rule puts it at `learning_rate.scale` at the start (the trust-region experiment at 0.5, since M is
  positive definite iff it is < 1).
- **Follows the exact path, <= {fmt(t["path"])} of |W_0 - W*|** (iterative variants): forward and backward solves
  to a relative 1e-12 give gradients accurate to ~1e-11; over a few hundred contracting steps the paths may drift
  apart by a few 1e-10. A gradient perturbed at random by 1% moves the path by ~2e-4 (the mutation test), and the
  one-step gradient by ~1e-6 to 3e-3.
- **Every solve converged, max relative residual <= {fmt(t["solver_residual"])}**: the forward solves' residuals and
  the implicit backward's (per solve); any solve the library flags as failed fails the claim.
- **Velocity of every update = -eta P_t(G_t), <= {fmt(tt["velocity"])}** (forward mode; experiments 2, 3; section
  5; {fmt(bt["velocity"])} in experiment 3) **and <= {fmt(tt["finite_difference"])}** (central finite difference,
  relative step {fmt(tr["fd_step"])}, truncation ~1e-10, rounding ~1e-16 / step): in float64 the closed form and the
  preconditioner agree to ~1e-13; any gradient error of relative size above ~1e-8 shows.
- **Every trained step lands on the exact GD step, <= {fmt(tt["step"])} of |eta P_t(G_t)|** (section 11): the
  trained `W_{{t+1}}` against `W(theta_t - eta g_t)`, `g_t` the exact gradient, to all orders in eta: rounding
  (~1e-13) for the true gradient, the gradient's relative error otherwise.
- **W-path within {fmt(tt["path"])} of |W_0 - W*| of the path integrated from -eta P_t(G_t)**, to second order in
  eta (section 11; each predicted step is `deq_jax.theory.predict_w_step(order=2)`): what is left are the
  third-order terms of the steps, `O(eta^3 |g|^3)` each (measured ~1e-6 on the tiny config); a gradient perturbed
  by 1% at random moves the path by ~1e-3. (The first-order path alone differs by ~1e-4..1e-3 of |W_0 - W*|, which
  a small random perturbation would hide in.)
- **Null-space change <= {fmt(bt["null_space"])}** (experiment 3, section 6): linear GD's updates lie in phi's row
  space exactly; what is left is float64 rounding accumulated over the run.
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


def fmt_measured(measured: Any, threshold: float, op: str, digits: int = 4) -> str:
    """The measured value with as many digits as it takes to tell it from the threshold: never "1" next to
    ">= 0.9999" for 0.99987 (the printed number compares with the threshold as the real one does)."""
    if measured is None or isinstance(measured, str):
        return str(measured)
    m, t = float(measured), float(threshold)
    if not math.isfinite(m):
        return "nan" if math.isnan(m) else str(m)
    value = abs(m) if op == "|x| <=" else m
    for d in range(digits, 18):
        text = f"{m:.{d}g}"
        shown = abs(float(text)) if op == "|x| <=" else float(text)
        if (shown == t) == (value == t) and (shown < t) == (value < t):
            return text
    return repr(m)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def mean_std(s: dict | None, digits: int = 3, percent: bool = False) -> str:
    if not s:
        return ""
    k = 100.0 if percent else 1.0
    return f"{fmt(s['mean'] * k, digits)} ± {fmt(s['std'] * k, digits)}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; `|` inside a cell (a norm) is escaped."""

    def cells(row):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    return "\n".join([cells(header), "|" + "|".join("---" for _ in header) + "|", *map(cells, rows)])


def _threshold(c: dict) -> str:
    return f"{c['comparison']} {fmt(c['threshold'])}"


def claims_table(claims: list[dict]) -> str:
    rows = [
        [
            c["experiment"],
            c["name"],
            fmt_measured(c["measured"], c["threshold"], c["comparison"]),
            _threshold(c),
            "yes" if c["gradient_sensitive"] else "",
            "PASS" if c["passed"] else "**FAIL**",
        ]
        for c in claims
    ]
    return table(["experiment", "claim", "measured", "threshold", "gradient-sensitive", "result"], rows)


def claims_text(claims: list[dict]) -> str:
    """The claims as plain text for the terminal."""
    lines = []
    for c in claims:
        mark = "PASS" if c["passed"] else "FAIL"
        sens = "  [gradient-sensitive]" if c["gradient_sensitive"] else ""
        lines.append(
            f"  {mark}  {c['experiment']:<13} {c['name']}{sens}\n"
            f"        measured {fmt_measured(c['measured'], c['threshold'], c['comparison'])} "
            f"{_threshold(c)}" + (f"   ({c['detail']})" if c.get("detail") else "")
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- JSON, CSV


def jsonable(obj: Any) -> Any:
    """Results for summary.json: scalars and small lists; per-step arrays are left to metrics.csv."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {
            f.name: jsonable(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (isinstance(getattr(obj, f.name), np.ndarray) and getattr(obj, f.name).ndim > 0)
            and f.name != "claims"
        }
        return out
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not (isinstance(v, np.ndarray) and v.ndim > 0)}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.item())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else str(x)
    return obj


METRIC_COLUMNS = [
    "experiment",
    "run",
    "loss_fn",
    "model",
    "width",
    "seed",
    "a_scale",
    "step",
    "loss",
    "normalised_gap",
    "grad_norm",
    "solver_relative_residual",
    "U_norm2",
    "bound_ratio",
]


def metrics_csv(results: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in results.values():
        for row in result.metric_rows():
            writer.writerow(
                {
                    k: ("" if v is None else repr(float(v)) if isinstance(v, (float, np.floating)) else v)
                    for k, v in row.items()
                }
            )
    return buf.getvalue()


def make_figures(results: dict, fig_dir: pathlib.Path) -> dict[str, list[str]]:
    """Write every figure; returns the relative paths per experiment."""
    out: dict[str, list[str]] = {}
    if "convergence" in results:
        for loss in dict.fromkeys(g.loss for g in results["convergence"].groups):
            name = f"convergence_{loss}.png"
            figs.convergence(results["convergence"].groups, loss, fig_dir / name)
            out.setdefault("convergence", []).append(f"figures/{name}")
    if "trust_region" in results:
        figs.trust_region(results["trust_region"], fig_dir / "trust_region_paths.png")
        out["trust_region"] = ["figures/trust_region_paths.png"]
    if "implicit_bias" in results:
        figs.implicit_bias(results["implicit_bias"], fig_dir / "implicit_bias.png")
        out["implicit_bias"] = ["figures/implicit_bias.png"]
    return out


# --------------------------------------------------------------------------------------------- REPORT.md


def report_markdown(summary: dict, results: dict, figures: dict, config_yaml: str) -> str:
    claims = summary["claims"]
    passed = sum(c["passed"] for c in claims)
    ds = summary["dataset"]
    cfg = summary["config"]
    env = summary["environment"]
    parts = [
        f"# Reproduction report: `{summary['run_name']}`",
        "",
        (
            "Kawaguchi (ICLR 2021), *On the Theory of Implicit Deep Learning: Global Convergence with Implicit "
            "Layers*: the deep equilibrium linear model (DELM) against the linear model and deep linear networks. The "
            "mathematics and what each claim checks: docs/theory.md."
        ),
        "",
    ]
    if summary.get("mutation"):
        parts += [
            (
                f"**MUTATION RUN** (`--mutation {summary['mutation']}`): the DELMs under test were trained with "
                f"{summary['mutation_description']}. The claims marked gradient-sensitive are expected to FAIL; "
                f"{summary['sensitive_failed']} of {summary['sensitive_total']} did."
            ),
            "",
        ]
    parts += [
        (
            f"**{passed} of {len(claims)} claims passed.** Command: `{summary['command']}` "
            f"(wall time {summary['wall_time_s']:.1f} s on {env['devices']['description']}; "
            f"{summary['runs_loaded']} of {plural(summary['runs_total'], 'training run')} loaded from checkpoints)."
        ),
        "",
        "## Claims",
        "",
        (
            "Gradient-sensitive claims depend on the gradient that training applied being the true one: each fails "
            "when the DELMs are trained with a wrong gradient (`--mutation one_step|perturbed|wrong_sigma`)."
        ),
        "",
        claims_table(claims),
        "",
        "## Data and settings",
        "",
        table(
            ["setting", "value"],
            [
                [
                    "dataset",
                    (
                        f"{ds['dataset']} ({ds['n_train']} train / {ds['n_test']} test samples used, of "
                        f"{ds['n_train_available']} / {ds['n_test_available']})"
                    ),
                ],
                [
                    "features",
                    f"{ds['features']}"
                    + (f" to {ds['pca_dim']} dims" if "pca_dim" in ds else "")
                    + (" + bias" if ds.get("add_bias") else "")
                    + f" → width m = {ds['output_dim']}",
                ],
                ["preprocessing", f"train statistics only; subset seed {ds['seed']}; images scaled to [0, 1] first"],
                [
                    "DELM",
                    (
                        f"gamma = {cfg['model']['gamma']}, sigma = {cfg['model']['sigma']}, A, B ~ "
                        f"{cfg['model']['init_scale']} N(0, 1); reference runs: exact equilibrium solve (LU)"
                    ),
                ],
                [
                    "baselines",
                    (
                        f"linear W ~ {cfg['model']['init_scale']} N(0, 1); deep linear nets of depths "
                        f"{', '.join(map(str, cfg['model']['depths']))}"
                    ),
                ],
                ["precision / seed", f"{cfg['dtype']} / {cfg['seed']}"],
            ],
        ),
        "",
    ]
    if "convergence" in results:
        parts += _section_convergence(results["convergence"], figures.get("convergence", []), cfg)
    if "trust_region" in results:
        parts += _section_trust_region(results["trust_region"], figures.get("trust_region", []))
    if "implicit_bias" in results:
        parts += _section_implicit_bias(results["implicit_bias"], figures.get("implicit_bias", []))
    v = env["versions"]
    parts += [
        "## How the thresholds were chosen",
        "",
        threshold_notes(cfg),
        "## Environment",
        "",
        table(
            ["", ""],
            [
                ["device", env["devices"]["description"]],
                [
                    "machine",
                    (
                        f"{env['machine']['cpu_model']}, {env['machine']['platform']}, load average "
                        f"{env['machine']['load_average_1_5_15']}"
                    ),
                ],
                ["versions", ", ".join(f"{k} {val}" for k, val in v.items())],
                ["wall time", f"{summary['wall_time_s']:.1f} s (this invocation)"],
            ],
        ),
        "",
        (
            "Files: `config.yaml` (the resolved configuration), `metrics.csv` (every step of every run), "
            "`summary.json` (claims and measurements), `figures/`, `checkpoints/` (for resuming; `--fresh` clears "
            "them)."
        ),
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


def _section_convergence(o: Any, figures: list[str], cfg: dict) -> list[str]:
    c = cfg["convergence"]
    s_rows, rows = [], []
    for g in o.groups:
        s_rows.append(
            [
                g.loss_title,
                g.features,
                g.width,
                fmt(g.L_star, 6),
                fmt(g.lambda_max),
                fmt(g.lambda_min_plus),
                g.rank,
                f"{fmt(g.pl_constant)} ({g.pl_name})",
                fmt(g.learning_rate),
                fmt(g.stiffness0) + ("" if g.stiffness_exact else " (approx.)"),
                "yes" if g.gram_route else "no",
            ]
        )
        for r in g.runs:
            fit = r.fit
            rows.append(
                [
                    g.loss_title,
                    f"{g.features}, m={g.width}",
                    r.label,
                    r.description or "",
                    r.steps,
                    fmt(r.final_normalised_gap),
                    fmt(r.distance_to_optimum),
                    "" if fit is None else f"{fit['rate']:.5f}",
                    "" if fit is None else f"{fit['r2']:.5f}",
                    f"{100 * r.test['accuracy']:.1f}%",
                ]
            )
    return [
        f"## 1. {o.title} (docs/theory.md section 4)",
        "",
        (
            "Full-batch gradient descent from a seeded init; `L*` is the shallow model's optimum, computed "
            "independently. Cross-entropy carries an L2 penalty "
            f"`({c['cross_entropy_l2']:g}/2)|W|_F^2` on the end-to-end matrix, so the shallow problem has a unique "
            "minimiser even on separable data; its PL constant in the bound is then the L2 strength. The exact DELM "
            "(direct LU solve) is the reference; the iterative variants (an iterative forward solver with the implicit "
            "backward) must follow its path. The square loss trains through its Gram form (`C = phi^T phi / n`, "
            "`D = phi^T Y / n`: n-independent per step, same gradients; the per-sample variant uses the samples "
            "themselves); cross-entropy needs every sample at every step. Dashed: the bound "
            "`(L_0 - L*) prod_s (1 - eta lambda / |U_s|_2^2)^2` from the DELM's own `|U_t|_2`; dotted: the log-linear "
            f"fit over gaps in ({c['fit_lo']:g}, {c['fit_hi']:g}). Runs stop once the normalised gap stays below "
            f"{c['stop_gap']:g} for a whole chunk. Step size: `eta = scale / lambda_max(P_0 H)` (the column "
            "`eta lambda_max(P_0 H)`)."
        ),
        "",
        *_figs(figures, "normalised gap vs step"),
        table(
            [
                "loss",
                "features",
                "width",
                "L*",
                "lambda_max",
                "lambda_min^+",
                "rank",
                "PL constant",
                "learning rate",
                "eta lambda_max(P_0 H)",
                "Gram route",
            ],
            s_rows,
        ),
        "",
        table(
            [
                "loss",
                "features",
                "model",
                "solve",
                "steps",
                "final (L-L*)/(L_0-L*)",
                "|W_T - W*|/|W*|",
                "fitted rate",
                "R²",
                "test accuracy",
            ],
            rows,
        ),
        "",
    ]


def _section_trust_region(o: Any, figures: list[str]) -> list[str]:
    rows = []
    for s in o.scales:
        ch = s.checks
        rows.append(
            [
                f"{s.a_scale:g}",
                len(ch),
                ", ".join(str(c.step) for c in ch),
                fmt(np.max(s.velocity_error)),
                fmt(np.max(s.fd_velocity_error)),
                fmt(np.max(s.step_error)),
                fmt(np.max(s.path_error)),
                fmt(min((c.P_min_eig for c in ch), default=None)),
                fmt(max((c.P_max_eig for c in ch), default=None)),
                fmt(min((c.M_min_eig for c in ch), default=None)),
                f"{min((c.cosine_vs_gd for c in ch), default=float('nan')):.6f}",
                fmt(s.max_distance_to_gd_path),
                fmt(float(np.max(s.distance_in_time))),
            ]
        )
    return [
        f"## 2. {o.title} (docs/theory.md sections 5 and 11)",
        "",
        (
            f"The DELM (A ~ s N(0,1) for each scale s, B ~ {o.b_scale:g} N(0,1), same draws) and plain gradient "
            f"descent on the shallow model from the same `W_0 = B_0 U_0^-1`, both with eta = {fmt(o.learning_rate)} "
            f"(eta lambda_max(P_0 H) = {fmt(o.stiffness0)} at the stiffest start) on the square loss, width m = "
            f"{o.width}. At every step the change of `W = B U^-1` along the update training applied is compared with "
            f"`-eta P_t(G_t)` (forward mode and central differences through the closed form), the trained step with "
            f"the exact GD step `W(theta_t - eta g_t)` to all orders (`deq_jax.theory.w_step_check`), and the W-path "
            f"with the path integrated from the second-order predictions (`deq_jax.theory.predict_w_step`). Every "
            f"{o.check_every} steps (while the gap is above rounding level) `deq_jax.theory.trust_region_check` builds "
            f"the trust-region norm `M = ((eta P)^-1 - H) / lambda` densely ((m_y m)^2 matrices: feasible widths "
            f"only). Top: the paths projected on the plane through `W*` spanned by `W_0 - W*` and the DELM path's "
            f"largest deviation from that line."
        ),
        "",
        *_figs(figures, "DELM and GD paths in W-space"),
        table(
            [
                "A scale",
                "checks",
                "at steps",
                "max velocity err.",
                "max FD err.",
                "max step err.",
                "max path err.",
                "min eig P",
                "max eig P",
                "min eig M",
                "min cos(P(G), G)",
                "max dist. to GD path",
                "max |W_t - W_t^GD|",
            ],
            rows,
        ),
        "",
    ]


def mean_ci(s: dict | None, digits: int = 3, percent: bool = False) -> str:
    """`mean [lo, hi]`: the mean over seeds and its confidence interval (`implicit_bias.CONFIDENCE`)."""
    if not s:
        return ""
    k = 100.0 if percent else 1.0
    if "ci_lo" not in s:
        return mean_std(s, digits, percent)
    return f"{fmt(s['mean'] * k, digits)} [{fmt(s['ci_lo'] * k, digits)}, {fmt(s['ci_hi'] * k, digits)}]"


def _section_implicit_bias(o: Any, figures: list[str]) -> list[str]:
    from experiments.reproduce.implicit_bias import CONFIDENCE, paired_words

    rows, words = [], []
    for r in o.table:
        rows.append(
            [
                r["model"],
                r["reached"] if r["reached"] is not None else "",
                "" if r["steps"] is None else f"{r['steps']['mean']:.0f} ± {r['steps']['std']:.0f}",
                mean_ci(r["test_accuracy"], 3, percent=True),
                mean_ci(r["test_loss"]),
                mean_ci(r["distance_to_min_norm"]),
                mean_ci(r["null_space_norm"]),
            ]
        )
        if r["model"].startswith("DELM - linear"):
            words = [
                "- " + paired_words("test accuracy", r["test_accuracy"], percent=True),
                "- " + paired_words("test square loss", r["test_loss"]),
                "- " + paired_words("distance from the minimum-norm interpolant", r["distance_to_min_norm"]),
            ]
    return [
        f"## 3. {o.title} (docs/theory.md section 6)",
        "",
        (
            f"Per seed, n = {o.n_train} training samples (a seeded draw from the training features) with width "
            f"m = {o.width}: the square loss has an affine set of interpolating minimisers (L* = 0). Every model "
            f"trains by full-batch GD from its seeded init and is evaluated at the first step whose training loss is "
            f"<= {o.target_loss:g} (matched training loss). Test metrics use the whole test split; distances are "
            f"relative to the minimum-norm interpolant `W_mn`; the null-space norm `|W (I - P_row)| / |W_mn|` is the "
            f"part of W the training data do not determine. Seeds: {', '.join(map(str, o.seeds))}. Cells: mean over "
            f"seeds [{100 * CONFIDENCE:g}% t-interval]. The DELM - linear row pairs the two models by seed (same "
            f"training samples); its tests are reported as measured, no threshold is tuned to them."
        ),
        "",
        *_figs(figures, "implicit bias"),
        table(
            [
                "model",
                "reached target",
                "steps",
                "test accuracy (%)",
                "test square loss",
                "|W - W_mn|/|W_mn|",
                "null-space norm",
            ],
            rows,
        ),
        "",
        *words,
        *([""] if words else []),
    ]
