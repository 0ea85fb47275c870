"""The figure of a step or peer run: one horizontal bar per row, the step's min time, the median as a tick.

Read as a reader would: rows whose gradient is approximate by design (the one-step backward) are hatched and
labelled "approximate gradient" with their measured error, since they are fast because they skip the backward
solve; rows that did not converge, or ran a fixed number of iterations by design, say so in their label; rows
that were skipped or failed are listed with the reason instead of silently missing; the bare LU factorisation (a
yardstick without gradient) is grey; the legend lists only what is drawn.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np

YARDSTICK = "bare LU factorisation (no gradient)"
COLOURS = {"deq_jax": "tab:blue", "inline": "tab:orange", "torchdeq": "tab:red", "torch": "tab:purple",
           YARDSTICK: "tab:gray"}


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


def figure(payload: dict):
    """The matplotlib figure of a run's rows (the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = payload["rows"]
    tol = payload["problem"]["tol"]
    fig, ax = plt.subplots(figsize=(12, 0.34 * len(rows) + 2.4), layout="constrained")
    ys = np.arange(len(rows))[::-1]
    drawn: list[str] = []  # the legend's entries, in the order they first appear
    any_approximate = False
    for y, row in zip(ys, rows):
        if row["status"] != "ok":
            reason = row.get("error") or row.get("note") or ""
            ax.text(0.01, y, f"not run: {reason[:90]}", transform=ax.get_yaxis_transform(), va="center",
                    fontsize=8.5, color="dimgray")
            continue
        kind = row["impl"] if row.get("grad_error") else YARDSTICK
        colour = COLOURS.get(kind, "grey")
        approximate = bool(row.get("approximate_gradient"))
        any_approximate |= approximate
        ax.barh(y, row["min_s"] * 1e3, color="white" if approximate else colour, edgecolor=colour,
                hatch="///" if approximate else None, linewidth=1.2)
        if kind not in drawn:
            drawn.append(kind)
    ok = [(y, r) for y, r in zip(ys, rows) if r["status"] == "ok"]
    if ok:
        ax.scatter([r["median_s"] * 1e3 for _, r in ok], [y for y, _ in ok], marker="|", color="black", s=120,
                   zorder=3)
    ax.set_yticks(ys)
    ax.set_yticklabels([_label(r, tol) for r in rows], fontsize=9)
    for tick, row in zip(ax.get_yticklabels(), rows):
        if row["status"] == "ok" and not row.get("converged") and row.get("tol", tol) >= tol:
            tick.set_color("tab:red")  # did not reach the tolerance it was asked for
        elif row.get("approximate_gradient") or row["status"] != "ok":
            tick.set_color("dimgray")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("step time, ms (bar: min, tick: median; log scale)", fontsize=10)
    ax.tick_params(axis="x", labelsize=9)
    problem, env = payload["problem"], payload["environment"]
    fig.suptitle(f"{payload['suite']} suite: one training step (value and gradient + SGD update), n={problem['n']}, "
                 f"m={problem['m']}, m_y={problem['m_y']}, float32\n{env['machine']['cpu_model']} "
                 f"({env['machine']['cpu_cores']} cores), {payload['device']['jax_device_kind']}, "
                 f"{payload['date'][:10]}", fontsize=10.5, x=0.01, ha="left")
    handles = [Patch(facecolor=COLOURS.get(kind, "grey"), label=kind) for kind in drawn]
    if any_approximate:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                             label="approximate gradient (one-step backward)"))
    if ok:
        handles.append(ax.scatter([], [], marker="|", color="black", s=120, label="median"))
    fig.legend(handles=handles, fontsize=9, loc="outside lower center", ncol=min(len(handles), 4), frameon=False)
    ax.grid(axis="x", which="both", alpha=0.3)
    return fig


def png(payload: dict, dpi: int = 110) -> Optional[bytes]:
    """The figure as PNG bytes (rendered in memory, so that a failed or interrupted plot writes nothing)."""
    import matplotlib.pyplot as plt

    fig = figure(payload)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()
    finally:
        plt.close(fig)
