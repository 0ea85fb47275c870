"""The main job (`python -m experiments reproduce`): its building blocks, its claims (and that they can fail), the
whole job on a tiny config with the mutation test, resuming, and its errors (configuration, data, interrupts).

Compilation dominates the time: the unit tests use the tiny config's shapes (m = 9, m_y = 10) where they compile,
and everything that runs the job is one test, so that pytest-xdist never runs the tiny job twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq_jax import losses, models, theory, train
from experiments.common import io as reproduce_io
from experiments.reproduce import (bounds, checkpoints, cli as reproduce, convergence, dynamics, mutation_table,
                                   mutations, report, runs as gd_runs)
from experiments.reproduce.common import Claim, checked, heldout_metrics, square_problem
from experiments.reproduce.config import load_config
from experiments.reproduce.implicit_bias import null_projector
from experiments.reproduce.trust_region import distance_to_polyline, plane_coordinates

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _data(n=9, m=9, k=10, seed=0):
    """Random data of the tiny config's shapes (m = 9 features, k = 10 classes), so that compiled programs are
    shared with the tiny job (on the Gram route they depend on m and k only)."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(n, m)) / 3  # lambda_max(phi^T phi / n) ~ 0.4: GD at eta = 0.05 is stable
    labels = rng.integers(0, k, n)
    return jnp.asarray(phi), jnp.asarray(np.eye(k)[labels]), labels


def _spec(model, trace=gd_runs.Trace(u_norm=True), mutation=None, **kwargs):
    """The tiny config's programs (fast compilation, the square loss on its Gram route unless told otherwise),
    shared with the tiny job where the shapes agree."""
    kwargs = {"loss": "square", "rows": None, "gram": True, **kwargs}
    return gd_runs.RunSpec(model, chunk=50, dtype=jnp.float64, trace=trace, mutation=mutation, fast_compile=True,
                           **kwargs)


DELM = models.DELM(9, 10)


# --------------------------------------------------------------------------------------------- building blocks

