"""The benchmarks' acceptance goals, each judged from the rows of one run and stated with the numbers behind it.

A goal is a sentence, a measurement (`measure(run) -> (met, value)`, or None when the rows it needs were not run)
and the problem size it is stated for (`defined_at`). A speed or memory target stated for m = 784 says nothing
about a toy problem, so at any other size the goal is reported as "not applicable at this size", with its value
for information; `defined_at=None` marks goals that hold at every size (correctness).

Kinds: "correctness" goals (no solve reported converged that is not; one LU per step) fail the run (exit status
1) when not met; "performance" goals are reported, met or not, and do not change the exit status: a loaded
machine must not turn a measurement into a failure.

Ratios between JAX rows are judged on the paired median ratio (`timing.paired_ratio`: both rows of a timing round
ran back to back), the one against torchdeq on the min times (PyTorch's OpenMP threads suffer more than XLA's
from a loaded machine); all three ratios are reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from experiments.bench.cases import FORMULATIONS, MEMORY_LABEL, STEP_SOLVERS, TRAINING_RUNS
from experiments.bench.report import fmt_bytes, fmt_ms
from experiments.bench.timing import paired_ratio
from experiments.bench.training import WARM, ZERO_START, is_training

#: the problem the CPU targets are stated for: m = 784 (Fashion-MNIST pixels), batch 1024, 10 classes, on a CPU
CPU_SIZE = {"m": 784, "n": 1024, "m_y": 10, "device": "cpu"}
#: the problem the GPU targets are stated for: the full training set, n = 60000
GPU_SIZE = {"m": 784, "n": 60000, "m_y": 10, "device": "gpu"}

Measure = Callable[[dict], tuple[bool, str] | None]


@dataclasses.dataclass(frozen=True)
class Goal:
    text: str
    measure: Measure  # run = {"rows": [...], "facts": {...}, "size": {...}, "tol": float} -> (met, value) or None
    defined_at: dict | None = None  # the problem size the goal is stated for; None: every size
    kind: str = "performance"  # or "correctness"


def _find(rows: list[dict], **keys) -> dict | None:
    for row in rows:
        if row.get("status") == "ok" and all(row.get(k) == v for k, v in keys.items()):
            return row
    return None


def _ratios(a: dict, b: dict) -> str:
    return (
        f"paired median ratio {paired_ratio(a, b):.2f}, min ratio {a['min_s'] / b['min_s']:.2f}, median ratio "
        f"{a['median_s'] / b['median_s']:.2f} ({fmt_ms(a['min_s'])} vs {fmt_ms(b['min_s'])} ms min, "
        f"{fmt_ms(a['median_s'])} vs {fmt_ms(b['median_s'])} ms median)"
    )


def _accurate(row: dict, tol: float) -> bool:
    """A converged row at the problem's tolerance whose gradient is exact up to that tolerance (not one-step)."""
    return (
        row.get("status") == "ok"
        and row.get("tol") == tol
        and bool(row.get("converged"))
        and not row.get("approximate_gradient")
        and row.get("backward_converged") is not False
    )


# ----------------------------------------------------------------------------- goal factories


def overhead(formulation: str, solver: str) -> Goal:
    def measure(run):
        lib = _find(
            run["rows"],
            impl="deq_jax",
            problem="delm",
            formulation=formulation,
            solver=solver,
            backward="implicit",
            label="",
        )
        base = _find(run["rows"], impl="inline", problem="delm", formulation=formulation, solver=solver)
        limit = 1.0 if formulation == "per_sample" else 1.10  # the generic DEQ form: no slower than hand-written
        return None if lib is None or base is None else (paired_ratio(lib, base) <= limit, _ratios(lib, base))

    text = "is no slower than" if formulation == "per_sample" else "adds <= 10% over"
    return Goal(f"deq_jax {text} inline ({formulation} {solver})", measure, CPU_SIZE)


