"""The command line's failures, attacked: "failure is data, never silence; exit 2 with one line; nothing
half-written; never delete before the new result exists", for every subcommand that writes.

- numbers: every config key and flag refuses what it cannot use where it enters (a non-finite float, an integer
  beyond 64 bits, a seed outside the range in which `jax.random.PRNGKey` gives distinct keys, an iteration count
  beyond int32), one line naming key, expectation and value, before anything is written;
- one run per output folder: a lock naming its owner refuses a second run; a dead owner's lock is taken over;
- a corrupted checkpoint is named (and left in place), exit 2, the previous results kept;
- an output that cannot be written (a file in the folder's place, a read-only folder, a full disk) is one line and
  exit 2: found before anything is computed where it can be, and at the end the previous results stay whole;
- a distributed sweep whose peer never comes, or whose coordinator cannot be reached: one line, exit 2, within the
  timeout (no C++ abort).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import yaml
from sweep_cases import DATA, PYTHON, ROOT, subprocess_env

from experiments.__main__ import main as experiments_main
from experiments.common import config as config_lib
from experiments.common import io, locks
from experiments.sweep import run as sweep_run
from experiments.sweep.grid import GroupKey

# the main job at its smallest: one feature set, square loss, 100 steps (~15 CPU-s; its runs then resume)
QUICK = {
    "name": "quick",
    "fast_compile": True,
    "data": {"dataset": "digits", "n_train": 60, "n_test": 20, "features": "pca_whiten", "pca_dim": 4},
    "model": {"depths": [2]},
    "convergence": {
        "feature_sets": [{"features": "data", "losses": ["square"], "models": ["delm", "linear"]}],
        "steps": 100,
        "chunk": 50,
    },
    "trust_region": {"enabled": False},
    "implicit_bias": {"enabled": False},
}
# a sweep of one linear configuration (one small program)
SWEEP = {
    "name": "one",
    "datasets": [DATA],
    "grid": {"seeds": [0], "learning_rates": [0.05], "models": ["linear"], "losses": ["square"]},
    "steps": 4,
    "log_every": 2,
    "dtype": "float32",
}
# a benchmark of a few tiny rows on random data
BENCH = ["--rows", "direct", "--n", "8", "--width", "4", "--data", "random"]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _snapshot(folder: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def configs(tmp_path) -> dict[str, pathlib.Path]:
    paths = {"quick": tmp_path / "quick.yaml", "sweep": tmp_path / "sweep.yaml"}
    paths["quick"].write_text(yaml.safe_dump(QUICK))
    paths["sweep"].write_text(yaml.safe_dump(SWEEP))
    return paths


# ---------------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("delm.tol=.inf", "delm.tol: expected a finite number; got inf"),
        ("delm.tol=.nan", "delm.tol: expected a finite number; got nan"),
        ("grid.learning_rates=[.inf]", "grid.learning_rates[0]: expected a finite number; got inf"),
        ("grid.gammas=[.nan]", "grid.gammas[0]: expected a finite number"),
        ("memory_budget_mb=.inf", "memory_budget_mb: expected a finite number"),
        ("linear.init_scale=-.inf", "linear.init_scale: expected a finite number"),
        ("grid.seeds=[4294967296]", "grid.seeds[0] must be an integer in 0 .. 2**32 - 1"),
        ("grid.seeds=[18446744073709551616]", "grid.seeds[0]: expected an integer that fits in 64 bits"),
        ("delm.maxiter=2147483648", "delm.maxiter must be an integer in 1 .. 2**31 - 1; got 2147483648"),
        ("steps=100000000000000000000", "steps: expected an integer that fits in 64 bits"),
        ("datasets=[{dataset: digits, seed: 4294967296}]", "datasets[0].seed must be an integer in 0 .. 2**32 - 1"),
        ("datasets=[{dataset: digits, projection_seed: -1}]", "datasets[0].projection_seed must be an integer in 0"),
    ],
)
def test_sweep_numbers_are_checked_where_they_enter(override, message, configs, tmp_path, capsys, no_compile):
    out = tmp_path / "out"
    assert (
        experiments_main(["sweep", "--config", str(configs["sweep"]), "--output-dir", str(out), "--set", override]) == 2
    )
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("sweep: error: ") and message in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=9223372036854775808", "seed: expected an integer that fits in 64 bits; got 9223372036854775808"),
        ("seed=4294967296", "seed must be an integer in 0 .. 2**32 - 1 (a seed of jax.random.PRNGKey); got 4294967296"),
        ("implicit_bias.seeds=[0, 4294967296]", "implicit_bias.seeds[1] must be an integer in 0 .. 2**32 - 1"),
        ("data.seed=-1", "data.seed must be an integer in 0 .. 2**32 - 1"),
        ("model.gamma=.nan", "model.gamma: expected a finite number; got nan"),
        ("convergence.learning_rate.scale=.inf", "convergence.learning_rate.scale: expected a finite number"),
        ("convergence.thresholds.path=.inf", "convergence.thresholds.path: expected a finite number"),
        (
            "convergence.feature_sets=[{variants: [{tol: .inf}]}]",
            "convergence.feature_sets[0].variants[0].tol: expected a finite number; got inf",
        ),
        (
            "convergence.feature_sets=[{variants: [{maxiter: 4294967296}]}]",
            "convergence.feature_sets[0].variants[0].maxiter must be an integer in 1 .. 2**31 - 1",
        ),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry_run"])
def test_reproduce_numbers_are_checked_before_anything_is_written(
    override, message, dry_run, configs, tmp_path, capsys
):
    out = tmp_path / "results"
    out.mkdir()
    (out / "quick").mkdir()
    (out / "quick" / "REPORT.md").write_text("the previous run's report\n")
    before = _snapshot(out)
    argv = ["reproduce", "--config", str(configs["quick"]), "--out", str(out), "--no-progress", "--set", override]
    assert experiments_main(argv + (["--dry-run"] if dry_run else [])) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("reproduce: error: ") and message in line, line
    assert _snapshot(out) == before  # no config.yaml rewritten, no report deleted


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--learning-rate", "inf"], "--learning-rate must be a finite number; got inf"),
        (["--learning-rate", "nan"], "--learning-rate must be a finite number; got nan"),
        (["--tol", "inf"], "--tol must be a finite number; got inf"),
        (["--gamma", "nan"], "--gamma must be a finite number; got nan"),
        (["--settle", "inf"], "--settle must be a finite number; got inf"),
        (["--max-temp-gb", "inf"], "--max-temp-gb must be a finite number"),
        (["--learning-rate", "0"], "--learning-rate must be a positive number; got 0.0"),
        (["--maxiter", "2147483648"], "--maxiter must be a positive integer (at most 2**31 - 1); got 2147483648"),
        (["--warmup", "-1"], "--warmup must be an integer >= 0"),
    ],
)
def test_bench_numbers_are_checked_where_they_enter(flags, message, tmp_path, capsys):
    out = tmp_path / "step.json"
    assert experiments_main(["bench", *BENCH, "--out", str(out), *flags]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("python -m experiments bench: error: ") and message in line, line
    assert not out.exists()


def test_every_float_key_is_finite_and_every_integer_fits_64_bits():
    """The rule lives in the one config loader, so every schema (and every future key) has it."""

    @dataclasses.dataclass(frozen=True)
    class Schema:
        x: float = 1.0
        n: int = 1
        xs: tuple[float, ...] = ()
        maybe: float | None = None

    for data, message in [
        ({"x": float("inf")}, "x: expected a finite number; got inf"),
        ({"x": 10**400}, "x: expected a finite number"),  # an integer too large for a float
        ({"xs": [1.0, float("nan")]}, "xs[1]: expected a finite number; got nan"),
        ({"maybe": float("-inf")}, "maybe: expected"),
        ({"n": 2**63}, "n: expected an integer that fits in 64 bits"),
        ({"n": -(2**63) - 1}, "n: expected an integer that fits in 64 bits"),
    ]:
        with pytest.raises(config_lib.ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
            config_lib.from_dict(Schema, data)
    assert config_lib.from_dict(Schema, {"x": 10**300, "n": 2**63 - 1}).n == 2**63 - 1


# -------------------------------------------------------------------------------------------------- the lock


def test_a_second_run_in_a_locked_folder_is_refused_naming_the_owner(tmp_path):
    out = tmp_path / "out"
    with locks.folder_lock(out, flag="--out") as path:
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["started"] > 0
        with pytest.raises(locks.FolderLocked) as err, locks.folder_lock(out, flag="--out"):
            pass
        assert f"--out {out} is in use by another run (pid {os.getpid()} on host {socket.gethostname()}" in str(
            err.value
        )
        assert "wait for it to finish, or choose another --out" in str(err.value)
        assert path.exists()  # the refused run leaves the owner's lock alone
    assert not out.exists()  # the lock made the folder and nothing else was written: gone with the lock


def test_a_dead_owners_lock_is_taken_over_with_a_message(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now (reused only after the kernel cycles through pids)
    out = tmp_path / "out"
    out.mkdir()
    record = {"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60, "command": "x"}
    (out / locks.LOCK_NAME).write_text(json.dumps(record))
    said = []
    with locks.folder_lock(out, flag="--out", log=said.append) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        (out / "result.txt").write_text("kept")
    assert len(said) == 1 and f"taking over the lock {path} of a run that is gone (pid {dead.pid}" in said[0]
    assert sorted(p.name for p in out.iterdir()) == ["result.txt"]  # the lock is released, the results stay


# a run racing for the folder's lock: it starts when told (the file `go`) and holds the lock until told (`release`)
RACE = """
import os, sys, time
from experiments.common import locks
print("ready", flush=True)
while not os.path.exists(sys.argv[2] + "/go"):
    time.sleep(0.01)
