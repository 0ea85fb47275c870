"""Benchmark: one training step of the Fashion-MNIST DEQ classifier (examples/fashion_deq.py), side by side.

    python -m experiments bench --suite fashion [--repeats 10] [--batch 128] [--publish | --out PATH]

The model: conv 3x3/2 (32) -> relu -> conv 3x3/2 (64) -> relu -> dense -> h (d = 128); per sample
`z* = tanh(W_c z* + U h + b)` with `W_c = W min(1, 0.9 / |W|_2)` (|W|_2 by 20 steps of power iteration, the
singular vectors held constant in the derivative), width 128; logits `z* V + c`; cross-entropy; one Adam step;
a batch of 128 normalised Fashion-MNIST training images; float32. Every row has the same data and initial
parameters, and takes the same step: forward solve, implicit backward, Adam update. Rows:

  deq_jax implicit[S]   the example's own model and loss (`deq_jax.solve(..., solver="anderson", batch_axis=0,
                        backward=Implicit(S))` through `deq_jax.minibatch.make_minibatch_step`), for each backward
                        linear solver S in forward (the example's default), bicgstab, gmres, normal_cg
  jaxopt                the same step written with plain jaxopt: `AndersonAcceleration(implicit_diff=True)` with
                        its default backward (`solve_normal_cg`), stopped at `tol * |Z*|` over the whole batch
                        (jaxopt's tolerance is absolute; `|Z*|` from a float64 solve at the initial parameters)
  torchdeq              the same model in PyTorch (same weights; `F.pad` reproduces JAX's "SAME" padding) through
                        `torchdeq.get_deq(f_solver="anderson", b_solver="anderson", ift=True)`, z of shape
                        (batch, width): torchdeq stops per sample on `|f(z) - z| / |f(z)|`, deq_jax's rule. Needs
                        the optional `peer` extra (torch, torchdeq); without it the row is left out, with a note.

Each row is compiled (JAX: ahead of time) and checked outside the timing: its forward iterations, its own
convergence verdict, the independent float64 per-sample relative residual of the equilibrium it returns, and its
gradient's relative error against a float64 reference (deq_jax, fixed-point iteration and GMRES to 1e-12). Then the
timed steps of all rows are interleaved round by round, so that a shared machine's load hits them alike; each row
reports min and median, and its paired median ratio to the `deq_jax ... implicit[forward]` row (the median over the
rounds of the two steps' time ratio). Exit status: 0 done and every row checked out, 1 a row failed its check,
2 a usage error, 130 interrupted (nothing written).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import pathlib
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import deq_jax
from deq_jax import minibatch
from experiments.bench import render as renderer
from experiments.bench import report
from experiments.bench import run as run_lib
from experiments.bench.torch_cases import availability
from experiments.common import cli, interrupts, io
from experiments.common.env import environment

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fashion_deq.py"
BACKWARDS = ("forward", "bicgstab", "gmres", "normal_cg")
EXAMPLE_BACKWARD = "forward"  # the example's default: the rows' ratios are taken to its step
BASELINE = f"deq_jax tanh-conv per_sample anderson implicit[{EXAMPLE_BACKWARD}]"
GRAD_TOLERANCE = 1e-2  # float32 steps solved to tol 1e-4: gradients agree with float64 to ~1e-3 relative


def _example() -> Any:
    """examples/fashion_deq.py as a module: the deq_jax rows run the example's own model."""
    spec = importlib.util.spec_from_file_location("fashion_deq_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _flat(params: dict) -> dict:
    """`{"conv1": ..., "deq.W": ...}`: one name per array, the rows' common naming of gradients."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": np.asarray(vv) for kk, vv in v.items()})
        else:
            out[k] = np.asarray(v)
    return out


def _spectral_weight(W, contraction: float, iterations: int = 20):
    """`W min(1, c / sigma)`, sigma by power iteration from the fixed start deq_jax.TanhMap uses (plain JAX)."""
    fixed = jax.lax.stop_gradient(W)
    v = jax.random.normal(jax.random.PRNGKey(0), (W.shape[1],), jnp.float32).astype(W.dtype)
    v = v / jnp.linalg.norm(v)
    for _ in range(iterations):
        w = fixed.T @ (fixed @ v)
        v = w / jnp.linalg.norm(w)
    u = fixed @ v
    u = jax.lax.stop_gradient(u / jnp.linalg.norm(u))
    return W * jnp.minimum(1.0, contraction / (u @ W @ v))


# ----------------------------------------------------------------------------- the rows


class Row:
    """One implementation's step: `prepare()` compiles it; `run()` takes one timed step; `check()` the numbers."""

    def __init__(self, name: str, impl: str, backward: str, prepare: Callable[[], tuple[Callable, Callable, float]]):
        self.name, self.impl, self.backward, self.prepare_fn = name, impl, backward, prepare


def _plain_step(loss: Callable, optimizer: Any) -> Callable:
    def step(params, opt_state, batch):
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def _deq_jax_rows(ex: Any, settings: dict, params: dict, batch: tuple) -> list[Row]:
    rows = []
    for backward in BACKWARDS:
        model = ex.FashionDEQ(settings["width"], settings["embed"], settings["tol"], backward, "spectral", 0.9)

        def loss(params, batch, model=model):
            value, metrics = model.loss(params, batch)
            _, sol, _ = model.logits(params, batch[0])
            return value, dict(metrics, state=sol.value)

        def info(aux, grads, value):
            return {
                "iterations": int(aux["forward_iterations"]),
                "converged_own": not bool(aux["forward_not_converged"]),
                "state": np.asarray(aux["state"]),
                "grads": _flat(grads),
                "loss": float(value),
            }

        def step_loss(params, batch, model=model):
            return model.loss(params, batch)

        name = f"deq_jax tanh-conv per_sample anderson implicit[{backward}]"
        rows.append(
            _row_with_check(name, "deq_jax", f"implicit[{backward}]", step_loss, loss, params, batch, settings, info)
        )
    return rows


def _row_with_check(name, impl, backward, step_loss, check_loss, params, batch, settings, info) -> Row:
    """A JAX row whose timed step differentiates `step_loss` and whose check evaluates `check_loss` (which also
    returns the equilibrium)."""

    def prepare():
        optimizer = optax.adam(settings["lr"])
        step = (
            minibatch.make_minibatch_step(step_loss, optimizer)
            if impl == "deq_jax"
            else _plain_step(step_loss, optimizer)
        )
        opt_state = optimizer.init(params)
        start = time.perf_counter()
        compiled = jax.jit(step).lower(params, opt_state, batch).compile()
        compile_s = time.perf_counter() - start

        def run():
            return jax.block_until_ready(compiled(params, opt_state, batch))

        def check():
            (value, aux), grads = jax.jit(jax.value_and_grad(check_loss, has_aux=True))(params, batch)
            return info(aux, grads, value)

        return run, check, compile_s

    return Row(name, impl, backward, prepare)


def _jaxopt_row(ex: Any, settings: dict, params: dict, batch: tuple, z_norm: float) -> Row:
    import jaxopt  # deprecated upstream and warns on import: only when this row is built

    model = ex.FashionDEQ(settings["width"], settings["embed"], settings["tol"], EXAMPLE_BACKWARD, "spectral", 0.9)
    tol_abs = settings["tol"] * z_norm

    def loss(params, batch):
        x, labels = batch
        h = model.embedding(params, x)
        deq = params["deq"]
        Wc = _spectral_weight(deq["W"], 0.9)
        injection = h @ deq["U"].T + deq["b"]
        f = lambda z, Wc, injection: jnp.tanh(z @ Wc.T + injection)
        solver = jaxopt.AndersonAcceleration(fixed_point_fun=f, tol=tol_abs, maxiter=100, implicit_diff=True)
        z, state = solver.run(jnp.zeros((x.shape[0], settings["width"]), x.dtype), Wc, injection)
        logits = z @ params["head"] + params["bh"]
        value = jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, labels[:, None], 1)[:, 0])
        return value, {"iterations": state.iter_num, "converged": state.error <= tol_abs, "state": z}

    def info(aux, grads, value):
        return {
            "iterations": int(aux["iterations"]),
            "converged_own": bool(aux["converged"]),
            "state": np.asarray(aux["state"]),
            "grads": _flat(grads),
            "loss": float(value),
        }

    return _row_with_check(
        "jaxopt tanh-conv per_sample anderson implicit", "jaxopt", "implicit", loss, loss, params, batch, settings, info
    )


