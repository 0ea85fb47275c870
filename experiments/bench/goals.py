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
from typing import Callable, Optional

from experiments.bench.cases import FORMULATIONS, MEMORY_LABEL, STEP_SOLVERS
from experiments.bench.report import fmt_bytes, fmt_ms
from experiments.bench.timing import paired_ratio

#: the problem the CPU targets are stated for: m = 784 (Fashion-MNIST pixels), batch 1024, 10 classes, on a CPU
CPU_SIZE = {"m": 784, "n": 1024, "m_y": 10, "device": "cpu"}
#: the problem the GPU targets are stated for: the full training set, n = 60000
GPU_SIZE = {"m": 784, "n": 60000, "m_y": 10, "device": "gpu"}

Measure = Callable[[dict], Optional[tuple[bool, str]]]


@dataclasses.dataclass(frozen=True)
class Goal:
    text: str
    measure: Measure  # run = {"rows": [...], "facts": {...}, "size": {...}, "tol": float} -> (met, value) or None
    defined_at: Optional[dict] = None  # the problem size the goal is stated for; None: every size
    kind: str = "performance"  # or "correctness"


def _find(rows: list[dict], **keys) -> Optional[dict]:
    for row in rows:
        if row.get("status") == "ok" and all(row.get(k) == v for k, v in keys.items()):
            return row
    return None


def _ratios(a: dict, b: dict) -> str:
    return (f"paired median ratio {paired_ratio(a, b):.2f}, min ratio {a['min_s'] / b['min_s']:.2f}, median ratio "
            f"{a['median_s'] / b['median_s']:.2f} ({fmt_ms(a['min_s'])} vs {fmt_ms(b['min_s'])} ms min, "
            f"{fmt_ms(a['median_s'])} vs {fmt_ms(b['median_s'])} ms median)")


def _accurate(row: dict, tol: float) -> bool:
    """A converged row at the problem's tolerance whose gradient is exact up to that tolerance (not one-step)."""
    return (row.get("status") == "ok" and row.get("tol") == tol and bool(row.get("converged"))
            and not row.get("approximate_gradient") and row.get("backward_converged") is not False)


# ----------------------------------------------------------------------------- goal factories

def overhead(formulation: str, solver: str) -> Goal:
    def measure(run):
        lib = _find(run["rows"], impl="deq_jax", problem="delm", formulation=formulation, solver=solver,
                    backward="implicit", label="")
        base = _find(run["rows"], impl="inline", problem="delm", formulation=formulation, solver=solver)
        return None if lib is None or base is None else (paired_ratio(lib, base) <= 1.10, _ratios(lib, base))

    return Goal(f"deq_jax adds <= 10% over inline ({formulation} {solver})", measure, CPU_SIZE)


def implicit_memory(formulation: str, backward: str) -> Goal:
    which = "default GMRES" if backward == "implicit" else "BiCGSTAB"

    def measure(run):
        unr = _find(run["rows"], impl="deq_jax", formulation=formulation, solver="fixed_point", backward="unrolled",
                    label=MEMORY_LABEL)
        imp = _find(run["rows"], impl="deq_jax", formulation=formulation, solver="fixed_point", backward=backward,
                    label=MEMORY_LABEL)
        if imp is None or unr is None or not imp.get("temp_bytes"):
            return None
        ratio = unr["temp_bytes"] / imp["temp_bytes"]
        return ratio >= 10, f"{ratio:.1f}x ({fmt_bytes(unr['temp_bytes'])} vs {fmt_bytes(imp['temp_bytes'])})"

    return Goal(f"implicit ({which} backward) needs >= 10x less XLA temp memory than unrolled at "
                f"{MEMORY_LABEL.replace(' it', ' iterations')} ({formulation})", measure, CPU_SIZE)


