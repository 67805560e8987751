"""The summary's table, its JSON round trip and the report renderers, on a hand-built search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy import stats

from workers.evidence import NO_DIFFERENCE, compare_metrics, sensitivity
from workers.report import draw_plots, render_html, render_markdown
from workers.summary import SearchSummary, TrialRecord


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
    return SearchSummary(
        experiment="demo", parent_run_id="parent123", objective="AP", seeds=[0, 1, 2], algorithm="random",
        scheduler="asha", epochs=3, trials=trials, baseline=base, best_trial_id="t1", comparison=comp,
        sensitivity=sens, ap_vs_iou=curves, complete=True, wall_s=600.0,
    )  # fmt: skip


def test_table_shows_the_comparison_and_every_trial():
    s = _summary()
    table = s.format_table()
    assert "best configuration: loss.alpha=1.5, loss.margin=0.2  (trial t1)" in table
    ap_line = next(line for line in table.splitlines() if line.startswith("AP "))
    assert "35.0 ± 1.0" in ap_line and "32.0 ± 1.0" in ap_line and "+3.0" in ap_line
    assert "paired t-test on 3 seeds" in table and "0.25" in table
    assert "Holm-adjusted over the 5 metrics" in table
    assert "2 of 3 completed configurations are within 0.5 AP of the best" in table
    assert "failed" in table and "NaN" in table


def _noisy(s: SearchSummary) -> SearchSummary:
    """The same search with seed noise: AP diffs 0.010, 0.005, 0.020 (t-test p > 0.05 on 3 seeds)."""
    assert s.baseline is not None and s.best is not None
    for seed, ap in {0: 0.33, 1: 0.345, 2: 0.34}.items():
        s.baseline.per_seed[seed]["AP"] = ap
    s.comparison = compare_metrics(
        s.best.per_seed, s.baseline.per_seed, ("AP", "AP50", "AP75", "AP90", "aic")
    )
    return s


def test_table_shows_n_test_raw_and_holm_p_interval_method_and_verdict():
    s = _noisy(_summary())
    table = s.format_table()
    lines = table.splitlines()
    head = next(line for line in lines if line.startswith("metric"))
    for column in ("best", "baseline", "diff", " n ", "test", " p ", "p adj", "95% CI (t)", "verdict"):
        assert column in head
    raw = stats.ttest_1samp([0.010, 0.005, 0.020], 0.0).pvalue
    assert 0.05 < raw
    comp = s.comparison["AP"]
    assert comp["p_value"] == pytest.approx(raw) and comp["p_adjusted"] > comp["p_value"]
    ap_line = next(line for line in lines if line.startswith("AP "))
    assert ap_line.split()[7:12] == ["+1.2", "3", "t", f"{raw:.3g}", f"{comp['p_adjusted']:.3g}"]
    assert ap_line.endswith(NO_DIFFERENCE)
    assert "35.0 ± 1.0" in ap_line and "33.8 ± 0.8" in ap_line
    verdict = next(line for line in lines if line.startswith("verdict:"))
    assert NO_DIFFERENCE in verdict and "3 seeds" in verdict and "wide" in verdict
    assert "Test: paired t-test on 3 seeds with its t-interval (n < 6" in table
    assert "bootstrap" not in table  # 3 seeds: no bootstrap interval anywhere


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
    assert (
        "| AP | 35.0 ± 1.0 | 32.0 ± 1.0 | +3.0 | 3 | t | 0 | 0 | [+3.0, +3.0] | 3/3 | HarmonicDet better |"
        in md
    )
    assert (
        "| metric | best | baseline | diff | n | test | p | p adj (Holm) | 95% CI (t) | seeds better | verdict |"
        in md
    )
    assert (
        "| AP50 | 60.0 ± 0.0 | 60.0 ± 0.0 | +0.0 | 3 | t | 1 | 1 | [+0.0, +0.0] | 0/3 | no detectable difference |"
        in md
    )
    assert "Holm-adjusted over the 5 metrics of this table" in md and "Verdict: On AP, HarmonicDet" in md
    assert "![AP vs IoU threshold](ap_vs_iou.png)" in md
    assert "| t3 | failed |" in md
    page = render_html(s, {k: v.name for k, v in plots.items()})
    assert page.startswith("<!doctype html>") and "<img alt='sensitivity" in page
    assert "<th>p adj (Holm)</th><th>95% CI (t)</th>" in page and f"<td>{NO_DIFFERENCE}</td>" in page
    noisy = render_markdown(_noisy(s))
    ap_row = next(line for line in noisy.splitlines() if line.startswith("| AP |"))
    assert ap_row.endswith(f"| {NO_DIFFERENCE} |") and "Verdict: On AP, no detectable difference" in noisy


def test_confirmatory_table_is_its_own_holm_family_in_table_and_report():
    s = _noisy(_summary())
    assert s.best is not None and s.baseline is not None
    s.confirmatory_comparison = compare_metrics(s.best.per_seed, s.baseline.per_seed, ("AP", "AP50"))
    table = s.format_table()
    assert "confirmatory (the spec's loss) vs baseline (standard loss) on the val split" in table
    assert "Holm-adjusted over the 2 metrics of this table" in table  # confirmatory family
    assert "Holm-adjusted over the 5 metrics of this table" in table  # best-vs-baseline family
    assert "HarmonicDet (confirmatory)" in table and "winner's curse" in table
    md = render_markdown(s)
    assert "## Confirmatory configuration (the spec's loss) vs the standard loss" in md
    assert "| metric | confirmatory | baseline | diff | n | test | p | p adj (Holm) | 95% CI (t) |" in md


def test_means_come_from_the_judged_split_not_the_selection_split():
    s = _summary()
    assert s.best is not None and s.baseline is not None
    for rec, shift in ((s.best, 0.05), (s.baseline, 0.0)):
        for seed, metrics in rec.per_seed.items():
            metrics["test_AP"] = 0.20 + shift + 0.01 * seed * (1 + shift)
    test_split = {
        arm: {seed: {"AP": m["test_AP"]} for seed, m in rec.per_seed.items()}
        for arm, rec in (("best", s.best), ("baseline", s.baseline))
    }
    s.comparison = compare_metrics(test_split["best"], test_split["baseline"], ("AP",))
    s.judged_on = "test"
    table = s.format_table()
    ap_line = next(line for line in table.splitlines() if line.startswith("AP "))
    # test split: best 26.1 ± 1.1, baseline 21.0 ± 1.0 (the val AP would read 35.0 and 32.0)
    assert "26.1 ± 1.1" in ap_line and "21.0 ± 1.0" in ap_line and "+5.0" in ap_line
    p, p_adj = ap_line.split()[10:12]  # tiny p-values stay separate columns
    assert float(p) == pytest.approx(s.comparison["AP"]["p_value"], rel=1e-2) and p == p_adj
    assert "on the test split" in table and "winner's curse" not in table
    assert "| AP | 26.1 ± 1.1 | 21.0 ± 1.0 | +5.0 |" in render_markdown(s)
    assert "| 2 | 27.1 / 22.0 |" in render_markdown(s)  # per-seed values of the judged split


def test_table_and_report_say_what_the_pairing_bought_on_the_primary():
    s = _noisy(_summary())
    table = s.format_table()
    (line,) = [x for x in table.splitlines() if x.startswith("pairing: ")]
    # best AP 34, 35, 36 and baseline 33, 34.5, 34 points: SDs 1 and sqrt(7/12), differences 1, 0.5, 2
    # (SD sqrt(7/12) too), covariance 0.5, so r = 0.5 / sqrt(7/12) = 0.65
    assert line == (
        "pairing: AP: SD baseline 0.76, HarmonicDet (best) 1.00, of the paired differences 0.76, "
        "correlation +0.65; independent arms: 1.26"
    )
    assert "Pairing by seed: AP: SD baseline 0.76, HarmonicDet (best) 1.00" in render_markdown(s)


def test_table_and_report_say_beside_the_verdict_whether_the_arms_had_converged():
    from workers.evidence import plateau

    s = _summary()
    s.convergence = {
        "baseline": plateau({0: {1: 0.20, 2: 0.23, 3: 0.26}, 1: {1: 0.21, 2: 0.24, 3: 0.27}}),
        "best": plateau({0: {1: 0.30, 2: 0.33, 3: 0.336}, 1: {1: 0.31, 2: 0.34, 3: 0.35}}),
    }
    lines = s.format_table().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("verdict:"))
    assert lines[at + 2 : at + 4] == [
        "convergence: baseline still improving: +3.0 AP over the last 1 of 3 epochs against a seed SD of 0.7; "
        "the verdict compares arms before they converged",
        "convergence: HarmonicDet (best) plateaued: +0.8 AP over the last 1 of 3 epochs against a seed SD of 1.0",
    ]
    back = SearchSummary.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back.convergence["baseline"]["plateaued"] is False and back.format_table() == s.format_table()
    md = render_markdown(s)
    assert "Convergence (validation AP): baseline still improving: +3.0 AP" in md
    assert "HarmonicDet (best) plateaued" in md