def implicit_memory(formulation: str, backward: str) -> Goal:
    which = "default" if backward == "implicit" else "BiCGSTAB"

    def measure(run):
        unr = _find(
            run["rows"],
            impl="deq_jax",
            formulation=formulation,
            solver="fixed_point",
            backward="unrolled",
            label=MEMORY_LABEL,
        )
        imp = _find(
            run["rows"],
            impl="deq_jax",
            formulation=formulation,
            solver="fixed_point",
            backward=backward,
            label=MEMORY_LABEL,
        )
        if imp is None or unr is None or not imp.get("temp_bytes"):
            return None
        ratio = unr["temp_bytes"] / imp["temp_bytes"]
        return ratio >= 10, f"{ratio:.1f}x ({fmt_bytes(unr['temp_bytes'])} vs {fmt_bytes(imp['temp_bytes'])})"

    return Goal(
        f"implicit ({which} backward) needs >= 10x less XLA temp memory than unrolled at "
        f"{MEMORY_LABEL.replace(' it', ' iterations')} ({formulation})",
        measure,
        CPU_SIZE,
    )


def transposed_step_vs_lu(limit: float = 0.7) -> Goal:
    """The fastest accurate transposed deq_jax step against the bare LU factorisation timed in the same run.

    Candidates: every converged deq_jax transposed DELM row at the problem's tolerance whose largest gradient error
    (against float64) is within max(tol, 10x the direct step's at the same parameters): "as accurate as the direct
    step" up to the solve tolerance. A stateless row is compared with the stateless direct step (both at the initial
    parameters), a training-run row with the direct training run (both at the same step of the same trajectory:
    there the gradient is smaller and its float32 error larger), or, without that run, with the stateless one. A new
    transposed row (another solver, a warm start) is a candidate without touching this goal; faster rows left out for
    accuracy are named."""

    def measure(run):
        rows, tol = run["rows"], run["tol"]
        lu = _find(rows, impl="inline", solver="lu_factor")
        direct = {
            kind: _find(
                rows,
                impl="deq_jax",
                problem="delm",
                formulation="transposed",
                solver="direct",
                backward="implicit",
                label=label,
            )
            for kind, label in (("step", ""), ("run", WARM))
        }
        if lu is None or not any(d and d.get("grad_error") for d in direct.values()):
            return None

        def bound(row):  # a training run without the direct run to compare with: the stateless direct step's
            ref = (direct["run"] if is_training(row) else None) or direct["step"]
            return None if ref is None or not ref.get("grad_error") else max(tol, 10 * max(ref["grad_error"].values()))

        rows_t = [
            r
            for r in rows
            if r["impl"] == "deq_jax"
            and r["problem"] == "delm"
            and r["formulation"] == "transposed"
            and _accurate(r, tol)
            and r.get("grad_error")
            and bound(r) is not None
        ]
        chosen = [r for r in rows_t if max(r["grad_error"].values()) <= bound(r)]
        if not chosen:
            return False, "no transposed deq_jax row converged with the direct step's gradient accuracy"
        best = min(chosen, key=lambda r: paired_ratio(r, lu))
        faster = [
            f"{r['name']} ({paired_ratio(r, lu):.2f}x, gradient error {max(r['grad_error'].values()):.1e} > "
            f"{bound(r):.1e})"
            for r in rows_t
            if r not in chosen and paired_ratio(r, lu) < paired_ratio(best, lu)
        ]
        return (
            paired_ratio(best, lu) <= limit,
            f"{best['name']} / {lu['name']}: {_ratios(best, lu)}; gradient error "
            f"{max(best['grad_error'].values()):.1e} (bound {bound(best):.1e}; {len(chosen)} candidate rows)"
            + (f"; faster but less accurate: {', '.join(faster)}" if faster else ""),
        )

    return Goal(
        f"transposed DELM training step <= {limit:g}x the bare m x m LU factorisation of the same run "
        f"(fastest converged deq_jax row with direct-step gradient accuracy)",
        measure,
        CPU_SIZE,
    )


def step_time(limit_s: float, size: dict) -> Goal:
    def measure(run):
        t = _find(
            run["rows"],
            impl="deq_jax",
            problem="delm",
            formulation="transposed",
            solver="direct",
            backward="implicit",
            label="",
        )
        return (
            None
            if t is None
            else (t["min_s"] <= limit_s, f"min {fmt_ms(t['min_s'])} ms, median {fmt_ms(t['median_s'])} ms")
        )

    return Goal(f"DELM step <= {limit_s * 1e3:g} ms, transposed formulation", measure, size)


