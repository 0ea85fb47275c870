"""Smoke tests of the benchmark code paths (`python -m experiments bench`) at tiny sizes; no timing assertions.

They check what the benchmark claims about correctness: its float64 reference gradients, the independent residual
and gradient checks of each row, torchdeq reading back our settings, the unrolled-vs-implicit memory rows running
exactly 100 iterations, one LU per compiled step, the GPU mode's error without a GPU, and the JSON it writes.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import cli as bench, common as bench_common

TINY = ["--n", "24", "--width", "12", "--classes", "3", "--repeats", "1", "--warmup", "0", "--settle", "0",
        "--data", "random"]


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _load(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def test_delm_reference_matches_float64_autodiff():
    p = bench_common.make_problem(n=20, width=7, classes=3, gamma=0.8, tol=1e-5, maxiter=50, learning_rate=1e-3,
                                  data="random")
    ref = bench_common.delm_reference(p)

    def loss(params):
        S = jax.nn.softmax(params["A"], axis=0)
        W = jnp.linalg.solve((jnp.eye(p.m, dtype=jnp.float64) - p.gamma * S).T, params["B"].T).T
        r = jnp.asarray(p.phi, jnp.float64) @ W.T - jnp.asarray(p.y, jnp.float64)
        return 0.5 * jnp.mean(jnp.sum(r * r, axis=1))

    params = {k: jnp.asarray(v, jnp.float64) for k, v in p.delm.items()}
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert abs(float(value) - ref["loss"]) <= 1e-12 * abs(ref["loss"])
    errors = bench_common.relative_errors({k: np.asarray(v) for k, v in grads.items()}, ref["grads"])
    assert max(errors.values()) < 1e-10, errors


def test_relative_residual_detects_a_wrong_state():
    p = bench_common.make_problem(n=10, width=6, classes=2, gamma=0.9, tol=1e-5, maxiter=50, learning_rate=1e-3,
                                  data="random")
    S = bench_common._softmax0(p.delm["A"].astype(np.float64))  # the numpy reference's softmax
    U = np.eye(p.m) - p.gamma * S
    z = np.linalg.solve(U, p.phi.astype(np.float64).T).T
    assert bench_common.relative_residual(p, "delm", "per_sample", z) < 1e-12
    assert bench_common.relative_residual(p, "delm", "per_sample", 0.9 * z) > 1e-3
    W = np.linalg.solve(U.T, p.delm["B"].astype(np.float64).T).T
    assert bench_common.relative_residual(p, "delm", "transposed", W) < 1e-12


def test_step_suite_rows_and_json(tmp_path):
    out = tmp_path / "step.json"
    rc = bench.main(["--suite", "step", *TINY, "--out", str(out),
                     "--rows", "deq_jax delm transposed (direct|fixed_point .*100 it)"])
    assert rc == 0
    payload = _load(out)
    assert payload["machine"]["cpu_model"] and payload["machine"]["cpu_cores"] >= 1
    for package in ("python", "jax", "jaxlib", "jaxopt", "optax", "numpy"):
        assert payload["versions"][package]
    assert payload["env"]["OPENBLAS_NUM_THREADS"] is not None
    rows = {r["name"]: r for r in payload["rows"]}
    assert set(rows) == {"deq_jax delm transposed direct implicit",
                         "deq_jax delm transposed fixed_point implicit 100 it",
                         "deq_jax delm transposed fixed_point unrolled 100 it"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert len(row["times_s"]) == 1 and row["min_s"] > 0 and row["compile_s"] > 0
        assert row["temp_bytes"] is not None
    direct = rows["deq_jax delm transposed direct implicit"]
    assert direct["converged"] and direct["relative_residual"] < 1e-5 and max(direct["grad_error"].values()) < 1e-4
    for backward in ("implicit", "unrolled"):
        row = rows[f"deq_jax delm transposed fixed_point {backward} 100 it"]
        assert row["iterations"] == bench.MEMORY_ITERATIONS and not row["converged"]  # unreachable tol by design
        assert max(row["grad_error"].values()) < 1e-3  # 100 iterations at gamma 0.9 still give a good gradient
    goals = [g["goal"] for g in payload["goals"]]
    assert any("temp memory" in g and "transposed" in g for g in goals)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".bench-")]  # atomic write left no temp file


def test_peer_suite_torchdeq_rows_verify_their_settings(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("torchdeq")
    out = tmp_path / "peer.json"
    # gamma 0.5: torchdeq's Anderson (absolute ridge 1e-4) needs > 100 iterations at gamma 0.9 on this tiny problem
    rc = bench.main(["--suite", "peer", *TINY, "--gamma", "0.5", "--maxiter", "100", "--out", str(out),
                     "--rows", "^torch(deq)? delm transposed (direct|anderson implicit)"])
    assert rc == 0
    rows = {r["name"]: r for r in _load(out)["rows"]}
    assert set(rows) == {"torch delm transposed direct autodiff", "torchdeq delm transposed anderson implicit"}
    deq = rows["torchdeq delm transposed anderson implicit"]
    assert deq["status"] == "ok" and deq["settings_read_back"] == "all verified on the module"
    assert deq["settings"]["f_stop_mode"] == "abs" and deq["settings"]["f_max_iter"] == 100
    assert 0 < deq["iterations"] <= 100 and deq["torchdeq_abs_lowest"] <= deq["torchdeq_abs_tol"]
    assert deq["converged"] and deq["backward_iterations"] >= 1
    assert max(deq["grad_error"].values()) < 1e-3
    assert max(rows["torch delm transposed direct autodiff"]["grad_error"].values()) < 1e-4


def test_peer_suite_says_when_torch_is_missing(monkeypatch, capsys):
    from experiments.bench import torch_cases as bench_torch

    monkeypatch.setattr(bench_torch, "availability", lambda: {
        "torch": False, "torchdeq": False, "versions": {},
        "note": "torch is not installed (test); torch and torchdeq rows skipped. Install the optional extra"})
    assert bench.main(["--suite", "peer", *TINY, "--list"]) == 0
    printed = capsys.readouterr().out
    assert "note: torch is not installed" in printed
    names = [line for line in printed.splitlines() if not line.startswith("note:")]
    assert names and not [n for n in names if n.startswith("torch")]
    assert "deq_jax tanh per_sample anderson implicit" in names


def test_gpu_suite_without_a_gpu_errors_clearly(capsys):
    if _has_gpu():
        pytest.skip("this machine has a GPU")
    assert bench.main(["--suite", "gpu", "--n", "8", "--width", "4", "--data", "random"]) == 2
    err = capsys.readouterr().err
    assert "--device gpu" in err and "no GPU" in err and "--device cpu" in err


def test_gpu_suite_code_path_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    rc = bench.main(["--suite", "gpu", "--device", "cpu", *TINY, "--out", str(out),
                     "--rows", "^inline delm transposed direct"])
    assert rc == 0
    payload = _load(out)
    assert payload["suite"] == "gpu" and payload["settings"]["device"] == "cpu" and payload["problem"]["n"] == 24
    (row,) = payload["rows"]
    assert row["converged"] and max(row["grad_error"].values()) < 1e-4 and row["temp_bytes"] is not None


def test_profile_suite_finds_one_lu_factorisation(tmp_path):
    out = tmp_path / "profile.json"
    assert bench.main(["--suite", "profile", *TINY, "--out", str(out)]) == 0
    payload = _load(out)
    facts = payload["facts"]["deq_jax_step"]
    assert facts["getrf_calls"] == 1 and facts["jaxpr_lu_primitives"] == 1
    assert max(payload["facts"]["hand_written_grad_error_vs_f64"].values()) < 1e-4
    assert {r["kind"] for r in payload["rows"]} == {"step", "component"}
    for solver in payload["backward_solvers"]:  # every backward linear solver reached its tolerance
        assert solver["products"] >= 1 and solver["relative_residual"] <= 1e-5


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "--n must be a positive integer"),
    (["--gamma", "1.5"], "--gamma must be in the open interval (0, 1)"),
    (["--rows", "("], "--rows must be a regular expression"),
    (["--suite", "nope"], "invalid choice"),
])
def test_bad_arguments_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_no_matching_rows_is_an_error(capsys):
    assert bench.main(["--suite", "step", *TINY, "--rows", "no such row"]) == 2
    assert "no rows" in capsys.readouterr().err
