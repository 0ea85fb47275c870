"""The benchmark application (`python -m experiments bench`) at tiny sizes; no timing assertions.

They check what the benchmark claims about correctness (its float64 references, the independent residual and
gradient checks of each row, a second check that refutes a training run's false claim, torchdeq reading back our
settings, the memory rows running exactly 100 iterations, one LU per compiled step, the step size it derives), how
its goals are judged (a target stated for m = 784 is "not applicable" at toy size; a warm start must be accurate
to count), what its CLI promises (every --help example runs; every suite's --list; one line and exit 2 for a user
error or a bad input file; exit 130 and nothing written on SIGINT), and that docs/benchmarks.md is what the
committed result JSONs render to.

The command line runs with x64 off, as a user's process does; the suite's session turns x64 on, so the in-process
runs below switch it off (`x32`).
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import cases, checks, cli, goals, render, training
from experiments.bench.problem import closed_form, gauss_newton_lambda_max, make_problem
from experiments.bench.protocol import Check

ROOT = pathlib.Path(__file__).resolve().parents[2]
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


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def x32():
    """x64 off for an in-process run of the command line (a user's process runs JAX with its default, float32)."""
    with jax.enable_x64(False):
        yield


# ----------------------------------------------------------------------------- references and checks

def test_delm_reference_matches_float64_autodiff():
    p = make_problem(n=20, width=7, classes=3, gamma=0.8, tol=1e-5, maxiter=50, learning_rate=1e-3, data="random")
    ref = checks.delm_reference(p)

    def loss(params):
        S = jax.nn.softmax(params["A"], axis=0)
        W = jnp.linalg.solve((jnp.eye(p.m, dtype=jnp.float64) - p.gamma * S).T, params["B"].T).T
        r = jnp.asarray(p.phi, jnp.float64) @ W.T - jnp.asarray(p.y, jnp.float64)
        return 0.5 * jnp.mean(jnp.sum(r * r, axis=1))

    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, jnp.float64) for k, v in p.delm.items()}
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert abs(float(value) - ref["loss"]) <= 1e-12 * abs(ref["loss"])  # two float64 routes to the same number
    errors = checks.relative_errors({k: np.asarray(v) for k, v in grads.items()}, ref["grads"])
    assert max(errors.values()) < 1e-10, errors


def test_relative_residual_detects_a_wrong_state():
    p = make_problem(n=10, width=6, classes=2, gamma=0.9, tol=1e-5, maxiter=50, learning_rate=1e-3, data="random")
    U = closed_form(p, p.delm["A"], p.delm["B"]).U  # the numpy reference's U = I - gamma sigma(A)
    z = np.linalg.solve(U, p.phi.astype(np.float64).T).T
    assert checks.relative_residual(p, "delm", "per_sample", z) < 1e-12
    assert checks.relative_residual(p, "delm", "per_sample", 0.9 * z) > 1e-3
    bad = z.copy()
    bad[3] *= 0.99  # one sample off: hidden in the whole state's norm, not in the worst sample's
    whole, worst = checks.residuals(p, "delm", "per_sample", bad)
    assert worst > 2 * whole and worst > 1e-3
    W = np.linalg.solve(U.T, p.delm["B"].astype(np.float64).T).T
    assert checks.relative_residual(p, "delm", "transposed", W) < 1e-12
    assert abs(checks.equilibrium_norm(p, "delm", "transposed") - np.linalg.norm(W)) <= 1e-12 * np.linalg.norm(W)