def test_chunked_runner_equals_full_batch_gd_on_the_samples():
    """The chunked runner on the Gram route is full_batch_gd on the samples, cut into pieces: the same losses and
    parameters to rounding (the Gram form sums in another order; the runner's program is compiled with the tiny
    config's fast options)."""
    model = DELM
    phi, Y, _ = _data()
    params = model.init(jax.random.PRNGKey(0), jnp.float64)
    ref_params, ref = train.full_batch_gd(model, "square", params, phi, Y, learning_rate=0.05, steps=100,
                                          warm_start=False)
    res = gd_runs.run_gd(_spec(model), params, train.square_gram(phi, Y), None, learning_rate=0.05, steps=100)
    assert res.history["loss"][-1] < 0.5 * res.history["loss"][0]  # a converging run: rounding cannot grow
    np.testing.assert_allclose(res.history["loss"], np.asarray(ref["loss"]), rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(res.W_final, np.asarray(model.end_to_end(ref_params)), rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(res.W0, np.asarray(model.end_to_end(params)), rtol=1e-12, atol=1e-15)
    assert list(res.logged_steps) == [0, 50, 100] and res.W_logged.shape == (3, 10, 9)


def test_runner_resumes_from_its_checkpoint_and_keys_it_by_its_inputs(tmp_path):
    """Stopping after 50 steps and continuing to 150 gives the numbers of an uninterrupted 150-step run; another
    learning rate or other data is another checkpoint, never a stale one."""
    phi, Y, _ = _data()
    gram = train.square_gram(phi, Y)
    params = DELM.init(jax.random.PRNGKey(1), jnp.float64)
    store = reproduce_io.CheckpointStore(tmp_path / "ck")
    store.open("fp", fresh=True)
    monitor = lambda p: {"norm_A": float(jnp.linalg.norm(p["A"]))}  # noqa: E731
    kwargs = dict(learning_rate=0.05, store=store, key="run", monitor=monitor, monitor_id="norm_A",
                  keep=("loss", "U_norm2", "grad_norm"))
    saved = reproduce_io.CheckpointStore.save
    calls = []

    def save_then_stop(self, key, arrays, meta=None):
        saved(self, key, arrays, meta)
        calls.append(meta["done"])
        if len(calls) == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gd_runs, "CHECKPOINT_EVERY_S", 0.0)
        mp.setattr(reproduce_io.CheckpointStore, "save", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            gd_runs.run_gd(_spec(DELM), params, gram, None, steps=150, **kwargs)
    assert calls == [50]
    resumed = gd_runs.run_gd(_spec(DELM), params, gram, None, steps=150, **kwargs)
    whole = gd_runs.run_gd(_spec(DELM), params, gram, None, steps=150, **{**kwargs, "store": None})
    for k in ("loss", "U_norm2", "grad_norm"):
        np.testing.assert_array_equal(resumed.history[k], whole.history[k])
    np.testing.assert_array_equal(resumed.W_logged, whole.W_logged)
    np.testing.assert_array_equal(resumed.monitored["norm_A"], whole.monitored["norm_A"])
    assert not resumed.from_checkpoint
    again = gd_runs.run_gd(_spec(DELM), params, gram, None, steps=150, **kwargs)  # finished: loaded, not rerun
    assert again.from_checkpoint and np.array_equal(again.history["loss"], whole.history["loss"])
    other = gd_runs.run_gd(_spec(DELM), params, gram, None, steps=150, **{**kwargs, "learning_rate": 0.04})
    assert not other.from_checkpoint and not np.array_equal(other.history["loss"], whole.history["loss"])
    other_data = train.square_gram(phi, 0.5 * Y)
    moved = gd_runs.run_gd(_spec(DELM), params, other_data, None, steps=150, **kwargs)
    assert not moved.from_checkpoint
    assert len(list((tmp_path / "ck").glob("*.npz"))) == 3


def test_runner_stop_and_capture():
    model = models.Linear(9, 10)
    phi, Y, _ = _data()
    gram = train.square_gram(phi, Y)
    params = model.init(jax.random.PRNGKey(2), jnp.float64)
    spec = _spec(model, gd_runs.Trace(W_every_step=True))
    ref = gd_runs.run_gd(spec, params, gram, None, learning_rate=0.05, steps=200, keep=("loss", "W"))
    level = 0.5 * float(ref.history["loss"][136] + ref.history["loss"][137])  # first crossed at step 137

    def stop(history, chunk, start):
        below = np.flatnonzero(chunk["loss"] < level)
        return None if below.size == 0 else {"step": np.asarray(start + below[0]), "W": chunk["W"][below[0]]}

    res = gd_runs.run_gd(spec, params, gram, None, learning_rate=0.05, steps=1000, stop=stop)
    assert res.stopped_early and res.steps == 150 and int(res.captured["step"]) == 137
    np.testing.assert_array_equal(res.captured["W"], ref.history["W"][137])


def test_cross_entropy_runs_carry_l2_through_the_penalty():
    """Cross-entropy + (l2/2)|W|_F^2 on the end-to-end matrix (make_step's penalty hook): the runner's losses are
    the regularised objective of `theory.shallow_optimum_cross_entropy`, computed independently, and equal
    full_batch_gd's with the same penalty (the tiny job's program: 150 samples, l2 = 0.3)."""
    phi, Y, labels = _data(n=150)
    params = DELM.init(jax.random.PRNGKey(3), jnp.float64)
    spec = _spec(DELM, loss="cross_entropy", rows=150, gram=False, l2=0.3)
    res = gd_runs.run_gd(spec, params, phi, Y, learning_rate=0.05, steps=50)
    W0 = theory.end_to_end(params["A"], params["B"], 0.8)
    want = float(losses.cross_entropy(phi @ W0.T, jnp.asarray(labels))) + 0.15 * float(jnp.sum(W0 * W0))
    assert res.history["loss"][0] == pytest.approx(want, rel=1e-13)
    penalty = lambda p: 0.15 * jnp.sum(DELM.end_to_end(p) ** 2)  # noqa: E731
    _, ref = train.full_batch_gd(DELM, "cross_entropy", params, phi, Y, learning_rate=0.05, steps=50, penalty=penalty,
                                 warm_start=False)
    np.testing.assert_allclose(res.history["loss"], np.asarray(ref["loss"]), rtol=1e-12)
    assert res.history["loss"][-1] < 0.9 * res.history["loss"][0]  # a converging run


def test_square_problem_is_the_library_s():
    """The shallow square problem of a feature set comes from the library (Gram data, optimum, spectrum), with
    nothing n x n: n >> m and n < m alike."""
    rng = np.random.default_rng(0)
    for n, m in ((50, 7), (5, 9)):
        phi, Y = rng.normal(size=(n, m)), rng.normal(size=(n, 3))
        prob = square_problem(phi, Y)
        W_star, L_star = theory.shallow_optimum_square(jnp.asarray(phi), jnp.asarray(Y))
        np.testing.assert_array_equal(prob.W_star, np.asarray(W_star))
        assert prob.L_star == float(L_star) and prob.rank == min(n, m)
        np.testing.assert_allclose(prob.C, phi.T @ phi / n, rtol=1e-13)
        np.testing.assert_allclose(prob.D, phi.T @ Y / n, rtol=1e-13, atol=1e-15)
        assert prob.lambda_max == pytest.approx(float(np.linalg.eigvalsh(phi.T @ phi / n)[-1]), rel=1e-12)


def test_preconditioner_and_stiffness():
    """The LU-factored P equals theory's; the dense lambda_max(P H) is the power iteration's limit; the step-size
    rule puts eta lambda_max(P_0 H) at its scale."""
    rng = np.random.default_rng(0)
    model = DELM
    # concentrated softmax columns: |U^-1|_2 far from 1/(1 - gamma)
    params = {"A": jnp.asarray(20 * rng.normal(size=(9, 9))), "B": jnp.asarray(0.1 * rng.normal(size=(10, 9)))}
    G = jnp.asarray(rng.normal(size=(10, 9)))
    P = jax.jit(lambda p, g: dynamics.preconditioner_operator(p, 0.8, "column_softmax")(g))
    np.testing.assert_allclose(P(params, G), theory.induced_preconditioner(params, G, 0.8, "column_softmax"),
                               rtol=1e-12)
    phi = rng.normal(size=(20, 9))
    curvature = dynamics.curvature_operator("square", phi.T @ phi / 20)
    dense = dynamics.stiffness(model, params, curvature)
    approx = float(dynamics._power_iteration(params, jnp.asarray(curvature.C), 1.0, 0.0, 0.8, "column_softmax"))
    assert dense.exact and approx <= dense.value * (1 + 1e-12) and approx == pytest.approx(dense.value, rel=1e-2)
    rule = load_config(None).convergence.learning_rate
    eta, stiff = dynamics.learning_rate(rule, model, params, curvature)
    assert eta * stiff.value == pytest.approx(1.0)


def test_mutations_falsify_the_gradient_and_the_update_checks_see_it():
    """Each mutation keeps the loss and falsifies the gradient of a training step (make_step, on the samples and on
    the Gram route alike); the applied update of an exact step moves W by -eta P(G) and lands on the exact GD step to
    rounding, a mutated one does not (one compiled program for all of it)."""
    phi, Y, _ = _data()
    gram = train.square_gram(phi, Y)
    lr = 0.05
    wrong = mutations.mutate_model(DELM, "wrong_sigma")
    assert isinstance(wrong, mutations.WrongSigmaDELM) and wrong.backward_sigma == "row_softmax"
    assert mutations.mutate_model(DELM, "one_step").backward == "one_step"
    assert mutations.mutate_model(DELM, None) is DELM and mutations.mutate_model(DELM, "perturbed") is DELM
    assert mutations.mutate_model(models.Linear(9, 10), "one_step") == models.Linear(9, 10)
    norm = lambda t: jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(t)))  # noqa: E731

    @jax.jit
    def measure(params):
        out = {}
        value, g_true = jax.value_and_grad(lambda p: train.objective(DELM, "square")(p, phi, Y)[0])(params)
        for name in ("honest", "one_step", "wrong_sigma", "perturbed"):
            mutation = None if name == "honest" else name
            opt = mutations.optimizer(jnp.asarray(lr), mutation)
            step = train.make_step(mutations.mutate_model(DELM, mutation), "square", opt, warm_start=False, jit=False)
            # both routes where the mutation lives in the model (WrongSigmaDELM overrides apply and the end-to-end
            # solution), the Gram route alone for the others (the backward mode and the optimizer act on either)
            routes = (("samples", (phi, Y)), ("gram", (gram, None))) if name in ("honest", "wrong_sigma") else \
                (("gram", (gram, None)),)
            for route, (data, targets) in routes:
                new, _, metrics = step(params, opt.init(params), data, targets)
                checks = dynamics.update_checks(DELM, "square", params, new, data, targets, jnp.asarray(lr),
                                                1e-5 if name in ("honest", "one_step") else None)
                error = norm(jax.tree_util.tree_map(lambda a, b, t: a - b + lr * t, new, params, g_true))
                out[name, route] = (metrics["loss"] / value - 1, error / norm(g_true) / lr, checks["velocity_error"],
                                    checks["step_error"], checks.get("fd_velocity_error", jnp.nan))
        return out

    e = {k: [float(x) for x in v] for k, v in measure(DELM.init(jax.random.PRNGKey(4), jnp.float64)).items()}
    assert all(abs(v[0]) < 1e-14 for v in e.values())  # the loss is right under every mutation, on both routes
    for route in ("samples", "gram"):
        honest = e["honest", route]
        assert honest[1] < 1e-13 and honest[2] < 1e-12 and honest[3] < 1e-12 and honest[4] < 1e-8, honest
    assert e["perturbed", "gram"][1] == pytest.approx(mutations.PERTURBATION, rel=1e-9)
    for name, route in e:
        if name != "honest":
            assert e[name, route][1] > 1e-3 and e[name, route][2] > 1e-3 and e[name, route][3] > 1e-3, (name, route)
    assert e["one_step", "gram"][4] > 1e-3  # the finite-difference form sees it too


