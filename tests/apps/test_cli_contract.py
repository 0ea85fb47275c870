"""The command line's contract, for every subcommand of `python -m experiments` (reproduce, sweep, bench, and the
entry point itself), run as a user runs it (a child process from the repository root):

- a malformed YAML config, a config file that does not exist, a data directory or data set that is not there, and
  a usage error are each ONE line on stderr (no traceback) and exit status 2, and write nothing;
- Ctrl-C (SIGINT, sent once the command has printed its first progress line) is one line on stderr and exit
  status 130;
- whatever a command leaves behind has no temporary file of an atomic write in flight, no empty folder, and every
  JSON file parses.

`bench` reads no YAML: its files are the benchmark result JSONs that `--render` reads, so its "malformed file" is a
malformed result JSON and its "missing file" a --docs-dir without benchmarks.md; its data set is Fashion-MNIST
(`--data fashion_mnist`), made absent by hiding the system copy. The cases run once per test session, all at once
(a few at a time), in one shared folder; each test then checks one promise of one case.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import threading

import pytest
import yaml
from sweep_cases import DATA, PYTHON, ROOT, TINY, subprocess_env

STARTUP_TIMEOUT_S = 120  # until the first progress line, on a loaded 2-core machine (~3-8 s when quiet)
TIMEOUT_S = 180  # a hang fails the test instead of stalling the suite
PARALLEL = 6  # processes at once: each imports jax (~2 CPU-s, ~250 MB)

# `python -m experiments ...` with Python's Ctrl-C handler (a child inherits an ignored SIGINT from a background
# test runner), and one test hook: CLI_CONTRACT_NO_SYSTEM_DATA=1 hides the system data folders (a machine without
# the Debian package of Fashion-MNIST)
LAUNCH = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
if os.environ.get("CLI_CONTRACT_NO_SYSTEM_DATA") == "1":
    from experiments.common.datasets import registry
    registry.SYSTEM_DATA_DIRS.clear()
runpy.run_module("experiments", run_name="__main__", alter_sys=True)
"""


@dataclasses.dataclass(frozen=True)
class Case:
    command: str
    name: str
    args: tuple[str, ...]  # {root}, {out} are filled in
    returncode: int
    message: str  # a regular expression the one stderr line must match (it names the flag, key or file)
    progress: str | None = None  # SIGINT after the first line on this stream ("stdout" / "stderr")
    env: tuple[tuple[str, str], ...] = ()
    output: str = "{out}"  # what the command may write: checked for leftovers (and, on a user error, unchanged)
    xfail_line: str | None = None
    xfail_files: str | None = None

    @property
    def id(self) -> str:
        return f"{self.command}-{self.name}"