def test_gauss_newton_lambda_max_matches_the_dense_matrix():
    p = make_problem(n=15, width=5, classes=2, gamma=0.9, tol=1e-5, maxiter=50, learning_rate=None, data="random")
    phi = p.phi.astype(np.float64)

    def w_of(theta):  # (A, B) flattened -> row-major vec(W), from the closed form in float64
        return closed_form(p, theta[:25].reshape(5, 5), theta[25:].reshape(2, 5)).W.ravel()

    theta = np.concatenate([p.delm["A"].astype(np.float64).ravel(), p.delm["B"].astype(np.float64).ravel()])
    h = 1e-6  # central differences: error of order h^2, far below the 2e-3 asked of the eigenvalue
    J = np.stack([(w_of(theta + h * e) - w_of(theta - h * e)) / (2 * h) for e in np.eye(35)], axis=1)
    H = np.kron(np.eye(2), phi.T @ phi / p.n)  # vec(V C) for row-major vec(V)
    dense = np.linalg.eigvalsh(J.T @ H @ J)[-1]
    # a Rayleigh quotient never exceeds lambda_max (up to the differences' error); here the top two eigenvalues are
    # 0.1% apart, which slows the power iteration, and a step size needs no more than that
    estimate = gauss_newton_lambda_max(p)
    assert (1 - 2e-3) * dense <= estimate <= (1 + 1e-6) * dense
    assert p.learning_rate == pytest.approx(1.0 / estimate, rel=1e-12)


def test_profile_hand_written_step_has_the_closed_form_gradients():
    from experiments.bench import profile

    p = make_problem(n=20, width=7, classes=3, gamma=0.8, tol=1e-5, maxiter=50, learning_rate=1e-3, data="random")
    params = {k: jnp.asarray(v) for k, v in p.delm.items()}
    _, grads = jax.jit(profile._closed_form(p))(params, jnp.asarray(p.phi), jnp.asarray(p.y))
    errors = checks.relative_errors({k: np.asarray(v) for k, v in grads.items()}, checks.delm_reference(p)["grads"])
    assert max(errors.values()) < 1e-4, errors  # float32 LU solves of a well-conditioned U (gamma 0.8)


# ----------------------------------------------------------------------------- goals

def _row(name, impl, formulation, solver, backward, times, *, label="", tol=1e-5, converged=True, grad=1e-6,
         approximate=False, **extra):
    return dict(name=name, impl=impl, problem="delm", formulation=formulation, solver=solver, backward=backward,
                label=label, tol=tol, status="ok", converged=converged, approximate_gradient=approximate,
                grad_error={"A": grad, "B": grad} if grad is not None else {}, times_s=list(times),
                min_s=min(times), median_s=float(np.median(times)), **extra)


FULL = {"m": 784, "n": 1024, "m_y": 10, "device": "cpu"}


def test_goals_apply_only_at_the_size_they_are_stated_for():
    rows = [_row("direct", "deq_jax", "transposed", "direct", "implicit", [0.008, 0.009])]
    verdict = goals.judge([goals.step_time(0.010, goals.CPU_SIZE)], rows, size={**FULL, "m": 12, "n": 24}, tol=1e-5)
    assert verdict[0]["status"] == "not applicable at this size" and verdict[0]["met"] is None
    assert "defined at m=784" in verdict[0]["value"] and "this run: m=12" in verdict[0]["value"]
    assert goals.judge([goals.step_time(0.010, goals.CPU_SIZE)], rows, size=FULL, tol=1e-5)[0]["status"] == "met"
    assert goals.judge([goals.step_time(0.002, goals.GPU_SIZE)], rows, size=FULL, tol=1e-5)[0]["met"] is None
    missing = goals.judge([goals.overhead("per_sample", "anderson")], rows, size=FULL, tol=1e-5)[0]
    assert missing["status"] == "not measured"
    flagged = [dict(rows[0], flag="reported converged but the independent residual is above tol")]
    verdicts = goals.judge([goals.never_falsely_converged()], flagged, size={"m": 3}, tol=1e-5)
    assert verdicts[0]["status"] == "NOT met" and goals.failed_correctness(verdicts) == [verdicts[0]["goal"]]