def transposed_step_vs_lu(limit: float = 0.7) -> Goal:
    """The fastest accurate transposed deq_jax step against the bare LU factorisation timed in the same run.

    Candidates: every converged deq_jax transposed DELM row at the problem's tolerance whose largest gradient error
    (against float64) is within max(tol, 10x the direct step's): "as accurate as the direct step" up to the solve
    tolerance. A new transposed row (another solver, a warm start) is a candidate without touching this goal."""

    def measure(run):
        rows, tol = run["rows"], run["tol"]
        lu = _find(rows, impl="inline", solver="lu_factor")
        direct = _find(rows, impl="deq_jax", problem="delm", formulation="transposed", solver="direct",
                       backward="implicit", label="")
        if lu is None or direct is None or not direct.get("grad_error"):
            return None
        bound = max(tol, 10 * max(direct["grad_error"].values()))
        chosen = [r for r in rows if r["impl"] == "deq_jax" and r["problem"] == "delm"
                  and r["formulation"] == "transposed" and _accurate(r, tol) and r.get("grad_error")
                  and max(r["grad_error"].values()) <= bound]
        if not chosen:
            return False, f"no transposed deq_jax row converged with gradient error <= {bound:.1e}"
        best = min(chosen, key=lambda r: paired_ratio(r, lu))
        return (paired_ratio(best, lu) <= limit,
                f"{best['name']} / {lu['name']}: {_ratios(best, lu)}; gradient error "
                f"{max(best['grad_error'].values()):.1e} (bound {bound:.1e}; {len(chosen)} candidate rows)")

    return Goal(f"transposed DELM training step <= {limit:g}x the bare m x m LU factorisation of the same run "
                f"(fastest converged deq_jax row with direct-step gradient accuracy)", measure, CPU_SIZE)


def step_time(limit_s: float, size: dict) -> Goal:
    def measure(run):
        t = _find(run["rows"], impl="deq_jax", problem="delm", formulation="transposed", solver="direct",
                  backward="implicit")
        return None if t is None else (t["min_s"] <= limit_s,
                                       f"min {fmt_ms(t['min_s'])} ms, median {fmt_ms(t['median_s'])} ms")

    return Goal(f"DELM step <= {limit_s * 1e3:g} ms, transposed formulation", measure, size)


def compile_time(kind: str) -> Goal:
    def measure(run):
        chosen = [r for r in run["rows"] if r.get("status") == "ok" and r["impl"] == "deq_jax"
                  and r["problem"] == "delm" and r["backward"].startswith("implicit") and r.get("compile_s")
                  and (r["solver"] == "direct") == (kind == "direct")]
        if not chosen:
            return None
        worst = max(r["compile_s"] for r in chosen)
        return worst <= 2.0, ", ".join(f"{r['formulation']} {r['solver']}{r['backward'][8:]}"
                                       f"{' ' + r['label'] if r['label'] else ''} {r['compile_s']:.2f} s"
                                       for r in chosen)

    return Goal(f"compile time of a training step <= 2 s ({kind} DELM rows, implicit backward)", measure, CPU_SIZE)


def anderson_vs_jaxopt() -> Goal:
    def measure(run):
        lib = _find(run["rows"], impl="deq_jax", problem="delm", formulation="per_sample", solver="anderson",
                    backward="implicit")
        base = _find(run["rows"], impl="inline", problem="delm", formulation="per_sample", solver="anderson")
        return None if lib is None or base is None else (paired_ratio(lib, base) <= 1.0, _ratios(lib, base))

    return Goal("per-sample Anderson step no slower than raw jaxopt (both GMRES backward)", measure, CPU_SIZE)


