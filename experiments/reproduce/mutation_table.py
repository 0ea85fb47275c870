"""The mutation test's table: which claims fail when the DELMs are trained with which wrong gradient.

`python -m experiments reproduce --mutation-table` runs the honest job and one job per mutation
(`experiments/reproduce/mutations.py`), each in its own results folder with its own checkpoints, and writes
`<out>/<name>_mutations/MUTATIONS.md` and `mutations.json` from their summaries.
"""

from __future__ import annotations

import pathlib

from experiments.common.io import staged, write_json, write_text
from experiments.reproduce import mutations
from experiments.reproduce.report import fmt_measured, table


def rows(summaries: dict[str | None, dict]) -> list[dict]:
    """One row per claim (in the honest run's order): its verdict and number in every run."""
    order: dict[str, dict] = {}
    for summary in summaries.values():
        for c in summary["claims"]:
            order.setdefault(
                c["key"],
                {
                    "key": c["key"],
                    "experiment": c["experiment"],
                    "name": c["name"],
                    "gradient_sensitive": c["gradient_sensitive"],
                    "runs": {},
                },
            )
    for mutation, summary in summaries.items():
        for c in summary["claims"]:
            order[c["key"]]["runs"][mutation or "honest"] = {
                "passed": c["passed"],
                "measured": c["measured"],
                "threshold": c["threshold"],
                "comparison": c["comparison"],
            }
    return list(order.values())


def verdict(summaries: dict[str | None, dict]) -> dict:
    """Whether the honest run passed every claim and every mutation failed every gradient-sensitive claim; and, per
    mutation and experiment, how many gradient-sensitive claims failed."""
    honest = summaries.get(None)
    out = {"honest_passed": bool(honest and honest["all_passed"]), "mutations": {}}
    for mutation, summary in summaries.items():
        if mutation is None:
            continue
        per_experiment = {}
        for c in summary["claims"]:
            e = per_experiment.setdefault(c["experiment"], {"sensitive": 0, "sensitive_failed": 0, "failed": 0})
            e["failed"] += not c["passed"]
            if c["gradient_sensitive"]:
                e["sensitive"] += 1
                e["sensitive_failed"] += not c["passed"]
        out["mutations"][mutation] = {
            "caught": all(e["sensitive_failed"] == e["sensitive"] > 0 for e in per_experiment.values()),
            "experiments": per_experiment,
        }
    out["passed"] = out["honest_passed"] and all(m["caught"] for m in out["mutations"].values())
    return out


def markdown(summaries: dict[str | None, dict]) -> str:
    names = ["honest"] + [m for m in summaries if m is not None]
    lines = [
        "# Which claims fail under which wrong gradient",
        "",
        (
            "Each column is the whole main job with the DELMs under test trained as named (the exact reference of "
            "the convergence experiment is never mutated):"
        ),
        "",
    ]
    lines += [f"- `{m}`: {mutations.DESCRIPTIONS[m]}" for m in names if m != "honest"]
    commands = dict.fromkeys(s["command"] for s in summaries.values() if s)
    lines += ["", "Command" + ("s: " if len(commands) > 1 else ": ") + "; ".join(f"`{c}`" for c in commands), ""]
    body = []
    for r in rows(summaries):
        cells = []
        for m in names:
            v = r["runs"].get(m)
            cells.append(
                ""
                if v is None
                else ("PASS" if v["passed"] else "**FAIL**")
                + " ("
                + fmt_measured(v["measured"], v["threshold"], v["comparison"], digits=2)
                + ")"
            )
        body.append([r["experiment"], r["name"], "yes" if r["gradient_sensitive"] else "", *cells])
    lines += [table(["experiment", "claim", "gradient-sensitive", *names], body), ""]
    v = verdict(summaries)
    lines += ["Gradient-sensitive claims that failed, per experiment:", ""]
    for m, info in v["mutations"].items():
        parts = [f"{e} {d['sensitive_failed']}/{d['sensitive']}" for e, d in info["experiments"].items()]
        lines.append(
            f"- `{m}`: " + ", ".join(parts) + (" (caught everywhere)" if info["caught"] else " (NOT caught everywhere)")
        )
    lines.append("")
    return "\n".join(lines)


def write(out_dir: pathlib.Path, summaries: dict[str | None, dict]) -> int:
    """Write MUTATIONS.md and mutations.json; exit status 0 iff the honest run passed and every mutation was caught
    by every gradient-sensitive claim."""
    v = verdict(summaries)
    with staged():  # both or neither
        write_text(out_dir / "MUTATIONS.md", markdown(summaries))
        write_json(out_dir / "mutations.json", {"verdict": v, "claims": rows(summaries)})
    print(
        f"\nmutation table: {out_dir / 'MUTATIONS.md'}"
        + ("" if v["passed"] else " -- the honest run failed or a mutation was not caught")
    )
    return 0 if v["passed"] else 1