def compile_time(kind: str) -> Goal:
    """The slowest compile of a deq_jax DELM step with implicit backward, among `kind`: "direct" or "iterative"
    (the stateless steps) or "training run" (the warm and zero-start `TrainStep.update` programs, any solver)."""

    def chosen_by_kind(row):
        if kind == "training run":
            return is_training(row)
        return not is_training(row) and (row["solver"] == "direct") == (kind == "direct")

    def measure(run):
        chosen = [
            r
            for r in run["rows"]
            if r.get("status") == "ok"
            and r["impl"] == "deq_jax"
            and r["problem"] == "delm"
            and r["backward"].startswith("implicit")
            and r.get("compile_s")
            and chosen_by_kind(r)
        ]
        if not chosen:
            return None
        worst = max(r["compile_s"] for r in chosen)
        return worst <= 2.0, ", ".join(
            f"{r['formulation']} {r['solver']}{r['backward'][8:]}"
            f"{' ' + r['label'] if r['label'] else ''} {r['compile_s']:.2f} s"
            for r in chosen
        )

    what = (
        "training-run rows: TrainStep.update, any solver"
        if kind == "training run"
        else f"{kind} DELM rows, implicit backward"
    )
    return Goal(f"compile time of a training step <= 2 s ({what})", measure, CPU_SIZE)


def warm_start_speedup(formulation: str, solver: str, factor: float = 2.0) -> Goal:
    """A warm-started training run against the same run started from zero at every step (paired median ratio),
    both converged by the independent checks, the warm gradient as accurate as the zero-start one: its float64
    error at most max(tol / (1 - gamma), 2x the zero-start row's). `tol / (1 - gamma)` bounds the error that a
    relative residual of `tol` leaves in the equilibrium through `|U^{-1}|_1 <= 1 / (1 - gamma)`."""

    def measure(run):
        rows, tol = run["rows"], run["tol"]
        warm = _find(rows, impl="deq_jax", formulation=formulation, solver=solver, label=WARM)
        zero = _find(rows, impl="deq_jax", formulation=formulation, solver=solver, label=ZERO_START)
        if warm is None or zero is None:
            return None
        gamma = run.get("gamma")
        bound = max(tol / (1.0 - gamma) if gamma else tol, 2 * max(zero["grad_error"].values(), default=0.0))
        error = max(warm["grad_error"].values(), default=float("inf"))
        accurate = _accurate(warm, tol) and _accurate(zero, tol) and error <= bound
        speedup = paired_ratio(zero, warm)
        return (
            speedup >= factor and accurate,
            f"speed-up {speedup:.2f}x ({_ratios(zero, warm)}); iterations per step (forward + backward) "
            f"{_iterations(warm)} warm vs {_iterations(zero)} from zero; gradient error {error:.1e} warm vs "
            f"{max(zero['grad_error'].values(), default=float('nan')):.1e} from zero (bound {bound:.1e})"
            + ("" if accurate else "; NOT accurate: a row did not converge or its gradient is off"),
        )

    return Goal(
        f"{formulation.replace('_', '-')} warm-started training step >= {factor:g}x faster than the same "
        f"step from zero ({solver}), same gradients to tolerance",
        measure,
        CPU_SIZE,
    )


def _iterations(row: dict) -> str:
    mean = lambda key: "-" if row.get(key) is None else f"{row[key]:.1f}"
    return f"{mean('iterations_mean')} + {mean('backward_iterations_mean')}"


def anderson_vs_jaxopt() -> Goal:
    def measure(run):
        lib = _find(
            run["rows"],
            impl="deq_jax",
            problem="delm",
            formulation="per_sample",
            solver="anderson",
            backward="implicit",
            label="",
        )
        base = _find(run["rows"], impl="inline", problem="delm", formulation="per_sample", solver="anderson")
        return None if lib is None or base is None else (paired_ratio(lib, base) <= 1.0, _ratios(lib, base))

    return Goal("per-sample Anderson step no slower than raw jaxopt (both GMRES backward)", measure, CPU_SIZE)


def versus_torchdeq(factor: float = 10.0) -> Goal:
    def measure(run):
        tol = run["tol"]
        pick = lambda impl: [
            r
            for r in run["rows"]
            if r["impl"] == impl
            and _accurate(r, tol)
            and r["problem"] == "delm"
            and r["formulation"] == "per_sample"
            and r["solver"] != "direct"
            and r["backward"].startswith("implicit")
        ]
        ours, theirs = pick("deq_jax"), pick("torchdeq")
        if not ours or not theirs:
            return None
        # across frameworks the min is the fair figure: PyTorch's OpenMP threads suffer more from a loaded machine
        a, b = min(ours, key=lambda r: r["min_s"]), min(theirs, key=lambda r: r["min_s"])
        return (
            b["min_s"] / a["min_s"] >= factor,
            f"torchdeq / deq_jax: {_ratios(b, a)}; rows: {b['name']} vs {a['name']}",
        )

    return Goal(
        f"converged per-sample iterative step with implicit gradients >= {factor:g}x faster than "
        f"torchdeq's best, by min time",
        measure,
        GPU_SIZE,
    )


