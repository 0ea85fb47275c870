"""bench --suite fashion (experiments/bench/fashion_step.py): its registration, flags, goals and tables, on
synthetic rows (the measurement itself compiles a conv DEQ five times: run by hand, its JSON committed)."""

from experiments.bench import cli, fashion_step, report

BASE = fashion_step.BASELINE


def row(name, impl, backward, times, **extra):
    out = {
        "name": name,
        "impl": impl,
        "backward": backward,
        "status": "ok",
        "times_s": times,
        "min_s": min(times),
        "median_s": sorted(times)[len(times) // 2],
        "compile_s": 1.0,
        "iterations": 9,
        "converged": True,
        "converged_own": True,
        "relative_residual": 1e-5,
        "worst_sample_relative_residual": 8e-5,
        "grad_error": {"conv1": 1e-4, "deq.W": 2e-4},
        "grad_error_max": 2e-4,
    }
    out.update(extra)
    return out


def rows():
    out = [
        row(BASE, "deq_jax", "implicit[forward]", [0.10, 0.11, 0.12]),
        row(BASE.replace("forward", "gmres"), "deq_jax", "implicit[gmres]", [0.15, 0.16, 0.18]),
        row("jaxopt tanh-conv per_sample anderson implicit", "jaxopt", "implicit", [0.2, 0.22, 0.24]),
    ]
    for r in out:
        r["paired_ratio_to_baseline"] = r["min_s"] / out[0]["min_s"]
    return out


def test_goals_compare_with_the_twins_and_say_what_was_not_run():
    verdicts = fashion_step.goals(rows())
    assert verdicts[0]["kind"] == "correctness" and verdicts[0]["met"]
    assert (
        verdicts[1]["met"] and "implicit[gmres] 1.50" in verdicts[1]["value"]
    )  # forward is the fastest deq_jax backward
    jaxopt, torchdeq = verdicts[2], verdicts[3]
    assert jaxopt["met"] and "paired median ratio 0.50" in jaxopt["value"]
    assert torchdeq["status"] == "not measured"  # no torchdeq row: said, not hidden


def test_a_failed_check_fails_the_correctness_goal():
    bad = rows()
    bad[2].update(converged=False)
    verdict = fashion_step.goals(bad)[0]
    assert not verdict["met"] and "jaxopt" in verdict["value"]


def test_tables_render_the_rows():
    text = fashion_step.table(rows())
    assert "x forward (paired median)" in text and "| 1.50 |" in text
    assert BASE in report.table(rows())  # docs/benchmarks.md's generic table block reads the same rows


def test_flags_are_checked_and_the_suite_is_registered(capsys):
    assert "fashion" in cli.SUITES
    assert cli.main(["--suite", "fashion", "--repeats", "0"]) == 2
    assert "--repeats must be a positive integer" in capsys.readouterr().err