def versus_torchdeq(factor: float = 10.0) -> Goal:
    def measure(run):
        tol = run["tol"]
        pick = lambda impl: [r for r in run["rows"] if r["impl"] == impl and _accurate(r, tol)
                             and r["problem"] == "delm" and r["formulation"] == "per_sample"
                             and r["solver"] != "direct" and r["backward"].startswith("implicit")]
        ours, theirs = pick("deq_jax"), pick("torchdeq")
        if not ours or not theirs:
            return None
        # across frameworks the min is the fair figure: PyTorch's OpenMP threads suffer more from a loaded machine
        a, b = min(ours, key=lambda r: r["min_s"]), min(theirs, key=lambda r: r["min_s"])
        return (b["min_s"] / a["min_s"] >= factor,
                f"torchdeq / deq_jax: {_ratios(b, a)}; rows: {b['name']} vs {a['name']}")

    return Goal(f"converged per-sample iterative step with implicit gradients >= {factor:g}x faster than "
                f"torchdeq's best, by min time", measure, GPU_SIZE)


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
        return (facts["getrf_calls"] == 1 and facts["jaxpr_lu_primitives"] == 1,
                f"{facts['getrf_calls']} getrf custom call(s) in the compiled step, "
                f"{facts['jaxpr_lu_primitives']} lu primitive(s) in its jaxpr")

    return Goal("one LU factorisation per step (the backward reuses the forward's factors)", measure, None,
                "correctness")


def profile_step_time(limit_s: float = 0.010) -> Goal:
    def measure(run):
        step = next((r for r in run["rows"] if r["name"].startswith("deq_jax step")), None)
        return None if step is None else (step["min_s"] <= limit_s, f"min {step['min_s'] * 1e3:.1f} ms, median "
                                                                    f"{step['median_s'] * 1e3:.1f} ms")

    return Goal(f"DELM step <= {limit_s * 1e3:g} ms (CPU), transposed formulation", measure, CPU_SIZE)


def for_suite(suite: str) -> list[Goal]:
    """The goals a suite is judged on."""
    if suite == "step":
        return ([overhead(f, s) for f in FORMULATIONS for s in STEP_SOLVERS]
                + [implicit_memory("transposed", "implicit"), implicit_memory("per_sample", "implicit"),
                   implicit_memory("per_sample", "implicit[bicgstab]"), transposed_step_vs_lu(),
                   compile_time("direct"), compile_time("iterative"), never_falsely_converged()])
    if suite in ("peer", "gpu"):
        return [step_time(0.010, CPU_SIZE) if suite == "peer" else step_time(0.002, GPU_SIZE),
                compile_time("direct"), compile_time("iterative"), anderson_vs_jaxopt(), versus_torchdeq(),
                never_falsely_converged()]
    if suite == "profile":
        return [one_lu_per_step(), profile_step_time()]
    raise ValueError(f"no goals for suite {suite!r}")


# ----------------------------------------------------------------------------- judging

def _size_text(size: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in size.items())


def judge(goals: list[Goal], rows: list[dict], *, size: dict, tol: float, facts: Optional[dict] = None) -> list[dict]:
    """Each goal's verdict: status "met" / "NOT met" / "not applicable at this size" / "not measured"."""
    run = {"rows": rows, "facts": facts or {}, "size": size, "tol": tol}
    out = []
    for goal in goals:
        result = goal.measure(run)
        entry = {"goal": goal.text, "kind": goal.kind, "defined_at": goal.defined_at}
        applies = goal.defined_at is None or all(size.get(k) == v for k, v in goal.defined_at.items())
        if result is None:
            entry.update(status="not measured", met=None, value="the rows it compares were not run")
        elif not applies:
            here = {k: size.get(k) for k in goal.defined_at}
            entry.update(status="not applicable at this size", met=None,
                         value=f"{result[1]} (defined at {_size_text(goal.defined_at)}; this run: {_size_text(here)})")
        else:
            entry.update(status="met" if result[0] else "NOT met", met=bool(result[0]), value=result[1])
        out.append(entry)
    return out


def failed_correctness(verdicts: list[dict]) -> list[str]:
    """The correctness goals that were judged and not met (they make the run exit with status 1)."""
    return [v["goal"] for v in verdicts if v["kind"] == "correctness" and v["met"] is False]