def _torchdeq_row(settings: dict, params: dict, batch: tuple) -> Row:
    def prepare():
        import torch  # optional ('peer' extra) and seconds to import: only for this row
        import torch.nn.functional as F
        import torchdeq

        tol, width = settings["tol"], settings["width"]
        deq = torchdeq.get_deq(
            f_solver="anderson",
            b_solver="anderson",
            f_max_iter=100,
            b_max_iter=100,
            f_tol=tol,
            b_tol=tol,
            f_stop_mode="rel",
            b_stop_mode="rel",
            ift=True,
        )
        if not (deq.f_tol == tol and deq.f_max_iter == 100 and deq.f_stop_mode == "rel" and deq.b_tol == tol):
            raise RuntimeError("torchdeq did not take the settings asked for (it ignores unknown keys)")
        flat = _flat(params)
        layout = {"conv1": (3, 2, 0, 1), "conv2": (3, 2, 0, 1)}  # HWIO -> OIHW
        tensors = {
            k: torch.tensor(np.ascontiguousarray(np.transpose(v, layout[k]) if k in layout else v), requires_grad=True)
            for k, v in flat.items()
        }
        initial = {k: v.detach().clone() for k, v in tensors.items()}
        optimizer = torch.optim.Adam(list(tensors.values()), lr=settings["lr"])
        x = torch.tensor(np.asarray(batch[0])).reshape(-1, 1, 28, 28)
        labels = torch.tensor(np.asarray(batch[1]), dtype=torch.long)
        box: dict = {}

        def spectral(W):
            with torch.no_grad():
                v = torch.tensor(np.asarray(jax.random.normal(jax.random.PRNGKey(0), (W.shape[1],), jnp.float32)))
                v = v / v.norm()
                for _ in range(20):
                    w = W.T @ (W @ v)
                    v = w / w.norm()
                u = W @ v
                u = u / u.norm()
            return W * torch.clamp(0.9 / (u @ W @ v), max=1.0)

        def forward():
            p = tensors
            h = F.relu(F.conv2d(F.pad(x, (0, 1, 0, 1)), p["conv1"], p["b1"], stride=2))  # JAX "SAME" at stride 2
            h = F.relu(F.conv2d(F.pad(h, (0, 1, 0, 1)), p["conv2"], p["b2"], stride=2))
            h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1) @ p["dense"] + p["bd"]  # NHWC flattening, as JAX's
            Wc = spectral(p["deq.W"])
            injection = h @ p["deq.U"].T + p["deq.b"]
            f = lambda z: torch.tanh(z @ Wc.T + injection)
            z_out, info = deq(f, torch.zeros(x.shape[0], width), backward_writer=lambda i: box.__setitem__("info", i))
            z = z_out[-1]
            logits = z @ p["head"] + p["bh"]
            return F.cross_entropy(logits, labels), z, info

        def reset():
            with torch.no_grad():
                for k, v in tensors.items():
                    v.copy_(initial[k])
            optimizer.zero_grad(set_to_none=True)

        def run():
            reset()
            optimizer.zero_grad(set_to_none=True)
            forward()[0].backward()
            optimizer.step()

        def check():
            reset()
            value, z, info = forward()
            value.backward()
            grads = {k: v.grad.detach().numpy() for k, v in tensors.items()}
            grads = {k: (np.transpose(g, (2, 3, 1, 0)) if k in layout else g) for k, g in grads.items()}  # OIHW->HWIO
            reset()
            back = box.get("info")
            return {
                "iterations": int(info["nstep"].max().item()),
                "converged_own": bool(info["rel_lowest"].max().item() < tol),
                "state": z.detach().numpy(),
                "grads": grads,
                "loss": float(value.detach()),
                "backward_iterations": None if back is None else int(back["nstep"].max().item()),
            }

        run()  # the first step (PyTorch allocates and warms up)
        return run, check, None

    return Row("torchdeq tanh-conv per_sample anderson implicit", "torchdeq", "implicit", prepare)


