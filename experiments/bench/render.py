"""docs/benchmarks.md's numbers, generated from the committed result JSONs (docs/results/bench-NAME.json).

The document holds generated blocks between two markers:

    <!-- bench:begin NAME PART -->
    ...written by `python -m experiments bench --render`; do not edit by hand...
    <!-- bench:end -->

NAME is the JSON's name (`step` for docs/results/bench-step.json, written by `bench --suite step --publish`) and
PART one of: `summary` (command, date, machine, load, wall time), `goals` (the goal lines the run printed),
`table` (its main table, as printed), `training` (the training-run rows side by side: warm starts),
`figure` (the PNG written with the JSON). Rendering is deterministic: the same JSONs give the same document, and a
test checks that the committed document is what its JSONs render to. A block whose JSON is not committed says so
("not measured with this code yet"; for the GPU results, "not measured: no GPU in this environment") instead of
showing numbers.
"""

from __future__ import annotations

import json
import pathlib
import re

from experiments.bench import report
from experiments.common import io
from experiments.common.cli import UserError

PARTS = ("summary", "goals", "table", "training", "figure")
BLOCK = re.compile(r"(<!-- bench:begin (?P<name>\S+) (?P<part>\S+) -->\n)(?P<body>.*?)(<!-- bench:end -->)", re.S)
REQUIRED = ("suite", "command", "date", "environment", "device", "problem", "goals", "rows")


def result_path(results_dir: pathlib.Path, name: str) -> pathlib.Path:
    return results_dir / f"bench-{name}.json"


def load_result(path: pathlib.Path) -> dict | None:
    """A committed result, None if there is none; `UserError` naming the file if it is not a benchmark result."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); rerun the benchmark command that writes it") from None
    missing = [key for key in REQUIRED if not isinstance(data, dict) or key not in data]
    if missing:
        raise UserError(
            f"{path}: not a benchmark result (missing {', '.join(missing)}); rerun the benchmark command that writes it"
        )
    return data


def _summary(name: str, data: dict) -> str:
    env, dev, pr = data["environment"], data["device"], data["problem"]
    machine, versions, variables = env["machine"], env["versions"], env["variables"]
    load_before, load_after = machine.get("load_average_1_5_15"), dev.get("load_average_after")
    load = "-" if not load_before else f"{load_before[0]:.1f}" + (f" -> {load_after[0]:.1f}" if load_after else "")
    wall = data.get("wall_s")
    return (
        f"Measured {data['date']} with `{data['command']}` "
        f"(JSON: [docs/results/bench-{name}.json](results/bench-{name}.json)): "
        f"{machine['cpu_model']}, {machine['cpu_cores']} cores, {dev.get('jax_device_kind', '-')}; "
        f"jax {versions.get('jax')}, jaxlib {versions.get('jaxlib')}"
        + (f", torch {versions['torch']}, torchdeq {versions.get('torchdeq')}" if versions.get("torch") else "")
        + f"; OPENBLAS_NUM_THREADS={variables.get('OPENBLAS_NUM_THREADS')}; load average {load}"
        + ("" if wall is None else f"; wall time {wall / 60:.1f} min")
        + f". Problem: n={pr['n']}, m={pr['m']}, m_y={pr.get('m_y')}, gamma={pr.get('gamma')}, "
        f"tol={pr.get('tol')}, float32, data: {pr.get('data')}"
        + (
            ""
            if pr.get("learning_rate") is None
            else f"; SGD step {pr['learning_rate']:.3g}"
            + (
                f" (1 / lambda_max of the Gauss-Newton matrix, {pr['gauss_newton_lambda_max']:.4g})"
                if pr.get("gauss_newton_lambda_max")
                else ""
            )
        )
        + "."
        + "".join(f"\n\nNote: {note.rstrip('.')}." for note in data.get("notes", []))
    )


def block(name: str, part: str, data: dict | None) -> str:
    """The text of one generated block (without its markers)."""
    if part not in PARTS:
        raise UserError(f"docs: unknown block part {part!r} for {name!r}; parts: {', '.join(PARTS)}")
    if data is None:
        if part == "summary" and name.startswith("gpu"):
            return (
                f"*Not measured (no GPU in this environment): `docs/results/bench-{name}.json` is not committed. "
                f"On a machine with a GPU, the command above writes it and fills in this section's blocks.*\n"
            )
        if part == "summary":
            return (
                f"*Not measured with this code yet: `docs/results/bench-{name}.json` is not committed (the "
                f"command above writes it and fills in this section's blocks).*\n"
            )
        if part == "figure":
            return ""
        return "*(not measured: no GPU in this environment)*\n" if name.startswith("gpu") else "*(not measured yet)*\n"
    if part == "summary":
        text = _summary(name, data)
    elif part == "goals":
        text = report.goals_text(data["goals"]) or "(no goals for this suite)"
    elif part == "table" and data["suite"] == "fashion":
        from experiments.bench.fashion_step import table  # its own table (paired ratios); imports the suite lazily

        text = table(data["rows"])
    elif part == "table":
        text = report.table(data["rows"]) if data["suite"] != "profile" else report.tables(data)
    elif part == "training":
        text = report.training_table(data["rows"]) or "(no training-run rows in this result)"
    else:
        figure = data.get("figure")
        text = f"![{name}]({figure})" if figure else ""
    return text + "\n" if text else ""


def render_text(text: str, results_dir: pathlib.Path) -> tuple[str, int]:
    """`text` with every generated block rewritten from the JSONs in `results_dir`; and the number of blocks."""
    cache: dict[str, dict | None] = {}
    count = 0

    def replace(match: re.Match) -> str:
        nonlocal count
        name, part = match["name"], match["part"]
        if name not in cache:
            cache[name] = load_result(result_path(results_dir, name))
        count += 1
        return match.group(1) + block(name, part, cache[name]) + match.group(5)

    return BLOCK.sub(replace, text), count


def render_file(doc: pathlib.Path, results_dir: pathlib.Path) -> tuple[bool, int]:
    """Rewrite `doc`'s generated blocks in place (atomically); returns (changed, number of blocks)."""

    if not doc.is_file():
        raise UserError(f"--render: {doc} does not exist (pass --docs-dir, the folder holding benchmarks.md)")
    old = doc.read_text()
    new, count = render_text(old, results_dir)
    if new != old:
        io.write_text(doc, new)
    return new != old, count
