"""The benchmark as a command: its help examples, its one-line user errors (exit 2), and Ctrl-C (exit 130, nothing
written)."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
from bench_cases import TINY, cheap_argv, has_gpu, help_examples, load_json, one_error_line
from helpers import ROOT

from experiments.bench import cli


def test_help_examples_run(tmp_path, capsys, x32):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    for result in (ROOT / "docs" / "results").glob("bench-*.json"):  # the committed results, for --render
        shutil.copy(result, tmp_path / "docs" / "results")
    shutil.copy(ROOT / "docs" / "benchmarks.md", tmp_path / "docs")
    examples = help_examples()
    assert len(examples) >= 7 and any("--publish" in a for a in examples) and any("--render" in a for a in examples)
    for argv in examples:
        cheap = cheap_argv(argv, tmp_path)
        assert cli.main(cheap) == 0, (argv, capsys.readouterr())
        for flag in ("--out", "--plot"):
            if flag in cheap:
                assert pathlib.Path(cheap[cheap.index(flag) + 1]).stat().st_size > 0
    assert (tmp_path / "docs" / "results" / "bench-step.json").is_file()
    (refine,) = [r for r in load_json(tmp_path / "refine.json")["rows"] if r["solver"] == "refine"]
    assert refine["status"] == "ok" and refine["converged"] and "flag" not in refine
    assert refine["steps"] == 11 and refine["check_after_timing"]["converged"]  # --warm-steps 10, one timed step
    assert refine["refactorisations"] is not None and refine["backward_iterations_mean"] >= 1
    capsys.readouterr()


def test_bad_data_dir_is_one_line_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out.json"
    argv = ["--suite", "step", "--n", "8", "--width", "4", "--out", str(out)]
    assert cli.main([*argv, "--data-dir", str(tmp_path / "missing")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--data-dir" in line and "does not exist" in line
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not the published file")
    assert cli.main([*argv, "--data-dir", str(corrupt)]) == 2
    assert "is not the published file" in one_error_line(capsys.readouterr().err)
    assert cli.main([*argv, "--data", "random", "--data-dir", str(corrupt)]) == 2
    assert "--data random reads no files" in one_error_line(capsys.readouterr().err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["corrupt"]


def test_peer_suite_says_when_torch_is_missing(monkeypatch, capsys):
    from experiments.bench import torch_cases

    monkeypatch.setattr(
        torch_cases,
        "availability",
        lambda: {
            "torch": False,
            "torchdeq": False,
            "versions": {},
            "note": "torch is not installed (test); torch and torchdeq rows skipped. Install the optional extra",
        },
    )
    assert cli.main(["--suite", "peer", "--list"]) == 0
    printed = capsys.readouterr().out
    assert "note: torch is not installed" in printed
    names = [line for line in printed.splitlines() if not line.startswith("note:")]
    assert names and not [n for n in names if n.startswith("torch")]
    assert "deq_jax tanh per_sample anderson implicit" in names
    assert cli.main(["--suite", "peer", "--rows", "^torchdeq", "--list"]) == 2  # only torch rows: a user error
    assert "needs torch/torchdeq" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "0"], "--n must be a positive integer"),
        (["--gamma", "1.5"], "--gamma must be in the open interval (0, 1)"),
        (["--rows", "("], "--rows must be a regular expression"),
        (["--suite", "nope"], "invalid choice"),
        (["--device", "tpu"], "invalid choice"),
        (["--repeats", "x"], "invalid int value"),
        (["--suite", "step", "--rows", "no such row", "--list"], "no rows of suite 'step' match"),
        (["--suite", "profile", "--plot", "x.png"], "the profile suite has no figure"),
        (["--publish", "a/b"], "--publish NAME must be"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("python -m experiments bench: error:") and message in line


def test_gpu_suite_without_a_gpu_errors_clearly(tmp_path, capsys):
    if has_gpu():
        pytest.skip("this machine has a GPU")
    assert (
        cli.main(
            ["--suite", "gpu", "--n", "8", "--width", "4", "--data", "random", "--out", str(tmp_path / "gpu.json")]
        )
        == 2
    )
    line = one_error_line(capsys.readouterr().err)
    assert "--device gpu" in line and "no GPU" in line and "--device cpu" in line
    assert not list(tmp_path.iterdir())


def test_render_refuses_a_malformed_result(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "benchmarks.md").write_text("<!-- bench:begin step table -->\n<!-- bench:end -->\n")
    (tmp_path / "results" / "bench-step.json").write_text('{"suite": "step", "rows": [')
    assert cli.main(["--render", "--docs-dir", str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "bench-step.json: not valid JSON" in line
    (tmp_path / "results" / "bench-step.json").write_text('{"suite": "step"}')
    assert cli.main(["--render", "--docs-dir", str(tmp_path)]) == 2
    assert "not a benchmark result (missing command" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "benchmarks.md").read_text() == "<!-- bench:begin step table -->\n<!-- bench:end -->\n"
    assert cli.main(["--render", "--docs-dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in one_error_line(capsys.readouterr().err)


def test_sigint_stops_a_run_with_one_line_exit_130_and_nothing_written(tmp_path):
    out = tmp_path / "out" / "step.json"
    argv = [
        sys.executable,
        "-m",
        "experiments",
        "bench",
        "--suite",
        "step",
        *TINY,
        "--repeats",
        "1000",
        "--rows",
        "deq_jax delm transposed direct",
        "--out",
        str(out),
        "--plot",
        str(tmp_path / "step.png"),
    ]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # interrupt once the run has started (its header is printed)
            line = proc.stdout.readline()
            if not line or line.startswith("bench --suite step"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted; nothing was written" in one_error_line(err)
    assert not list(tmp_path.iterdir())  # no JSON, no figure, no folder, no temporary file
