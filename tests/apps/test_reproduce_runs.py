"""The main job's training runs and measurements: the chunked runner against the library's full-batch GD, its
checkpoints and resumption, stopping rules, the mutations' wrong gradients, the square problem, the preconditioner,
features, and the background measurements."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reproduce_cases import DELM, TINY, run_spec, tiny_data

from deq_jax import losses, models, theory, train
from experiments.common import io as reproduce_io
from experiments.reproduce import checkpoints, dynamics, mutations
from experiments.reproduce import runs as gd_runs
from experiments.reproduce.common import heldout_metrics, square_problem
from experiments.reproduce.config import load_config
from experiments.reproduce.implicit_bias import null_projector
from experiments.reproduce.trust_region import distance_to_polyline, plane_coordinates


def test_chunked_runner_equals_full_batch_gd_on_the_samples():
    """The chunked runner on the Gram route is full_batch_gd on the samples, cut into pieces: the same losses and
    parameters to rounding (the Gram form sums in another order; the runner's program is compiled with the tiny
    config's fast options)."""
    model = DELM
    phi, Y, _ = tiny_data()
    params = model.init(jax.random.PRNGKey(0), jnp.float64)
    ref_params, ref = train.full_batch_gd(
        model, "square", params, phi, Y, learning_rate=0.05, steps=100, warm_start=False
    )
    res = gd_runs.run_gd(run_spec(model), params, train.square_gram(phi, Y), None, learning_rate=0.05, steps=100)
    assert res.history["loss"][-1] < 0.5 * res.history["loss"][0]  # a converging run: rounding cannot grow
    np.testing.assert_allclose(res.history["loss"], np.asarray(ref["loss"]), rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(ref_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(res.W_final, np.asarray(model.end_to_end(ref_params)), rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(res.W0, np.asarray(model.end_to_end(params)), rtol=1e-12, atol=1e-15)
    assert list(res.logged_steps) == [0, 50, 100] and res.W_logged.shape == (3, 10, 9)


def test_runner_resumes_from_its_checkpoint_and_keys_it_by_its_inputs(tmp_path):
    """Stopping after 50 steps and continuing to 150 gives the numbers of an uninterrupted 150-step run; another
    learning rate or other data is another checkpoint, never a stale one."""
    phi, Y, _ = tiny_data()
    gram = train.square_gram(phi, Y)
    params = DELM.init(jax.random.PRNGKey(1), jnp.float64)
    store = reproduce_io.CheckpointStore(tmp_path / "ck")
    store.open("fp", fresh=True)
    monitor = lambda p: {"norm_A": float(jnp.linalg.norm(p["A"]))}
    kwargs = dict(
        learning_rate=0.05,
        store=store,
        key="run",
        monitor=monitor,
        monitor_id="norm_A",
        keep=("loss", "U_norm2", "grad_norm"),
    )
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
            gd_runs.run_gd(run_spec(DELM), params, gram, None, steps=150, **kwargs)
    assert calls == [50]
    resumed = gd_runs.run_gd(run_spec(DELM), params, gram, None, steps=150, **kwargs)
    whole = gd_runs.run_gd(run_spec(DELM), params, gram, None, steps=150, **{**kwargs, "store": None})
    for k in ("loss", "U_norm2", "grad_norm"):
        np.testing.assert_array_equal(resumed.history[k], whole.history[k])
    np.testing.assert_array_equal(resumed.W_logged, whole.W_logged)
    np.testing.assert_array_equal(resumed.monitored["norm_A"], whole.monitored["norm_A"])
    assert not resumed.from_checkpoint
    again = gd_runs.run_gd(run_spec(DELM), params, gram, None, steps=150, **kwargs)  # finished: loaded, not rerun
    assert again.from_checkpoint and np.array_equal(again.history["loss"], whole.history["loss"])
    other = gd_runs.run_gd(run_spec(DELM), params, gram, None, steps=150, **{**kwargs, "learning_rate": 0.04})
    assert not other.from_checkpoint and not np.array_equal(other.history["loss"], whole.history["loss"])
    other_data = train.square_gram(phi, 0.5 * Y)
    moved = gd_runs.run_gd(run_spec(DELM), params, other_data, None, steps=150, **kwargs)
    assert not moved.from_checkpoint
    assert len(list((tmp_path / "ck").glob("*.npz"))) == 3


def test_runner_stop_and_capture():
    model = models.Linear(9, 10)
    phi, Y, _ = tiny_data()
    gram = train.square_gram(phi, Y)
    params = model.init(jax.random.PRNGKey(2), jnp.float64)
    spec = run_spec(model, gd_runs.Trace(W_every_step=True))
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
    phi, Y, labels = tiny_data(n=150)
    params = DELM.init(jax.random.PRNGKey(3), jnp.float64)
    spec = run_spec(DELM, loss="cross_entropy", rows=150, gram=False, l2=0.3)
    res = gd_runs.run_gd(spec, params, phi, Y, learning_rate=0.05, steps=50)
    W0 = theory.end_to_end(params["A"], params["B"], 0.8)
    want = float(losses.cross_entropy(phi @ W0.T, jnp.asarray(labels))) + 0.15 * float(jnp.sum(W0 * W0))
    assert res.history["loss"][0] == pytest.approx(want, rel=1e-13)
    penalty = lambda p: 0.15 * jnp.sum(DELM.end_to_end(p) ** 2)
    _, ref = train.full_batch_gd(
        DELM, "cross_entropy", params, phi, Y, learning_rate=0.05, steps=50, penalty=penalty, warm_start=False
    )
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
    np.testing.assert_allclose(
        P(params, G), theory.induced_preconditioner(params, G, 0.8, "column_softmax"), rtol=1e-12
    )
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
    phi, Y, _ = tiny_data()
    gram = train.square_gram(phi, Y)
    lr = 0.05
    wrong = mutations.mutate_model(DELM, "wrong_sigma")
    assert isinstance(wrong, mutations.WrongSigmaDELM) and wrong.backward_sigma == "row_softmax"
    assert mutations.mutate_model(DELM, "one_step").backward == "one_step"
    assert mutations.mutate_model(DELM, None) is DELM and mutations.mutate_model(DELM, "perturbed") is DELM
    assert mutations.mutate_model(models.Linear(9, 10), "one_step") == models.Linear(9, 10)
    norm = lambda t: jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(t)))

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
            routes = (
                (("samples", (phi, Y)), ("gram", (gram, None)))
                if name in ("honest", "wrong_sigma")
                else (("gram", (gram, None)),)
            )
            for route, (data, targets) in routes:
                new, _, metrics = step(params, opt.init(params), data, targets)
                checks = dynamics.update_checks(
                    DELM,
                    "square",
                    params,
                    new,
                    data,
                    targets,
                    jnp.asarray(lr),
                    1e-5 if name in ("honest", "one_step") else None,
                )
                error = norm(jax.tree_util.tree_map(lambda a, b, t: a - b + lr * t, new, params, g_true))
                out[name, route] = (
                    metrics["loss"] / value - 1,
                    error / norm(g_true) / lr,
                    checks["velocity_error"],
                    checks["step_error"],
                    checks.get("fd_velocity_error", jnp.nan),
                )
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
    phi, Y, labels = tiny_data(n=30, m=6, k=4)
    W = np.random.default_rng(1).normal(size=(4, 6))
    got = heldout_metrics(W, np.asarray(phi), labels, np.asarray(Y))
    pred = phi @ jnp.asarray(W).T
    assert got["square_loss"] == pytest.approx(float(losses.square(pred, Y)), rel=1e-13)
    assert got["cross_entropy"] == pytest.approx(float(losses.cross_entropy(pred, jnp.asarray(labels))), rel=1e-13)
    assert got["accuracy"] == float(np.mean(np.argmax(np.asarray(pred), 1) == labels))


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