# --------------------------------------------------------------------------------------------- the claims can fail

def _group(offset=0.0, pl_scale=1.0, length=400):
    """A synthetic convergence group whose DELM gap contracts at exactly (1 - x)^2 per step, x = eta lam / |U|^2:
    claims computed from it with `L*` shifted by `offset` and the PL constant scaled by `pl_scale`."""
    eta, lam, u = 0.1, 0.5, 1.2
    x = eta * lam / u ** 2
    L_true = 0.2
    loss = L_true + np.concatenate([[1.0], np.cumprod(np.full(length - 1, (1 - x) ** 2 * (1 - 1e-9)))])
    L_star = L_true + offset
    U = np.full(length, u)
    ng = (loss - L_star) / (loss[0] - L_star)
    fit = None
    try:
        fit = theory.fit_log_linear(ng, lo=1e-9, hi=1e-2)
    except ValueError:
        pass
    W = np.zeros((len(range(0, length, 50)) + 1, 2, 2))
    run = convergence.ConvergenceRun(
        label="DELM", role="reference", key="k", description="", learning_rate=eta, steps=length,
        stopped_early=False, mutation=None, loss_history=loss, normalised_gap=ng, grad_norm=np.ones(length),
        relative_residual=np.zeros(length), nonconverged_solves=0, max_solver_residual=0.0, backward_solves=0,
        backward_failures=0, max_backward_residual=0.0,
        logged_steps=np.arange(0, length + 1, 50), W_logged=W, final_normalised_gap=float(ng[-1]),
        distance_to_optimum=0.0, train={}, test={}, fit=fit,
        bound=bounds.bound_analysis(loss, U, L_star, eta, lam * pl_scale, 1e-7), U_norm2=U,
        stiffness=np.full(len(W), 1.0))
    return convergence.ConvergenceGroup(
        loss="square", loss_title="square loss", features="synthetic", width=2, reaches_optimum=True,
        gram_route=True, learning_rate=eta, stiffness0=1.0, stiffness_exact=True, pl_constant=lam * pl_scale,
        pl_name="lambda_min^+", L_star=L_star, optimum={"gradient_ratio": 1e-16}, lambda_max=1.0,
        lambda_min_plus=lam, rank=2, runs=[run])