try:
    with locks.folder_lock(sys.argv[1], flag="--out", log=lambda line: None):
        print("got", flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(sys.argv[2] + "/release") and time.monotonic() < deadline:
            time.sleep(0.01)
except locks.FolderLocked:
    print("refused", flush=True)
"""


def test_runs_racing_for_a_dead_owners_lock_get_it_one_at_a_time(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    record = {"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60, "command": "x"}
    (out / locks.LOCK_NAME).write_text(json.dumps(record))
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", RACE, str(out), str(tmp_path)],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 4
    (tmp_path / "go").touch()
    said = sorted(p.stdout.readline().strip() for p in procs)  # all four tried while one holds it
    (tmp_path / "release").touch()
    for p in procs:
        p.communicate(timeout=60)
    assert said == ["got", "refused", "refused", "refused"], said
    assert not list(out.iterdir())


def test_a_lock_from_another_host_is_refused_with_the_file_to_delete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    record = {"pid": 1, "host": "elsewhere.example", "started": time.time(), "command": "x"}
    (out / locks.LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(locks.FolderLocked) as err, locks.folder_lock(out, flag="--output-dir"):
        pass
    assert "on host elsewhere.example, started " in str(err.value)
    assert f"if that run is gone, delete {out / locks.LOCK_NAME}, or choose another --output-dir" in str(err.value)


@pytest.mark.parametrize("command", ["reproduce", "sweep", "bench"])
def test_every_command_refuses_a_folder_that_another_run_holds(command, configs, tmp_path):
    """A child process, as a user runs it, while this process holds the lock (a run in progress): exit status 2,
    one line naming this process, and nothing written or removed."""
    out = tmp_path / "out"
    argv = {
        "reproduce": ["--config", str(configs["quick"]), "--out", str(out), "--run-name", "r", "--no-progress"],
        "sweep": ["--config", str(configs["sweep"]), "--output-dir", str(out / "r"), "--no-progress"],
        "bench": [*BENCH, "--out", str(out / "r" / "b.json")],
    }[command]
    name = "b.json.lock" if command == "bench" else locks.LOCK_NAME
    with locks.folder_lock(out / "r", flag="--out", name=name):
        (out / "r" / "previous.txt").write_text("the previous run's result\n")
        before = _snapshot(out)
        proc = subprocess.run(  # noqa: PLW1510 (the return code is asserted)
            [PYTHON, "-m", "experiments", command, *argv],
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = _one_line(proc.stderr)
        assert f"is in use by another run (pid {os.getpid()} on host {socket.gethostname()}" in line, line
        assert _snapshot(out) == before


def test_the_sweep_mismatch_advice_names_flags_that_exist(tmp_path):
    """Chunks of another sweep found when saving (it started after this one had looked): the advice names the
    sweep's flags (--output-dir, --fresh), never the main job's --run-name."""
    chunks = sweep_run._Chunks(tmp_path / "out", "this-sweep")
    (tmp_path / "out" / "chunks").mkdir(parents=True)
    (tmp_path / "out" / "chunks" / "fingerprint.txt").write_text("another-sweep\n")
    key = GroupKey("digits", None, "square", "linear", None, None)
    with pytest.raises(io.CheckpointMismatch) as err:
        chunks.save(key, [0], {"loss": [[0.0]]})
    assert "--output-dir" in str(err.value) and "--fresh" in str(err.value) and "--run-name" not in str(err.value)
    assert isinstance(err.value, io.UserError)  # one line, exit status 2


# ----------------------------------------------------------------------------------------- corrupt checkpoints


def test_a_corrupt_checkpoint_is_named_and_left_in_place(tmp_path):
    store = io.CheckpointStore(tmp_path / "ck")
    store.open("fp", fresh=False)
    store.save("run", {"x": [1.0, 2.0]}, {"steps": 2})
    path = store._path("run")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(io.CheckpointCorrupt, match=f"checkpoint {path} cannot be read .*BadZipFile.*--fresh"):
        store.load("run")
    assert path.exists()


def test_reproduce_with_a_corrupt_checkpoint_exits_2_and_keeps_the_previous_results(
    configs, tmp_path, capsys, monkeypatch
):
    """The run finds a truncated checkpoint where it looks for its first run (every key points at it here):
    one line naming the file and --fresh, exit 2, the previous run's report, summary and metrics untouched."""
    from experiments.reproduce import cli as reproduce_cli

    out = tmp_path / "results"
    run_dir = out / "quick"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("REPORT.md", "summary.json", "metrics.csv", "config.yaml"):
        (run_dir / name).write_text(f"the previous run's {name}\n")
    fp = io.fingerprint({"checkpoint_format": reproduce_cli.CHECKPOINT_FORMAT})
    (run_dir / "checkpoints" / "fingerprint.txt").write_text(fp + "\n")
    corrupt = run_dir / "checkpoints" / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    monkeypatch.setattr(io.CheckpointStore, "_path", lambda self, key: self.root / "corrupt.npz")
    before = _snapshot(out)
    argv = ["reproduce", "--config", str(configs["quick"]), "--out", str(out), "--no-progress"]
    assert experiments_main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"reproduce: error: checkpoint {corrupt} cannot be read") and "--fresh" in line, line
    assert _snapshot(out) == before