# ----------------------------------------------------------------------------- reference and checks


def _reference(ex: Any, settings: dict, params: dict, batch: tuple) -> dict:
    """float64: the loss's gradient with fixed-point iteration and a GMRES backward to 1e-12, and `|Z*|`."""
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x, labels = jnp.asarray(batch[0], jnp.float64), jnp.asarray(batch[1])
        model = ex.FashionDEQ(settings["width"], settings["embed"], 1e-12, "gmres", "spectral", 0.9)
        layer = model.layer

        def loss(params):
            h = model.embedding(params, x)
            sol = deq_jax.solve(
                layer,
                jnp.zeros((x.shape[0], settings["width"]), jnp.float64),
                params["deq"],
                h,
                solver="fixed_point",
                backward=deq_jax.Implicit("gmres", tol=1e-12),
                tol=1e-12,
                maxiter=2000,
                batch_axis=0,
            )
            logits = sol.value @ params["head"] + params["bh"]
            return deq_jax.cross_entropy(logits, labels), (sol.stats.converged, sol.value, h)

        (value, (converged, z, h)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p64)
        if not bool(converged):
            raise RuntimeError("the float64 reference solve did not converge")
        return {
            "loss": float(value),
            "grads": _flat(jax.device_get(grads)),
            "z_norm": float(jnp.linalg.norm(z)),
            "h": np.asarray(h),
            "Wc": np.asarray(layer.weight(p64["deq"]["W"])),
        }