def test_step_versus_lu_goal_takes_the_fastest_accurate_row_only():
    lu = _row("inline delm transposed lu_factor", "inline", "transposed", "lu_factor", "", [1.0, 1.0, 1.0],
              grad=None)
    direct = _row("direct", "deq_jax", "transposed", "direct", "implicit", [1.7, 1.6, 1.8], grad=5e-7)
    fast_but_approximate = _row("one", "deq_jax", "transposed", "anderson", "one_step", [0.3] * 3, grad=0.9,
                                approximate=True)
    fast_but_inaccurate = _row("fp", "deq_jax", "transposed", "fixed_point", "implicit", [0.4] * 3, grad=2e-4)
    fast_but_unconverged = _row("br", "deq_jax", "transposed", "broyden", "implicit", [0.4] * 3, converged=False)
    memory_row = _row("mem", "deq_jax", "transposed", "fixed_point", "implicit", [0.2] * 3, label="100 it",
                      tol=1e-30)
    good = _row("anderson", "deq_jax", "transposed", "anderson", "implicit", [0.69, 0.75, 0.6], grad=8e-6)
    goal = [goals.transposed_step_vs_lu()]
    rows = [lu, direct, fast_but_approximate, fast_but_inaccurate, fast_but_unconverged, memory_row]
    (verdict,) = goals.judge(goal, rows, size=FULL, tol=1e-5)
    assert verdict["status"] == "NOT met" and verdict["value"].startswith("direct / inline")  # 1.7x the LU
    (verdict,) = goals.judge(goal, rows + [good], size=FULL, tol=1e-5)
    assert verdict["status"] == "met" and verdict["value"].startswith("anderson / ")  # paired median 0.69
    assert "faster but less accurate: fp (0.40x" in verdict["value"]
    # a training run's gradient is judged against the direct training run's at the same point of the trajectory
    refine = _row("refine warm", "deq_jax", "transposed", "refine", "implicit", [0.5] * 3, label=training.WARM,
                  grad=5e-5)
    (verdict,) = goals.judge(goal, rows + [refine], size=FULL, tol=1e-5)
    assert verdict["status"] == "NOT met" and "refine warm (0.50x" in verdict["value"]  # 5e-5 > 10x 5e-7
    run_direct = _row("direct warm", "deq_jax", "transposed", "direct", "implicit", [1.7] * 3, label=training.WARM,
                      grad=8e-5)
    (verdict,) = goals.judge(goal, rows + [refine, run_direct], size=FULL, tol=1e-5)
    assert verdict["status"] == "met" and verdict["value"].startswith("refine warm / ")


def test_warm_start_goal_needs_the_speed_up_and_accurate_gradients():
    def run(label, times, grad=2e-5, converged=True, **extra):
        return _row(f"per_sample fixed_point {label}", "deq_jax", "per_sample", "fixed_point", "implicit", times,
                    label=label, grad=grad, converged=converged, iterations_mean=2.0 if label == "warm" else 90.0,
                    backward_iterations_mean=60.0, **extra)

    goal = [goals.warm_start_speedup("per_sample", "fixed_point")]
    zero = run(training.ZERO_START, [1.0, 1.1, 1.0])
    judge = lambda rows, size=FULL: goals.judge(goal, rows, size=size, tol=1e-5, gamma=0.9)[0]
    verdict = judge([run(training.WARM, [0.4, 0.5, 0.45]), zero])
    assert verdict["status"] == "met" and "2.0 + 60.0 warm vs 90.0 + 60.0 from zero" in verdict["value"]
    assert judge([run(training.WARM, [0.6, 0.6, 0.6]), zero])["status"] == "NOT met"  # 1.7x only
    # fast but wrong: a gradient error above max(tol / (1 - gamma), 2x the zero-start one) does not count
    assert judge([run(training.WARM, [0.4] * 3, grad=3e-4), zero])["status"] == "NOT met"
    assert judge([run(training.WARM, [0.4] * 3, converged=False), zero])["status"] == "NOT met"
    assert judge([run(training.WARM, [0.4] * 3, backward_converged=False), zero])["status"] == "NOT met"
    assert judge([run(training.WARM, [0.4] * 3), zero], {**FULL, "m": 12})["met"] is None
    assert judge([zero])["status"] == "not measured"
    compile_goal = goals.compile_time("training run")
    rows = [run(training.WARM, [0.4], compile_s=2.5), _row("d", "deq_jax", "transposed", "direct", "implicit",
                                                           [0.1], compile_s=0.5)]
    (verdict,) = goals.judge([compile_goal], rows, size=FULL, tol=1e-5)
    assert verdict["status"] == "NOT met" and "direct" not in verdict["value"]  # training runs only


