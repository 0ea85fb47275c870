"""The figure of a step or peer run: one horizontal bar per row, the step's min time, the median as a tick.

Read as a reader would: rows whose gradient is approximate by design (the one-step backward) are fast because they
skip the backward solve, so they are not drawn among the others: they follow, below a rule, in their own group
headed "approximate gradient", hatched and labelled with their measured gradient error; rows that did not
converge, or ran a fixed number of iterations by design, say so in their label; rows that were skipped or failed
are listed with the reason instead of silently missing; the bare LU factorisation (a yardstick without gradient)
is grey; the legend lists only what is drawn.
"""

from __future__ import annotations

import io

import numpy as np

YARDSTICK = "bare LU factorisation (no gradient)"
COLOURS = {
    "deq_jax": "tab:blue",
    "inline": "tab:orange",
    "torchdeq": "tab:red",
    "torch": "tab:purple",
    YARDSTICK: "tab:gray",
}


def _label(row: dict, problem_tol: float) -> str:
    name = row["name"]
    if row["status"] != "ok":
        return f"{name}  [{row['status']}]"
    marks = []
    if not row.get("grad_error"):
        marks.append("no gradient: the yardstick")
    if row.get("approximate_gradient"):
        errors = list(row.get("grad_error", {}).values())
        marks.append("approximate gradient" + (f", error {max(errors):.1g}" if errors else ""))
    if not row.get("converged"):
        by_design = row.get("tol", problem_tol) < problem_tol
        marks.append(f"fixed {row['iterations']} iterations by design" if by_design else "NOT converged")
    return name + "".join(f"  [{m}]" for m in marks)


def _order(rows: list[dict]) -> tuple[list[dict], int]:
    """The rows with exact gradients first (in the suite's order), then the approximate ones; how many are exact."""
    exact = [r for r in rows if not r.get("approximate_gradient")]
    return exact + [r for r in rows if r.get("approximate_gradient")], len(exact)


def figure(payload: dict):
    """The matplotlib figure of a run's rows (the caller saves and closes it)."""
    import matplotlib  # here, not at start-up: ~0.5 s that a run without a figure never needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows, n_exact = _order(payload["rows"])
    tol = payload["problem"]["tol"]
    gap = 1.5 if 0 < n_exact < len(rows) else 0.0  # room for the approximate group's heading
    fig, ax = plt.subplots(figsize=(13, 0.38 * len(rows) + gap * 0.38 + 2.6), layout="constrained")
    ys = np.array([len(rows) - 1 - i + (gap if i < n_exact else 0.0) for i in range(len(rows))], float)
    drawn: list[str] = []  # the legend's entries, in the order they first appear
    any_approximate = False
    for y, row in zip(ys, rows, strict=True):
        if row["status"] != "ok":
            reason = row.get("error") or row.get("note") or ""
            ax.text(
                0.01,
                y,
                f"not run: {reason[:90]}",
                transform=ax.get_yaxis_transform(),
                va="center",
                fontsize=10,
                color="dimgray",
            )
            continue
        kind = row["impl"] if row.get("grad_error") else YARDSTICK
        colour = COLOURS.get(kind, "grey")
        approximate = bool(row.get("approximate_gradient"))
        any_approximate |= approximate
        ax.barh(
            y,
            row["min_s"] * 1e3,
            color="white" if approximate else colour,
            edgecolor=colour,
            hatch="///" if approximate else None,
            linewidth=1.2,
        )
        if kind not in drawn:
            drawn.append(kind)
    if gap:
        rule = len(rows) - n_exact + gap - 0.6  # just below the last exact row
        ax.axhline(rule, color="black", linewidth=0.8)
        ax.text(
            0.01,
            rule - 0.65,
            "approximate gradient (one-step backward): fast because they skip the\nbackward "
            "solve; not comparable with the rows above",
            transform=ax.get_yaxis_transform(),
            va="center",
            fontsize=10,
            style="italic",
        )
    ok = [(y, r) for y, r in zip(ys, rows, strict=True) if r["status"] == "ok"]
    if ok:
        ax.scatter([r["median_s"] * 1e3 for _, r in ok], [y for y, _ in ok], marker="|", color="black", s=140, zorder=3)
    ax.set_yticks(ys)
    ax.set_yticklabels([_label(r, tol) for r in rows], fontsize=10)
    for tick, row in zip(ax.get_yticklabels(), rows, strict=True):
        if row["status"] == "ok" and not row.get("converged") and row.get("tol", tol) >= tol:
            tick.set_color("tab:red")  # did not reach the tolerance it was asked for
        elif row.get("approximate_gradient") or row["status"] != "ok":
            tick.set_color("dimgray")
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("step time, ms (bar: min, tick: median; log scale)", fontsize=11)
    ax.tick_params(axis="x", labelsize=10)
    problem, env = payload["problem"], payload["environment"]
    fig.suptitle(
        f"{payload['suite']} suite: one training step (value and gradient + SGD update), n={problem['n']}, "
        f"m={problem['m']}, m_y={problem['m_y']}, float32\n{env['machine']['cpu_model']} "
        f"({env['machine']['cpu_cores']} cores), {payload['device']['jax_device_kind']}, "
        f"{payload['date'][:10]}",
        fontsize=11.5,
        x=0.01,
        ha="left",
    )
    handles = [Patch(facecolor=COLOURS.get(kind, "grey"), label=kind) for kind in drawn]
    if any_approximate:
        handles.append(
            Patch(facecolor="white", edgecolor="black", hatch="///", label="approximate gradient (one-step backward)")
        )
    if ok:
        handles.append(ax.scatter([], [], marker="|", color="black", s=140, label="median"))
    fig.legend(handles=handles, fontsize=10.5, loc="outside lower center", ncol=min(len(handles), 4), frameon=False)
    ax.grid(axis="x", which="both", alpha=0.3)
    return fig


def png(payload: dict, dpi: int = 110) -> bytes | None:
    """The figure as PNG bytes (rendered in memory, so that a failed or interrupted plot writes nothing)."""
    import matplotlib.pyplot as plt  # with the figure only (see `figure`)

    fig = figure(payload)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()
    finally:
        plt.close(fig)
