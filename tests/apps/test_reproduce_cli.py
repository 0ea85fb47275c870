"""The main job as a command: the whole job on a tiny config with the mutation test, resuming, its errors
(configuration, data, interrupts) and its help examples."""

from __future__ import annotations

import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import jax
import pytest
from helpers import ROOT
from reproduce_cases import TINY, read_summary, run_main

from experiments.common import io as reproduce_io
from experiments.reproduce import cli as reproduce
from experiments.reproduce import report
from experiments.reproduce import runs as gd_runs


def test_tiny_job_end_to_end(tmp_path, capsys, monkeypatch, request):
    """One test (so that parallel workers never run the tiny job twice): the honest run, interrupted after a
    checkpoint and resumed, passes every claim and writes every output; a changed threshold re-judges without
    recomputing; every gradient-sensitive claim fails under the one-step gradient, in every experiment."""
    out = tmp_path / "results"
    previous_umask = os.umask(0o022)  # a user's usual umask: every result must come out readable (0644)
    request.addfinalizer(lambda: os.umask(previous_umask))
    # 1. the honest run, interrupted (as Ctrl-C or kill deliver it: KeyboardInterrupt) right after a checkpoint
    every = gd_runs.CHECKPOINT_EVERY_S
    monkeypatch.setattr(gd_runs, "CHECKPOINT_EVERY_S", 0.0)  # a checkpoint after every chunk
    saved = reproduce_io.CheckpointStore.save
    count = {"n": 0}

    def save_then_interrupt(self, key, arrays, meta=None):
        saved(self, key, arrays, meta)
        count["n"] += 1
        if count["n"] == 12:
            raise KeyboardInterrupt

    monkeypatch.setattr(reproduce_io.CheckpointStore, "save", save_then_interrupt)
    assert run_main(out=out) == 130
    err = capsys.readouterr().err
    assert "reproduce: interrupted; checkpoints are in" in err and "Traceback" not in err
    assert not (out / "tiny" / "summary.json").exists() and not list(out.rglob(".*.tmp"))
    monkeypatch.setattr(reproduce_io.CheckpointStore, "save", saved)
    monkeypatch.setattr(gd_runs, "CHECKPOINT_EVERY_S", every)
    assert run_main(out=out) == 0  # resumed
    run_dir = out / "tiny"
    summary = read_summary(out)
    assert summary["all_passed"] and summary["mutation"] is None
    assert 0 < summary["runs_loaded"] < summary["runs_total"]  # the finished runs came from checkpoints
    claims = summary["claims"]
    assert {c["experiment"] for c in claims} == {"convergence", "trust_region", "implicit_bias"}
    for experiment in ("convergence", "trust_region", "implicit_bias"):  # each has a claim a wrong gradient fails
        assert any(c["gradient_sensitive"] for c in claims if c["experiment"] == experiment), experiment
    assert any("anderson transposed follows the exact DELM's path" in c["name"] for c in claims)
    assert any("anderson per_sample follows the exact DELM's path" in c["name"] for c in claims)
    assert summary["environment"]["versions"]["jax"] == jax.__version__
    conv = summary["experiments"]["convergence"]["groups"]
    assert {g["loss"] for g in conv} == {"square", "cross_entropy"}
    ib = summary["experiments"]["implicit_bias"]
    assert ib["n_train"] < ib["width"] and len(ib["runs"]) == 2 * 3 and all(r["reached"] for r in ib["runs"])
    assert (run_dir / "config.yaml").read_text().startswith("name: tiny")
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("experiment,run,loss_fn,model,width,seed,a_scale,step,loss")
    text = (run_dir / "REPORT.md").read_text()
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(links) == 4 and all((run_dir / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for link in links)
    assert "gradient-sensitive" in text and "PASS" in text and "FAIL" not in text
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(written) > 10 and {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}
    assert "[gradient-sensitive]" in capsys.readouterr().out
    monkeypatch.setattr(report, "make_figures", lambda results, fig_dir: {})  # drawn and checked once is enough

    # 2. a changed threshold re-judges the same numbers: nothing recomputed
    assert run_main("--set", "convergence.thresholds.path=1.0e-30", out=out) == 1
    rejudged = read_summary(out)
    assert rejudged["runs_loaded"] == rejudged["runs_total"] == summary["runs_total"]
    failed = [c["key"] for c in rejudged["claims"] if not c["passed"]]
    assert failed and all(k.endswith("follows_exact_path") for k in failed)
    assert [c["measured"] for c in rejudged["claims"]] == [c["measured"] for c in claims]
    assert rejudged["experiments"] == summary["experiments"]
    notes = (run_dir / "REPORT.md").read_text()  # the notes name the threshold that judged, not the default
    assert "<= 1.00e-30 of |W_0 - W*|" in notes and "<= 1.00e-07 of |W_0 - W*|" not in notes

    # 3. the mutation test: the one-step gradient fails every gradient-sensitive claim, in every experiment
    capsys.readouterr()
    assert run_main("--mutation", "one_step", out=out) == 0  # 0: the wrong gradient was caught
    mutated = read_summary(out, "tiny_one_step")
    assert mutated["mutation"] == "one_step" and mutated["runs_loaded"] > 0  # references read from the honest run
    sensitive = [c for c in mutated["claims"] if c["gradient_sensitive"]]
    assert sensitive and not any(c["passed"] for c in sensitive), [c["name"] for c in sensitive if c["passed"]]
    assert {c["experiment"] for c in sensitive} == {"convergence", "trust_region", "implicit_bias"}
    assert "MUTATION RUN" in (out / "tiny_one_step" / "REPORT.md").read_text()
    assert "wrong gradient was caught" in capsys.readouterr().out


def test_sigint_in_a_real_process_leaves_nothing_half_written(tmp_path):
    """SIGINT delivered by the OS while the job runs: one line naming where the checkpoints are, exit status 130,
    no traceback, no temporary or summary file."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments", "reproduce", "--config", TINY, "--out", str(out), "--no-progress"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until it trains (the results folder exists), then interrupt
        line = proc.stdout.readline()  # progress lines go to stdout; stderr carries only errors and interrupts
        lines.append(line)
        if "tiny ->" in line or not line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert err.strip().startswith("reproduce: interrupted; checkpoints are in"), err
    assert not list(out.rglob("*.tmp")) and not (out / "tiny" / "summary.json").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--set", "model.gama=0.5"], ["unknown key 'model.gama'", "did you mean 'gamma'"]),
        (["--set", "data.pca_dim=500"], ["data.pca_dim", "500"]),
        (["--set", "data.n_train=5000"], ["data.n_train", "1437", "5000"]),
        (["--set", "implicit_bias.n_train=5000"], ["implicit_bias.n_train (5000) exceeds"]),
        (["--config", "no/such.yaml"], ["does not exist"]),
        (["--config", "MALFORMED"], ["is not valid YAML"]),
    ],
)
def test_user_errors_are_one_line_exit_2_and_write_nothing(args, fragments, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("name: tiny\ndata: {dataset: digits\nmodel: [\n")
    args = [str(tmp_path / "bad.yaml") if a == "MALFORMED" else a for a in args]
    out = tmp_path / "out"
    assert reproduce.main(["--config", TINY, "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("reproduce: digits:")]
    assert len(lines) == 1 and lines[0].startswith("reproduce: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    assert not out.exists()  # no empty results/<run>/checkpoints behind


def test_missing_data_set_through_the_cli(tmp_path):
    """An offline user without the files: exit status 2, one line naming --data-dir, no traceback, nothing
    written."""
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "DEQ_JAX_DATA_DIR": str(tmp_path / "cache"),
        "DEQ_JAX_DATA_BASE_URL": "http://127.0.0.1:9/{name}/",
    }  # a closed port: offline, at once
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments",
            "reproduce",
            "--config",
            str(ROOT / "configs" / "mnist.yaml"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,  # the exit status is the subject of the test
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("reproduce: error: data set 'mnist' not found")
    assert "train-images-idx3-ubyte.gz" in lines[0] and "--data-dir" in lines[0] and str(tmp_path / "cache") in lines[0]
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").rglob("*.gz"))


def test_every_help_example_is_valid(tmp_path, capsys):
    """Every example `--help` shows is valid for the shipped configs: it runs (as a dry run: config, data, plan)."""
    assert reproduce.main(["--help"]) == 0
    text = capsys.readouterr().out
    for code, _ in reproduce.EXIT_STATUSES:  # the documented exit statuses are the ones the job uses
        assert f"\n  {code:<4} " in text
    assert [code for code, _ in reproduce.EXIT_STATUSES] == [0, 1, 2, 130]
    for args, _ in reproduce.EXAMPLES:
        assert f"{reproduce.PROG} {args}".rstrip() in text
        if "fashion_mnist_full" in args:
            continue  # 60000 images to load and whiten: test_full_fashion_mnist_example (marked slow)
        code = reproduce.main([*shlex.split(args), "--dry-run", "--out", str(tmp_path), "--no-progress"])
        assert code == 0, (args, capsys.readouterr().err)
    assert not list(tmp_path.iterdir())  # dry runs write nothing


@pytest.mark.slow
def test_full_fashion_mnist_example(tmp_path):
    if not pathlib.Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("the Debian package dataset-fashion-mnist is not installed")
    assert (
        reproduce.main(
            [
                "--config",
                str(ROOT / "configs" / "fashion_mnist_full.yaml"),
                "--dry-run",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )


def test_python_m_experiments_without_a_command(capsys):
    from experiments.__main__ import main

    for argv in ([], ["bogus"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "python -m experiments: error:" in err
    assert main(["--help"]) == 0 and "reproduce" in capsys.readouterr().out


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    reproduce_io.write_text(path, "one")

    def write_and_die():
        with reproduce_io.atomic_path(path) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_and_die()
    assert path.read_text() == "one" and sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def test_signals_are_taken_at_safe_points():
    """Inside the job, SIGINT only requests the interrupt (a KeyboardInterrupt raised inside a garbage-collection
    callback would be swallowed); `check()` raises it; a second signal raises at once."""
    from experiments.common import interrupts

    def sigint_self():  # the handler runs at the next bytecode boundary: during the sleep at the latest
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)

    with interrupts.safe_points():
        sigint_self()
        assert interrupts.requested()
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
        with pytest.raises(KeyboardInterrupt):
            sigint_self()
    assert not interrupts.requested() and signal.getsignal(signal.SIGINT) is signal.default_int_handler