def _verdicts(group):
    cfg = load_config(TINY)
    return {c.key.rsplit("/", 1)[-1]: c for c in convergence.group_claims(cfg, group)}


def test_convergence_claims_pass_on_an_exact_decay_and_fail_on_a_wrong_optimum_or_rate():
    ok = _verdicts(_group())
    assert all(c.passed for c in ok.values()), [c for c in ok.values() if not c.passed]
    assert ok["rate_factor"].measured == pytest.approx(1.0, abs=1e-6)
    high = _verdicts(_group(offset=1e-4))  # L* overestimated: the run goes below it
    assert not high["reaches_optimum"].passed and high["reaches_optimum"].measured < 0
    low = _verdicts(_group(offset=-1e-4))  # L* underestimated: the gap stalls
    assert not low["reaches_optimum"].passed and low["reaches_optimum"].measured > 0
    slow_bound = _verdicts(_group(pl_scale=0.2))  # a bound 5x too pessimistic says little: the other side fails
    assert slow_bound["bound"].passed and not slow_bound["rate_factor"].passed
    fast_bound = _verdicts(_group(pl_scale=1.5))  # a bound faster than the run: never-slower fails
    assert not fast_bound["bound"].passed


def test_no_claim_computation_crashes_on_a_failed_optimum():
    """A failed cross-entropy optimum (W = 0, nan) or an empty measurement is a failed claim with its number."""
    g = _group()
    g.L_star = math.nan
    g.optimum = {"gradient_ratio": math.nan, "converged": False, "method": "Newton-CG", "iterations": 0}
    r = g.runs[0]
    r.final_normalised_gap = math.nan
    r.bound = bounds.bound_analysis(r.loss_history, r.U_norm2, math.nan, 0.1, 0.5, 1e-7)
    r.fit, r.stiffness = None, np.zeros(0)
    claims = _verdicts(g)
    assert not any(c.passed for k, c in claims.items() if k != "solves")
    assert "did NOT converge" in claims["optimum"].detail and math.isnan(claims["bound"].measured)
    empty = bounds.bound_analysis(np.zeros(0), np.zeros(0), 0.0, 0.1, 0.5, 1e-7)
    assert math.isnan(empty.max_excess) and empty.checked_steps == 0
    u = np.array([1.0, 1.3, 2.0])  # the NumPy form of the library's bound is the library's
    np.testing.assert_allclose(bounds.gd_rate_bound(0.1, 0.5, u), theory.gd_rate_bound(0.1, 0.5, u), rtol=1e-15)
    boom = checked("e", "k", "c", 1.0, "<=", lambda: (_ for _ in ()).throw(ValueError("zero-size array")))
    assert not boom.passed and "zero-size array" in boom.detail