def _judge(row: dict, chk: dict, ref: dict, params: dict, tol: float) -> None:
    """The independent verdict: float64 per-sample relative residual of the returned equilibrium (at the float64
    injection), gradient errors against the float64 reference."""
    z = np.asarray(chk["state"], np.float64)
    deq = {k: np.asarray(v, np.float64) for k, v in params["deq"].items()}
    fz = np.tanh(z @ ref["Wc"].T + ref["h"] @ deq["U"].T + deq["b"])
    per_sample = np.linalg.norm(fz - z, axis=1) / np.linalg.norm(fz, axis=1)
    errors = {
        k: float(np.linalg.norm(np.asarray(chk["grads"][k], np.float64) - r) / max(np.linalg.norm(r), 1e-300))
        for k, r in ref["grads"].items()
    }
    row.update(
        iterations=chk["iterations"],
        converged_own=chk["converged_own"],
        relative_residual=float(np.linalg.norm(fz - z) / np.linalg.norm(fz)),
        worst_sample_relative_residual=float(per_sample.max()),
        # every sample within 10x the tolerance: jaxopt's whole-batch absolute rule lets single samples exceed tol
        converged=bool(per_sample.max() <= 10 * tol),
        grad_error={"conv1": errors["conv1"], "deq.W": errors["deq.W"]},
        grad_error_max=max(errors.values()),
        loss=chk["loss"],
    )
    if chk.get("backward_iterations") is not None:
        row["backward_iterations"] = chk["backward_iterations"]


# ----------------------------------------------------------------------------- the run