TINY_REPRODUCE = ("--config", "configs/tiny.yaml", "--out", "{out}", "--no-progress")
BENCH_TINY = ("--suite", "step", "--rows", "direct", "--n", "16", "--width", "8", "--out", "{out}/step.json")
CASES = [
    Case(
        "experiments",
        "no_command",
        (),
        2,
        r"^python -m experiments: error: a command is required; commands: "
        r"reproduce, sweep, bench",
    ),
    Case(
        "experiments",
        "unknown_command",
        ("swep", "--config", "x.yaml"),
        2,
        r"^python -m experiments: error: unknown command 'swep' \(did you mean 'sweep'\?\)",
    ),
    Case(
        "reproduce",
        "malformed_yaml",
        ("--config", "{root}/bad.yaml", "--out", "{out}"),
        2,
        r"^reproduce: (configuration )?error: config file \S*bad\.yaml:3:6 is not valid YAML: expected",
    ),
    Case(
        "reproduce",
        "missing_config",
        ("--config", "{root}/nowhere.yaml", "--out", "{out}"),
        2,
        r"^reproduce: (configuration )?error: config file '\S*nowhere\.yaml' does not exist",
    ),
    Case(
        "reproduce",
        "missing_data_dir",
        (*TINY_REPRODUCE, "--data-dir", "{root}/no_such_folder"),
        2,
        r"^reproduce: .*no_such_folder.* does not exist .*--data-dir",
    ),
    Case(
        "reproduce",
        "usage",
        ("--out", "{out}", "--no-such-flag"),
        2,
        r"^.*reproduce: error: unrecognized arguments: --no-such-flag",
    ),
    Case("reproduce", "sigint", TINY_REPRODUCE, 130, r"^reproduce: interrupted", progress="stdout"),
    Case(
        "sweep",
        "malformed_yaml",
        ("--config", "{root}/bad.yaml", "--output-dir", "{out}"),
        2,
        r"^sweep: error: config file \S*bad\.yaml:3:6 is not valid YAML: expected",
    ),
    Case(
        "sweep",
        "missing_config",
        ("--config", "{root}/nowhere.yaml", "--output-dir", "{out}"),
        2,
        r"^sweep: error: config file '\S*nowhere\.yaml' does not exist",
    ),
    Case(
        "sweep",
        "missing_data",
        (
            "--config",
            "{root}/sweep.yaml",
            "--output-dir",
            "{out}",
            "--data-dir",
            "{root}/empty",
            "--set",
            "datasets=[{dataset: mnist, download: false}]",
        ),
        2,
        r"^sweep: error: datasets\[0\] \(mnist\): data set 'mnist' not found: downloading is off \(config key "
        r"datasets\[0\]\.download is false\)\. Missing: .* pass --data-dir FOLDER",
    ),
    Case(
        "sweep",
        "usage",
        ("--config", "{root}/sweep.yaml", "--output-dir", "{out}", "--no-such-flag"),
        2,
        r"^sweep: error: unrecognized arguments: --no-such-flag \(see --help\)$",
    ),
    Case(
        "sweep",
        "sigint",
        ("--config", "{root}/sweep.yaml", "--output-dir", "{out}", "--no-progress"),
        130,
        r"^sweep: interrupted; .*run the same command again",
        progress="stdout",
    ),
    Case(
        "bench",
        "malformed_json",
        ("--render", "--docs-dir", "{root}/docs"),
        2,
        r"^python -m experiments bench: error: \S*bench-step\.json: not valid JSON",
        output="{root}/docs",
    ),
    Case(
        "bench",
        "missing_file",
        ("--render", "--docs-dir", "{root}/no_docs"),
        2,
        r"^python -m experiments bench: error: --render: \S*no_docs/benchmarks\.md does not exist",
        output="{root}/no_docs",
    ),
    Case(
        "bench",
        "missing_data",
        (*BENCH_TINY, "--data", "fashion_mnist"),
        2,
        r"^python -m experiments bench: error: --data fashion_mnist: Fashion-MNIST is not on disk",
        env=(("CLI_CONTRACT_NO_SYSTEM_DATA", "1"),),
    ),
    Case(
        "bench",
        "usage",
        ("--suite", "nope", "--out", "{out}/step.json"),
        2,
        r"^python -m experiments bench: error: argument --suite: invalid choice: 'nope'",
    ),
    Case(
        "bench",
        "sigint",
        (*BENCH_TINY, "--data", "random"),
        130,
        r"^python -m experiments bench: interrupted",
        progress="stdout",
    ),
]


