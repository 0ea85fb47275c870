"""The main job (`python -m experiments reproduce`): its building blocks, every experiment on a tiny config, the
outputs, resuming after an interruption, determinism, and its errors (configuration, offline data set)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq_jax import losses, models, train
from experiments.common import io as reproduce_io
from experiments.reproduce import cli as reproduce, runs as gd_runs
from experiments.reproduce.convergence import bound_analysis
from experiments.reproduce.implicit_bias import null_projector
from experiments.reproduce.common import Claim, heldout_metrics
from experiments.reproduce.trust_region import distance_to_polyline, plane_coordinates

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _data(n=300, m=9, k=10, seed=0):
    """Random data of configs/tiny.yaml's shapes, so that its compiled programs are shared (test time)."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(n, m))
    labels = rng.integers(0, k, n)
    return jnp.asarray(phi), jnp.asarray(np.eye(k)[labels]), labels


# --------------------------------------------------------------------------------------------- building blocks

@pytest.mark.parametrize("model", [models.DELM(9, 10), models.Linear(9, 10), models.DeepLinear(9, 10, depth=2)],
                         ids=["DELM", "linear", "deep"])
def test_chunked_runner_equals_full_batch_gd(model):
    """The chunked runner is full_batch_gd cut into pieces: the same losses and parameters, bit for bit."""
    phi, Y, _ = _data()
    params = model.init(jax.random.PRNGKey(0), jnp.float64)
    ref_params, ref = train.full_batch_gd(model, "square", params, phi, Y, learning_rate=0.05, steps=100)
    res = gd_runs.run_gd(model, "square", params, phi, Y, learning_rate=0.05, steps=100, chunk=50)
    np.testing.assert_array_equal(res.history["loss"], np.asarray(ref["loss"]))
    for a, b in zip(jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(res.W_final, np.asarray(model.end_to_end(ref_params)), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.W0, np.asarray(model.end_to_end(params)), rtol=1e-12, atol=1e-15)


def test_runner_resumes_from_its_checkpoint(tmp_path):
    """Stopping after 50 steps and continuing to 150 gives the numbers of an uninterrupted 150-step run."""
    model = models.DELM(9, 10)
    phi, Y, _ = _data()
    params = model.init(jax.random.PRNGKey(1), jnp.float64)
    store = reproduce_io.CheckpointStore(tmp_path / "ck")
    store.open("fp", fresh=True)
    kwargs = dict(learning_rate=0.05, chunk=50, store=store, key="run")
    first = gd_runs.run_gd(model, "square", params, phi, Y, steps=50, **kwargs)
    assert first.steps == 50
    resumed = gd_runs.run_gd(model, "square", params, phi, Y, steps=150, **kwargs)
    whole = gd_runs.run_gd(model, "square", params, phi, Y, learning_rate=0.05, steps=150, chunk=50)
    for k in ("loss", "U_norm2", "grad_norm"):
        np.testing.assert_array_equal(resumed.history[k], whole.history[k])
    np.testing.assert_array_equal(resumed.W_final, whole.W_final)
    again = gd_runs.run_gd(model, "square", params, phi, Y, steps=150, **kwargs)  # finished: loaded, not rerun
    np.testing.assert_array_equal(again.history["loss"], whole.history["loss"])


def test_runner_stop_and_capture():
    model = models.Linear(9, 10)
    phi, Y, _ = _data()
    params = model.init(jax.random.PRNGKey(2), jnp.float64)
    _, ref = train.full_batch_gd(model, "square", params, phi, Y, learning_rate=0.05, steps=200)
    level = 0.5 * float(ref["loss"][136] + ref["loss"][137])  # first crossed at step 137

    def stop(history, chunk, start):
        below = np.flatnonzero(chunk["loss"] < level)
        return None if below.size == 0 else {"step": np.asarray(start + below[0]), "W": chunk["W"][below[0]]}

    res = gd_runs.run_gd(model, "square", params, phi, Y, learning_rate=0.05, steps=1000, chunk=50, stop=stop)
    assert res.stopped_early and res.steps == 150 and int(res.captured["step"]) == 137
    ref_params, _ = train.full_batch_gd(model, "square", params, phi, Y, learning_rate=0.05, steps=137)
    np.testing.assert_array_equal(res.captured["W"], np.asarray(ref_params["W"]))


def test_regularised_cross_entropy_is_ce_plus_l2_on_the_end_to_end_matrix():
    phi, Y, labels = _data(n=30, m=6, k=4)
    n = phi.shape[0]
    phi_aug, Y_aug = gd_runs.with_probe_rows(np.asarray(phi), np.asarray(Y))
    loss = gd_runs.regularised_cross_entropy(n, 0.3)
    assert loss is gd_runs.regularised_cross_entropy(n, 0.3)  # cached: one compiled program per (n, l2)
    for model in (models.DELM(6, 4), models.DeepLinear(6, 4, depth=3)):
        params = model.init(jax.random.PRNGKey(3), jnp.float64)
        W = model.end_to_end(params)
        got = train.objective(model, loss)(params, jnp.asarray(phi_aug), jnp.asarray(Y_aug))[0]
        want = losses.cross_entropy(phi @ W.T, jnp.asarray(labels)) + 0.15 * jnp.sum(W * W)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-13)