def test_claim_semantics_and_formatting():
    assert Claim("e", "k", "c", 1e-7, 1e-6, "<=").passed
    assert not Claim("e", "k", "c", 2e-6, 1e-6, "<=").passed
    assert Claim("e", "k", "c", -5e-7, 1e-6, "|x| <=").passed and not Claim("e", "k", "c", -2e-6, 1e-6, "|x| <=").passed
    assert Claim("e", "k", "c", 0.5, 0.0, ">").passed and not Claim("e", "k", "c", 0.0, 0.0, ">").passed
    assert not Claim("e", "k", "c", float("nan"), 1.0, "<=").passed  # a measurement that failed never passes
    d = Claim("e", "k", "c", float("nan"), 1.0, ">=", sensitive=True).as_dict()
    assert d["passed"] is False and d["measured"] == "nan" and d["gradient_sensitive"] and json.dumps(d)
    assert report.fmt_measured(0.99987, 0.9999, ">=") == "0.99987"  # never "1" next to ">= 0.9999"
    assert report.fmt_measured(1.0000001, 1.0, "<=") != "1"
    assert report.fmt_measured(3.2e-14, 1e-6, "<=") == "3.2e-14"
    assert report.plural(1, "checkpoint") == "1 checkpoint" and report.plural(2, "run") == "2 runs"


def test_mutation_table_verdicts():
    def summary(passes, sensitive_fail, mutation):
        claims = [{"key": "a/x", "experiment": "a", "name": "x", "gradient_sensitive": True, "passed": passes,
                   "measured": 1.0, "threshold": 0.5, "comparison": "<="},
                  {"key": "a/y", "experiment": "a", "name": "y", "gradient_sensitive": False, "passed": True,
                   "measured": 0.1, "threshold": 0.5, "comparison": "<="}]
        if sensitive_fail is not None:
            claims[0]["passed"] = not sensitive_fail
        return {"claims": claims, "all_passed": all(c["passed"] for c in claims), "command": f"cmd {mutation}"}

    good = {None: summary(True, None, None), "one_step": summary(True, True, "one_step")}
    assert mutation_table.verdict(good)["passed"]
    bad = {None: summary(True, None, None), "one_step": summary(True, False, "one_step")}
    v = mutation_table.verdict(bad)
    assert not v["passed"] and v["mutations"]["one_step"]["experiments"]["a"] == {"sensitive": 1,
                                                                                 "sensitive_failed": 0, "failed": 0}
    text = mutation_table.markdown(good)
    assert "| a | x | yes | PASS (1) | **FAIL** (1) |" in text


