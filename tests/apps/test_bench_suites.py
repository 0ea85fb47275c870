"""The benchmark's suites run in-process at tiny sizes: what each writes and lists, and the committed docs."""

from __future__ import annotations

import os

import pytest
from bench_cases import TINY, load_json
from helpers import ROOT

from experiments.bench import cases, cli, render, training


def test_step_suite_publishes_json_figure_and_docs(tmp_path, x32):
    (tmp_path / "benchmarks.md").write_text(
        "# t\n<!-- bench:begin step summary -->\n<!-- bench:end -->\n"
        "<!-- bench:begin step goals -->\nstale\n<!-- bench:end -->\n"
        "<!-- bench:begin step table -->\n<!-- bench:end -->\n"
        "<!-- bench:begin step training -->\n<!-- bench:end -->\n"
        "<!-- bench:begin step figure -->\n<!-- bench:end -->\n"
    )
    rc = cli.main(
        [
            "--suite",
            "step",
            *TINY,
            "--repeats",
            "2",
            "--warm-steps",
            "3",
            "--publish",
            "--docs-dir",
            str(tmp_path),
            "--rows",
            (
                "deq_jax delm transposed (direct implicit$|fixed_point unrolled)"
                "|lu_factor|per_sample fixed_point implicit (warm|zero start)"
            ),
        ]
    )
    assert rc == 0
    payload = load_json(tmp_path / "results" / "bench-step.json")
    env = payload["environment"]
    assert env["machine"]["cpu_model"] and env["machine"]["cpu_cores"] >= 1
    for package in ("python", "jax", "jaxlib", "jaxopt", "optax", "numpy"):
        assert env["versions"][package]
    assert env["variables"]["OPENBLAS_NUM_THREADS"] is not None and payload["device"]["jax_device_kind"]
    problem = payload["problem"]
    assert problem["learning_rate"] == pytest.approx(1 / problem["gauss_newton_lambda_max"])
    rows = {r["name"]: r for r in payload["rows"]}
    warm, zero = (f"deq_jax delm per_sample fixed_point implicit {label}" for label in training.LABELS)
    assert set(rows) == {
        "deq_jax delm transposed direct implicit",
        "inline delm transposed lu_factor",
        "deq_jax delm transposed fixed_point unrolled 100 it",
        warm,
        zero,
    }
    for row in rows.values():
        assert row["status"] == "ok", row
        assert len(row["times_s"]) == 2 and row["min_s"] > 0 and row["compile_s"] > 0
        assert row["temp_bytes"] is not None
    direct = rows["deq_jax delm transposed direct implicit"]
    assert direct["converged"] and direct["relative_residual"] < 1e-5 and max(direct["grad_error"].values()) < 1e-4
    lu = rows["inline delm transposed lu_factor"]  # its factors solve W U = B: the independent check applies
    assert lu["converged"] and lu["relative_residual"] < 1e-5 and lu["grad_error"] == {}
    unrolled = rows["deq_jax delm transposed fixed_point unrolled 100 it"]
    assert unrolled["iterations"] == cases.MEMORY_ITERATIONS and not unrolled["converged"]  # unreachable tol
    assert max(unrolled["grad_error"].values()) < 1e-3  # 100 iterations at gamma 0.9 still give a good gradient
    for name in (warm, zero):  # training runs: 3 untimed + 2 timed consecutive steps, checked twice
        row = rows[name]
        assert row["steps"] == 5 and row["first_timed_step"] == 3 and len(row["per_step"]["iterations"]) == 5
        assert row["converged"] and row["check_after_timing"]["converged"] and not row["steps_not_converged_own"]
        assert row["loss_fell"] and max(row["check_after_timing"]["grad_error"].values()) < 1e-3
        assert row["check_after_timing"]["relative_residual"] < 1e-5 and row["worst_sample_relative_residual"] < 1e-4
    assert rows[warm]["iterations_mean"] < rows[zero]["iterations_mean"]  # a warm start saves forward iterations
    statuses = {g["goal"]: g["status"] for g in payload["goals"]}
    lu_goal = next(g for g in statuses if "LU factorisation" in g)
    assert statuses[lu_goal] == "not applicable at this size"  # a m = 784 target says nothing about m = 12
    warm_goal = next(g for g in statuses if "warm-started" in g and "fixed_point" in g)
    assert statuses[warm_goal] == "not applicable at this size"
    assert statuses["never a non-converged solve reported as converged"] == "met"
    assert payload["figure"] == "benchmarks_step.png"
    assert (tmp_path / "benchmarks_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "stale" not in doc and "| inline delm transposed lu_factor |" in doc
    assert f"| {warm} | 5 (2) |" in doc  # the training table
    assert "[not applicable at this size]" in doc and "![step](benchmarks_step.png)" in doc
    assert "[met] transposed DELM" not in doc and "[met] per-sample" not in doc
    assert render.render_text(doc, tmp_path / "results")[0] == doc  # rendering is deterministic
    leftovers = [f for d, _, fs in os.walk(tmp_path) for f in fs if f.startswith(".")]
    assert not leftovers  # the atomic writes left no temporary file


def test_peer_suite_torchdeq_rows_verify_their_settings(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("torchdeq")
    out = tmp_path / "peer.json"
    # gamma 0.5: torchdeq's Anderson (absolute ridge 1e-4) needs > 100 iterations at gamma 0.9 on this tiny problem
    rc = cli.main(
        [
            "--suite",
            "peer",
            *TINY,
            "--gamma",
            "0.5",
            "--maxiter",
            "100",
            "--out",
            str(out),
            "--rows",
            "^torch(deq)? delm transposed (direct|anderson implicit)",
        ]
    )
    assert rc == 0
    rows = {r["name"]: r for r in load_json(out)["rows"]}
    assert set(rows) == {"torch delm transposed direct autodiff", "torchdeq delm transposed anderson implicit"}
    deq = rows["torchdeq delm transposed anderson implicit"]
    assert deq["status"] == "ok" and deq["settings_read_back"] == "all verified on the module"
    assert deq["settings"]["f_stop_mode"] == "abs" and deq["settings"]["f_max_iter"] == 100
    assert 0 < deq["iterations"] <= 100 and deq["torchdeq_abs_lowest"] <= deq["torchdeq_abs_tol"]
    assert deq["converged"] and deq["backward_iterations"] >= 1
    assert max(deq["grad_error"].values()) < 1e-3
    assert max(rows["torch delm transposed direct autodiff"]["grad_error"].values()) < 1e-4


def test_gpu_suite_code_path_on_cpu(tmp_path, x32):
    out = tmp_path / "gpu.json"
    rc = cli.main(
        ["--suite", "gpu", "--device", "cpu", *TINY, "--out", str(out), "--rows", "^deq_jax delm transposed direct"]
    )
    assert rc == 0
    payload = load_json(out)
    assert payload["suite"] == "gpu" and payload["settings"]["device"] == "cpu" and payload["problem"]["n"] == 24
    (row,) = payload["rows"]
    assert row["converged"] and max(row["grad_error"].values()) < 1e-4 and row["temp_bytes"] is not None
    statuses = {g["goal"]: g["status"] for g in payload["goals"]}
    assert statuses["DELM step <= 2 ms, transposed formulation"] == "not applicable at this size"


def test_profile_suite_finds_one_lu_factorisation(tmp_path, capsys, x32):
    out = tmp_path / "profile.json"
    assert (
        cli.main(["--suite", "profile", *TINY, "--out", str(out), "--rows", "^(deq_jax step|softmax sigma)|bicgstab"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "[met] DELM step" not in printed  # the toy run must not claim the m = 784 target
    assert "[not applicable at this size] DELM step <= 10 ms" in printed
    payload = load_json(out)
    facts = payload["facts"]["deq_jax_step"]
    assert facts["getrf_calls"] == 1 and facts["jaxpr_lu_primitives"] == 1
    assert [r["kind"] for r in payload["rows"]] == ["component", "step"]
    (solver,) = payload["backward_solvers"]  # the backward linear solver reached its tolerance
    assert solver["name"] == "bicgstab" and solver["products"] >= 1 and solver["relative_residual"] <= 1e-5
    statuses = {g["goal"].split(" (")[0]: g["status"] for g in payload["goals"]}
    assert statuses["one LU factorisation per step"] == "met"


@pytest.mark.parametrize("suite", ["step", "peer", "gpu", "profile"])
def test_every_suite_lists_its_rows(suite, capsys):
    assert cli.main(["--suite", suite, "--list"]) == 0
    names = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("note:")]
    assert len(names) >= 4 and len(set(names)) == len(names)


def test_committed_benchmark_docs_are_what_their_jsons_render_to():
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    rendered, count = render.render_text(text, ROOT / "docs" / "results")
    assert count >= 10 and rendered == text, "docs/benchmarks.md is stale: run python -m experiments bench --render"


def test_sweep_suite_is_handed_to_the_sweep_benchmark(capsys):
    assert cli.main(["--suite", "sweep", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--suite" not in out  # the sweep benchmark's own options, not bench's
