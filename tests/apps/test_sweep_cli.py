"""`python -m experiments sweep` as a user meets it: a user error or an interruption is one line on stderr with the
documented exit status (2, 130), never a traceback, and nothing half-written or empty is left behind."""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
import yaml

from experiments.__main__ import main as experiments_main
from sweep_cases import DATA, PYTHON, ROOT, TINY, subprocess_env


def _leftovers(folder) -> list[str]:
    """Temporary files (atomic writes in flight) and empty folders under `folder`."""
    bad = [str(p) for p in folder.rglob(".*")]
    bad += [str(p) for p in folder.rglob("*") if p.is_dir() and not any(p.iterdir())]
    return bad


@pytest.mark.parametrize("case", ["malformed yaml", "missing file", "missing data", "sigma typo", "bad override",
                                  "bad flag value"])
def test_user_errors_are_one_line_exit_2_and_write_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "out")}))
    args, expect = {
        "malformed yaml": (["--config", "bad.yaml"], r"sweep: error: config file bad.yaml:3:6 is not valid YAML: expected "),
        "missing file": (["--config", "nowhere.yaml"], "sweep: error: config file 'nowhere.yaml' does not exist"),
        "missing data": (["--config", "sweep.yaml", "--data-dir", str(tmp_path),
                          "--set", "datasets=[{name: mnist, download: false}]"],
                         r"sweep: error: datasets\[0\] \(mnist\): .* pass --data-dir FOLDER"),
        "sigma typo": (["--config", "sweep.yaml", "--set", "grid.sigmas=[colum_softmax]"],
                       r"sweep: error: grid\.sigmas\[0\]: 'colum_softmax' is not a valid choice \(did you mean "
                       r"'column_softmax'\?\)"),
        "bad override": (["--config", "sweep.yaml", "--set", "steps"], "sweep: error: override 'steps' must look like"),
        "bad flag value": (["--config", "sweep.yaml", "--distributed", "--num-processes", "0"],
                           "sweep: error: --num-processes must be a positive integer; got 0"),
    }[case]
    (tmp_path / "bad.yaml").write_text("name: tiny\ndatasets: [{name: digits\nsteps: 3\n")
    assert experiments_main(["sweep", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert re.match(expect, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "sweep.yaml"]  # nothing written


def test_help_exits_0_and_documents_the_exit_statuses(capsys):
    assert experiments_main(["sweep", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--distributed" in text and "--coordinator HOST:PORT" in text and "130 interrupted" in text


def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing_half_written(tmp_path):
    config = tmp_path / "sweep.yaml"
    out = tmp_path / "out"
    config.write_text(yaml.safe_dump({**TINY, "datasets": [DATA], "dtype": "float32", "save_params": False,
                                      "grid": {**TINY["grid"], "models": ["linear"]}, "output_dir": str(out)}))
    # `python -m experiments sweep ...` with Python's Ctrl-C handler, even where the test runner ignores SIGINT
    # (a background job does, and a child inherits that)
    start = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "runpy.run_module('experiments', run_name='__main__')")
    proc = subprocess.Popen([PYTHON, "-c", start, "sweep", "--config", str(config), "--no-progress"],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = proc.stdout.readline()  # printed when the data are loaded and the computing starts
        assert started.startswith("sweep tiny: 6 configurations"), started + proc.stderr.read()
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sweep: interrupted; ") and "Traceback" not in stderr, stderr
    assert "run the same command again" in lines[0]
    assert not out.exists() or not _leftovers(out)  # nothing half-written, no empty folder
    if out.exists():  # a chunk finished before the signal: it is whole and marked with the sweep's fingerprint
        assert (out / "chunks" / "fingerprint.txt").exists() and list((out / "chunks").glob("chunk-*.npz"))
    assert not list(tmp_path.glob(".*"))