def test_bound_analysis_on_an_exact_geometric_decay():
    """A gap that contracts by exactly the bound each step has excess 0; one 1e-3 slower step is caught."""
    eta, lam, u = 0.1, 0.5, np.full(60, 1.2)
    x = eta * lam / u ** 2
    gap = np.concatenate([[1.0], np.cumprod((1 - x[:-1]) ** 2)])
    b = bound_analysis(gap + 0.2, u, 0.2, eta, lam, floor=1e-12)
    assert abs(b["max_excess"]) < 1e-12 and b["checked_steps"] == 59
    assert b["max_flow_excess"] == pytest.approx(float(x[0] ** 2), rel=1e-6)  # the x^2 discretisation term
    slow = gap.copy()
    slow[30:] *= (1 + 1e-3 / ((1 - x[0]) ** 2))
    assert bound_analysis(slow + 0.2, u, 0.2, eta, lam, floor=1e-12)["max_excess"] == pytest.approx(1e-3, rel=1e-6)


def test_path_geometry():
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    pts = np.array([[0.5, 0.5], [2.0, 0.5], [0.5, -1.0], [1.0, 1.0]])
    np.testing.assert_allclose(distance_to_polyline(pts, square), [0.5, 1.0, 1.0, 0.0])
    W_star, W0 = np.zeros((2, 2)), np.array([[2.0, 0.0], [0.0, 0.0]])
    bent = np.array([W0, [[1.0, 1.0], [0.0, 0.0]], W_star])
    (xy,), info = plane_coordinates([bent], W0, W_star)
    np.testing.assert_allclose(xy, [[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]], atol=1e-15)
    assert info["out_of_plane"][0] < 1e-15


def test_null_projector():
    phi = np.random.default_rng(0).normal(size=(4, 7))
    N = null_projector(phi)
    np.testing.assert_allclose(phi @ N, 0, atol=1e-13)
    np.testing.assert_allclose(N @ N, N, atol=1e-13)
    assert round(np.trace(N)) == 3


def test_heldout_metrics_match_the_library_losses():
    phi, Y, labels = _data(n=30, m=6, k=4)
    W = np.random.default_rng(1).normal(size=(4, 6))
    got = heldout_metrics(W, np.asarray(phi), labels, np.asarray(Y))
    pred = phi @ jnp.asarray(W).T
    assert got["square_loss"] == pytest.approx(float(losses.square(pred, Y)), rel=1e-13)
    assert got["cross_entropy"] == pytest.approx(float(losses.cross_entropy(pred, jnp.asarray(labels))), rel=1e-13)
    assert got["accuracy"] == float(np.mean(np.argmax(np.asarray(pred), 1) == labels))


def test_claim_semantics():
    assert Claim("e", "c", 1e-7, 1e-6, "<=").passed
    assert not Claim("e", "c", 2e-6, 1e-6, "<=").passed
    assert Claim("e", "c", 0.5, 0.0, ">").passed and not Claim("e", "c", 0.0, 0.0, ">").passed
    assert not Claim("e", "c", float("nan"), 1.0, "<=").passed  # a measurement that failed never passes
    d = Claim("e", "c", float("nan"), 1.0, ">=").as_dict()
    assert d["passed"] is False and d["measured"] == "nan" and json.dumps(d)