# --------------------------------------------------------------------------------------------- small pieces

def test_path_geometry():
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    pts = np.array([[0.5, 0.5], [2.0, 0.5], [0.5, -1.0], [1.0, 1.0]])
    np.testing.assert_allclose(distance_to_polyline(pts, square), [0.5, 1.0, 1.0, 0.0])
    W_star, W0 = np.zeros((2, 2)), np.array([[2.0, 0.0], [0.0, 0.0]])
    bent = np.array([W0, [[1.0, 1.0], [0.0, 0.0]], W_star])
    (xy,), info = plane_coordinates([bent], W0, W_star)
    np.testing.assert_allclose(xy, [[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]], atol=1e-15)
    assert info["out_of_plane"][0] < 1e-15
    np.testing.assert_allclose(dynamics.integrated_path(np.zeros((1, 1)), np.ones((3, 1, 1)))[:, 0, 0], [0, 1, 2, 3])


def test_null_projector_and_heldout_metrics():
    phi = np.random.default_rng(0).normal(size=(4, 7))
    N = null_projector(phi)
    np.testing.assert_allclose(phi @ N, 0, atol=1e-13)
    np.testing.assert_allclose(N @ N, N, atol=1e-13)
    assert round(np.trace(N)) == 3
    phi, Y, labels = _data(n=30, m=6, k=4)
    W = np.random.default_rng(1).normal(size=(4, 6))
    got = heldout_metrics(W, np.asarray(phi), labels, np.asarray(Y))
    pred = phi @ jnp.asarray(W).T
    assert got["square_loss"] == pytest.approx(float(losses.square(pred, Y)), rel=1e-13)
    assert got["cross_entropy"] == pytest.approx(float(losses.cross_entropy(pred, jnp.asarray(labels))), rel=1e-13)
    assert got["accuracy"] == float(np.mean(np.argmax(np.asarray(pred), 1) == labels))


# --------------------------------------------------------------------------------------------- the whole job

def _main(*args, out):
    return reproduce.main(["--config", TINY, "--out", str(out), "--no-progress", *args])


