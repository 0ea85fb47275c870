"""`python -m experiments sweep` as a user meets it, in this process: a user error is one line on stderr naming the
flag or config key (exit status 2, no traceback, nothing written), and every example of `--help` runs as written.
(The same command in a child process, with Ctrl-C, is in test_cli_contract.py.)"""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from sweep_cases import TINY

from experiments.__main__ import main as experiments_main


@pytest.mark.parametrize(
    "case",
    [
        "malformed yaml",
        "missing file",
        "missing data",
        "sigma typo",
        "dataset typo",
        "bad override",
        "unknown flag",
        "bad flag value",
    ],
)
def test_user_errors_are_one_line_exit_2_and_write_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "out")}))
    args, expect = {
        "malformed yaml": (
            ["--config", "bad.yaml"],
            r"sweep: error: config file bad.yaml:3:6 is not valid YAML: expected ",
        ),
        "missing file": (["--config", "nowhere.yaml"], "sweep: error: config file 'nowhere.yaml' does not exist"),
        "missing data": (
            [
                "--config",
                "sweep.yaml",
                "--data-dir",
                str(tmp_path),
                "--set",
                "datasets=[{dataset: mnist, download: false}]",
            ],
            r"sweep: error: datasets\[0\] \(mnist\): .* pass --data-dir FOLDER",
        ),
        "sigma typo": (
            ["--config", "sweep.yaml", "--set", "grid.sigmas=[colum_softmax]"],
            (
                r"sweep: error: grid\.sigmas\[0\]: 'colum_softmax' is not a valid choice "
                r"\(did you mean 'column_softmax'\?\)"
            ),
        ),
        "dataset typo": (
            ["--config", "sweep.yaml", "--set", "datasets=[{dataset: fashion_minst}]"],
            (
                r"sweep: error: datasets\[0\]\.dataset: 'fashion_minst' is not a valid choice "
                r"\(did you mean 'fashion_mnist'\?\)"
            ),
        ),
        "bad override": (["--config", "sweep.yaml", "--set", "steps"], "sweep: error: override 'steps' must look like"),
        "unknown flag": (
            ["--config", "sweep.yaml", "--outptu-dir", "x"],
            r"sweep: error: unrecognized arguments: --outptu-dir x \(see --help\)$",
        ),
        "bad flag value": (
            ["--config", "sweep.yaml", "--distributed", "--num-processes", "0"],
            "sweep: error: --num-processes must be a positive integer; got 0",
        ),
    }[case]
    (tmp_path / "bad.yaml").write_text("name: tiny\ndatasets: [{dataset: digits\nsteps: 3\n")
    assert experiments_main(["sweep", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert re.match(expect, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "sweep.yaml"]  # nothing written


def _help_examples(text: str) -> list[list[str]]:
    """The commands of the --help text's examples, continuation lines joined, comments dropped."""
    commands, current = [], ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if current or line.strip().startswith(".venv/bin/python -m experiments"):
            current += " " + line.strip().rstrip("\\")
            if not line.endswith("\\"):
                commands.append(shlex.split(current))
                current = ""
    return commands


class _Ready(Exception):
    """Raised where the example's sweep would start preparing features: config, flags and data all valid."""


def test_help_examples_run_as_written_up_to_the_computation(tmp_path, capsys, monkeypatch):
    """Every example of `sweep --help`, run through the command as written (its own output folder moved to a
    temporary one): the flags parse, the config and the overrides validate, the data load and fit the settings,
    every group's memory plan is made; the sweep is stopped where the computing starts (the same command's
    computing is tested on TINY). The multi-process examples reach the processes' meeting and
    `jax.distributed.initialize` with their flags' values (both recorded here, since one process alone cannot meet
    its partner)."""
    import jax

    from experiments.sweep import cli, rendezvous
    from experiments.sweep import data as sweep_data

    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    examples = _help_examples(text)
    assert len(examples) == 7 and all(e[:4] == [".venv/bin/python", "-m", "experiments", "sweep"] for e in examples)
    assert "130 interrupted" in " ".join(text.split())

    def ready(*args, **kwargs):
        raise _Ready

    joined = []
    monkeypatch.setattr(sweep_data, "prepare_features", ready)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: joined.append(kwargs))
    met = []
    monkeypatch.setattr(rendezvous, "meet", lambda *args: met.append(args))
    monkeypatch.chdir(cli.__file__.rsplit("/experiments/", 1)[0])  # the repository root, as the examples say
    for i, example in enumerate(examples):
        with pytest.raises(_Ready):
            cli.main([*example[4:], "--output-dir", str(tmp_path / str(i)), "--no-progress"])
        assert capsys.readouterr().err == "", example
    assert [(j["coordinator_address"], j["num_processes"], j["process_id"]) for j in joined] == [
        ("127.0.0.1:12355", 2, 0),
        ("127.0.0.1:12355", 2, 1),
    ]
    assert met == [("127.0.0.1:12355", 2, 0, 300), ("127.0.0.1:12355", 2, 1, 300)]
    assert not list(tmp_path.iterdir())  # nothing written before the computing
