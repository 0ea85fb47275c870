"""The examples run as written (in a subprocess, as a user runs them)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    """`examples/<name> args...` in a child process; its exit status must be 0 (asserted with its stderr)."""
    env = dict(os.environ)
    # an example compiles one training program; XLA's lowest optimisation level compiles it about 3x faster
    # (measured: 28 -> 10 CPU-s) and changes no result these tests check
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    ).strip()
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        env=env,
        cwd=ROOT,
        check=False,  # the exit status is asserted here, with the example's output
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_compose_example_trains_every_seed():
    out = run_example("compose.py", "--small")
    lines = [line for line in out.stdout.splitlines() if line.startswith("seed ")]
    assert len(lines) == 2
    for line in lines:
        first, last = (float(v) for v in line.split("loss ")[1].split(",")[0].split(" -> "))
        assert last < 0.7 * first, line  # trained: the cross-entropy fell
        assert line.endswith("every solve converged: True"), line


def test_fashion_deq_example_trains_and_writes_its_results(tmp_path):
    """The Fashion-MNIST DEQ example on a few hundred images (`--small`): it trains, reports its solves and writes
    its JSON and figure. Skipped where Fashion-MNIST is not on disk (the Debian package dataset-fashion-mnist)."""
    import json

    import pytest

    from experiments.common.datasets import DatasetNotFoundError, load_dataset

    try:
        load_dataset("fashion_mnist", download=False)
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not on disk (apt-get install dataset-fashion-mnist)")
    out = run_example("fashion_deq.py", "--small", "--out", str(tmp_path))
    epochs = [line for line in out.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2, out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    first, last = results["history"]
    assert last["loss"] < first["loss"]  # it trains
    assert first["forward_iterations"] > 3  # the spectral norm makes the layer deep: more than a few iterations
    assert last["forward_not_converged_total"] == 0 and last["backward_failures_total"] == 0
    assert 0.0 <= results["test_accuracy"] <= 1.0 and 0.8 < last["W_c_spectral_norm"] < 1.0
    assert (tmp_path / "training.png").stat().st_size > 10_000