def measure(args: argparse.Namespace, log: Callable[[str], None] = print) -> tuple[list[dict], dict, list[str]]:
    """Build, check and time every row; returns the rows, the problem record and notes."""
    ex = _example()
    train, _ = ex.load(small=False, data_dir=args.data_dir)
    batch = (jnp.asarray(train[0][: args.batch]), jnp.asarray(train[1][: args.batch]))
    settings = {"width": 128, "embed": 128, "tol": args.tol, "lr": 2e-3}
    model = ex.FashionDEQ(settings["width"], settings["embed"], settings["tol"], EXAMPLE_BACKWARD, "spectral", 0.9)
    params = model.init(jax.random.PRNGKey(0))
    ref = _reference(ex, settings, params, batch)
    rows_spec = [*_deq_jax_rows(ex, settings, params, batch), _jaxopt_row(ex, settings, params, batch, ref["z_norm"])]
    status = availability()
    notes = []
    if status["torchdeq"]:
        rows_spec.append(_torchdeq_row(settings, params, batch))
    else:
        notes.append(status["note"].replace("torch and torchdeq rows", "the torchdeq row"))
    rows, ready = [], []
    for spec in rows_spec:
        if args.rows and not any(part in spec.name for part in args.rows.split("|")):
            continue
        interrupts.check()
        row = {"name": spec.name, "impl": spec.impl, "backward": spec.backward, "status": "ok", "times_s": []}
        row.update(problem="tanh-conv", formulation="per_sample", solver="anderson", label="", note="", tol=args.tol)
        rows.append(row)
        try:
            run, check, compile_s = spec.prepare_fn()
            row["compile_s"] = compile_s
            run()  # one untimed step after compiling
            _judge(row, check(), ref, params, args.tol)
        except Exception as err:  # a failed row is reported as failed; the others still run
            row.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=6))
            log(f"  ERROR {spec.name}: {row['error']}")
            continue
        ready.append((row, run))
        log(
            f"  ready {spec.name}: compile {report.fmt_s(compile_s)}, iterations {row['iterations']}, worst sample "
            f"residual {row['worst_sample_relative_residual']:.1e}, grad error {row['grad_error_max']:.1e}"
        )
    for r in range(args.repeats):
        for row, run in ready:
            interrupts.check()
            time.sleep(args.settle)  # PyTorch's OpenMP threads spin a while after a parallel region
            start = time.perf_counter()
            run()
            row["times_s"].append(time.perf_counter() - start)
        log(f"  timing round {r + 1}/{args.repeats} done")
    baseline = next((row for row, _ in ready if row["name"] == BASELINE), None)
    for row, _ in ready:
        row["min_s"] = float(np.min(row["times_s"]))
        row["median_s"] = float(np.median(row["times_s"]))
        if baseline is not None:
            row["paired_ratio_to_baseline"] = float(
                np.median(np.asarray(row["times_s"]) / np.asarray(baseline["times_s"]))
            )
    problem = {
        "n": args.batch,
        "m": settings["width"],
        "m_y": 10,
        "tol": args.tol,
        "maxiter": 100,
        "data": f"Fashion-MNIST train, the first {args.batch} images, normalised by the training set's mean and std",
        "model": "conv 3x3/2 (32) -> relu -> conv 3x3/2 (64) -> relu -> dense 3136 -> 128 -> z* = tanh(W_c z* + U h "
        "+ b), W_c = W min(1, 0.9 / |W|_2) (20 power iterations), width 128 -> linear head; cross-entropy; Adam 2e-3",
        "stopping_rule": "deq_jax and torchdeq: per sample |f(z) - z| / |f(z)| <= tol; jaxopt: |F(Z) - Z| <= tol |Z*| "
        "over the batch (absolute)",
        "reference": "float64 deq_jax, fixed-point iteration and Implicit('gmres') to 1e-12",
        "dtype": "float32",
    }
    return rows, problem, notes


