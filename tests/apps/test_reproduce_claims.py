"""The main job's claims: their semantics and formatting, verdicts on exact and wrong decays, failed measurements
that fail their claim instead of crashing, and the mutation table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from reproduce_cases import convergence_group, verdicts

from deq_jax import theory
from experiments.reproduce import bounds, mutation_table, report
from experiments.reproduce.common import Claim, checked


def test_convergence_claims_pass_on_an_exact_decay_and_fail_on_a_wrong_optimum_or_rate():
    ok = verdicts(convergence_group())
    assert all(c.passed for c in ok.values()), [c for c in ok.values() if not c.passed]
    assert ok["rate_factor"].measured == pytest.approx(1.0, abs=1e-6)
    high = verdicts(convergence_group(offset=1e-4))  # L* overestimated: the run goes below it
    assert not high["reaches_optimum"].passed and high["reaches_optimum"].measured < 0
    low = verdicts(convergence_group(offset=-1e-4))  # L* underestimated: the gap stalls
    assert not low["reaches_optimum"].passed and low["reaches_optimum"].measured > 0
    # a bound 5x too pessimistic says little: the other side fails
    slow_bound = verdicts(convergence_group(pl_scale=0.2))
    assert slow_bound["bound"].passed and not slow_bound["rate_factor"].passed
    fast_bound = verdicts(convergence_group(pl_scale=1.5))  # a bound faster than the run: never-slower fails
    assert not fast_bound["bound"].passed


def test_no_claim_computation_crashes_on_a_failed_optimum():
    """A failed cross-entropy optimum (W = 0, nan) or an empty measurement is a failed claim with its number."""
    g = convergence_group()
    g.L_star = math.nan
    g.optimum = {"gradient_ratio": math.nan, "converged": False, "method": "Newton-CG", "iterations": 0}
    r = g.runs[0]
    r.final_normalised_gap = math.nan
    r.bound = bounds.bound_analysis(r.loss_history, r.U_norm2, math.nan, 0.1, 0.5, 1e-7)
    r.fit, r.stiffness = None, np.zeros(0)
    claims = verdicts(g)
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
        claims = [
            {
                "key": "a/x",
                "experiment": "a",
                "name": "x",
                "gradient_sensitive": True,
                "passed": passes,
                "measured": 1.0,
                "threshold": 0.5,
                "comparison": "<=",
            },
            {
                "key": "a/y",
                "experiment": "a",
                "name": "y",
                "gradient_sensitive": False,
                "passed": True,
                "measured": 0.1,
                "threshold": 0.5,
                "comparison": "<=",
            },
        ]
        if sensitive_fail is not None:
            claims[0]["passed"] = not sensitive_fail
        return {"claims": claims, "all_passed": all(c["passed"] for c in claims), "command": f"cmd {mutation}"}

    good = {None: summary(True, None, None), "one_step": summary(True, True, "one_step")}
    assert mutation_table.verdict(good)["passed"]
    bad = {None: summary(True, None, None), "one_step": summary(True, False, "one_step")}
    v = mutation_table.verdict(bad)
    assert not v["passed"] and v["mutations"]["one_step"]["experiments"]["a"] == {
        "sensitive": 1,
        "sensitive_failed": 0,
        "failed": 0,
    }
    text = mutation_table.markdown(good)
    assert "| a | x | yes | PASS (1) | **FAIL** (1) |" in text
