"""What a sweep writes: readable tables with the library's numbers, and figures that mark divergence and stay
readable."""

from __future__ import annotations

import csv
import json
import os
import stat

import numpy as np
import pytest
from sweep_cases import FAST, RTOL, TINY, base_result, figure_rows, tiny

from experiments.sweep import figures, tables
from experiments.sweep.config import fingerprint


def test_command_writes_readable_files_with_the_library_numbers(tmp_path, monkeypatch):
    import functools

    import yaml

    from experiments.sweep import cli
    from experiments.sweep import run as sweep_run

    monkeypatch.setattr(sweep_run, "run_sweep", functools.partial(sweep_run.run_sweep, compiler_options=FAST))

    result = base_result()
    # one data set (the base run's first), so one figure: the programs are the base run's all the same
    (tmp_path / "tiny.yaml").write_text(
        yaml.safe_dump({**TINY, "datasets": TINY["datasets"][:1], "output_dir": str(tmp_path / "out")})
    )
    want = [r for r in result.rows if r["dataset"] == "digits"]
    old = os.umask(0o022)
    try:
        assert cli.main(["--config", str(tmp_path / "tiny.yaml"), "--no-progress"]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    with open(out / "results.csv") as fh:
        table = list(csv.reader(fh))
    assert tuple(table[0]) == tables.ROW_COLUMNS and len(table) == 1 + len(want)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["train_loss"] for r in rows], [r["train_loss"] for r in want], rtol=RTOL)
    final = [r for r in rows if r["final"]]
    assert all(0 <= r["test_accuracy_pct"] <= 100 for r in final)
    assert max(r["test_accuracy_pct"] for r in final) > 1  # a percentage, not a fraction
    assert all(r["gap"] == pytest.approx(r["train_loss"] - r["L_star"], rel=1e-9) for r in rows)
    with open(out / "aggregate.csv") as fh:
        agg = list(csv.DictReader(fh))
    assert tuple(agg[0]) == tables.AGGREGATE_COLUMNS and len(agg) == 2 * (2 + 1)
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["fingerprint"] == fingerprint(tiny(datasets=TINY["datasets"][:1]))
    assert manifest["n_configurations"] == 18
    assert sum(g["programs_compiled"] for g in manifest["groups"]) == 0  # the library call's programs, reused
    assert "# Sweep `tiny`" in (out / "summary.md").read_text()
    assert (out / "figures" / "digits_m7_square.png").stat().st_size > 1000
    for path in out.rglob("*"):  # the umask's permissions, not mkstemp's 0600
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_figures_mark_divergence_zoom_accuracy_and_stay_readable():
    import matplotlib.pyplot as plt

    base = {
        "dataset": "digits",
        "width": 7,
        "projected": False,
        "model": "delm",
        "depth": None,
        "sigma": "column_softmax",
        "loss": "square",
    }
    rows = (
        figure_rows({**base, "gamma": 0.5, "learning_rate": 0.1}, [93.0, 94.0], [[1.0, 0.5, 0.2]] * 2)
        + figure_rows({**base, "gamma": 0.8, "learning_rate": 0.1}, [91.0, 92.5], [[1.0, 0.6, 0.3]] * 2)
        + figure_rows({**base, "gamma": 0.8, "learning_rate": 0.3}, [None, None], [[1.0, 1e20, None]] * 2)
        + figure_rows({**base, "gamma": 0.9, "learning_rate": 0.3}, [None, None], [[None, None, None]] * 2)
    )
    fig = figures.make_figure(rows)
    try:
        ax_curve, ax_final = fig.axes
        texts = [t for t in fig.findobj(plt.Text) if t.get_text().strip()]
        assert min(t.get_fontsize() for t in texts) >= figures.MIN_FONT_PT
        lo, hi = ax_final.get_xlim()
        assert 85 <= lo < 91 and 94 < hi <= 100  # zoomed to 91..94 %, not 0..100 (nor 0..1)
        assert "%" in ax_final.get_xlabel()
        # every setting is in the accuracy panel; the two diverged ones are marked, none is silently empty
        assert len(ax_final.get_yticklabels()) == 4
        notes = [t.get_text() for t in ax_final.texts]
        assert sorted(notes) == ["diverged: 2/2 seeds"] * 2
        # the curve panel: a line per setting with data, a cross where the diverged one stopped, a note for the
        # one that diverged before any logged step, and a legend of exactly the drawn lines
        drawn = [line for line in ax_curve.get_lines() if line.get_label() and not line.get_label().startswith("_")]
        legend = [t.get_text() for t in ax_curve.get_legend().get_texts()]
        assert legend == [line.get_label() for line in drawn] and len(drawn) == 3
        assert any("diverged: 2/2 seeds" in name for name in legend)
        # the cross is on the diverged setting's own line, so its legend entry shows it
        assert [line.get_label() for line in drawn if line.get_marker() == "x"] == [
            name for name in legend if "diverged" in name
        ]
        # the diverged curve (1e20) leaves the axis at its top, one decade above the others, where its cross is
        (crossed,) = [line for line in drawn if line.get_marker() == "x"]
        top = ax_curve.get_ylim()[1]
        assert top == pytest.approx(10 * 0.9) and crossed.get_ydata()[-1] == top
        assert "x: diverged" in ax_curve.get_legend().get_title().get_text()
        fig.canvas.draw()  # the legend sits below the curves, not over them
        assert not ax_curve.get_legend().get_window_extent().overlaps(ax_curve.get_window_extent())
        assert any(
            "diverged before the first logged step" in t.get_text() and "gamma=0.9" in t.get_text()
            for t in ax_curve.texts
        )
    finally:
        plt.close(fig)