def goals(rows: list[dict]) -> list[dict]:
    ok = [r for r in rows if r["status"] == "ok"]
    find = lambda impl: next((r for r in ok if r["impl"] == impl), None)
    base = next((r for r in ok if r["name"] == BASELINE), None)
    out = []
    bad = [r["name"] for r in ok if not r["converged"] or r["grad_error_max"] > GRAD_TOLERANCE]
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    out.append(
        {
            "goal": f"every row ran, converged (every sample within 10 tol, float64 check) and its gradient is within "
            f"{GRAD_TOLERANCE:g} of float64",
            "kind": "correctness",
            "defined_at": None,
            "met": not bad and not failed,
            "status": "met" if not bad and not failed else "NOT met",
            "value": "all rows" if not bad and not failed else f"failed: {', '.join(failed + bad)}",
        }
    )
    if base is not None:
        deq_rows = [r for r in ok if r["impl"] == "deq_jax"]
        fastest = min(deq_rows, key=lambda r: r["paired_ratio_to_baseline"])
        ratios = ", ".join(f"{r['backward']} {r['paired_ratio_to_baseline']:.2f}" for r in deq_rows)
        out.append(
            {
                "goal": f"the example's backward, implicit[{EXAMPLE_BACKWARD}], is the fastest deq_jax backward here",
                "kind": "performance",
                "defined_at": None,
                "met": fastest is base,
                "status": "met" if fastest is base else "NOT met",
                "value": f"paired median ratios to implicit[{EXAMPLE_BACKWARD}]: {ratios}",
            }
        )
    for impl in ("jaxopt", "torchdeq"):
        twin = find(impl)
        entry = {
            "goal": f"deq_jax (implicit[{EXAMPLE_BACKWARD}]) takes no longer per step than {impl}",
            "kind": "performance",
            "defined_at": None,
        }
        if twin is None or base is None:
            entry.update(met=None, status="not measured", value="the rows it compares were not run")
        else:
            ratio = float(np.median(np.asarray(base["times_s"]) / np.asarray(twin["times_s"])))
            entry.update(
                met=ratio <= 1.0,
                status="met" if ratio <= 1.0 else "NOT met",
                value=f"paired median ratio {ratio:.2f} ({report.fmt_ms(base['min_s'])} vs "
                f"{report.fmt_ms(twin['min_s'])} ms min, {report.fmt_ms(base['median_s'])} vs "
                f"{report.fmt_ms(twin['median_s'])} ms median)",
            )
        out.append(entry)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments bench --suite fashion", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--repeats", type=int, default=10, help="timed steps per row, interleaved (default 10)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of every solve (default 1e-4)")
    p.add_argument("--settle", type=float, default=0.25, help="untimed pause before each timed step (default 0.25 s)")
    p.add_argument("--rows", default=None, help="only rows whose name contains one of these '|'-separated strings")
    p.add_argument("--data-dir", default=None, help="a folder with Fashion-MNIST's IDX files")
    p.add_argument("--out", default=str(ROOT / "results" / "bench" / "fashion.json"), help="JSON output path")
    p.add_argument(
        "--publish",
        nargs="?",
        const="fashion",
        default=None,
        metavar="NAME",
        help="write docs/results/bench-NAME.json (default NAME fashion) and re-render docs/benchmarks.md",
    )
    p.add_argument("--note", action="append", default=[], help="a remark recorded with the result (repeatable)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m experiments bench --suite fashion`: print the table and goals, write the JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = cli.parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    return cli.run("bench", lambda: _main(args, argv), interrupted="nothing was written")


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    for name in ("repeats", "batch"):
        if getattr(args, name) < 1:
            raise cli.UserError(f"--{name} must be a positive integer; got {getattr(args, name)}")
    if not args.tol > 0:
        raise cli.UserError(f"--tol must be positive; got {args.tol}")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    started = time.time()
    env = environment(extra_packages=("torch", "torchdeq"))
    print(
        f"bench --suite fashion: the Fashion-MNIST DEQ's training step, batch {args.batch}, tol {args.tol:g}; load "
        f"{env['machine']['load_average_1_5_15']}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}",
        flush=True,
    )
    with interrupts.safe_points():
        rows, problem, notes = measure(args)
    verdicts = goals(rows)
    payload = report.payload(
        suite="fashion",
        argv=["--suite", "fashion", *argv],
        started=started,
        environment=env,
        device={"jax_device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform},
        problem=problem,
        settings={"repeats": args.repeats, "settle_s": args.settle, "rows": args.rows},
        notes=notes + args.note,
        goals=verdicts,
        rows=rows,
    )
    payload["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    payload["notes"] = payload["notes"] + run_lib._load_note(payload)  # the step suites' note on a loaded machine
    print()
    print(table(rows))
    print()
    print(report.goals_text(verdicts))
    interrupts.check()
    if args.publish:
        path = ROOT / "docs" / "results" / f"bench-{args.publish}.json"
        io.write_json(path, payload)
        changed, count = renderer.render_file(ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "results")
        print(f"\nwrote {path}; {'rendered' if changed else 'unchanged'} docs/benchmarks.md ({count} blocks)")
    else:
        io.write_json(args.out, payload)
        print(f"\nwrote {args.out}")
    return 0 if verdicts[0]["met"] else 1


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table, with each row's paired median ratio to the example's backward's step."""
    header = (
        f"| row | min ms | median ms | x {EXAMPLE_BACKWARD} (paired median) | compile | forward iters | "
        "worst sample residual | grad err (max) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']}: {r.get('error')} | | | | | | |")
            continue
        ratio = r.get("paired_ratio_to_baseline")
        lines.append(
            f"| {r['name']} | {report.fmt_ms(r['min_s'])} | {report.fmt_ms(r['median_s'])} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {report.fmt_s(r.get('compile_s'))} | {r['iterations']} | "
            f"{r['worst_sample_relative_residual']:.1e} | {r['grad_error_max']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
