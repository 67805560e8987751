"""The summary's table, its JSON round trip and the report renderers, on a hand-built search."""

from __future__ import annotations

import json
from pathlib import Path

from workers.evidence import compare_metrics, sensitivity
from workers.report import render_html, render_markdown
from workers.search import SearchSummary, TrialRecord, draw_plots


def _summary() -> SearchSummary:
    def rec(tid: str, alpha: float, base_ap: float, status: str = "completed") -> TrialRecord:
        per_seed = {
            s: {"AP": base_ap + 0.01 * s, "AP50": 0.6, "AP75": 0.3 + 0.01 * s, "AP90": 0.05 + 0.002 * s,
                "aic": 0.2, **{f"ap_iou_{t}": max(0.0, base_ap + 0.4 - t / 200) for t in range(50, 100, 5)}}
            for s in (0, 1, 2)
        }  # fmt: skip
        return TrialRecord(tid, "search", {"loss.alpha": alpha, "loss.margin": 0.2}, status, epochs=3,
                           objective=base_ap + 0.01, objective_std=0.01, per_seed=per_seed,
                           child_runs={s: f"run-{tid}-{s}" for s in per_seed}, wall_s=60.0, cpu_s=100.0,
                           gpu_s=0.0, first_step_s=8.5, epochs_run=9)  # fmt: skip

    trials = [rec("t0", 0.5, 0.30), rec("t1", 1.5, 0.34), rec("t2", 2.5, 0.336)]
    trials.append(
        TrialRecord("t3", "search", {"loss.alpha": 9.0, "loss.margin": 0.2}, "failed", error="seed 0: NaN")
    )
    base = rec("baseline", 0.0, 0.31)
    base.arm, base.params = "baseline", {"loss.kind": "standard"}
    best = trials[1]
    comp = compare_metrics(best.per_seed, base.per_seed, ("AP", "AP50", "AP75", "AP90", "aic"))
    sens = sensitivity([{"params": t.params, "objective": t.objective} for t in trials], tolerance=0.005)
    curves = {
        "best (harmonic)": {t / 100: best.seed_mean(f"ap_iou_{t}") for t in range(50, 100, 5)},
        "baseline (standard)": {t / 100: base.seed_mean(f"ap_iou_{t}") for t in range(50, 100, 5)},
    }
    return SearchSummary("demo", "parent123", "AP", [0, 1, 2], "random", "asha", 3, trials, base, "t1", comp,
                         sens, curves, True, 600.0)  # fmt: skip


def test_table_shows_the_comparison_and_every_trial():
    s = _summary()
    table = s.format_table()
    assert "best configuration: loss.alpha=1.5, loss.margin=0.2  (trial t1)" in table
    ap_line = next(line for line in table.splitlines() if line.startswith("AP "))
    assert "35.0 ± 1.0" in ap_line and "32.0 ± 1.0" in ap_line and "+3.0" in ap_line
    assert "paired t-test on 3 seeds" in table and "0.25" in table
    assert "2 of 3 completed configurations are within 0.5 AP of the best" in table
    assert "failed" in table and "NaN" in table


def test_json_round_trip_keeps_seeds_and_thresholds_typed():
    s = _summary()
    back = SearchSummary.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back.best is not None and back.best.per_seed[2]["AP"] == s.trials[1].per_seed[2]["AP"]
    assert back.comparison["AP"]["per_seed"][1]["diff"] == s.comparison["AP"]["per_seed"][1]["diff"]
    assert back.ap_vs_iou["best (harmonic)"][0.5] == s.ap_vs_iou["best (harmonic)"][0.5]
    assert back.format_table() == s.format_table()


def test_reports_and_plots(tmp_path: Path):
    s = _summary()
    plots = draw_plots(s, tmp_path)
    assert set(plots) == {"ap_vs_iou", "sensitivity", "paired_differences"}
    assert all(p.stat().st_size > 1000 for p in plots.values())
    md = render_markdown(s, {k: v.name for k, v in plots.items()})
    assert "| AP | 35.0 ± 1.0 | 32.0 ± 1.0 | +3.0 |" in md
    assert "![AP vs IoU threshold](ap_vs_iou.png)" in md
    assert "| t3 | failed |" in md
    page = render_html(s, {k: v.name for k, v in plots.items()})
    assert page.startswith("<!doctype html>") and "<img alt='sensitivity" in page
