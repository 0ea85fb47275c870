"""`python -m experiments bench --suite step|peer|gpu [options]`: benchmarks of one training step.

Suites (all rows of a suite run in one process, their timed repeats interleaved round by round, so that the load
of a shared machine hits every row alike):

- `step` (issue 2, `make bench`): one DELM training step (value_and_grad + optax SGD update) at m = 784,
  batch 1024, float32, 10 classes: deq_jax with the direct, Anderson, fixed-point and Broyden solvers (implicit
  backward) in both formulations (transposed, per-sample), each next to the same computation written inline with
  plain JAX + jaxopt; plus XLA temporary memory of the implicit vs the unrolled backward at 100 fixed-point
  iterations. Goals: the library within 10% of the inline baseline; implicit >= 10x less temporary memory.
- `peer` (issue 5): the same step (and a nonlinear tanh DEQ) through every deq_jax forward solver x backward mode,
  the inline baseline, torchdeq 0.1.0 and plain PyTorch, with the same data, tolerance and stopping rule.
- `gpu`: the peer suite at full batch n = 60000 on a GPU (`--device gpu` by default; `--device cpu --n 256
  --width 64` runs the same code path on a CPU).
- `profile` (issue 5): where the time of the transposed DELM step goes, component by component, next to a
  hand-written closed-form step; and how many LU factorisations the compiled deq_jax step contains
  (`experiments/bench/profile.py`).

Per row: step time min and median (after warmup), compile time (trace + XLA compile), forward iterations, the
implementation's own convergence verdict and an independent one (the float64 relative residual of the returned
equilibrium <= tol), gradient errors against float64 references (the DELM's closed form), XLA temporary memory
and the sampled peak resident-memory growth of the first step. The table is printed; the JSON (written
atomically) also records the machine, the library versions and the environment.
"""

from __future__ import annotations

import os

# LAPACK (OpenBLAS) threads fight XLA's own threads on a small CPU: one thread, unless the caller chose otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# On a GPU, JAX would grab 75% of the memory up front and leave none to the PyTorch rows of the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Optional  # noqa: E402

import numpy as np  # noqa: E402

from experiments.bench import common  # noqa: E402

SUITES = ("step", "peer", "gpu", "profile")
STEP_SOLVERS = ("direct", "anderson", "fixed_point", "broyden")
ITERATIVE = ("anderson", "fixed_point", "broyden")
MEMORY_ITERATIONS = 100  # the unrolled-vs-implicit comparison runs exactly this many fixed-point iterations
MEMORY_TOL = 1e-30  # unreachable on purpose: both backward modes run all MEMORY_ITERATIONS iterations


class DeviceError(RuntimeError):
    """The requested device is not available."""