def test_a_second_check_flags_a_claim_it_refutes():
    p = make_problem(n=10, width=6, classes=2, gamma=0.9, tol=1e-5, maxiter=50, learning_rate=None, data="random")
    params = {k: v * 1.01 for k, v in p.delm.items()}  # a training run's later parameters
    ref = checks.delm_reference(p, params)
    W = closed_form(p, params["A"], params["B"]).W
    row = {"problem": "delm", "formulation": "transposed", "converged": True}
    checks.verify_again(row, Check(1, True, W, ref["grads"], params=params), p, 1e-5, None, "check_after_timing")
    assert row["converged"] and "flag" not in row and row["check_after_timing"]["relative_residual"] < 1e-12
    assert max(row["check_after_timing"]["grad_error"].values()) < 1e-12
    assert checks.relative_residual(p, "delm", "transposed", W) > 1e-3  # judged at the run's parameters, not p's
    stale = W * (1 + 1e-3)  # a start that was never solved from, claimed converged
    checks.verify_again(row, Check(0, True, stale, ref["grads"], params=params), p, 1e-5, None, "check_after_timing")
    assert not row["converged"] and row["flag"].startswith(checks.FLAG)


# ----------------------------------------------------------------------------- suites, end to end

def test_step_suite_publishes_json_figure_and_docs(tmp_path, x32):
    (tmp_path / "benchmarks.md").write_text("# t\n<!-- bench:begin step summary -->\n<!-- bench:end -->\n"
                                            "<!-- bench:begin step goals -->\nstale\n<!-- bench:end -->\n"
                                            "<!-- bench:begin step table -->\n<!-- bench:end -->\n"
                                            "<!-- bench:begin step training -->\n<!-- bench:end -->\n"
                                            "<!-- bench:begin step figure -->\n<!-- bench:end -->\n")
    rc = cli.main(["--suite", "step", *TINY, "--repeats", "2", "--warm-steps", "3", "--publish", "--docs-dir",
                   str(tmp_path), "--rows", "deq_jax delm transposed (direct implicit$|fixed_point unrolled)"
                   "|lu_factor|per_sample fixed_point implicit (warm|zero start)"])
    assert rc == 0
    payload = _load(tmp_path / "results" / "bench-step.json")
    env = payload["environment"]
    assert env["machine"]["cpu_model"] and env["machine"]["cpu_cores"] >= 1
    for package in ("python", "jax", "jaxlib", "jaxopt", "optax", "numpy"):
        assert env["versions"][package]
    assert env["variables"]["OPENBLAS_NUM_THREADS"] is not None and payload["device"]["jax_device_kind"]
    problem = payload["problem"]
    assert problem["learning_rate"] == pytest.approx(1 / problem["gauss_newton_lambda_max"])
    rows = {r["name"]: r for r in payload["rows"]}
    warm, zero = (f"deq_jax delm per_sample fixed_point implicit {label}" for label in training.LABELS)
    assert set(rows) == {"deq_jax delm transposed direct implicit", "inline delm transposed lu_factor",
                         "deq_jax delm transposed fixed_point unrolled 100 it", warm, zero}
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
    rc = cli.main(["--suite", "peer", *TINY, "--gamma", "0.5", "--maxiter", "100", "--out", str(out),
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


def test_gpu_suite_code_path_on_cpu(tmp_path, x32):
    out = tmp_path / "gpu.json"
    rc = cli.main(["--suite", "gpu", "--device", "cpu", *TINY, "--out", str(out),
                   "--rows", "^deq_jax delm transposed direct"])
    assert rc == 0
    payload = _load(out)
    assert payload["suite"] == "gpu" and payload["settings"]["device"] == "cpu" and payload["problem"]["n"] == 24
    (row,) = payload["rows"]
    assert row["converged"] and max(row["grad_error"].values()) < 1e-4 and row["temp_bytes"] is not None
    statuses = {g["goal"]: g["status"] for g in payload["goals"]}
    assert statuses["DELM step <= 2 ms, transposed formulation"] == "not applicable at this size"


def test_profile_suite_finds_one_lu_factorisation(tmp_path, capsys, x32):
    out = tmp_path / "profile.json"
    assert cli.main(["--suite", "profile", *TINY, "--out", str(out), "--rows",
                     "^(deq_jax step|softmax sigma)|bicgstab"]) == 0
    printed = capsys.readouterr().out
    assert "[met] DELM step" not in printed  # the toy run must not claim the m = 784 target
    assert "[not applicable at this size] DELM step <= 10 ms" in printed
    payload = _load(out)
    facts = payload["facts"]["deq_jax_step"]
    assert facts["getrf_calls"] == 1 and facts["jaxpr_lu_primitives"] == 1
    assert [r["kind"] for r in payload["rows"]] == ["component", "step"]
    (solver,) = payload["backward_solvers"]  # the backward linear solver reached its tolerance
    assert solver["name"] == "bicgstab" and solver["products"] >= 1 and solver["relative_residual"] <= 1e-5
    statuses = {g["goal"].split(" (")[0]: g["status"] for g in payload["goals"]}
    assert statuses["one LU factorisation per step"] == "met"


# ----------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("suite", ["step", "peer", "gpu", "profile"])
def test_every_suite_lists_its_rows(suite, capsys):
    assert cli.main(["--suite", suite, "--list"]) == 0
    names = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("note:")]
    assert len(names) >= 4 and len(set(names)) == len(names)


def _examples() -> list[list[str]]:
    """The --help examples as argument lists (continuation lines joined, comments dropped)."""
    text = cli.EXAMPLES.split("\n", 1)[1].replace("\\\n", " ")
    return [shlex.split(line.split("#")[0])[4:] for line in text.splitlines() if line.strip()]


def _cheap(argv: list[str], tmp_path) -> list[str]:
    """An example made cheap and harmless: toy sizes, one timed step, files under tmp_path, whole-suite runs cut to
    one row; every flag of the example kept."""
    out = [str(tmp_path / pathlib.Path(a).name) if a.startswith("/tmp/") else a for a in argv]
    if "--list" in out:
        return out
    if "--render" in out or "--publish" in out:
        out += ["--docs-dir", str(tmp_path / "docs")]
    if "--render" in out:
        return out
    if "--rows" not in out:
        out += ["--rows", "^deq_jax delm transposed direct implicit$"]
    return out + TINY + ([] if "--warm-steps" in out else ["--warm-steps", "2"])


def test_help_examples_run(tmp_path, capsys, x32):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    for result in (ROOT / "docs" / "results").glob("bench-*.json"):  # the committed results, for --render
        shutil.copy(result, tmp_path / "docs" / "results")
    shutil.copy(ROOT / "docs" / "benchmarks.md", tmp_path / "docs")
    examples = _examples()
    assert len(examples) >= 7 and any("--publish" in a for a in examples) and any("--render" in a for a in examples)
    for argv in examples:
        cheap = _cheap(argv, tmp_path)
        assert cli.main(cheap) == 0, (argv, capsys.readouterr())
        for flag in ("--out", "--plot"):
            if flag in cheap:
                assert pathlib.Path(cheap[cheap.index(flag) + 1]).stat().st_size > 0
    assert (tmp_path / "docs" / "results" / "bench-step.json").is_file()
    (refine,) = [r for r in _load(tmp_path / "refine.json")["rows"] if r["solver"] == "refine"]
    assert refine["status"] == "ok" and refine["converged"] and "flag" not in refine
    assert refine["steps"] == 11 and refine["check_after_timing"]["converged"]  # --warm-steps 10, one timed step
    assert refine["refactorisations"] is not None and refine["backward_iterations_mean"] >= 1
    capsys.readouterr()


def test_bad_data_dir_is_one_line_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out.json"
    argv = ["--suite", "step", "--n", "8", "--width", "4", "--out", str(out)]
    assert cli.main([*argv, "--data-dir", str(tmp_path / "missing")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--data-dir" in line and "does not exist" in line
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not the published file")
    assert cli.main([*argv, "--data-dir", str(corrupt)]) == 2
    assert "is not the published file" in _one_error_line(capsys.readouterr().err)
    assert cli.main([*argv, "--data", "random", "--data-dir", str(corrupt)]) == 2
    assert "--data random reads no files" in _one_error_line(capsys.readouterr().err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["corrupt"]


def test_peer_suite_says_when_torch_is_missing(monkeypatch, capsys):
    from experiments.bench import torch_cases

    monkeypatch.setattr(torch_cases, "availability", lambda: {
        "torch": False, "torchdeq": False, "versions": {},
        "note": "torch is not installed (test); torch and torchdeq rows skipped. Install the optional extra"})
    assert cli.main(["--suite", "peer", "--list"]) == 0
    printed = capsys.readouterr().out
    assert "note: torch is not installed" in printed
    names = [line for line in printed.splitlines() if not line.startswith("note:")]
    assert names and not [n for n in names if n.startswith("torch")]
    assert "deq_jax tanh per_sample anderson implicit" in names
    assert cli.main(["--suite", "peer", "--rows", "^torchdeq", "--list"]) == 2  # only torch rows: a user error
    assert "needs torch/torchdeq" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "--n must be a positive integer"),
    (["--gamma", "1.5"], "--gamma must be in the open interval (0, 1)"),
    (["--rows", "("], "--rows must be a regular expression"),
    (["--suite", "nope"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
    (["--repeats", "x"], "invalid int value"),
    (["--suite", "step", "--rows", "no such row", "--list"], "no rows of suite 'step' match"),
    (["--suite", "profile", "--plot", "x.png"], "the profile suite has no figure"),
    (["--publish", "a/b"], "--publish NAME must be"),
])
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("python -m experiments bench: error:") and message in line


def test_gpu_suite_without_a_gpu_errors_clearly(tmp_path, capsys):
    if _has_gpu():
        pytest.skip("this machine has a GPU")
    assert cli.main(["--suite", "gpu", "--n", "8", "--width", "4", "--data", "random",
                     "--out", str(tmp_path / "gpu.json")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--device gpu" in line and "no GPU" in line and "--device cpu" in line
    assert not list(tmp_path.iterdir())


def test_render_refuses_a_malformed_result(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "benchmarks.md").write_text("<!-- bench:begin step table -->\n<!-- bench:end -->\n")
    (tmp_path / "results" / "bench-step.json").write_text('{"suite": "step", "rows": [')
    assert cli.main(["--render", "--docs-dir", str(tmp_path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "bench-step.json: not valid JSON" in line
    (tmp_path / "results" / "bench-step.json").write_text('{"suite": "step"}')
    assert cli.main(["--render", "--docs-dir", str(tmp_path)]) == 2
    assert "not a benchmark result (missing command" in _one_error_line(capsys.readouterr().err)
    assert (tmp_path / "benchmarks.md").read_text() == "<!-- bench:begin step table -->\n<!-- bench:end -->\n"
    assert cli.main(["--render", "--docs-dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)


def test_committed_benchmark_docs_are_what_their_jsons_render_to():
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    rendered, count = render.render_text(text, ROOT / "docs" / "results")
    assert count >= 10 and rendered == text, "docs/benchmarks.md is stale: run python -m experiments bench --render"


def test_sweep_suite_is_handed_to_the_sweep_benchmark(capsys):
    assert cli.main(["--suite", "sweep", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--suite" not in out  # the sweep benchmark's own options, not bench's


def test_sigint_stops_a_run_with_one_line_exit_130_and_nothing_written(tmp_path):
    out = tmp_path / "out" / "step.json"
    argv = [sys.executable, "-m", "experiments", "bench", "--suite", "step", *TINY, "--repeats", "1000",
            "--rows", "deq_jax delm transposed direct", "--out", str(out), "--plot", str(tmp_path / "step.png")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
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
    assert "interrupted; nothing was written" in _one_error_line(err)
    assert not list(tmp_path.iterdir())  # no JSON, no figure, no folder, no temporary file
