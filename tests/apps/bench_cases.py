"""Problems, rows and command lines shared by the benchmark's test files."""

from __future__ import annotations

import json
import pathlib
import shlex

import jax
import numpy as np

from experiments.bench import cli

TINY = [
    "--n",
    "24",
    "--width",
    "12",
    "--classes",
    "3",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--settle",
    "0",
    "--data",
    "random",
]


def has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def load_json(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def make_row(
    name,
    impl,
    formulation,
    solver,
    backward,
    times,
    *,
    label="",
    tol=1e-5,
    converged=True,
    grad=1e-6,
    approximate=False,
    **extra,
):
    return dict(
        name=name,
        impl=impl,
        problem="delm",
        formulation=formulation,
        solver=solver,
        backward=backward,
        label=label,
        tol=tol,
        status="ok",
        converged=converged,
        approximate_gradient=approximate,
        grad_error={"A": grad, "B": grad} if grad is not None else {},
        times_s=list(times),
        min_s=min(times),
        median_s=float(np.median(times)),
        **extra,
    )


FULL = {"m": 784, "n": 1024, "m_y": 10, "device": "cpu"}


def help_examples() -> list[list[str]]:
    """The --help examples as argument lists (continuation lines joined, comments dropped)."""
    text = cli.EXAMPLES.split("\n", 1)[1].replace("\\\n", " ")
    return [shlex.split(line.split("#")[0])[4:] for line in text.splitlines() if line.strip()]


def cheap_argv(argv: list[str], tmp_path) -> list[str]:
    """An example made cheap and harmless: toy sizes, one timed step, files under tmp_path, whole-suite runs cut to
    one row; every flag of the example kept."""
    out = [str(tmp_path / pathlib.Path(a).name) if a.startswith("/tmp/") else a for a in argv]
    if "--list" in out:
        return out
    if "--render" in out or "--publish" in out:
        out += ["--docs-dir", str(tmp_path / "docs")]
    if "--render" in out:
        return out
    if "--rows" not in out:
        out += ["--rows", "^deq_jax delm transposed direct implicit$"]
    return out + TINY + ([] if "--warm-steps" in out else ["--warm-steps", "2"])