# ----------------------------------------------------------------------------- arguments

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=SUITES, default="step", help="which benchmark (default: step)")
    parser.add_argument("--out", default=None, help="JSON output path (default results/bench/<suite>.json)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default=None,
                        help="where to run (default: gpu for --suite gpu, else cpu); gpu errors if there is none")
    parser.add_argument("--n", type=int, default=None, help="batch size (default 1024; 60000 for --suite gpu)")
    parser.add_argument("--width", type=int, default=784, help="model width m (default 784)")
    parser.add_argument("--classes", type=int, default=10, help="number of classes m_y (default 10)")
    parser.add_argument("--gamma", type=float, default=0.9, help="DELM gamma (default 0.9)")
    parser.add_argument("--tol", type=float, default=1e-5, help="relative tolerance of every solve (default 1e-5)")
    parser.add_argument("--maxiter", type=int, default=200,
                        help="iteration cap of every solve (default 200: fixed-point iteration needs ~110 at "
                             "gamma 0.9, tol 1e-5)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="SGD step size (default 1e-3)")
    parser.add_argument("--data", choices=("auto", "fashion_mnist", "random"), default="auto",
                        help="auto: Fashion-MNIST if on disk, else random (default auto)")
    parser.add_argument("--precision", choices=("highest", "default"), default="highest",
                        help="matmul precision of every row (GPUs: 'default' is TF32) (default highest)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row (default 5)")
    parser.add_argument("--slow-repeats", type=int, default=3,
                        help="timed steps for rows whose first step took over 1 s (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row after compiling (default 1)")
    parser.add_argument("--settle", type=float, default=0.25,
                        help="seconds to pause (untimed) before each timed step, so that the previous row's idle "
                             "threads (PyTorch's OpenMP threads spin after each parallel region) have stopped "
                             "(default 0.25)")
    parser.add_argument("--rows", default=None, help="only rows whose name matches this regular expression")
    parser.add_argument("--skip", default=None, help="leave out rows whose name matches this regular expression")
    parser.add_argument("--max-temp-gb", type=float, default=None,
                        help="do not run rows whose XLA temporary memory exceeds this many GiB (default: 4 on a CPU, "
                             "half the GPU's memory on a GPU)")
    parser.add_argument("--plot", default=None, help="also write a PNG bar chart of the step times here")
    parser.add_argument("--list", action="store_true", help="print the row names of the suite and exit")
    args = parser.parse_args(argv)
    args.device = args.device or ("gpu" if args.suite == "gpu" else "cpu")
    args.n = args.n if args.n is not None else (60000 if args.suite == "gpu" else 1024)
    args.out = args.out or os.path.join("results", "bench", f"{args.suite}.json")
    for name in ("n", "width", "classes", "maxiter", "repeats", "slow_repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0; got {args.warmup}")
    if args.settle < 0:
        parser.error(f"--settle must be >= 0; got {args.settle}")
    if not 0.0 < args.gamma < 1.0:
        parser.error(f"--gamma must be in the open interval (0, 1); got {args.gamma}")
    for name in ("tol", "learning_rate", "max_temp_gb"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    for name in ("rows", "skip"):
        if getattr(args, name) is not None:
            try:
                re.compile(getattr(args, name))
            except re.error as err:
                parser.error(f"--{name} must be a regular expression; got {getattr(args, name)!r} ({err})")
    return args


# ----------------------------------------------------------------------------- devices, machine, versions

def resolve_device(kind: str):
    """The JAX device for `kind`; `DeviceError` naming what JAX sees when a GPU is asked for and absent."""
    import jax

    if kind == "cpu":
        return jax.devices("cpu")[0]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        raise DeviceError(
            f"--device gpu: JAX finds no GPU on this machine (jax.devices() = {jax.devices()}, jaxlib "
            f"{importlib.metadata.version('jaxlib')}). Run on a machine with an NVIDIA GPU and a CUDA build of jax "
            f"(pip install 'jax[cuda12]' or 'jax[cuda13]'), or pass --device cpu (with a small --n) to exercise the "
            f"same code path on the CPU.")
    return gpus[0]


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _default_max_temp_gb(device) -> float:
    """4 GiB on a CPU (a shared 2-core machine); half of the accelerator's memory elsewhere (40 if unknown)."""
    if device.platform == "cpu":
        return 4.0
    try:
        return 0.5 * device.memory_stats()["bytes_limit"] / 2**30
    except (AttributeError, KeyError, TypeError, RuntimeError):
        return 40.0


def environment(device, torch_info: dict) -> dict:
    """Machine, versions and the environment variables that change the numbers."""
    import jax

    machine = {"cpu_model": common.cpu_model(), "cpu_cores": os.cpu_count(), "platform": platform.platform(),
               "jax_device": str(device), "jax_device_kind": getattr(device, "device_kind", str(device)),
               "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    versions = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "jaxopt", "optax", "numpy", "scipy", "deq_jax", "torch", "torchdeq"):
        versions[package] = _version(package)
    env = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS",
                                          "JAX_DEFAULT_MATMUL_PRECISION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                          "CUDA_VISIBLE_DEVICES")}
    try:
        import threadpoolctl

        env["blas_threadpools"] = [{"api": d.get("internal_api"), "threads": d.get("num_threads"),
                                    "library": os.path.basename(d.get("filepath", ""))}
                                   for d in threadpoolctl.threadpool_info()]
    except ImportError:
        env["blas_threadpools"] = "threadpoolctl not installed"
    env["jax_default_matmul_precision"] = jax.config.jax_default_matmul_precision
    if torch_info:
        env["torch"] = torch_info
    return {"machine": machine, "versions": versions, "env": env}


# ----------------------------------------------------------------------------- suites

def build_cases(args: argparse.Namespace, p: common.Problem, device, torch_ok: dict) -> list[common.Case]:
    from experiments.bench import jax_cases as bj

    kw = dict(device=device, precision=args.precision)
    cases: list[common.Case] = []
    if args.suite == "step":
        for formulation in ("transposed", "per_sample"):
            for solver in STEP_SOLVERS:
                cases.append(bj.deq_jax_delm(p, formulation, solver, "implicit", **kw))
                cases.append(bj.inline_delm(p, formulation, solver, **kw))
        for formulation in ("transposed", "per_sample"):
            # the default GMRES backward keeps a restart-20 Krylov basis of the state; BiCGSTAB keeps a few vectors
            for backward, linear_solver in (("implicit", None), ("implicit", "bicgstab"), ("unrolled", None)):
                if linear_solver and formulation == "transposed":
                    continue
                cases.append(bj.deq_jax_delm(
                    p, formulation, "fixed_point", backward, tol=MEMORY_TOL, maxiter=MEMORY_ITERATIONS, **kw,
                    linear_solver=linear_solver, backward_tol=p.tol if backward == "implicit" else None,
                    label=f"{MEMORY_ITERATIONS} it",
                    note=f"forward tol {MEMORY_TOL:g}: runs all {MEMORY_ITERATIONS} iterations by design (memory "
                         f"comparison); implicit backward at tol {p.tol:g}"))
        return cases

    from experiments.bench import torch_cases as bt

    tdev = args.device
    # DELM, per-sample (the generic DEQ form; torchdeq's natural use)
    cases.append(bj.deq_jax_delm(p, "per_sample", "direct", "implicit", **kw))
    cases.append(bj.deq_jax_delm(p, "per_sample", "direct", "one_step", **kw))
    for solver in ITERATIVE:
        for backward in ("implicit", "one_step", "unrolled"):
            cases.append(bj.deq_jax_delm(p, "per_sample", solver, backward, **kw))
    for linear_solver in ("bicgstab", "normal_cg"):
        cases.append(bj.deq_jax_delm(p, "per_sample", "anderson", "implicit", linear_solver=linear_solver, **kw))
    for solver in STEP_SOLVERS:
        cases.append(bj.inline_delm(p, "per_sample", solver, **kw))
    if torch_ok["torch"]:
        cases.append(bt.torch_direct_delm(p, "per_sample", device=tdev))
    if torch_ok["torchdeq"]:
        for solver in ITERATIVE:
            for backward in ("implicit", "one_step"):
                cases.append(bt.torchdeq_delm(p, "per_sample", solver, backward, device=tdev))
    # DELM, transposed (end to end: m_y right-hand sides)
    cases.append(bj.deq_jax_delm(p, "transposed", "direct", "implicit", **kw))
    for solver in ITERATIVE:
        for backward in ("implicit", "one_step", "unrolled"):
            cases.append(bj.deq_jax_delm(p, "transposed", solver, backward, **kw))
    cases.append(bj.inline_delm(p, "transposed", "direct", **kw))
    cases.append(bj.inline_delm(p, "transposed", "anderson", **kw))
    if torch_ok["torch"]:
        cases.append(bt.torch_direct_delm(p, "transposed", device=tdev))
    if torch_ok["torchdeq"]:
        for solver in ("anderson", "fixed_point"):
            cases.append(bt.torchdeq_delm(p, "transposed", solver, "implicit", device=tdev))
    # a nonlinear DEQ
    for solver in ("anderson", "fixed_point"):
        cases.append(bj.deq_jax_tanh(p, solver, "implicit", **kw))
        cases.append(bj.deq_jax_tanh(p, solver, "implicit", linear_solver="bicgstab", **kw))
        cases.append(bj.inline_tanh(p, solver, **kw))
        if torch_ok["torchdeq"]:
            cases.append(bt.torchdeq_tanh(p, solver, "implicit", device=tdev))
    return cases


def select(cases: list[common.Case], rows: Optional[str], skip: Optional[str]) -> list[common.Case]:
    out = [c for c in cases if (rows is None or re.search(rows, c.name)) and not (skip and re.search(skip, c.name))]
    return out


# ----------------------------------------------------------------------------- running rows

def _row_base(case: common.Case) -> dict:
    return {"name": case.name, "impl": case.impl, "problem": case.problem, "formulation": case.formulation,
            "solver": case.solver, "backward": case.backward, "label": case.label, "note": case.note,
            "status": "ok", "times_s": []}


def _fill_check(row: dict, chk: common.Check, p: common.Problem, tol: float, direct: Optional[dict],
                device) -> None:
    ref = common.reference(p, row["problem"])
    row["iterations"] = chk.iterations
    row["converged_own"] = chk.converged
    row["relative_residual"] = common.relative_residual(p, row["problem"], row["formulation"], chk.state, device)
    row["converged"] = bool(np.isfinite(row["relative_residual"]) and row["relative_residual"] <= tol)
    row["grad_error"] = common.relative_errors(chk.grads, ref["grads"])
    if direct is not None and row["problem"] == "delm":
        row["grad_error_vs_direct_f32"] = common.relative_errors(chk.grads, direct)
    row.update(chk.extra)
    if chk.converged is True and not row["converged"]:
        row["flag"] = "reported converged but the independent residual is above tol"


def run_cases(cases: list[common.Case], p: common.Problem, args: argparse.Namespace, direct: Optional[dict],
              device, log=print) -> list[dict]:
    """Prepare (compile), warm up and check every row, then time them round-robin."""
    rows, ready = [], []
    for case in cases:
        row = _row_base(case)
        rows.append(row)
        tol = case.tol if case.tol is not None else p.tol
        row["tol"] = tol
        try:
            prepared = case.prepare()
            row["compile_s"] = prepared.compile_s
            row["temp_bytes"] = prepared.temp_bytes
            if prepared.temp_bytes is not None and prepared.temp_bytes > args.max_temp_gb * 2**30:
                row["status"] = "skipped"
                row["note"] = (f"XLA temporary memory {prepared.temp_bytes / 2**30:.1f} GiB exceeds --max-temp-gb "
                               f"{args.max_temp_gb:g}; compiled, not run")
                log(f"  skip  {case.name}: {row['note']}")
                continue
            if prepared.reset:
                prepared.reset()
            time.sleep(args.settle)
            with common.RssPeak() as rss:
                start = time.perf_counter()
                prepared.run()
                row["first_step_s"] = time.perf_counter() - start
            row["rss_peak_delta_bytes"] = rss.delta
            for _ in range(max(args.warmup - 1, 0)):
                prepared.run()
            if prepared.peak_memory is not None:
                row["device_peak_bytes"] = prepared.peak_memory()
            _fill_check(row, prepared.check(), p, tol, direct, device)
        except Exception as err:  # a row that fails is reported as failed, and the others still run
            row["status"] = "error"
            row["error"] = f"{type(err).__name__}: {err}"
            row["traceback"] = traceback.format_exc(limit=6)
            log(f"  ERROR {case.name}: {row['error']}")
            continue
        slow = row["first_step_s"] > 1.0
        row["repeats"] = min(args.repeats, args.slow_repeats) if slow else args.repeats
        ready.append((row, prepared))
        log(f"  ready {case.name}: compile {_fmt_s(row.get('compile_s'))}, first step {row['first_step_s']:.3f} s, "
            f"iterations {row['iterations']}, residual {row['relative_residual']:.2e}")
    rounds = max((row["repeats"] for row, _ in ready), default=0)
    for r in range(rounds):
        for row, prepared in ready:
            if len(row["times_s"]) >= row["repeats"]:
                continue
            if prepared.reset:
                prepared.reset()
            time.sleep(args.settle)  # measured: a JAX step right after a PyTorch one took 24 ms instead of 14-17
            start = time.perf_counter()
            prepared.run()
            row["times_s"].append(time.perf_counter() - start)
        log(f"  timing round {r + 1}/{rounds} done")
    for row, _ in ready:
        row["min_s"] = float(np.min(row["times_s"]))
        row["median_s"] = float(np.median(row["times_s"]))
    return rows


# ----------------------------------------------------------------------------- goals

def _find(rows: list[dict], **keys) -> Optional[dict]:
    for row in rows:
        if row.get("status") == "ok" and all(row.get(k) == v for k, v in keys.items()):
            return row
    return None


def paired_ratio(a: dict, b: dict) -> float:
    """Median over the timing rounds of `a`'s time / `b`'s time in the same round (robust to a machine whose load
    drifts: the rows of one round run back to back)."""
    k = min(len(a["times_s"]), len(b["times_s"]))
    return float(np.median(np.asarray(a["times_s"][:k]) / np.asarray(b["times_s"][:k])))


def _ratios(a: dict, b: dict) -> str:
    return (f"paired median ratio {paired_ratio(a, b):.2f}, min ratio {a['min_s'] / b['min_s']:.2f}, median ratio "
            f"{a['median_s'] / b['median_s']:.2f} ({_fmt_ms(a['min_s'])} vs {_fmt_ms(b['min_s'])} ms min, "
            f"{_fmt_ms(a['median_s'])} vs {_fmt_ms(b['median_s'])} ms median)")


def goals(suite: str, rows: list[dict]) -> list[dict]:
    """The issues' goals, each stated as met / not met with the numbers behind it.

    Ratios between JAX rows are judged on the paired median ratio (see `paired_ratio`), the one against torchdeq on
    the min times (PyTorch's OpenMP threads suffer more than XLA's from a loaded machine); all three are reported.
    """
    out = []
    if suite == "step":
        for formulation in ("transposed", "per_sample"):
            for solver in STEP_SOLVERS:
                lib = _find(rows, impl="deq_jax", problem="delm", formulation=formulation, solver=solver,
                            backward="implicit", label="")
                base = _find(rows, impl="inline", problem="delm", formulation=formulation, solver=solver)
                if lib is None or base is None:
                    continue
                out.append({"goal": f"deq_jax adds <= 10% over inline ({formulation} {solver})",
                            "met": bool(paired_ratio(lib, base) <= 1.10), "value": _ratios(lib, base)})
        for formulation in ("transposed", "per_sample"):
            unr = _find(rows, impl="deq_jax", formulation=formulation, solver="fixed_point", backward="unrolled",
                        label=f"{MEMORY_ITERATIONS} it")
            for backward in ("implicit", "implicit[bicgstab]"):
                imp = _find(rows, impl="deq_jax", formulation=formulation, solver="fixed_point", backward=backward,
                            label=f"{MEMORY_ITERATIONS} it")
                if imp is None or unr is None or not imp.get("temp_bytes"):
                    continue
                ratio = unr["temp_bytes"] / imp["temp_bytes"]
                which = "default GMRES" if backward == "implicit" else "BiCGSTAB"
                out.append({"goal": f"implicit ({which} backward) needs >= 10x less XLA temp memory than unrolled "
                                    f"at {MEMORY_ITERATIONS} iterations ({formulation})", "met": bool(ratio >= 10),
                            "value": f"{ratio:.1f}x ({_fmt_bytes(unr['temp_bytes'])} vs "
                                     f"{_fmt_bytes(imp['temp_bytes'])})"})
        return out
    t = _find(rows, impl="deq_jax", problem="delm", formulation="transposed", solver="direct", backward="implicit")
    if t is not None:
        limit = 0.010 if suite != "gpu" else 0.002
        out.append({"goal": f"DELM step <= {limit * 1e3:g} ms, transposed formulation",
                    "met": bool(t["min_s"] <= limit),
                    "value": f"min {_fmt_ms(t['min_s'])} ms, median {_fmt_ms(t['median_s'])} ms"})
    delm_lib = [r for r in rows if r.get("status") == "ok" and r["impl"] == "deq_jax" and r["problem"] == "delm"
                and r["backward"].startswith("implicit") and r.get("compile_s")]
    for kind, chosen in (("direct", [r for r in delm_lib if r["solver"] == "direct"]),
                         ("iterative", [r for r in delm_lib if r["solver"] != "direct"])):
        if chosen:
            worst = max(chosen, key=lambda r: r["compile_s"])
            out.append({"goal": f"compile time of a training step <= 2 s ({kind} DELM rows, implicit backward)",
                        "met": bool(worst["compile_s"] <= 2.0),
                        "value": ", ".join(f"{r['formulation']} {r['solver']}{r['backward'][8:]} "
                                           f"{r['compile_s']:.2f} s" for r in chosen)})
    lib = _find(rows, impl="deq_jax", problem="delm", formulation="per_sample", solver="anderson",
                backward="implicit")
    base = _find(rows, impl="inline", problem="delm", formulation="per_sample", solver="anderson")
    if lib and base:
        out.append({"goal": "per-sample Anderson step no slower than raw jaxopt (both GMRES backward)",
                    "met": bool(paired_ratio(lib, base) <= 1.0), "value": _ratios(lib, base)})
    accurate = lambda r: (r.get("status") == "ok" and r["problem"] == "delm" and r["formulation"] == "per_sample"
                          and r["solver"] != "direct" and r["backward"].startswith("implicit") and r.get("converged")
                          and r.get("backward_converged") is not False)
    ours = [r for r in rows if accurate(r) and r["impl"] == "deq_jax"]
    theirs = [r for r in rows if accurate(r) and r["impl"] == "torchdeq"]
    if ours and theirs:
        # across frameworks the min is the fair figure: PyTorch's OpenMP threads suffer more from a loaded machine
        a, b = min(ours, key=lambda r: r["min_s"]), min(theirs, key=lambda r: r["min_s"])
        out.append({"goal": "converged per-sample iterative step with implicit gradients vs torchdeq's best, by "
                            "min time (GPU goal: >= 10x faster)",
                    "met": bool(b["min_s"] / a["min_s"] >= 10),
                    "value": f"torchdeq / deq_jax: {_ratios(b, a)}; rows: {b['name']} vs {a['name']}"})
    flagged = [r["name"] for r in rows if r.get("flag")]
    out.append({"goal": "never a non-converged solve reported as converged", "met": not flagged,
                "value": "none" if not flagged else "; ".join(flagged)})
    return out


# ----------------------------------------------------------------------------- reporting

def _fmt_s(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f}" if x < 10 else f"{x * 1e3:.0f}"


def _fmt_bytes(x: Optional[int]) -> str:
    if x is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x} B"


def _fmt_e(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1e}"


def _converged_cell(row: dict) -> str:
    """The independent verdict; the implementation's own where it disagrees; torchdeq's backward solve's."""
    cell = "yes" if row.get("converged") else "no"
    own = row.get("converged_own")
    if own is not None and bool(own) != row.get("converged"):
        cell += f" (own: {'yes' if own else 'no'})"
    if row.get("backward_converged") is False:
        cell += " (bwd: no)"
    return cell


def table(rows: list[dict]) -> str:
    """A Markdown table of the rows (what docs/benchmarks.md shows)."""
    header = ["row", "min ms", "median ms", "compile", "iters", "converged", "rel. residual", "grad err (1st, 2nd)",
              "vs direct", "XLA temp", "RSS peak +"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        name = row["name"]
        if row["status"] != "ok":
            reason = row.get("error") or row.get("note")
            lines.append(f"| {name} | {row['status']}: {reason} |" + " |" * (len(header) - 2))
            continue
        errors = list(row["grad_error"].values())
        err = ", ".join(_fmt_e(e) for e in errors[:1] + errors[-1:]) if len(errors) > 1 else _fmt_e(errors[0])
        vs = row.get("grad_error_vs_direct_f32")
        iters = str(row["iterations"])
        if row.get("backward_iterations") is not None:
            iters += f" (+{row['backward_iterations']} bwd)"
        cells = [name, _fmt_ms(row["min_s"]), _fmt_ms(row["median_s"]), _fmt_s(row.get("compile_s")), iters,
                 _converged_cell(row), _fmt_e(row["relative_residual"]), err,
                 _fmt_e(max(vs.values())) if vs else "-", _fmt_bytes(row.get("temp_bytes")),
                 _fmt_bytes(row.get("device_peak_bytes") or row.get("rss_peak_delta_bytes"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals_text(items: list[dict]) -> str:
    return "\n".join(f"- [{'met' if g['met'] else 'NOT met'}] {g['goal']}: {g['value']}" for g in items)


def _publishable(tmp: str) -> None:
    """mkstemp creates 0600 files; give the result the permissions of an ordinary file (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def write_json(path: str, payload: dict) -> None:
    """Write `payload` to `path` atomically (a temporary file in the same directory, then `os.replace`)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bench-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1, default=_json_default)
            fh.write("\n")
        _publishable(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(obj: Any):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def plot(path: str, payload: dict) -> None:
    """Horizontal bars of each row's min step time (log scale), median as a tick, coloured by implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r["status"] == "ok"]
    colours = {"deq_jax": "tab:blue", "inline": "tab:orange", "torchdeq": "tab:red", "torch": "tab:purple"}
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.6))
    ys = np.arange(len(rows))[::-1]
    ax.barh(ys, [r["min_s"] * 1e3 for r in rows], color=[colours.get(r["impl"], "grey") for r in rows])
    ax.scatter([r["median_s"] * 1e3 for r in rows], ys, marker="|", color="black", s=80, label="median", zorder=3)
    ax.set_yticks(ys)
    ax.set_yticklabels([r["name"] + ("" if r.get("converged") else "  [not converged]") for r in rows],
                       fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("step time, ms (bar: min, tick: median; log scale)")
    problem = payload["problem"]
    ax.set_title(f"{payload['suite']} suite: one training step, n={problem['n']}, m={problem['m']}, "
                 f"{payload['machine']['cpu_model']} ({payload['machine']['cpu_cores']} cores), "
                 f"{payload['machine']['jax_device_kind']}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles + [ax.collections[0]], list(colours) + ["median"], fontsize=7, loc="upper right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bench-", suffix=".png", dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        _publishable(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- main

def _main_profile(args: argparse.Namespace, p: common.Problem, device, info: dict, argv, started: float) -> int:
    from experiments.bench.profile import backward_solvers, backward_table, profile_table, run_profile

    result = run_profile(p, device=device, precision=args.precision, repeats=max(args.repeats, 5))
    backward = backward_solvers(p, device=device, precision=args.precision)
    step = next(r for r in result["rows"] if r["name"].startswith("deq_jax step"))
    facts = result["facts"]["deq_jax_step"]
    met = [{"goal": "one LU factorisation per step (the backward reuses the forward's factors)",
            "met": facts["getrf_calls"] == 1 and facts["jaxpr_lu_primitives"] == 1,
            "value": f"{facts['getrf_calls']} getrf custom call(s) in the compiled step, "
                     f"{facts['jaxpr_lu_primitives']} lu primitive(s) in its jaxpr"},
           {"goal": "DELM step <= 10 ms (CPU), transposed formulation", "met": bool(step["min_s"] <= 0.010),
            "value": f"min {step['min_s'] * 1e3:.1f} ms, median {step['median_s'] * 1e3:.1f} ms"}]
    info["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    payload = {"suite": args.suite,
               "command": "python -m experiments bench " + " ".join(list(sys.argv[1:] if argv is None else argv)),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "wall_s": time.time() - started, **info,
               "problem": {"n": p.n, "m": p.m, "m_y": p.m_y, "gamma": p.gamma, "dtype": "float32",
                           "precision": args.precision, "data": p.data},
               "settings": {"repeats": max(args.repeats, 5), "device": args.device},
               "goals": met, "facts": result["facts"], "rows": result["rows"], "backward_solvers": backward}
    print()
    print(profile_table(result))
    print()
    print(backward_table(backward))
    print()
    print(json.dumps(result["facts"], indent=1))
    print()
    print(goals_text(met))
    write_json(args.out, payload)
    print(f"\nwrote {args.out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Run a benchmark suite, print its table and goals, write its JSON (and optionally a PNG)."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        device = resolve_device(args.device)
    except DeviceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.max_temp_gb is None:
        args.max_temp_gb = _default_max_temp_gb(device)
    from experiments.bench import jax_cases as bj
    from experiments.bench import torch_cases as bt

    torch_ok = {"torch": False, "torchdeq": False, "note": "", "versions": {}}
    notes = []
    torch_info: dict = {}
    if args.suite in ("peer", "gpu"):
        torch_ok = bt.availability()
        if torch_ok["note"]:
            notes.append(torch_ok["note"])
        if torch_ok["torch"] and args.device == "gpu":
            import torch

            if not torch.cuda.is_available():
                notes.append("torch sees no CUDA device: torch and torchdeq rows skipped on --device gpu")
                torch_ok = dict(torch_ok, torch=False, torchdeq=False)
        if torch_ok["torch"]:
            bt.set_precision(args.precision)
            torch_info = bt.torch_device_info(args.device)
    precision = args.precision
    p = common.make_problem(n=args.n, width=args.width, classes=args.classes, gamma=args.gamma, tol=args.tol,
                            maxiter=args.maxiter, learning_rate=args.learning_rate, data=args.data)
    if args.suite == "profile":
        cases = []
        if args.list or args.rows or args.skip:
            print("error: --list, --rows and --skip do not apply to --suite profile", file=sys.stderr)
            return 2
    else:
        cases = select(build_cases(args, p, device, torch_ok), args.rows, args.skip)
    if args.list:
        print("\n".join([f"note: {note}" for note in notes] + [c.name for c in cases]))
        return 0
    if not cases and args.suite != "profile":
        print(f"error: no rows of suite {args.suite!r} match --rows {args.rows!r} / --skip {args.skip!r}",
              file=sys.stderr)
        return 2
    info = environment(device, torch_info)
    print(f"bench --suite {args.suite}: {len(cases) or 'component'} rows, n={p.n}, m={p.m}, m_y={p.m_y}, "
          f"gamma={p.gamma}, tol={p.tol:g}, maxiter={p.maxiter}, float32, precision={precision}, device {device}")
    print(f"data: {p.data}")
    print(f"machine: {info['machine']['cpu_model']}, {info['machine']['cpu_cores']} cores, load "
          f"{info['machine']['load_average_1_5_15']}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
    for note in notes:
        print(f"note: {note}")
    started = time.time()
    if args.suite == "profile":
        return _main_profile(args, p, device, info, argv, started)
    common.reference(p, "delm")
    direct = bj.direct_gradients(p, device=device, precision=precision)
    rows = run_cases(cases, p, args, direct, device)
    met = goals(args.suite, rows)
    info["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    payload = {
        "suite": args.suite,
        "command": "python -m experiments bench " + " ".join(list(sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.time() - started,
        **info,
        "problem": {"n": p.n, "m": p.m, "m_y": p.m_y, "gamma": p.gamma, "tol": p.tol, "maxiter": p.maxiter,
                    "learning_rate": p.learning_rate, "dtype": "float32", "precision": precision, "data": p.data,
                    "loss": "square (one-hot targets)", "sigma": "column softmax",
                    "stopping_rule": "|f(z) - z|_2 <= tol * |f(0)|_2 over the whole state",
                    "tanh_contraction": p.contraction,
                    "reference": "float64: DELM closed form (numpy); tanh DEQ solved to 1e-12"},
        "settings": {"repeats": args.repeats, "slow_repeats": args.slow_repeats, "warmup": args.warmup,
                     "settle_s": args.settle,
                     "device": args.device, "max_temp_gb": args.max_temp_gb, "rows": args.rows, "skip": args.skip},
        "notes": notes,
        "goals": met,
        "rows": rows,
    }
    print()
    print(table(rows))
    print()
    print(goals_text(met))
    write_json(args.out, payload)
    print(f"\nwrote {args.out}")
    if args.plot:
        plot(args.plot, payload)
        print(f"wrote {args.plot}")
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
