"""A sweep over several processes on 127.0.0.1 (`--distributed`: jax.distributed, gloo collectives on CPU).

The 2-process test runs twice: first process 1 is killed (SIGKILL, as a crashed host) after the first chunk, once
process 0 has saved it, and process 0 must fail at once with one line and exit status 1, having saved that chunk
and no other; then the same commands resume and finish. The result equals the single-process sweep of this process
(same rows, numbers to 1e-6; in float64 they agree to rounding), and process 1, given its own output folder, writes
nothing there. Each process has 2 forced host devices, so the mesh has 4 devices over 2 processes. The 4-process
test (`slow`) checks the same equality with 4 processes of one device each.
"""

from __future__ import annotations

import csv
import socket
import subprocess

import numpy as np
import pytest
import yaml
from sweep_cases import PYTHON, ROOT, TINY, base_result, subprocess_env

TIMEOUT_S = 240  # a hang fails the test instead of stalling the suite; a healthy run takes ~10 s of CPU per process

# the command, in each process, with an optional crash after the first chunk (the test's only hook): the process
# named by SWEEP_TEST_DIE_AFTER_FIRST_CHUNK (process 0's chunk folder) is SIGKILLed once process 0 has saved that
# chunk. Killed as soon as it had its own outputs, it could take process 0 down inside the same chunk's collectives
# (measured on a loaded 2-core machine: nothing saved), which tests a different failure than the one meant here.
# After TIMEOUT_S // 2 without that chunk it dies anyway: the test then fails on the number of saved chunks.
LAUNCH = f"""
import glob, os, signal, sys, time
from experiments.sweep import cli, run
chunks = os.environ.get("SWEEP_TEST_DIE_AFTER_FIRST_CHUNK")
if chunks:
    original = run.run_sweep
    def die(report):
        deadline = time.monotonic() + {TIMEOUT_S // 2}
        while not glob.glob(os.path.join(chunks, "chunk-*.npz")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    def run_sweep(*args, **kwargs):
        return original(*args, on_chunk=die, **kwargs)
    run.run_sweep = run_sweep
sys.exit(cli.main(sys.argv[1:]))
"""

# TINY's linear groups (equal programs, so one compile per process): 2 data sets x 2 learning rates x 3 seeds, in
# chunks of 4 (one configuration per device): 2 chunks per group, 4 in all
CONFIG = {**TINY, "grid": {**TINY["grid"], "models": ["linear"]}, "save_params": False, "max_chunk_size": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, n_processes: int, devices_per_process: int, *, die: int | None = None) -> list[tuple]:
    """Start the processes, wait for all (bounded), return (returncode, stdout, stderr) per process.

    They share a persistent compilation cache (speed only): a rerun reads what the first run compiled."""
    port = _free_port()
    procs = []
    for i in range(n_processes):
        env = subprocess_env(devices=devices_per_process, x64=True)
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(tmp_path / "compilation_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
        if i == die:
            env["SWEEP_TEST_DIE_AFTER_FIRST_CHUNK"] = str(tmp_path / "out" / "chunks")
        out = tmp_path / ("out" if i == 0 else f"out_process_{i}")
        procs.append(
            subprocess.Popen(
                [
                    PYTHON,
                    "-c",
                    LAUNCH,
                    "--config",
                    str(tmp_path / "sweep.yaml"),
                    "--output-dir",
                    str(out),
                    "--no-progress",
                    "--no-figures",
                    "--distributed",
                    "--coordinator",
                    f"127.0.0.1:{port}",
                    "--num-processes",
                    str(n_processes),
                    "--process-id",
                    str(i),
                    "--init-timeout",
                    "60",
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT_S)
            results.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def _final_losses(path) -> dict:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return {
        (r["dataset"], float(r["learning_rate"]), int(r["seed"]), int(r["step"])): float(r["train_loss"]) for r in rows
    }


def _reference() -> dict:
    return {
        (r["dataset"], r["learning_rate"], r["seed"], r["step"]): r["train_loss"]
        for r in base_result().rows
        if r["model"] == "linear"
    }


def _check_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(got) == 12 * 3  # same rows: 12 configurations x 3 logged steps
    for key, value in got.items():
        assert value == pytest.approx(want[key], rel=1e-6), key


def test_two_processes_fail_loudly_when_one_dies_then_resume_to_the_single_process_numbers(tmp_path):
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(CONFIG))
    (rc0, out0, err0), (rc1, _, _) = _run(tmp_path, 2, 2, die=1)
    assert rc1 == -9  # killed after the first chunk was saved
    assert rc0 == 1, err0[-3000:]
    last = err0.strip().splitlines()[-1]
    assert (
        last.startswith("sweep [process 0]: error: the multi-process run lost a process")
        and "start the same commands again to resume" in last
    ), err0[-3000:]
    saved = list((tmp_path / "out" / "chunks").glob("chunk-*.npz"))
    assert len(saved) == 1 and not (tmp_path / "out" / "results.csv").exists()

    (rc0, out0, err0), (rc1, _out1, err1) = _run(tmp_path, 2, 2)
    assert (rc0, rc1) == (0, 0), err0[-3000:] + err1[-3000:]
    assert "3 chunks computed, 1 resumed" in out0 and "on 4 device(s) (map per device)" in out0
    assert not (tmp_path / "out_process_1").exists()  # only process 0 writes
    _check_equal(_final_losses(tmp_path / "out" / "results.csv"), _reference())


@pytest.mark.slow
def test_four_processes_give_the_single_process_numbers(tmp_path):
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(CONFIG))
    results = _run(tmp_path, 4, 1)
    assert [r[0] for r in results] == [0] * 4, "\n".join(r[2][-2000:] for r in results)
    assert "4 chunks computed, 0 resumed" in results[0][1] and "on 4 device(s) (vmap per device)" in results[0][1]
    assert not any((tmp_path / f"out_process_{i}").exists() for i in range(1, 4))
    _check_equal(_final_losses(tmp_path / "out" / "results.csv"), _reference())
    np.testing.assert_equal(
        sorted(p.name for p in (tmp_path / "out").iterdir()),
        ["aggregate.csv", "chunks", "results.csv", "results.jsonl", "summary.md", "sweep.json"],
    )
