"""The benchmark's goals: each applies at the size it is stated for and judges the rows it names."""

from __future__ import annotations

from bench_cases import FULL, make_row

from experiments.bench import goals, training


def test_goals_apply_only_at_the_size_they_are_stated_for():
    rows = [make_row("direct", "deq_jax", "transposed", "direct", "implicit", [0.008, 0.009])]
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
    lu = make_row(
        "inline delm transposed lu_factor", "inline", "transposed", "lu_factor", "", [1.0, 1.0, 1.0], grad=None
    )
    direct = make_row("direct", "deq_jax", "transposed", "direct", "implicit", [1.7, 1.6, 1.8], grad=5e-7)
    fast_but_approximate = make_row(
        "one", "deq_jax", "transposed", "anderson", "one_step", [0.3] * 3, grad=0.9, approximate=True
    )
    fast_but_inaccurate = make_row("fp", "deq_jax", "transposed", "fixed_point", "implicit", [0.4] * 3, grad=2e-4)
    fast_but_unconverged = make_row("br", "deq_jax", "transposed", "broyden", "implicit", [0.4] * 3, converged=False)
    memory_row = make_row(
        "mem", "deq_jax", "transposed", "fixed_point", "implicit", [0.2] * 3, label="100 it", tol=1e-30
    )
    good = make_row("anderson", "deq_jax", "transposed", "anderson", "implicit", [0.69, 0.75, 0.6], grad=8e-6)
    goal = [goals.transposed_step_vs_lu()]
    rows = [lu, direct, fast_but_approximate, fast_but_inaccurate, fast_but_unconverged, memory_row]
    (verdict,) = goals.judge(goal, rows, size=FULL, tol=1e-5)
    assert verdict["status"] == "NOT met" and verdict["value"].startswith("direct / inline")  # 1.7x the LU
    (verdict,) = goals.judge(goal, [*rows, good], size=FULL, tol=1e-5)
    assert verdict["status"] == "met" and verdict["value"].startswith("anderson / ")  # paired median 0.69
    assert "faster but less accurate: fp (0.40x" in verdict["value"]
    # a training run's gradient is judged against the direct training run's at the same point of the trajectory
    refine = make_row(
        "refine warm", "deq_jax", "transposed", "refine", "implicit", [0.5] * 3, label=training.WARM, grad=5e-5
    )
    (verdict,) = goals.judge(goal, [*rows, refine], size=FULL, tol=1e-5)
    assert verdict["status"] == "NOT met" and "refine warm (0.50x" in verdict["value"]  # 5e-5 > 10x 5e-7
    run_direct = make_row(
        "direct warm", "deq_jax", "transposed", "direct", "implicit", [1.7] * 3, label=training.WARM, grad=8e-5
    )
    (verdict,) = goals.judge(goal, [*rows, refine, run_direct], size=FULL, tol=1e-5)
    assert verdict["status"] == "met" and verdict["value"].startswith("refine warm / ")


def test_warm_start_goal_needs_the_speed_up_and_accurate_gradients():
    def run(label, times, grad=2e-5, converged=True, **extra):
        return make_row(
            f"per_sample fixed_point {label}",
            "deq_jax",
            "per_sample",
            "fixed_point",
            "implicit",
            times,
            label=label,
            grad=grad,
            converged=converged,
            iterations_mean=2.0 if label == "warm" else 90.0,
            backward_iterations_mean=60.0,
            **extra,
        )

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
    rows = [
        run(training.WARM, [0.4], compile_s=2.5),
        make_row("d", "deq_jax", "transposed", "direct", "implicit", [0.1], compile_s=0.5),
    ]
    (verdict,) = goals.judge([compile_goal], rows, size=FULL, tol=1e-5)
    assert verdict["status"] == "NOT met" and "direct" not in verdict["value"]  # training runs only