@pytest.mark.slow
def test_a_truncated_checkpoint_of_a_finished_run_in_a_real_process(configs, tmp_path):
    """The whole story in child processes: a finished run, one checkpoint truncated, the same command again."""
    out = tmp_path / "results"
    command = [PYTHON, "-m", "experiments", "reproduce", "--config", str(configs["quick"]), "--out", str(out)]
    run = lambda: subprocess.run(  # noqa: PLW1510 (the return code is asserted)
        [*command, "--no-progress"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    first = run()
    assert first.returncode in (0, 1) and (out / "quick" / "summary.json").exists(), first.stderr[-3000:]  # done
    victim = sorted((out / "quick" / "checkpoints").glob("*DELM*.npz"))[0]
    victim.write_bytes(victim.read_bytes()[:500])
    before = _snapshot(out)
    second = run()
    assert second.returncode == 2, second.stderr[-3000:]
    line = _one_line(second.stderr)
    assert f"checkpoint {victim} cannot be read (BadZipFile" in line and "--fresh" in line, line
    assert _snapshot(out) == before
    third = subprocess.run(  # noqa: PLW1510 (the return code is asserted)
        [*command, "--no-progress", "--fresh"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True
    )
    assert third.returncode == first.returncode, third.stderr[-3000:]  # --fresh: recomputed, the same verdict


# ------------------------------------------------------------------------------------ outputs that cannot be written


def test_an_output_path_that_is_a_file_is_refused_before_anything_runs(configs, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep\n")
    for argv, message in [
        (["reproduce", "--config", str(configs["quick"]), "--out", str(a_file)], f"--out/--run-name {a_file}/quick:"),
        (["sweep", "--config", str(configs["sweep"]), "--output-dir", str(a_file)], f"--output-dir {a_file}:"),
        (["bench", *BENCH, "--out", str(tmp_path)], f"--out {tmp_path} is a folder"),
        (["bench", *BENCH, "--out", str(a_file / "x.json")], f"--out {a_file}/x.json: {a_file} is a file, not a"),
    ]:
        assert experiments_main([*argv, "--no-progress"] if argv[0] != "bench" else argv) == 2, argv
        line = _one_line(capsys.readouterr().err)
        assert message in line, line
    assert a_file.read_text() == "keep\n"


def test_a_folder_that_cannot_be_written_is_found_before_anything_is_computed(
    configs, tmp_path, capsys, monkeypatch, no_compile
):
    """A read-only folder (simulated: the tests may run as root, whom permissions do not stop)."""

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(kwargs.get("dir", "")))

    monkeypatch.setattr(locks.tempfile, "mkstemp", denied)
    out = tmp_path / "out"
    assert experiments_main(["sweep", "--config", str(configs["sweep"]), "--output-dir", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("sweep: error: cannot write ") and "Permission denied (errno 13)" in line, line
    assert not out.exists()


def test_a_full_disk_at_the_end_keeps_the_previous_results_whole(configs, tmp_path, capsys, monkeypatch):
    """The sweep runs, then the same command again (its chunks resumed) on a disk that fills up while it writes
    summary.md: one line naming the file, exit 2, and every previous file as it was (the tables are replaced only
    together with the summary); no temporary file left."""
    out = tmp_path / "out"
    argv = ["sweep", "--config", str(configs["sweep"]), "--output-dir", str(out), "--no-progress", "--no-figures"]
    assert experiments_main(argv) == 0
    capsys.readouterr()
    before = _snapshot(out)
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        if "w" in mode and pathlib.Path(path).name.startswith(".summary.md."):
            fh.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return fh

    monkeypatch.setattr(io, "open", full_disk_open, raising=False)  # io.write_bytes's open
    assert experiments_main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == f"sweep: error: cannot write {out / 'summary.md'}: No space left on device (errno 28)", line
    assert _snapshot(out) == before


def test_staged_writes_replace_all_files_or_none(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "b.txt").write_text("old b")

    def fill_up():
        with io.staged():
            io.write_text(tmp_path / "a.txt", "new a")
            assert (tmp_path / "a.txt").read_text() == "old a"  # not yet
            raise io.write_error(tmp_path / "b.txt", OSError(errno.ENOSPC, "No space left on device"))

    with pytest.raises(io.WriteError, match=r"cannot write .*b\.txt: No space left on device"):
        fill_up()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporary file left
    assert (tmp_path / "a.txt").read_text() == "old a"
    with io.staged():
        io.write_text(tmp_path / "a.txt", "new a")
        io.write_bytes(tmp_path / "b.txt", b"new b")
    assert (tmp_path / "a.txt").read_text() + (tmp_path / "b.txt").read_text() == "new anew b"


def test_a_write_that_fails_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(io.WriteError, match=r"cannot write .*dir: Is a directory \(errno 21\)"):
        io.write_text(tmp_path / "dir", "x")  # a folder in the file's place
    (tmp_path / "f").write_text("a file")
    with pytest.raises(io.WriteError, match=r"cannot write .*f/x\.txt: .*/f is a file, not a folder$"):
        io.write_text(tmp_path / "f" / "x.txt", "x")
    assert not list(tmp_path.rglob(".*"))


# -------------------------------------------------------------------------------------- distributed: nobody comes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sweep_process(configs, out, port: int, process_id: int, n: int = 2, timeout: int = 3) -> subprocess.Popen:
    argv = [
        PYTHON,
        "-m",
        "experiments",
        "sweep",
        "--config",
        str(configs["sweep"]),
        "--output-dir",
        str(out),
        "--no-progress",
        "--distributed",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(n),
        "--process-id",
        str(process_id),
        "--init-timeout",
        str(timeout),
    ]
    return subprocess.Popen(
        argv, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, float]:
    start = time.monotonic()
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, time.monotonic() - start


def test_a_peer_that_never_joins_is_one_line_and_exit_2_within_the_timeout(configs, tmp_path):
    rc, err, _ = _finish(_sweep_process(configs, tmp_path / "out", _free_port(), 0))
    assert rc == 2, err[-3000:]
    line = _one_line(err)
    assert "only 1 of 2 processes joined" in line and "missing --process-id 1" in line and "within 3 s" in line, line
    assert not (tmp_path / "out").exists()


def test_an_unreachable_coordinator_is_one_line_and_exit_2_within_the_timeout(configs, tmp_path):
    rc, err, _ = _finish(_sweep_process(configs, tmp_path / "out", _free_port(), 1))
    assert rc == 2, err[-3000:]
    line = _one_line(err)
    assert "could not meet process 0 (the coordinator) at 127.0.0.1:" in line and "Connection refused" in line, line


def test_a_third_process_missing_fails_both_that_came(configs, tmp_path):
    """Process 1 reaches process 0 (it is started first and retries; its timeout ends before process 0's, so that a
    slow start of process 0 on a loaded machine still leaves it time to answer) and both wait for process 2."""
    port = _free_port()
    one = _sweep_process(configs, tmp_path / "out1", port, 1, n=3, timeout=6)
    zero = _sweep_process(configs, tmp_path / "out0", port, 0, n=3, timeout=8)
    (rc0, err0, _), (rc1, err1, _) = _finish(zero), _finish(one)
    assert (rc0, rc1) == (2, 2), err0[-2000:] + err1[-2000:]
    assert "only 2 of 3 processes joined" in _one_line(err0) and "missing --process-id 2" in err0
    assert "process 0 answered, but not all 3 processes joined" in _one_line(err1)


def test_a_process_id_taken_twice_is_refused(configs, tmp_path):
    port = _free_port()
    ones = [_sweep_process(configs, tmp_path / f"out{i}", port, 1, n=3, timeout=6) for i in (1, 2)]
    procs = [_sweep_process(configs, tmp_path / "out0", port, 0, n=3, timeout=8), *ones]  # as in the test above
    outcomes = [_finish(p) for p in procs]
    assert [rc for rc, _, _ in outcomes] == [2, 2, 2], [err[-1000:] for _, err, _ in outcomes]
    refused = [err for _, err, _ in outcomes[1:] if "another process with --process-id 1 has already joined" in err]
    assert len(refused) == 1 and _one_line(refused[0]), [err[-1000:] for _, err, _ in outcomes]