def _tree(root: pathlib.Path) -> None:
    """The shared inputs: a malformed YAML, a tiny sweep, an empty folder, docs with a malformed result JSON."""
    (root / "bad.yaml").write_text("name: tiny\ndatasets: [{dataset: digits\nsteps: 3\n")  # the list is never closed
    sweep = {
        **TINY,
        "datasets": [DATA],
        "dtype": "float32",
        "save_params": False,
        "grid": {**TINY["grid"], "models": ["linear"]},
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    (root / "empty").mkdir()
    (root / "cache").mkdir()
    (root / "docs" / "results").mkdir(parents=True)
    (root / "docs" / "benchmarks.md").write_text(
        "# Benchmarks\n\n<!-- bench:begin step table -->\n<!-- bench:end -->\n"
    )
    (root / "docs" / "results" / "bench-step.json").write_text('{"suite": "step", "rows": [\n')


def _snapshot(folder: pathlib.Path) -> dict[str, str]:
    """Every file (its SHA-256) and folder ("dir") under `folder`, by relative path."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def _leftovers(folder: pathlib.Path, before: dict[str, str]) -> list[str]:
    """Temporary files of atomic writes (`.NAME.XXXX.tmp`), empty folders, JSON files that do not parse, among
    what the command wrote (the case's own inputs, as they were `before`, excepted)."""
    bad = []
    after = _snapshot(folder)
    for p in sorted(folder.rglob("*")) if folder.exists() else ():
        rel = str(p.relative_to(folder))
        if rel in before and before[rel] == after[rel]:
            continue
        if p.name.startswith(".") or p.name.endswith(".tmp"):
            bad.append(f"temporary file {p}")
        elif p.is_dir() and not any(p.iterdir()):
            bad.append(f"empty folder {p}")
        elif p.suffix == ".json":
            try:
                json.loads(p.read_text())
            except ValueError as err:
                bad.append(f"JSON that does not parse: {p} ({err})")
    return bad


def _run(case: Case, root: pathlib.Path) -> dict:
    out = root / "out" / case.id
    fill = lambda text: text.replace("{root}", str(root)).replace("{out}", str(out))
    output = pathlib.Path(fill(case.output))
    before = _snapshot(output)
    env = subprocess_env()
    env.update(DEQ_JAX_DATA_DIR=str(root / "cache"), DEQ_JAX_DATA_BASE_URL="http://127.0.0.1:9/", MPLBACKEND="Agg")
    env.update(case.env)
    command = [] if case.command == "experiments" else [case.command]  # "experiments": no subcommand
    proc = subprocess.Popen(
        [PYTHON, "-c", LAUNCH, *command, *map(fill, case.args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
    first = threading.Event()

    def drain(name: str, stream) -> None:
        for line in stream:
            lines[name].append(line)
            if name == case.progress:
                first.set()
        if name == case.progress:
            first.set()  # ended without a line: nothing to wait for

    readers = [threading.Thread(target=drain, args=(name, getattr(proc, name)), daemon=True) for name in lines]
    for reader in readers:
        reader.start()
    signalled = False
    if case.progress is not None:
        first.wait(STARTUP_TIMEOUT_S)
        if proc.poll() is None and lines[case.progress]:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
            signalled = True
    try:
        proc.wait(timeout=TIMEOUT_S)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        timed_out = True
    for reader in readers:
        reader.join()
    proc.stdout.close()  # read to the end by the readers; closed here, not left to the garbage collector
    proc.stderr.close()
    return {
        "returncode": proc.returncode,
        "stdout": "".join(lines["stdout"]),
        "stderr": "".join(lines["stderr"]),
        "signalled": signalled,
        "timed_out": timed_out,
        "output": str(output),
        "changed": before != _snapshot(output),
        "leftovers": _leftovers(output, before),
    }


@pytest.fixture(scope="session")
def outcomes(tmp_path_factory) -> dict[str, dict]:
    """Every case's outcome, computed once per session: under pytest-xdist the first worker to get here runs them
    (holding a lock in the workers' common folder) and the others read its results."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "cli_contract"
    shared.mkdir(exist_ok=True)
    with open(shared.parent / "cli_contract.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared.parent / "cli_contract.json"
        if not done.exists():
            _tree(shared)
            with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
                results = dict(zip([c.id for c in CASES], pool.map(lambda c: _run(c, shared), CASES), strict=True))
            done.write_text(json.dumps(results))
        return json.loads(done.read_text())


def _params(xfail_field: str) -> list:
    out = []
    for case in CASES:
        reason = getattr(case, xfail_field)
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def _describe(outcome: dict) -> str:
    return (
        f"exit status {outcome['returncode']}\n--- stderr:\n{outcome['stderr'][-3000:]}\n--- stdout:\n"
        f"{outcome['stdout'][-1000:]}"
    )


@pytest.mark.parametrize("case", _params("xfail_line"))
def test_one_line_on_stderr_and_the_documented_exit_status(case, outcomes):
    outcome = outcomes[case.id]
    assert not outcome["timed_out"], _describe(outcome)
    if case.progress is not None:
        assert outcome["signalled"], "no progress line before it ended:\n" + _describe(outcome)
    lines = [line for line in outcome["stderr"].splitlines() if line.strip()]
    assert "Traceback" not in outcome["stderr"] and len(lines) == 1, _describe(outcome)
    assert re.search(case.message, lines[0]), _describe(outcome)
    assert outcome["returncode"] == case.returncode, _describe(outcome)


@pytest.mark.parametrize("case", _params("xfail_files"))
def test_nothing_half_written_and_no_empty_folder(case, outcomes):
    outcome = outcomes[case.id]
    assert not outcome["leftovers"], outcome["leftovers"]
    if case.returncode == 2:  # a user error is found before anything is written
        assert not outcome["changed"], f"{outcome['output']} changed:\n" + _describe(outcome)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("where", ["running", "at a safe point"])
def test_an_interrupt_swallowed_on_its_way_is_not_lost(signum, where, capsys):
    """Ctrl-C landing in a garbage-collection callback (jax registers one) or a `__del__` is swallowed by Python
    ("Exception ignored ... KeyboardInterrupt", and the program runs on): the runner prints no such traceback and
    raises it again a moment later, wherever the command is, or at its next safe point (`interrupts.check`); the
    command stops with one line and exit status 130."""
    import time

    from experiments.common import cli, interrupts

    class Dropped:
        def __del__(self):
            signal.raise_signal(signum)  # the handler runs here, inside __del__

    ran_on = []

    def body() -> int:
        Dropped()
        if where == "at a safe point":
            interrupts.check()
        deadline = time.monotonic() + 5  # 100 times the delay before it is raised again
        while time.monotonic() < deadline:
            time.sleep(0.005)
        ran_on.append(True)
        return 0

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a runner may ignore it)
    try:
        assert cli.run("prog", body, interrupted="what was kept") == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert not ran_on and err.strip() == "prog: interrupted; what was kept", err
    interrupts.check()  # the request ends with the command
