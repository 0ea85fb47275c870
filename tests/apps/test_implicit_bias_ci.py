"""Implicit bias with error bars: the t-intervals, the paired DELM - linear tests, their sentences, and the study
(experiments/reproduce/bias_study.py) end to end on the tiny config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from helpers import ROOT
from scipy import stats as sps

from experiments.reproduce import bias_study, implicit_bias


def test_interval_is_the_t_interval():
    x = [0.1, 0.4, 0.35, 0.2, 0.3]
    s = implicit_bias._stats(x)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sps.sem(x))
    assert s["ci_lo"] == pytest.approx(lo, rel=1e-12) and s["ci_hi"] == pytest.approx(hi, rel=1e-12)
    assert s["n"] == 5 and s["std"] == pytest.approx(np.std(x, ddof=1))
    assert np.isnan(implicit_bias._stats([1.0])["ci_lo"])


def test_paired_test_and_its_words():
    rng = np.random.default_rng(0)
    b = rng.normal(size=12)
    a = b + 0.5 + 0.1 * rng.normal(size=12)  # a clear paired difference
    t = implicit_bias.paired_test(list(a), list(b))
    assert t["p_t"] == pytest.approx(sps.ttest_rel(a, b).pvalue) and t["significant"]
    assert t["p_wilcoxon"] == pytest.approx(sps.wilcoxon(a - b).pvalue)
    assert t["ci_lo"] > 0 and "significant at the 5% level" in implicit_bias.paired_words("x", t)
    noise = implicit_bias.paired_test(list(b + 0.01 * rng.normal(size=12)), list(b + 0.01 * rng.normal(size=12)))
    assert not noise["significant"] and "not significant at the 5% level" in implicit_bias.paired_words("x", noise)
    same = implicit_bias.paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["p_t"] == 1.0 and not same["significant"]


def test_study_end_to_end(tmp_path):
    """Two settings on the tiny config (its implicit-bias programs), 3 seeds: the table, the tests in words, the
    JSON and the figure are written."""
    cfg = {
        "name": "study",
        "seeds": [0, 1, 2],
        "settings": [
            {"config": str(ROOT / "configs" / "tiny.yaml"), "n_train": 10, "pca_dim": 30},
            {"config": str(ROOT / "configs" / "tiny.yaml"), "n_train": 8, "pca_dim": 30, "label": "tiny n=8"},
        ],
        "figure": str(tmp_path / "fig.png"),
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    assert bias_study.main(["--config", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "study" / "study.json").read_text())
    assert [s["label"] for s in data["settings"]] == ["digits, n=10, m=31", "tiny n=8"]
    for s in data["settings"]:
        assert set(s["per_seed"]) == {"DELM", "linear", "deep linear H=2", "min-norm solution"}
        assert all(len(v["test_accuracy"]) == 3 for v in s["per_seed"].values())
        paired = s["table"][-1]
        assert paired["model"].startswith("DELM - linear") and 0 <= paired["test_accuracy"]["p_t"] <= 1
    md = (tmp_path / "out" / "study" / "study.md").read_text()
    assert md.count("significant at the 5% level") == 6 and "claims: all passed" in md
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    with pytest.raises(Exception, match="seeds"):
        bias_study.main(["--config", str(tmp_path / "s.yaml"), "--set", "seeds=[0]"])