def never_falsely_converged() -> Goal:
    def measure(run):
        flagged = [r["name"] for r in run["rows"] if r.get("flag")]
        return not flagged, "none" if not flagged else "; ".join(flagged)

    return Goal("never a non-converged solve reported as converged", measure, None, "correctness")


def one_lu_per_step() -> Goal:
    def measure(run):
        facts = run["facts"].get("deq_jax_step")
        if facts is None:
            return None
        return (
            facts["getrf_calls"] == 1 and facts["jaxpr_lu_primitives"] == 1,
            (
                f"{facts['getrf_calls']} getrf custom call(s) in the compiled step, "
                f"{facts['jaxpr_lu_primitives']} lu primitive(s) in its jaxpr"
            ),
        )

    return Goal(
        "one LU factorisation per step (the backward reuses the forward's factors)", measure, None, "correctness"
    )


def profile_step_time(limit_s: float = 0.010) -> Goal:
    def measure(run):
        step = next((r for r in run["rows"] if r["name"].startswith("deq_jax step")), None)
        return (
            None
            if step is None
            else (
                step["min_s"] <= limit_s,
                (f"min {step['min_s'] * 1e3:.1f} ms, median {step['median_s'] * 1e3:.1f} ms"),
            )
        )

    return Goal(f"DELM step <= {limit_s * 1e3:g} ms (CPU), transposed formulation", measure, CPU_SIZE)


def for_suite(suite: str) -> list[Goal]:
    """The goals a suite is judged on."""
    if suite == "step":
        return (
            [overhead(f, s) for f in FORMULATIONS for s in STEP_SOLVERS]
            + [
                implicit_memory("transposed", "implicit"),
                implicit_memory("per_sample", "implicit"),
                implicit_memory("per_sample", "implicit[bicgstab]"),
                transposed_step_vs_lu(),
            ]
            + [warm_start_speedup(f, s) for f, s, twin in TRAINING_RUNS if twin and f == "per_sample"]
            + [
                compile_time("direct"),
                compile_time("iterative"),
                compile_time("training run"),
                never_falsely_converged(),
            ]
        )
    if suite in ("peer", "gpu"):
        return [
            step_time(0.010, CPU_SIZE) if suite == "peer" else step_time(0.002, GPU_SIZE),
            compile_time("direct"),
            compile_time("iterative"),
            anderson_vs_jaxopt(),
            versus_torchdeq(),
            never_falsely_converged(),
        ]
    if suite == "profile":
        return [one_lu_per_step(), profile_step_time()]
    raise ValueError(f"no goals for suite {suite!r}")


# ----------------------------------------------------------------------------- judging


def _size_text(size: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in size.items())


def judge(
    goals: list[Goal],
    rows: list[dict],
    *,
    size: dict,
    tol: float,
    facts: dict | None = None,
    gamma: float | None = None,
) -> list[dict]:
    """Each goal's verdict: status "met" / "NOT met" / "not applicable at this size" / "not measured"."""
    run = {"rows": rows, "facts": facts or {}, "size": size, "tol": tol, "gamma": gamma}
    out = []
    for goal in goals:
        result = goal.measure(run)
        entry = {"goal": goal.text, "kind": goal.kind, "defined_at": goal.defined_at}
        applies = goal.defined_at is None or all(size.get(k) == v for k, v in goal.defined_at.items())
        if result is None:
            entry.update(status="not measured", met=None, value="the rows it compares were not run")
        elif not applies:
            here = {k: size.get(k) for k in goal.defined_at}
            entry.update(
                status="not applicable at this size",
                met=None,
                value=f"{result[1]} (defined at {_size_text(goal.defined_at)}; this run: {_size_text(here)})",
            )
        else:
            entry.update(status="met" if result[0] else "NOT met", met=bool(result[0]), value=result[1])
        out.append(entry)
    return out


def failed_correctness(verdicts: list[dict]) -> list[str]:
    """The correctness goals that were judged and not met (they make the run exit with status 1)."""
    return [v["goal"] for v in verdicts if v["kind"] == "correctness" and v["met"] is False]