# --------------------------------------------------------------------------------------------- atomic files

def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    reproduce_io.write_text(path, "one")
    assert path.read_text() == "one"
    with pytest.raises(RuntimeError):
        with reproduce_io.atomic_path(path) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "one"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]  # no temporary file left behind
    reproduce_io.write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}


def test_checkpoint_store(tmp_path):
    store = reproduce_io.CheckpointStore(tmp_path / "ck")
    assert store.open("abc", fresh=False) == 0
    store.save("x/y z", {"a": np.arange(3.0)}, {"done": 3})
    arrays, meta = store.load("x/y z")
    np.testing.assert_array_equal(arrays["a"], [0.0, 1.0, 2.0])
    assert meta == {"done": 3} and store.load("missing") is None
    assert reproduce_io.CheckpointStore(tmp_path / "ck").open("abc", fresh=False) == 1
    with pytest.raises(reproduce_io.CheckpointMismatch, match="--fresh"):
        reproduce_io.CheckpointStore(tmp_path / "ck").open("other", fresh=False)
    assert reproduce_io.CheckpointStore(tmp_path / "ck").open("other", fresh=True) == 0
    calls = []
    assert store.cached("k", lambda: (calls.append(1) or ({"v": np.ones(2)}, {"m": 1})))[1] == {"m": 1}
    assert store.cached("k", lambda: (calls.append(1) or ({}, {})))[1] == {"m": 1} and len(calls) == 1


# --------------------------------------------------------------------------------------------- the whole job