def _summary(out, name="tiny"):
    return json.loads((out / name / "summary.json").read_text())


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
    assert _main(out=out) == 130
    err = capsys.readouterr().err
    assert "reproduce: interrupted; checkpoints are in" in err and "Traceback" not in err
    assert not (out / "tiny" / "summary.json").exists() and not list(out.rglob(".*.tmp"))
    monkeypatch.setattr(reproduce_io.CheckpointStore, "save", saved)
    monkeypatch.setattr(gd_runs, "CHECKPOINT_EVERY_S", every)
    assert _main(out=out) == 0  # resumed
    run_dir = out / "tiny"
    summary = _summary(out)
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
    assert _main("--set", "convergence.thresholds.path=1.0e-30", out=out) == 1
    rejudged = _summary(out)
    assert rejudged["runs_loaded"] == rejudged["runs_total"] == summary["runs_total"]
    failed = [c["key"] for c in rejudged["claims"] if not c["passed"]]
    assert failed and all(k.endswith("follows_exact_path") for k in failed)
    assert [c["measured"] for c in rejudged["claims"]] == [c["measured"] for c in claims]
    assert rejudged["experiments"] == summary["experiments"]
    notes = (run_dir / "REPORT.md").read_text()  # the notes name the threshold that judged, not the default
    assert "<= 1.00e-30 of |W_0 - W*|" in notes and "<= 1.00e-07 of |W_0 - W*|" not in notes

    # 3. the mutation test: the one-step gradient fails every gradient-sensitive claim, in every experiment
    capsys.readouterr()
    assert _main("--mutation", "one_step", out=out) == 0  # 0: the wrong gradient was caught
    mutated = _summary(out, "tiny_one_step")
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
    proc = subprocess.Popen([sys.executable, "-m", "experiments", "reproduce", "--config", TINY, "--out", str(out),
                             "--no-progress"], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
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


# --------------------------------------------------------------------------------------------- errors and the CLI

@pytest.mark.parametrize("args, fragments", [
    (["--set", "model.gama=0.5"], ["unknown key 'model.gama'", "did you mean 'gamma'"]),
    (["--set", "data.pca_dim=500"], ["data.pca_dim", "500"]),
    (["--set", "data.n_train=5000"], ["data.n_train", "1437", "5000"]),
    (["--set", "implicit_bias.n_train=5000"], ["implicit_bias.n_train (5000) exceeds"]),
    (["--config", "no/such.yaml"], ["does not exist"]),
    (["--config", "MALFORMED"], ["is not valid YAML"]),
])
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
    env = {**os.environ, "HOME": str(tmp_path), "DEQ_JAX_DATA_DIR": str(tmp_path / "cache"),
           "DEQ_JAX_DATA_BASE_URL": "http://127.0.0.1:9/{name}/"}  # a closed port: offline, at once
    proc = subprocess.run([sys.executable, "-m", "experiments", "reproduce", "--config",
                           str(ROOT / "configs" / "mnist.yaml"), "--out", str(tmp_path / "out"), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
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
    assert reproduce.main(["--config", str(ROOT / "configs" / "fashion_mnist_full.yaml"), "--dry-run", "--out",
                           str(tmp_path), "--no-progress"]) == 0


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
    with pytest.raises(RuntimeError):
        with reproduce_io.atomic_path(path) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "one" and sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def test_signals_are_taken_at_safe_points():
    """Inside the job, SIGINT only requests the interrupt (a KeyboardInterrupt raised inside a garbage-collection
    callback would be swallowed); `check()` raises it; a second signal raises at once."""
    from experiments.common import interrupts

    with interrupts.safe_points():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert interrupts.requested()
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert not interrupts.requested() and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_pca_prefix_features_equal_a_fresh_preprocessing():
    """`pca_whiten k` sliced from the data section's `pca_whiten K` (k < K) is the preprocessing's own output."""
    from experiments.reproduce.common import Context, load_dataset, make_features

    cfg = load_config(TINY)
    data = dataclasses.replace(cfg.data, pca_dim=30)
    ds = load_dataset(data)
    ctx = Context(dataset=ds, features=make_features(ds, data), store=None, progress=False, data_config=data)
    sliced = ctx.features_for("pca_whiten", 8)
    fresh = make_features(ds, data, features="pca_whiten", pca_dim=8)
    np.testing.assert_allclose(sliced.phi_train, fresh.phi_train, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sliced.phi_test, fresh.phi_test, rtol=1e-10, atol=1e-10)
    assert ctx.features_for("pca_whiten", 8) is sliced  # computed once


def test_background_measurements_are_waited_for_or_computed_here():
    """A measurement job that has not started when the run needs it is computed in the main thread; one that fails
    raises its error where it is waited for (never a silently missing number)."""
    import threading

    from experiments.reproduce import compiling

    gate = threading.Event()
    try:
        blocking = compiling.background(lambda: gate.wait(30))  # holds the measurement thread
        queued = compiling.background(lambda: 42)
        assert compiling.wait(queued) == 42 and queued.future.cancelled()  # computed here, not run twice
        failing = compiling.background(lambda: 1 / 0)
        gate.set()
        assert compiling.wait(blocking) is True
        with pytest.raises(ZeroDivisionError):
            compiling.wait(failing)
    finally:
        gate.set()
        compiling.stop_precompiling()


def test_fallback_store_reads_but_never_writes_the_other(tmp_path):
    other = reproduce_io.CheckpointStore(tmp_path / "a")
    other.open("fp", fresh=True)
    other.save("k", {"x": np.ones(2)}, {"m": 1})
    store = checkpoints.FallbackStore(tmp_path / "b", other)
    store.open("fp", fresh=True)
    assert store.load("k")[1] == {"m": 1} and store.load("missing") is None
    store.save("j", {"x": np.zeros(1)})
    assert other.load("j") is None and dataclasses.is_dataclass(gd_runs.Trace())
