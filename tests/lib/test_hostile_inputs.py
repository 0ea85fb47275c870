"""Hostile inputs: every number validated where it enters, and data problems named as data problems.

Each case was once accepted and answered wrongly: `tol=inf` reported converged after one step; a float16 solve at
tol 1e-5 reported converged at a point whose float32 residual was 3.9e-4; bfloat16 failed deep inside an LU; an
empty batch raised `ZeroDivisionError`; label -1 was read as the last class and label 5 gave a silent NaN; NaN
targets and features were blamed on the step size. Eager and jitted, over the losses, solvers and dtypes they touch.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import DTYPE, GAMMA, requires_x64

import deq_jax as dj
from deq_jax.losses import invalid_targets

pytestmark = pytest.mark.float32

M, N, CLASSES = 4, 6, 3


def data(dtype=DTYPE, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    A = 0.3 * jax.random.normal(k1, (M, M), dtype)
    phi = jax.random.normal(k2, (N, M), dtype)
    return A, phi


def solve_delm(A, phi, **options):
    return dj.solve(dj.DELMMap(GAMMA), jnp.zeros_like(phi), {"A": A}, phi, **options)


# ----------------------------------------------------------------------------- 1. numbers: finite, in range


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("tol", lambda A, phi: solve_delm(A, phi, tol=float("inf"))),
        ("tol", lambda A, phi: solve_delm(A, phi, tol=np.float32("nan"))),
        ("tol", lambda A, phi: solve_delm(A, phi, tol=jnp.asarray(jnp.inf))),
        ("atol", lambda A, phi: solve_delm(A, phi, atol=float("inf"))),
        ("atol", lambda A, phi: solve_delm(A, phi, atol=float("nan"))),
        ("Implicit.tol", lambda A, phi: dj.Implicit(tol=float("inf"))),
        ("Anderson.beta", lambda A, phi: dj.Anderson(beta=float("inf"))),
        ("Relaxed.damping", lambda A, phi: dj.Relaxed(damping=float("nan"))),
        ("init_scale", lambda A, phi: dj.DELM(M, CLASSES, init_scale=float("inf"))),
        ("tol", lambda A, phi: dj.DELM(M, CLASSES, tol=float("inf"))),
        ("init_scale", lambda A, phi: dj.Linear(M, CLASSES, init_scale=-float("inf"))),
        ("init_gain", lambda A, phi: dj.DeepLinear(M, CLASSES, init_gain=float("nan"))),
        ("gamma", lambda A, phi: dj.DELM(M, CLASSES, gamma=float("nan"))),
        ("contraction", lambda A, phi: dj.TanhMap(float("inf"))),
        ("learning_rate", lambda A, phi: dj.make_step(dj.Linear(M, CLASSES), "square", learning_rate=float("inf"))),
        ("learning_rate", lambda A, phi: dj.make_step(dj.Linear(M, CLASSES), "square", learning_rate=jnp.nan)),
    ],
)
def test_non_finite_settings_are_refused_naming_the_argument(name, call):
    A, phi = data()
    with pytest.raises(ValueError, match="^" + re.escape(name) + r" must be a .*; got .*(inf|nan)"):
        call(A, phi)


def test_the_checks_accept_what_they_should():
    from deq_jax import _checks

    for value in (1e-300, 3, np.float32(0.5), jnp.asarray(2.0), np.int64(7)):
        _checks.check_positive("x", value)
    for value in (0, 0.0, jnp.asarray(0.0), 1e300):
        _checks.check_nonnegative("x", value)
    for value in (-1.5, 0, jnp.asarray(-2.0)):
        _checks.check_finite("x", value)
    for bad in (float("inf"), float("nan"), "1", None, True, jnp.ones(2)):
        with pytest.raises(ValueError, match=r"^x must be a finite number; got"):
            _checks.check_finite("x", bad)


def test_traced_settings_pass_through():
    """A tolerance or learning rate vmapped over (a sweep) is a tracer: validated where it was concrete."""
    A, phi = data(jnp.float32)
    sols = jax.vmap(lambda t: solve_delm(A, phi, tol=t))(jnp.asarray([1e-3, 1e-5], jnp.float32))
    assert bool(jnp.all(sols.stats.converged)) and float(sols.stats.relative_residual[1]) <= 1e-5

    model = dj.Linear(M, CLASSES)
    params = model.init(jax.random.PRNGKey(0), jnp.float32)
    y = jax.nn.one_hot(jnp.arange(N) % CLASSES, CLASSES, dtype=jnp.float32)

    def final_loss(lr):
        _, history = dj.full_batch_gd(model, "square", params, phi, y, learning_rate=lr, steps=2)
        return history["loss"][-1]

    losses = jax.vmap(final_loss)(jnp.asarray([0.1, 0.2], jnp.float32))
    assert bool(jnp.all(jnp.isfinite(losses)))


# ----------------------------------------------------------------------------- 2. tolerances a dtype can measure


def test_float16_tolerance_below_what_it_can_measure_is_refused():
    A, phi = data(jnp.float16)
    with pytest.raises(ValueError, match=r"tol=1e-05 is finer than a float16 state can measure.*judged at is 0\.00391"):
        solve_delm(A, phi, tol=1e-5)
    with pytest.raises(ValueError, match=r"tol=1e-05 is finer than a float16"):  # jitted: the tol is concrete
        jax.jit(lambda A, phi: solve_delm(A, phi, tol=1e-5).value)(A, phi)
    # at a tolerance float16 can measure, "converged" holds when the residual is measured in float32 too
    sol = solve_delm(A, phi, tol=4e-3, backward="one_step")
    assert bool(sol.stats.converged)
    z = sol.value.astype(jnp.float32)
    fz = dj.DELMMap(GAMMA)(z, {"A": A.astype(jnp.float32)}, phi.astype(jnp.float32))
    assert float(jnp.linalg.norm(fz - z) / jnp.linalg.norm(fz)) <= 4e-3


def test_float32_keeps_the_default_tolerance_and_refuses_below_its_floor():
    A, phi = data(jnp.float32)
    assert bool(solve_delm(A, phi).stats.converged)  # tol 1e-5 = 84 eps
    assert bool(solve_delm(A, phi, tol=1e-6).stats.converged)
    with pytest.raises(ValueError, match=r"tol=1e-07 is finer than a float32 state.*4\.77e-07"):
        solve_delm(A, phi, tol=1e-7)
    with pytest.raises(ValueError, match=r"Implicit\.tol=1e-08 is finer than a float32"):
        solve_delm(A, phi, backward=dj.Implicit(tol=1e-8))
    model = dj.DELM(M, CLASSES, solver="anderson")
    params = model.init(jax.random.PRNGKey(0), jnp.float16)
    with pytest.raises(ValueError, match=r"tol=1e-05 is finer than a float16"):  # a model's tol, at the solve
        model.apply(params, phi.astype(jnp.float16))


@requires_x64
def test_float64_tight_tolerances_and_mixed_states():
    A, phi = data(jnp.float64)
    assert bool(solve_delm(A, phi, tol=1e-12).stats.converged)
    # a pytree state is judged at its coarsest leaf's precision
    f = lambda z, p, x: (0.5 * z[0] + x, 0.5 * z[1] + x.astype(z[1].dtype))
    z0 = (jnp.zeros(3, jnp.float64), jnp.zeros(3, jnp.float32))
    with pytest.raises(ValueError, match="finer than a float32 state"):
        dj.solve(f, z0, 0.0, jnp.ones(3, jnp.float64), tol=1e-12)
    assert bool(dj.solve(f, z0, 0.0, jnp.ones(3, jnp.float64), tol=1e-6).stats.converged)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_states_are_refused_by_the_solvers_that_factorise(dtype):
    """JAX's LU has no float16 or bfloat16 kernels: Direct and Refine refuse such states up front, naming the
    solver and the dtype; the iterative solvers take them (forward, and with the 'forward' implicit backward)."""
    A, phi = data(dtype)
    tol = 4 * float(jnp.finfo(dtype).eps)
    for solver in ("direct", "refine"):
        match = rf"solver '{solver}' needs float32 or float64.*got z0 with dtype {jnp.dtype(dtype).name}"
        with pytest.raises(TypeError, match=match):
            solve_delm(A, phi, solver=solver, tol=tol)
        with pytest.raises(TypeError, match=match):
            jax.jit(lambda A, phi, solver=solver: solve_delm(A, phi, solver=solver, tol=tol).value)(A, phi)
        model = dj.DELM(M, CLASSES, solver=solver, tol=tol)
        params = model.init(jax.random.PRNGKey(0), dtype)
        with pytest.raises(TypeError, match=rf"DELM\(solver='{solver}'\) needs float32 or float64.*got params"):
            model.warm_start(params, phi)  # Refine's warm start factorises before any solve
    loss = lambda A: jnp.sum(
        solve_delm(A, phi, backward=dj.Implicit("forward"), tol=tol, batch_axis=0).value.astype(jnp.float32)
    )
    assert bool(jnp.all(jnp.isfinite(jax.grad(loss)(A).astype(jnp.float32))))


# ----------------------------------------------------------------------------- 3. empty batches and states


def test_empty_batches_and_states_are_refused():
    A, phi = data(jnp.float32)
    empty = jnp.zeros((0, M), jnp.float32)
    for batch_axis in (0, None):
        with pytest.raises(ValueError, match=r"z0 has no entries \(array of shape \(0, 4\).*empty batch"):
            solve_delm(A, empty, batch_axis=batch_axis)
    with pytest.raises(ValueError, match=r"z0 has no entries"):  # shapes are static: under jit too
        jax.jit(lambda A, x: solve_delm(A, x, batch_axis=0).value)(A, empty)
    with pytest.raises(ValueError, match=r"z0\['b'\] has no entries"):  # a zero-size leaf of a pytree state
        dj.solve(lambda z, p, x: z, {"a": jnp.ones(2), "b": jnp.zeros((2, 0))}, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"adjoint_start has no entries"):
        solve_delm(A, phi, adjoint_start=jnp.zeros((0,), jnp.float32))
    model = dj.DELM(M, CLASSES, formulation="per_sample")
    params = model.init(jax.random.PRNGKey(0), jnp.float32)
    step = dj.make_step(model, "square", learning_rate=0.1)
    with pytest.raises(ValueError, match=r"phi holds no samples \(shape \(0, 4\)\)"):
        step.update(step.init(params, phi), empty, jnp.zeros((0, CLASSES), jnp.float32))
    with pytest.raises(ValueError, match="phi holds no samples"):
        dj.full_batch_gd(model, "square", params, empty, jnp.zeros((0, CLASSES)), learning_rate=0.1, steps=1)
    with pytest.raises(ValueError, match="phi holds no samples"):
        dj.square_gram(empty, jnp.zeros((0, CLASSES), jnp.float32))
    for loss in (dj.square, dj.cross_entropy):
        with pytest.raises(ValueError, match=r"predictions hold no samples \(shape \(0, 3\)\)"):
            loss(jnp.zeros((0, CLASSES)), jnp.zeros((0, CLASSES)))
    with pytest.raises(ValueError, match="predictions hold no samples"):
        dj.logistic(jnp.zeros((0,)), jnp.zeros((0,)))


# ----------------------------------------------------------------------------- 4. targets outside a loss's domain

LOGITS = jnp.zeros((4, CLASSES), DTYPE)
ONE_HOT_NAN_INF = np.eye(CLASSES)[[0, 1, 2, 0]]
ONE_HOT_NAN_INF[1, 0], ONE_HOT_NAN_INF[3, 2] = np.nan, np.inf


@pytest.mark.parametrize(
    ("loss", "predictions", "targets", "match"),
    [
        (dj.cross_entropy, LOGITS, [0, 1, 2, -1], r"integer labels in \[0, 3\) for 3 classes; 1 of 4.*sample 3: -1"),
        (dj.cross_entropy, LOGITS, jnp.asarray([0, 5, 2, 9]), r"2 of 4 samples are not \(sample 1: 5, sample 3: 9"),
        (dj.cross_entropy, LOGITS, np.eye(CLASSES)[[0, 1, 2, 0]] * 2, r"probability rows.*4 of 4"),
        (dj.cross_entropy, LOGITS, np.full((4, CLASSES), np.nan), "probability rows"),
        (dj.square, LOGITS, ONE_HOT_NAN_INF, r"finite; 2 of 4"),
        (dj.logistic, LOGITS[:, 0], jnp.asarray([0, 1, 2, 1]), r"in \[0, 1\].*sample 2: 2"),
        (dj.logistic, LOGITS[:, 0], jnp.asarray([0.0, -1.0, np.nan, 1.0]), r"2 of 4 samples"),
    ],
)
def test_targets_outside_the_domain_eagerly_an_error_under_jit_a_nan_loss(loss, predictions, targets, match):
    with pytest.raises(ValueError, match=match + ".*data error"):
        loss(predictions, targets)
    value, grad = jax.jit(jax.value_and_grad(loss))(predictions, jnp.asarray(targets))
    assert np.isnan(float(value))  # never a silent number
    assert bool(jnp.all(grad == 0))  # and no NaN poured into the parameters
    assert int(jax.jit(invalid_targets, static_argnums=0)(loss, predictions, jnp.asarray(targets))) > 0


def test_valid_targets_and_the_neighbours_that_stay_valid():
    assert np.isfinite(float(dj.cross_entropy(LOGITS, [0, 1, 2, 2])))  # a list of labels is an array of labels
    assert np.isfinite(float(dj.cross_entropy(LOGITS, jnp.full((4, CLASSES), 1 / 3, DTYPE))))  # soft rows
    assert np.isfinite(float(dj.logistic(LOGITS[:, 0], jnp.asarray([True, False, True, False]))))
    assert np.isfinite(float(dj.logistic(LOGITS[:, 0], jnp.asarray([0.25, 0.5, 1.0, 0.0], DTYPE))))
    with pytest.raises(ValueError, match=r"targets of shape \(4,\).*must be integer labels.*astype\(jnp\.int32\)"):
        dj.cross_entropy(LOGITS, jnp.asarray([0.0, 1.0, 2.0, 1.0], DTYPE))
    for loss in (dj.square, dj.cross_entropy, dj.logistic):  # counted 0 for good targets, under jit too
        good = {dj.square: LOGITS, dj.cross_entropy: jnp.asarray([0, 1, 2, 0]), dj.logistic: LOGITS[:, 0]}[loss]
        preds = LOGITS[:, 0] if loss is dj.logistic else LOGITS
        assert int(jax.jit(invalid_targets, static_argnums=0)(loss, preds, good)) == 0
    mine = lambda p, t: jnp.mean((p - t) ** 2)  # any other loss: non-finite targets are what can be told
    assert int(invalid_targets(mine, LOGITS, LOGITS.at[1, 1].set(jnp.nan))) == 1


# ----------------------------------------------------------------------------- 5. bad data named as bad data


def _train(model, loss, phi, y, steps=3, jit=True, learning_rate=0.1):
    params = model.init(jax.random.PRNGKey(1), jnp.float32)
    step = dj.make_step(model, loss, learning_rate=learning_rate, jit=jit)
    state, history = step.init(params, phi), []
    for _ in range(steps):
        state, metrics = step.update(state, phi, y)
        history.append(jax.device_get(metrics))
    return state, {k: np.stack([h[k] for h in history]) for k in history[0]}


def _one_hot(dtype=jnp.float32):
    return jax.nn.one_hot(jnp.arange(N) % CLASSES, CLASSES, dtype=dtype)


@pytest.mark.parametrize("formulation", ["transposed", "per_sample"])
def test_nan_targets_and_features_in_training_are_reported_as_data(formulation):
    _, phi = data(jnp.float32)
    model = dj.DELM(M, CLASSES, gamma=0.5, formulation=formulation)
    # NaN targets: the metrics count them, the parameters stay finite, the verdict names the data
    state, history = _train(model, "square", phi, _one_hot().at[2, 0].set(jnp.nan))
    np.testing.assert_array_equal(history["bad_targets"], [1, 1, 1])
    np.testing.assert_array_equal(history["nonfinite_features"], [0, 0, 0])
    assert np.all(np.isnan(history["loss"])) and all(bool(jnp.all(jnp.isfinite(p))) for p in state.params.values())
    with pytest.warns(dj.DataWarning, match=r"training data is bad: 3 of 3 steps saw samples with targets") as rec:
        dj.check_converged(history, learning_rate=0.1)
    assert "step size" not in str(rec[0].message).replace("not the step size", "")
    with pytest.raises(dj.DataError, match="bad_targets: first at step 0, up to 1 samples"):
        dj.check_converged(history, on_failure="raise")
    # NaN features under jit: counted per sample
    _, history = _train(model, "square", phi.at[1, 2].set(jnp.nan).at[4, 0].set(jnp.inf), _one_hot())
    np.testing.assert_array_equal(history["nonfinite_features"], [2, 2, 2])
    with pytest.warns(dj.DataWarning, match="samples with NaN/inf features"):
        dj.check_converged(history)


def test_bad_labels_under_jit_are_counted_and_the_step_leaves_the_parameters():
    _, phi = data(jnp.float32)
    model = dj.Linear(M, CLASSES)
    labels = jnp.asarray([0, 1, 2, -1, 5, 1])
    state, history = _train(model, "cross_entropy", phi, labels, steps=2)
    np.testing.assert_array_equal(history["bad_targets"], [2, 2])
    assert np.all(np.isnan(history["loss"]))
    np.testing.assert_array_equal(state.params["W"], model.init(jax.random.PRNGKey(1), jnp.float32)["W"])
    with pytest.raises(ValueError, match=r"labels in \[0, 3\).*sample 3: -1, sample 4: 5"):  # eagerly: an error
        _train(model, "cross_entropy", phi, labels, steps=1, jit=False)
    _, good = _train(model, "cross_entropy", phi, labels.at[3].set(0).at[4].set(1), steps=1)
    assert good["bad_targets"][0] == 0 and good["nonfinite_features"][0] == 0 and np.isfinite(good["loss"][0])


def test_gram_data_with_nan_is_counted():
    _, phi = data(jnp.float32)
    model = dj.DELM(M, CLASSES, gamma=0.5)
    gram = dj.square_gram(phi, _one_hot())
    with pytest.raises(ValueError, match=r"y contains NaN"):  # eagerly
        dj.square_gram(phi, _one_hot().at[0, 0].set(jnp.nan))
    bad = gram._replace(C=gram.C.at[0, 0].set(jnp.nan), yy=jnp.asarray(jnp.nan, jnp.float32))
    _, history = _train(model, "square", bad, None, steps=1)
    assert history["nonfinite_features"][0] == 1 and history["bad_targets"][0] == 1


def test_a_loss_already_nan_before_any_update_is_not_blamed_on_the_step_size():
    """A history without the data metrics (a custom loop): a NaN loss at step 0, evaluated before the first update,
    cannot come from the step size."""
    history = {"loss": np.array([np.nan, np.nan]), "converged": np.array([True, False])}
    with pytest.warns(dj.DataWarning, match=r"loss was NaN at step 0, before any update.*check the data"):
        assert dj.check_converged(history, learning_rate=0.1) == 1
    # a loss that became NaN later, with clean data, is still divergence
    later = {**history, "loss": np.array([1.0, np.nan]), "nonfinite_features": np.zeros(2), "bad_targets": np.zeros(2)}
    with pytest.warns(dj.DivergenceWarning, match="lower learning_rate=0.1"):
        dj.check_converged(later, learning_rate=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = {"loss": np.array([1.0, 0.5]), "converged": np.array([True, True]), "bad_targets": np.zeros(2)}
        assert dj.check_converged(clean) == 0


def test_full_batch_gd_and_fit_carry_the_data_metrics():
    _, phi = data(jnp.float32)
    model = dj.Linear(M, CLASSES)
    params = model.init(jax.random.PRNGKey(0), jnp.float32)
    _, history = dj.full_batch_gd(model, "square", params, phi, _one_hot(), learning_rate=0.1, steps=2)
    np.testing.assert_array_equal(history["bad_targets"], [0, 0])
    step = dj.make_step(model, "cross_entropy", optax.sgd(0.1))
    run = dj.make_chunk(step, 2)
    result = dj.fit(run, step.init(params, phi), phi, jnp.asarray([0, 1, 2, 3, 0, 1]), steps=4, chunk=2)
    np.testing.assert_array_equal(result.history["bad_targets"], [1, 1, 1, 1])
    with pytest.warns(dj.DataWarning, match="targets outside the loss's domain"):
        dj.check_converged(result.history)