def _numbers(summary: dict) -> dict:
    """Everything that must be reproducible (not the wall time, nor how many checkpoints were reused)."""
    return {"claims": summary["claims"], "experiments": summary["experiments"], "dataset": summary["dataset"]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    code = reproduce.main(["--config", TINY, "--out", str(out), "--no-progress"])
    return code, out / "tiny"


def test_tiny_run_passes_every_claim_and_writes_every_output(tiny_run, capsys):
    code, run_dir = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    failed = [c for c in summary["claims"] if not c["passed"]]
    assert code == 0 and summary["all_passed"] and not failed, failed
    assert {c["experiment"] for c in summary["claims"]} == {"convergence", "trust_region", "implicit_bias"}
    for c in summary["claims"]:
        assert set(c) >= {"name", "passed", "measured", "threshold", "comparison"}
    assert summary["dataset"]["dataset"] == "digits" and summary["seed"] == 0
    assert summary["versions"]["jax"] == jax.__version__ and summary["device"]["jax_devices"]
    assert summary["wall_time_s"] > 0
    # experiment 1: the small width is below the number of classes; the DELM's runs reach L*
    conv = summary["experiments"]["convergence"]
    assert {r["width"] for r in conv["runs"]} == {9, 3}
    assert all(r["final_normalised_gap"] < 1e-6 for r in conv["runs"] if r["is_delm"])
    # experiment 2: every check ran on a genuine trust-region step
    scales = summary["experiments"]["trust_region"]["scales"]
    assert [s["a_scale"] for s in scales] == [0.1, 3.0] and all(s["checks"] for s in scales)
    # experiment 3: all models at matched training loss, n < m
    ib = summary["experiments"]["implicit_bias"]
    assert ib["settings"]["n_train"] < ib["settings"]["width"]
    assert len(ib["runs"]) == 2 * 3 and all(r["reached"] for r in ib["runs"])
    # files: resolved config, per-step metrics, figures linked from the report
    assert (run_dir / "config.yaml").read_text().startswith("name: tiny")
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("experiment,run,loss_fn,model,width,seed,a_scale,step,loss")
    report = (run_dir / "REPORT.md").read_text()
    links = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(links) == 4
    for link in links:
        assert (run_dir / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in report and "FAIL" not in report
    assert not [p for p in run_dir.rglob("*.tmp")]


def test_same_seed_same_numbers(tiny_run, tmp_path):
    _, run_dir = tiny_run
    code = reproduce.main(["--config", TINY, "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    first = json.loads((run_dir / "summary.json").read_text())
    second = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert _numbers(first) == _numbers(second)
    assert (run_dir / "metrics.csv").read_text() == (tmp_path / "tiny" / "metrics.csv").read_text()


@pytest.mark.parametrize("interrupt_at", [3, 14])
def test_interrupted_run_resumes_to_the_same_numbers(tiny_run, tmp_path, monkeypatch, capsys, interrupt_at):
    """Interrupt (KeyboardInterrupt, as Ctrl-C or kill deliver it) right after a checkpoint, mid-run; resume."""
    _, run_dir = tiny_run
    monkeypatch.setattr(gd_runs, "CHECKPOINT_EVERY_S", 0.0)  # a checkpoint after every chunk
    saved = reproduce_io.CheckpointStore.save
    count = {"n": 0}

    def save_then_interrupt(self, key, arrays, meta=None):
        saved(self, key, arrays, meta)
        count["n"] += 1
        if count["n"] == interrupt_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(reproduce_io.CheckpointStore, "save", save_then_interrupt)
    args = ["--config", TINY, "--out", str(tmp_path), "--no-progress"]
    assert reproduce.main(args) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not (tmp_path / "tiny" / "summary.json").exists()
    monkeypatch.setattr(reproduce_io.CheckpointStore, "save", saved)
    assert reproduce.main(args) == 0
    resumed = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert resumed["checkpoints_reused"] >= 1
    assert _numbers(resumed) == _numbers(json.loads((run_dir / "summary.json").read_text()))


def test_changed_config_refuses_old_checkpoints(tiny_run, tmp_path, capsys):
    _, run_dir = tiny_run
    args = ["--config", TINY, "--out", str(run_dir.parent), "--no-progress", "--set", "convergence.fit_hi=0.02"]
    assert reproduce.main(args) == 2
    assert "--fresh" in capsys.readouterr().err
    assert reproduce.main([*args, "--run-name", "other", "--set", "trust_region.enabled=false",
                           "--set", "implicit_bias.enabled=false", "--set", "convergence.losses=[square]"]) == 0


def test_a_failed_claim_sets_the_exit_code(tiny_run, tmp_path, capsys):
    args = ["--config", TINY, "--out", str(tmp_path), "--no-progress", "--set", "convergence.steps=100",
            "--set", "trust_region.enabled=false", "--set", "implicit_bias.enabled=false"]
    assert reproduce.main(args) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "DELM reaches L*" in out
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert not summary["all_passed"] and summary["claims_passed"] < summary["claims_total"]


@pytest.mark.parametrize("args, fragments", [
    (["--set", "model.gama=0.5"], ["configuration error", "unknown key 'model.gama'", "did you mean 'gamma'"]),
    (["--set", "data.pca_dim=500"], ["configuration error", "pca_dim", "500"]),
    (["--set", "implicit_bias.n_train=5000"], ["implicit_bias.n_train (5000) exceeds"]),
    (["--config", "no/such.yaml"], ["does not exist"]),
])
def test_configuration_errors_exit_2_with_the_key(args, fragments, tmp_path, capsys):
    base = ["--config", TINY, "--out", str(tmp_path), "--no-progress", "--set", "convergence.enabled=false",
            "--set", "trust_region.enabled=false"]
    assert reproduce.main([*base, *args]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err


def test_offline_missing_dataset_through_the_cli(tmp_path):
    """An offline user without the files: exit status 2, the data module's message, no traceback."""
    env = {**os.environ, "HOME": str(tmp_path), "DEQ_JAX_DATA_DIR": str(tmp_path / "cache"),
           "DEQ_JAX_DATA_BASE_URL": "http://127.0.0.1:9/{name}/"}  # a closed port: offline, at once
    proc = subprocess.run([sys.executable, "-m", "experiments", "reproduce", "--config",
                           str(ROOT / "configs" / "mnist.yaml"), "--out", str(tmp_path / "out"), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "data set 'mnist' unavailable" in proc.stderr
    assert "train-images-idx3-ubyte.gz" in proc.stderr and str(tmp_path / "cache") in proc.stderr
    assert not list((tmp_path / "cache").rglob("*.gz"))
